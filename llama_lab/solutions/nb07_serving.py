"""Solutions of notebook 07 (serving and safety): checking a request body, users that fit next to
the weights, a guard rule."""

from __future__ import annotations

import re

from llama_lab import guard, sizing
from llama_lab.solutions import exercise


@exercise(
    idea="trust nothing in the body: check that it is an object, that 'text' is there and is a non-empty "
         "string, and that max_tokens, when given, is a whole number in range.",
    step="return a message when: not isinstance(body, dict); body.get('text') is not a str or is ''; "
         "'max_tokens' is present and is a bool, not an int, or outside 1..max_tokens_cap (check bool "
         "first: True is an int in Python). Otherwise return None.")
def predict_body_error(body, max_tokens_cap: int) -> str | None:
    """What is wrong with a /predict body, in words, or None when it is fine.

    >>> predict_body_error({"text": "Hi", "max_tokens": 5}, 256) is None
    True
    >>> predict_body_error({"text": "Hi", "max_tokens": 0}, 256)
    'max_tokens must be a whole number from 1 to 256'
    """
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("text"), str) or not body["text"]:
        return "'text' must be a non-empty string"
    n = body.get("max_tokens", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_tokens_cap:
        return f"max_tokens must be a whole number from 1 to {max_tokens_cap}"
    return None


@exercise(
    idea="the weights are loaded once and shared by every user; each user then needs a KV cache as long "
         "as their context; what is left of the GPU after the weights is shared out in whole caches.",
    step="left = gpu_bytes - sizing.weight_bytes(config, dtype); one user's cache = "
         "sizing.kv_cache_bytes_per_token(config, dtype) * context_len; the answer is max(0, left // cache).")
def users_that_fit(config, dtype: str, gpu_bytes: int, context_len: int) -> int:
    """How many users, each with a full KV cache of `context_len` tokens, fit on a GPU next to the weights.

    >>> users_that_fit(sizing.llama2_config("13b"), "bf16", 80 * 10**9, 4096)
    16
    """
    left = gpu_bytes - sizing.weight_bytes(config, dtype)
    per_user = sizing.kv_cache_bytes_per_token(config, dtype) * context_len
    return max(0, left // per_user)


# Words that turn a keyword match into a question about safety, history, the law, treatment or
# computing: found by reading keyword_guard's false positives on the labelled prompts.
_BENIGN_CONTEXT = re.compile(r"\b(process|shutter|photo|history|historians|hotline|prevention|support|"
                             r"spot|legal|treat|competition)\b", re.IGNORECASE)


@exercise(
    idea="start from keyword_guard and read its mistakes on the labelled prompts: most false positives "
         "use a trigger word in a harmless context (a process, a photo, history, asking for help).",
    step="call guard.keyword_guard(text, role); when it refuses but the text also holds a word of a "
         "harmless context (process, shutter, history, hotline, support, legal, ...), return None "
         "instead; keep every other refusal.")
def guard_rule(text: str, role: str = "user") -> str | None:
    """keyword_guard, minus the refusals whose text also names a harmless context."""
    reason = guard.keyword_guard(text, role)
    return None if reason and _BENIGN_CONTEXT.search(text) else reason
