"""Solutions of notebook 03 (the transformer block): the MLP width, Meta's RoPE, the cached mask, and the
block written piece by piece: RMSNorm, RoPE, causal grouped-query attention, SwiGLU, the decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_lab.solutions import exercise


@exercise(
    idea="SwiGLU has three matrices where the classic MLP had two, so its width is 2/3 of 4 x dim, "
         "then scaled and rounded to suit the hardware.",
    step="start from int(2 * 4 * dim / 3); if a multiplier is given, take int(multiplier * that); then "
         "round UP to the next multiple of multiple_of (not to the nearest one).")
def ffn_dim(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """SwiGLU hidden width as Meta's Llama code sets it: 2/3 of the classic 4 x dim (three
    matrices instead of two, same parameters), times an optional multiplier, rounded UP
    to a multiple of `multiple_of`.

    >>> ffn_dim(5120)  # Llama-2-13B
    13824
    """
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


@exercise(
    idea="Meta's code reads neighbouring dimensions (2i, 2i+1) as one complex number and turns it by "
         "multiplying with a complex number of length 1.",
    step="pairs = torch.view_as_complex(x.reshape(seq, d // 2, 2)); angle[p, i] = p * theta ** (-2i/d); "
         "multiply by torch.polar(torch.ones_like(angle), angle); then view_as_real(...).flatten(1).")
def apply_rotary_interleaved(x, theta: float = 10000.0):
    """RoPE as in Meta's reference code: x (seq, head_dim), row p at position p; dimensions
    (2i, 2i+1) form the complex number x[2i] + i x[2i+1], multiplied by e^(i p theta^(-2i/head_dim))."""
    seq, head_dim = x.shape
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    pairs = torch.view_as_complex(x.float().reshape(seq, head_dim // 2, 2))
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(1)


@exercise(
    idea="a new token sees every cached token (they are all in its past) and the new tokens up to itself.",
    step="new token i sits at position n_cached + i and may see key j when j <= n_cached + i: "
         "torch.ones(n_new, n_cached + n_new, dtype=torch.bool).tril(diagonal=n_cached).")
def causal_mask_after_cache(n_new: int, n_cached: int):
    """(n_new, n_cached + n_new) booleans, True where new token i (at position n_cached + i)
    may attend to key j: every cached key, and the new ones up to itself."""
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool).tril(diagonal=n_cached)


# --- the learner writes the block: each piece checked against transformers' module -------------

@exercise(
    idea="RMSNorm divides each vector by its root mean square (no mean subtracted, no bias), then "
         "scales each dimension by a learnt weight.",
    step="x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight: the mean over the LAST "
         "dimension (the hidden size), eps inside the square root.")
def rms_norm(x, weight, eps: float = 1e-5):
    """x (..., dim) / sqrt(mean(x^2) + eps) * weight, in float32 as transformers does."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@exercise(
    idea="RoPE turns pairs of dimensions by an angle that grows with the position; transformers pairs "
         "dimension i with i + head_dim/2 (the two halves), and cos, sin already hold every angle.",
    step="rotate_half(x) = cat(-x2, x1) of the two halves x1, x2 of the last dimension; the answer "
         "is x * cos + rotate_half(x) * sin.")
def apply_rope(x, cos, sin):
    """x (batch, heads, seq, head_dim) rotated by the rope tables cos, sin (seq, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@exercise(
    idea="each group of n_heads // n_kv_heads query heads reads the same key/value head; the scores "
         "q k^T are scaled by 1/sqrt(head_dim), and a query may not see later keys.",
    step="k, v = k.repeat_interleave(groups, dim=1), same for v (heads 0..groups-1 read kv head 0); "
         "scores = q @ k.transpose(-1, -2) / sqrt(head_dim); set scores above the diagonal "
         "(torch.triu(..., diagonal=1)) to -inf; softmax over the last dimension; @ v.")
def causal_gqa(q, k, v):
    """Causal grouped-query attention: q (batch, n_heads, seq, d), k, v (batch, n_kv_heads, seq, d)
    -> (batch, n_heads, seq, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    seq = q.shape[-2]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


@exercise(
    idea="SwiGLU is a gated MLP: one projection, through SiLU, gates another, elementwise; a third "
         "projects back to the hidden size.",
    step="w_down @ (silu(w_gate @ x) * (w_up @ x)), as F.linear(F.silu(F.linear(x, w_gate)) * "
         "F.linear(x, w_up), w_down): SiLU on the GATE only.")
def swiglu(x, w_gate, w_up, w_down):
    """The SwiGLU MLP with transformers' weights (gate_proj, up_proj, down_proj: (out, in))."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


@exercise(
    idea="a pre-norm block: each sublayer reads a NORMED copy of the residual stream and ADDS its "
         "output back to the stream, attention first, then the MLP.",
    step="h = x + attention(rms_norm(x, w['attention_norm'])) (q, k, v projections, RoPE on q and k, "
         "causal_gqa, then wo); out = h + swiglu(rms_norm(h, w['ffn_norm']), w['w1'], w['w3'], w['w2']).")
def decoder_block(x, w: dict, cos, sin, n_heads: int, n_kv_heads: int, eps: float = 1e-5):
    """One Llama decoder layer from its weights `w` (Meta's names, `scratch.HF_NAMES`): x (batch,
    seq, dim) -> (batch, seq, dim); cos, sin (seq, head_dim) the rope tables."""
    batch, seq, _ = x.shape

    def heads(t, n):
        return t.view(batch, seq, n, -1).transpose(1, 2)

    normed = rms_norm(x, w["attention_norm"], eps)
    q = apply_rope(heads(F.linear(normed, w["wq"]), n_heads), cos, sin)
    k = apply_rope(heads(F.linear(normed, w["wk"]), n_kv_heads), cos, sin)
    v = heads(F.linear(normed, w["wv"]), n_kv_heads)
    h = x + F.linear(causal_gqa(q, k, v).transpose(1, 2).reshape(batch, seq, -1), w["wo"])
    return h + swiglu(rms_norm(h, w["ffn_norm"], eps), w["w1"], w["w3"], w["w2"])
