"""The outputs stored in the notebooks: what a learner sees before running anything, and what
nbval compares against. They must read well unrun and be stable from run to run."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
MIN_CHECKED = 0.7  # the share of code cells whose output nbval compares
WIDGET = "application/vnd.jupyter.widget-view+json"


def _code_cells(path: Path) -> list[dict]:
    return [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]


def output_checked(cell: dict) -> bool:
    """nbval compares this cell's output: it has one, and no marker tells nbval to skip it.

    >>> output_checked({"source": "print(1)", "outputs": [{"name": "stdout", "text": "1"}]})
    True
    >>> output_checked({"source": "# NBVAL_IGNORE_OUTPUT\\nprint(1)", "outputs": [{"text": "1"}]})
    False
    >>> output_checked({"source": "x = 1", "outputs": []})
    False
    """
    source = "".join(cell["source"])
    return bool(cell["outputs"]) and "NBVAL_IGNORE_OUTPUT" not in source and "NBVAL_SKIP" not in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_most_code_cells_have_their_output_checked(path):
    cells = _code_cells(path)
    checked = sum(map(output_checked, cells))
    assert checked >= MIN_CHECKED * len(cells), f"{path.name}: {checked} of {len(cells)} code cells checked"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_notebook_names_its_kernel(path):
    kernelspec = json.loads(path.read_text())["metadata"].get("kernelspec", {})
    assert kernelspec.get("name") == "python3" and kernelspec.get("language") == "python", path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stderr_and_no_frozen_widget_is_stored(path):
    """Warnings and log lines on stderr come and go with timing and versions (nbval then fails
    on a machine that does not print them); a progress bar stored as a widget reads "0/3" unrun."""
    for number, cell in enumerate(_code_cells(path)):
        for output in cell["outputs"]:
            assert output.get("name") != "stderr", f"{path.name}, code cell {number}: {output['text']!r}"
            text = "".join(output.get("data", {}).get("text/plain", ""))
            if WIDGET in output.get("data", {}):
                assert "it/s]" not in text and "|" not in text, f"{path.name}, code cell {number}: {text}"
