"""Tests of notebook 01's library code: the from-scratch BPE against `tokenizers`, the
Llama-2-style SentencePiece model, the token display and the checkers (chat formats: test_chat.py)."""

from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_lab import checks, models, solutions, tokenization, widgets

VOCAB = 300  # 44 merges: enough to exercise every path, quick to train


@pytest.fixture(scope="module")
def corpus():
    return tokenization.load_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return tokenization.BPE.train(corpus, VOCAB)


@pytest.fixture(scope="module")
def library(corpus):
    return tokenization.library_bpe(corpus, VOCAB)


@pytest.fixture(scope="module")
def sp(corpus):
    return tokenization.train_sentencepiece(corpus, vocab_size=1000)


@pytest.fixture(scope="module")
def llama_style(sp):
    return tokenization.to_transformers(sp)


def library_token_bytes(library, text):
    return [bytes(tokenization.CHAR_TO_BYTE[c] for c in token) for token in library.encode(text).tokens]


FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
# Characters assigned in this Python's Unicode database. The two regex engines (Python's `regex`,
# the Rust crate inside `tokenizers`) ship different Unicode versions: a character assigned only in
# the newer one is a letter for one and "unassigned" for the other, so the word splits differ.
ASSIGNED_TEXT = st.text(st.characters(exclude_categories=("Cn", "Cs")))


# --- from-scratch BPE ------------------------------------------------------------------------------

def test_corpus_is_small_and_documented():
    assert 50_000 < tokenization.CORPUS_PATH.stat().st_size < 200_000
    assert tokenization.CORPUS_PATH.name.startswith("tok_")


def test_training_learns_the_most_frequent_pair_first():
    bpe = tokenization.BPE.train("ab ab ab cd", vocab_size=257)
    assert bpe.merge_list() == [(b"a", b"b")] and bpe.encode("ab") == [256]
    assert len(bpe) == 257


def test_training_stops_when_nothing_is_left_to_merge():
    bpe = tokenization.BPE.train("aa", vocab_size=300)
    assert bpe.merge_list() == [(b"a", b"a")]


def test_same_merges_as_tokenizers_on_the_corpus(bpe, library):
    assert len(bpe.merges) == VOCAB - 256
    assert bpe.merge_list() == tokenization.library_merges(library)


@FIXTURES
@given(st.text(st.characters(exclude_categories=("Cn", "Cs")), max_size=300))
def test_same_merges_as_tokenizers_on_any_text(text):
    # small random texts are full of ties between equally frequent pairs: the tie rule must match too
    assert tokenization.BPE.train(text, 280).merge_list() == \
        tokenization.library_merges(tokenization.library_bpe(text, 280))


