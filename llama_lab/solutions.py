"""Solutions to the exercises, one function each (the checkers compare against them).

Learners: try the exercise first. Every solution here is short on purpose.
"""

from __future__ import annotations


def layer_params(config) -> int:
    """Parameters of one Llama decoder layer.

    >>> from llama_lab.sizing import llama2_config
    >>> layer_params(llama2_config("13b"))
    317209600
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
