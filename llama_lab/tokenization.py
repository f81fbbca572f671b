"""Tokenization: text -> UTF-8 bytes -> token ids, the way Llama 2 does it.

Three tokenizers, from the inside out:

* `BPE`: byte-pair encoding written from scratch (minbpe style) on UTF-8 bytes,
  checked merge for merge against the `tokenizers` library (`library_bpe`);
  `BPE.from_tokenizer` loads SmolLM2's real merges into it, and it gives the real ids.
* `train_sentencepiece`: Llama 2's recipe (`LLAMA2_SPM_SETTINGS`) with
  `sentencepiece`, on a small corpus; `to_transformers` wraps it like
  meta-llama's own `tokenizer.json`.
* the real ones: SmolLM2's byte-level BPE (`lab.load_model()`), and Llama 2's
  from the Hub when it can be reached (`load_llama2_tokenizer`).

Tokens are shown one way everywhere, spaces as "▁" and newlines as "↵" (`show_bytes`,
`token_labels`: plots, attention maps, `tokens_html`). Chat formats live in `llama_lab.chat`.

>>> bpe = BPE.train("low lower lowest", vocab_size=258)
>>> [bpe.vocab[i] for i in bpe.encode("lowest")]
[b'low', b'e', b's', b't']
>>> bpe.decode(bpe.encode("naïve 🦙"))
'naïve 🦙'
"""

from __future__ import annotations

import html
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode, generate_merges

from llama_lab import chat
from llama_lab.errors import InvalidSettingError

# The training text: 64 sections of "The Python Language Reference" as shipped inside CPython 3.11
# (the stdlib module pydoc_data.topics, the topics up to 8,000 characters each, in alphabetical
# order, lines of only "*", "-", "=" decorations removed), (c) Python Software Foundation, PSF
# License Version 2. English prose with Python code.
CORPUS_PATH = Path(__file__).parent / "data" / "tok_corpus.txt"


def load_corpus() -> str:
    """The small training corpus (about 130 KB of English prose and Python code)."""
    return CORPUS_PATH.read_text(encoding="utf-8")


# --- byte-pair encoding from scratch -------------------------------------------------------------

# GPT-2's pre-tokenizer: split text into words, numbers, punctuation runs and spaces, so that no
# token crosses a word boundary. The `tokenizers` ByteLevel pre-tokenizer uses the same pattern.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2 shows each byte as a printable character ("Ġ" is the space byte 0x20); `tokenizers`
# lists the 256 bytes in the order of those characters, which decides ties between pairs.
BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
_BYTE_RANK = {b: rank for rank, b in enumerate(sorted(BYTE_TO_CHAR, key=BYTE_TO_CHAR.get))}


def get_stats(ids: list[int], counts: dict[tuple[int, int], int] | None = None,
              weight: int = 1) -> dict[tuple[int, int], int]:
    """Count adjacent pairs of ids (adding `weight` per pair to `counts` when given).

    >>> get_stats([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` (left to right) by the new id `idx`.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    """
    out, i = [], 0
    while i < len(ids):
        if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _tie_break_key(pair: tuple[int, int]) -> tuple[int, int]:
    """Between pairs of equal count `tokenizers` takes the one of smallest ids in ITS
    vocabulary: bytes in GPT-2 character order, then merged tokens in creation order."""
    return tuple(_BYTE_RANK.get(i, i) for i in pair)


