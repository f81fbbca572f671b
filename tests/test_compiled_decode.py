"""llama_lab.compiled_decode: the matrix-vector linear layer and the compiled one-token step give
what eager PyTorch gives; a machine without a compiler decodes eagerly, told in one line how to get one."""

import copy
import functools

import pytest
import torch

from llama_lab import compiled_decode, sampling, scratch
from llama_lab.errors import CompilerNotFoundError, ContextLengthError, InvalidSettingError
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


@pytest.mark.parametrize("keys", [1, 7, 40])
def test_attend_one_token_is_scaled_dot_product_attention_eager_and_compiled(keys):
    torch.manual_seed(keys)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(compiled_decode.attend_one_token(q, k, v), expected)
    compiled = torch.compile(compiled_decode.attend_one_token, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v), expected)
    half = compiled_decode.attend_one_token(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.02, rtol=0.02)  # bf16 inputs: 8 bits


def test_compile_decode_gives_the_same_tokens_with_one_compilation_for_every_position():
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    longer = tok("Hello there, how are you", return_tensors="pt").input_ids
    eager = scratch.from_hf(model)
    expected = [sampling.generate(eager, prompt, 20, eos_token_id=[]) for prompt in (ids, longer)]
    fast = compiled_decode.compile_decode(scratch.from_hf(model))
    assert fast.output.weight is model.lm_head.weight  # shared, not copied
    assert {type(layer.attention) for layer in fast.layers} == {compiled_decode.DecodeAttention}
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


