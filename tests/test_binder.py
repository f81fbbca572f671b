"""Binder, rebuilt here the way repo2docker reads binder/: a fresh virtual environment from
binder/requirements.txt, then binder/postBuild, then every command through binder/start; in it,
notebook 00 and the heaviest notebook run under nbval with MEM_LIMIT at Binder's 2 GiB.

mybinder.org gives the Jupyter server and the kernel 2 GiB together: the test measures the server
(JupyterLab started through binder/start, at rest) and each kernel's peak (VmHWM, recorded by
tests/nb_budgets.py), and requires server + kernel <= 2 GiB and the kernel <= 1.5 GB.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests import nb_budgets
from tests.fresh import copy_clone, free_port, new_venv, scratch

pytestmark = pytest.mark.slow
GiB = 2**30
MEM_LIMIT = 2 * GiB


def heaviest_notebook() -> str:
    """The notebook (other than 00) with the highest recorded kernel peak: notebooks/budgets.json."""
    budgets = {name: entry for name, entry in nb_budgets.load().items() if not name.startswith("00_")}
    return max(budgets, key=lambda name: budgets[name]["kernel_peak_bytes"])


@pytest.fixture(scope="module")
def binder():
    """The repository as repo2docker sees it, and the environment it builds from binder/."""
    with scratch("binder") as folder:
        yield build_binder(folder / "repo", folder / "venv")


def build_binder(repo: Path, venv: Path) -> tuple[Path, dict[str, str]]:
    """Copy the repository to `repo` and build `venv` from its binder/ folder, as repo2docker does."""
    copy_clone(repo)
    runtime = (repo / "binder" / "runtime.txt").read_text().strip()
    assert runtime == f"python-{sys.version_info.major}.{sys.version_info.minor}", (
        f"binder/runtime.txt asks for {runtime}: run this test with that Python")
    env = new_venv(venv)
    start = time.monotonic()
    subprocess.run(["pip", "install", "-q", "-r", "binder/requirements.txt"], cwd=repo, env=env, check=True)
    subprocess.run(["bash", "binder/postBuild"], cwd=repo, env=env, check=True)
    print(f"Binder environment built in {time.monotonic() - start:.0f} s")
    cuda = subprocess.run(["python", "-c", "import torch; print(torch.version.cuda)"], env=env,
                          check=True, capture_output=True, text=True).stdout.strip()
    assert cuda == "None", f"the Binder build installed a CUDA torch ({cuda})"
    return repo, env


def server_rss(repo, env) -> int:
    """Resident memory of JupyterLab started through binder/start, once it answers (bytes)."""
    port = free_port()
    command = ["binder/start", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--IdentityProvider.token=", "--allow-root"]
    server = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "binder/start jupyter lab exited"
                assert time.monotonic() < deadline, "binder/start: JupyterLab did not answer in 120 s"
                time.sleep(0.5)
        time.sleep(2)
        process = psutil.Process(server.pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_binder_runs_notebook_00_and_the_heaviest_within_2_gib(binder):
    repo, env = binder
    server = server_rss(repo, env)
    notebooks = ["00_meet_llama2_13b.ipynb", heaviest_notebook()]
    budgets = repo / "budgets-under-binder.json"
    # The test's harness, not part of the image: nbval plays the part of the Jupyter server.
    subprocess.run(["pip", "install", "-q", "pytest", "nbval", "ipykernel"], env=env, check=True)
    command = ["binder/start", "python", "-m", "pytest", "-q", f"--nb-budgets={budgets}",
               f"--nb-memory-limit={nb_budgets.LIMIT_BYTES}", "--nbval-cell-timeout=1800",  # a hang guard
               *(f"notebooks/{name}" for name in notebooks)]
    run = subprocess.run(command, cwd=repo, env={**env, "MEM_LIMIT": str(MEM_LIMIT)}, capture_output=True,
                         text=True)
    print(run.stdout[-20_000:], run.stderr[-2000:])
    figures = json.loads(budgets.read_text())["notebooks"] if budgets.exists() else {}
    for name, entry in figures.items():
        kernel = entry["kernel_peak_bytes"]
        print(f"Binder, MEM_LIMIT=2 GiB: {name}: kernel peak {kernel / GiB:.2f} GiB ({kernel / 1e9:.2f} GB), "
              f"JupyterLab {server / GiB:.2f} GiB, together {(kernel + server) / GiB:.2f} GiB, "
              f"run in {nb_budgets.duration(entry['seconds'])}")
    assert run.returncode == 0, "nbval failed in the Binder environment (see the output above)"
    for name in notebooks:
        kernel = figures[name]["kernel_peak_bytes"]
        assert kernel <= nb_budgets.LIMIT_BYTES
        assert kernel + server <= MEM_LIMIT, f"{name}: the kernel and the server need over Binder's 2 GiB"
