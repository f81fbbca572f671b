"""Llama-2-13B decode speed on a GPU against its memory-bandwidth roofline, with no download.

Decode speed at batch 1 does not depend on what the weights are, only on how many bytes each
step reads, so this builds a model of Llama-2-13B's exact shape with random bf16 weights
directly on the device and measures, in one run:

1. the device's copy bandwidth (`dst.copy_(src)`, bytes read + written), beside the spec sheet's
   figure (`llama_lab.sizing.GPU_BANDWIDTH_GB_S`);
2. transformers' `generate`, eager (the default dynamic KV cache): batch 1, a prompt of 128
   tokens, 256 new tokens, best of 3;
3. the optimized path: `generate` with a static KV cache and `torch.compile` (inductor; CUDA
   graphs on a GPU, mode "reduce-overhead"), the same measurement;
4. the same model in 4-bit NF4 (bitsandbytes, when installed), eager.

Each is timed for 1 new token and for 256: the first is the prompt alone, the difference the 255
decode steps, which is what the roofline bounds (`sizing.decode_roofline`: bandwidth / bytes read
per step, at the mean context of the steps). Reported: decode and generate tokens/s, the fraction
of the roofline at the measured and at the spec bandwidth, peak memory against
`sizing.memory_estimate`. Progress goes to stdout as it happens and the JSON report is rewritten
after every step, so a run cut short still leaves its figures; a time budget (`--budget-s`) skips
the phases that no longer fit.

    python benchmarks/gpu_13b.py          # on a CUDA GPU; writes benchmarks/gpu_13b.json
    python benchmarks/gpu_13b.py --layers 1 --vocab-size 512 --device cpu \
        --prompt-tokens 8 --new-tokens 4 --repeats 1 --out /tmp/gpu_13b.json

`--layers N` truncates the model to N decoder layers and `--vocab-size` its vocabulary (same width,
same code path): the tests run it that way on a CPU, where only the CUDA lines (synchronize, memory
statistics) do not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # llama_lab from this checkout

import torch  # noqa: E402
import transformers  # noqa: E402

from llama_lab import hardware, sizing  # noqa: E402

START = time.perf_counter()


class TimeUp(Exception):
    """A phase ran past the time it was given."""


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


class Report:
    """The JSON report, rewritten whole (atomically) after every change."""

    def __init__(self, path: Path, args: argparse.Namespace):
        self.path = path
        self.data = {"script": "benchmarks/gpu_13b.py", "status": "running", "args": vars(args),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "runs": {}, "skipped": {}, "errors": {}}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - START, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "bitsandbytes": bitsandbytes_version()}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        info |= {"name": name, "memory_total_bytes": total, "memory_free_bytes": free,
                 "bf16": torch.cuda.is_bf16_supported(),
                 "spec_bandwidth_gb_s": hardware.spec_bandwidth_gb_s(name)}
    else:
        info |= {"name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                 "spec_bandwidth_gb_s": None}
    return info


def bitsandbytes_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def copy_bandwidth(device: str, n_bytes: int, repeats: int = 20) -> float:
    """GB/s of `dst.copy_(src)`, counting the bytes read and the bytes written; best of `repeats`."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best / 1e9


def build_model(config, device: str):
    """A LlamaForCausalLM of `config`'s shape, random bf16 weights, allocated on `device` directly."""
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # random weights: never stop before the last token
    model.generation_config.pad_token_id = 0
    return model


def static_cache(model, max_cache_len: int):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # transformers 4.x wants the batch size, device and dtype too
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_cache_len,
                           device=model.device, dtype=torch.bfloat16)


def generate_fn(model, device: str, compiled: bool, max_cache_len: int):
    """`run(prompt, n)`: greedy generate of exactly n new tokens, eager or with a static cache + compile."""
    if not compiled:
        return lambda prompt, n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                disable_compile=True)
    from transformers import CompileConfig

    config = CompileConfig() if device.startswith("cuda") else CompileConfig(mode="default")
    config._compile_all_devices = not device.startswith("cuda")  # transformers compiles on GPUs only, unless
    cache = static_cache(model, max_cache_len)

    def run(prompt, n):
        cache.reset()
        with warnings.catch_warnings():  # `past_key_values` is named `cache` from transformers 5.2x on
            warnings.simplefilter("ignore", FutureWarning)
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  past_key_values=cache, compile_config=config)
    return run


def timed(fn, device: str, *args) -> float:
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (torch and all)"


