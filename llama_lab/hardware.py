"""What this machine has, and which way of running Llama-2-13B fits it.

`choose_track` is the decision, a pure function of the free memory:

* ``13b-bf16``: the GPU holds the weights in bf16 (26 GB), a KV cache for the
  whole context and some headroom (an A100 40 GB, an H100, an H200);
* ``13b-int8``: it does not, but it holds them in 8 bits (a 24 GB card);
* ``13b-nf4``: only 4-bit NF4 fits (Colab's free T4, 16 GB);
* ``small-cpu``: no GPU, or one too small even for NF4: the small model on the CPU.

>>> gb = 10**9
>>> choose_track(16 * gb, 12 * gb).name
'13b-nf4'
>>> print(choose_track(None, 8 * gb).reason)
no CUDA GPU: the small model on the CPU (needs 1.5 GB, 8.0 GB free)

`pick_track()` reads this machine (free VRAM, bf16 support, free RAM under the
container's limit) and calls it; the doctor and notebook 06 use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_lab import models, sizing

SMALL_TRACK_BYTES = 1_500_000_000  # the small model, a notebook's work, and the kernel
SMALL_MODEL = "smollm2-135m"
BIG_MODEL = "llama-2-13b-chat"
GPU_TRACKS = [("13b-bf16", "bf16"), ("13b-int8", "int8"), ("13b-nf4", "nf4")]  # best first


@dataclass(frozen=True)
class Track:
    """One way to run the lessons on this machine, with the memory figures behind the choice."""

    name: str  # "13b-bf16", "13b-int8", "13b-nf4" or "small-cpu"
    model: str  # the registry name to load
    device: str  # "cuda" or "cpu"
    weights: str  # how the weights are stored: "bf16", "int8", "nf4" (GPU) or "fp32" (small model)
    dtype: str  # the dtype the model computes in: "bf16", "fp16" (GPUs without bf16) or "fp32"
    needed: int  # bytes the track needs on `device`
    available: int  # bytes free there
    reason: str  # one line: why this track

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    @property
    def load_kwargs(self) -> dict:
        """The keyword arguments of `load_model(track.model, **track.load_kwargs)`."""
        quantize = self.weights if self.weights in sizing.QUANTIZED else None
        return {"device": self.device, "dtype": self.dtype, "quantize": quantize}

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_track(gpu_free_bytes: int | None, cpu_free_bytes: int, *, bf16: bool = True,
                 context_len: int = 4096) -> Track:
    """The best Llama-2-13B track that fits, from the free memory alone (no GPU: `gpu_free_bytes=None`).

    A 13B track needs the weights, a KV cache of `context_len` tokens and `models.HEADROOM_BYTES`
    (`models.memory_needed`: the same test `load_model` applies before loading). On a GPU without
    bf16 (T4, V100) the model computes in fp16, which takes the same bytes.

    >>> track = choose_track(80 * 10**9, 100 * 10**9)  # an H100
    >>> track.name, track.load_kwargs
    ('13b-bf16', {'device': 'cuda', 'dtype': 'bf16', 'quantize': None})
    """
    spec = models.MODELS[BIG_MODEL]
    compute = "bf16" if bf16 else "fp16"
    refused = ""
    if gpu_free_bytes is not None:
        for name, weights in GPU_TRACKS:
            needed = models.memory_needed(spec, weights, context_len)
            if needed <= gpu_free_bytes:
                parts = sizing.memory_estimate(sizing.llama2_config(spec.size), weights, context_len)
                reason = (f"{refused}Llama-2-13B in {weights} fits the GPU: weights {_gb(parts.weights)} "
                          f"+ KV cache {_gb(parts.kv_cache)} ({context_len} tokens) + headroom "
                          f"{_gb(models.HEADROOM_BYTES)} = {_gb(needed)}, {_gb(gpu_free_bytes)} free"
                          + ("" if bf16 or weights != "bf16" else " (in fp16: this GPU has no bf16)"))
                return Track(name, BIG_MODEL, "cuda", weights, compute, needed, gpu_free_bytes, reason)
            refused = f"{weights} needs {_gb(needed)}, the GPU has {_gb(gpu_free_bytes)} free; "
        why = f"even NF4 needs {_gb(needed)} and the GPU has {_gb(gpu_free_bytes)} free"
    else:
        why = "no CUDA GPU"
    fits = SMALL_TRACK_BYTES <= cpu_free_bytes
    reason = (f"{why}: the small model on the CPU (needs {_gb(SMALL_TRACK_BYTES)}, "
              f"{_gb(cpu_free_bytes)} free{'' if fits else ': close other programs or notebooks'})")
    return Track("small-cpu", SMALL_MODEL, "cpu", "fp32", "fp32", SMALL_TRACK_BYTES, cpu_free_bytes, reason)


def gpu_only(track: Track, shows: str, ready: bool = True) -> bool:
    """For a GPU cell of notebook 06: True when `track` runs on a GPU and what the cell needs is
    `ready`; otherwise print one line that says what the cell would show and what it needs.

    >>> gpu_only(choose_track(None, 8 * 10**9), "the chat reply")  # doctest: +ELLIPSIS
    ⏭  GPU track only: this cell shows the chat reply. It needs a CUDA GPU with 11.6 GB free ...
    False
    """
    if track.device == "cuda" and ready:
        return True
    if track.device == "cuda":
        print(f"⏭  This cell shows {shows}. It needs the model loaded above, which did not load: see the "
              "message there.")
    else:
        needed = models.memory_needed(models.MODELS[BIG_MODEL], "nf4")
        print(f"⏭  GPU track only: this cell shows {shows}. It needs a CUDA GPU with {_gb(needed)} free "
              f"(Llama-2-13B in NF4: Colab's free T4); this machine's track is {track.name}.")
    return False


@dataclass(frozen=True)
class Machine:
    """What `pick_track` reads: the GPU (if any), its free memory and bf16 support, and free RAM."""

    gpu_name: str | None
    gpu_free_bytes: int | None
    bf16: bool
    cpu_free_bytes: int


def read_machine() -> Machine:
    """This machine's GPU and free memory (RAM under the container's limit: `models.available_memory`)."""
    import torch

    cpu_free = models.available_memory("cpu")
    if not torch.cuda.is_available():
        return Machine(None, None, False, cpu_free)
    return Machine(torch.cuda.get_device_name(0), models.available_memory("cuda"),
                   torch.cuda.is_bf16_supported(), cpu_free)


def pick_track(context_len: int = 4096) -> Track:
    """The track `choose_track` picks for this machine."""
    machine = read_machine()
    return choose_track(machine.gpu_free_bytes, machine.cpu_free_bytes, bf16=machine.bf16,
                        context_len=context_len)


# CUDA device names -> keys of sizing.GPU_BANDWIDTH_GB_S ("NVIDIA H100 80GB HBM3" is the SXM card).
_GPU_NAMES = [
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b(?!.*\b(PCIE|NVL)\b)", "H100 SXM"),  # the NVL card (3.9 TB/s) is not in the table
    (r"\bA100\b.*\b80GB\b", "A100 80GB"),
    (r"\bA100\b", "A100 40GB"),
    (r"\bRTX 4090\b", "RTX 4090"),
    (r"\bA10G\b", "A10G"),
    (r"\bL4\b", "L4"),
    (r"\bT4\b", "T4"),
]


def gpu_key(device_name: str) -> str | None:
    """The `sizing.GPU_BANDWIDTH_GB_S` entry for a CUDA device name, or None for a GPU not in the table.

    >>> gpu_key("NVIDIA A100-SXM4-80GB"), gpu_key("Tesla T4"), gpu_key("NVIDIA L40S")
    ('A100 80GB', 'T4', None)
    """
    name = re.sub(r"[-_]", " ", device_name.upper())
    return next((key for pattern, key in _GPU_NAMES if re.search(pattern, name)), None)


def spec_bandwidth_gb_s(device_name: str) -> float | None:
    """The spec-sheet memory bandwidth of a CUDA device, GB/s (None when the table lacks it)."""
    key = gpu_key(device_name)
    return None if key is None else float(sizing.GPU_BANDWIDTH_GB_S[key])
