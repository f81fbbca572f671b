"""Solutions of notebook 01 (tokenization): byte-pair encoding's two steps, what a tokenizer loses,
what a language costs."""

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
    idea="a character is lost when encoding it and decoding the ids does not give it back; try each "
         "character on its own, since a whole text only says that something is lost, not what.",
    step="for each distinct character c of text, in order (dict.fromkeys(text)), keep it when "
         "tokenizer.decode(tokenizer.encode(c, add_special_tokens=False)) != c.")
def lost_characters(tokenizer, text: str) -> list[str]:
    """The distinct characters of `text`, in order of first appearance, that `tokenizer` does not
    give back: encoding one and decoding its ids yields something else (an `<unk>`, or nothing)."""
    return [c for c in dict.fromkeys(text)
            if tokenizer.decode(tokenizer.encode(c, add_special_tokens=False)) != c]


def _prompt_tokens(tokenizer, question: str) -> int:
    messages = [{"role": "user", "content": question}]
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@exercise(
    idea="the cost is what the model reads: the question inside its chat format, tags and the opening of "
         "the assistant's turn included, counted in tokens; then Portuguese over English.",
    step="for each question, len(tokenizer.apply_chat_template([{'role': 'user', 'content': q}], "
         "add_generation_prompt=True, return_dict=False)); return the Portuguese count / the English count.")
def prompt_cost_ratio(tokenizer, english: str, portuguese: str) -> float:
    """How many times the tokens of the English chat prompt the Portuguese one costs: one user
    message in the tokenizer's chat format, with the generation prompt (the tags cost both the same)."""
    return _prompt_tokens(tokenizer, portuguese) / _prompt_tokens(tokenizer, english)
