"""Quantization written out, as bitsandbytes does it, and measured on a real model.

Two ways to store a weight matrix in fewer bits:

* **absmax int8** (LLM.int8(), Dettmers et al. 2022): per row, scale by 127 / the row's
  largest |weight| and round. One byte a weight, plus one scale a row.
* **NF4** (QLoRA, Dettmers et al. 2023): per block of 64 weights, divide by the block's
  largest |weight| and store the index (4 bits) of the nearest of 16 levels placed at
  quantiles of a normal distribution, since trained weights are roughly normal. The
  64-weight blocks' scales are themselves quantized to 8 bits in blocks of 256
  ("double quantization"): 4 + 8/64 + 32/(64*256) = 4.127 bits a weight.

>>> w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
>>> q, absmax = absmax_int8(w)
>>> q.tolist(), absmax.tolist()
([[64, -127, 32, 0]], [1.0])
>>> [round(v, 4) for v in nf4_levels()[[0, 7, 15]].tolist()]
[-1.0, 0.0, 1.0]

tests/test_quantize.py checks them against bitsandbytes' own functions: the same int8 codes; the
same 4-bit bytes, but for weights within 1e-6 of a midpoint between two levels; the same 8-bit codes
of the scales, but where bitsandbytes' C++ kernel does not pick the nearest level (ours does).
The second half measures a model: `perplexity`, `decode_tokens_per_s`, and
`measure` (load time, weight memory and both, for fp32, bf16, int8 or NF4).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from packaging.version import Version

from llama_lab.errors import InvalidSettingError, QuantizationError
from llama_lab.notebook import glibc, release_memory

MIN_BITSANDBYTES = "0.48"  # the first release that quantizes on a CPU
NF4_BLOCKSIZE = 64
SCALE_BLOCKSIZE = 256
HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout_text.txt"

# --- absmax int8 ---------------------------------------------------------------------------------


def absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax quantization: int8 codes `round(127 * w / absmax)` and each row's absmax."""
    absmax = w.float().abs().amax(dim=-1)
    q = torch.round(w.float() * (127 / absmax.clamp(min=1e-30)).unsqueeze(-1))
    return q.to(torch.int8), absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Back to float32: `q * absmax / 127`; the error is at most absmax / 254 per row."""
    return q.float() * (absmax / 127).unsqueeze(-1)


# --- blockwise quantization to a table of levels ---------------------------------------------


# QLoRA's outermost quantile: halfway between 1 - 1/(2*16) and 1 - 1/(2*15), so that the
# extreme level stays finite (the normal's quantile at 1 is infinite).
NF4_OFFSET = 1 - (1 / 32 + 1 / 30) / 2


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values in [-1, 1]: normal quantiles, 8 above zero, 7 below, and an exact 0.

    Each level stands for an equal share of a normal distribution's probability, so normally
    distributed weights use all 16 codes about equally often.
    """
    normal = statistics.NormalDist()
    positive = [normal.inv_cdf(p) for p in torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].tolist()]
    negative = [-normal.inv_cdf(p) for p in torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].tolist()]
    levels = torch.tensor(sorted(positive + [0.0] + negative))
    return levels / levels.max()


