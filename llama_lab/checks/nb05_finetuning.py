"""Checkers of notebook 05 (fine-tuning): the SFT loss mask, a LoRA layer, the DPO loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_lab import solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check, same


def check_loss_mask(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(input_ids, start, end)` returns the SFT labels."""
    ids = [101, 7, 8, 9, 42, 43, 44, 2, 13]
    cases = [Case(f"input_ids={ids}, start={s}, end={e}", (ids, s, e)) for s, e in [(4, 8), (0, 9), (3, 3)]]
    return run_check(
        "Loss mask", student_fn, solutions.loss_mask_labels, cases,
        convert=lambda answer: [int(t) for t in answer], mistakes=[  # a tensor answer is fine too
            Mistake("nothing is masked: every position outside start..end-1 gets the label -100.",
                    lambda got, want, *_: -100 not in got),
            Mistake("the reply itself is masked: positions start <= i < end keep their token ids "
                    "(the end-of-turn token included).",
                    lambda got, want, ids, start, end: -100 in got[start:end]),
            Mistake("the tokens after end are not the reply: mask them with -100 too.",
                    lambda got, want, ids, start, end: -100 not in got[end:]),
        ])


def check_lora_forward(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(x, W, A, B, alpha, r)` returns a LoRA layer's output."""
    g = torch.Generator().manual_seed(5)
    x, W = torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g)
    cases = [Case(f"r={r}, alpha={alpha}",
                  (x, W, torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), alpha, r))
             for r, alpha in [(2, 4), (4, 4), (1, 8)]]

    def update(answer, x, W):  # what the answer adds to the frozen layer's output
        return answer - x @ W.T

    return run_check("LoRA forward", student_fn, solutions.lora_forward, cases, rel=1e-5, mistakes=[
        Mistake("the frozen layer's output x @ W.T is missing: the update comes on top of it.",
                lambda got, want, x, W, *_: same(got, update(want, x, W), 1e-5)),
        Mistake("the update has the right direction and the wrong size: scale B A x by alpha / r.",
                lambda got, want, x, W, *_: same(update(got, x, W) / update(got, x, W).norm(),
                                                 update(want, x, W) / update(want, x, W).norm(), 1e-4)),
    ])


def check_dpo_loss(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)`."""
    g = torch.Generator().manual_seed(6)
    cases = [Case(f"beta={beta} on 4 pairs", (*[-20 * torch.rand(4, generator=g) for _ in range(4)], beta))
             for beta in (0.1, 0.5)]
    cases.append(Case("policy == reference", (*[torch.zeros(3)] * 4, 0.1)))
    return run_check("DPO loss", student_fn, solutions.dpo_loss, cases, rel=1e-5, mistakes=[
        Mistake.answer("the reference model is missing: a reward is beta x (policy log-prob - REFERENCE "
                       "log-prob).",
                       lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pc, pr, 0 * rc, 0 * rr, beta)),
        Mistake.answer("chosen and rejected are swapped: the margin is the chosen reward minus the rejected "
                       "one.",
                       lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pr, pc, rr, rc, beta)),
        Mistake.answer("beta is missing: it multiplies the difference of the log-ratios.",
                       lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pc, pr, rc, rr, 1.0)),
        Mistake("summed over pairs: the loss is the mean.",
                lambda got, want, pc, *_: same(got, want * len(pc), 1e-5)),
    ])
