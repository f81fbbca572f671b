"""Checkers of notebook 03 (the transformer block): the MLP width, Meta's RoPE, the cached mask, and the
block written piece by piece (RMSNorm, RoPE, causal GQA, SwiGLU, the layer) against transformers' modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from llama_lab import models, scratch, sizing, solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check


def check_ffn_dim(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(dim, multiple_of, multiplier)` returns the SwiGLU hidden width."""
    shapes = [("Llama-2-7B", 4096, 256, None), ("Llama-2-13B", 5120, 256, None),
              ("Llama-2-70B", 8192, 4096, 1.3), ("SmolLM2-135M", 576, 256, None), ("dim 1000", 1000, 64, 1.5)]
    cases = [Case(f"{name} (dim {dim}, multiple_of {m}, multiplier {mult})", (dim, m, mult))
             for name, dim, m, mult in shapes]
    return run_check("SwiGLU hidden width", student_fn, solutions.ffn_dim, cases, mistakes=[
        Mistake("the multiplier (1.3 in 70B) scales the width before the rounding.",
                lambda got, want, dim, m, mult: mult is not None and got == solutions.ffn_dim(dim, m)),
        Mistake("a multiple of multiple_of, but below the answer: round UP, to the next multiple.",
                lambda got, want, dim, m, mult: got % m == 0 and got < want),
        Mistake("not a multiple of multiple_of: round the width up to one.",
                lambda got, want, dim, m, mult: got % m != 0),
    ])


def _pair_lengths(x: torch.Tensor) -> torch.Tensor:
    """Length of each neighbour pair (2i, 2i+1) of every row: a rotation keeps them."""
    return x.reshape(x.shape[0], -1, 2).norm(dim=-1)


def check_rotary_interleaved(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(x, theta)` applies Meta's complex-number RoPE to x (seq, head_dim)."""
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    cases = [Case(f"{seq} positions, head_dim {d}, theta {theta:g}", (x[:seq, :d].clone(), theta))
             for seq, d, theta in [(1, 8, 10000.0), (5, 8, 10000.0), (40, 64, 500000.0), (17, 64, 10000.0)]]
    return run_check(
        "RoPE with complex numbers", student_fn, solutions.apply_rotary_interleaved, cases, rel=1e-4,
        mistakes=[
            Mistake("x came back unchanged: row p turns by the angles p * theta ** (-2i/d).",
                    lambda got, want, x, theta: torch.allclose(got, x)),
            Mistake("the pairs (2i, 2i+1) turned, by the wrong angles: angle[p, i] = p * theta ** (-2i/d), "
                    "with p the row.",
                    lambda got, want, x, theta: torch.allclose(_pair_lengths(got), _pair_lengths(x),
                                                               atol=1e-4)),
            Mistake("that pairs dimension i with i + head_dim/2, transformers' layout; Meta's code makes one "
                    "complex number of each neighbour pair (2i, 2i+1).",
                    lambda got, want, x, theta: torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4)),
        ])


def check_causal_mask_after_cache(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(n_new, n_cached)` returns the boolean mask (n_new, n_cached + n_new)."""
    cases = [Case(f"{n_new} new token(s) after {n_cached} cached", (n_new, n_cached))
             for n_new, n_cached in [(4, 0), (1, 6), (3, 5), (2, 1)]]
    return run_check(
        "Causal mask after a KV cache", student_fn, solutions.causal_mask_after_cache, cases,
        convert=lambda answer: torch.as_tensor(answer, dtype=torch.bool), mistakes=[
            Mistake("the mask needs one row per new token and one column per key: (n_new, n_cached + n_new).",
                    lambda got, want, *_: got.shape != want.shape),
            Mistake("some cached tokens are hidden: they are all in the past, so every new token sees all "
                    "n_cached of them (shift the diagonal by n_cached).",
                    lambda got, want, n_new, n_cached: not got[:, :n_cached].all()),
            Mistake("a new token sees a later new token: keys after the query must be False.",
                    lambda got, want, *_: bool((got & ~want).any())),
        ])


# --- the block written piece by piece, each checked against transformers' own module ------------
# The cases come from a transformers decoder layer and a batch of inputs: layer 0 of the model the
# notebook loaded, with its real weights, on the embeddings of real token ids (`check_against`), and the
# tiny model's shape with seeded random weights (hard-coded sizes fail there). Without a model, the
# second case is SmolLM2-135M's shape (its config.json: hidden 576, 9 query heads sharing 3 KV heads of
# width 64, MLP 1536, RoPE base 100,000) with random weights. The learner's function gets the module's
# weights and input; its output is compared with the module's.

_CHECKED_AGAINST: dict[str, nn.Module] = {}


def check_against(*, model: nn.Module) -> None:
    """From now on, check exercises 1 to 5 of notebook 03 against layer 0 of `model` (a transformers
    Llama), its real weights. Keyword-only: `llama-lab solutions` reads `check_...(fn)` as an exercise."""
    _CHECKED_AGAINST["model"] = model
    print(f"Exercises 1 to 5 are checked against layer 0 of the loaded model "
          f"({_shape(model.model.layers[0])}), its real weights, and the tiny model's shape, random weights.")


def _configs() -> list[tuple[str, LlamaConfig]]:
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                          num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                          rms_norm_eps=1e-5, max_position_embeddings=8192)
    configs = [("the tiny model's shape", models.tiny_config()), ("SmolLM2-135M's shape", smollm2)]
    for _, config in configs:
        config._attn_implementation = "sdpa"  # causal without a mask, as in the models
    return configs


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def _layers(model: nn.Module | None, seq: int) -> list[tuple[str, LlamaDecoderLayer, torch.Tensor]]:
    """(description, decoder layer, input stream (2, seq, hidden)) of every case: layer 0 of `model`
    (default: the one given to `check_against`) on embeddings of real token ids, then random layers."""
    model = _CHECKED_AGAINST.get("model") if model is None else model
    configs = _configs()[:1] if model is not None else _configs()
    cases = []
    for name, config in configs:
        layer = _seeded(LlamaDecoderLayer(config, layer_idx=0), 6)
        x = torch.randn(2, seq, config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3 + 1
        cases.append((f"{name}, random weights", layer, x))
    if model is not None:
        ids = torch.randint(model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x = model.get_input_embeddings()(ids)
        cases.insert(0, ("layer 0 of the loaded model, real weights", model.model.layers[0], x))
    return cases


def _rope(config: LlamaConfig, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own rope tables for positions 0..seq-1, shape (seq, head_dim)."""
    x = torch.zeros(1, seq, config.hidden_size)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(seq)[None])
    return cos[0], sin[0]