def dynamic_levels() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code, which stores the NF4 scales: 256 values in
    [-1, 1], fine near zero, coarse near 1. For each decade 10^(i-6) (i = 0..6) it has 2^i
    magnitudes spread evenly between 0.1 and 1 times the decade, with both signs; plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        magnitudes = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += magnitudes + [-m for m in magnitudes]
    return torch.tensor(sorted(values))


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened into rows of `blocksize`; a short last block is padded with zeros (which change
    neither its absmax nor its other codes)."""
    flat = x.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor, blocksize: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, scale to [-1, 1] by the block's absmax and store the index of the nearest level.

    Returns the codes (uint8, one per element of x, flattened) and the absmax of each block.
    """
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    midpoints = (levels[:-1] + levels[1:]) / 2  # nearest level = the gap between midpoints x falls in
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()], absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """The level of each code times its block's absmax (flat float32)."""
    values = _blocks(levels[codes.long()], blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[: codes.numel()]


# --- NF4 with double quantization ------------------------------------------------------------


class NF4Tensor(NamedTuple):
    """A tensor in NF4 with double-quantized scales, the pieces bitsandbytes keeps."""

    codes: torch.Tensor  # uint8, one 4-bit code (0-15) per weight, flat and unpacked
    scale_codes: torch.Tensor  # uint8, the absmax of each 64-weight block, in the 8-bit dynamic code
    scale_absmax: torch.Tensor  # float32, one per 256 scales
    scale_offset: torch.Tensor  # float32, the mean absmax, subtracted before quantizing the scales
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        """Storage: two codes a byte, one byte per scale, 4 per scale of scales, 4 for the offset."""
        return (self.codes.numel() + 1) // 2 + self.scale_codes.numel() + 4 * self.scale_absmax.numel() + 4


def quantize_nf4(w: torch.Tensor) -> NF4Tensor:
    """NF4 in blocks of 64, then the blocks' scales in the 8-bit dynamic code, blocks of 256."""
    codes, absmax = quantize_blockwise(w, nf4_levels(), NF4_BLOCKSIZE)
    offset = absmax.mean()
    scale_codes, scale_absmax = quantize_blockwise(absmax - offset, dynamic_levels(), SCALE_BLOCKSIZE)
    return NF4Tensor(codes, scale_codes, scale_absmax, offset, w.shape)


def nf4_scales(q: NF4Tensor) -> torch.Tensor:
    """Each 64-weight block's absmax, as stored: decoded from its 8-bit code."""
    scales = dequantize_blockwise(q.scale_codes, q.scale_absmax, dynamic_levels(), SCALE_BLOCKSIZE)
    return scales + q.scale_offset


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """Back to float32, in the original shape."""
    return dequantize_blockwise(q.codes, nf4_scales(q), nf4_levels(), NF4_BLOCKSIZE).view(q.shape)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high half, as bitsandbytes stores them.

    >>> pack_4bit(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist()
    [18, 240]
    """
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2))
    return (codes[0::2] << 4) | codes[1::2]


# --- bitsandbytes itself ---------------------------------------------------------------------


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# These come through the logging module: the first once at import on CPUs with AVX-512 bf16
# (bitsandbytes asks the `kernels` package for an optional kernel from the Hub, not needed), the
# second on every int8 product, the third from `kernels` itself (a dependency of transformers
# since 5.25) when it is asked for that kernel offline.
_BITSANDBYTES_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
}


def import_bitsandbytes(device: str = "cpu"):
    """bitsandbytes, imported without its two harmless messages; a `QuantizationError` that says
    what to install when it is missing, or too old to quantize on a CPU."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise QuantizationError(
            "quantize needs bitsandbytes, which is not installed: "
            f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"
        ) from None
    if not device.startswith("cuda") and Version(version) < Version(MIN_BITSANDBYTES):
        raise QuantizationError(
            f"bitsandbytes {version} quantizes on a CUDA GPU only; {MIN_BITSANDBYTES} and later also on a "
            f"CPU: pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    for name, start in _BITSANDBYTES_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    import bitsandbytes

    return bitsandbytes


# --- measuring a model -----------------------------------------------------------------------


def heldout_text() -> str:
    """An essay written for this project (so no model was trained on it), for perplexity."""
    return HELDOUT_TEXT.read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """exp(mean next-token loss) over `text`, cut into windows of `window` tokens.

    Each window is scored on its own (its first token has no context and is not predicted).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start:start + window]
        if chunk.shape[1] < 2:
            break
        loss = model(chunk, labels=chunk).loss.item()
        total, count = total + loss * (chunk.shape[1] - 1), count + chunk.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, new_tokens: int = 32, repeats: int = 2,
                        prompt: str = "Quantization stores each weight in", **generate_kwargs) -> float:
    """Greedy generation speed, best of `repeats` runs of exactly `new_tokens` tokens (short prompt);
    `generate_kwargs` go to `model.generate` (`cache_implementation="static"` compiles on a GPU)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       **generate_kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


class Measurement(NamedTuple):
    """One way of storing a model's weights, measured."""

    variant: str  # "fp32", "bf16", "int8" or "nf4"
    load_seconds: float
    weight_bytes: int  # transformers' get_memory_footprint(): parameters and buffers
    perplexity: float
    tokens_per_s: float


VARIANTS = {"fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16"),
            "int8": dict(quantize="int8"), "nf4": dict(quantize="nf4")}


def measure(variant: str, name: str | None = None, text: str | None = None,
            new_tokens: int = 32) -> Measurement:
    """Load the model `name` (default: the notebooks' model) on the CPU as `variant`, measure it,
    and free it again before returning."""
    from llama_lab.models import load_model

    if variant not in VARIANTS:
        raise InvalidSettingError(f"Unknown variant {variant!r}. Use one of: {', '.join(VARIANTS)}.")
    _map_large_allocations()
    start = time.perf_counter()
    model, tokenizer = load_model(name, device="cpu", **VARIANTS[variant])
    load_seconds = time.perf_counter() - start
    result = Measurement(variant, load_seconds, model.get_memory_footprint(),
                         perplexity(model, tokenizer, text or heldout_text()),
                         decode_tokens_per_s(model, tokenizer, new_tokens))
    del model
    release_memory()
    return result


def _map_large_allocations() -> None:
    """Give each allocation above 128 KiB its own mapping, returned to the system when freed. By
    default glibc raises that threshold as big blocks are freed, then keeps them: loading SmolLM2 in
    NF4 would grow the process by 0.8 GB instead of 0.3."""
    if (libc := glibc()) is not None:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
