"""Choosing the next token: logits transforms, a generate loop with a KV cache, batches, beams,
chat replies, streaming.

A language model gives one score (logit) per vocabulary entry for the next
token. Decoding turns those scores into a choice, one token at a time:

* greedy: take the highest score;
* sampling: turn the scores into probabilities (softmax) and draw one, after
  reshaping them with `temperature`, and cutting the unlikely tail with
  `top_k`, `top_p` or `min_p`; `repetition_penalty` makes tokens already in the
  text less likely (in greedy decoding too).

Each transform returns new logits with the removed entries at -inf, and gives
exactly what the transformers warper of the same name gives (ties and entries
that were -inf already included):

>>> import torch
>>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
>>> top_k(logits, 2)
tensor([[2., 1., -inf, -inf]])
>>> top_p(logits, 0.9)  # probabilities .64 .24 .09 .03: the first three reach 0.9
tensor([[2., 1., 0., -inf]])
>>> min_p(logits, 0.2)  # keep tokens with at least 0.2 x the top probability
tensor([[2., 1., -inf, -inf]])

`SamplingSettings` holds every setting of a decode run, checked once when it is
made; `generate` runs the decode loop with them on a transformers model or on
the from-scratch model of `llama_lab.scratch`, with or without a KV cache;
`generate_batch` runs prompts of different lengths together (left padding, an attention mask);
`beam_search` keeps several continuations; `chat` answers a conversation in the chat format;
`stream` yields the text as it is produced. `next_token_logits` and
`plot_distribution` show the distribution the transforms reshape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llama_lab import scratch, tokenization
from llama_lab.errors import ContextLengthError, InvalidSettingError

NEG_INF = float("-inf")


# --- the next-token distribution -----------------------------------------------------------------

def next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """The model's logits (vocab,) for the token that follows `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(ids).logits[0, -1].float()


def plot_distribution(logits: torch.Tensor, tokenizer, filtered: torch.Tensor | None = None, k: int = 20,
                      title: str = "next-token probabilities", ax=None):
    """Bar plot of the `k` most likely next tokens. With `filtered` (the logits after a
    transform), grey bars are the original probabilities and blue bars the probabilities
    sampling uses after the transform (removed tokens have none)."""
    import matplotlib.pyplot as plt  # here, not at the top: generate and stream draw nothing

    ax = ax or plt.subplots(figsize=(7, 3))[1]
    probs = logits.softmax(-1)
    top = probs.topk(k).indices
    positions = range(k)
    if filtered is None:
        ax.bar(positions, probs[top], color="tab:blue")
    else:
        kept = filtered.softmax(-1)
        ax.bar(positions, probs[top], color="lightgrey", label="before")
        ax.bar(positions, kept[top], width=0.5, color="tab:blue", label="after")
        ax.legend(loc="upper right", fontsize=8)
        title += f": {int(filtered.isfinite().sum())} tokens left"
    labels = tokenization.token_labels(tokenizer, top.tolist())
    ax.set_xticks(list(positions), labels, rotation=60, fontsize=8)
    ax.set_ylabel("probability")
    ax.set_title(title, fontsize=10)
    return ax


# --- logits transforms ---------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each setting: (is it valid?, the valid range in words).
_RULES = {
    "max_new_tokens": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "temperature": (lambda v: _is_number(v) and v > 0,
                    "a number > 0 (for always the most likely token, use do_sample=False)"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer >= 1"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0,
                           "a number > 0 (1 means no penalty, 1.1-1.3 is usual)"),
}


