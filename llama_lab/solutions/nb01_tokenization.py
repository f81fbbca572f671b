"""Solutions of notebook 01 (tokenization): byte-pair encoding's two steps, and chat prompts."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from llama_lab.solutions import exercise


@exercise(
    idea="a pair is two neighbours: every position but the last starts one, and overlapping pairs count.",
    step="count each (a, b) of zip(ids, ids[1:]) in a dict (or a Counter): [7, 7, 7] holds (7, 7) twice.")
def count_pairs(ids: list[int]) -> dict[tuple[int, int], int]:
    """How often each pair of neighbours occurs in `ids` (overlaps count: [7, 7, 7] has two (7, 7)).

    >>> count_pairs([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    return dict(Counter(pairwise(ids)))


@exercise(
    idea="read the ids left to right; each occurrence of the pair becomes one new token, and the two ids "
         "it used cannot start another pair.",
    step="build a new list: at position i, if (ids[i], ids[i + 1]) is the pair, append new_id and jump two "
         "places, else append ids[i] and move one. [7, 7, 7] with (7, 7) -> [9, 7].")
def apply_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with each occurrence of `pair`, read left to right, replaced by `new_id`.

    >>> apply_merge([7, 7, 7, 1], (7, 7), 9)
    [9, 7, 1]
    """
    out = []
    for i in ids:
        if out and (out[-1], i) == pair:  # out[-1] is never a fresh new_id: those are not in pair
            out[-1] = new_id
        else:
            out.append(i)
    return out


@exercise(
    idea="the chat template turns the messages into the text the model reads, special tokens and the "
         "opening of the assistant's turn included; count tokens, not characters.",
    step="let the template render AND tokenize in one call: tokenizer.apply_chat_template(messages, "
         "add_generation_prompt=True, return_dict=False) is the list of ids; its len is the answer.")
def chat_prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens the model reads for `messages` rendered by the tokenizer's chat template,
    with the generation prompt (the opening of the assistant's turn) and no second BOS."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
