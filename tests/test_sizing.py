"""Sizing math against the published Llama 2 figures and against real (small) models."""

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_lab import sizing
from llama_lab.errors import InvalidSettingError
from llama_lab.models import tiny_config

# Published figures (DESIGN.md; Llama 2 paper and the meta-llama model cards).
PARAMETERS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


@pytest.mark.parametrize("size", PARAMETERS)
def test_count_parameters_matches_published(size):
    assert sizing.count_parameters(sizing.llama2_config(size)) == PARAMETERS[size]


def test_llama2_13b_shapes():
    c = sizing.llama2_config("13b")
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)
    assert shape == (40, 5120, 40, 13824)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (32000, 4096, False)
    assert sizing.llama2_config("LLAMA-2-70B").num_key_value_heads == 8


def test_unknown_size_lists_the_known_ones():
    with pytest.raises(InvalidSettingError, match="7b, 13b, 70b"):
        sizing.llama2_config("30b")


@pytest.mark.parametrize("tie", [True, False])
def test_count_parameters_equals_a_real_model(tie):
    config = tiny_config()
    config.tie_word_embeddings = tie
    model = LlamaForCausalLM(config)
    distinct = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    assert sizing.count_parameters(config) == distinct
    parts = sizing.parameter_breakdown(config)
    assert (parts["lm_head"] == 0) == tie


def test_kv_cache_bytes_per_token():
    assert sizing.kv_cache_bytes_per_token(sizing.llama2_config("13b"), "bf16") == 819_200
    assert sizing.kv_cache_bytes_per_token(sizing.llama2_config("70b"), torch.bfloat16) == 327_680
    assert sizing.kv_cache_bytes_per_token(sizing.llama2_config("13b"), "fp32") == 2 * 819_200
    # quantized weights still keep a bf16 cache
    assert sizing.kv_cache_bytes_per_token(sizing.llama2_config("13b"), "nf4") == 819_200


def test_kv_cache_matches_transformers_cache_tensors():
    config = tiny_config()
    model = LlamaForCausalLM(config).eval()
    n = 7
    with torch.no_grad():
        cache = model(torch.arange(n)[None], use_cache=True).past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == sizing.kv_cache_bytes_per_token(config, "fp32") * n


def test_memory_estimate_adds_up():
    c = sizing.llama2_config("13b")
    est = sizing.memory_estimate(c, "bf16", context_len=4096, batch_size=2)
    assert est.weights == 2 * PARAMETERS["13b"]
    assert est.kv_cache == 819_200 * 4096 * 2
    assert est.total == est.weights + est.kv_cache
    weights = [sizing.memory_estimate(c, d).weights for d in ("fp32", "bf16", "int8", "nf4")]
    assert weights == sorted(weights, reverse=True)
    # 4-bit: ~7 GB for 13B (linear layers in 4 bits, embeddings and lm_head in bf16)
    assert 6.5e9 < weights[-1] < 7.5e9
    assert "GB" in str(est)


@pytest.mark.parametrize("bad", [dict(context_len=-1), dict(batch_size=0), dict(dtype="int3")])
def test_memory_estimate_rejects_bad_settings(bad):
    with pytest.raises(InvalidSettingError):
        sizing.memory_estimate(sizing.llama2_config("7b"), **bad)


def test_decode_roofline():
    c = sizing.llama2_config("13b")
    # Untied: the input embedding table is not read in a decode step (one row is).
    read = sizing.weight_bytes(c, "bf16") - 2 * c.vocab_size * c.hidden_size
    assert sizing.bytes_read_per_token(c, "bf16") == read
    assert sizing.decode_roofline(c, "bf16", 1000) == pytest.approx(1e12 / read)
    longer = sizing.decode_roofline(c, "bf16", 1000, context_len=4096)
    assert longer == pytest.approx(1e12 / (read + 819_200 * 4096))
    tied = tiny_config()
    tied.tie_word_embeddings = True
    assert sizing.bytes_read_per_token(tied, "fp32") == sizing.weight_bytes(tied, "fp32")
    with pytest.raises(InvalidSettingError):
        sizing.decode_roofline(c, "bf16", 0)


def test_dtype_names():
    assert [sizing.dtype_name(d) for d in (torch.float32, "bfloat16", "4bit", "8bit")] == \
        ["fp32", "bf16", "nf4", "int8"]
    with pytest.raises(InvalidSettingError, match="fp32"):
        sizing.dtype_name("fp8")



def test_llama1_13b_has_the_shapes_of_llama2_13b_and_half_its_context():
    one, two = sizing.llama1_config("13b"), sizing.llama2_config("13b")
    assert sizing.count_parameters(one) == sizing.count_parameters(two) == 13_015_864_320
    assert (one.max_position_embeddings, two.max_position_embeddings) == (2048, 4096)
    assert sizing.count_parameters(sizing.llama1_config("65b")) == 65_285_660_672  # "65B"
    with pytest.raises(InvalidSettingError, match="Unknown LLaMA 1 size '70b'"):
        sizing.llama1_config("70b")
