"""Choosing the next token: logits transforms, a generate loop with a KV cache, streaming.

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

`generate` runs the decode loop on a transformers model or on the
from-scratch model of `llama_lab.scratch`, with or without a KV cache;
`stream` yields the text as it is produced.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_lab.errors import CompilerNotFoundError, ContextLengthError, InvalidSettingError

NEG_INF = float("-inf")


# --- logits transforms ---------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Each setting: (is it valid?, the valid range in words).
_RULES = {
    "temperature": (lambda v: _is_number(v) and v > 0,
                    "a number > 0 (for always the most likely token, use do_sample=False)"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer >= 1"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0,
                           "a number > 0 (1 means no penalty, 1.1-1.3 is usual)"),
    "max_new_tokens": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
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


def process_logits(logits: torch.Tensor, input_ids: torch.Tensor, *, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None) -> torch.Tensor:
    """Apply the transforms in transformers' order: the penalty (greedy or sampled), then,
    when sampling only, temperature, top-k, top-p, min-p. Settings that change nothing are skipped."""
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits = _penalize(logits, input_ids, repetition_penalty)
    if not do_sample:
        return logits
    if temperature != 1.0:
        logits = _temperature(logits, temperature)
    if top_k is not None and top_k != 0:
        logits = _top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _top_p(logits, top_p)
    if min_p is not None:
        logits = _min_p(logits, min_p)
    return logits


# process_logits' keyword arguments shadow the functions; keep a handle on each.
_temperature, _top_k, _top_p, _min_p, _penalize = temperature, top_k, top_p, min_p, repetition_penalty


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

    def __init__(self, model, use_cache: bool, batch_size: int, max_len: int):
        self.model, self.use_cache = model, use_cache
        self.is_scratch = hasattr(model, "new_cache")
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
            logits = self.model(new_ids, cache=self.cache)[:, -1]
        else:
            logits = self.model(input_ids=new_ids, cache=self.cache, use_cache=self.use_cache,
                                logits_to_keep=1).logits[:, -1]
        return logits.float()


def context_length(model) -> int:
    """How many tokens the model can attend to: a transformers model's `max_position_embeddings`,
    a from-scratch model's `max_seq_len`."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or config.max_seq_len


def _eos_ids(model, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """The end-of-sequence ids: the argument, else the model's own (generation) config's."""
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    ids = [] if eos_token_id is None else eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def generate_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    use_cache: bool = True, generator: torch.Generator | None = None,
                    eos_token_id: int | list[int] | None = None) -> Iterator[torch.Tensor]:
    """Check the settings now, then iterate over the next token of every row, `(batch,)`,
    one step at a time (see `generate`)."""
    if input_ids.dim() != 2:
        raise InvalidSettingError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}: "
                                  "use tokenizer(text, return_tensors='pt').input_ids.")
    check_setting("max_new_tokens", max_new_tokens)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty)
    for name, value in settings.items():
        if value is not None:
            check_setting(name, value)
    context = context_length(model)
    if input_ids.shape[1] > context:
        raise ContextLengthError(input_ids.shape[1], context)
    max_new_tokens = min(max_new_tokens, context - input_ids.shape[1])  # the model cannot see further
    return _decode_loop(model, input_ids, max_new_tokens, _eos_ids(model, eos_token_id).to(input_ids.device),
                        use_cache, generator, dict(settings, do_sample=do_sample))


def _decode_loop(model, input_ids: torch.Tensor, max_new_tokens: int, eos: torch.Tensor, use_cache: bool,
                 generator: torch.Generator | None, settings: dict) -> Iterator[torch.Tensor]:
    batch, prompt_len = input_ids.shape
    decoder = _Decoder(model, use_cache, batch, prompt_len + max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    ids, new = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = process_logits(decoder(new), ids, **settings)
        token = next_token(logits, settings["do_sample"], generator)
        if len(eos):  # rows that ended keep emitting their end-of-sequence token, as in transformers
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        yield token
        if bool(finished.all()):
            return
        new = token[:, None]
        if settings["repetition_penalty"] is not None:  # the penalty looks at the whole text
            ids = torch.cat([ids, new], dim=-1)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None
             ) -> torch.Tensor:
    """Continue `input_ids` (batch, tokens) by up to `max_new_tokens`; return prompt + new tokens.

    model: a transformers causal LM, or a `llama_lab.scratch` model (anything with `new_cache`).
    do_sample: False picks the most likely token (greedy); True draws from the distribution
        reshaped by temperature, top_k, top_p and min_p (ignored when greedy, as in transformers).
    repetition_penalty: applied in both modes, to the prompt's tokens too.
    use_cache: keep every layer's keys and values (the KV cache) so each step runs only the
        new token; False runs the whole text again at every step (same result, slower).
    generator: a seeded `torch.Generator` for reproducible sampling (None: torch's global one,
        which is what `model.generate` uses after `torch.manual_seed`).
    eos_token_id: stop once every row has produced it (default: the model config's).

    Greedy output, and sampled output with the same seed, equal `model.generate`'s.

    >>> from llama_lab import load_model
    >>> model, tok = load_model("tiny-random")
    >>> ids = tok("Hi", return_tensors="pt").input_ids
    >>> generate(model, ids, 5).shape
    torch.Size([1, 7])
    """
    tokens = list(generate_tokens(model, input_ids, max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty, use_cache=use_cache,
                                  generator=generator, eos_token_id=eos_token_id))
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1) if tokens else input_ids


