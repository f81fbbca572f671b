"""Checkers of notebook 04 (sampling): the top-k and top-p filters, greedy decoding, the repetition
penalty, stop sequences."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_lab import solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check


def _sampling_logits() -> dict[str, torch.Tensor]:
    """Logits to test filters on: a random batch, exact ties, and entries already at -inf."""
    random_rows = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 2
    ties = torch.tensor([4.0, 1.0, 4.0, 2.0, 2.0, -1.0, 0.5, 3.0])
    masked = torch.tensor([float("-inf"), 2.0, 0.0, float("-inf"), 1.0, -3.0, 2.5, 0.1])
    return {"a batch of 3 random rows": random_rows, "a row with ties": ties, "a row with -inf": masked}


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return (logits > float("-inf")).sum(-1)


# What a filter can get wrong, whatever it filters: how many tokens it keeps, and which.
FILTER_MISTAKES = [
    Mistake("the kept logits changed: return the logits themselves (not probabilities), -inf elsewhere.",
            lambda got, want, logits, *_: torch.equal(got > float("-inf"), want > float("-inf"))),
    Mistake("the right number of tokens, but other ones: keep the most likely, in vocabulary order.",
            lambda got, want, *_: torch.equal(_kept(got), _kept(want))),
]


def check_top_k(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(logits, k)` keeps the k largest logits (ties with the k-th too)."""
    cases = [Case(f"{name}, k={k}", (x, k)) for name, x in _sampling_logits().items() for k in (1, 3, 5)]
    return run_check("Top-k filter", student_fn, solutions.top_k_filter, cases, mistakes=[
        Mistake("too many tokens kept: only the k largest logits stay (and those tied with the k-th).",
                lambda got, want, *_: bool((_kept(got) > _kept(want)).all())),
        Mistake("too few tokens kept: logits tied with the k-th largest stay too; compare values "
                "(logits < k-th largest), not positions.",
                lambda got, want, *_: bool((_kept(got) < _kept(want)).any())),
        *FILTER_MISTAKES,
    ])


def check_top_p(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(logits, p)` keeps the smallest set of top tokens with mass >= p."""
    cases = [Case(f"{name}, p={p}", (x, p)) for name, x in _sampling_logits().items()
             if name != "a row with ties" for p in (0.05, 0.5, 0.93)]
    return run_check("Top-p (nucleus) filter", student_fn, solutions.top_p_filter, cases, mistakes=[
        Mistake("too few tokens kept: the token whose probability makes the total reach p stays too "
                "(compare the mass of the tokens ranked ABOVE each one with p).",
                lambda got, want, *_: bool((_kept(got) < _kept(want)).any())),
        Mistake("too many tokens kept: stop once the kept probabilities add up to p.",
                lambda got, want, *_: bool((_kept(got) > _kept(want)).all())),
        *FILTER_MISTAKES,
    ])


def check_greedy_decode(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(model, input_ids, n_new)` appends n_new greedy tokens, no KV cache."""
    from llama_lab.models import load_model

    model, _ = load_model("tiny-random")
    prompts = {"one prompt": torch.tensor([[5, 80, 81]]), "a batch of two": torch.tensor([[70, 71], [3, 9]])}
    cases = [Case(f"{name}, {n} new tokens", (model, ids, n))
             for name, ids in prompts.items() for n in (1, 6)]
    return run_check("Greedy decoding", student_fn, solutions.greedy_decode, cases, mistakes=[
        Mistake("only the new tokens came back: return the prompt followed by them.",
                lambda got, want, model, ids, n: got.shape[-1] == n and torch.equal(got, want[:, -n:])),
        Mistake("the prompt is there, the new tokens differ: take the argmax of the LAST position's logits, "
                "logits[:, -1], at every step.",
                lambda got, want, model, ids, n: got.shape == want.shape
                and torch.equal(got[:, :ids.shape[-1]], ids)),
        Mistake("not n_new tokens: append exactly one token per step, n_new steps.",
                lambda got, want, *_: got.shape[-1] != want.shape[-1]),
    ])


def check_repetition_penalty(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(logits, input_ids, penalty)` lowers every seen token's logit."""
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.5, 1.0]])
    batch = torch.randn(2, 40, generator=torch.Generator().manual_seed(7)) * 3
    cases = [Case("positive and negative logits, penalty 2", (logits, torch.tensor([[0, 1, 4]]), 2.0)),
             Case("a token seen three times, penalty 1.3", (logits, torch.tensor([[2, 2, 2, 3]]), 1.3)),
             Case("a batch of two, penalty 0.8 (a bonus)",
                  (batch, torch.tensor([[0, 5, 9], [1, 1, 30]]), 0.8))]
    return run_check("Repetition penalty", student_fn, solutions.apply_repetition_penalty, cases, mistakes=[
        Mistake.answer("every seen logit was divided: a negative logit divided by the penalty moves UP, "
                       "towards 0; multiply the negative ones instead.",
                       lambda x, ids, pen: x.scatter(-1, ids, x.gather(-1, ids) / pen)),
        Mistake("a token seen several times was penalized several times: the penalty applies once per "
                "token, however often it appears (gather, then scatter, once).",
                lambda got, want, x, ids, pen: ids.unique().numel() < ids.numel()
                and bool((got < want).any())),
    ])


def check_stop_sequence(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(text, stops)` cuts the reply before the earliest stop string."""
    cases = [Case("one stop string", ("Paris.\nUser: and Rome?", ["\nUser:"])),
             Case("two, the second one earlier in the text", ("Yes</s> sure\nUser: ok", ["\nUser:", "</s>"])),
             Case("no stop string in the text", ("Just an answer.", ["\nUser:"])),
             Case("the stop string at the very start", ("\nUser: hi", ["\nUser:"]))]
    return run_check("Stop sequences", student_fn, solutions.cut_at_stop, cases, mistakes=[
        Mistake("the stop string is still there: cut before it, text[:i], not after it.",
                lambda got, want, text, stops: isinstance(got, str) and got != want
                and any(got == want + s for s in stops)),
        Mistake("cut at the first stop string of the list, not the earliest in the text: find each one "
                "and keep the smallest position.",
                lambda got, want, text, stops: isinstance(got, str) and len(got) > len(want)),
    ])
