"""The public surface: what `import llama_lab as lab` offers."""

import importlib
import subprocess
import sys

import pytest

import llama_lab as lab


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