def check_setting(name: str, value: Any) -> None:
    """Raise `InvalidSettingError` naming the valid range when `value` is not valid for `name`.

    >>> check_setting("top_p", 1.5)
    Traceback (most recent call last):
    ...
    llama_lab.errors.InvalidSettingError: top_p=1.5 is invalid: top_p must be a number between 0 and 1.
    """
    is_valid, valid_range = _RULES[name]
    if not is_valid(value):
        raise InvalidSettingError(f"{name}={value!r} is invalid: {name} must be {valid_range}.")


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Divide the logits by `t`: t < 1 sharpens the distribution, t > 1 flattens it.

    >>> temperature(torch.tensor([2.0, 1.0]), 0.5)
    tensor([4., 2.])
    """
    check_setting("temperature", t)
    return logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` highest logits (and any tied with the k-th), set the rest to -inf."""
    check_setting("top_k", k)
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities
    add up to at least `p` (the most likely token is always kept)."""
    check_setting("top_p", p)
    sorted_logits, order = torch.sort(logits, descending=False)  # least likely first
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p  # the tail that holds at most 1 - p of the probability
    remove[..., -1] = False  # never remove the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least `p` times the top token's."""
    check_setting("min_p", p)
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # never remove the most likely token
    return logits.masked_fill(remove, NEG_INF)


def repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token that appears in `input_ids` less likely (penalty > 1) or more
    likely (penalty < 1): its logit is divided by `penalty` if positive, multiplied if negative.

    >>> repetition_penalty(torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[0, 1, 1]]), 2.0)
    tensor([[ 1., -2.,  3.]])
    """
    check_setting("repetition_penalty", penalty)
    seen = torch.gather(logits, -1, input_ids)
    penalized = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, input_ids, penalized)


@dataclass(frozen=True)
class SamplingSettings:
    """Every setting of one decode run, checked once, when it is made (like transformers'
    `GenerationConfig`): a value out of range raises `InvalidSettingError` before the model runs.
    `generate` documents what each one does.

    >>> SamplingSettings(12, do_sample=True, top_p=0.9).top_p
    0.9
    >>> SamplingSettings(12, top_k=0)
    Traceback (most recent call last):
    ...
    llama_lab.errors.InvalidSettingError: top_k=0 is invalid: top_k must be an integer >= 1.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    use_cache: bool = True
    generator: torch.Generator | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in _RULES:
            if (value := getattr(self, name)) is not None:
                check_setting(name, value)


