"""Quantization written out (llama_lab.quantize) against bitsandbytes' own functions, and
load_model's quantized small models on the CPU."""

import math
import subprocess
import sys

import pytest
import torch

from llama_lab import models, quantize, sizing
from llama_lab.errors import InvalidSettingError

bnb = quantize.import_bitsandbytes()
F = bnb.functional

# shapes of SmolLM2's and Llama-2-13B's projections (cut to keep the test quick), an odd one with a
# short last block, and one whose scales fill their 256-blocks exactly
SHAPES = [(576, 576), (1536, 576), (5120, 640), (100, 37), (64 * 256 * 2,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weights(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def test_nf4_levels_are_bitsandbytes_table():
    ours, theirs = quantize.nf4_levels(), F.get_4bit_type("nf4", device="cpu")
    # bitsandbytes hard-codes its float32 values; ours come from statistics.NormalDist
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-7)
    assert ours[7] == 0 and (ours[0], ours[-1]) == (-1, 1) and len(ours.unique()) == 16


def test_dynamic_levels_are_bitsandbytes_code():
    assert torch.equal(quantize.dynamic_levels(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(576, 576), (13824 // 8, 5120 // 8), (7, 3)])
def test_absmax_int8_same_codes_as_bitsandbytes(shape, dtype):
    w = weights(shape, dtype)
    q, absmax = quantize.absmax_int8(w)
    q_bnb, absmax_bnb, _ = F.int8_vectorwise_quant(w.clone())
    assert torch.equal(q, q_bnb) and torch.equal(absmax, absmax_bnb.float())
    error = (quantize.dequantize_int8(q, absmax) - w.float()).abs()
    assert (error <= absmax.unsqueeze(1) / 254 * (1 + 1e-5)).all()  # half a step of 1/127


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_against_bitsandbytes(shape, dtype):
    w = weights(shape, dtype)
    ours = quantize.quantize_nf4(w)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4, dynamic = quantize.nf4_levels(), quantize.dynamic_levels()
    absmax = quantize.quantize_blockwise(w, nf4, 64)[1]

    # The 4-bit codes: the same, but for weights within 1e-6 of a midpoint between two levels (our
    # levels, computed, differ from bitsandbytes' hard-coded ones by up to 3e-7): the next level.
    theirs = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=1).flatten()[: w.numel()]
    odd = (ours.codes != theirs).nonzero().flatten()
    assert len(odd) <= 1e-4 * w.numel()
    low = torch.minimum(ours.codes[odd], theirs[odd]).long()
    assert ((ours.codes[odd].int() - theirs[odd].int()).abs() == 1).all()
    scaled = w.reshape(-1)[odd].float() / absmax[odd // 64]
    assert ((scaled - (nf4[low] + nf4[low + 1]) / 2).abs() < 1e-6).all()

    # The double quantization: the same offset and scales of the scales, and the same 8-bit codes of
    # the scales but where bitsandbytes' C++ kernel for 8-bit blocks does not pick the nearest level
    # (0.2 % of them here, 2 % at most): ours is at least as near everywhere.
    assert torch.equal(ours.scale_offset, state.offset)
    assert torch.equal(ours.scale_absmax, state.state2.absmax)
    odd_scales = (ours.scale_codes != state.absmax).nonzero().flatten()
    assert len(odd_scales) <= 0.02 * ours.scale_codes.numel()
    target = (absmax - absmax.mean()) / ours.scale_absmax.repeat_interleave(256)[: absmax.numel()]
    assert ((dynamic[ours.scale_codes.long()] - target).abs()
            <= (dynamic[state.absmax.long()] - target).abs() + 1e-9).all()

    # Dequantized (bitsandbytes returns w's dtype): equal where every code agrees, up to rounding to
    # that dtype; where only a scale's code differs, within one step of the dynamic code (0.9 / 64
    # at most, near 1; 2 % for two near-nearest picks) times the scales' absmax: the stated bound.
    assert quantize.dequantize_nf4(ours).shape == w.shape
    ours_w = quantize.dequantize_nf4(ours).to(dtype).float().reshape(-1)
    bnb_w = F.dequantize_4bit(packed, state).float().reshape(-1)
    rounding = max(torch.finfo(dtype).eps, 1e-6)  # fp32: its C++ kernel rounds the scales' sum apart
    same_scale = torch.ones_like(absmax, dtype=torch.bool)
    same_scale[odd_scales] = False
    same_scale = same_scale.repeat_interleave(64)[: w.numel()]
    same_code = ours.codes == theirs
    torch.testing.assert_close(ours_w[same_scale & same_code], bnb_w[same_scale & same_code],
                               rtol=rounding, atol=1e-9)
    step = (dynamic[1:] - dynamic[:-1]).max()
    assert step == pytest.approx(0.9 / 64, rel=0.05)
    gap = (ours_w - bnb_w)[same_code].abs().max()
    assert gap <= 1.02 * step * ours.scale_absmax.max() + rounding * bnb_w.abs().max()


def test_nf4_storage_is_sizing_bytes_per_param():
    n = 5120 * 5120  # one 13B attention projection
    q = quantize.quantize_nf4(weights((5120, 5120), torch.bfloat16))
    assert q.nbytes == n * sizing.BYTES_PER_PARAM["nf4"] + 4  # + the fp32 offset
    assert q.nbytes == pytest.approx(n * 4.127 / 8, rel=1e-3)


def test_nf4_beats_uniform_4bit_on_normal_weights():
    """The point of NF4: on normally distributed weights, levels at the normal's quantiles lose less
    than 16 evenly spaced levels with the same blocks of 64."""
    w = weights((1024, 1024), torch.float32)
    nf4 = quantize.dequantize_blockwise(*quantize.quantize_blockwise(w, quantize.nf4_levels(), 64),
                                        quantize.nf4_levels(), 64)
    uniform_levels = torch.linspace(-1, 1, 16)
    uniform = quantize.dequantize_blockwise(*quantize.quantize_blockwise(w, uniform_levels, 64),
                                            uniform_levels, 64)
    flat = w.reshape(-1)
    assert (nf4 - flat).pow(2).mean() < 0.9 * (uniform - flat).pow(2).mean()


def test_pack_4bit_pads_an_odd_count():
    assert quantize.pack_4bit(torch.tensor([3, 4, 5], dtype=torch.uint8)).tolist() == [0x34, 0x50]


# --- load_model on the CPU -------------------------------------------------------------------


def test_load_model_quantizes_tiny_random_with_the_same_codes():
    fp32, _ = models.load_model("tiny-random")
    nf4, _ = models.load_model("tiny-random", quantize="nf4")
    int8, _ = models.load_model("tiny-random", quantize="int8")
    w = fp32.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16)  # bf16 before quantizing
    p4 = nf4.model.layers[0].self_attn.q_proj.weight
    assert type(p4).__name__ == "Params4bit" and p4.quant_state.nested
    ours = quantize.quantize_nf4(w)
    assert torch.equal(quantize.pack_4bit(ours.codes), p4.data.flatten())
    assert torch.equal(ours.scale_codes, p4.quant_state.absmax)
    p8 = int8.model.layers[0].self_attn.q_proj.weight
    q, absmax = quantize.absmax_int8(w)
    assert torch.equal(q, p8.data) and torch.allclose(absmax, p8.SCB.float())
    ids = torch.tensor([[1, 50, 60, 70]])
    for model in (nf4, int8):
        assert model(ids).logits.shape == fp32(ids).logits.shape
    assert nf4.get_memory_footprint() < int8.get_memory_footprint() < fp32.get_memory_footprint()


def test_smollm2_in_nf4_is_three_times_smaller_and_close():
    text = quantize.heldout_text()[:2000]
    fp32, tokenizer = models.load_model("smollm2-135m")
    base = quantize.perplexity(fp32, tokenizer, text)
    fp32_bytes = fp32.get_memory_footprint()
    del fp32
    nf4, _ = models.load_model("smollm2-135m", quantize="nf4")
    assert type(nf4.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert fp32_bytes > 3 * nf4.get_memory_footprint()
    assert base < quantize.perplexity(nf4, tokenizer, text) < 1.5 * base


def test_bitsandbytes_import_and_int8_products_are_quiet():
    noisy = "Failed to load CPU gemm_4bit_forward"
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if noisy not in plain.stderr + plain.stdout:
        pytest.skip("bitsandbytes prints nothing at import on this CPU (no AVX-512 bf16)")
    code = ("import torch; from llama_lab import models\n"
            "m, _ = models.load_model('tiny-random', quantize='int8')\n"
            "m(torch.tensor([[1, 2, 3]]))")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    out = quiet.stdout + quiet.stderr
    for message in (noisy, "MatMul8bitLt", "Skipping publisher trust check"):  # the last: kernels', offline
        assert message not in out


# --- measuring -------------------------------------------------------------------------------


def test_perplexity_of_one_window_is_exp_of_the_loss():
    model, tokenizer = models.load_model("tiny-random")
    text = "Marta weighs everything, even the water."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert quantize.perplexity(model, tokenizer, text) == pytest.approx(loss.exp().item(), rel=1e-5)
    # windows of 8 tokens, each scored alone: the mean loss over all the tokens predicted
    with torch.no_grad():
        losses = [(model(c, labels=c).loss.item(), c.shape[1] - 1)
                  for c in ids.split(8, dim=1) if c.shape[1] > 1]
    mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert quantize.perplexity(model, tokenizer, text, window=8) == pytest.approx(math.exp(mean))


def test_measure_tiny_random_and_unknown_variant():
    fp32 = quantize.measure("fp32", "tiny-random", "some text " * 20, new_tokens=4)
    nf4 = quantize.measure("nf4", "tiny-random", "some text " * 20, new_tokens=4)
    assert nf4.weight_bytes < fp32.weight_bytes and nf4.tokens_per_s > 0 and nf4.load_seconds > 0
    assert fp32.perplexity > 1 and nf4.perplexity > 1
    with pytest.raises(InvalidSettingError, match="fp32, bf16, int8, nf4"):
        quantize.measure("fp8", "tiny-random")


def test_heldout_text_ships_with_the_package():
    assert quantize.HELDOUT_TEXT.parent.name == "data"
    assert len(quantize.heldout_text().split()) > 1000


# --- the exercise of notebook 06 ---------------------------------------------------------------


def test_nf4_codes_solution_is_the_library():
    from llama_lab import solutions

    for seed in range(3):
        block = weights((64,), torch.float32, seed)
        codes = quantize.quantize_blockwise(block, quantize.nf4_levels(), 64)[0]
        assert torch.equal(solutions.nf4_codes(block, quantize.nf4_levels()), codes.long())


def test_check_nf4_codes(verdicts):
    from llama_lab import checks, solutions

    def by_max(block, levels):  # scaled by the largest weight, not the largest |weight|
        return (block[:, None] / block.max() - levels).abs().argmin(dim=1)

    verdicts(checks.check_nf4_codes, solutions.nf4_codes,
             (by_max, "largest |weight|"),
             (lambda block, levels: torch.round((block / block.abs().max() + 1) * 7.5), "evenly spaced"),
             (lambda block, levels: (block[:, None] - levels).abs().argmin(dim=1), "before scaling"))
