"""Write the measured budgets (notebooks/budgets.json, recorded by tests/nb_budgets.py during the
nbval run) into every place that quotes them: the README's notebook table, each notebook's
`**Measured:**` header line, the instructor guide's budget table and timed plans, and the
classroom server's sizing.

    python tests/budget_docs.py          # write them all from the file
    python tests/budget_docs.py --check  # list what disagrees with the file; exit 1 if anything does

Each docs page holds its generated parts between `<!-- begin NAME (...) -->` and `<!-- end NAME -->`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
from nb_budgets import BUDGETS, LIMIT_BYTES, ROOT, duration, gigabytes, load

README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"

# Measured apart from the notebooks (2026-12-01, this project's 2-core CPU): `jupyter lab` 4.6 serving a
# notebook holds 107 MB; rounded up for the browser sessions a learner keeps open.
SERVER_BYTES = 150_000_000
OS_AND_HUB_BYTES = 2_000_000_000  # the operating system, JupyterHub and its proxy on a server
CORES_MEASURED = 2  # without a recorded CPU time: wall time x the 2 cores a computing cell keeps busy

# The workshop plans: a notebook number (read and run whole) or (activity, minutes).
PLANS = {
    "90 minutes: what Llama 2 13B is, and how it writes": [
        ("Welcome; `llama-lab doctor` on every laptop", 8), "00", "04", ("Questions; what to read next", 10)],
    "Half day: from text to tokens to attention to words": [
        ("Welcome; `llama-lab doctor` on every laptop", 15), "00", "01", ("Break", 15), "02", "04",
        ("Questions; what to read next", 10)],
    "Full day (9:00 to 17:00): the whole model, trained, quantized and served": [
        ("Welcome; `llama-lab doctor` on every laptop", 10), "00", "01", ("Break", 15), "02", "03",
        ("Lunch", 60), "04", "05", ("Break", 15), "06", "07", ("Questions; what to read next", 10)],
}


# --- what the notebooks say about themselves -----------------------------------------------------

def notebook_paths() -> dict[str, Path]:
    """Every notebook, by its two-digit number."""
    return {p.name[:2]: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def notebook_facts(path: Path) -> dict:
    """Title, reading minutes (from the header's `**Time:** about N minutes to read`) and exercises."""
    nb = nbformat.read(path, as_version=4)
    header = nb.cells[0].source
    title = header.splitlines()[0].lstrip("# ").split("·", 1)[-1].strip()
    reading = re.search(r"\*\*Time:\*\*\D*?(\d+) minutes to read", header)
    exercises = sum("raise NotImplementedError" in c.source for c in nb.cells if c.cell_type == "code")
    return {"title": title, "exercises": exercises,
            "reading_minutes": int(reading.group(1)) if reading else None}


# --- README table and notebook headers -----------------------------------------------------------

def short_machine(entry: dict) -> str:
    """'a 2-core AMD EPYC (no GPU)' from the recorded machine line."""
    cpu, cores, _ram, gpu = entry["machine"].split(", ")[:4]
    return f"a {cores.split()[0]}-core {cpu} ({gpu})"


def header_line(entry: dict) -> str:
    return (f"**Measured:** runs in {duration(entry['seconds'])} with a kernel peak of "
            f"{gigabytes(entry['kernel_peak_bytes'])}, on {short_machine(entry)}, {entry['date']} "
            "(`notebooks/budgets.json`).")


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
            entry = budgets[match.group(1)]
            cells = line.rstrip("\n").strip("|").split("|")
            cells[TIME_COLUMN] = f" {duration(entry['seconds'])} "
            cells[MEMORY_COLUMN] = f" {gigabytes(entry['kernel_peak_bytes'])} "
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


# --- docs blocks ----------------------------------------------------------------------------------

def _run(budgets: dict, number: str) -> str:
    entry = budgets.get(notebook_paths()[number].name) if number in notebook_paths() else None
    return duration(entry["seconds"]) if entry else "not measured yet"


def budget_table(budgets: dict) -> str:
    rows = ["| # | notebook | reading and exercises | run all (measured) | kernel peak (measured) "
            "| exercises |", "|---|---|---|---|---|---|"]
    for number, path in notebook_paths().items():
        facts, entry = notebook_facts(path), budgets.get(path.name)
        reading = f"{facts['reading_minutes']} min" if facts["reading_minutes"] else "see its header"
        peak = gigabytes(entry["kernel_peak_bytes"]) if entry else "not measured yet"
        rows.append(f"| {number} | {facts['title']} | {reading} | {_run(budgets, number)} | {peak} | "
                    f"{facts['exercises']} |")
    machines = sorted({short_machine(e) for e in budgets.values()})
    return "\n".join(rows) + (f"\n\nMeasured by the test run on {', '.join(machines)}; "
                              f"the budget is {gigabytes(LIMIT_BYTES)} per kernel.{load_note(budgets)}")


def load_note(budgets: dict) -> str:
    """A warning when the figures were measured on a busy machine (times then run long)."""
    busiest = max(budgets.values(), key=lambda e: e.get("load_average_1min", 0))
    load, cores = busiest.get("load_average_1min", 0), int(busiest["machine"].split(", ")[1].split()[0])
    if load <= cores:
        return ""
    return (f" Some were measured on a busy machine (load average up to {load:g} on {cores} cores): their "
            "times are several times what a quiet machine takes; re-run `pytest notebooks` on a quiet one.")


def goals_block(_budgets: dict) -> str:
    """Each notebook's learning goals, as its header lists them under **You will learn to**."""
    parts = []
    for number, path in notebook_paths().items():
        header = nbformat.read(path, as_version=4).cells[0].source
        goals = re.search(r"\*\*You will learn to\*\*\n((?:[-*] .*\n?(?:  .*\n?)*)+)", header)
        listed = goals.group(1).rstrip() if goals else "- (see the notebook's header)"
        parts.append(f"**{number} {notebook_facts(path)['title']}**: the learner can\n{listed}")
    return "\n\n".join(parts)


def plan_minutes(budgets: dict, items: list) -> tuple[list[tuple[str, float]], float]:
    """Each item of a plan with its minutes (reading time + measured run time), and the total."""
    timed = []
    for item in items:
        if isinstance(item, tuple):
            timed.append(item)
            continue
        path = notebook_paths().get(item)
        if path is None:
            timed.append((f"{item} (not written yet)", 0))
            continue
        facts, entry = notebook_facts(path), budgets.get(path.name)
        minutes = (facts["reading_minutes"] or 0) + (entry["seconds"] / 60 if entry else 0)
        timed.append((f"{item} {facts['title']}", minutes))
    return timed, sum(m for _, m in timed)


def _clock(minutes: float) -> str:
    hours, rest = divmod(round(minutes), 60)
    return f"{hours}:{rest:02d}"


def plans_block(budgets: dict) -> str:
    parts = []
    for title, items in PLANS.items():
        timed, total = plan_minutes(budgets, items)
        rows = [f"**{title}** ({_clock(total)} in all)", "", "| starts at | what | minutes |",
                "|---|---|---|"]
        start = 0.0
        for what, minutes in timed:
            rows.append(f"| {_clock(start)} | {what} | {round(minutes)} |")
            start += minutes
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def sizing(budgets: dict) -> dict:
    """Memory and CPU per learner, from the heaviest measured notebook."""
    heaviest = max(budgets, key=lambda n: budgets[n]["kernel_peak_bytes"] + budgets[n]["children_peak_bytes"])
    entry = budgets[heaviest]
    kernel = entry["kernel_peak_bytes"] + entry["children_peak_bytes"]
    guarantee = math.ceil((kernel + SERVER_BYTES) / 1e8) / 10  # GB, rounded up to 0.1
    cpu = {n: e.get("cpu_seconds", e["seconds"] * CORES_MEASURED) for n, e in budgets.items()}
    slowest = max(cpu, key=cpu.get)
    return {"heaviest": heaviest, "kernel": kernel, "guarantee_gb": guarantee,
            "limit_gb": max(2.0, guarantee), "slowest": slowest, "cpu_seconds": cpu[slowest]}


def sizing_block(budgets: dict) -> str:
    s = sizing(budgets)
    per = s["guarantee_gb"] * 1e9
    rows = ["| server RAM | learners (at the guarantee) |", "|---|---|"]
    for ram in (16, 32, 64, 128, 256):
        rows.append(f"| {ram} GB | {int((ram * 1e9 - OS_AND_HUB_BYTES) // per)} |")
    sixty = math.ceil((60 * per + OS_AND_HUB_BYTES) / 1e9)
    cpu = [f"| server cores | 60 learners press Run All on {s['slowest'][:2]} at once: done after |",
           "|---|---|"]
    for cores in (16, 32, 64):
        cpu.append(f"| {cores} | {duration(max(60 * s['cpu_seconds'] / cores, s['cpu_seconds'] / 2))} |")
    return "\n".join([
        f"- **Memory per learner: guarantee {s['guarantee_gb']:.1f} GB, limit {s['limit_gb']:.1f} GB.** "
        f"The heaviest notebook ({s['heaviest']}) peaks at {gigabytes(s['kernel'])} (its kernel and the "
        "processes it starts, measured), and the learner's Jupyter server holds about "
        f"{gigabytes(SERVER_BYTES)}. The limit leaves room for a second notebook's kernel, idle after its "
        "imports.",
        f"- **Learners per server:** (RAM - {gigabytes(OS_AND_HUB_BYTES)} for the system and the hub) / "
        f"{s['guarantee_gb']:.1f} GB. Sixty learners need {sixty} GB:", "", *rows, "",
        f"- **CPU per learner: guarantee 0.5, limit 2.** A notebook computes only while its cells run: "
        f"{s['slowest']}, the heaviest in CPU, uses {round(s['cpu_seconds'])} CPU-seconds for a Run All "
        f"({duration(budgets[s['slowest']]['seconds'])} of wall time here). Readers between cells cost "
        f"nothing; a room that runs the same cell together shares the cores:{load_note(budgets)}", "", *cpu])


def _gb(value: float) -> str:
    return f"{value:g}G"


def tljh_block(budgets: dict) -> str:
    s = sizing(budgets)
    return "\n".join([
        "```bash",
        f"sudo tljh-config set limits.memory {_gb(s['limit_gb'])}   # per learner (TLJH has no guarantee)",
        "sudo tljh-config set limits.cpu 2",
        "sudo tljh-config set services.cull.timeout 3600   # stop a server idle for an hour",
        "sudo tljh-config reload", "```"])


Z2JH_START_HOOK = ("from pathlib import Path; from llama_lab import launch; "
                   "launch.copy_notebooks(Path('/home/jovyan/work/llama-lab'))")


def z2jh_block(budgets: dict) -> str:
    s = sizing(budgets)
    return "\n".join([
        "```yaml", "singleuser:", "  image:", "    name: REGISTRY/llama-lab", '    tag: "2026-12"',
        "  memory:", f"    guarantee: {_gb(s['guarantee_gb'])}", f"    limit: {_gb(s['limit_gb'])}",
        "  cpu:", "    guarantee: 0.5", "    limit: 2",
        "  storage:", "    homeMountPath: /home/jovyan/work", "    capacity: 1Gi",
        "  defaultUrl: /lab/tree/work/llama-lab",
        "  lifecycleHooks:", "    postStart:", "      exec:",
        f'        command: ["python", "-c", "{Z2JH_START_HOOK}"]',
        "cull:", "  timeout: 3600", "```"])


def blocks() -> dict[Path, dict[str, Callable[[dict], str]]]:
    return {DOCS / "instructor.md": {"budgets": budget_table, "goals": goals_block, "plans": plans_block},
            DOCS / "classroom-server.md": {"sizing": sizing_block, "tljh-limits": tljh_block,
                                           "z2jh-config": z2jh_block}}


def synced_block(text: str, name: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- begin {name} \(.*?\) -->\n)(?:.*?\n)?(<!-- end {name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no <!-- begin {name} (...) --> ... <!-- end {name} --> block")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text, count=1)


# --- all of it -------------------------------------------------------------------------------------

def sync(check: bool = False) -> list[str]:
    """Write every quoted figure from the budgets file (or, with `check`, only list the files
    that disagree with it). Returns the files that changed or would change. Nothing is written
    unless every file could be brought up to date."""
    budgets = load()
    new_text = {README: synced_readme(README.read_text(), budgets)}
    for page, page_blocks in blocks().items():
        if page.exists():
            text = page.read_text()
            for name, make in page_blocks.items():
                text = synced_block(text, name, make(budgets))
            new_text[page] = text
    new_text = {path: text for path, text in new_text.items() if path.read_text() != text}
    headers = {}
    for name, entry in budgets.items():
        path = NOTEBOOKS / name
        if path.exists():
            nb = nbformat.read(path, as_version=4)
            header = synced_header(nb.cells[0].source, entry)
            if header != nb.cells[0].source:
                nb.cells[0].source = header
                headers[path] = nb
    if not check:
        for path, text in new_text.items():
            path.write_text(text)
        for path, nb in headers.items():
            nbformat.write(nb, path)
    return [str(path.relative_to(ROOT)) for path in [*new_text, *headers]]


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    changed = sync(check)
    verb = "disagree with" if check else "written from"
    print("\n".join(f"{name} {verb} {BUDGETS.relative_to(ROOT)}" for name in changed)
          or f"everything agrees with {BUDGETS.relative_to(ROOT)}")
    sys.exit(1 if check and changed else 0)