class BPE:
    """A byte-level BPE tokenizer. Trained here (`train`): ids 0-255 are the bytes, id 256 + k the
    k-th merge. Loaded from a real tokenizer (`from_tokenizer`): its own ids and special tokens."""

    def __init__(self, merges: dict[tuple[int, int], int], pattern: str = GPT2_SPLIT_PATTERN,
                 byte_ids: list[int | None] | None = None, special_tokens: dict[str, int] | None = None):
        self.merges = merges  # (id, id) -> new id, in the order they were learnt
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # earlier merges apply first
        self.byte_ids = list(range(256)) if byte_ids is None else byte_ids  # byte -> id (None: no token)
        self.special_tokens = special_tokens or {}  # text -> id, matched before anything else
        self.pattern = regex.compile(pattern)
        self.vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids) if i is not None}
        for (a, b), idx in merges.items():
            self.vocab[idx] = self.vocab[a] + self.vocab[b]
        self.vocab.update({idx: text.encode("utf-8") for text, idx in self.special_tokens.items()})
        longest_first = "|".join(map(regex.escape, sorted(self.special_tokens, key=len, reverse=True)))
        self._special = regex.compile(f"({longest_first})") if self.special_tokens else None

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT2_SPLIT_PATTERN) -> BPE:
        """Learn `vocab_size - 256` merges: repeatedly merge the most frequent adjacent pair.

        The text is first cut into chunks by `pattern`, so no pair spans two chunks. Pairs
        are counted once per distinct chunk, weighted by how often it occurs: the same
        counts as chunk by chunk over the whole text, many times faster.
        """
        chunks = Counter(regex.findall(pattern, text))
        words = [(list(chunk.encode("utf-8")), count) for chunk, count in chunks.items()]
        merges = {}
        for idx in range(256, vocab_size):
            stats = {}
            for ids, count in words:
                get_stats(ids, stats, count)
            if not stats:
                break  # every chunk is a single token already
            top = max(stats.values())  # the most frequent pair; ties as `tokenizers` breaks them
            pair = min((p for p, n in stats.items() if n == top), key=_tie_break_key)
            # (`pair[0] in ids` is a quick test that skips the chunks without the pair)
            words = [(merge(ids, pair, idx) if pair[0] in ids else ids, count) for ids, count in words]
            merges[pair] = idx
        return cls(merges, pattern)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> BPE:
        """The merges, byte ids and special tokens of a real byte-level BPE (a transformers tokenizer
        such as SmolLM2's, or a `tokenizers.Tokenizer`), in this class: `encode` then gives exactly
        the real tokenizer's ids (minbpe's proof that the few lines here are the production algorithm).

        A byte the vocabulary lacks (SmolLM2 has no token for 21 of the 256, most never found in
        UTF-8 text) is dropped, as the real tokenizer drops it.
        """
        spec = json.loads(getattr(tokenizer, "backend_tokenizer", tokenizer).to_str())
        model, pre = spec["model"], spec["pre_tokenizer"] or {}
        if model["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex") \
                or spec["normalizer"] is not None:
            raise InvalidSettingError(
                "from_tokenizer reads byte-level BPE tokenizers with GPT-2's split pattern (GPT-2, SmolLM2); "
                f"this one has a {model['type']} model, pre-tokenizer {pre.get('type')} and normalizer "
                f"{(spec['normalizer'] or {}).get('type')}. Use the tokenizer itself.")
        vocab = model["vocab"]
        pairs = (m.split(" ") if isinstance(m, str) else m for m in model["merges"])  # both file layouts
        merges = {(vocab[a], vocab[b]): vocab[a + b] for a, b in pairs}
        byte_ids = [vocab.get(BYTE_TO_CHAR[b]) for b in range(256)]
        special = {token["content"]: token["id"] for token in spec["added_tokens"]}
        return cls(merges, GPT2_SPLIT_PATTERN, byte_ids, special)

    def encode(self, text: str) -> list[int]:
        """Text -> ids: special tokens first, each one id; between them, split into chunks by the
        pattern, then in each chunk apply the merges, earliest first."""
        ids = []
        for part in self._special.split(text) if self._special else [text]:
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
                continue
            for chunk in self.pattern.findall(part):
                ids.extend(self._merge_chunk([self.byte_ids[b] for b in chunk.encode("utf-8")
                                              if self.byte_ids[b] is not None]))
        return ids

    def _merge_chunk(self, ids: list[int]) -> list[int]:
        while len(ids) >= 2:
            pair = min(get_stats(ids), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break  # nothing left to merge
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 become "�" (U+FFFD)."""
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def merge_list(self) -> list[tuple[bytes, bytes]]:
        """The merges in order, as pairs of byte strings (to compare with other tokenizers)."""
        return [(self.vocab[a], self.vocab[b]) for a, b in self.merges]


def library_bpe(text: str, vocab_size: int) -> Tokenizer:
    """The same byte-level BPE trained by the `tokenizers` library (Rust), to check `BPE` against."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 regex, then bytes
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def library_merges(tokenizer: Tokenizer) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level `tokenizers` BPE, in order, as pairs of byte strings."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(bytes(CHAR_TO_BYTE[c] for c in side) for side in pair) for pair in merges]


# --- Llama 2's SentencePiece recipe --------------------------------------------------------------

# The settings stored in Llama 2's tokenizer.model (its `trainer_spec` and `normalizer_spec`),
# except vocab_size: 32,000 there, a few hundred here, and the input/threads settings.
LLAMA2_SPM_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    split_digits=True,  # "2024" -> "2" "0" "2" "4": numbers are read digit by digit
    byte_fallback=True,  # a character outside the vocabulary -> its UTF-8 bytes <0x..>, never <unk>
    add_dummy_prefix=True,  # "Hello" is encoded as " Hello": the "▁" in front of the first word
    normalization_rule_name="identity",  # no Unicode normalization: the text is kept as typed
    remove_extra_whitespaces=False,  # keep runs of spaces (indentation in code)
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" can be one piece
    split_by_unicode_script=True, split_by_number=True, split_by_whitespace=True,
    character_coverage=0.99995, max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # <unk> <s> </s>, no padding piece
)


