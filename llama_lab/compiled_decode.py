"""One-token decode steps compiled to matrix-vector loops: a from-scratch model decoding near the
memory-bandwidth limit on a CPU (notebook 04, benchmarks/decode.py).

A decode step reads every weight once to produce one token, so its speed limit is the memory
bandwidth divided by the weights' bytes (`llama_lab.sizing.decode_roofline`). `compile_decode`
swaps every `nn.Linear` for a `MatVecLinear`, whose one-token product `torch.compile` writes as a
loop that streams the weights at about that bandwidth, and every attention for a `DecodeAttention`,
whose one-token attention is compiled into the same loops, moves the weights into 2 MB pages
(`to_huge_pages`), and compiles the one-token step, with torch.compile or, `ahead_of_time`, with
AOTInductor (`AheadOfTimeStep`: no Python between the kernels); `require_cpp_compiler` says what
torch.compile needs on a CPU (the doctor shows it).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch
from torch import nn

from llama_lab import scratch
from llama_lab.errors import CompilerNotFoundError, ContextLengthError, InvalidSettingError


class MatVecLinear(nn.Linear):
    """An `nn.Linear` whose one-token product, once compiled, is a matrix-vector product written
    out: out[j] = sum_i W[j, i] x[i], multiply then sum along each row of W.

    `torch.compile` (inductor) turns the multiply-then-sum into one loop that streams each row of
    W once, vectorized and split over the cores: it reads the weights at about the memory
    bandwidth, where MKL's matrix-vector product (`F.linear` at batch 1) reads them at a third to
    a half of it on the AMD EPYC of benchmarks/README.md. Eager, the same line would build the whole
    (out, in) product in memory, so outside compilation, and for more than one token, this is
    a plain `nn.Linear`.

    The product is taken on x in float32 whatever the weights' dtype, and so is its output: with
    bf16 weights the loop then converts only W, where with x in bf16 it converts the same numbers
    of x again for every row of W (0.88x the step time on the AVX2 EPYC of benchmarks/README.md).
    So a compiled step keeps its activations in float32; only the weights and the KV cache are
    in bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and x.shape[-2] == 1):
            return super().forward(x)
        out = (x.float().unsqueeze(-2) * self.weight).sum(-1)
        return out if self.bias is None else out + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MatVecLinear:
        """A MatVecLinear holding the Parameters of `linear` (shared, not copied: tied weights stay tied)."""
        with torch.device("meta"):
            fast = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        fast.weight, fast.bias = linear.weight, linear.bias
        return fast


def attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One new token's attention written out: scores, softmax, weighted sum of the values.

    q: (batch, n_heads, 1, head_dim); k, v: (batch, n_kv_heads, keys, head_dim), every key so far
    (a single query sees them all: no mask). The n_heads / n_kv_heads queries of a group share a
    key head (GQA). Sums run in float32, as in PyTorch's fused attention on a CPU. Eager, it
    gives what `F.scaled_dot_product_attention` gives; compiled, inductor writes it as loops in
    the same kernel as the projections around it, where the library call would end the kernel
    and run on its own.

    >>> q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    >>> torch.allclose(attend_one_token(q, k, v), expected, atol=1e-6)
    True
    """
    batch, _, _, head_dim = q.shape
    groups = q.view(batch, k.shape[1], -1, 1, head_dim).float()  # (batch, kv heads, queries per group, 1, d)
    scores = (groups * k.unsqueeze(2).float()).sum(-1) / math.sqrt(head_dim)  # (batch, kv, group, keys)
    out = (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2)  # (batch, kv, group, d)
    return out.view(batch, -1, 1, head_dim).to(q.dtype)


class DecodeAttention(scratch.Attention):
    """A `scratch.Attention` whose one-token attention, once compiled, is `attend_one_token`:
    compiled into the step's loops instead of a library call per layer between two kernels."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and q.shape[2] == 1):
            return super().attend(q, k, v, start)
        return attend_one_token(q, k, v)


