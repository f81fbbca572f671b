"""Batch-1 greedy decode speed on SmolLM2-135M, against transformers and the bandwidth roofline.

Decoding one token reads every weight once, so on a CPU the speed limit is
memory bandwidth / bytes read per token (`llama_lab.sizing.decode_roofline`).
This script measures, in one run and on one machine:

1. the read bandwidth: `tensor.sum()` over a tensor as large as the bytes one
   decode step reads, repeated once per new token, so that it takes as long as a
   decode run and meets the same disturbances;
2. transformers' `model.generate`, llama-lab's `sampling.generate` on the same
   transformers model, and on the from-scratch model of `llama_lab.scratch`
   (greedy: all must produce the same tokens), as loaded and after
   `sampling.decode_layout` (weights stored transposed for faster matrix-vector products);
3. the from-scratch model with and without its KV cache.

Runs go in rounds (each measurement once per round), so that other programs
on a shared machine slow them alike; the best round of each counts. It prints
tokens/s, the ratio to transformers and the fraction of the roofline.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 5] [--threads N] [--kv-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import llama_lab as lab  # noqa: E402
from llama_lab import sampling, scratch, sizing  # noqa: E402

PROMPT = "The history of the printing press begins"


def read_bandwidth_gb_s(n_bytes: int, times: int = 1) -> tuple[float, float]:
    """Sum a float32 tensor of `n_bytes`, `times` times over: (GB/s, seconds taken)."""
    x = torch.ones(n_bytes // 4)
    start = time.perf_counter()
    for _ in range(times):
        x.sum()
    seconds = time.perf_counter() - start
    return n_bytes * times / seconds / 1e9, seconds


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kv-tokens", type=int, default=128,
                        help="new tokens for the with/without KV cache comparison (0: skip it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lab.setup()
    print(machine())

    model, tokenizer = lab.load_model("smollm2-135m", device="cpu")
    mine = scratch.from_hf(model)
    fast = sampling.decode_layout(scratch.from_hf(model))  # its own copy of the weights, transposed
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    n, eos = args.new_tokens, tokenizer.eos_token_id
    runs = {
        "transformers generate": lambda: model.generate(ids, max_new_tokens=n, do_sample=False),
        "llama-lab generate, HF model": lambda: sampling.generate(model, ids, n),
        "llama-lab generate, scratch model": lambda: sampling.generate(mine, ids, n, eos_token_id=eos),
        "  same, after decode_layout": lambda: sampling.generate(fast, ids, n, eos_token_id=eos),
    }
    outputs = {name: run() for name, run in runs.items()}  # also the warm-up
    reference = outputs["transformers generate"]
    assert reference.shape[1] == ids.shape[1] + n, "the prompt's continuation ended early: pick another"
    for name, out in outputs.items():  # same tokens, or the speed comparison means nothing
        assert torch.equal(out, reference), f"{name} decoded other tokens than transformers"

    # The roofline run: read the bytes of one decode step, n times, as fast as torch can.
    bytes_per_token = sizing.bytes_read_per_token(model.config, "fp32", context_len=ids.shape[1] + n // 2)
    probe = lambda: read_bandwidth_gb_s(bytes_per_token, n)[1]
    # Rounds of every run in turn, so the other programs on the machine slow them all alike.
    seconds = {name: [] for name in ["roofline (read the weights n times)", *runs]}
    for _ in range(args.repeats):
        seconds["roofline (read the weights n times)"].append(probe())
        for name, run in runs.items():
            seconds[name].append(timed(run))
    best = {name: min(times) for name, times in seconds.items()}
    bandwidth = bytes_per_token * n / best.pop("roofline (read the weights n times)") / 1e9
    roofline = bandwidth * 1e9 / bytes_per_token
    print(f"read bandwidth {bandwidth:.1f} GB/s (sum of a {bytes_per_token / 1e6:.0f} MB tensor, "
          f"{n} times); {bytes_per_token / 1e6:.0f} MB read per token -> roofline {roofline:.1f} tokens/s")
    print(f"greedy, prompt {ids.shape[1]} tokens + {n} new, best of {args.repeats} rounds "
          "(time includes the prompt)")
    base = n / best["transformers generate"]
    print(f"{'':36}{'tokens/s':>10}{'vs transformers':>17}{'of roofline':>13}")
    for name, secs in best.items():
        speed = n / secs
        print(f"{name:36}{speed:10.1f}{speed / base:16.2f}x{speed / roofline:12.0%}")

    if args.kv_tokens:
        k = args.kv_tokens
        without = timed(lambda: sampling.generate(fast, ids, k, eos_token_id=[], use_cache=False))
        with_cache = min(timed(lambda: sampling.generate(fast, ids, k, eos_token_id=[])) for _ in range(3))
        print(f"KV cache, scratch model, {k} new tokens (best of 3 runs with, 1 without): "
              f"{k / with_cache:.1f} tokens/s with, "
              f"{k / without:.1f} without: {without / with_cache:.1f}x faster")
    print(f"load average after the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
