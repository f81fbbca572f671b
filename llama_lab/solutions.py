"""Solutions to the exercises, one function each (the checkers compare against them).

Learners: try the exercise first. Every solution here is short on purpose.
"""

from __future__ import annotations


def layer_params(config) -> int:
    """Parameters of one Llama decoder layer.

    >>> from llama_lab.sizing import llama2_config
    >>> layer_params(llama2_config("13b"))
    317204480
    """
    d, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attention = d * d * 2 + d * kv * 2  # q and o are d x d; k and v are d x kv
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    norms = 2 * d  # input and post-attention RMSNorm
    return attention + mlp + norms


def kv_cache_gb(config, n_tokens: int) -> float:
    """KV-cache size in GB (1e9 bytes) in bf16 after `n_tokens` tokens."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * n_tokens / 1e9


# --- notebook 02 ---

def causal_attention(q, k):
    """Causal softmax attention weights from queries and keys of shape (heads, tokens, head_dim)."""
    import torch

    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)  # key after query
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def strongest_induction_head(weights, period: int) -> tuple[int, int]:
    """(layer, head) with the highest induction score in maps of shape (layers, heads, tokens, tokens)."""
    from llama_lab.attention import induction_score

    scores = induction_score(weights, period)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return layer, head


def rope_rotate(x, position: int, theta: float = 10000.0):
    """Rotate one vector `x` (head_dim,) to `position`, in transformers' Llama layout:
    dimension i pairs with i + head_dim/2 and turns by the angle position * theta^(-2i/head_dim)."""
    import torch

    half = x.shape[-1] // 2
    angle = position * theta ** (-torch.arange(half, dtype=torch.float32) * 2 / x.shape[-1])
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])


# --- notebook 03 ---

def ffn_dim(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """SwiGLU hidden width as Meta's Llama code sets it: 2/3 of the classic 4 x dim (three
    matrices instead of two, same parameters), times an optional multiplier, rounded UP
    to a multiple of `multiple_of`.

    >>> ffn_dim(5120)  # Llama-2-13B
    13824
    """
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def apply_rotary_interleaved(x, theta: float = 10000.0):
    """RoPE as in Meta's reference code: x (seq, head_dim), row p at position p; dimensions
    (2i, 2i+1) form the complex number x[2i] + i x[2i+1], multiplied by e^(i p theta^(-2i/head_dim))."""
    import torch

    seq, head_dim = x.shape
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    pairs = torch.view_as_complex(x.float().reshape(seq, head_dim // 2, 2))
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(1)


def causal_mask_after_cache(n_new: int, n_cached: int):
    """(n_new, n_cached + n_new) booleans, True where new token i (at position n_cached + i)
    may attend to key j: every cached key, and the new ones up to itself."""
    import torch

    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool).tril(diagonal=n_cached)


# --- notebook 01 ------------------------------------------------------------------------------

def count_pairs(ids: list[int]) -> dict[tuple[int, int], int]:
    """How often each pair of neighbours occurs in `ids` (overlaps count: [7, 7, 7] has two (7, 7)).

    >>> count_pairs([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    from collections import Counter
    from itertools import pairwise

    return dict(Counter(pairwise(ids)))


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


def chat_prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens the model reads for `messages` rendered by the tokenizer's chat template,
    with the generation prompt (the opening of the assistant's turn) and no second BOS."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


# --- notebook 04 ---

def top_k_filter(logits, k: int):
    """Keep the `k` largest logits of the last dimension (and any tied with the k-th); -inf elsewhere.

    >>> import torch
    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2)
    tensor([-inf, 3., -inf, 3.])
    """
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Keep the most likely tokens until their probabilities add up to at least `p`; -inf elsewhere.

    >>> import torch
    >>> top_p_filter(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0.8)  # .64 + .24 >= .8
    tensor([2., 1., -inf, -inf])
    """
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    remove = (mass_before >= p).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(remove, float("-inf"))


def greedy_decode(model, input_ids, n_new: int):
    """Append the most likely token `n_new` times, running the whole text each step (no cache)."""
    import torch

    with torch.no_grad():
        for _ in range(n_new):
            next_id = model(input_ids).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_id], dim=-1)
    return input_ids


# --- notebook 05 ------------------------------------------------------------------------------

def loss_mask_labels(input_ids: list[int], start: int, end: int) -> list[int]:
    """Labels for SFT: the token ids where the assistant speaks (positions start..end-1), -100 elsewhere.

    >>> loss_mask_labels([5, 6, 7, 8], 1, 3)
    [-100, 6, 7, -100]
    """
    return [t if start <= i < end else -100 for i, t in enumerate(input_ids)]


def lora_forward(x, W, A, B, alpha: float, r: int):
    """A LoRA linear layer: the frozen W x plus the low-rank update (alpha / r) B A x."""
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO loss from sequence log-probabilities:
    -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), averaged over pairs."""
    import torch.nn.functional as F

    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()
