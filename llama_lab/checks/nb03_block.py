"""Checkers of notebook 03 (the transformer block): the MLP width, Meta's RoPE, the cached mask."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_lab import solutions
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
