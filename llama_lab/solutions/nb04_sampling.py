"""Solutions of notebook 04 (sampling): the top-k and top-p filters, greedy decoding, the repetition
penalty, stop sequences."""

from __future__ import annotations

import torch

from llama_lab.solutions import exercise


@exercise(
    idea="keep the k most likely tokens (and any tied with the k-th); every other logit becomes -inf, "
         "so softmax gives it probability 0.",
    step="find the k-th largest value with logits.topk(k, dim=-1).values[..., -1:], then set every logit "
         "strictly below it to float('-inf') with masked_fill (ties with it stay).")
def top_k_filter(logits, k: int):
    """Keep the `k` largest logits of the last dimension (and any tied with the k-th); -inf elsewhere.

    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2)
    tensor([-inf, 3., -inf, 3.])
    """
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@exercise(
    idea="rank the tokens by probability and keep the most likely ones until their mass reaches p; "
         "the token that crosses p stays.",
    step="sort the probabilities in descending order; a token stays when the probability of the tokens "
         "ranked above it is still below p (so the most likely token always stays); put the answer back "
         "in vocabulary order with scatter, and mask the rest with -inf.")
def top_p_filter(logits, p: float):
    """Keep the most likely tokens until their probabilities add up to at least `p`; -inf elsewhere.

    >>> top_p_filter(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.8)  # .64 + .24 >= .8
    tensor([2., 1., -inf, -inf])
    """
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    remove = (mass_before >= p).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(remove, float("-inf"))


@exercise(
    idea="greedy decoding appends the single most likely next token, then runs the model again on the "
         "longer text, n_new times.",
    step="n_new times: logits = model(input_ids).logits; next_id = logits[:, -1].argmax(-1, keepdim=True); "
         "input_ids = torch.cat([input_ids, next_id], dim=-1). Return all of input_ids.")
def greedy_decode(model, input_ids, n_new: int):
    """Append the most likely token `n_new` times, running the whole text each step (no cache)."""
    with torch.no_grad():
        for _ in range(n_new):
            next_id = model(input_ids).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_id], dim=-1)
    return input_ids


@exercise(
    idea="every token already in the text gets a lower score, whatever its sign: a positive logit moves "
         "towards 0, a negative one away from it, so dividing alone would raise negative ones.",
    step="seen = logits.gather(-1, input_ids); penalized = torch.where(seen < 0, seen * penalty, "
         "seen / penalty); return logits.scatter(-1, input_ids, penalized) (a token seen twice is "
         "penalized once).")
def apply_repetition_penalty(logits, input_ids, penalty: float):
    """Lower the logit of every token that appears in `input_ids` (batch, tokens): divide it by
    `penalty` when positive, multiply it when negative (CTRL, Keskar et al. 2019, section 4.1).

    >>> apply_repetition_penalty(torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[0, 1, 1]]), 2.0)
    tensor([[ 1., -2.,  3.]])
    """
    seen = logits.gather(-1, input_ids)
    return logits.scatter(-1, input_ids, torch.where(seen < 0, seen * penalty, seen / penalty))


@exercise(
    idea="a stop sequence ends the reply where it first appears in the text, whichever of the stop "
         "strings that is; the stop string itself is not part of the reply.",
    step="for each stop string s, i = text.find(s) (-1: absent); take the smallest i that is not -1 and "
         "return text[:i]; with none found, return the whole text.")
def cut_at_stop(text: str, stops: list[str]) -> str:
    """The reply up to (not including) the earliest of the `stops` strings found in `text`.

    >>> cut_at_stop("Paris.\\nUser: and Rome?", ["\\nUser:", "</s>"])
    'Paris.'
    """
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[:min(found)] if found else text
