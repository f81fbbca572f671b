"""Measured budgets of the notebooks: a pytest plugin for the nbval run, and the script that
writes the figures into the README table and the notebook headers.

During `pytest --nbval`, for every notebook whose cells all run, the plugin records

* the wall time from the kernel's start to the end of the last cell (reported, never asserted);
* the kernel's peak memory: the high-water mark of its resident set (`VmHWM` in
  /proc/PID/status; where there is no /proc, the largest resident set sampled every 0.2 s);
* the largest resident set of the processes the kernel starts (summed over those alive at one
  sample), reported apart;

writes them to `notebooks/budgets.json` with the machine and the date, and fails the
notebook's last cell when the kernel's peak is above `LIMIT_BYTES` (1.5 GB = 1.5e9 bytes,
1.40 GiB: Binder's 2 GiB must also hold the Jupyter server).

    python tests/nb_budgets.py          # write README.md's table and each notebook's header from the file
    python tests/nb_budgets.py --check  # exit 1 when they disagree with the file
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ROOT / "notebooks" / "budgets.json"
README = ROOT / "README.md"
LIMIT_BYTES = 1_500_000_000
SAMPLE_SECONDS = 0.2


# --- measuring -----------------------------------------------------------------------------------

def _vm_hwm(pid: int) -> int | None:
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
        hwm = _vm_hwm(self.process.pid)
        return {"seconds": round(time.perf_counter() - self.start, 1),
                "kernel_peak_bytes": hwm if hwm is not None else self.sampled_peak,
                "kernel_peak_source": "VmHWM" if hwm is not None else f"rss sampled every {SAMPLE_SECONDS} s",
                "children_peak_bytes": self.children_peak}


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


# --- the README table and the notebook headers ---------------------------------------------------

def duration(seconds: float) -> str:
    """Seconds as the README writes them.

    >>> duration(17.4), duration(80.2), duration(120)
    ('17 s', '1 min 20 s', '2 min')
    """
    minutes, rest = divmod(round(seconds), 60)
    return f"{rest} s" if not minutes else f"{minutes} min" + (f" {rest} s" if rest else "")


def gigabytes(n: float) -> str:
    """Bytes in GB (1e9 bytes), as the README writes them.

    >>> gigabytes(1_234_567_890)
    '1.23 GB'
    """
    return f"{n / 1e9:.2f} GB"


def load() -> dict[str, dict]:
    return json.loads(BUDGETS.read_text())["notebooks"]


def short_machine(entry: dict) -> str:
    """'a 2-core Intel Xeon ... CPU, no GPU' from the recorded machine line."""
    cpu, cores, _ram, gpu = entry["machine"].split(", ")[:4]
    return f"a {cores.split()[0]}-core {cpu} ({gpu})"


def header_line(entry: dict) -> str:
    return (f"**Measured:** runs in {duration(entry['seconds'])} with a kernel peak of "
            f"{gigabytes(entry['kernel_peak_bytes'])}, on {short_machine(entry)}, {entry['date']} "
            "(`notebooks/budgets.json`).")


def table_cells(entry: dict) -> tuple[str, str]:
    return duration(entry["seconds"]), gigabytes(entry["kernel_peak_bytes"])


def readme_rows(text: str) -> dict[str, list[str]]:
    """The cells of the README's notebook table, by notebook file name."""
    rows = {}
    for line in text.splitlines():
        match = re.search(r"\]\(notebooks/(\d\d_\w+\.ipynb)\)", line)
        if line.startswith("|") and match:
            rows[match.group(1)] = [c.strip() for c in line.strip("|").split("|")]
    return rows


TIME_COLUMN, MEMORY_COLUMN = 2, 3  # | # | topic | time to run | peak memory | ...


def synced_readme(text: str, budgets: dict[str, dict]) -> str:
    lines = []
    for line in text.splitlines(keepends=True):
        match = re.search(r"\]\(notebooks/(\d\d_\w+\.ipynb)\)", line)
        if line.startswith("|") and match and match.group(1) in budgets:
            cells = line.rstrip("\n").strip("|").split("|")
            time_cell, memory_cell = table_cells(budgets[match.group(1)])
            cells[TIME_COLUMN], cells[MEMORY_COLUMN] = f" {time_cell} ", f" {memory_cell} "
            line = "|" + "|".join(cells) + "|\n"
        lines.append(line)
    return "".join(lines)


def synced_header(source: str, entry: dict) -> str:
    """The first markdown cell with its `**Measured:**` line replaced (or added after `**Time:**`)."""
    measured = re.compile(r"^\*\*Measured:\*\*.*$", re.MULTILINE)
    if measured.search(source):
        return measured.sub(lambda _: header_line(entry), source, count=1)
    time_line = re.compile(r"^(\*\*Time:\*\*.*)$", re.MULTILINE)
    return time_line.sub(lambda m: m.group(1) + "\n" + header_line(entry), source, count=1)


def sync(check: bool = False) -> list[str]:
    """Write the README table and the notebook headers from the budgets file (or, with
    `check`, only list what disagrees). Returns the files that changed or would change."""
    import nbformat

    budgets, changed = load(), []
    text = README.read_text()
    if synced_readme(text, budgets) != text:
        changed.append("README.md")
        if not check:
            README.write_text(synced_readme(text, budgets))
    for name, entry in budgets.items():
        path = ROOT / "notebooks" / name
        if not path.exists():
            continue
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        new = synced_header(first.source, entry)
        if new != first.source:
            changed.append(f"notebooks/{name}")
            if not check:
                first.source = new
                nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    changed = sync(check)
    verb = "disagree with" if check else "written from"
    print("\n".join(f"{name} {verb} notebooks/budgets.json" for name in changed)
          or "README.md and the notebook headers agree with notebooks/budgets.json")
    sys.exit(1 if check and changed else 0)