def _projections(layer: LlamaDecoderLayer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The layer's own queries, keys and values of x, before RoPE: (batch, heads, seq, head_dim)."""
    attention = layer.self_attn
    h = layer.input_layernorm(x)

    def heads(t):
        return t.view(*x.shape[:2], -1, sizing.head_dim(attention.config)).transpose(1, 2)

    return heads(attention.q_proj(h)), heads(attention.k_proj(h)), heads(attention.v_proj(h))


def _meta_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers layer's weights under Meta's short names: wq, wk, wv, wo, w1, w2, w3, the norms."""
    return {key.split(".")[-2]: value.detach() for key, value in
            scratch.convert_hf_state_dict(module.state_dict()).items()}


_SHAPE = Mistake("the output has another shape than the module's: it should have the input's shape, "
                 "(batch, heads, seq, head_dim) for attention.",
                 lambda got, want, *_: got.shape != want.shape)


def _shape(layer: LlamaDecoderLayer) -> str:
    config = layer.self_attn.config
    return (f"hidden {config.hidden_size}, {config.num_attention_heads} query heads, "
            f"{config.num_key_value_heads} KV heads, MLP {config.intermediate_size}")


def check_rms_norm(student_fn: Callable, model: nn.Module | None = None) -> Verdict:
    """Exercise (03): `student_fn(x, weight, eps)` is RMSNorm, against transformers' LlamaRMSNorm
    (the input norm of layer 0 of `model`, or of `check_against`'s model, and of a random layer)."""
    cases = []
    for name, layer, x in _layers(model, 5):
        norm = layer.input_layernorm
        with torch.no_grad():
            cases.append(Case(f"LlamaRMSNorm of {name} (hidden {x.shape[-1]})",
                              (x, norm.weight.detach(), norm.variance_epsilon), expected=norm(x)))
    return run_check("RMSNorm", student_fn, solutions.rms_norm, cases, rel=1e-4, mistakes=[
        _SHAPE,
        Mistake.answer("that subtracts the mean, as LayerNorm does; RMSNorm only divides by the root mean "
                       "square.", lambda x, w, eps: w * (x - x.mean(-1, keepdim=True)) * torch.rsqrt(
                           x.var(-1, keepdim=True, unbiased=False) + eps), rel=1e-4),
        Mistake.answer("the learnt weight is missing: multiply by `weight` after normalising.",
                       lambda x, w, eps: solutions.rms_norm(x, torch.ones_like(w), eps), rel=1e-4),
        Mistake.answer("the mean is taken over the wrong dimension: over the last one, the hidden size.",
                       lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + eps),
                       rel=1e-4),
    ])


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): neighbours as pairs, Meta's layout."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def check_apply_rope(student_fn: Callable, model: nn.Module | None = None) -> Verdict:
    """Exercise (03): `student_fn(x, cos, sin)` rotates x (batch, heads, seq, head_dim), against
    transformers' apply_rotary_pos_emb with the model's own rope tables, on the layer's queries."""
    cases = []
    for name, layer, x in _layers(model, 7):
        config, seq = layer.self_attn.config, x.shape[1]
        cos, sin = _rope(config, seq)
        with torch.no_grad():
            q, _, _ = _projections(layer, x)
        rotated, _ = apply_rotary_pos_emb(q, q, cos[None], sin[None])
        cases.append(Case(f"the queries of {name} ({config.num_attention_heads} heads of "
                          f"{sizing.head_dim(config)}, {seq} positions)", (q, cos, sin), expected=rotated))
    rotate_half = scratch.rotate_half
    return run_check("Applying RoPE", student_fn, solutions.apply_rope, cases, rel=1e-4, mistakes=[
        _SHAPE,
        Mistake.answer("x came back unchanged: every position but 0 must turn.", lambda x, cos, sin: x),
        Mistake.answer("that turns the other way: rotate_half(x) is cat(-x2, x1), added with + sin.",
                       lambda x, cos, sin: x * cos - rotate_half(x) * sin, rel=1e-4),
        Mistake.answer("that pairs neighbours (2i, 2i+1), Meta's layout; transformers pairs dimension i with "
                       "i + head_dim/2 (the two halves).",
                       lambda x, cos, sin: x * cos + _rotate_pairs(x) * sin, rel=1e-4),
    ])


