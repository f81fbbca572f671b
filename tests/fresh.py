"""A clean copy of this clone, and a wheel built from it, for the tests that install llama-lab afresh."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