def process_logits(logits: torch.Tensor, input_ids: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Apply the transforms in transformers' order: the penalty (greedy or sampled), then,
    when sampling only, temperature, top-k, top-p, min-p. Settings that change nothing are skipped."""
    if settings.repetition_penalty is not None and settings.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, input_ids, settings.repetition_penalty)
    if not settings.do_sample:
        return logits
    if settings.temperature != 1.0:
        logits = temperature(logits, settings.temperature)
    if settings.top_k is not None:
        logits = top_k(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1.0:
        logits = top_p(logits, settings.top_p)
    if settings.min_p is not None:
        logits = min_p(logits, settings.min_p)
    return logits


def next_token(logits: torch.Tensor, do_sample: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from processed logits: the argmax, or a draw from the softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


# --- the decode loop -----------------------------------------------------------------------------

class _Decoder:
    """One call for both kinds of model: feed the new tokens, get the last position's
    logits (float32). With a KV cache only the new tokens run; without one, the whole text."""

    def __init__(self, model, use_cache: bool, batch_size: int, max_len: int,
                 mask: torch.Tensor | None = None):
        self.model, self.use_cache = model, use_cache
        self.mask, self.steps = mask, 0  # a left-padded batch's attention mask, grown by one each step
        self.is_scratch = isinstance(model, scratch.Llama)
        self.cache = None
        if use_cache and self.is_scratch:
            self.cache = model.new_cache(batch_size, max_len)
        elif use_cache:
            from transformers import DynamicCache
            self.cache = DynamicCache(config=model.config)
        self.ids: torch.Tensor | None = None  # the whole text so far, for runs without a cache

    @torch.inference_mode()
    def __call__(self, new_ids: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:  # no memory of the past: run the whole text again
            self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=-1)
            new_ids = self.ids
        if self.is_scratch:
            return self.model(new_ids, cache=self.cache)[:, -1].float()
        padding = {}
        if self.mask is not None:  # padding is not attended to, and positions count the real tokens only
            if self.steps:
                self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=-1)
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            padding = {"attention_mask": self.mask, "position_ids": positions[:, -new_ids.shape[1]:]}
        self.steps += 1
        return self.model(input_ids=new_ids, cache=self.cache, use_cache=self.use_cache, logits_to_keep=1,
                          **padding).logits[:, -1].float()


def context_length(model) -> int:
    """How many tokens the model can attend to: a transformers model's `max_position_embeddings`,
    a from-scratch model's `max_seq_len`."""
    if isinstance(model, scratch.Llama):
        return model.config.max_seq_len
    return model.config.max_position_embeddings


def _eos_ids(model, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """The end-of-sequence ids: the argument, else the model's own (generation) config's."""
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    ids = [] if eos_token_id is None else eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def check_input_ids(model, input_ids: Any) -> None:
    """Raise `InvalidSettingError` saying what to pass when `input_ids` is not a (batch, tokens)
    tensor of integer ids of this model's vocabulary with at least one token per prompt.

    >>> from llama_lab import load_model
    >>> check_input_ids(load_model("tiny-random")[0], torch.tensor([1.0, 2.0]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llama_lab.errors.InvalidSettingError: input_ids must have shape (batch, tokens), got (2,): ...
    """
    how = "use tokenizer(text, return_tensors='pt').input_ids"
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidSettingError("input_ids must be a torch.Tensor of token ids, got "
                                  f"{type(input_ids).__name__}: {how}.")
    if input_ids.dim() != 2:
        raise InvalidSettingError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}: "
                                  f"{how} (for one prompt of shape (n,), pass ids[None]).")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InvalidSettingError("input_ids must hold integer token ids (torch.long), got "
                                  f"{input_ids.dtype}: {how}, or ids.long().")
    if input_ids.numel() == 0:
        raise InvalidSettingError(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)}): "
                                  "give at least one token per prompt, for example the tokenizer's "
                                  "bos_token_id.")
    vocab = model.config.vocab_size
    outside = input_ids[(input_ids < 0) | (input_ids >= vocab)]
    if len(outside):
        raise InvalidSettingError(f"input_ids holds {outside.unique()[:5].tolist()}, outside the model's "
                                  f"vocabulary (ids 0 to {vocab - 1}): encode the text with this model's "
                                  "own tokenizer.")


def check_attention_mask(model, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of a left-padded batch (1 for a token, 0 for padding on the left), or None when
    nothing is padded; `InvalidSettingError` saying what to pass for anything else."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if attention_mask.shape != input_ids.shape:
        raise InvalidSettingError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                  f"{tuple(input_ids.shape)}: pass the mask the tokenizer returned.")
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        raise InvalidSettingError("attention_mask pads on the right: the new tokens must follow each "
                                  "prompt's last token, so pad on the left (padding_side='left').")
    if isinstance(model, scratch.Llama):
        raise InvalidSettingError("a padded batch needs a transformers model (the from-scratch model has no "
                                  "attention mask): generate each prompt alone.")
    return mask


