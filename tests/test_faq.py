"""docs/faq.md quotes llama-lab's messages as llama-lab prints them today: each quoted message is
produced again here, on the same numbers, and compared word for word."""

import re

import pytest

import llama_lab as lab
from llama_lab import attention, compiled_decode, launch, models
from llama_lab.errors import CompilerNotFoundError, LlamaLabError

FAQ = (launch.PACKAGE.parent / "docs" / "faq.md").read_text()
QUOTED = re.findall(r"```text\n(.*?)\n```", FAQ, re.DOTALL)


def _quoted(start: str) -> str:
    return next(block for block in QUOTED if block.startswith(start))


def _message(err: LlamaLabError) -> str:
    return f"{type(err).__name__}: {err}"


def test_model_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda device="cpu": 21.3e9)  # the FAQ's machine
    with pytest.raises(LlamaLabError) as err:
        lab.load_model("llama-2-13b", device="cpu")
    assert _message(err.value) == _quoted("ModelTooLargeError:")


def test_gated_llama2_offline(monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda device="cpu": 21.3e9)
    with pytest.raises(LlamaLabError) as err:  # the tests run with HF_HUB_OFFLINE=1 (conftest.py)
        lab.load_model("llama-2-7b", device="cpu")
    offline = "ModelAccessError: Cannot download meta-llama/Llama-2-7b-hf: the Hub cannot be reached (Offline"
    assert _message(err.value) == _quoted(offline)


def test_no_compiler(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    with pytest.raises(CompilerNotFoundError) as err:
        compiled_decode.require_cpp_compiler()
    assert _message(err.value) == _quoted("CompilerNotFoundError:")


def test_blank_bertviz_note_and_root_refusal():
    assert _quoted("bertviz shows nothing") == attention.BERTVIZ_OFFLINE
    assert _quoted("llama-lab lab: you are root") == launch.ROOT_REFUSAL
