"""Notebook 03's block checkers on a loaded model's real weights (`model=`, or `checks.check_against`)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from llama_lab import checks, scratch, solutions
from llama_lab.checks import nb03_block
from llama_lab.checks.nb03_block import _block_variant
from llama_lab.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    model, _ = load_model("smollm2-135m")
    return model


def _repeated(t, q):
    return t.repeat(1, q.shape[1] // t.shape[1], 1, 1)


@pytest.mark.parametrize("check, solution, wrong_answers", [
    (checks.check_rms_norm, solutions.rms_norm,
     [(lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps), "subtracts the mean"),
      (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "weight is missing")]),
    (checks.check_apply_rope, solutions.apply_rope,
     [(lambda x, cos, sin: x * cos - scratch.rotate_half(x) * sin, "the other way"),
      (lambda x, cos, sin: x, "unchanged")]),
    (checks.check_causal_gqa, solutions.causal_gqa,
     [(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "no causal mask"),
      (lambda q, k, v: F.scaled_dot_product_attention(q, _repeated(k, q), _repeated(v, q), is_causal=True),
       "wrong order")]),
    (checks.check_swiglu, solutions.swiglu,
     [(lambda x, g, u, d: F.linear(F.silu(F.linear(x, u)) * F.linear(x, g), d), "on the up projection"),
      (lambda x, g, u, d: F.linear(F.gelu(F.linear(x, g)) * F.linear(x, u), d), "another activation")]),
    (checks.check_decoder_block, solutions.decoder_block,
     [(lambda *args: _block_variant(*args, pre_norm=False), "post-norm"),
      (lambda *args: _block_variant(*args, residual=False), "residual connections are missing")]),
], ids=["rms_norm", "apply_rope", "causal_gqa", "swiglu", "decoder_block"])
def test_block_checkers_on_real_weights(check, solution, wrong_answers, verdicts, smollm2):
    verdicts(functools.partial(check, model=smollm2), solution, *wrong_answers)


def test_the_real_layer_is_a_case(smollm2, capsys):
    """A function right on random weights but wrong on SmolLM2's layer 0 fails, and the verdict names it."""
    real_weight = smollm2.model.layers[0].input_layernorm.weight

    def right_but_for_the_real_layer(x, weight, eps):
        answer = solutions.rms_norm(x, weight, eps)
        return answer + 1 if torch.equal(weight, real_weight) else answer

    assert checks.check_rms_norm(right_but_for_the_real_layer)
    assert not checks.check_rms_norm(right_but_for_the_real_layer, model=smollm2)
    assert "layer 0 of the loaded model, real weights" in capsys.readouterr().out


def test_check_against_sets_the_default_model(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(nb03_block, "_CHECKED_AGAINST", {})
    with pytest.raises(TypeError):
        checks.check_against(smollm2)  # positional: `llama-lab solutions` would take it for an exercise
    checks.check_against(model=smollm2)
    assert "hidden 576, 9 query heads, 3 KV heads, MLP 1536" in capsys.readouterr().out
    assert nb03_block._layers(None, 3)[0][1] is smollm2.model.layers[0]
