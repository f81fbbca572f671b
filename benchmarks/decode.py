"""Batch-1 greedy decode speed on SmolLM2-135M, against transformers and the bandwidth roofline.

Decoding one token reads every weight once, so on a CPU the speed limit is
memory bandwidth / bytes read per token (`llama_lab.sizing.decode_roofline`).
This script measures, in one run and on one machine:

1. the read bandwidth: `tensor.sum()` over a random tensor as large as the bytes
   one decode step reads (in 2 MB pages where the machine has them, as `compile_decode`
   puts the weights), repeated once per decode step, so that it takes as long
   as a decode run; it is read again between every two decode runs, because a
   shared machine's bandwidth drifts;
2. transformers' `model.generate`, llama-lab's `sampling.generate` on the same
   transformers model, and on the from-scratch model of `llama_lab.scratch`
   (greedy: all must produce the same tokens), eager and after
   `compiled_decode.compile_decode`, in fp32 and in bf16 (`dtype=torch.bfloat16`: its greedy
   tokens are compared with fp32's, not required to be equal), each with torch.compile and
   ahead of time (`ahead_of_time=True`: AOTInductor, no Python between the kernels);
3. llama.cpp, when `llama_cpp` (llama-cpp-python) is importable: the same model's GGUF file
   dequantized to F32 and to F16 GGUF files (made once, in the cache), greedy, as many threads
   as torch; never a dependency of llama-lab (benchmarks/README.md says how to build it);
4. the from-scratch model with and without its KV cache.

Each generate runs twice per round: for n new tokens and for one. The first
gives tokens/s as a user sees them (prompt included); the difference gives the
speed of the n - 1 decode steps alone, which is what the roofline bounds.
Runs go in rounds (each measurement once per round), so that other programs on
a shared machine slow them alike; the best round of each counts. The fraction
of the roofline comes twice: best decode against best bandwidth, and the median
of each run against the higher of the bandwidths read just before and after it.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 5] [--threads N] [--kv-tokens 128] [--skip-eager]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import llama_lab as lab  # noqa: E402
from llama_lab import compiled_decode, models, sampling, scratch, sizing  # noqa: E402

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


def peer_gguf(kind: str) -> str:
    """The model's GGUF file with every tensor dequantized, to "F32" or to "F16" (2-D tensors; the
    norms stay F32, as llama.cpp's converter does), metadata kept: written once into the cache."""
    import gguf

    source = models.smollm2_gguf_path()
    target = models.cache_dir() / "gguf" / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        half = kind == "F16" and weights.ndim > 1
        writer.add_tensor(tensor.name, weights.astype(np.float16) if half else weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return str(target)


def peer_runs(ids: torch.Tensor, threads: int) -> dict[str, tuple[Callable[[int], object], str]]:
    """llama.cpp's greedy decoding of the F32 and F16 files, as runs of the table: each call
    evaluates the prompt from scratch (no prefix reuse) and returns the k new tokens."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    from llama_cpp import Llama

    def run(llm: Llama, k: int) -> torch.Tensor:
        llm.reset()  # forget the previous run: the prompt is evaluated again
        new = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=False):
            new.append(token)
            if len(new) == k:
                return torch.tensor([ids[0].tolist() + new])
        raise RuntimeError("llama.cpp stopped early")

    runs = {}
    for kind, dtype in (("F32", "fp32"), ("F16", "fp16")):
        llm = Llama(peer_gguf(kind), n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        runs[f"llama.cpp {kind}"] = (lambda k, llm=llm: run(llm, k), dtype)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kv-tokens", type=int, default=128,
                        help="new tokens for the with/without KV cache comparison (0: skip it)")
    parser.add_argument("--skip-eager", action="store_true",
                        help="leave out llama-lab's eager rows (transformers stays: the table's baseline)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lab.setup()
    print(machine())

    model, tokenizer = lab.load_model("smollm2-135m", device="cpu")
    mine = scratch.from_hf(model)
    fast = compiled_decode.compile_decode(scratch.from_hf(model))  # shares the weights
    fast16 = compiled_decode.compile_decode(scratch.from_hf(model), dtype=torch.bfloat16)  # a bf16 copy
    start = time.perf_counter()  # ahead of time: compiled here (or loaded from the cache)
    ahead = compiled_decode.compile_decode(scratch.from_hf(model), ahead_of_time=True)
    middle = time.perf_counter()
    ahead16 = compiled_decode.compile_decode(scratch.from_hf(model), dtype=torch.bfloat16, ahead_of_time=True)
    ahead_seconds = [middle - start, time.perf_counter() - middle]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    n, eos = args.new_tokens, tokenizer.eos_token_id
    ours = lambda m: lambda k: sampling.generate(m, ids, k, eos_token_id=eos)
    runs = {  # name: (generate k new tokens, the dtype of the weights it reads)
        "transformers generate": (lambda k: model.generate(ids, max_new_tokens=k, do_sample=False), "fp32"),
        "llama-lab generate, HF model": (lambda k: sampling.generate(model, ids, k), "fp32"),
        "llama-lab generate, scratch model": (ours(mine), "fp32"),
        "  same, after compile_decode": (ours(fast), "fp32"),
        "  same, compile_decode in bf16": (ours(fast16), "bf16"),
        "  same, ahead of time": (ours(ahead), "fp32"),
        "  same, ahead of time in bf16": (ours(ahead16), "bf16"),
    }
    if args.skip_eager:
        for name in ("llama-lab generate, HF model", "llama-lab generate, scratch model"):
            del runs[name]
    compile_seconds = [timed(runs[name][0], 2) for name in ("  same, after compile_decode",
                                                             "  same, compile_decode in bf16")]
    runs |= peer_runs(ids, torch.get_num_threads())
    outputs = {name: run(n) for name, (run, _) in runs.items()}  # also the warm-up
    reference = outputs["transformers generate"]
    assert reference.shape[1] == ids.shape[1] + n, "the prompt's continuation ended early: pick another"
    for name, out in outputs.items():  # same tokens in fp32, or the speed comparison means nothing
        if runs[name][1] == "fp32" and not name.startswith("llama.cpp"):
            assert torch.equal(out, reference), f"{name} decoded other tokens than transformers"

    # The roofline: read the bytes of one fp32 decode step, n - 1 times, as fast as torch can. The
    # machine's bandwidth drifts (other machines share the host's memory), so it is read between
    # every two decode runs: each run also has a roofline of its own moment, the faster of the
    # readings just before and just after it. A run in 16-bit weights reads about half the bytes.
    context = ids.shape[1] + n // 2
    step_bytes = {dtype: sizing.bytes_read_per_token(model.config, dtype, context_len=context)
                  for dtype in {dtype for _, dtype in runs.values()}}
    bytes_per_token = step_bytes["fp32"]
    weights_sized = torch.randn(bytes_per_token // 4)
    huge = compiled_decode.huge_pages_available()
    if huge:  # in 2 MB pages, as compile_decode puts the weights: the bandwidth at its best
        weights_sized, = compiled_decode.in_huge_pages([weights_sized])
    probe = lambda: [weights_sized.sum() for _ in range(n - 1)]
    # Rounds of every run in turn, so the other programs on the machine slow them all alike.
    full, one, paired = ({name: [] for name in runs} for _ in range(3))
    probes = [timed(probe)]
    for _ in range(args.repeats):
        for name, (run, dtype) in runs.items():
            full[name].append(timed(run, n))
            one[name].append(timed(run, 1))
            probes.append(timed(probe))
            share = step_bytes[dtype] / bytes_per_token  # of the probe's bytes
            paired[name].append(min(probes[-2:]) * share / (full[name][-1] - one[name][-1]))
    bandwidth = bytes_per_token * (n - 1) / min(probes) / 1e9
    mb, worst = bytes_per_token / 1e6, bytes_per_token * (n - 1) / max(probes) / 1e9
    pages = "2 MB" if huge else "4 KB"
    rooflines = ", ".join(f"{dtype} {b / 1e6:.0f} MB -> {bandwidth * 1e9 / b:.1f} tokens/s"
                          for dtype, b in sorted(step_bytes.items()))
    print(f"read bandwidth {bandwidth:.1f} GB/s at best (sum of a {mb:.0f} MB tensor in {pages} pages, "
          f"{n - 1} times, {len(probes)} tries: {worst:.1f} at worst); read per token -> roofline: "
          f"{rooflines}")
    print(f"compile_decode: its first generate took {compile_seconds[0]:.0f} s in fp32, "
          f"{compile_seconds[1]:.0f} s in bf16 (compilation); ahead of time, compile_decode took "
          f"{ahead_seconds[0]:.0f} s in fp32, {ahead_seconds[1]:.0f} s in bf16 (compiled, or loaded from "
          "the cache)")
    print(f"greedy, prompt {ids.shape[1]} tokens + {n} new, best of {args.repeats} rounds; of roofline: "
          "best decode / best roofline, and the median over rounds of each decode run / the higher "
          "of the rooflines read just before and just after it")
    base = n / min(full["transformers generate"])
    print(f"{'':36}{'weights':>8}{'generate':>10}{'vs':>14}{'decode steps':>14}{'of roofline':>13}"
          f"{'of roofline':>13}{'same tokens':>13}")
    print(f"{'':36}{'':>8}{'tokens/s':>10}{'transformers':>14}{'tokens/s':>14}{'best':>13}{'same moment':>13}"
          f"{'as fp32':>13}")
    for name, (_, dtype) in runs.items():
        speed = n / min(full[name])
        steps = (n - 1) / (min(full[name]) - min(one[name]))
        roofline = bandwidth * 1e9 / step_bytes[dtype]
        agree = compiled_decode.tokens_agree(reference[0, ids.shape[1]:], outputs[name][0, ids.shape[1]:])
        print(f"{name:36}{dtype:>8}{speed:10.1f}{speed / base:13.2f}x{steps:14.1f}{steps / roofline:13.0%}"
              f"{statistics.median(paired[name]):13.0%}{agree:>9} / {n}")
    new = reference[0, ids.shape[1]:]
    for how, name, half in (("torch.compile", "  same, compile_decode in bf16", fast16),
                            ("ahead of time", "  same, ahead of time in bf16", ahead16)):
        bf16 = compiled_decode.compare_greedy(new, outputs[name][0, ids.shape[1]:],
                                              compiled_decode.step_logits(fast, ids, new),
                                              compiled_decode.step_logits(half, ids, new))
        print(f"bf16 ({how}) against fp32 (torch.compile): the first {bf16['tokens_agree']} of {n} greedy "
              f"tokens agree; on fp32's text the top token agrees at {bf16['top_token_agree']} of {n} steps "
              f"and the logits differ by at most {bf16['max_logit_diff']:.2f} (the largest logit: "
              f"{bf16['max_logit']:.1f})")

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
