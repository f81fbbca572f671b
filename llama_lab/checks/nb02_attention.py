"""Checkers of notebook 02 (attention): causal weights, the strongest induction head, RoPE."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_lab import solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check


def _is_causal(weights: torch.Tensor) -> bool:
    return bool((weights.triu(1) == 0).all())


def _rows_sum_to_one(weights: torch.Tensor) -> bool:
    return torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-4)


def check_causal_attention(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(q, k)` turns queries and keys (heads, tokens, head_dim) into
    causal softmax attention weights (heads, tokens, tokens), equal to the model's own."""
    from llama_lab import attention, models

    model, tokenizer = models.load_model("tiny-random", attn_implementation="eager")
    ids = tokenizer("attention!", return_tensors="pt").input_ids
    maps = attention.collect_attention(model, tokenizer, ids)
    cases = [Case(f"layer {layer} of the tiny model (its own attention maps)",
                  attention.queries_keys(model, ids, layer), maps.weights[layer]) for layer in (0, 3)]
    q, k = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    cases.append(Case("random q, k (3 heads, 5 tokens, head_dim 8)", (q, k)))
    return run_check("Causal attention", student_fn, solutions.causal_attention, cases, rel=1e-5, mistakes=[
        Mistake("the weights of a query do not sum to 1: take the softmax over the last dimension, the keys.",
                lambda got, want, *_: not _rows_sum_to_one(got)),
        Mistake("weight on future keys: set the scores where the key comes after the query to -inf "
                "before the softmax.", lambda got, want, *_: not _is_causal(got)),
        Mistake("too peaked: divide the scores by sqrt(head_dim).",
                lambda got, want, *_: bool((got.amax(-1) >= want.amax(-1) - 1e-6).all())),
        Mistake("too flat: divide the scores by sqrt(head_dim), not by more.",
                lambda got, want, *_: bool((got.amax(-1) <= want.amax(-1) + 1e-6).all())),
    ])


def _planted_maps(shape: tuple[int, int], period: int, plants: dict, seed: int) -> torch.Tensor:
    """Causal random attention maps (layers, heads, 2*period, 2*period) with some heads
    overwritten: plants maps (layer, head) -> the offset that head attends to."""
    n = 2 * period
    scores = torch.randn(*shape, n, n, generator=torch.Generator().manual_seed(seed))
    weights = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    for (layer, head), offset in plants.items():
        rows = torch.arange(offset, n)
        weights[layer, head, rows] *= 0.1
        weights[layer, head, rows, rows - offset] += 0.9
    return weights


def _strongest_at(weights: torch.Tensor, period: int, offset: int) -> tuple[int, int]:
    """(layer, head) putting the most weight, in the repeated half, on the key `offset` tokens back."""
    rows = torch.arange(period, weights.shape[-1])
    scores = weights[:, :, rows, rows - offset].mean(-1)
    return divmod(int(scores.argmax()), scores.shape[1])


def check_strongest_induction_head(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(weights, period)` returns (layer, head) of the strongest
    induction head in maps (layers, heads, tokens, tokens) of a sequence repeated every `period`."""
    setups = [((4, 3), 5, {(2, 1): 4, (1, 1): 5, (3, 0): 1}, 0),   # induction, duplicate-token, previous
              ((6, 9), 8, {(5, 0): 7, (0, 4): 8, (2, 2): 1}, 1),
              ((3, 4), 6, {(0, 3): 5, (2, 3): 6, (1, 0): 1}, 2)]
    cases = [Case(f"{shape[0]} layers x {shape[1]} heads, period {period}",
                  (_planted_maps(shape, period, plants, seed), period))
             for shape, period, plants, seed in setups]
    return run_check(
        "Strongest induction head", student_fn, solutions.strongest_induction_head, cases,
        convert=lambda answer: tuple(int(v) for v in answer), mistakes=[
            Mistake("that head looks at the earlier copy of the token itself (key i - period), a duplicate-"
                    "token head; an induction head looks one further, at i - period + 1.",
                    lambda got, want, w, period: got == _strongest_at(w, period, period)),
            Mistake("that head looks at the previous token (key i - 1); an induction head looks at the token "
                    "after the earlier copy, i - period + 1.",
                    lambda got, want, w, period: got == _strongest_at(w, period, 1)),
            Mistake("layer and head are swapped: return (layer, head), divmod(flat index, number of heads).",
                    lambda got, want, *_: got == want[::-1]),
        ])


def _pair_lengths(x: torch.Tensor, halves: bool) -> torch.Tensor:
    """Length of each rotated pair: (i, i + d/2) in transformers' layout, (2i, 2i+1) in Meta's."""
    pairs = x.view(2, -1).T if halves else x.view(-1, 2)
    return pairs.norm(dim=-1)


def check_rope_rotate(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(x, position, theta)` rotates x (head_dim,) like the model's RoPE."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    cases = [Case(f"head_dim {d}, position {pos}, theta {theta:g}", (x[:d].clone(), pos, theta))
             for d, pos, theta in [(8, 0, 10000.0), (8, 3, 10000.0), (64, 17, 100000.0), (64, 250, 10000.0)]]
    return run_check("RoPE rotation", student_fn, solutions.rope_rotate, cases, rel=1e-4, mistakes=[
        Mistake("x came back unchanged: only position 0 leaves it as it is.",
                lambda got, want, x, *_: torch.allclose(got, x)),
        Mistake.answer("turned the wrong way: x1*cos - x2*sin for the first half, x2*cos + x1*sin for the "
                       "second.", lambda x, pos, theta: solutions.rope_rotate(x, -pos, theta), rel=1e-4),
        Mistake("you paired neighbours (2i, 2i+1), Meta's layout; transformers pairs dimension i with "
                "i + head_dim/2.",
                lambda got, want, x, *_: torch.allclose(_pair_lengths(got, False), _pair_lengths(x, False),
                                                        atol=1e-4)),
    ])
