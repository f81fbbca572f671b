"""The Llama decoder written out in plain PyTorch, top to bottom.

Read it in order: `RMSNorm`, rotary position embeddings (`rope_tables`,
`apply_rotary`), grouped-query `Attention`, the SwiGLU `FeedForward`, one
`TransformerBlock`, the whole `Llama`, its `KVCache`, and `from_hf()`, which
puts the weights of any transformers `LlamaForCausalLM` into it.
Names follow Meta's reference code (github.com/meta-llama/llama, model.py);
`HF_NAMES` maps them to transformers' names.

>>> from llama_lab.models import load_model
>>> hf_model, tokenizer = load_model("tiny-random")
>>> model = from_hf(hf_model)
>>> ids = tokenizer("Hello", return_tensors="pt").input_ids
>>> torch.allclose(model(ids), hf_model(ids).logits, atol=1e-4)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_lab import sizing
from llama_lab.errors import ContextLengthError, InvalidSettingError


@dataclass
class Config:
    """The shape of a Llama model (the numbers in the Llama papers' tables; defaults: Llama-2-7B)."""

    vocab_size: int = 32000
    dim: int = 4096  # the residual stream width ("hidden size")
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int = 32  # key/value heads: fewer than n_heads is grouped-query attention
    head_dim: int = 128
    ffn_dim: int = 11008  # the SwiGLU hidden width ("intermediate size")
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # the output layer reuses the token embedding matrix
    eos_token_id: int | list[int] | None = None  # where generation stops

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """Read a transformers `LlamaConfig`; refuse the variants this file does not implement."""
        rope = getattr(hf_config, "rope_parameters", None) or {}
        unsupported = {
            "rope scaling": rope.get("rope_type", "default") != "default",
            "attention biases": getattr(hf_config, "attention_bias", False),
            "MLP biases": getattr(hf_config, "mlp_bias", False),
            f"activation {hf_config.hidden_act!r}": hf_config.hidden_act != "silu",
        }
        if any(unsupported.values()):
            raise InvalidSettingError(
                f"from_hf supports plain Llama 2 style models; this config uses "
                f"{', '.join(k for k, v in unsupported.items() if v)}. Use the transformers model itself.")
        return cls(
            vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size,
            n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
            n_kv_heads=hf_config.num_key_value_heads, head_dim=sizing.head_dim(hf_config),
            ffn_dim=hf_config.intermediate_size, norm_eps=hf_config.rms_norm_eps,
            rope_theta=sizing.rope_theta(hf_config), max_seq_len=hf_config.max_position_embeddings,
            tie_embeddings=hf_config.tie_word_embeddings, eos_token_id=hf_config.eos_token_id,
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias.

    Computed in float32 whatever the input dtype, as transformers and Meta do.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation angle, shape (max_seq_len, head_dim), computed once.

    Pair i of a head is rotated at position p by the angle p * theta^(-2i/head_dim):
    the first pairs spin fast (local order), the last ones slowly (long range).
    The pairs are (x[i], x[i + head_dim/2]), transformers' layout ("rotate half").

    >>> cos, sin = rope_tables(head_dim=4, max_seq_len=3)
    >>> cos.shape, cos[0].tolist()  # position 0: no rotation
    (torch.Size([3, 4]), [1.0, 1.0, 1.0, 1.0])
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the same angle for x[i] and x[i + head_dim/2]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of x (batch, heads, seq, head_dim) by its angle:
    (a, b) -> (a cos - b sin, b cos + a sin). cos, sin: (seq, head_dim), rows of `rope_tables`."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (GQA): n_heads query heads
    share n_kv_heads key/value heads, n_heads // n_kv_heads queries per group."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """x: (batch, seq, dim), the tokens at positions start.. ; cos, sin: their rows of the rope tables.
        kv_cache: this layer's (keys, values) buffers; the new keys/values are written at `start`."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # position enters here, and only here

        if kv_cache is not None:  # store the new keys/values in place, then attend over all of them
            cache_k, cache_v = kv_cache
            end = start + seq
            cache_k[:, :, start:end] = k
            cache_v[:, :, start:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]

        out = self.attend(q, k, v, start)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v, causal: q (batch, n_heads, seq, head_dim) for the tokens
        at positions start.., k and v (batch, n_kv_heads, start + seq, head_dim) for every token so far."""
        seq = q.shape[2]
        # One new token may see every key: no mask.
        # New tokens after cached ones: query i (position start + i) sees keys 0 .. start + i.
        mask = None
        if seq > 1 and start > 0:
            mask = torch.ones(seq, start + seq, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=seq > 1 and start == 0,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the value ("up"), w2 projects back ("down")."""

    def __init__(self, config: Config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens and written in place.

    keys[layer], values[layer]: (batch, n_kv_heads, max_len, head_dim); the first `length`
    positions are filled.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget every position from `length` on, like transformers' `DynamicCache.crop`: the next
        tokens go there (to time one decode step again, or to take back a drafted token). Nothing
        is erased: attention reads only the first `length` positions, and new keys overwrite the rest.
        """
        if not 0 <= length <= self.length:
            raise InvalidSettingError(f"crop({length}) is invalid: the cache holds {self.length} tokens, "
                                      f"so keep between 0 and {self.length} of them.")
        self.length = length


class Llama(nn.Module):
    """Token embedding, n_layers TransformerBlocks, a final RMSNorm, the output projection to logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab), in float32.

        With a `cache`, the tokens sit at positions cache.length.. (a prompt, or one new
        token at a time) and the cache moves forward by seq.
        """
        start = cache.length if cache is not None else 0
        end = start + input_ids.shape[1]
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if end > limit:
            raise ContextLengthError(end, limit)
        x = self.tok_embeddings(input_ids)
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        for i, layer in enumerate(self.layers):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = layer(x, cos, sin, kv, start)
        if cache is not None:
            cache.length = end
        return self.output(self.norm(x)).float()

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (default: the context)."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ContextLengthError(max_len, self.config.max_seq_len)
        weight = self.output.weight
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device)


# transformers' parameter names -> the names above, one dotted segment at a time.
HF_NAMES = {
    "embed_tokens": "tok_embeddings", "self_attn": "attention", "mlp": "feed_forward",
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm", "lm_head": "output",
}


def convert_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' keys to ours: works for the whole model or any submodule.

    >>> list(convert_hf_state_dict({"model.layers.0.mlp.gate_proj.weight": None}))
    ['layers.0.feed_forward.w1.weight']
    """
    def rename(key: str) -> str:
        return ".".join(HF_NAMES.get(part, part) for part in key.removeprefix("model.").split("."))

    return {rename(key): value for key, value in hf_state_dict.items()}


def load_hf_weights(module: nn.Module, hf_module: nn.Module) -> None:
    """Copy the weights of a transformers module (a LlamaRMSNorm, LlamaAttention, LlamaMLP,
    LlamaDecoderLayer or a whole LlamaForCausalLM) into its counterpart here."""
    module.load_state_dict(convert_hf_state_dict(hf_module.state_dict()), strict=True)


def from_hf(hf_model: nn.Module) -> Llama:
    """The from-scratch `Llama` running on the weights of a transformers `LlamaForCausalLM`.

    The weights are shared, not copied: no extra memory, same device and dtype, and
    a change to one model's weights is a change to the other's.
    """
    config = Config.from_hf(hf_model.config)
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = Llama(config)
    hf_weights = hf_model.state_dict(keep_vars=True)  # the Parameters themselves (a tied pair stays tied)
    model.load_state_dict(convert_hf_state_dict(hf_weights), strict=True, assign=True)
    like = hf_model.get_input_embeddings().weight
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)  # the meta ones are empty
    model.rope_cos, model.rope_sin = cos.to(like), sin.to(like)
    return model.eval()
