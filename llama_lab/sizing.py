"""Sizing math for Llama models: parameters, memory, KV cache, decode speed.

Everything here works from a `LlamaConfig` alone, so it answers questions
about a 70B model on a laptop:

>>> from llama_lab.sizing import llama2_config, count_parameters
>>> count_parameters(llama2_config("13b"))
13015864320
>>> kv_cache_bytes_per_token(llama2_config("13b"), "bf16")
819200
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import NamedTuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_lab.errors import InvalidSettingError

# Shapes from the Llama 2 paper (Touvron et al., 2023, table 1) and the
# config.json files of meta-llama/Llama-2-{7b,13b,70b}-hf.
_LLAMA2_SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}

# LLaMA 1 (Touvron et al., February 2023, table 2; the config.json files of the converted
# checkpoints): the same shapes for 7B and 13B, a 2,048-token context, trained on 1.0T tokens
# (7B, 13B) or 1.4T (33B, 65B).
_LLAMA1_SHAPES = {
    "7b": _LLAMA2_SHAPES["7b"],
    "13b": _LLAMA2_SHAPES["13b"],
    "33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                num_attention_heads=52, num_key_value_heads=52),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=64),
}

# Bytes per weight. "nf4" is bitsandbytes' 4-bit NormalFloat with double
# quantization: 4 bits + an 8-bit scale per 64 weights + an fp32 scale per
# 256 of those scales = 4.127 bits.
BYTES_PER_PARAM = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "int8": 1.0,
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),
}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "8bit": "int8",
            "4bit": "nf4", "float": "fp32", "half": "fp16"}
QUANTIZED = ("int8", "nf4")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise a dtype to one of BYTES_PER_PARAM's keys.

    >>> dtype_name(torch.bfloat16), dtype_name("4bit")
    ('bf16', 'nf4')
    """
    name = str(dtype).removeprefix("torch.").lower()
    name = _ALIASES.get(name, name)
    if name not in BYTES_PER_PARAM:
        raise InvalidSettingError(
            f"Unknown dtype {dtype!r}. Use one of: {', '.join(BYTES_PER_PARAM)}."
        )
    return name


def head_dim(config: LlamaConfig) -> int:
    """Width of one attention head: the config's `head_dim`, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: LlamaConfig) -> float:
    """The RoPE base of a config (transformers 5 keeps it in `rope_parameters`).

    >>> rope_theta(llama2_config("13b"))
    10000.0
    """
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def llama2_config(size: str) -> LlamaConfig:
    """The official `LlamaConfig` of Llama 2 "7b", "13b" or "70b"."""
    return _config("Llama 2", size.lower().removeprefix("llama-2-"), _LLAMA2_SHAPES, context=4096, eps=1e-5)


def llama1_config(size: str) -> LlamaConfig:
    """The `LlamaConfig` of the first LLaMA (February 2023): "7b", "13b", "33b" or "65b".

    >>> llama1_config("13b").max_position_embeddings, llama2_config("13b").max_position_embeddings
    (2048, 4096)
    """
    return _config("LLaMA 1", size.lower().removeprefix("llama-1-"), _LLAMA1_SHAPES, context=2048, eps=1e-6)


def _config(family: str, key: str, shapes: dict, context: int, eps: float) -> LlamaConfig:
    if key not in shapes:
        raise InvalidSettingError(f"Unknown {family} size {key!r}. Use one of: {', '.join(shapes)}.")
    return LlamaConfig(
        vocab_size=32000, max_position_embeddings=context, rms_norm_eps=eps,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        **shapes[key],
    )


def meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """The model `config` describes on PyTorch's meta device: every shape, no memory."""
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def parameter_breakdown(config: LlamaConfig) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory used).

    Keys: embedding, attention, mlp, norms, lm_head (0 when tied to the embedding).
    """
    return dict(_breakdown(config.to_json_string()))


@functools.lru_cache(maxsize=32)
def _breakdown(config_json: str) -> tuple[tuple[str, int], ...]:
    config = LlamaConfig.from_dict(json.loads(config_json))
    groups = Counter()
    seen = set()
    for name, p in meta_model(config).named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied lm_head shares the embedding's tensor: counted once, as the embedding
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            groups["embedding"] += p.numel()
        elif "self_attn" in name:
            groups["attention"] += p.numel()
        elif "mlp" in name:
            groups["mlp"] += p.numel()
        elif "norm" in name:
            groups["norms"] += p.numel()
        else:
            groups["lm_head"] += p.numel()
    return tuple((k, groups[k]) for k in ("embedding", "attention", "mlp", "norms", "lm_head"))


def count_parameters(config: LlamaConfig) -> int:
    """Distinct parameters of the model `config` describes (tied weights once)."""
    return sum(parameter_breakdown(config).values())


def weight_bytes(config: LlamaConfig, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes of the weights in `dtype`.

    Quantized dtypes ("int8", "nf4") apply, as in bitsandbytes, to the linear
    layers of the decoder only; embedding, lm_head and norms stay in bf16.
    """
    name = dtype_name(dtype)
    parts = parameter_breakdown(config)
    if name not in QUANTIZED:
        return round(sum(parts.values()) * BYTES_PER_PARAM[name])
    linear = parts["attention"] + parts["mlp"]
    rest = parts["embedding"] + parts["norms"] + parts["lm_head"]
    return round(linear * BYTES_PER_PARAM[name] + rest * BYTES_PER_PARAM["bf16"])