def require_cpp_compiler() -> str:
    """The C++ compiler that torch.compile will use on a CPU ($CXX, g++ or clang++), or a
    `CompilerNotFoundError` saying how to install it (or Python's headers, which it also needs)."""
    compiler = os.environ.get("CXX")
    if compiler and not shutil.which(compiler):
        raise CompilerNotFoundError(f"$CXX is {compiler!r}, which is not an executable C++ compiler. "
                                    "Point CXX at one (for example CXX=g++), or unset it.")
    compiler = compiler or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise CompilerNotFoundError("torch.compile needs a C++ compiler on a CPU and none was found "
                                    "(g++, clang++ or $CXX). Install one (Debian/Ubuntu: apt install g++; "
                                    "macOS: xcode-select --install), or use Colab. Without one, decode "
                                    "without compile_decode: same tokens, slower.")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.exists():
        raise CompilerNotFoundError(f"torch.compile builds its kernels against Python's C headers, and "
                                    f"{headers} is missing. Install them (Debian/Ubuntu: apt install "
                                    "python3-dev, for the system's Python).")
    return compiler


def cast_copy(model: scratch.Llama, dtype: torch.dtype) -> scratch.Llama:
    """A copy of a from-scratch model with its weights (and rope tables) in `dtype`; `model` stays
    as it is. Tied weights stay tied, so a bf16 copy of SmolLM2-135M takes 270 MB.

    (`model.to(dtype)` would not do: from `scratch.from_hf` the weights are the transformers
    model's own, and `to` would convert that model too.)
    """
    with torch.device("meta"):
        copy = scratch.Llama(model.config)
    cast: dict[int, torch.Tensor] = {}  # one copy per tensor: a tied pair gets one
    state = {name: cast.setdefault(id(t), t.detach().to(dtype)) for name, t in model.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        copy.output.weight = copy.tok_embeddings.weight
    copy.rope_cos, copy.rope_sin = model.rope_cos.to(dtype), model.rope_sin.to(dtype)
    return copy.eval()


HUGE_PAGE = 2 << 20  # bytes in one transparent huge page on x86-64 and most arm64 kernels
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this machine gives 2 MB pages to memory that asks for them: Linux with
    transparent huge pages set to `always` or `madvise` (not `never`)."""
    try:
        return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def in_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (CPU), side by side in one block of memory that asks the kernel for
    2 MB pages (`madvise(MADV_HUGEPAGE)`), each starting on a 4 KB boundary and the block on a
    2 MB one. Each copy has a storage of its own; the block lives as long as any of them.

    Reading memory goes through address translation, one entry per page: 4 KB pages need 512
    times as many as 2 MB ones, and a decode step that streams 540 MB of weights misses the
    processor's translation cache (TLB) every 4 KB; in a virtual machine each miss walks two sets
    of page tables. Raises OSError where `huge_pages_available()` is False.

    >>> if huge_pages_available():
    ...     copy, = in_huge_pages([torch.arange(6.0)])
    ...     assert copy.tolist() == [0, 1, 2, 3, 4, 5] and copy.data_ptr() % HUGE_PAGE == 0
    """
    if not huge_pages_available():
        raise OSError(f"no transparent huge pages on this machine ({THP_SETTING} says never, or is missing)")
    sizes = [-(-t.numel() * t.element_size() // 4096) * 4096 for t in tensors]
    block = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)  # before the first write: the pages come as 2 MB ones
    offset = -torch.frombuffer(block, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    copies = []
    for tensor, size in zip(tensors, sizes, strict=True):
        if not size:  # an empty tensor: no memory to place
            copies.append(torch.empty_like(tensor, device="cpu"))
            continue
        copy = torch.frombuffer(block, dtype=tensor.dtype, count=tensor.numel(), offset=offset)
        copies.append(copy.view(tensor.shape).copy_(tensor.detach()))
        offset += size
    return copies


def to_huge_pages(model: nn.Module) -> bool:
    """Move every weight of `model` into 2 MB pages (`in_huge_pages`), in place: the same
    Parameters with the same values at a new address, so tied weights stay tied and a model that
    shares them (the transformers model behind `scratch.from_hf`) reads them there too; their old
    memory is freed when nothing else holds it. Returns False, changing nothing, where the machine
    has no huge pages (`huge_pages_available`) or the weights are not in the CPU's memory.

    The weights of `load_model` are a file mapped in 4 KB pages. Moved, the ahead-of-time fp32
    step took 6-10 % less time (medians, faster in every one of 16 rounds, twice) on this
    project's 2-core Zen 4 VM; a bf16 copy (`cast_copy`, in ordinary 4 KB pages) showed no clear
    change, its step being less bound by the reads (benchmarks/README.md).
    """
    weights = list({id(p): p for p in model.parameters()}.values())  # a tied pair once
    if not huge_pages_available() or any(w.device.type != "cpu" for w in weights):
        return False
    with torch.no_grad():
        for weight, moved in zip(weights, in_huge_pages(weights), strict=True):
            weight.data = moved
    return True


class _CacheUpTo:
    """A KV cache as the exported step sees it: each layer's keys and values up to and including
    the new token's position, views of the cache's buffers, so that the step writes the new ones
    into them. The position is their length less one: a size, so one graph serves every position."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.max_len = keys[0].shape[2]
        self.length = self.max_len - 1


def _up_to(cache: scratch.KVCache, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [k[:, :, :end] for k in cache.keys], [v[:, :, :end] for v in cache.values]


def _tensors(model: scratch.Llama) -> dict[str, torch.Tensor]:
    """Every weight (a tied pair once) and buffer: the exported step takes them as inputs."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


class _Step(nn.Module):
    """One token's step of `model` as a function of the token, the tensors and the cache views."""

    def __init__(self, model: scratch.Llama):
        super().__init__()
        self.model = [model]  # in a list: not a submodule, so that export sees no parameters of its own

    def forward(self, input_ids: torch.Tensor, tensors: dict[str, torch.Tensor], keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model[0], tensors, (input_ids, _CacheUpTo(keys, values)))


def export_step(model: scratch.Llama) -> torch.export.ExportedProgram:
    """The one-token step of a model made ready by `compile_decode` (its MatVecLinear and
    DecodeAttention modules), as a graph (`torch.export`) for one sequence: inputs the token
    (1, 1), every weight and buffer, and each layer's keys and values up to the new position;
    output the logits (1, 1, vocab). The weights are inputs, not constants, so the compiled step
    shares them and in-place changes to them are seen. The position is dynamic."""
    cache = model.new_cache(1, 3)
    keys, values = _up_to(cache, 2)
    length = torch.export.Dim("length", min=1, max=model.config.max_seq_len)
    tensors = _tensors(model)
    shapes = {"input_ids": None, "tensors": dict.fromkeys(tensors), "keys": [{2: length}] * len(keys),
              "values": [{2: length}] * len(values)}
    with torch.no_grad():
        return torch.export.export(_Step(model), (torch.zeros(1, 1, dtype=torch.long), tensors, keys, values),
                                   dynamic_shapes=shapes, strict=True)


def _package_path(model: scratch.Llama) -> Path:
    """Where the ahead-of-time step of a model of this structure is kept, named by two keys: what
    it was compiled for (the configuration, dtype, torch and the CPU's vector instructions), then
    the code it was compiled from (this module and the model's)."""
    from llama_lab.models import cache_dir  # models imports transformers: only here, when needed

    target = repr((model.config, model.output.weight.dtype, torch.__version__,
                   torch.backends.cpu.get_cpu_capability())).encode()
    code = Path(scratch.__file__).read_bytes() + Path(__file__).read_bytes()
    keys = (hashlib.sha256(part).hexdigest()[:16] for part in (target, code))
    return cache_dir() / "aoti" / "decode-step-{}-{}.pt2".format(*keys)


def _remove_older_code(path: Path) -> None:
    """Delete the packages of the same target compiled from other code (an earlier llama-lab), 8 MB
    each for SmolLM2-135M, and those named by one key (llama-lab before 2026-12-06); a package
    being written (its name holds `.partial`) is left alone."""
    target = path.stem.rsplit("-", 1)[0]
    for pattern in (f"{target}-{'?' * 16}.pt2", f"decode-step-{'?' * 16}.pt2"):
        for stale in path.parent.glob(pattern):
            if stale != path:
                stale.unlink(missing_ok=True)


class AheadOfTimeStep:
    """The one-token step of a model made ready by `compile_decode`, compiled ahead of time by
    AOTInductor (`export_step`, then `torch._inductor.aoti_compile_and_package`) into a shared
    library kept in `cache_dir()/aoti`, and called without Python between the kernels: no
    guards, no collection of the inputs, no Python wrapper around the kernels; what is left in
    Python is the call and the views of the cache (0.2 ms a step for SmolLM2-135M). Measured
    against torch.compile's step on this project's 2-core Zen 4 VM (benchmarks/README.md): 6 %
    less time a step in fp32, 13 % in bf16 (medians of 12 rounds).

    Compiling takes about 2 minutes for SmolLM2-135M on 2 cores (2.5 in bf16), once per machine:
    a later `AheadOfTimeStep` of the same structure loads the file in a second or two, and a
    new compilation (after an update of llama-lab) deletes the packages it replaces. The
    weights are inputs: it reads the tensors it was given (in-place changes are seen; a replaced
    Parameter is not).
    """

    def __init__(self, model: scratch.Llama):
        path = _package_path(model)
        with warnings.catch_warnings():  # two that say nothing to a learner: functional_call's, torch's own
            warnings.filterwarnings("ignore", "While compiling, we found certain side effects")
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.partial.pt2")
                torch._inductor.aoti_compile_and_package(export_step(model), package_path=str(partial))
                os.replace(partial, path)  # whole or not at all, even with two processes compiling
                _remove_older_code(path)
            compiled = torch._inductor.aoti_load_package(str(path))
        # The loaded package's own call flattens (token, tensors, keys, values) with pytree at every
        # step, 0.2 ms for SmolLM2-135M's 335 inputs: the same flat list is built here instead.
        self.run, self.weights = compiled.loader.boxed_run, list(_tensors(model).values())

    def __call__(self, input_ids: torch.Tensor, cache: scratch.KVCache) -> torch.Tensor:
        """The logits (1, 1, vocab) of one token (1, 1) at position cache.length; the cache moves on."""
        end = cache.length + 1
        if end > cache.max_len:
            raise ContextLengthError(end, cache.max_len)
        keys, values = _up_to(cache, end)
        logits = self.run([input_ids, *self.weights, *keys, *values])[0]
        cache.length = end
        return logits


def compile_decode(model: scratch.Llama, dtype: torch.dtype | None = None,
                   ahead_of_time: bool = False) -> scratch.Llama:
    """Make the one-token steps of a from-scratch model run near the memory-bandwidth limit,
    in place, and return the model: same tokens, 2.5-3x faster on this project's CPU.

    dtype: decode with the weights in this dtype (for example `torch.bfloat16`: half the bytes
    per token, so twice the roofline): the model is copied in it (`cast_copy`), the copy is
    compiled and returned, and `model` stays as it is. Its one-token steps keep the activations
    in float32 (`MatVecLinear`) where the eager copy rounds them to `dtype`, so its greedy tokens
    may part from the eager copy's, and from fp32's, after some tokens.

    A decode step reads every weight once to produce one token, so its speed limit is the
    memory bandwidth divided by the weights' bytes (`llama_lab.sizing.decode_roofline`). Eager
    PyTorch reaches a quarter to a third of it on a CPU: the profiler puts most of a step in
    MKL's matrix-vector products, which stream the weights at a third to a half of the
    bandwidth, and the rest in some 400 small operations, each launched from Python. So every
    `nn.Linear` becomes a `MatVecLinear` (weights shared, not copied), every attention a
    `DecodeAttention`, and one-token calls run `torch.compile`d: inductor writes each
    matrix-vector product as a loop that reads at about the bandwidth, fuses the small
    operations (RMSNorm, RoPE, attention, SwiGLU, the cache writes) into a few kernels a step
    (three for SmolLM2-135M) and runs the whole step as C++. Shapes are dynamic: one
    compilation serves every position and cache size (a batch of several sequences compiles
    once more). Calls with more tokens (the prompt) stay eager. On Linux the weights move into
    2 MB pages (`to_huge_pages`: the same Parameters, a new address). benchmarks/README.md has
    the measurements.

    ahead_of_time: compile the one-token step of one sequence with a cache now, ahead of time
    (`AheadOfTimeStep`: about 2 minutes once per machine, then loaded from the disk), and call
    it without Python between its kernels; other one-token calls (a batch, no cache) still use
    torch.compile. Same tokens in fp32; 6 % less time a step in fp32 and 13 % in bf16 on this
    project's Zen 4 VM.

    The first one-token call compiles: 60-90 s on 2 cores, 10-30 s once inductor's on-disk
    cache (/tmp/torchinductor_<user>) holds the kernels. Needs a C++ compiler (g++ or clang++):
    without one it warns, in one line saying what is missing, and returns the model unchanged
    (with `dtype`: its copy in that dtype), decoding eagerly.

    >>> from llama_lab import load_model, scratch
    >>> model = compile_decode(scratch.from_hf(load_model("tiny-random")[0]))
    >>> type(model.layers[0].attention.wq).__name__
    'MatVecLinear'
    """
    if not isinstance(model, scratch.Llama):
        raise InvalidSettingError("compile_decode works on a from-scratch model: "
                                  "pass llama_lab.scratch.from_hf(model).")
    if dtype is not None and dtype != model.output.weight.dtype:
        model = cast_copy(model, dtype)
    try:
        require_cpp_compiler()
    except CompilerNotFoundError as missing:  # the same tokens without it: decode eagerly
        warnings.warn(f"compile_decode: decoding eagerly (same tokens, slower). {missing}", stacklevel=2)
        return model
    to_huge_pages(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, MatVecLinear.from_linear(child))
        if type(parent) is scratch.Attention:
            parent.__class__ = DecodeAttention  # the same module and weights, with attention compiled in
    eager = model.forward
    # Before each call torch.compile checks that nothing it relied on changed (its guards): here
    # thousands of module attributes, 1 ms a step. The model's structure stays as it is, so
    # check only the tensors (the weights may change: they are inputs of the compiled step).
    step = torch.compile(eager, dynamic=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    ahead = AheadOfTimeStep(model) if ahead_of_time else None

    def forward(input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        if input_ids.shape[1] > 1:
            return eager(input_ids, cache)
        with torch.inference_mode():  # the same kind of input tensor whatever the caller's mode:
            input_ids = input_ids.clone(memory_format=torch.contiguous_format)  # no recompilation
            if ahead is not None and cache is not None and input_ids.shape[0] == 1:
                return ahead(input_ids, cache)
            return step(input_ids, cache)

    model.forward = forward
    return model


def step_logits(model: scratch.Llama, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logits (steps, vocab) of each one-token step when `tokens` (1-D) follow `prompt` (1, n):
    teacher forcing, so that two models are compared on the same text even where they would
    choose other tokens."""
    with torch.inference_mode():
        cache = model.new_cache(1, prompt.shape[1] + tokens.numel())
        model(prompt, cache)
        return torch.cat([model(token.view(1, 1), cache)[0] for token in tokens])


def tokens_agree(reference: torch.Tensor, other: torch.Tensor) -> int:
    """How many tokens of `other` (1-D) agree with `reference` before the first that differs."""
    differ = (reference != other).nonzero()
    return int(differ[0]) if len(differ) else reference.numel()


def compare_greedy(reference: torch.Tensor, other: torch.Tensor, reference_logits: torch.Tensor,
                   other_logits: torch.Tensor) -> dict[str, float]:
    """How far a greedy continuation `other` (1-D tokens) follows `reference`: the tokens that agree
    before the first difference, and, on the reference's text (`step_logits` of both models),
    the steps where both models choose the same top token and the largest logit difference."""
    return {"tokens_agree": tokens_agree(reference, other),
            "top_token_agree": int((reference_logits.argmax(-1) == other_logits.argmax(-1)).sum()),
            "max_logit_diff": float((reference_logits - other_logits).abs().max()),
            "max_logit": float(reference_logits.abs().max())}
