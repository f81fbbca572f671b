"""Checkers of notebook 07 (serving and safety): a request body, users that fit, a guard rule."""

from __future__ import annotations

import re
from collections.abc import Callable

from llama_lab import guard, sizing, solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check

BODIES = {
    "a plain text": {"text": "Hi"},
    "text and max_tokens": {"text": "Hi", "max_tokens": 10},
    "max_tokens at the cap": {"text": "Hi", "max_tokens": 256},
    "a list, not an object": ["Hi"],
    "an empty object": {},
    "the misspelt field 'txt'": {"txt": "Hi"},
    "a number as text": {"text": 42},
    "an empty text": {"text": ""},
    "max_tokens 0": {"text": "Hi", "max_tokens": 0},
    "max_tokens over the cap": {"text": "Hi", "max_tokens": 300},
    "max_tokens true": {"text": "Hi", "max_tokens": True},
    "max_tokens 2.5": {"text": "Hi", "max_tokens": 2.5},
    "max_tokens '5'": {"text": "Hi", "max_tokens": "5"},
}


def _verdict(answer) -> str:
    """A body checker's answer as the checker compares it: accepted, or refused with a message."""
    if answer is None:
        return "accepted (None)"
    return "refused with a message" if isinstance(answer, str) and answer else f"neither: {answer!r}"


def check_predict_body(student_fn: Callable) -> Verdict:
    """Exercise (07): `student_fn(body, max_tokens_cap)` returns an error message, or None for a good body."""
    cases = [Case(f"{name} {body!r}", (body, 256), _verdict(solutions.predict_body_error(body, 256)))
             for name, body in BODIES.items()]
    return run_check("Check a /predict body", student_fn, solutions.predict_body_error, cases,
                     convert=_verdict, mistakes=[
        Mistake("a good body was refused: 'max_tokens' is optional, and any value from 1 to the cap is fine.",
                lambda got, want, *_: want.startswith("accepted")),
        Mistake("True passed as a number: in Python bool is a subclass of int, so test "
                "isinstance(value, bool) before isinstance(value, int).",
                lambda got, want, body, cap: isinstance(body, dict) and body.get("max_tokens") is True),
        Mistake("a bad body was accepted: check the body's type, then 'text', then max_tokens' type and "
                "range.",
                lambda got, want, *_: got.startswith("accepted")),
    ])


def check_users_that_fit(student_fn: Callable) -> Verdict:
    """Exercise (07): `student_fn(config, dtype, gpu_bytes, context_len)` -> users that fit."""
    c13, c70 = sizing.llama2_config("13b"), sizing.llama2_config("70b")
    setups = [("13B bf16 on 80 GB, 4096 tokens", c13, "bf16", 80 * 10**9, 4096),
              ("13B bf16 on 80 GB, 1024 tokens", c13, "bf16", 80 * 10**9, 1024),
              ("13B nf4 on 24 GB, 2048 tokens", c13, "nf4", 24 * 10**9, 2048),
              ("70B nf4 on 80 GB, 4096 tokens", c70, "nf4", 80 * 10**9, 4096),
              ("13B bf16 on a 16 GB T4, 4096 tokens", c13, "bf16", 16 * 10**9, 4096)]
    cases = [Case(name, args) for name, *args in setups]

    def everything_for_caches(config, dtype, gpu, n):
        return gpu // (sizing.kv_cache_bytes_per_token(config, dtype) * n)

    return run_check("Users that fit next to the weights", student_fn, solutions.users_that_fit, cases,
                     mistakes=[
        Mistake.answer("the weights take their share first: only what is left after them holds KV caches.",
                       everything_for_caches),
        Mistake("when the weights alone do not fit, no user fits: the answer is 0, not a negative number.",
                lambda got, want, *_: want == 0 and got < 0),
        Mistake("count whole users: round down (//), a part of a cache serves nobody.",
                lambda got, want, *_: got == want + 1 or (isinstance(got, float) and int(got) == want)),
    ])


GUARD_GOAL = "fewer mistakes than keyword_guard, and no more unsafe prompts let through"


def _against_keyword_guard(rule: Callable, prompts: list[guard.LabelledPrompt]) -> str:
    """What a guard rule does on the labelled prompts, next to keyword_guard."""
    mine, base = guard.evaluate(rule, prompts), guard.evaluate(guard.keyword_guard, prompts)
    if mine.errors < base.errors and len(mine.false_negatives) <= len(base.false_negatives):
        return GUARD_GOAL
    return (f"{len(mine.false_positives)} false positives and {len(mine.false_negatives)} false negatives "
            f"(keyword_guard: {len(base.false_positives)} and {len(base.false_negatives)})")


def _more(kind: int) -> Callable[..., bool]:
    """Whether a rule's summary shows more false positives (kind 0) or negatives (1) than keyword_guard."""
    def looks_like(got: str, *_) -> bool:
        numbers = [int(n) for n in re.findall(r"\d+", got)]  # the rule's two counts, then keyword_guard's
        return numbers[kind] > numbers[2 + kind]
    return looks_like


def check_guard_rule(student_fn: Callable) -> Verdict:
    """Exercise (07): `student_fn(text, role)` -> a reason to refuse, or None; it must make fewer
    mistakes than keyword_guard on the labelled prompts without letting more unsafe ones through."""
    prompts = guard.load_prompts()
    cases = [Case(f"the {len(prompts)} labelled prompts", (prompts,), GUARD_GOAL)]
    return run_check("A better guard rule", lambda p: _against_keyword_guard(student_fn, p),
                     solutions.guard_rule, cases, mistakes=[
        Mistake("it refuses more safe prompts than keyword_guard: each one is a user who needed an answer "
                "and got none.", _more(0)),
        Mistake("it lets more unsafe prompts through than keyword_guard: start from keyword_guard's "
                "refusals and take back only the harmless ones.", _more(1)),
    ])