@FIXTURES
@given(st.text())
def test_round_trips_any_unicode_string(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@FIXTURES
@given(ASSIGNED_TEXT)
def test_same_encoding_as_tokenizers(bpe, library, text):
    assert [bpe.vocab[i] for i in bpe.encode(text)] == library_token_bytes(library, text)


def test_decode_replaces_a_broken_character(bpe):
    llama = bpe.encode("🦙")
    assert bpe.decode(llama) == "🦙" and bpe.decode(llama[:1]) == "\ufffd"


# --- the real merges: SmolLM2's tokenizer in the from-scratch BPE ---------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return models.load_model("smollm2-135m")[1]


@pytest.fixture(scope="module")
def real_bpe(smollm2_tokenizer):
    return tokenization.BPE.from_tokenizer(smollm2_tokenizer)


def test_real_merges_give_the_real_ids_special_tokens_included(smollm2_tokenizer, real_bpe):
    chat_text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": tokenization.MIXED_TEXT}], tokenize=False, add_generation_prompt=True)
    for text in (tokenization.MIXED_TEXT, chat_text, *tokenization.SAMPLES.values()):
        ids = smollm2_tokenizer(text)["input_ids"]
        assert real_bpe.encode(text) == ids
        assert real_bpe.decode(ids) == text
    assert real_bpe.encode("<|im_start|>")[0] == smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(real_bpe) == len(smollm2_tokenizer)


def test_the_split_pattern_is_the_real_pre_tokenizer(smollm2_tokenizer, real_bpe):
    pre = smollm2_tokenizer.backend_tokenizer.pre_tokenizer
    chunks = [text for text, _ in pre.pre_tokenize_str(tokenization.MIXED_TEXT)]
    assert [tokenization.show_bytes(bytes(tokenization.CHAR_TO_BYTE[c] for c in chunk)) for chunk in chunks] \
        == [tokenization.show_bytes(c.encode()) for c in real_bpe.pattern.findall(tokenization.MIXED_TEXT)]


@FIXTURES
@given(ASSIGNED_TEXT)
def test_real_merges_agree_on_any_text(smollm2_tokenizer, real_bpe, text):
    assert real_bpe.encode(text) == smollm2_tokenizer(text)["input_ids"]


def test_bytes_without_a_token_are_dropped_like_the_real_tokenizer(smollm2_tokenizer, real_bpe):
    assert real_bpe.byte_ids[0x04] is None
    assert real_bpe.encode("a\x04b") == smollm2_tokenizer("a\x04b")["input_ids"]


def test_from_tokenizer_refuses_a_sentencepiece_tokenizer(llama_style):
    with pytest.raises(tokenization.InvalidSettingError, match="byte-level BPE"):
        tokenization.BPE.from_tokenizer(llama_style)


# --- Llama 2's SentencePiece recipe ----------------------------------------------------------------

def test_trained_model_has_the_llama2_settings(sp):
    # The values printed by `print(proto.trainer_spec)` for Llama 2's own tokenizer.model.
    proto = tokenization.model_proto(sp)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert trainer.model_type == trainer.BPE
    assert trainer.split_digits and trainer.byte_fallback and trainer.allow_whitespace_only_pieces
    assert trainer.split_by_unicode_script and trainer.split_by_number and trainer.split_by_whitespace
    assert not trainer.treat_whitespace_as_suffix
    assert trainer.character_coverage == pytest.approx(0.99995)
    assert trainer.max_sentencepiece_length == 16
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (0, 1, 2, -1)
    assert (trainer.unk_piece, trainer.bos_piece, trainer.eos_piece) == ("<unk>", "<s>", "</s>")
    assert normalizer.name == "identity" and normalizer.add_dummy_prefix
    assert not normalizer.remove_extra_whitespaces and normalizer.precompiled_charsmap == b""
    assert trainer.vocab_size == sp.get_piece_size() == 1000


def test_pieces_are_laid_out_like_llama2(sp):
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 13, 258)] == \
        ["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"]


