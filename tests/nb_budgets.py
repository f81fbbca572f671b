"""Measured budgets of the notebooks: a pytest plugin for the nbval run.

During `pytest --nbval`, for every notebook whose cells all run, the plugin records

* the wall time from the kernel's start to the end of the last cell (reported, never asserted), and
  the CPU time the kernel and its finished children used (what a shared server must provide);
* the kernel's peak memory: the high-water mark of its resident set (`VmHWM` in
  /proc/PID/status; where there is no /proc, the largest resident set sampled every 0.2 s);
* the largest resident set of the processes the kernel starts (summed over those alive at one
  sample), reported apart;

writes them to `notebooks/budgets.json` with the machine and the date, and fails the
notebook's last cell when the kernel's peak is above `LIMIT_BYTES` (1.5 GB = 1.5e9 bytes,
1.40 GiB: Binder's 2 GiB must also hold the Jupyter server). `tests/budget_docs.py` writes the
recorded figures into the README, the notebook headers and the docs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ROOT / "notebooks" / "budgets.json"
LIMIT_BYTES = 1_500_000_000
BINDER_BYTES = 2 * 2**30  # mybinder.org: MEM_LIMIT, for the Jupyter server and the kernel together
SAMPLE_SECONDS = 0.2


# --- measuring -----------------------------------------------------------------------------------

def vm_hwm(pid: int) -> int | None:
    """Peak resident set of a process in bytes, from /proc (Linux); None where there is no /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class KernelWatch:
    """Samples a kernel process and its children until `stop()`; keeps the peaks."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.sampled_peak = self.children_peak = 0
        self.start = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            self.sampled_peak = max(self.sampled_peak, self.process.memory_info().rss)
            children = self.process.children(recursive=True)
        except psutil.Error:
            return
        total = 0
        for child in children:
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass  # it ended between the listing and the reading
        self.children_peak = max(self.children_peak, total)

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._sample()

    def stop(self) -> dict:
        """The figures of this run, read while the kernel is still alive."""
        self._sample()
        self._done.set()
        self._thread.join()
        hwm = vm_hwm(self.process.pid)
        cpu = self.process.cpu_times()
        return {"seconds": round(time.perf_counter() - self.start, 1),
                "cpu_seconds": round(cpu.user + cpu.system + cpu.children_user + cpu.children_system, 1),
                "kernel_peak_bytes": hwm if hwm is not None else self.sampled_peak,
                "kernel_peak_source": "VmHWM" if hwm is not None else f"rss sampled every {SAMPLE_SECONDS} s",
                "children_peak_bytes": self.children_peak}


def check_binder(name: str, kernel: int, server: int) -> None:
    """Print a notebook's kernel peak beside the Jupyter server's memory (bytes), then require the
    kernel within `LIMIT_BYTES` and the two within Binder's 2 GiB (tests/test_binder.py and
    tests/test_browser.py)."""
    print(f"MEM_LIMIT=2 GiB: {name}: kernel peak {gigabytes(kernel)}, Jupyter server {gigabytes(server)}, "
          f"together {(kernel + server) / 2**30:.2f} GiB")
    assert kernel <= LIMIT_BYTES, f"{name}: the kernel peaked above {gigabytes(LIMIT_BYTES)}"
    assert kernel + server <= BINDER_BYTES, f"{name}: the kernel and the server need over Binder's 2 GiB"


def machine() -> str:
    """One line about this machine: CPU, cores, RAM, GPU, OS, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    except ImportError:
        gpu, versions = "no torch", f"Python {platform.python_version()}"
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, "
            f"{platform.system()} {platform.release()}, {versions}")


# --- the pytest plugin ---------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("nb-budgets", "measured notebook budgets")
    group.addoption("--nb-budgets", default=str(BUDGETS),
                    help="JSON file to record each notebook's time and kernel peak in ('' to not write)")
    group.addoption("--nb-memory-limit", type=float, default=LIMIT_BYTES,
                    help="fail a notebook whose kernel peaks above this many bytes (default 1.5e9)")


