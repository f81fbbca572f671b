"""Checkers of notebook 00 (meet Llama-2-13B): parameters of a layer, size of the KV cache."""

from __future__ import annotations

import math
from collections.abc import Callable

from llama_lab import sizing, solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check

SIZES = ("13b", "7b", "70b")


def _kv_width(config) -> int:
    return config.num_key_value_heads * sizing.head_dim(config)


def check_layer_params(student_fn: Callable) -> Verdict:
    """Exercise (00): `student_fn(config)` returns the parameter count of ONE decoder layer."""
    cases = [Case(f"Llama-2-{size.upper()}", (sizing.llama2_config(size),)) for size in SIZES]
    return run_check("Parameters of one decoder layer", student_fn, solutions.layer_params, cases, mistakes=[
        Mistake("k and v came out as wide as q: with grouped-query attention (70B) they have "
                "num_key_value_heads x head_dim columns, not hidden.",
                lambda got, want, c: got - want == 2 * c.hidden_size * (c.hidden_size - _kv_width(c))),
        Mistake("short by 2 x hidden: the two RMSNorm weight vectors are parameters too.",
                lambda got, want, c: want - got == 2 * c.hidden_size),
        Mistake("the MLP is missing: gate, up and down are three hidden x intermediate matrices.",
                lambda got, want, c: abs(want - got - 3 * c.hidden_size * c.intermediate_size)
                <= 2 * c.hidden_size),
    ])


def check_kv_cache_gb(student_fn: Callable) -> Verdict:
    """Exercise (00): `student_fn(config, n_tokens)` returns the bf16 KV-cache size in GB (1e9 bytes)."""
    cases = [Case(f"Llama-2-{size.upper()} at {n} tokens", (sizing.llama2_config(size), n))
             for size, n in [("13b", 4096), ("7b", 1000), ("70b", 4096)]]
    return run_check("KV-cache size", student_fn, solutions.kv_cache_gb, cases, rel=1e-3, mistakes=[
        Mistake("half the size: the cache holds a key AND a value vector (a factor 2).",
                lambda got, want, *_: math.isclose(got, want / 2, rel_tol=1e-3)),
        Mistake("twice the size: bf16 stores a number in 2 bytes (fp32 takes 4).",
                lambda got, want, *_: math.isclose(got, want * 2, rel_tol=1e-3)),
        Mistake.answer("the cache keeps num_key_value_heads heads per layer (8 in 70B), not "
                       "num_attention_heads.",
                       lambda c, n: solutions.kv_cache_gb(c, n) * c.num_attention_heads
                       / c.num_key_value_heads, rel=1e-3),
        Mistake("GB here are 1e9 bytes: divide by 1e9, not by 2**30 (that is GiB).",
                lambda got, want, *_: math.isclose(got, want * 1e9 / 2**30, rel_tol=1e-3)),
    ])