def test_recipe_effects(sp):
    assert sp.encode("x 90210", out_type=str)[-5:] == ["9", "0", "2", "1", "0"]  # digits split
    assert sp.encode("🦙", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # byte fallback
    assert sp.encode("Hello", out_type=str)[0].startswith("▁")  # dummy prefix
    assert "▁▁▁▁" in sp.encode("    return", out_type=str)  # whitespace-only piece
    assert sp.decode(sp.encode("ﬁne  Ⅻ")) == "ﬁne  Ⅻ"  # identity normalization: no NFKC, spaces kept


# "▁" (U+2581) is SentencePiece's own mark for a space: in the input it decodes back as " ",
# with Llama 2's real tokenizer too. Any other text comes back unchanged.
NO_SPACE_MARK = st.characters(codec="utf-8", exclude_characters="▁")


@FIXTURES
@given(st.text(NO_SPACE_MARK))
def test_sentencepiece_round_trips_without_unk(sp, text):
    ids = sp.encode(text)
    assert sp.unk_id() not in ids and sp.decode(ids) == text


@FIXTURES
@given(st.text(st.characters(codec="utf-8", exclude_characters="▁<>")))  # "<s>" is special in transformers
def test_transformers_wrapper_agrees_with_sentencepiece(sp, llama_style, text):
    assert llama_style(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    assert llama_style.decode(llama_style(text).input_ids, skip_special_tokens=True) == text


def test_llama2_tokenizer_offline_says_so_in_one_line(capsys):
    assert tokenization.load_llama2_tokenizer() is None  # tests run with HF_HUB_OFFLINE=1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "not available" in out


# --- looking at tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Hello, llamas 🦙!", "naïve\n\tcode = 12345", ""])
def test_token_bytes_cover_the_text(bpe, sp, llama_style, text):
    raw = text.encode("utf-8")
    assert b"".join(b for _, b in tokenization.token_bytes(bpe, text)) == raw
    assert b"".join(b for _, b in tokenization.token_bytes(models.tiny_tokenizer(), text)) == raw
    prefixed = b" " + raw if text else b""  # SentencePiece's dummy prefix
    assert b"".join(b for _, b in tokenization.token_bytes(sp, text)) == prefixed
    assert tokenization.token_bytes(llama_style, text) == tokenization.token_bytes(sp, text)


def test_token_labels_show_each_token_as_its_bytes(bpe, sp, llama_style):
    text = "Hi llamas,\n  🦙"
    for tok in (bpe, sp, llama_style, models.tiny_tokenizer()):
        ids = [i for i, _ in tokenization.token_bytes(tok, text)]
        labels = tokenization.token_labels(tok, ids)
        assert labels == [tokenization.show_bytes(b) for _, b in tokenization.token_bytes(tok, text)]
        assert " " not in "".join(labels) and "\n" not in "".join(labels)
    assert tokenization.token_labels(llama_style, [llama_style.bos_token_id]) == ["<s>"]


def test_tokens_html(bpe):
    text = "if a < b:\n    🦙"
    pieces = tokenization.token_bytes(bpe, text)
    page = tokenization.tokens_html(bpe, text)
    assert page.count("<span") == len(pieces) and f"{len(pieces)} tokens" in page
    assert "&lt;" in page and "<b" not in page.replace("<br", "")  # the text is escaped
    assert all(f'title="id {i}"' in page for i, _ in pieces)
    assert "<sub" not in tokenization.tokens_html(bpe, text, show_ids=False)


def test_tokens_per_word():
    no_merges = tokenization.BPE({})
    assert tokenization.tokens_per_word(no_merges, "a b c") == 5 / 3  # 5 bytes, 3 words


def test_token_explorer_follows_the_text_and_the_choice(bpe, sp):
    explorer = widgets.token_explorer({"bpe": bpe, "sp": sp}, text="llamas")
    choice, box, view, counts = explorer.children
    assert view.value == tokenization.tokens_html(bpe, "llamas")
    box.value = "12345"
    assert view.value == tokenization.tokens_html(bpe, "12345")
    choice.value = "sp"
    assert view.value == tokenization.tokens_html(sp, "12345")
    assert f"<b>sp</b> {tokenization.count_tokens(sp, '12345')}" in counts.value


# --- exercises ---------------------------------------------------------------------------------------


def test_check_count_pairs(verdicts):
    assert checks.check_count_pairs(tokenization.get_stats)
    verdicts(checks.check_count_pairs, solutions.count_pairs,
             (lambda ids: dict(Counter(zip(ids[::2], ids[1::2], strict=False))), "pairs overlap"),
             (lambda ids: dict.fromkeys(pairwise(ids), 1), "the wrong counts"))  # no counting


def test_check_apply_merge(verdicts):
    assert checks.check_apply_merge(tokenization.merge)

    def right_to_left(ids, pair, new_id):
        return solutions.apply_merge(ids[::-1], pair[::-1], new_id)[::-1]

    verdicts(checks.check_apply_merge, solutions.apply_merge,
             (right_to_left, "read left to right"),  # [7, 7, 7] -> [7, 9]
             (lambda ids, pair, new_id: [i for i in ids if i not in pair], "new_id never appears"))


def test_check_lost_characters(verdicts):
    def with_bos(tokenizer, text):
        return [c for c in dict.fromkeys(text) if tokenizer.decode(tokenizer.encode(c)) != c]

    def every_occurrence(tokenizer, text):
        return [c for c in text if c in solutions.lost_characters(tokenizer, text)]

    def sorted_by_code_point(tokenizer, text):
        return sorted(solutions.lost_characters(tokenizer, text))

    verdicts(checks.check_lost_characters, solutions.lost_characters,
             (with_bos, "add_special_tokens=False"), (every_occurrence, "more than once"),
             (sorted_by_code_point, "wrong order"))


def test_lost_characters_on_the_notebooks_tokenizers(smollm2_tokenizer, sp, corpus):
    plain = tokenization.to_transformers(tokenization.train_sentencepiece(corpus, 2000, byte_fallback=False))
    assert solutions.lost_characters(plain, "I 🦙 Quetzalcoatl") == ["🦙", "Q"]
    assert solutions.lost_characters(tokenization.to_transformers(sp), "I 🦙 Quetzalcoatl") == []
    assert solutions.lost_characters(smollm2_tokenizer, "a\x04b\x05🦙") == ["\x04"]  # byte 4 has no token


def test_check_prompt_cost_ratio(verdicts):
    def inverted(tokenizer, english, portuguese):
        return 1 / solutions.prompt_cost_ratio(tokenizer, english, portuguese)

    def characters(tokenizer, english, portuguese):
        return len(portuguese) / len(english)

    def content_only(tokenizer, english, portuguese):
        count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        return count(portuguese) / count(english)

    verdicts(checks.check_prompt_cost_ratio, solutions.prompt_cost_ratio,
             (inverted, "upside down"), (characters, "ratio of characters"),
             (content_only, "chat format too"))