# --- speed ---------------------------------------------------------------------------------------

class MatVecLinear(nn.Linear):
    """An `nn.Linear` whose one-token product, once compiled, is a matrix-vector product written
    out: out[j] = sum_i W[j, i] x[i], multiply then sum along each row of W.

    `torch.compile` (inductor) turns the multiply-then-sum into one loop that streams each row of
    W once, vectorized and split over the cores: it reads the weights at about the memory
    bandwidth, where MKL's matrix-vector product (`F.linear` at batch 1) reads them at a third to
    a half of it on the AMD EPYC of benchmarks/README.md. Eager, the same line would build the whole
    (out, in) product in memory, so outside compilation, and for more than one token, this is
    a plain `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and x.shape[-2] == 1):
            return super().forward(x)
        out = (x.unsqueeze(-2) * self.weight).sum(-1)
        return out if self.bias is None else out + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MatVecLinear:
        """A MatVecLinear holding the Parameters of `linear` (shared, not copied: tied weights stay tied)."""
        with torch.device("meta"):
            fast = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        fast.weight, fast.bias = linear.weight, linear.bias
        return fast


def require_cpp_compiler() -> str:
    """The C++ compiler that torch.compile will use on a CPU ($CXX, g++ or clang++), or a
    `CompilerNotFoundError` saying how to install it (or Python's headers, which it also needs)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise CompilerNotFoundError("torch.compile needs a C++ compiler on a CPU and none was found "
                                    "(g++, clang++ or $CXX). Install one (Debian/Ubuntu: apt install g++; "
                                    "macOS: xcode-select --install), or use Colab. Without one, decode "
                                    "without compile_decode: same tokens, slower.")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        raise CompilerNotFoundError(f"torch.compile builds its kernels against Python's C headers, and "
                                    f"{headers} is missing. Install them (Debian/Ubuntu: apt install "
                                    "python3-dev, for the system's Python).")
    return compiler


def compile_decode(model: nn.Module) -> nn.Module:
    """Make the one-token steps of a from-scratch model run near the memory-bandwidth limit,
    in place, and return the model: same tokens, 2.5-3x faster on this project's CPU.

    A decode step reads every weight once to produce one token, so its speed limit is the
    memory bandwidth divided by the weights' bytes (`llama_lab.sizing.decode_roofline`). Eager
    PyTorch reaches a quarter to a third of it on a CPU: the profiler puts most of a step in
    MKL's matrix-vector products, which stream the weights at a third to a half of the
    bandwidth, and the rest in some 400 small operations, each launched from Python. So every
    `nn.Linear` becomes a `MatVecLinear` (weights shared, not copied) and one-token calls run
    `torch.compile`d: inductor writes each matrix-vector product as a loop that reads at about
    the bandwidth, fuses the small operations (RMSNorm, RoPE, SwiGLU, the cache writes) and
    runs the whole step as C++. Shapes are dynamic: one compilation serves every position and
    cache size (a batch of several sequences compiles once more). Calls with more tokens (the
    prompt) stay eager. benchmarks/README.md has the measurements.

    The first one-token call compiles: about a minute on 2 cores, 20 s once inductor's on-disk
    cache (/tmp/torchinductor_<user>) holds the kernels. Needs a C++ compiler (g++ or clang++).

    >>> from llama_lab import load_model, scratch
    >>> model = compile_decode(scratch.from_hf(load_model("tiny-random")[0]))
    >>> type(model.layers[0].attention.wq).__name__
    'MatVecLinear'
    """
    if not hasattr(model, "new_cache"):
        raise InvalidSettingError("compile_decode works on a from-scratch model: "
                                  "pass llama_lab.scratch.from_hf(model).")
    require_cpp_compiler()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, MatVecLinear.from_linear(child))
    eager = model.forward
    # Before each call torch.compile checks that nothing it relied on changed (its guards): here
    # thousands of module attributes, 1 ms a step. The model's structure stays as it is, so
    # check only the tensors (the weights may change: they are inputs of the compiled step).
    step = torch.compile(eager, dynamic=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def forward(input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        if input_ids.shape[1] > 1:
            return eager(input_ids, cache)
        with torch.inference_mode():  # the same kind of input tensor whatever the caller's mode:
            return step(input_ids.clone(memory_format=torch.contiguous_format), cache)  # no recompilation

    model.forward = forward
    return model


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


def stream(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, **settings) -> Iterator[str]:
    """Like `generate` (same keyword settings) for one prompt, but yield the new text piece by
    piece as it is produced: `"".join(stream(...))` is the decoded continuation.

    >>> from llama_lab import load_model
    >>> model, tok = load_model("tiny-random")
    >>> pieces = list(stream(model, tok, tok("Hi", return_tensors="pt").input_ids, 8))
    >>> "".join(pieces) == tok.decode(generate(model, tok("Hi", return_tensors="pt").input_ids, 8)[0, 2:],
    ...                               skip_special_tokens=True)
    True
    """
    if input_ids.shape[0] != 1:
        raise InvalidSettingError(f"stream() takes one prompt (batch 1), not {input_ids.shape[0]}.")
    decoder = IncrementalDecoder(tokenizer)
    for token in generate_tokens(model, input_ids, max_new_tokens, **settings):
        piece = decoder.add(int(token))
        if piece:
            yield piece
    if rest := decoder.flush():
        yield rest
