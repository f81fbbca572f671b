"""Exercise checkers: `check_...(student_answer)` prints a verdict and a hint.

A checker never raises: an exception in the learner's code becomes a hint,
so the notebook goes on. Each returns True (pass) or False, which the tests
use to prove it passes the solution in `llama_lab.solutions` and fails a
wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llama_lab import solutions, sizing


def _same(got: Any, expected: Any, rel: float) -> bool:
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, expected, rel_tol=rel, abs_tol=rel)
    try:  # tensors and arrays
        import torch

        if isinstance(expected, torch.Tensor):
            got = torch.as_tensor(got, dtype=expected.dtype)
            return got.shape == expected.shape and torch.allclose(got, expected, rtol=rel, atol=rel,
                                                                  equal_nan=True)
    except (TypeError, ValueError, RuntimeError):
        return False
    return got == expected


def run_check(title: str, cases: list[tuple[str, Callable[[], Any], Any]], hint: str,
              rel: float = 1e-6) -> bool:
    """Try each case `(description, compute_student_answer, expected)`; print one verdict.

    The first failing case is shown with what was expected and what came back.
    """
    for description, compute, expected in cases:
        try:
            got = compute()
        except NotImplementedError:
            print(f"⏳ {title}: not answered yet. Fill in the cell above and run it again.")
            return False
        except Exception as err:  # the learner's code failed: explain, never crash the notebook
            print(f"❌ {title}: your code raised {type(err).__name__}: {err}\n   Hint: {hint}")
            return False
        if not _same(got, expected, rel):
            print(f"❌ {title}: for {description} the answer should be {_short(expected)}, "
                  f"yours is {_short(got)}.\n   Hint: {hint}")
            return False
    print(f"✅ {title}: correct ({len(cases)} case{'s' * (len(cases) > 1)} checked).")
    return True


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


# --- notebook 00 ------------------------------------------------------------------------------

def check_layer_params(student_fn: Callable) -> bool:
    """Exercise (00): `student_fn(config)` returns the parameter count of ONE decoder layer."""
    configs = {size: sizing.llama2_config(size) for size in ("13b", "7b", "70b")}
    cases = [(f"Llama-2-{size.upper()}", (lambda c=c: student_fn(c)), solutions.layer_params(c))
             for size, c in configs.items()]
    return run_check(
        "Parameters of one decoder layer", cases,
        hint="a layer holds q/k/v/o projections (k and v are smaller with GQA: "
             "num_key_value_heads x head_dim columns), three MLP matrices of hidden x intermediate, "
             "and two RMSNorm weight vectors of size hidden. There are no biases.")


def check_kv_cache_gb(student_fn: Callable) -> bool:
    """Exercise (00): `student_fn(config, n_tokens)` returns the bf16 KV-cache size in GB (1e9 bytes)."""
    cases = [(f"Llama-2-{size.upper()} at {n} tokens", (lambda c=c, n=n: student_fn(c, n)),
              solutions.kv_cache_gb(c, n))
             for size, n in [("13b", 4096), ("7b", 1000), ("70b", 4096)]
             for c in [sizing.llama2_config(size)]]
    return run_check(
        "KV-cache size", cases, rel=1e-3,
        hint="per token, every layer stores one key and one value vector per KV head: "
             "2 x layers x kv_heads x head_dim numbers, 2 bytes each in bf16. Divide bytes by 1e9.")
