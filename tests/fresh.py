"""Fresh copies of this clone, wheels built from it and new virtual environments, for the tests that
install llama-lab the way a learner or Binder does."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_clone(dest: Path) -> Path:
    """Copy the files git sees (tracked, and new ones not ignored) to `dest`: what a clone of this
    working tree would hold, without .venv, build outputs or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def build_wheel(dest: Path) -> Path:
    """Build llama-lab's wheel from a clean copy of this clone (not in place: setuptools would reuse
    a stale build/ folder); returns the wheel's path in `dest`."""
    source = copy_clone(dest / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dest), str(source)], check=True, cwd=dest)
    shutil.rmtree(source)
    [wheel] = dest.glob("llama_lab-*.whl")
    return wheel


@contextlib.contextmanager
def scratch(prefix: str):
    """A temporary folder of this test's own, removed at the end. Not pytest's tmp_path: pytest keeps
    the folders of its last three sessions only, and another session started meanwhile on the same
    machine would delete a long test's environment under it."""
    with tempfile.TemporaryDirectory(prefix=f"llama-lab-{prefix}-") as folder:
        yield Path(folder)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytorch_index_reachable() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        return True
    except OSError:
        return False


def new_venv(path: Path, home: Path | None = None) -> dict[str, str]:
    """A fresh virtual environment at `path` (with an up-to-date pip); returns the environment
    variables of a shell in which it is activated (and, with `home`, a new user's home folder).

    On a machine that cannot reach download.pytorch.org (this project's CI), pip is told not to
    retry it (PIP_RETRIES=0): the CPU torch wheel comes from pip's local find-links instead
    (.ci/run says so). The user's pip configuration and cache are kept when `home` changes.
    """
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(path), PATH=f"{path / 'bin'}{os.pathsep}{env['PATH']}",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    if not pytorch_index_reachable():
        env["PIP_RETRIES"] = "0"
    if home is not None:
        user_config = Path.home() / ".config" / "pip" / "pip.conf"
        if user_config.exists() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(user_config)
        env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
        env["HOME"] = str(home)
    subprocess.run(["pip", "install", "-q", "--upgrade", "pip"], check=True, env=env)
    return env
