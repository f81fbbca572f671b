"""The from-scratch Llama (llama_lab.scratch) against transformers' LlamaForCausalLM."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as hf

from llama_lab import checks, scratch, solutions
from llama_lab.checks.nb03_block import _block_variant
from llama_lab.errors import ContextLengthError, InvalidSettingError
from llama_lab.models import load_model
from llama_lab.sizing import llama2_config

# Shapes that exercise every branch: multi-head, grouped-query, one KV head, head_dim not
# hidden / heads, odd widths, tied and untied embeddings, two rope thetas.
CONFIGS = {
    "mha-untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=176,
                       tie_word_embeddings=False, rope_theta=1e4),
    "gqa3-tied": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=128,
                      tie_word_embeddings=True, rope_theta=5e5),
    "one-kv-head": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=1, intermediate_size=96,
                        tie_word_embeddings=False, rope_theta=5e5),
    "odd-sizes": dict(hidden_size=42, num_attention_heads=3, num_key_value_heads=3, intermediate_size=37,
                      head_dim=10, tie_word_embeddings=True, rope_theta=1e4, vocab_size=97),
}


def random_llama(name: str, seed: int = 0) -> LlamaForCausalLM:
    settings = dict(vocab_size=211, num_hidden_layers=3, max_position_embeddings=64, rms_norm_eps=1e-6,
                    attn_implementation="sdpa") | CONFIGS[name]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them random too, so a swap would show
        for module in model.modules():
            if isinstance(module, hf.LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def random_ids(model, batch: int = 2, seq: int = 13, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (batch, seq), generator=generator)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


# --- the whole model ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_from_hf_matches_transformers(name):
    hf_model = random_llama(name)
    ids = random_ids(hf_model)
    model = scratch.from_hf(hf_model)
    torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_from_hf_matches_smollm2(smollm2):
    hf_model, tokenizer = smollm2
    ids = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt",
                    padding=True).input_ids
    torch.testing.assert_close(scratch.from_hf(hf_model)(ids), hf_model(ids).logits, atol=1e-3, rtol=1e-3)


def test_from_hf_reads_the_config():
    hf_model = random_llama("odd-sizes")
    config = scratch.Config.from_hf(hf_model.config)
    shape = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim)
    assert shape == (42, 3, 3, 10, 37)
    assert (config.rope_theta, config.tie_embeddings, config.vocab_size) == (1e4, True, 97)


def test_from_hf_shares_the_weights_and_keeps_the_tie():
    hf_model = random_llama("gqa3-tied")
    model = scratch.from_hf(hf_model)
    assert model.layers[1].attention.wk.weight is hf_model.model.layers[1].self_attn.k_proj.weight
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf_model.parameters())
    untied = scratch.from_hf(random_llama("mha-untied"))
    assert untied.output.weight is not untied.tok_embeddings.weight


@torch.no_grad()
def test_from_hf_keeps_dtype():
    hf_model = random_llama("gqa3-tied").to(torch.bfloat16)
    model = scratch.from_hf(hf_model)
    ids = random_ids(hf_model)
    logits = model(ids)
    assert model.rope_cos.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_model(ids).logits.float(), atol=0.05, rtol=0.05)


def test_from_hf_refuses_what_it_does_not_implement():
    hf_model = random_llama("mha-untied")
    hf_model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(InvalidSettingError, match="rope scaling"):
        scratch.from_hf(hf_model)


# --- the KV cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa3-tied", "one-kv-head"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(name):
    model = scratch.from_hf(random_llama(name))
    ids = random_ids(model, seq=12)
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_len=20)
    steps = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]  # prefill, then a chunk
    steps += [model(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]  # then one token at a time
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].shape == (2, model.config.n_kv_heads, 20, model.config.head_dim)
    assert cache.keys[0][:, :, 12:].abs().sum() == 0  # nothing written past the tokens seen


@torch.no_grad()
def test_a_cropped_cache_decodes_as_if_the_dropped_tokens_never_came():
    model = scratch.from_hf(random_llama("gqa3-tied"))
    ids, detour = random_ids(model, seq=6), random_ids(model, seq=3, seed=5)
    cache = model.new_cache(batch_size=2, max_len=10)
    model(ids[:, :4], cache=cache)
    model(detour, cache=cache)  # three tokens to take back
    cache.crop(4)
    assert cache.length == 4
    torch.testing.assert_close(model(ids[:, 4:], cache=cache), model(ids)[:, 4:], atol=1e-5, rtol=1e-5)
    for length in (-1, 7):
        with pytest.raises(InvalidSettingError, match="holds 6 tokens"):
            cache.crop(length)


@torch.no_grad()
def test_cache_matches_transformers_keys():
    hf_model = random_llama("gqa3-tied")
    model = scratch.from_hf(hf_model)
    ids = random_ids(hf_model, seq=7)
    cache = model.new_cache(batch_size=2, max_len=10)
    model(ids, cache=cache)
    hf_cache = hf_model(ids, use_cache=True).cache
    for layer in range(model.config.n_layers):
        hf_keys, hf_values = hf_cache.layers[layer].keys, hf_cache.layers[layer].values
        torch.testing.assert_close(cache.keys[layer][:, :, :7], hf_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.values[layer][:, :, :7], hf_values, atol=1e-5, rtol=1e-5)


def test_context_limits():
    model = scratch.from_hf(random_llama("mha-untied"))  # max_position_embeddings=64
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ContextLengthError):
        model.new_cache(max_len=100)
    cache = model.new_cache(max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# --- each component against the transformers module it replaces -------------------------------

@pytest.fixture(scope="module")
def pieces():
    """A random GQA model, its first layer, our config, and rotary tables for 9 positions."""
    hf_model = random_llama("gqa3-tied")
    config = scratch.Config.from_hf(hf_model.config)
    x = torch.randn(2, 9, config.dim, generator=torch.Generator().manual_seed(2))
    position_ids = torch.arange(9)[None]
    hf_rope = hf_model.model.rotary_emb(x, position_ids)
    cos, sin = (t[:9] for t in scratch.rope_tables(config.head_dim, config.max_seq_len, config.rope_theta))
    return hf_model.model.layers[0], config, x, hf_rope, (cos, sin)


@torch.no_grad()
def test_rmsnorm(pieces):
    hf_layer, config, x, _, _ = pieces
    norm = scratch.RMSNorm(config.dim, config.norm_eps)
    scratch.load_hf_weights(norm, hf_layer.input_layernorm)
    torch.testing.assert_close(norm(x), hf_layer.input_layernorm(x))


def test_rmsnorm_in_bfloat16_normalizes_in_float32():
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 300
    norm, hf_norm = scratch.RMSNorm(64, 1e-6), hf.LlamaRMSNorm(64, 1e-6)
    assert torch.equal(norm(x), hf_norm(x))


def test_rope_tables_match_transformers(pieces):
    _, _, _, (hf_cos, hf_sin), (cos, sin) = pieces
    torch.testing.assert_close(cos, hf_cos[0])
    torch.testing.assert_close(sin, hf_sin[0])


def test_apply_rotary_matches_transformers(pieces):
    _, config, _, (hf_cos, hf_sin), (cos, sin) = pieces
    q, k = torch.randn(2, 2, 6, 9, config.head_dim).unbind(0)
    hf_q, hf_k = hf.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(scratch.apply_rotary(q, cos, sin), hf_q)
    torch.testing.assert_close(scratch.apply_rotary(k, cos, sin), hf_k)


def test_apply_rotary_keeps_norms_and_depends_on_relative_position():
    head_dim = 16
    cos, sin = scratch.rope_tables(head_dim, 32, theta=1e4)
    q, k = torch.randn(2, head_dim)
    rotate = lambda x, p: scratch.apply_rotary(x, cos[p], sin[p])
    torch.testing.assert_close(rotate(q, 7).norm(), q.norm())
    torch.testing.assert_close(rotate(q, 5) @ rotate(k, 2), rotate(q, 23) @ rotate(k, 20))  # same distance 3
    assert not torch.allclose(rotate(q, 5) @ rotate(k, 2), rotate(q, 5) @ rotate(k, 4))


@torch.no_grad()
def test_attention(pieces):
    hf_layer, config, x, hf_rope, (cos, sin) = pieces
    attention = scratch.Attention(config)
    scratch.load_hf_weights(attention, hf_layer.self_attn)
    expected, _ = hf_layer.self_attn(x, position_embeddings=hf_rope, attention_mask=None)
    torch.testing.assert_close(attention(x, cos, sin), expected)


@torch.no_grad()
def test_feed_forward(pieces):
    hf_layer, config, x, _, _ = pieces
    feed_forward = scratch.FeedForward(config)
    scratch.load_hf_weights(feed_forward, hf_layer.mlp)
    torch.testing.assert_close(feed_forward(x), hf_layer.mlp(x))


@torch.no_grad()
def test_transformer_block(pieces):
    hf_layer, config, x, hf_rope, (cos, sin) = pieces
    block = scratch.TransformerBlock(config)
    scratch.load_hf_weights(block, hf_layer)
    expected = hf_layer(x, position_embeddings=hf_rope, attention_mask=None)
    torch.testing.assert_close(block(x, cos, sin), expected)


def test_load_hf_weights_refuses_the_wrong_module(pieces):
    hf_layer, config, _, _, _ = pieces
    with pytest.raises(RuntimeError, match="Missing key"):
        scratch.load_hf_weights(scratch.FeedForward(config), hf_layer.self_attn)


# --- notebook 03's exercises: solutions are right, checkers pass them and fail wrong answers ----

@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_ffn_dim_solution_gives_the_real_widths(size):
    config = llama2_config(size)
    multiple_of, multiplier = (4096, 1.3) if size == "70b" else (256, None)
    assert solutions.ffn_dim(config.hidden_size, multiple_of, multiplier) == config.intermediate_size


def test_interleaved_rope_is_rotate_half_on_permuted_dimensions():
    """Meta pairs dimensions (2i, 2i+1), transformers (i, i + d/2): same rotation, reordered."""
    seq, head_dim, theta = 9, 16, 5e5
    x = torch.randn(seq, head_dim)
    to_halves = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    cos, sin = scratch.rope_tables(head_dim, seq, theta)
    torch.testing.assert_close(solutions.apply_rotary_interleaved(x, theta)[:, to_halves],
                               scratch.apply_rotary(x[:, to_halves], cos, sin))


def test_causal_mask_solution_is_what_positions_allow():
    n_new, n_cached = 3, 4
    query_positions = torch.arange(n_cached, n_cached + n_new)[:, None]
    key_positions = torch.arange(n_cached + n_new)[None, :]
    assert torch.equal(solutions.causal_mask_after_cache(n_new, n_cached), key_positions <= query_positions)


@pytest.mark.parametrize("check, solution, wrong_answers", [
    (checks.check_ffn_dim, solutions.ffn_dim,
     [(lambda dim, m, mult: round(8 * dim / 3 / m) * m, "round UP"),
      (lambda dim, m, mult: solutions.ffn_dim(dim, m), "the multiplier"),
      (lambda dim, m, mult: int(8 * dim / 3), "not a multiple of multiple_of")]),
    (checks.check_rotary_interleaved, solutions.apply_rotary_interleaved,
     [(lambda x, theta: scratch.apply_rotary(x, *scratch.rope_tables(x.shape[1], x.shape[0], theta)),
       "transformers' layout"),
      (lambda x, theta: solutions.apply_rotary_interleaved(torch.cat([x[:1], x]), theta)[1:],  # from 1, not 0
       "by the wrong angles")]),
    (checks.check_causal_mask_after_cache, solutions.causal_mask_after_cache,
     [(lambda n_new, n_cached: torch.ones(n_new, n_cached + n_new, dtype=torch.bool).tril(),
       "some cached tokens are hidden"),
      (lambda n_new, n_cached: torch.ones(n_new, n_new, dtype=torch.bool).tril(), "one row per new token"),
      (lambda n_new, n_cached: torch.ones(n_new, n_cached + n_new, dtype=torch.bool), "a later new token")]),
], ids=["ffn_dim", "rotary_interleaved", "causal_mask_after_cache"])
def test_checkers(check, solution, wrong_answers, verdicts):
    verdicts(check, solution, *wrong_answers)


# --- the block written piece by piece (notebook 03's exercises), checked against transformers -------

def _sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _repeated(t, q):
    return t.repeat(1, q.shape[1] // t.shape[1], 1, 1)


@pytest.mark.parametrize("check, solution, wrong_answers", [
    (checks.check_rms_norm, solutions.rms_norm,
     [(lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps), "subtracts the mean"),
      (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "weight is missing"),
      (lambda x, w, eps: w * x / x.norm(dim=-1, keepdim=True), "root mean square")]),
    (checks.check_apply_rope, solutions.apply_rope,
     [(lambda x, cos, sin: x * cos - scratch.rotate_half(x) * sin, "the other way"),
      (lambda x, cos, sin: x * cos + torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2) * sin,
       "neighbours (2i, 2i+1)"),
      (lambda x, cos, sin: x, "unchanged")]),
    (checks.check_causal_gqa, solutions.causal_gqa,
     [(lambda q, k, v: _sdpa(q, k, v, enable_gqa=True), "no causal mask"),
      (lambda q, k, v: _sdpa(q, _repeated(k, q), _repeated(v, q), is_causal=True), "wrong order"),
      (lambda q, k, v: _sdpa(q, k, v, is_causal=True, enable_gqa=True, scale=1.0), "not scaled"),
      (lambda q, k, v: _sdpa(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2), "another shape")]),
    (checks.check_swiglu, solutions.swiglu,
     [(lambda x, g, u, d: F.linear(F.silu(F.linear(x, u)) * F.linear(x, g), d), "on the up projection"),
      (lambda x, g, u, d: F.linear(F.relu(F.linear(x, g)) * F.linear(x, u), d), "SwiGLU is a gated MLP"),
      (lambda x, g, u, d: F.linear(F.gelu(F.linear(x, g)) * F.linear(x, u), d), "another activation")]),
    (checks.check_decoder_block, solutions.decoder_block,
     [(lambda *args: _block_variant(*args, pre_norm=False), "post-norm"),
      (lambda *args: _block_variant(*args, residual=False), "residual connections are missing"),
      (lambda x, *args: x, "pre-norm block")]),
], ids=["rms_norm", "apply_rope", "causal_gqa", "swiglu", "decoder_block"])
def test_block_checkers(check, solution, wrong_answers, verdicts):
    verdicts(check, solution, *wrong_answers)


def test_block_solution_is_the_scratch_block():
    """The solution written with functions equals `scratch.TransformerBlock` on the same weights."""
    config = scratch.Config(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                            ffn_dim=176)
    torch.manual_seed(0)
    block = scratch.TransformerBlock(config).eval()
    cos, sin = scratch.rope_tables(16, 6)
    x = torch.randn(2, 6, 64)
    weights = {key.split(".")[-2]: value for key, value in block.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(solutions.decoder_block(x, weights, cos, sin, 4, 2), block(x, cos, sin),
                                   atol=1e-5, rtol=1e-4)