def _attention(q, k, v, causal: bool = True, scale: bool = True, interleave: bool = True):
    groups = q.shape[1] // k.shape[1]
    k, v = ((t.repeat_interleave(groups, dim=1) if interleave else t.repeat(1, groups, 1, 1)) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5 if scale else 1)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def check_causal_gqa(student_fn: Callable, model: nn.Module | None = None) -> Verdict:
    """Exercise (03): `student_fn(q, k, v)` is causal grouped-query attention, against transformers'
    eager attention of LlamaAttention, on the layer's own queries and keys (after RoPE) and values."""
    cases = []
    for name, layer, x in _layers(model, 6):
        config, seq = layer.self_attn.config, x.shape[1]
        with torch.no_grad():
            q, k, v = _projections(layer, x)
        cos, sin = _rope(config, seq)
        q, k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        mask = torch.zeros(seq, seq).masked_fill(future, float("-inf"))
        out, _ = eager_attention_forward(layer.self_attn, q, k, v, mask[None, None],
                                         scaling=sizing.head_dim(config) ** -0.5)
        cases.append(Case(f"{name}: {config.num_attention_heads} query heads, {config.num_key_value_heads} "
                          f"KV heads, {seq} tokens", (q, k, v), expected=out.transpose(1, 2)))
    return run_check("Causal grouped-query attention", student_fn, solutions.causal_gqa, cases, rel=1e-4,
                     mistakes=[
        _SHAPE,
        Mistake.answer("no causal mask: a query sees the keys after it. Set the scores above the diagonal "
                       "to -inf before the softmax.",
                       lambda q, k, v: _attention(q, k, v, causal=False), 1e-4),
        Mistake.answer("the scores are not scaled: divide q k^T by sqrt(head_dim).",
                       lambda q, k, v: _attention(q, k, v, scale=False), 1e-4),
        Mistake.answer("the KV heads are shared in the wrong order: `repeat` gives query head h the KV head "
                       "h % n_kv; the query heads of a group are neighbours (repeat_interleave).",
                       lambda q, k, v: _attention(q, k, v, interleave=False), 1e-4),
    ])


