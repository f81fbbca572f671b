"""Solutions of notebook 03 (the transformer block): the MLP width, Meta's RoPE, the cached mask."""

from __future__ import annotations

import torch

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
