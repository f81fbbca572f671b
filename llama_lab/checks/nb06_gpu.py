"""Checkers of notebook 06 (Llama-2-13B on a GPU): NF4 codes of a block, the track a GPU gets,
the decode roofline of 13B in 4 bits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_lab import sizing, solutions
from llama_lab.checks import Case, Mistake, Verdict, run_check
from llama_lab.hardware import choose_track
from llama_lab.models import HEADROOM_BYTES
from llama_lab.quantize import nf4_levels

GB = 10**9


def _blocks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    normal = torch.randn(64, generator=g) * 0.02
    outlier = normal.clone()
    outlier[17] = -0.3  # the block's absmax is a negative weight
    shifted = torch.rand(64, generator=g) * 0.01 + 0.005  # all positive
    return {"a block of normal weights": normal, "a block whose largest weight is negative": outlier,
            "a block of positive weights": shifted}


def _nearest(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return (scaled[:, None] - levels).abs().argmin(dim=1)


def _uniform_codes(block: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.round((block / block.abs().max() + 1) * 7.5).long()


def check_nf4_codes(student_fn: Callable) -> Verdict:
    """Exercise (06): `student_fn(block, levels)` returns the NF4 code (0-15) of each of 64 weights."""
    levels = nf4_levels()
    cases = [Case(name, (block, levels)) for name, block in _blocks().items()]
    return run_check("NF4 codes of one block", student_fn, solutions.nf4_codes, cases,
                     convert=lambda codes: torch.as_tensor(codes).long(), mistakes=[
        Mistake.answer("the block was scaled by its largest weight, not its largest |weight|: a negative "
                       "weight can be the largest in size (use block.abs().max()).",
                       lambda block, levels: _nearest(block / block.max(), levels)),
        Mistake.answer("those are 16 evenly spaced levels: NF4's levels sit at normal quantiles, so take "
                       "the nearest of `levels`, not a rounded multiple of 2/15.", _uniform_codes),
        Mistake.answer("the weights were compared with the levels before scaling: divide the block by its "
                       "absmax first, so that it spans [-1, 1] like the levels.",
                       _nearest),
    ])


_GPUS = [(16 * GB, 4096, "a 16 GB T4"), (14 * GB, 512, "a 14 GB card"), (24 * GB, 4096, "a 24 GB card"),
         (40 * GB, 4096, "an A100 40 GB"), (16 * GB, 512, "a 16 GB T4"), (30 * GB, 4096, "a card"),
         (8 * GB, 4096, "an 8 GB card")]


def _needed(weights: str, context_len: int, kv: bool = True, headroom: bool = True) -> int:
    estimate = sizing.memory_estimate(sizing.llama2_config("13b"), weights, context_len)
    return (estimate.total if kv else estimate.weights) + HEADROOM_BYTES * headroom


def _first_fit(free: int, context_len: int, **leave_out) -> str:
    fits = [w for w in ("bf16", "int8", "nf4") if _needed(w, context_len, **leave_out) <= free]
    return f"13b-{fits[0]}" if fits else "small-cpu"


def check_track_for_gpu(student_fn: Callable) -> Verdict:
    """Exercise (06): `student_fn(gpu_free_bytes, context_len)` returns the track name for that GPU."""
    cases = [Case(f"{label} ({free / GB:.0f} GB free, context {ctx})", (free, ctx),
                  expected=choose_track(free, 8 * GB, context_len=ctx).name) for free, ctx, label in _GPUS]
    return run_check("Which track fits a GPU", student_fn, solutions.track_for_gpu, cases, mistakes=[
        Mistake.answer("the KV cache is missing: at 4096 tokens it takes 3.4 GB in 13B, which is what keeps "
                       "int8 off a 16 GB card.", lambda free, ctx: _first_fit(free, ctx, kv=False)),
        Mistake.answer("no headroom: load_model keeps 1 GB free for activations and the CUDA context "
                       "(models.HEADROOM_BYTES).", lambda free, ctx: _first_fit(free, ctx, headroom=False)),
        Mistake("the smallest track fits more often, but the best one that fits wins: try bf16 first, "
                "then int8, then nf4.", lambda got, want, *_: got == "13b-nf4" and want != "13b-nf4"),
    ])


_ROOFLINE_CASES = [("13b", "T4", 320), ("7b", "T4", 320), ("13b", "H200", 4800), ("70b", "H100 SXM", 3350)]


def check_nf4_roofline(student_fn: Callable) -> Verdict:
    """Exercise (06): `student_fn(config, bandwidth_gb_s)` returns the NF4 decode roofline, tokens/s."""
    cases = [Case(f"Llama-2-{size.upper()} on a {gpu} ({bw} GB/s)", (sizing.llama2_config(size), bw))
             for size, gpu, bw in _ROOFLINE_CASES]

    def read(config, linear: float, rest: float, embedding: bool = False) -> float:
        p = sizing.parameter_breakdown(config)
        return ((p["attention"] + p["mlp"]) * linear + (p["norms"] + p["lm_head"]) * rest
                + p["embedding"] * rest * embedding)

    return run_check("Decode roofline of 13B in NF4", student_fn, solutions.nf4_roofline, cases, rel=1e-3,
                     mistakes=[
        Mistake.answer("every weight at half a byte: only the decoder's linear layers are 4-bit; the output "
                       "layer and the norms stay in bf16 (2 bytes).",
                       lambda c, bw: bw * 1e9 / (sizing.count_parameters(c) * 0.5)),
        Mistake.answer("the input embedding table is not read at each step, only one row of it.",
                       lambda c, bw: bw * 1e9 / read(c, 0.5 + 1 / 64 + 4 / 16384, 2, embedding=True)),
        Mistake.answer("4 bits is not all: each block of 64 weights has an 8-bit scale, and each 256 scales "
                       "an fp32 one (0.5 + 1/64 + 4/16384 bytes a weight).",
                       lambda c, bw: bw * 1e9 / read(c, 0.5, 2)),
        Mistake.answer("that is the bf16 roofline: NF4 reads about 3.6x fewer bytes.",
                       lambda c, bw: sizing.decode_roofline(c, "bf16", bw), rel=1e-3),
    ])
