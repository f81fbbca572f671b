"""Solutions of notebook 04 (sampling): the top-k and top-p filters, greedy decoding."""

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