def _is_cell(item) -> bool:
    return type(item).__name__ == "IPyNbCell"


def duration(seconds: float) -> str:
    """Seconds as the README writes them.

    >>> duration(17.4), duration(80.2), duration(120), duration(9000)
    ('17 s', '1 min 20 s', '2 min', '2 h 30 min')
    """
    minutes, rest = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{rest} s" if not minutes else f"{minutes} min" + (f" {rest} s" if rest else "")


def gigabytes(n: float) -> str:
    """Bytes in GB (1e9 bytes), as the README writes them.

    >>> gigabytes(1_234_567_890)
    '1.23 GB'
    """
    return f"{n / 1e9:.2f} GB"


def load() -> dict[str, dict]:
    """The recorded figures, by notebook file name."""
    return json.loads(BUDGETS.read_text())["notebooks"]


class Budgets:
    """Watches each notebook's kernel from its first cell to its last."""

    def __init__(self, config):
        self.path = config.getoption("--nb-budgets")
        self.limit = config.getoption("--nb-memory-limit")
        self.last_cell: dict = {}  # notebook collector -> its last selected cell
        self.complete: set = set()  # notebooks whose every code cell is selected
        self.watches: dict = {}
        self.results: dict[str, dict] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        selected: dict = {}
        for item in filter(_is_cell, items):
            selected[item.parent] = selected.get(item.parent, 0) + 1
            self.last_cell[item.parent] = item
        for notebook, n in selected.items():
            if n == sum(cell.cell_type == "code" for cell in notebook.nb.cells):
                self.complete.add(notebook)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        notebook = item.parent
        if not _is_cell(item) or notebook not in self.complete or notebook in self.watches:
            return (yield)
        start = time.perf_counter()
        try:
            return (yield)  # the first cell's setup starts the notebook's kernel
        finally:
            if notebook.kernel is not None:
                self.watches[notebook] = KernelWatch(notebook.kernel.km.provisioner.pid)
                self.watches[notebook].start = start

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        watch = self.watches.pop(item.parent, None) if self.last_cell.get(item.parent) is item else None
        figures = watch.stop() if watch else None  # before the teardown stops the kernel
        result = yield
        if figures:
            name = Path(str(item.parent.path)).name
            self.results[name] = {**figures, "date": datetime.date.today().isoformat(), "machine": machine(),
                                  "load_average_1min": round(os.getloadavg()[0], 2)}
            peak = figures["kernel_peak_bytes"]
            if peak > self.limit:
                raise AssertionError(f"{name}: the kernel peaked at {peak / 1e9:.2f} GB, above the budget of "
                                     f"{self.limit / 1e9:.2f} GB (Binder gives 2 GiB for the kernel and the "
                                     "Jupyter server together): free what a section no longer needs")
        return result

    def pytest_sessionfinish(self):
        if self.path and self.results:
            path = Path(self.path)
            data = json.loads(path.read_text()) if path.exists() else {}
            data["limit_bytes"] = int(self.limit)
            data.setdefault("notebooks", {}).update(self.results)
            data["notebooks"] = dict(sorted(data["notebooks"].items()))
            path.write_text(json.dumps(data, indent=1) + "\n")

    def pytest_terminal_summary(self, terminalreporter):
        if self.results:
            terminalreporter.section("notebook budgets")
            for name, r in self.results.items():
                terminalreporter.write_line(f"{name}: {duration(r['seconds'])}, kernel peak "
                                            f"{gigabytes(r['kernel_peak_bytes'])}, children "
                                            f"{gigabytes(r['children_peak_bytes'])}")


def pytest_configure(config):
    if config.getoption("--nbval", default=False) or config.getoption("--nbval-lax", default=False):
        config.pluginmanager.register(Budgets(config), "nb-budgets")
