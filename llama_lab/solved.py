"""Solved notebooks for instructors: `llama-lab solutions DIR` writes a copy of every notebook with
each exercise answered by its solution, then runs the copies.

An exercise, as a notebook holds it, is a function whose body raises NotImplementedError and a
`lab.checks.check_...(that_function)` call in the same cell or a later one. In the copy, the
function's definition gives way to two lines: one prints the solution's source
(`lab.solutions.show`) and one binds the learner's name to the solution itself, so the checker
that follows runs on the real answer key and prints its ✅.

>>> cell = '''def my_top_k(logits, k):
...     raise NotImplementedError  # your code here
...
...
... lab.checks.check_top_k(my_top_k)'''
>>> print(solve_cell(cell, {"my_top_k": "top_k_filter"}))
lab.solutions.show("top_k_filter")  # the solution, written in by `llama-lab solutions`
my_top_k = lab.solutions.top_k_filter
<BLANKLINE>
<BLANKLINE>
lab.checks.check_top_k(my_top_k)
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import nbformat

CHECK_CALL = re.compile(r"lab\.checks\.(check_\w+)\((\w+)\)")
PASS, MISS, NOT_ANSWERED = "✅", "❌", "⏳"


def _not_answered(*args):
    raise NotImplementedError


def solution_name(checker: str) -> str:
    """The solution a checker compares answers with: the checker says so in its verdict.

    >>> solution_name("check_loss_mask")
    'loss_mask_labels'
    """
    from llama_lab import checks

    with contextlib.redirect_stdout(io.StringIO()):  # its "not answered yet" line
        return getattr(checks, checker)(_not_answered).exercise


def exercise_functions(source: str) -> dict[str, tuple[int, int]]:
    """The functions of a cell whose body raises NotImplementedError: name -> (first line, last line)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics: not an exercise cell
        return {}
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(n, ast.Raise) and "NotImplementedError" in ast.unparse(n) for n in ast.walk(node)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = (first, node.end_lineno)
    return found


def solve_cell(source: str, solutions_of: dict[str, str]) -> str:
    """`source` with each exercise function named in `solutions_of` replaced by its solution."""
    lines = source.splitlines()
    for name, (first, last) in sorted(exercise_functions(source).items(), key=lambda kv: -kv[1][0]):
        if name in solutions_of:
            solution = solutions_of[name]
            lines[first - 1:last] = [
                f'lab.solutions.show("{solution}")  # the solution, written in by `llama-lab solutions`',
                f"{name} = lab.solutions.{solution}"]
    return "\n".join(lines)


def solve(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, dict[str, str]]:
    """A copy of `nb` with every exercise answered, and its exercises: learner's name -> checker."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    checked = {fn: checker for cell in code for checker, fn in CHECK_CALL.findall(cell.source)}
    exercises = {name: checked[name] for cell in code for name in exercise_functions(cell.source)
                 if name in checked}
    solutions_of = {name: solution_name(checker) for name, checker in exercises.items()}
    solved = nbformat.from_dict(nb)
    for cell in solved.cells:
        if cell.cell_type == "code" and set(exercise_functions(cell.source)) & set(solutions_of):
            cell.source = solve_cell(cell.source, solutions_of)
            cell.outputs, cell.execution_count = [], None
    return solved, exercises


def verdicts(nb: nbformat.NotebookNode) -> list[str]:
    """The checkers' verdict lines in a run notebook's outputs."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    text = "".join(out.get("text", "") for cell in code for out in cell.outputs)
    return [line for line in text.splitlines() if line.startswith((PASS, MISS, NOT_ANSWERED))]


def passed(n_exercises: int, lines: list[str]) -> bool:
    """Whether a run copy shows one ✅ per exercise and no other verdict."""
    return len(lines) == n_exercises and all(line.startswith(PASS) for line in lines)


def write_solved(source: Path, folder: Path, run: bool = True,
                 timeout: int = 900) -> dict[str, tuple[int, list[str]]]:
    """Write the solved copy of every notebook in `source` to `folder`; with `run`, execute each
    copy there (nbclient, as `jupyter nbconvert --execute` does) and save it with its outputs.
    Returns, for each notebook, its number of exercises and the verdict lines of the copy."""
    from nbclient import NotebookClient

    folder.mkdir(parents=True, exist_ok=True)
    report = {}
    for path in sorted(source.glob("*.ipynb")):
        solved, exercises = solve(nbformat.read(path, as_version=4))
        if run:
            NotebookClient(solved, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(folder)}}).execute()
        nbformat.write(solved, folder / path.name)
        report[path.name] = (len(exercises), verdicts(solved))
    return report
