"""README's install commands, exactly, as a new user runs them: a new virtual environment, a new
home folder, a temporary directory outside the clone, llama-lab from a wheel built here. It ends
with `llama-lab doctor` green and `llama-lab lab` serving the notebooks from ~/llama-lab.

One change to the README's text: the package comes from the wheel built from this clone instead
of `git+https://github.com/...` (pip builds the same wheel from a clone of the repository).
On this project's CI, download.pytorch.org is unreachable: the README's torch line runs as written
and pip finds the same CPU wheel in its local find-links (see .ci/run and tests/fresh.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from scripts import sync_notebooks
from tests.fresh import ROOT, build_wheel, free_port, new_venv, scratch

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The lines of the first bash block of README.md's "Start" section."""
    start = (ROOT / "README.md").read_text().split("\n## Start\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", start, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_commands_install_llama_lab_from_any_folder():
    with scratch("fresh-install") as folder:
        install_and_open(folder)


def install_and_open(folder: Path) -> None:
    commands = readme_commands()
    assert commands[-1] == "llama-lab lab" and commands[0].startswith("pip install torch --index-url")
    wheel = build_wheel(folder / "wheelhouse")
    home, work = folder / "home", folder / "somewhere"
    home.mkdir()
    work.mkdir()
    env = new_venv(folder / "venv", home=home)
    for cache in ("LLAMA_LAB_CACHE", "XDG_CACHE_HOME"):  # a new user: the model is converted afresh
        env.pop(cache, None)
    for command in commands[:-1]:
        command = command.replace(sync_notebooks.install_url(), wheel.as_uri())
        print(f"$ {command}")
        subprocess.run(command, shell=True, cwd=work, env=env, check=True)
    cuda = subprocess.run(["python", "-c", "import torch; print(torch.version.cuda)"], env=env,
                          check=True, capture_output=True, text=True).stdout.strip()
    assert cuda == "None", f"README's commands installed a CUDA torch ({cuda}) on a machine without a GPU"

    doctor = subprocess.run(["llama-lab", "doctor"], cwd=work, env=env, capture_output=True, text=True)
    print(doctor.stdout, doctor.stderr[-2000:])
    assert doctor.returncode == 0 and "Ready" in doctor.stdout
    assert re.search(r"\[ok  \] notebooks +\d+, from 00_", doctor.stdout)  # the wheel carried them

    shipped = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    port = free_port()
    lab = subprocess.Popen([*commands[-1].split(), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                            "--IdentityProvider.token="], cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                listing = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5)
                break
            except OSError:
                assert lab.poll() is None, f"llama-lab lab exited: {lab.stdout.read()}"
                assert time.monotonic() < deadline, "llama-lab lab: JupyterLab did not answer in 120 s"
                time.sleep(0.5)
        served = sorted(item["name"] for item in json.load(listing)["content"] if item["type"] == "notebook")
        assert served == shipped, "JupyterLab does not show the notebooks"
        assert sorted(p.name for p in (home / "llama-lab").glob("*.ipynb")) == shipped
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(30)