def check_swiglu(student_fn: Callable, model: nn.Module | None = None) -> Verdict:
    """Exercise (03): `student_fn(x, w_gate, w_up, w_down)` is the SwiGLU MLP, against LlamaMLP."""
    cases = []
    for name, layer, x in _layers(model, 4):
        mlp = layer.mlp
        with torch.no_grad():
            h = layer.post_attention_layernorm(x)
            cases.append(Case(f"LlamaMLP of {name} ({x.shape[-1]} -> {mlp.intermediate_size})",
                              (h, mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                               mlp.down_proj.weight.detach()), expected=mlp(h)))
    linear = F.linear
    return run_check("SwiGLU MLP", student_fn, solutions.swiglu, cases, rel=1e-4, mistakes=[
        _SHAPE,
        Mistake.answer("SiLU went on the up projection: it belongs on the GATE (gate_proj).",
                       lambda x, g, u, d: solutions.swiglu(x, u, g, d), 1e-4),
        Mistake.answer("the gate is not multiplied by the up projection: silu(gate x) * (up x).",
                       lambda x, g, u, d: linear(F.silu(linear(x, g)), d), 1e-4),
        Mistake.answer("that is another activation: Llama's MLP uses SiLU (x * sigmoid(x)).",
                       lambda x, g, u, d: linear(F.gelu(linear(x, g)) * linear(x, u), d), 1e-4),
    ])


def _block_variant(x, w, cos, sin, n_heads, n_kv_heads, eps, pre_norm=True, residual=True):
    """The decoder layer with one step changed: post-norm, or no residual connections."""
    s = solutions
    batch, seq, _ = x.shape

    def attend(h):
        def heads(t, n):
            return t.view(batch, seq, n, -1).transpose(1, 2)
        q = s.apply_rope(heads(F.linear(h, w["wq"]), n_heads), cos, sin)
        k = s.apply_rope(heads(F.linear(h, w["wk"]), n_kv_heads), cos, sin)
        out = s.causal_gqa(q, k, heads(F.linear(h, w["wv"]), n_kv_heads))
        return F.linear(out.transpose(1, 2).reshape(batch, seq, -1), w["wo"])

    def mlp(h):
        return s.swiglu(h, w["w1"], w["w3"], w["w2"])

    if not pre_norm:
        h = s.rms_norm(x + attend(x), w["attention_norm"], eps)
        return s.rms_norm(h + mlp(h), w["ffn_norm"], eps)
    h = attend(s.rms_norm(x, w["attention_norm"], eps)) + (x if residual else 0)
    return mlp(s.rms_norm(h, w["ffn_norm"], eps)) + (h if residual else 0)


def check_decoder_block(student_fn: Callable, model: nn.Module | None = None) -> Verdict:
    """Exercise (03): `student_fn(x, w, cos, sin, n_heads, n_kv_heads, eps)` is one decoder layer,
    against transformers' LlamaDecoderLayer with the same weights."""
    cases = []
    for name, layer, x in _layers(model, 5):
        config, seq = layer.self_attn.config, x.shape[1]
        cos, sin = _rope(config, seq)
        with torch.no_grad():
            out = layer(x, position_embeddings=(cos[None], sin[None]))
        out = out[0] if isinstance(out, tuple) else out
        cases.append(Case(f"LlamaDecoderLayer of {name} ({_shape(layer)}), {seq} tokens",
                          (x, _meta_weights(layer), cos, sin, config.num_attention_heads,
                           config.num_key_value_heads, layer.input_layernorm.variance_epsilon),
                          expected=out))
    return run_check("Decoder block", student_fn, solutions.decoder_block, cases, rel=1e-3, mistakes=[
        Mistake("the output has another shape than the layer's: (batch, seq, hidden), as the input.",
                lambda got, want, *_: got.shape != want.shape),
        Mistake.answer("that normalises AFTER adding (post-norm, the 2017 Transformer); Llama normalises the "
                       "sublayer's input and adds its output to the raw stream (pre-norm).",
                       lambda *args: _block_variant(*args, pre_norm=False), 1e-3),
        Mistake.answer("the residual connections are missing: add each sublayer's output to its input, "
                       "x + attention(norm(x)), then h + mlp(norm(h)).",
                       lambda *args: _block_variant(*args, residual=False), 1e-3),
    ])
