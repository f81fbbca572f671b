"""llama_lab.compiled_decode: the matrix-vector linear layer and the compiled one-token step give
what eager PyTorch gives; a machine without a compiler decodes eagerly, told in one line how to get one."""

import functools

import pytest
import torch

from llama_lab import compiled_decode, sampling, scratch
from llama_lab.errors import CompilerNotFoundError, InvalidSettingError
from llama_lab.models import load_model


@functools.cache
def tiny():
    return load_model("tiny-random")


def test_matvec_linear_is_the_linear_it_replaces_eager_and_compiled():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    fast = compiled_decode.MatVecLinear.from_linear(linear)
    assert fast.weight is linear.weight and fast.bias is linear.bias
    compiled = torch.compile(fast, dynamic=False)
    for tokens in (1, 3):  # one token: the multiply-then-sum loop; more: F.linear
        x = torch.randn(2, tokens, 48)
        assert torch.equal(fast(x), linear(x))
        torch.testing.assert_close(compiled(x), linear(x))


def test_compile_decode_gives_the_same_tokens_with_one_compilation_for_every_position():
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    longer = tok("Hello there, how are you", return_tensors="pt").input_ids
    eager = scratch.from_hf(model)
    expected = [sampling.generate(eager, prompt, 20, eos_token_id=[]) for prompt in (ids, longer)]
    fast = compiled_decode.compile_decode(scratch.from_hf(model))
    assert fast.output.weight is model.lm_head.weight  # shared, not copied
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(sampling.generate(fast, ids, 20, eos_token_id=[]), expected[0])
    assert torch.equal(sampling.generate(fast, longer, 20, eos_token_id=[]), expected[1])
    logits = []
    for m in (fast, eager):  # called directly, outside inference mode: still no new compilation
        with torch.no_grad():
            cache = m.new_cache(1, 8)
            m(ids, cache)
            logits.append(m(ids[:, -1:], cache))
    torch.testing.assert_close(*logits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_compile_decode_refuses_a_transformers_model():
    model, _ = tiny()
    with pytest.raises(InvalidSettingError, match="scratch.from_hf"):
        compiled_decode.compile_decode(model)


def test_compile_decode_without_a_compiler_decodes_eagerly_and_says_why(monkeypatch, tmp_path):
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    expected = sampling.generate(model, ids, 6)
    monkeypatch.setenv("CXX", "/nonexistent")  # as on a machine without g++: $CXX points nowhere
    with pytest.raises(CompilerNotFoundError, match="CXX=g"):
        compiled_decode.require_cpp_compiler()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="decoding eagerly.*apt install g") as caught:
        eager = compiled_decode.compile_decode(scratch.from_hf(model))
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert type(eager.layers[0].attention.wq) is torch.nn.Linear  # left as it was
    assert torch.equal(sampling.generate(eager, ids, 6), expected)

    compiler = tmp_path / "my-g++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.undo()
    monkeypatch.setenv("CXX", str(compiler))
    assert compiled_decode.require_cpp_compiler() == str(compiler)
    monkeypatch.setattr(compiled_decode.sysconfig, "get_paths", lambda: {"include": "/nowhere"})
    with pytest.raises(CompilerNotFoundError, match="python3-dev"):
        compiled_decode.require_cpp_compiler()
