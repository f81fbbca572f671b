"""Batch-1 greedy decode speed on SmolLM2-135M, against transformers and the bandwidth roofline.

Decoding one token reads every weight once, so on a CPU the speed limit is
memory bandwidth / bytes read per token (`llama_lab.sizing.decode_roofline`).
This script measures, in one run and on one machine:

1. the read bandwidth: `tensor.sum()` over a random tensor as large as the bytes
   one decode step reads, repeated once per decode step, so that it takes as long
   as a decode run; it is read again between every two decode runs, because a
   shared machine's bandwidth drifts;
2. transformers' `model.generate`, llama-lab's `sampling.generate` on the same
   transformers model, and on the from-scratch model of `llama_lab.scratch`
   (greedy: all must produce the same tokens), eager and after
   `compiled_decode.compile_decode`;
3. the from-scratch model with and without its KV cache.

Each generate runs twice per round: for n new tokens and for one. The first
gives tokens/s as a user sees them (prompt included); the difference gives the
speed of the n - 1 decode steps alone, which is what the roofline bounds.
Runs go in rounds (each measurement once per round), so that other programs on
a shared machine slow them alike; the best round of each counts. The fraction
of the roofline comes twice: best decode against best bandwidth, and the median
of each run against the higher of the bandwidths read just before and after it.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 5] [--threads N] [--kv-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import llama_lab as lab  # noqa: E402
from llama_lab import compiled_decode, sampling, scratch, sizing  # noqa: E402

PROMPT = "The history of the printing press begins"


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
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
    fast = compiled_decode.compile_decode(scratch.from_hf(model))  # shares the weights
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    n, eos = args.new_tokens, tokenizer.eos_token_id
    runs = {
        "transformers generate": lambda k: model.generate(ids, max_new_tokens=k, do_sample=False),
        "llama-lab generate, HF model": lambda k: sampling.generate(model, ids, k),
        "llama-lab generate, scratch model": lambda k: sampling.generate(mine, ids, k, eos_token_id=eos),
        "  same, after compile_decode": lambda k: sampling.generate(fast, ids, k, eos_token_id=eos),
    }
    compile_seconds = timed(runs["  same, after compile_decode"], 2)  # its first decode step compiles
    outputs = {name: run(n) for name, run in runs.items()}  # also the warm-up
    reference = outputs["transformers generate"]
    assert reference.shape[1] == ids.shape[1] + n, "the prompt's continuation ended early: pick another"
    for name, out in outputs.items():  # same tokens, or the speed comparison means nothing
        assert torch.equal(out, reference), f"{name} decoded other tokens than transformers"

    # The roofline: read the bytes of one decode step, n - 1 times, as fast as torch can. The
    # machine's bandwidth drifts (other machines share the host's memory), so it is read between
    # every two decode runs: each run also has a roofline of its own moment, the faster of the
    # readings just before and just after it.
    bytes_per_token = sizing.bytes_read_per_token(model.config, "fp32", context_len=ids.shape[1] + n // 2)
    weights_sized = torch.randn(bytes_per_token // 4)
    probe = lambda: [weights_sized.sum() for _ in range(n - 1)]
    # Rounds of every run in turn, so the other programs on the machine slow them all alike.
    full, one, paired = ({name: [] for name in runs} for _ in range(3))
    probes = [timed(probe)]
    for _ in range(args.repeats):
        for name, run in runs.items():
            full[name].append(timed(run, n))
            one[name].append(timed(run, 1))
            probes.append(timed(probe))
            paired[name].append(min(probes[-2:]) / (full[name][-1] - one[name][-1]))
    bandwidth = bytes_per_token * (n - 1) / min(probes) / 1e9
    roofline = bandwidth * 1e9 / bytes_per_token
    mb = bytes_per_token / 1e6
    print(f"read bandwidth {bandwidth:.1f} GB/s at best (sum of a {mb:.0f} MB tensor, {n - 1} times, "
          f"{len(probes)} tries: {bytes_per_token * (n - 1) / max(probes) / 1e9:.1f} at worst); "
          f"{mb:.0f} MB read per token -> roofline {roofline:.1f} tokens/s")
    print(f"compile_decode: its first generate took {compile_seconds:.0f} s (compilation)")
    print(f"greedy, prompt {ids.shape[1]} tokens + {n} new, best of {args.repeats} rounds; of roofline: "
          "best decode / best roofline, and the median over rounds of each decode run / the higher "
          "of the rooflines read just before and just after it")
    base = n / min(full["transformers generate"])
    print(f"{'':36}{'generate':>10}{'vs':>14}{'decode steps':>14}{'of roofline':>13}{'of roofline':>13}")
    print(f"{'':36}{'tokens/s':>10}{'transformers':>14}{'tokens/s':>14}{'best':>13}{'same moment':>13}")
    for name in runs:
        speed = n / min(full[name])
        steps = (n - 1) / (min(full[name]) - min(one[name]))
        print(f"{name:36}{speed:10.1f}{speed / base:13.2f}x{steps:14.1f}{steps / roofline:13.0%}"
              f"{statistics.median(paired[name]):13.0%}")

    if args.kv_tokens:
        k = args.kv_tokens
        without = timed(lambda: sampling.generate(mine, ids, k, eos_token_id=[], use_cache=False))
        with_cache = min(timed(lambda: sampling.generate(mine, ids, k, eos_token_id=[])) for _ in range(3))
        print(f"KV cache, scratch model (eager), {k} new tokens (best of 3 runs with, 1 without): "
              f"{k / with_cache:.1f} tokens/s with, "
              f"{k / without:.1f} without: {without / with_cache:.1f}x faster")
    print(f"load average after the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
