"""Solved notebooks for instructors (`llama-lab solutions`): every exercise of every notebook is
found and answered, and every checker passes on the solved copy."""

import contextlib
import io

import nbformat
import pytest

import llama_lab as lab
from llama_lab import cli, launch, solved

NOTEBOOKS = sorted(launch.shipped_notebooks().glob("*.ipynb"))


def _exercise_cells(nb, copy, exercises):
    """The copy's cells that stand where `nb` defines or checks an exercise."""
    def is_exercise(cell) -> bool:
        return cell.cell_type == "code" and bool(
            set(solved.exercise_functions(cell.source)) & set(exercises)
            or any(fn in exercises for _, fn in solved.CHECK_CALL.findall(cell.source)))
    return [solved_cell for cell, solved_cell in zip(nb.cells, copy.cells, strict=True) if is_exercise(cell)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_checker_passes_on_the_solved_copy(path):
    nb = nbformat.read(path, as_version=4)
    copy, exercises = solved.solve(nb)
    n_checks = sum(len(solved.CHECK_CALL.findall(c.source)) for c in nb.cells if c.cell_type == "code")
    assert len(exercises) == n_checks  # each checker's exercise found
    cells = _exercise_cells(nb, copy, exercises)
    assert not any(solved.exercise_functions(cell.source) for cell in cells)  # none left unanswered
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace = {"lab": lab}
        for cell in cells:
            exec(cell.source, namespace)  # the copy's own cells, as a kernel would run them
    lines = [line for line in out.getvalue().splitlines() if line.startswith(("✅", "❌", "⏳"))]
    assert solved.passed(len(exercises), lines), out.getvalue()
    assert all(f"def {s}" in out.getvalue() for s in map(solved.solution_name, exercises.values()))
    assert any(solved.exercise_functions(c.source) for c in nb.cells if c.cell_type == "code")  # nb untouched


def test_the_learners_notebook_shows_no_pass():
    nb = nbformat.read(NOTEBOOKS[-1], as_version=4)
    _copy, exercises = solved.solve(nb)
    assert exercises and not solved.passed(len(exercises), solved.verdicts(nb))  # stored: "not answered"


def test_command_writes_every_solved_notebook(tmp_path, capsys):
    assert cli.main(["solutions", str(tmp_path), "--no-run"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    written = nbformat.read(tmp_path / NOTEBOOKS[0].name, as_version=4)
    assert "lab.solutions.show(" in "".join(c.source for c in written.cells)
    assert "exercises" in capsys.readouterr().out
