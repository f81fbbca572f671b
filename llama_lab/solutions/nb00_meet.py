"""Solutions of notebook 00 (meet Llama-2-13B): counting parameters and cache bytes."""

from __future__ import annotations

from llama_lab.sizing import head_dim
from llama_lab.solutions import exercise


@exercise(
    idea="a decoder layer is attention (four projections: q, k, v, o) plus the MLP (three matrices) "
         "plus two RMSNorm weight vectors; Llama has no biases, and with grouped-query attention "
         "k and v are narrower than q.",
    step="q and o are hidden x hidden; k and v are hidden x (num_key_value_heads x head_dim); gate, up "
         "and down are hidden x intermediate; the two norms add 2 x hidden.")
def layer_params(config) -> int:
    """Parameters of one Llama decoder layer.

    >>> from llama_lab.sizing import llama2_config
    >>> layer_params(llama2_config("13b"))
    317204480
    """
    d, kv = config.hidden_size, config.num_key_value_heads * head_dim(config)
    attention = d * d * 2 + d * kv * 2  # q and o are d x d; k and v are d x kv
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    norms = 2 * d  # input and post-attention RMSNorm
    return attention + mlp + norms


@exercise(
    idea="per token, the cache keeps one key and one value vector for every KV head of every layer.",
    step="2 (K and V) x layers x num_key_value_heads x head_dim numbers per token, 2 bytes each in bf16, "
         "times n_tokens; divide the bytes by 1e9.")
def kv_cache_gb(config, n_tokens: int) -> float:
    """KV-cache size in GB (1e9 bytes) in bf16 after `n_tokens` tokens."""
    numbers_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)
    return numbers_per_token * 2 * n_tokens / 1e9