def train_sentencepiece(text: str, vocab_size: int = 1000, **overrides: Any) -> spm.SentencePieceProcessor:
    """Train a Llama-2-style SentencePiece BPE on `text`, in memory (no files written).

    Each line is one training sentence; newlines themselves become the byte piece <0x0A>,
    as in Llama 2.
    """
    model = io.BytesIO()
    settings = {**LLAMA2_SPM_SETTINGS, "vocab_size": vocab_size, "num_threads": 1, "minloglevel": 2,
                **overrides}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, **settings)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def model_proto(sp: spm.SentencePieceProcessor):
    """The settings and pieces inside a SentencePiece model (`.trainer_spec`, `.normalizer_spec`),
    as `print(model_proto(sp).trainer_spec)` shows them for Llama 2's tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def to_transformers(sp: spm.SentencePieceProcessor) -> PreTrainedTokenizerFast:
    """Wrap a Llama-2-style SentencePiece model as a transformers tokenizer, built like
    meta-llama's tokenizer.json (prepend "▁", spaces -> "▁", BPE with byte fallback, a BOS),
    with Llama-2-chat's chat template (`llama_lab.chat.LLAMA2_CHAT_TEMPLATE`)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", sp.bos_id())])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = chat.LLAMA2_CHAT_TEMPLATE
    return tokenizer


LLAMA2_HUB_ID = "meta-llama/Llama-2-13b-hf"


def load_llama2_tokenizer(hub_id: str = LLAMA2_HUB_ID) -> PreTrainedTokenizerBase | None:
    """Llama 2's real tokenizer from the Hub, or None (with one line saying why) when the Hub
    cannot be reached or this account has not been granted access to the gated repository."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        cause = type(err.__cause__ or err).__name__
        print(f"The real Llama 2 tokenizer ({hub_id}) is not available here ({cause}: offline or no "
              "access); we go on with the Llama-2-style tokenizer trained above.")
        return None


# --- looking at tokens ---------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    if byte_level and all(c in CHAR_TO_BYTE for c in piece):
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    return piece.replace("▁", " ").encode("utf-8")


def token_bytes(tokenizer: Any, text: str) -> list[tuple[int, bytes]]:
    """(id, bytes) of each token of `text`, without special tokens, for any tokenizer here:
    `BPE`, a SentencePiece processor, or a transformers tokenizer.

    A token's bytes can be part of a character (an emoji is 4 bytes, maybe 4 tokens).
    """
    if isinstance(tokenizer, (BPE, spm.SentencePieceProcessor)):
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(zip(ids, _ids_bytes(tokenizer, ids), strict=True))


def _ids_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The bytes of each token id, for any tokenizer `token_bytes` accepts."""
    if isinstance(tokenizer, BPE):
        return [tokenizer.vocab[i] for i in ids]
    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return [_piece_bytes(tokenizer.id_to_piece(i), False) for i in ids]
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    return [_piece_bytes(piece, byte_level) for piece in tokenizer.convert_ids_to_tokens(ids)]


