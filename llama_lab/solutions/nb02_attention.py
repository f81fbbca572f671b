"""Solutions of notebook 02 (attention): causal weights, induction heads, RoPE."""

from __future__ import annotations

import torch

from llama_lab.solutions import exercise


@exercise(
    idea="each query scores every key with a scaled dot product, may not look at later tokens, and its "
         "weights over the keys sum to 1.",
    step="scores = q @ k^T / sqrt(head_dim); set the scores of future keys (column > row) to -inf; "
         "softmax over the last dimension (the keys).")
def causal_attention(q, k):
    """Causal softmax attention weights from queries and keys of shape (heads, tokens, head_dim)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)  # key after query
    return scores.masked_fill(future, float("-inf")).softmax(-1)


@exercise(
    idea="in the repeated half, an induction head at token i looks at the token that came AFTER the "
         "earlier copy of token i: the one it predicts next.",
    step="for query positions i = period, period+1, ..., take the weight on key i - period + 1 (not the "
         "copy itself, i - period); average it per head, then the argmax over (layer, head).")
def strongest_induction_head(weights, period: int) -> tuple[int, int]:
    """(layer, head) with the highest induction score in maps of shape (layers, heads, tokens, tokens)."""
    from llama_lab.attention import induction_score

    scores = induction_score(weights, period)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return layer, head


@exercise(
    idea="RoPE turns pairs of dimensions by an angle that grows with the position and shrinks with the "
         "pair's index; transformers pairs dimension i with i + head_dim/2.",
    step="split x in halves x1 = x[:d/2], x2 = x[d/2:]; pair i turns by angle position * theta ** (-2i/d); "
         "the result is cat(x1*cos - x2*sin, x2*cos + x1*sin).")
def rope_rotate(x, position: int, theta: float = 10000.0):
    """Rotate one vector `x` (head_dim,) to `position`, in transformers' Llama layout:
    dimension i pairs with i + head_dim/2 and turns by the angle position * theta^(-2i/head_dim)."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float32) * 2 / x.shape[-1])
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])