def measure(name: str, run, prompt, args, config, weights: str, bandwidth: dict, report: Report) -> dict:
    """Warm up, then rounds of (1 token, n tokens); the best of each; tokens/s against the rooflines."""
    device, n = args.device, args.new_tokens
    reset_peak(device)
    warmup = timed(run, device, prompt, min(n, 8))  # the first call compiles on the optimized path
    result = {"warmup_s": round(warmup, 2), "rounds": []}
    log(f"{name}: warm-up done in {warmup:.1f} s")
    for i in range(args.repeats):
        one, many = timed(run, device, prompt, 1), timed(run, device, prompt, n)
        result["rounds"].append({"seconds_1_token": one, f"seconds_{n}_tokens": many})
        log(f"{name}: round {i + 1}/{args.repeats}: 1 new token {one:.3f} s, {n} new tokens {many:.3f} s")
        report.data["runs"][name] = result
        report.write()
    best_one = min(r["seconds_1_token"] for r in result["rounds"])
    best_many = min(r[f"seconds_{n}_tokens"] for r in result["rounds"])
    context = args.prompt_tokens + n // 2  # the mean context of the decode steps
    result |= {"generate_tokens_per_s": n / best_many, "best_seconds_1_token": best_one,
               f"best_seconds_{n}_tokens": best_many,
               "decode_tokens_per_s": (n - 1) / (best_many - best_one) if best_many > best_one else None,
               "bytes_read_per_step": sizing.bytes_read_per_token(config, weights, context)}
    for source, gb_s in [("measured", bandwidth.get("copy_gb_s")), ("spec", bandwidth.get("spec_gb_s"))]:
        if gb_s and result["decode_tokens_per_s"]:
            roofline = sizing.decode_roofline(config, weights, gb_s, context_len=context)
            result[f"roofline_{source}_tokens_per_s"] = roofline
            result[f"fraction_of_{source}_roofline"] = result["decode_tokens_per_s"] / roofline
    peak, kind = peak_bytes(device)
    estimate = sizing.memory_estimate(config, weights, context_len=args.prompt_tokens + n)
    result |= {"peak_bytes": peak, "peak_kind": kind, "memory_estimate_bytes": estimate.total,
               "memory_estimate": str(estimate)}
    log(f"{name}: {summary(result)}")
    return result


def summary(run: dict) -> str:
    decode = run.get("decode_tokens_per_s")
    parts = [f"decode {decode:.1f} tokens/s" if decode else "decode: n tokens took no longer than 1",
             f"generate {run['generate_tokens_per_s']:.1f} tokens/s"]
    for source in ("measured", "spec"):
        if f"fraction_of_{source}_roofline" in run:
            parts.append(f"{run[f'fraction_of_{source}_roofline']:.0%} of the {source} roofline "
                         f"({run[f'roofline_{source}_tokens_per_s']:.0f} tokens/s)")
    parts.append(f"peak {run['peak_bytes'] / 1e9:.2f} GB (estimate {run['memory_estimate_bytes'] / 1e9:.2f})")
    return "; ".join(parts)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, with the scales bitsandbytes keeps beside its 4-bit ones."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
    return total


def to_nf4(model, device: str) -> int:
    """Replace every linear layer of the decoder by bitsandbytes' NF4 one (double-quantized scales,
    bf16 compute), freeing each bf16 weight as it goes; returns the bytes of the model's weights."""
    from llama_lab.quantize import import_bitsandbytes

    bnb = import_bitsandbytes(device)
    if hasattr(model, "_compiled_call"):  # the compiled bf16 step and its CUDA graphs: not needed any more
        del model._compiled_call
    torch._dynamo.reset()
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64).to(device)
                    setattr(parent, child_name, q)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return weight_bytes(model)


