"""Checkers of notebook 01 (tokenization): counting pairs, applying a merge, what a tokenizer loses,
what a language costs."""

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


def _small_tokenizers() -> dict:
    """Two quick tokenizers: byte-level with ChatML, and Llama-2-style SentencePiece without byte
    fallback (it loses what its 1,000 pieces lack), with Llama-2-chat's template."""
    from llama_lab import models, tokenization

    corpus = tokenization.load_corpus()
    plain = tokenization.train_sentencepiece(corpus, 1000, byte_fallback=False)
    return {"byte-level (ChatML)": models.tiny_tokenizer(), "SentencePiece without byte fallback":
            tokenization.to_transformers(plain)}


def check_lost_characters(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(tokenizer, text)` lists the characters the tokenizer does not give back."""
    texts = ["Quetzalcoatl 🦙 café", "Qué? Quanto custa 12 €?", "plain ascii text"]
    cases = [Case(f"{name} tokenizer, text={text!r}", (tok, text))
             for name, tok in _small_tokenizers().items() for text in texts]
    return run_check("What a tokenizer loses", student_fn, solutions.lost_characters, cases, convert=list,
                     mistakes=[
        Mistake("every character is lost: the ids start with a special token (BOS) that decodes to text; "
                "encode with add_special_tokens=False.",
                lambda got, want, tok, text: len(got) > len(want) and set(got) == set(text)),
        Mistake("a character appears more than once: list each lost character once, in the order it "
                "first appears.",
                lambda got, want, *_: len(got) > len(set(got)) and list(dict.fromkeys(got)) == want),
        Mistake("the right characters in the wrong order: keep the order of their first appearance "
                "in the text.", lambda got, want, *_: got != want and sorted(got) == sorted(want)),
    ])


def check_prompt_cost_ratio(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(tokenizer, english, portuguese)`: tokens of the Portuguese chat
    prompt over those of the English one."""
    pairs = [("Where do llamas live?", "Onde vivem as lhamas?"),
             ("How much does a kilo of bread cost today?", "Quanto custa hoje um quilo de pão?"),
             ("Please translate this sentence.", "Por favor, traduza esta frase.")]
    cases = [Case(f"{name} tokenizer, {english!r} / {portuguese!r}", (tok, english, portuguese))
             for name, tok in _small_tokenizers().items() for english, portuguese in pairs]

    def content_only(tok, english, portuguese):
        count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
        return count(portuguese) / count(english)

    def inverted(tok, english, portuguese):
        return 1 / solutions.prompt_cost_ratio(tok, english, portuguese)

    return run_check("What a language costs", student_fn, solutions.prompt_cost_ratio, cases, mistakes=[
        Mistake.answer("upside down: that is English over Portuguese; divide the Portuguese count by "
                       "the English.", inverted),
        Mistake.answer("that is the ratio of characters: count the tokens the model reads.",
                       lambda tok, english, portuguese: len(portuguese) / len(english)),
        Mistake.answer("that is the ratio of the questions' own tokens: the model reads the chat format "
                       "too (apply_chat_template, with the generation prompt), whose tags cost both "
                       "languages the same.", content_only),
    ])