def generate_tokens(model, input_ids: torch.Tensor, settings: SamplingSettings,
                    attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Check the prompt now, then iterate over the next token of every row, `(batch,)`,
    one step at a time (see `generate`)."""
    check_input_ids(model, input_ids)
    mask = check_attention_mask(model, input_ids, attention_mask)
    context = context_length(model)
    if input_ids.shape[1] > context:
        raise ContextLengthError(input_ids.shape[1], context)
    max_new_tokens = min(settings.max_new_tokens, context - input_ids.shape[1])  # it cannot see further
    eos = _eos_ids(model, settings.eos_token_id).to(input_ids.device)
    return _decode_loop(model, input_ids, max_new_tokens, eos, settings, mask)


def _decode_loop(model, input_ids: torch.Tensor, max_new_tokens: int, eos: torch.Tensor,
                 settings: SamplingSettings, mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    batch, prompt_len = input_ids.shape
    decoder = _Decoder(model, settings.use_cache, batch, prompt_len + max_new_tokens, mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    ids, new = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = process_logits(decoder(new), ids, settings)
        token = next_token(logits, settings.do_sample, settings.generator)
        if len(eos):  # rows that ended keep emitting their end-of-sequence token, as in transformers
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        yield token
        if bool(finished.all()):
            return
        new = token[:, None]
        if settings.repetition_penalty is not None:  # the penalty looks at the whole text
            ids = torch.cat([ids, new], dim=-1)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue `input_ids` (batch, tokens) by up to `max_new_tokens`; return prompt + new tokens.

    model: a transformers causal LM, or a `llama_lab.scratch.Llama`.
    do_sample: False picks the most likely token (greedy); True draws from the distribution
        reshaped by temperature, top_k, top_p and min_p (ignored when greedy, as in transformers).
    repetition_penalty: applied in both modes, to the prompt's tokens too.
    use_cache: keep every layer's keys and values (the KV cache) so each step runs only the
        new token; False runs the whole text again at every step (same result, slower).
    generator: a seeded `torch.Generator` for reproducible sampling (None: torch's global one,
        which is what `model.generate` uses after `torch.manual_seed`).
    eos_token_id: stop once every row has produced it (default: the model config's).
    attention_mask: for a batch of prompts of different lengths, padded on the left (see
        `generate_batch`): 0 marks the padding, which no token attends to.

    The settings are checked together (`SamplingSettings`) before the model runs. Greedy
    output, and sampled output with the same seed, equal `model.generate`'s.

    >>> from llama_lab import load_model
    >>> model, tok = load_model("tiny-random")
    >>> ids = tok("Hi", return_tensors="pt").input_ids
    >>> generate(model, ids, 5).shape
    torch.Size([1, 7])
    """
    settings = SamplingSettings(max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                use_cache=use_cache, generator=generator, eos_token_id=eos_token_id)
    tokens = list(generate_tokens(model, input_ids, settings, attention_mask))
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1) if tokens else input_ids


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, **settings: Any) -> list[str]:
    """Continue several prompts of different lengths in one batch; return each one's new text.

    The prompts are padded on the left to one length (the new tokens must follow each prompt's
    last token), and the attention mask keeps every token from attending to the padding; the
    positions count real tokens only. Greedy, each reply equals the prompt generated alone.
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    out = generate(model, batch.input_ids, max_new_tokens, attention_mask=batch.attention_mask, **settings)
    return tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


def beam_search(model, input_ids: torch.Tensor, num_beams: int, max_new_tokens: int, *,
                length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """Keep the `num_beams` most likely continuations (sum of token log-probabilities) at every
    step instead of one; return the best finished one, prompt included, (1, tokens).

    As transformers' `generate(num_beams=...)` (and equal to it): each step extends every beam by
    every token and keeps the 2 x num_beams best candidates; those among the first num_beams that
    end (an end-of-sequence token, or the length limit) become hypotheses scored by their sum of
    log-probabilities / length ** length_penalty; the best other candidates run on. It stops once
    num_beams hypotheses are kept and the best running beam cannot beat the worst of them.
    Without a KV cache: every step runs each beam's whole text (the lesson, not the speed).
    """
    check_input_ids(model, input_ids)
    if input_ids.shape[0] != 1 or not (isinstance(num_beams, int) and num_beams >= 1):
        raise InvalidSettingError(f"beam_search takes one prompt (batch 1, got {input_ids.shape[0]}) and "
                                  f"num_beams an integer >= 1 (got {num_beams!r}).")
    check_setting("max_new_tokens", max_new_tokens)
    eos = _eos_ids(model, eos_token_id).tolist()
    beams, scores = input_ids, torch.zeros(1)  # running beams (n, tokens) and their summed log-probs
    finished: list[tuple[float, torch.Tensor]] = []  # (score, sequence), at most num_beams
    for step in range(1, max_new_tokens + 1):  # `step` tokens once this step is done
        with torch.inference_mode():
            logits = model(beams) if isinstance(model, scratch.Llama) else model(input_ids=beams).logits
        totals = scores[:, None] + logits[:, -1].float().log_softmax(-1)
        top, flat = totals.flatten().topk(max(2, 1 + len(eos)) * num_beams)
        beam, token = flat // totals.shape[1], flat % totals.shape[1]
        candidates = torch.cat([beams[beam], token[:, None]], dim=1)
        ends = torch.tensor([int(t) in eos or step == max_new_tokens for t in token])
        for rank in ends[:num_beams].nonzero().flatten().tolist():
            finished.append((top[rank].item() / step ** length_penalty, candidates[rank]))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        keep = (~ends).nonzero().flatten()[:num_beams]
        if not len(keep):
            break
        beams, scores = candidates[keep], top[keep]
        if len(finished) == num_beams and scores[0].item() / step ** length_penalty <= finished[-1][0]:
            break  # no running beam can still beat the hypotheses kept
    return finished[0][1][None] if finished else beams[:1]


def chat(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int, **settings: Any) -> str:
    """The assistant's reply to a conversation: the messages rendered by the tokenizer's chat
    template with the generation prompt, decoded until the chat model's end-of-turn token
    (`chat.end_of_turn_id`, SmolLM2's <|im_end|>), which is not part of the reply.

    >>> from llama_lab import load_model
    >>> model, tok = load_model("tiny-random")
    >>> isinstance(chat(model, tok, [{"role": "user", "content": "Hi"}], 4), str)
    True
    """
    from llama_lab import chat as chat_formats

    ids = chat_formats.prompt_ids(tokenizer, messages)
    settings.setdefault("eos_token_id", chat_formats.end_of_turn_id(tokenizer))
    out = generate(model, ids, max_new_tokens, **settings)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# --- streaming ----------------------------------------------------------------------------------

class IncrementalDecoder:
    """Turn tokens into text one token at a time.

    Decoding each token alone is wrong: a token may be half of a UTF-8
    character, and tokenizers drop or add spaces depending on the tokens
    around. So decode a short window of recent tokens twice, with and without
    the new ones, and hand out only the text that was added, once it no longer
    ends in an unfinished character (shown as U+FFFD).

    >>> from llama_lab.models import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> decoder = IncrementalDecoder(tok)
    >>> [decoder.add(t) for t in tok("é!").input_ids]  # é is two bytes, two tokens
    ['', 'é', '!']
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0  # start of the window that gives the context for the next piece
        self.read = 0  # tokens before this index have been handed out as text

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """The text the tokens not yet handed out add to the window."""
        before = self._decode(self.tokens[self.prefix:self.read])
        return self._decode(self.tokens[self.prefix:])[len(before):]

    def add(self, token: int) -> str:
        """Add one token id; return the new text it completes (maybe '')."""
        self.tokens.append(token)
        piece = self._pending()
        if piece and not piece.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return piece
        return ""

    def flush(self) -> str:
        """The text still held back at the end (an unfinished character shows as U+FFFD)."""
        rest = self._pending()
        self.prefix = self.read = len(self.tokens)
        return rest


def stream(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, **settings: Any) -> Iterator[str]:
    """Like `generate` (same keyword settings, the fields of `SamplingSettings`) for one prompt,
    but yield the new text piece by piece as it is produced: `"".join(stream(...))` is the
    decoded continuation.

    >>> from llama_lab import load_model
    >>> model, tok = load_model("tiny-random")
    >>> pieces = list(stream(model, tok, tok("Hi", return_tensors="pt").input_ids, 8))
    >>> "".join(pieces) == tok.decode(generate(model, tok("Hi", return_tensors="pt").input_ids, 8)[0, 2:],
    ...                               skip_special_tokens=True)
    True
    """
    checked = SamplingSettings(max_new_tokens, **settings)
    check_input_ids(model, input_ids)
    if input_ids.shape[0] != 1:
        raise InvalidSettingError(f"stream() takes one prompt (batch 1), not {input_ids.shape[0]}.")
    decoder = IncrementalDecoder(tokenizer)
    for token in generate_tokens(model, input_ids, checked):
        piece = decoder.add(int(token))
        if piece:
            yield piece
    if rest := decoder.flush():
        yield rest