class Budget:
    """The run's time budget: phases are skipped when too little is left, and stopped when they
    run past what is left (SIGALRM), so the report is always written in time."""

    def __init__(self, seconds: float, device: str, reserve: float = 15):
        self.end, self.device, self.reserve = START + seconds, device, reserve

    def left(self) -> float:
        return self.end - time.perf_counter()

    def run(self, name: str, needs: float, fn, report: Report):
        if self.left() < needs:
            report.data["skipped"][name] = f"{self.left():.0f} s left, needs about {needs:.0f} s"
            report.write()
            log(f"{name}: skipped ({report.data['skipped'][name]})")
            return None
        signal.setitimer(signal.ITIMER_REAL, max(self.left() - self.reserve, 1))
        try:
            return fn()
        except Exception as err:  # a phase that fails leaves the others and the report standing
            report.data["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
            report.write()
            log(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            if not isinstance(err, TimeUp):
                traceback.print_exc(limit=4)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=40, help="decoder layers (Llama-2-13B has 40)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="Llama-2-13B has 32000")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=540, help="stop in time to write the report")
    parser.add_argument("--skip", nargs="*", default=[], choices=["eager", "compiled", "nf4"])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu_13b.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    report = Report(args.out, args)
    budget = Budget(args.budget_s, device)

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            raise TimeUp(f"out of time ({args.budget_s:.0f} s budget)")
        report.set("status", f"interrupted by signal {signum}")
        log(f"interrupted (signal {signum}): report written to {args.out}")
        sys.exit(128 + signum)

    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    report.set("machine", machine(device))
    m = report.data["machine"]
    log(f"gpu_13b on {m['name']} ({device}), torch {m['torch']}, transformers {m['transformers']}, "
        f"bitsandbytes {m['bitsandbytes'] or 'not installed'}; {args.layers} layers, prompt "
        f"{args.prompt_tokens}, {args.new_tokens} new tokens, best of {args.repeats}")

    config = sizing.llama2_config("13b")
    config.num_hidden_layers, config.vocab_size = args.layers, args.vocab_size
    weights_bf16 = sizing.weight_bytes(config, "bf16")

    def bandwidth():
        n_bytes = 2 * 2**30 if device.startswith("cuda") else 256 * 2**20
        gb_s = copy_bandwidth(device, n_bytes)
        result = {"copy_gb_s": gb_s, "copy_bytes": n_bytes, "spec_gb_s": m.get("spec_bandwidth_gb_s")}
        report.set("bandwidth", result)
        spec = f", spec sheet {result['spec_gb_s']:.0f} GB/s" if result["spec_gb_s"] else ""
        log(f"copy bandwidth {gb_s:.0f} GB/s (read + write, {n_bytes / 1e9:.1f} GB copied, best of 20){spec}")
        return result

    bw = budget.run("bandwidth", 5, bandwidth, report) or {}

    def build():
        start = time.perf_counter()
        model = build_model(config, device)
        sync(device)
        count = sum(p.numel() for p in model.parameters())
        assert count == sizing.count_parameters(config), (count, sizing.count_parameters(config))
        report.set("model", {"layers": args.layers, "parameters": count, "weight_bytes": weights_bf16,
                             "build_s": round(time.perf_counter() - start, 1)})
        log(f"built a Llama-2-13B-shaped model ({args.layers} layers), random bf16 weights on {device}: "
            f"{count:,} parameters, {weights_bf16 / 1e9:.2f} GB, in {time.perf_counter() - start:.1f} s")
        return model

    model = budget.run("build", 10, build, report)
    if model is None:
        report.set("status", "failed: no model")
        return 1
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    max_len = args.prompt_tokens + args.new_tokens

    def phase(name: str, compiled: bool, weights: str):
        def go():
            run = generate_fn(model, device, compiled, max_len)
            result = measure(name, run, prompt, args, config, weights, bw, report)
            report.data["runs"][name] = result
            report.write()
            return result
        return go

    if "eager" not in args.skip:
        budget.run("eager", 30, phase("eager", False, "bf16"), report)
    if "compiled" not in args.skip:
        budget.run("compiled", 120, phase("compiled", True, "bf16"), report)
    if "nf4" not in args.skip:
        if m["bitsandbytes"] is None:
            report.data["skipped"]["nf4"] = "bitsandbytes is not installed"
            log("nf4: skipped (bitsandbytes is not installed)")
        else:
            def quantize():
                start = time.perf_counter()
                nf4_bytes, estimate = to_nf4(model, device), sizing.weight_bytes(config, "nf4")
                seconds = time.perf_counter() - start
                report.set("nf4_model", {"weight_bytes": nf4_bytes, "estimate_bytes": estimate,
                                         "quantize_s": round(seconds, 1)})
                log(f"nf4: quantized in {seconds:.1f} s, weights {nf4_bytes / 1e9:.2f} GB "
                    f"(sizing: {estimate / 1e9:.2f} GB)")
                return True
            if budget.run("nf4_quantize", 60, quantize, report):
                budget.run("nf4_eager", 45, phase("nf4_eager", False, "nf4"), report)
    report.set("status", "complete" if not report.data["errors"] else "complete, with errors")
    log("summary:")
    for name, run in report.data["runs"].items():
        if "generate_tokens_per_s" in run:
            log(f"  {name:<10} {summary(run)}")
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
