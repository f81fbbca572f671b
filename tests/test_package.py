"""The public surface: what `import llama_lab as lab` offers, and every name the notebooks use."""

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llama_lab as lab

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", sorted(lab._LESSON_MODULES))
def test_lesson_modules_load_on_first_use(name):
    assert getattr(lab, name) is importlib.import_module(f"llama_lab.{name}")


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lab.nope  # noqa: B018


def test_everything_in_all_exists():
    for name in lab.__all__:
        assert getattr(lab, name) is not None


def test_import_is_lazy():
    code = "import sys, llama_lab; print(any(m in sys.modules for m in ('peft', 'llama_lab.finetune')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def notebook_names(path: Path) -> set[str]:
    """Every dotted name a notebook reaches through llama_lab: `lab.x.y`, and `m.y` or `y` after
    `from llama_lab import m` / `from llama_lab.m import y`, as 'llama_lab.m.y'."""
    cells = ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
             if cell["cell_type"] == "code"]
    shell_or_magic = re.compile(r"^(\s*)[!%].*$", re.MULTILINE)  # not Python: read as `pass`
    tree = ast.parse("\n".join(shell_or_magic.sub(r"\1pass", cell) for cell in cells))
    roots = {}  # a notebook's name -> the llama_lab path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "llama_lab"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llama_lab":
            roots |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    names = set(roots.values())
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in roots and chain:
            names.add(".".join([roots[node.id], *reversed(chain)]))
    return names


def resolve(dotted: str):
    """`llama_lab.sampling.top_k` -> the object, through attributes as a notebook reaches it."""
    obj, *parts = dotted.split(".")
    obj = importlib.import_module(obj)
    for part in parts:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_llama_lab_name_a_notebook_uses_exists(notebook):
    names = notebook_names(notebook)
    assert "llama_lab" in names  # every notebook imports the package
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except AttributeError:
            missing.append(name)
    assert not missing, f"{notebook.name} uses names llama_lab does not have: {missing}"


def test_the_notebook_walk_finds_names_of_every_form(tmp_path):
    cell = ("import llama_lab as lab\nfrom llama_lab import sampling as s\n"
            "from llama_lab.chat import B_INST\n!pip install x\nlab.checks.check_top_k(s.top_k)\ns.nope")
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": [cell]}]}))
    assert notebook_names(notebook) == {"llama_lab", "llama_lab.sampling", "llama_lab.chat.B_INST",
                                        "llama_lab.checks", "llama_lab.checks.check_top_k",
                                        "llama_lab.sampling.top_k", "llama_lab.sampling.nope"}
    with pytest.raises(AttributeError):
        resolve("llama_lab.sampling.nope")
