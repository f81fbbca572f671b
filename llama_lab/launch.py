"""Where `llama-lab lab` opens the notebooks: a working copy the learner owns, from any directory.

The notebooks travel with the package (a clone's `notebooks/`, or `llama_lab/notebooks/` inside a
wheel: setup.py puts them there). `copy_notebooks` copies them into a working folder on first use
and never overwrites a copy the learner has edited: it records what it wrote, so an untouched copy
is updated after an upgrade while an edited one is kept (`fresh=True` sets it aside, renamed, and
puts a clean one in its place).

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> first = copy_notebooks(folder)
>>> sorted(set(first.values())), len(first) == len(list(shipped_notebooks().glob("*.ipynb")))
(['copied'], True)
>>> name = sorted(first)[0]
>>> _ = (folder / name).write_text("{}")  # the learner edits a notebook
>>> copy_notebooks(folder)[name]
'kept (edited)'
>>> copy_notebooks(folder, fresh=True)[name].startswith("replaced (your copy saved as ")
True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import psutil

PACKAGE = Path(__file__).resolve().parent
MANIFEST = ".llama-lab-copies.json"  # in the working folder: the hash of each copy as written


def shipped_notebooks() -> Path:
    """The notebooks this install carries: a clone's `notebooks/` (editable install), else the wheel's."""
    clone = PACKAGE.parent
    if (clone / "pyproject.toml").is_file() and (clone / "notebooks").is_dir():
        return clone / "notebooks"
    return PACKAGE / "notebooks"


def default_folder() -> Path:
    """The working folder `llama-lab lab` uses without `--dir`: ~/llama-lab."""
    return Path.home() / "llama-lab"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_notebooks(folder: Path, fresh: bool = False) -> dict[str, str]:
    """Bring `folder`'s notebooks up to date with the shipped ones; return what happened to each.

    A missing notebook is copied; one untouched since it was copied is updated; one the learner
    edited is kept, unless `fresh`: then it is renamed `NAME.edited-<time>.ipynb` and a clean
    copy takes its place.
    """
    source = shipped_notebooks()
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() == source.resolve():
        return {path.name: "in place" for path in sorted(source.glob("*.ipynb"))}
    manifest_path = folder / MANIFEST
    written = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    report = {}
    for src in sorted(source.glob("*.ipynb")):
        dest = folder / src.name
        if not dest.exists():
            report[src.name] = "copied"
        elif _digest(dest) == _digest(src):
            report[src.name] = "up to date"
        elif _digest(dest) == written.get(src.name):
            report[src.name] = "updated"
        elif fresh:
            saved = dest.with_name(f"{dest.stem}.edited-{time.strftime('%Y%m%d-%H%M%S')}.ipynb")
            dest.rename(saved)
            report[src.name] = f"replaced (your copy saved as {saved.name})"
        else:
            report[src.name] = "kept (edited)"
            continue
        shutil.copyfile(src, dest)
        written[src.name] = _digest(dest)
    manifest_path.write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
    return report


def summary(folder: Path, report: dict[str, str]) -> str:
    """What `llama-lab lab` prints about the working folder before JupyterLab starts."""
    counts = Counter(action.split(" (")[0] for action in report.values())
    lines = [f"Notebooks in {folder}: " + ", ".join(f"{n} {action}" for action, n in counts.items())]
    lines += [f"  {name}: {action}" for name, action in report.items() if "(" in action]
    if "kept (edited)" in report.values():
        lines.append("  (`llama-lab lab --fresh` puts clean copies in place and keeps yours, renamed)")
    return "\n".join(lines)


# --- running as root --------------------------------------------------------------------------

def in_container() -> bool:
    """True inside Docker, Podman, Kubernetes or LXC (Colab and Binder run in containers too)."""
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists() or os.environ.get("container"):
        return True
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(word in cgroup for word in ("docker", "kubepods", "containerd", "lxc"))


def other_users_running() -> bool:
    """True when some process on this machine belongs to another user than this one."""
    me = os.geteuid()
    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if uids is not None and uids.real != me:
            return True
    return False


ROOT_REFUSAL = """\
llama-lab lab: you are root, and Jupyter refuses to run as root: a notebook runs any code with the
rights of the user who started it, and here that would be root, on a machine that other users share.
Start it as a normal user instead (for example `su - USER -c "llama-lab lab"`), or, if this machine
is yours alone, say so: `llama-lab lab --allow-root`."""


def root_flags(extra: list[str]) -> list[str] | None:
    """The flag JupyterLab needs for this user: [] or ["--allow-root"]; None when root should not run it.

    Root may run it without asking inside a container where no other user runs anything (Docker,
    Colab's terminal): there is no one else whose files a notebook could reach.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or "--allow-root" in extra:
        return []
    if in_container() and not other_users_running():
        return ["--allow-root"]
    return None
