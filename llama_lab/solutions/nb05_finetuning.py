"""Solutions of notebook 05 (fine-tuning): the SFT loss mask, a LoRA layer, the DPO loss."""

from __future__ import annotations

import torch.nn.functional as F

from llama_lab.solutions import exercise


@exercise(
    idea="the model should learn only the assistant's reply; every other position gets the label that "
         "cross_entropy ignores.",
    step="copy the token id at positions start <= i < end (the reply and its end-of-turn token) and put "
         "-100 everywhere else: cross_entropy ignores -100.")
def loss_mask_labels(input_ids: list[int], start: int, end: int) -> list[int]:
    """Labels for SFT: the token ids where the assistant speaks (positions start..end-1), -100 elsewhere.

    >>> loss_mask_labels([5, 6, 7, 8], 1, 3)
    [-100, 6, 7, -100]
    """
    return [t if start <= i < end else -100 for i, t in enumerate(input_ids)]


@exercise(
    idea="a LoRA layer is the frozen layer's output plus a low-rank correction: x goes through A, then B, "
         "and the correction is scaled.",
    step="W is (out, in) like nn.Linear's weight, so the base output is x @ W.T; the update goes through "
         "A (r, in) then B (out, r): (x @ A.T) @ B.T, multiplied by alpha / r.")
def lora_forward(x, W, A, B, alpha: float, r: int):
    """A LoRA linear layer: the frozen W x plus the low-rank update (alpha / r) B A x."""
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


@exercise(
    idea="DPO rewards a reply by how much more likely the policy makes it than the reference does; the "
         "loss pushes the chosen reply's reward above the rejected one's.",
    step="each reply's implicit reward is beta x (policy log-prob - reference log-prob); the loss is "
         "-logsigmoid(reward of chosen - reward of rejected), averaged over pairs (log 2 when policy and "
         "reference agree).")
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO loss from sequence log-probabilities:
    -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), averaged over pairs."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()
