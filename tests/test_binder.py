"""Binder, rebuilt here the way repo2docker reads binder/: a fresh virtual environment from
binder/requirements.txt, then binder/postBuild, then every command through binder/start.

mybinder.org gives the Jupyter server and the kernel 2 GiB together. Here notebook 00 runs under
nbval in that environment with MEM_LIMIT at 2 GiB, beside JupyterLab started through binder/start
(its memory measured at rest, each kernel's peak recorded by tests/nb_budgets.py): server + kernel
<= 2 GiB and the kernel <= 1.5 GB. Every other notebook's memory is measured in the browser test
(tests/test_browser.py: a Run All in JupyterLab, MEM_LIMIT at 2 GiB, the same two limits) in the
test environment, and this test checks that the Binder environment holds the same packages (the
heavy ones at the same versions), so that the two measure the same kernels.

The same kernel can peak higher in a freshly installed environment: VmHWM counts the pages of
mapped files (torch's libraries) too, and how many of those count depends on the page cache (here,
more for files pip had just written). Seen here (2026-12-03): `import torch` peaked at 0.28 GB in a
new Binder environment and 0.23 GB in an older one, 0.224 GB in both once the page cache was
dropped (the anonymous memory was equal); notebook 00 peaked at 1.23 GB in the Binder environment
and 1.12 GB in the test environment. Those pages are clean copies of files, which the kernel takes
back before a container runs out of memory.
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


def installed(env: dict[str, str] | None = None) -> dict[str, str]:
    """name -> version of every distribution in the environment of `env` (this one without)."""
    listing = subprocess.run(["python" if env else sys.executable, "-m", "pip", "list", "--format=json"],
                             env=env, check=True, capture_output=True, text=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listing)}


# What a kernel's memory depends on: the packages the notebooks load, with their compiled code.
HEAVY = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "ipykernel")


def test_binder_has_this_environments_packages_the_heavy_ones_at_the_same_versions(binder):
    """Every package of the Binder environment is in this one; the heavy ones at the same version
    (a light one may get a release between the two installs: it is printed, not a failure)."""
    _, env = binder
    binder_packages, ours = installed(env), installed()
    assert set(HEAVY) | {"llama-lab", "jupyterlab"} <= binder_packages.keys()
    assert not binder_packages.keys() - ours.keys(), "in the Binder environment only"
    differ = {name: (version, ours[name]) for name, version in binder_packages.items()
              if name not in ("pip", "setuptools") and ours[name] != version}
    print(f"versions that differ (Binder's, this environment's): {differ or 'none'}")
    assert not {name: versions for name, versions in differ.items() if name in HEAVY}


def test_binder_runs_notebook_00_within_2_gib(binder):
    repo, env = binder
    server = server_rss(repo, env)
    name = "00_meet_llama2_13b.ipynb"
    budgets = repo / "budgets-under-binder.json"
    # The test's harness, not part of the image: nbval plays the part of the Jupyter server.
    subprocess.run(["pip", "install", "-q", "pytest", "nbval", "ipykernel"], env=env, check=True)
    command = ["binder/start", "python", "-m", "pytest", "-q", f"--nb-budgets={budgets}",
               f"--nb-memory-limit={nb_budgets.LIMIT_BYTES}", "--nbval-cell-timeout=1800",  # a hang guard
               f"notebooks/{name}"]
    run = subprocess.run(command, cwd=repo, env={**env, "MEM_LIMIT": str(nb_budgets.BINDER_BYTES)},
                         capture_output=True, text=True)
    print(run.stdout[-20_000:], run.stderr[-2000:])
    assert run.returncode == 0, "nbval failed in the Binder environment (see the output above)"
    kernel = json.loads(budgets.read_text())["notebooks"][name]["kernel_peak_bytes"]
    nb_budgets.check_binder(f"Binder environment, {name}", kernel, server)
