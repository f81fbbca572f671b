"""Solutions of notebook 06 (Llama-2-13B on a GPU): NF4 codes of a block, the track a GPU gets,
the decode roofline of 13B in 4 bits."""

from __future__ import annotations

import torch

from llama_lab.models import HEADROOM_BYTES
from llama_lab.sizing import llama2_config, memory_estimate, parameter_breakdown
from llama_lab.solutions import exercise


@exercise(
    idea="NF4 stores, for each weight, which of the 16 levels lies nearest to it once the block is "
         "scaled into [-1, 1].",
    step="divide the block by its largest absolute value (its absmax), then for each weight take the "
         "index of the nearest level: (scaled[:, None] - levels).abs().argmin(dim=1).")
def nf4_codes(block: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The 4-bit NF4 code (0-15) of each weight of one block.

    >>> from llama_lab.quantize import nf4_levels
    >>> nf4_codes(torch.tensor([0.5, -1.0, 0.0, 2.0]), nf4_levels()).tolist()
    [10, 2, 7, 15]
    """
    scaled = block / block.abs().max()
    return (scaled[:, None] - levels).abs().argmin(dim=1)


@exercise(
    idea="a track fits when the GPU holds the weights, the KV cache of the whole context and some "
         "headroom; try the best track first (bf16, then int8, then NF4).",
    step="for weights in bf16, int8, nf4: needed = memory_estimate(llama2_config('13b'), weights, "
         "context_len).total + HEADROOM_BYTES; return '13b-' + weights for the first that is <= "
         "gpu_free_bytes, else 'small-cpu'.")
def track_for_gpu(gpu_free_bytes: int, context_len: int) -> str:
    """The track name `choose_track` gives a GPU with `gpu_free_bytes` free."""
    for weights in ("bf16", "int8", "nf4"):
        needed = memory_estimate(llama2_config("13b"), weights, context_len).total + HEADROOM_BYTES
        if needed <= gpu_free_bytes:
            return f"13b-{weights}"
    return "small-cpu"


@exercise(
    idea="at batch 1 each new token reads every weight once, so tokens/s <= bandwidth / bytes read per "
         "token; in NF4 only the decoder's linear layers are 4-bit, and the input embedding is not read "
         "(one row of it is).",
    step="bytes = (attention + mlp) x (0.5 + 1/64 + 4/(64*256)) [4 bits + an 8-bit scale per 64 + an "
         "fp32 scale per 256 scales] + (norms + lm_head) x 2 [bf16], from parameter_breakdown; "
         "tokens/s = bandwidth_gb_s * 1e9 / bytes.")
def nf4_roofline(config, bandwidth_gb_s: float) -> float:
    """Upper bound on batch-1 decode tokens/s of `config` in NF4 at `bandwidth_gb_s` (empty context)."""
    parts = parameter_breakdown(config)
    nf4_bytes = 0.5 + 1 / 64 + 4 / (64 * 256)
    read = (parts["attention"] + parts["mlp"]) * nf4_bytes + (parts["norms"] + parts["lm_head"]) * 2
    return bandwidth_gb_s * 1e9 / read