def show_bytes(piece: bytes) -> str:
    """How a token looks: its text, with spaces as "▁" and newlines as "↵"; bytes that are
    not a whole UTF-8 character as hex.

    >>> show_bytes(b" the"), show_bytes("🦙".encode()[:2]), show_bytes(b"\\n")
    ('▁the', '\\\\xf0\\\\x9f', '↵')
    """
    text = piece.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "▁").replace("\n", "↵")


def token_labels(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Labels for token ids, as `show_bytes` shows them: for plot ticks and attention views.

    >>> from llama_lab.models import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> token_labels(tok, tok("a b\\n").input_ids)
    ['a', '▁', 'b', '↵']
    """
    return [show_bytes(piece) for piece in _ids_bytes(tokenizer, [int(i) for i in ids])]


# The same short text in English and in Portuguese (written for this project), and Python code,
# to compare what a language costs in tokens.
SAMPLES = {
    "English": (
        "The llama lives in the high mountains of South America. It carries loads for farmers, gives "
        "soft wool, and walks for hours without water. Families who keep llamas say that each animal "
        "has its own character: some are calm and curious, others are stubborn and refuse to move "
        "when they feel that the load is too heavy."),
    "Portuguese": (
        "A lhama vive nas altas montanhas da América do Sul. Ela carrega cargas para os agricultores, "
        "dá uma lã macia e caminha durante horas sem beber água. As famílias que criam lhamas dizem "
        "que cada animal tem o seu próprio caráter: algumas são calmas e curiosas, outras são teimosas "
        "e recusam-se a andar quando sentem que a carga é pesada demais."),
    "Python code": (
        "def mean_and_variance(values: list[float]) -> tuple[float, float]:\n"
        '    """Return the mean and the variance of a list of numbers."""\n'
        "    n = len(values)\n"
        "    mean = sum(values) / n\n"
        "    variance = sum((x - mean) ** 2 for x in values) / n\n"
        "    return mean, variance\n"),
}


# A bit of everything a real tokenizer meets, to compare two tokenizers on: English, Portuguese,
# code with indentation, emoji (one is four bytes, the family one 25), numbers, runs of spaces.
MIXED_TEXT = (
    "The llama 🦙 carries 12 kg for 3.5 hours; a lhama não bebe água durante horas!\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 👨‍👩‍👧 it's 2024\n"
    "  Preços: R$ 1.234,56  vs  $99.99...\t\n\n"
)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of `text` (no BOS/EOS) for any tokenizer `token_bytes` accepts."""
    return len(token_bytes(tokenizer, text))


def tokens_per_word(tokenizer: Any, text: str) -> float:
    """Tokens per whitespace-separated word: 1.0 would be one token for every word."""
    return count_tokens(tokenizer, text) / len(text.split())


# Pastel colours, one per token, repeating (like the OpenAI and tiktokenizer playgrounds).
TOKEN_COLOURS = ("#fde2e4", "#cde7f0", "#d7f0d2", "#fff1c1", "#e5d9f2", "#ffd9b3", "#d4f1ee")


def tokens_html(tokenizer: Any, text: str, show_ids: bool = True) -> str:
    """HTML of `text` cut into coloured tokens, each with its id underneath, and the counts.

    >>> bpe = BPE.train("ab ab ab", vocab_size=257)
    >>> page = tokens_html(bpe, "ab<")
    >>> page.count("<span"), "ab<sub" in page, "&lt;" in page, "2 tokens" in page
    (2, True, True, True)
    """
    spans = []
    pieces = token_bytes(tokenizer, text)
    for k, (i, piece) in enumerate(pieces):
        label = f"<sub style='color: #666'>{i}</sub>" if show_ids else ""
        spans.append(f'<span title="id {i}" style="background: {TOKEN_COLOURS[k % len(TOKEN_COLOURS)]}; '
                     f'padding: 2px 1px; margin: 1px; border-radius: 3px; white-space: pre-wrap">'
                     f"{html.escape(show_bytes(piece))}{label}</span>")
    counts = (f"<p>{len(pieces)} tokens · {len(text)} characters · {len(text.encode('utf-8'))} bytes · "
              f"{len(text.split())} words</p>")
    row = "display: flex; flex-wrap: wrap; align-items: baseline; overflow-wrap: anywhere"  # wraps in its box
    return f'<div style="font-family: monospace; line-height: 2.4; {row}">{"".join(spans)}</div>{counts}'
