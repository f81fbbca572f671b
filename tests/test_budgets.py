"""Measured budgets: every notebook is measured and within the memory budget, the README table, the
notebook headers and the docs show the recorded figures (tests/budget_docs.py), and the plugin that
records them (tests/nb_budgets.py) measures a kernel and its children and fails a notebook over the
budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import budget_docs
import nb_budgets
import nbformat

NOTEBOOKS = sorted(p.name for p in (nb_budgets.ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_measured_within_the_budget():
    budgets = nb_budgets.load()
    assert [n for n in NOTEBOOKS if n not in budgets] == [], "run the notebooks under pytest to measure them"
    peaks = {name: entry["kernel_peak_bytes"] for name, entry in budgets.items()}
    assert {name: peak for name, peak in peaks.items() if peak > nb_budgets.LIMIT_BYTES} == {}


def test_readme_table_and_notebook_headers_agree_with_the_file():
    rows = budget_docs.readme_rows(budget_docs.README.read_text())
    assert [n for n in NOTEBOOKS if n not in rows] == [], "a notebook without its row in the README table"
    stale = budget_docs.sync(check=True)
    assert stale == [], "python tests/budget_docs.py writes the figures of notebooks/budgets.json into these"


def test_sync_writes_the_figures():
    entry = {"seconds": 80.4, "kernel_peak_bytes": 1_234_000_000, "date": "2026-12-01",
             "machine": "AMD EPYC, 2 cores, 24 GiB RAM, no GPU, Linux 6, Python 3.11.7, torch 2.13.0+cpu"}
    row = "| 05 | [Fine-tuning](notebooks/05_finetuning.ipynb) | 1 min | 1.7 GB | [Colab](x) |\n"
    assert budget_docs.synced_readme(row, {"05_finetuning.ipynb": entry}) == (
        "| 05 | [Fine-tuning](notebooks/05_finetuning.ipynb) | 1 min 20 s | 1.23 GB | [Colab](x) |\n")
    header = budget_docs.synced_header("# 05\n\n**Time:** about 45 minutes to read.\n\nMore.", entry)
    assert header.splitlines()[3] == ("**Measured:** runs in 1 min 20 s with a kernel peak of 1.23 GB, on a "
                                      "2-core AMD EPYC (no GPU), 2026-12-01 (`notebooks/budgets.json`).")
    assert budget_docs.synced_header(header, {**entry, "seconds": 20}).count("**Measured:**") == 1


def _notebook(path: Path) -> None:
    """A kernel that holds 300 MB, and a child process that holds 200 MB for two seconds."""
    child = "import time; x = b'1' * 200_000_000; time.sleep(2)"
    cells = ["big = b'1' * 300_000_000  # written, so resident",
             f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _run_nbval(folder: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "pytest", "probe.ipynb", "--nbval-lax", "--nbval-current-env",
               "-p", "nb_budgets", "-p", "no:cacheprovider", "-o", "addopts=",
               "--nb-budgets", "budgets.json", *options]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def test_plugin_records_a_kernel_and_fails_it_over_the_budget(tmp_path):
    _notebook(tmp_path / "probe.ipynb")
    done = _run_nbval(tmp_path, "--nb-memory-limit", "2e8")
    assert done.returncode == 1 and "the kernel peaked at 0.3" in done.stdout, done.stdout + done.stderr
    assert "above the budget of 0.20 GB" in done.stdout
    entry = json.loads((tmp_path / "budgets.json").read_text())["notebooks"]["probe.ipynb"]
    assert 300e6 < entry["kernel_peak_bytes"] < 600e6 and entry["kernel_peak_source"] == "VmHWM"
    assert entry["children_peak_bytes"] > 200e6 and entry["seconds"] > 2 and entry["cpu_seconds"] > 0
    assert "cores" in entry["machine"]

    done = _run_nbval(tmp_path)  # the default budget, 1.5 GB
    assert done.returncode == 0, done.stdout + done.stderr
    assert "probe.ipynb: " in done.stdout and "kernel peak 0.3" in done.stdout  # the terminal summary


def test_a_partial_run_is_not_recorded(tmp_path):
    _notebook(tmp_path / "probe.ipynb")
    done = _run_nbval(tmp_path, "--deselect", "probe.ipynb::Cell 1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "budgets.json").exists()