def _kv_dtype(dtype: str | torch.dtype) -> str:
    name = dtype_name(dtype)
    return "bf16" if name in QUANTIZED else name  # quantized models compute in bf16


def kv_cache_bytes_per_token(config: LlamaConfig, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes the KV cache grows by per token: 2 (K and V) x layers x KV heads x head dim x bytes.

    >>> kv_cache_bytes_per_token(llama2_config("70b"), "bf16")  # GQA: 8 KV heads
    327680
    """
    n = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)
    return int(n * BYTES_PER_PARAM[_kv_dtype(dtype)])


class MemoryEstimate(NamedTuple):
    """Bytes for the weights, the KV cache and both together."""

    weights: int
    kv_cache: int
    total: int

    def __str__(self) -> str:
        return (f"weights {self.weights / 1e9:.2f} GB + KV cache {self.kv_cache / 1e9:.2f} GB"
                f" = {self.total / 1e9:.2f} GB")


def memory_estimate(config: LlamaConfig, dtype: str | torch.dtype = "bf16",
                    context_len: int = 4096, batch_size: int = 1) -> MemoryEstimate:
    """Memory to hold the weights and a full KV cache (activations not included).

    >>> print(memory_estimate(llama2_config("13b"), "bf16", context_len=4096))
    weights 26.03 GB + KV cache 3.36 GB = 29.39 GB
    """
    if context_len < 0 or batch_size < 1:
        raise InvalidSettingError(
            f"context_len must be >= 0 and batch_size >= 1 (got {context_len}, {batch_size})."
        )
    weights = weight_bytes(config, dtype)
    kv = kv_cache_bytes_per_token(config, dtype) * context_len * batch_size
    return MemoryEstimate(weights, kv, weights + kv)


def bytes_read_per_token(config: LlamaConfig, dtype: str | torch.dtype = "bf16",
                         context_len: int = 0) -> int:
    """Bytes a batch-1 decode step must read: every weight but the input embedding
    table (only one row of it is read, unless it is tied to lm_head), plus the KV
    cache of `context_len` earlier tokens."""
    weights = weight_bytes(config, dtype)
    if not config.tie_word_embeddings:
        table = parameter_breakdown(config)["embedding"]
        weights -= round(table * BYTES_PER_PARAM[_kv_dtype(dtype)])
    return weights + kv_cache_bytes_per_token(config, dtype) * context_len


# Peak memory bandwidth of common GPUs in GB/s, as their makers' spec sheets give it: the ceiling
# of `decode_roofline`, which no kernel reaches (a good one reads at 80-90 % of it).
GPU_BANDWIDTH_GB_S = {
    "T4": 320,          # NVIDIA T4 datasheet: 16 GB GDDR6, 320+ GB/s (Colab's free GPU)
    "L4": 300,          # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s
    "A10G": 600,        # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s (AWS's A10G, in G5 instances, alike)
    "RTX 4090": 1008,   # NVIDIA GeForce RTX 4090 specifications: 24 GB GDDR6X, 384-bit at 21 Gbps = 1008 GB/s
    "A100 40GB": 1555,  # NVIDIA A100 datasheet: 40 GB HBM2, 1,555 GB/s (PCIe and SXM)
    "A100 80GB": 2039,  # NVIDIA A100 datasheet: 80 GB HBM2e, 2,039 GB/s (SXM; the PCIe card: 1,935)
    "H100 PCIe": 2000,  # NVIDIA H100 datasheet: 80 GB HBM2e, 2 TB/s
    "H100 SXM": 3350,   # NVIDIA H100 datasheet: 80 GB HBM3, 3.35 TB/s
    "H200": 4800,       # NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s
}


def decode_roofline(config: LlamaConfig, dtype: str | torch.dtype, bandwidth_gb_s: float,
                    context_len: int = 0) -> float:
    """Upper bound on batch-1 decode speed in tokens/s: decoding one token reads
    every weight once, so speed <= memory bandwidth / bytes read per token.

    >>> round(decode_roofline(llama2_config("13b"), "bf16", 320))  # a T4: 320 GB/s
    12
    """
    if bandwidth_gb_s <= 0:
        raise InvalidSettingError(f"bandwidth_gb_s must be > 0 (got {bandwidth_gb_s}).")
    return bandwidth_gb_s * 1e9 / bytes_read_per_token(config, dtype, context_len)
