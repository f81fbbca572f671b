"""Checkers of notebook 01 (tokenization): counting pairs, applying a merge, tokens of a chat."""

from __future__ import annotations

from collections.abc import Callable

from llama_lab import solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check


def check_count_pairs(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(ids)` returns {(a, b): how often b follows a in ids}."""
    inputs = [[1, 2, 3, 1, 2], [7, 7, 7], [5], [], list(b"hello, hello!")]
    cases = [Case(f"ids={ids}", (ids,)) for ids in inputs]
    return run_check("Count adjacent pairs", student_fn, solutions.count_pairs, cases, convert=dict,
                     mistakes=[
        Mistake("the right pairs with the wrong counts: count how often each pair occurs.",
                lambda got, want, ids: got.keys() == want.keys()),
        Mistake("some pairs are missing: pairs overlap, so step one position at a time, not two "
                "([7, 7, 7] holds (7, 7) twice).",
                lambda got, want, ids: got and set(got) <= set(want)
                and sum(got.values()) < sum(want.values())),
    ])


def check_apply_merge(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(ids, pair, new_id)` replaces each occurrence of pair, left to right."""
    inputs = [([1, 2, 3, 1, 2], (1, 2), 4), ([7, 7, 7], (7, 7), 9), ([1, 2, 1, 2, 1], (2, 1), 8),
              ([1, 2], (2, 1), 5), ([], (1, 2), 3), ([3, 3, 3, 3], (3, 3), 6)]
    cases = [Case(f"ids={ids}, pair={pair}, new_id={new}", (ids, pair, new)) for ids, pair, new in inputs]
    return run_check("Apply one merge", student_fn, solutions.apply_merge, cases, convert=list, mistakes=[
        Mistake("new_id never appears: each occurrence of the pair becomes ONE new token, new_id.",
                lambda got, want, ids, pair, new: new in want and new not in got),
        Mistake("as many merges as expected, in other places: read left to right, so [7, 7, 7] with (7, 7) "
                "gives [9, 7].", lambda got, want, *_: sorted(got) == sorted(want)),
        Mistake("too many merges: once a pair is merged, its two ids cannot start another pair.",
                lambda got, want, *_: len(got) < len(want)),
    ])


def check_chat_prompt_tokens(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(tokenizer, messages)` counts the tokens of the rendered chat prompt."""
    from llama_lab import models, tokenization

    chatml = models.tiny_tokenizer()
    llama = tokenization.to_transformers(tokenization.train_sentencepiece(tokenization.load_corpus(), 1000))
    conversations = [[{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Answer in Portuguese."},
                      {"role": "user", "content": "Where do llamas 🦙 live? Café?"}],
                     [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3 + 3?"}]]
    cases = [Case(f"{name} tokenizer, {len(messages)} message(s)", (tok, messages))
             for name, tok in [("ChatML (byte-level)", chatml), ("Llama-2-style", llama)]
             for messages in conversations]
    return run_check("Tokens of a chat prompt", student_fn, solutions.chat_prompt_tokens, cases, mistakes=[
        Mistake("one token too many: tokenizing the rendered string adds a second BOS; let "
                "apply_chat_template tokenize.", lambda got, want, *_: got == want + 1),
        Mistake("far more than the tokens: that looks like the length of the rendered string, in characters.",
                lambda got, want, *_: got > 1.5 * want),
        Mistake("a few tokens short: the prompt ends with the opening of the assistant's turn "
                "(add_generation_prompt=True).", lambda got, want, *_: 0 < want - got <= 8),
    ])