def test_compile_decode_ahead_of_time_gives_the_same_tokens_compiled_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path))
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    longer = tok("Hello there, how are you", return_tensors="pt").input_ids
    eager = scratch.from_hf(model)
    expected = [sampling.generate(eager, prompt, 20, eos_token_id=[]) for prompt in (ids, longer)]
    path = compiled_decode._package_path(scratch.from_hf(model))
    target = path.stem.rsplit("-", 1)[0]
    older, legacy, other, partial = (tmp_path / "aoti" / name for name in (
        f"{target}-{'0' * 16}.pt2",  # compiled by an earlier llama-lab: replaced, so deleted
        f"decode-step-{'2' * 16}.pt2",  # named by one key, as before 2026-12-06: deleted
        f"decode-step-{'1' * 16}-{'0' * 16}.pt2",  # another model or dtype: kept
        f"{target}-{'0' * 16}.123.partial.pt2"))  # another process writing one: left alone
    older.parent.mkdir()
    for name in (older, legacy, other, partial):
        name.write_bytes(b"")
    fast = compiled_decode.compile_decode(scratch.from_hf(model), ahead_of_time=True)
    assert sorted((tmp_path / "aoti").glob("*")) == sorted([path, other, partial])  # no partial of its own
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(sampling.generate(fast, ids, 20, eos_token_id=[]), expected[0])
    assert torch.equal(sampling.generate(fast, longer, 20, eos_token_id=[]), expected[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # torch.compile never ran

    written = path.stat().st_mtime_ns
    again = compiled_decode.compile_decode(scratch.from_hf(model), ahead_of_time=True)  # loaded, not compiled
    assert path.stat().st_mtime_ns == written and len(list((tmp_path / "aoti").glob("*"))) == 3
    cache = again.new_cache(1, ids.shape[1] + 1)  # room for one more token, then none
    again(ids, cache)
    again(ids[:, -1:], cache)
    with pytest.raises(ContextLengthError):
        again(ids[:, -1:], cache)


def test_compile_decode_ahead_of_time_in_bf16_is_within_two_percent_of_eager_bf16(tmp_path, monkeypatch):
    """The same tolerance as torch.compile's bf16 step (below): 2 % of the largest logit."""
    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path))
    model, tok = tiny()
    ids = tok("Hello there, how are you", return_tensors="pt").input_ids
    eager = compiled_decode.cast_copy(scratch.from_hf(model), torch.bfloat16)
    tokens = sampling.generate(eager, ids, 12, eos_token_id=[])[0, ids.shape[1]:]
    fast = compiled_decode.compile_decode(scratch.from_hf(model), dtype=torch.bfloat16, ahead_of_time=True)
    expected = compiled_decode.step_logits(eager, ids, tokens)
    got = compiled_decode.step_logits(fast, ids, tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def vm_flags(address: int) -> list[str]:
    """The kernel's flags of the mapping that holds `address` (/proc/self/smaps): "hg" is MADV_HUGEPAGE."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                start, end = (int(x, 16) for x in first.split("-"))
                mapping = start <= address < end
            elif mapping and first == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


needs_huge_pages = pytest.mark.skipif(not compiled_decode.huge_pages_available(),
                                      reason="no transparent huge pages here (Linux, THP not 'never')")


@needs_huge_pages
def test_in_huge_pages_copies_each_tensor_into_one_block_that_asks_for_2_mb_pages():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(1000, 700).bfloat16()]
    copies = compiled_decode.in_huge_pages(tensors)
    for tensor, moved in zip(tensors, copies, strict=True):
        assert torch.equal(moved, tensor) and moved.dtype == tensor.dtype and moved.shape == tensor.shape
        assert moved.data_ptr() % 4096 == 0 and "hg" in vm_flags(moved.data_ptr())
    assert copies[0].data_ptr() % compiled_decode.HUGE_PAGE == 0
    assert [c.data_ptr() - copies[0].data_ptr() for c in copies] == [0, 4096, 8192]  # side by side
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 3  # a storage each
    copies[0][0, 0] = 99.0
    assert tensors[0][0, 0] != 99.0  # copies, not views
    empty, after = compiled_decode.in_huge_pages([torch.zeros(0, 4), torch.ones(2)])
    assert empty.shape == (0, 4) and after.tolist() == [1, 1]  # nothing to place for the empty one
    assert after.data_ptr() % compiled_decode.HUGE_PAGE == 0


@needs_huge_pages
def test_to_huge_pages_moves_shared_and_tied_weights_in_place():
    model, tok = tiny()
    model = copy.deepcopy(model)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    ours = scratch.from_hf(model)
    ids = tok("Hello there", return_tensors="pt").input_ids
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    params = dict(ours.named_parameters())
    with torch.no_grad():
        logits = model(ids).logits
    assert compiled_decode.to_huge_pages(ours)
    assert dict(ours.named_parameters()) == params  # the same Parameter objects
    for name, p in ours.named_parameters():
        assert torch.equal(p, before[name]) and "hg" in vm_flags(p.data_ptr()), name
    assert ours.output.weight is ours.tok_embeddings.weight is model.lm_head.weight  # still tied and shared
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)  # the HF model reads them too
    with torch.device("meta"):  # weights elsewhere than the CPU's memory (as on a GPU) stay where they are
        elsewhere = scratch.Llama(ours.config)
    assert compiled_decode.to_huge_pages(elsewhere) is False and elsewhere.output.weight.is_meta


def test_without_huge_pages_nothing_moves_and_in_huge_pages_says_why(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(compiled_decode, "THP_SETTING", setting)
    assert not compiled_decode.huge_pages_available()
    model = scratch.from_hf(tiny()[0])
    pointers = [p.data_ptr() for p in model.parameters()]
    assert compiled_decode.to_huge_pages(model) is False
    assert [p.data_ptr() for p in model.parameters()] == pointers
    with pytest.raises(OSError, match="never"):
        compiled_decode.in_huge_pages([torch.zeros(2)])
    monkeypatch.setattr(compiled_decode, "THP_SETTING", tmp_path / "missing")  # not Linux
    assert not compiled_decode.huge_pages_available()


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


def test_cast_copy_converts_a_copy_and_keeps_tied_weights_tied():
    torch.manual_seed(0)
    tied = scratch.Llama(scratch.Config(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                        head_dim=16, ffn_dim=48, max_seq_len=16, tie_embeddings=True))
    copy = compiled_decode.cast_copy(tied, torch.bfloat16)
    assert copy.output.weight is copy.tok_embeddings.weight
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16} and copy.rope_cos.dtype == torch.bfloat16
    assert tied.output.weight.dtype == torch.float32  # the model itself is left as it was
    torch.testing.assert_close(copy.output.weight.float(), tied.output.weight, atol=0, rtol=2 ** -8)


def test_compile_decode_in_bf16_gives_eager_bf16_logits_within_two_percent():
    """bf16 keeps 8 significant bits: eager rounds the output of every operation to them, the
    compiled step keeps its activations in float32 (only the weights and the cache are bf16), so
    the two differ by a few roundings. Stated tolerance: every logit within 2 % of the largest one
    (measured: 0.8 %; either is 0.6-1.1 % from fp32's)."""
    model, tok = tiny()
    ids = tok("Hello there, how are you", return_tensors="pt").input_ids
    eager = compiled_decode.cast_copy(scratch.from_hf(model), torch.bfloat16)
    tokens = sampling.generate(eager, ids, 12, eos_token_id=[])[0, ids.shape[1]:]
    fast = compiled_decode.compile_decode(scratch.from_hf(model), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32  # compiled a copy
    assert fast.output.weight.dtype == torch.bfloat16 and type(fast.output) is compiled_decode.MatVecLinear
    expected = compiled_decode.step_logits(eager, ids, tokens)
    got = compiled_decode.step_logits(fast, ids, tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_compile_decode_in_bf16_without_a_compiler_gives_the_eager_bf16_copy(monkeypatch):
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    expected = sampling.generate(compiled_decode.cast_copy(scratch.from_hf(model), torch.bfloat16), ids, 6)
    monkeypatch.setenv("CXX", "/nonexistent")
    with pytest.warns(UserWarning, match=r"decoding eagerly.*\$CXX is '/nonexistent'") as caught:
        eager = compiled_decode.compile_decode(scratch.from_hf(model), dtype=torch.bfloat16)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert type(eager.output) is torch.nn.Linear and eager.output.weight.dtype == torch.bfloat16
    assert torch.equal(sampling.generate(eager, ids, 6), expected)


def test_compare_greedy_counts_the_agreeing_tokens_and_the_logit_difference():
    reference, other = torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9, 8])
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), reference] = 3.0
    moved = logits.clone()
    moved[2, 9] = 3.5  # the other model prefers token 9 at step 2, by 3.5 where the reference has 0
    assert compiled_decode.tokens_agree(reference, reference) == 4
    assert compiled_decode.compare_greedy(reference, other, logits, moved) == {
        "tokens_agree": 2, "top_token_agree": 3, "max_logit_diff": 3.5, "max_logit": 3.0}
