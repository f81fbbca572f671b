"""Tests of llama_lab.attention and the notebook-02 checkers, on the tiny random model."""

import html
import json
import math
import re
import shutil
import subprocess
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nbval.plugin import get_sanitize_patterns
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import llama_lab as lab
from llama_lab import attention, checks, sizing, solutions
from llama_lab.checks.nb02_attention import _planted_maps
from llama_lab.errors import InvalidSettingError, LlamaLabError

TEXT = "Attention, please!"


@pytest.fixture(scope="module")
def tiny():
    return lab.load_model("tiny-random", attn_implementation="eager")


@pytest.fixture(scope="module")
def ids(tiny):
    return tiny[1](TEXT, return_tensors="pt").input_ids


def _uniform_causal(n: int) -> torch.Tensor:
    return torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]


# --- collecting -----------------------------------------------------------------------------------

def test_collect_keeps_the_chosen_layers_and_heads(tiny, ids):
    model, tokenizer = tiny
    maps = attention.collect_attention(model, tokenizer, TEXT, layers=[3, 1], heads=[2, 0])
    with torch.no_grad():
        everything = model(ids, output_attentions=True).attentions
    assert maps.weights.shape == (2, 2, len(TEXT), len(TEXT))
    assert maps.tokens == list(TEXT.replace(" ", "▁"))  # byte-level: one token per character
    assert maps.tokens == lab.tokenization.token_labels(tokenizer, ids[0])
    torch.testing.assert_close(maps.head(3, 2), everything[3][0, 2])
    torch.testing.assert_close(maps.head(1, 0), everything[1][0, 0])
    assert maps.nbytes == 2 * 2 * len(TEXT) ** 2 * 4


def test_maps_are_causal_probability_rows(tiny):
    maps = attention.collect_attention(*tiny, TEXT)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(maps.weights.shape[:-1]))
    future = torch.ones(len(TEXT), len(TEXT), dtype=torch.bool).triu(1)
    assert torch.all(maps.weights[..., future] == 0)


def test_a_prefix_has_the_top_left_corner_of_the_maps(tiny):
    full = attention.collect_attention(*tiny, TEXT)
    prefix = attention.collect_attention(*tiny, TEXT, max_tokens=4)
    assert prefix.tokens == full.tokens[:4]
    torch.testing.assert_close(prefix.weights, full.weights[:, :, :4, :4])


def test_sdpa_gives_a_clear_error():
    model, tokenizer = lab.load_model("tiny-random", attn_implementation="sdpa")
    with pytest.raises(attention.AttentionNotAvailableError, match="attn_implementation='eager'") as err:
        attention.collect_attention(model, tokenizer, TEXT)
    assert isinstance(err.value, LlamaLabError)


@pytest.mark.parametrize("kwargs", [{"layers": [4]}, {"heads": [-1]}, {"layers": []}])
def test_out_of_range_choices_are_refused(tiny, kwargs):
    with pytest.raises(InvalidSettingError, match="numbered 0 to"):
        attention.collect_attention(*tiny, TEXT, **kwargs)


def test_queries_keys_give_the_eager_attention_weights(tiny, ids):
    """softmax(q k^T / sqrt(d)), causal, from the hooked q and k: what eager attention returns."""
    model = tiny[0]
    with torch.no_grad():
        eager = model(ids, output_attentions=True).attentions
    future = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
    for layer in range(model.config.num_hidden_layers):
        q, k = attention.queries_keys(model, ids, layer)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(future, float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), eager[layer][0])


def test_hand_written_attention_from_queries_keys_equals_the_model(tiny, ids):
    maps = attention.collect_attention(*tiny, ids)
    for layer in range(4):
        q, k = attention.queries_keys(tiny[0], ids, layer)
        assert q.shape == k.shape == (4, ids.shape[1], 16)
        torch.testing.assert_close(solutions.causal_attention(q, k), maps.weights[layer])


# --- scores ---------------------------------------------------------------------------------------

def test_scores_of_ideal_heads_and_of_a_uniform_head():
    n, period = 8, 4
    rows = torch.arange(n)
    previous = torch.zeros(n, n)
    previous[rows[1:], rows[1:] - 1] = 1
    sink = torch.zeros(n, n)
    sink[:, 0] = 1
    induction = _uniform_causal(n)
    induction[rows[period:]] = 0
    induction[rows[period:], rows[period:] - period + 1] = 1
    assert attention.previous_token_score(previous) == 1
    assert attention.first_token_score(sink) == 1
    assert attention.induction_score(induction, period) == 1
    assert attention.induction_score(previous, period) == 0
    uniform = _uniform_causal(n)
    torch.testing.assert_close(attention.first_token_score(uniform), (1 / torch.arange(2, n + 1.0)).mean())
    torch.testing.assert_close(attention.entropy_bits(uniform), torch.log2(rows.float() + 1))


def test_scores_keep_the_layer_and_head_dimensions():
    weights = _uniform_causal(6).expand(3, 2, 6, 6)
    for score in (attention.previous_token_score(weights), attention.first_token_score(weights),
                  attention.induction_score(weights, 3)):
        assert score.shape == (3, 2)


def test_repeated_random_tokens_repeat():
    ids = attention.repeated_random_tokens(50, period=7, repeats=3, seed=1)
    assert ids.shape == (21,) and 0 <= ids.min() and ids.max() < 50
    assert torch.equal(ids[:7], ids[7:14]) and torch.equal(ids[:7], ids[14:])
    assert not torch.equal(ids[:7], attention.repeated_random_tokens(50, period=7, seed=2)[:7])


# --- causal evidence: ablations, the repeat test, what heads write ---------------------------------

ABLATED = [(1, 0), (2, 3), (2, 1)]


def _without_heads(model, heads, means=None):
    """A copy of `model` whose o_proj columns of `heads` are zero, plus a bias of their mean output."""
    copy = deepcopy(model)
    d = sizing.head_dim(model.config)
    for layer, head in heads:
        o_proj = copy.model.layers[layer].self_attn.o_proj
        columns = slice(head * d, (head + 1) * d)
        if means is not None:
            bias = o_proj.weight.data[:, columns] @ means[layer, head]
            o_proj.bias = torch.nn.Parameter(bias if o_proj.bias is None else o_proj.bias + bias)
        o_proj.weight.data[:, columns] = 0
    return copy


@pytest.mark.parametrize("mean", [False, True], ids=["zero", "mean"])
def test_ablating_heads_is_removing_their_output_weights(tiny, ids, mean):
    model, reference = tiny[0], attention.repeated_random_sequences(200, 6, batch=3)
    means = attention.head_means(model, reference) if mean else None
    clean = model(ids).logits
    with attention.ablate_heads(model, ABLATED, means):
        ablated = model(ids).logits
    torch.testing.assert_close(ablated, _without_heads(model, ABLATED, means)(ids).logits)
    assert not torch.allclose(ablated, clean)
    torch.testing.assert_close(model(ids).logits, clean)  # the hooks are gone


def test_head_means_are_the_mean_of_each_heads_slice(tiny):
    model, rows = tiny[0], attention.repeated_random_sequences(200, 5, batch=2)
    means = attention.head_means(model, rows)
    d = sizing.head_dim(model.config)
    assert means.shape == (4, 4, d)
    seen = attention._run_keeping(model, rows[1], {"o": model.model.layers[2].self_attn.o_proj}, pre=True)
    one_row = attention.head_means(model, rows[1:])
    torch.testing.assert_close(one_row[2, 3], seen["o"][0, :, 3 * d:4 * d].mean(0))


def test_ablating_a_head_out_of_range_is_refused(tiny):
    with pytest.raises(InvalidSettingError, match="numbered 0 to 3"):
        with attention.ablate_heads(tiny[0], [(0, 4)]):
            pass


def test_random_heads_avoid_the_excluded_and_do_not_repeat(tiny):
    config = tiny[0].config
    heads = attention.random_heads(config, 10, seed=3, exclude=ABLATED)
    assert len(set(heads)) == 10 and not set(heads) & set(ABLATED)
    assert heads != attention.random_heads(config, 10, seed=4, exclude=ABLATED)


class _Oracle(torch.nn.Module):
    """Logits that know the repeat: uniform on the first copy, certain of the next token after."""

    device = torch.device("cpu")

    def __init__(self, period: int, vocab: int):
        super().__init__()
        self.period, self.vocab = period, vocab

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        following = ids[:, 1:self.period + 1]  # after token period - 1 + i comes token i + 1
        logits[:, self.period:2 * self.period - 1].scatter_(-1, following[:, :-1, None], 30.0)
        return SimpleNamespace(logits=logits)


def test_repeat_test_scores_an_oracle_and_chance():
    period, vocab = 6, 50
    rows = attention.repeated_random_sequences(vocab, period, batch=4)
    result = attention.repeat_test(_Oracle(period, vocab), rows, period)
    assert result.repeat_accuracy == 1 and result.repeat_loss < 1e-6
    assert result.first_loss == pytest.approx(math.log(vocab))
    assert result.position_loss.shape == (2 * period - 1,)
    assert result.position_loss[period - 1] == pytest.approx(math.log(vocab))  # the copy's first token


def test_repeat_test_of_the_tiny_model(tiny):
    rows = attention.repeated_random_sequences(200, 8, batch=2)
    result = attention.repeat_test(tiny[0], rows, 8)
    assert 0 <= result.repeat_accuracy <= 1 and result.repeat_loss > 0
    ax = attention.plot_position_loss({"clean": result, "again": result})
    assert len(ax.lines) == 3  # two runs and the line where the repeat starts


def test_head_writes_add_up_to_the_attention_output(tiny, ids):
    model, layer = tiny[0], 2
    out = attention._run_keeping(model, ids, {"attn": model.model.layers[layer].self_attn})["attn"][0][0]
    writes = sum(attention.head_writes(model, ids, layer, h) for h in range(4))
    torch.testing.assert_close(writes, out.float(), atol=1e-5, rtol=1e-4)


def test_the_first_token_gets_the_ov_of_itself(tiny, ids):
    # the first token can attend only to itself (weight 1): the head writes OV times its normed vector
    model, layer = tiny[0], 1
    normed = attention._run_keeping(model, ids, {"n": model.model.layers[layer].input_layernorm})["n"][0]
    for head in range(4):
        torch.testing.assert_close(attention.head_writes(model, ids, layer, head)[0],
                                   attention.ov_matrix(model, layer, head) @ normed[0].float(),
                                   atol=1e-5, rtol=1e-4)


def test_copying_score_is_a_share_of_the_vocabulary(tiny):
    rows = attention.repeated_random_sequences(200, 8, batch=1)
    score = attention.copying_score(tiny[0], rows[0], 8, 3, 1)
    logits = attention.direct_logits(tiny[0], attention.head_writes(tiny[0], rows[0], 3, 1))
    assert 0 <= score <= 1 and logits.shape == (16, tiny[0].config.vocab_size)



def test_one_pass_for_many_heads_equals_one_pass_per_head(tiny):
    rows = attention.repeated_random_sequences(200, 8, batch=1)
    heads = [(3, 1), (1, 0), (3, 2)]
    writes = attention.heads_writes(tiny[0], rows[0], heads)
    scores = attention.copying_scores(tiny[0], rows[0], 8, heads)
    assert list(writes) == list(scores) == heads
    for layer, head in heads:
        torch.testing.assert_close(writes[layer, head], attention.head_writes(tiny[0], rows[0], layer, head))
        assert scores[layer, head] == attention.copying_score(tiny[0], rows[0], 8, layer, head)
    assert len(set(scores.values())) > 1  # the heads are told apart

# --- grouped-query attention and RoPE -------------------------------------------------------------

def test_kv_head_map_matches_which_keys_are_shared(tiny, ids):
    owner = attention.kv_head_map(tiny[0].config)
    assert owner == [0, 0, 1, 1]
    _, k = attention.queries_keys(tiny[0], ids, 2)
    for h in range(4):
        for g in range(4):
            assert torch.equal(k[h], k[g]) == (owner[h] == owner[g])


def test_rope_score_depends_only_on_the_offset():
    q, k = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20)
    scores = attention.rope(q.expand(20, -1), positions) @ attention.rope(k.expand(20, -1), positions).T
    for offset in range(-19, 20):
        diagonal = scores.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[5, 0], scores[6, 0])  # ... and it does depend on the offset
    torch.testing.assert_close(attention.rope(q[None], [0])[0], q)  # position 0: no rotation
    torch.testing.assert_close(attention.rope(q[None], [77])[0].norm(), q.norm())  # rotations keep length


def test_rope_matches_the_model(tiny, ids):
    """attention.rope applied to the model's own un-rotated queries gives the queries it attends with."""
    model = tiny[0]
    q, _ = attention.queries_keys(model, ids, 0)
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    raw = model.model.layers[0].self_attn.q_proj(hidden)[0].view(ids.shape[1], 4, 16).transpose(0, 1)
    positions, theta = torch.arange(ids.shape[1]), sizing.rope_theta(model.config)
    for head in range(4):
        torch.testing.assert_close(attention.rope(raw[head].detach(), positions, theta), q[head])


def test_rope_is_transformers_rope_at_any_positions():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0, 3, 1, 4000, 77])  # in any order, beyond any table
    for theta in (10000.0, 100000.0):
        config = LlamaConfig(hidden_size=64, num_attention_heads=1, head_dim=64, rope_theta=theta)
        cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
        expected, _ = apply_rotary_pos_emb(x[None, None], x[None, None], cos, sin)
        torch.testing.assert_close(attention.rope(x, positions, theta), expected[0, 0])


def test_hand_written_rope_matches_transformers():
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    for position, theta in [(0, 10000.0), (5, 10000.0), (300, 100000.0)]:
        torch.testing.assert_close(solutions.rope_rotate(x, position, theta),
                                   attention.rope(x[None], [position], theta)[0], atol=1e-4, rtol=1e-4)


def test_attention_map_bytes_is_what_collecting_takes(tiny):
    maps = attention.collect_attention(*tiny, TEXT)
    assert attention.attention_map_bytes(tiny[0].config, len(TEXT)) == maps.nbytes
    some = attention.collect_attention(*tiny, TEXT, layers=[0, 1], heads=[3])
    assert attention.attention_map_bytes(tiny[0].config, len(TEXT), layers=2, heads=1) == some.nbytes
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    assert attention.attention_map_bytes(config, 10, "bf16") * 2 == attention.attention_map_bytes(config, 10)


# --- views ----------------------------------------------------------------------------------------

def test_plots_draw_one_panel_per_head(tiny):
    maps = attention.collect_attention(*tiny, TEXT, layers=[0, 2], heads=[1, 2, 3])
    fig = attention.plot_heads(maps)
    assert [ax.get_title() for ax in fig.axes][:3] == ["L0 H1", "L0 H2", "L0 H3"] and len(fig.axes) == 6
    ax = attention.plot_layer_head_map(torch.rand(4, 4), "scores")
    assert ax.get_title() == "scores"
    ax = attention.plot_attention(maps.head(2, 3), maps.tokens)
    assert [t.get_text() for t in ax.get_xticklabels()] == maps.tokens


def _viewer_data(page: str) -> dict:
    return json.loads(re.search(r"const data = (\{.*?\});\n", page).group(1).replace("<\\/", "</"))


def test_viewer_embeds_the_causal_rows_and_loads_nothing(tiny):
    maps = attention.collect_attention(*tiny, TEXT, layers=[1, 3], heads=[0, 2])
    maps.tokens[1] = "</script>"
    page = attention.attention_viewer(maps).data
    assert "src=" not in page and "href=" not in page
    assert page.count("</script>") == 1  # the token "</script>" cannot close the script early
    data = _viewer_data(page)
    assert data["tokens"] == maps.tokens and data["layers"] == [1, 3] and data["heads"] == [0, 2]
    rows = data["weights"][1][1]  # layer 3, head 2
    assert [len(row) for row in rows] == list(range(1, len(maps.tokens) + 1))
    for q, row in enumerate(rows):
        torch.testing.assert_close(torch.tensor(row), maps.head(3, 2)[q, : q + 1], atol=5e-4, rtol=0)


def test_two_viewers_get_different_ids(tiny):
    maps = attention.collect_attention(*tiny, TEXT, layers=[0])
    first, second = (re.search(r'id="([^"]+)"', attention.attention_viewer(maps).data).group(1)
                     for _ in range(2))
    assert first != second


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_viewer_script_is_valid_javascript(tiny, tmp_path):
    page = attention.attention_viewer(attention.collect_attention(*tiny, TEXT, layers=[0])).data
    script = tmp_path / "viewer.js"
    script.write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    subprocess.run(["node", "--check", str(script)], check=True)


@pytest.mark.parametrize("view", ["head", "model"])
def test_bertviz_view_uses_the_model_numbers(tiny, view):
    maps = attention.collect_attention(*tiny, TEXT, layers=[1, 3], heads=[0, 2])
    page = attention.bertviz_view(maps, view).data
    srcdoc = html.unescape(re.search(r'srcdoc="([^"]*)"', page).group(1))
    assert "require.min.js" in srcdoc and '"include_layers": [1, 3]' in srcdoc
    if view == "model":
        assert '"include_heads": [0, 2]' in srcdoc
    with pytest.raises(InvalidSettingError):
        attention.bertviz_view(maps, "neuron")


def test_sanitize_rules_hide_the_volatile_views(tiny):
    """nbval must not compare the views' numbers and ids: the rules replace them whole."""
    rules = get_sanitize_patterns((Path(__file__).parent / "sanitize.cfg").read_text())
    maps = attention.collect_attention(*tiny, TEXT, layers=[0])
    for page in (attention.attention_viewer(maps).data, attention.bertviz_view(maps, "head").data):
        for regex, replace in rules:
            page = re.sub(regex, replace, page)
        assert "0." not in page and len(page) < 200, page


# --- checkers -------------------------------------------------------------------------------------


def test_check_causal_attention(verdicts):
    no_mask = lambda q, k: (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    no_scale = lambda q, k: solutions.causal_attention(q * q.shape[-1] ** 0.5, k)
    wrong_axis = lambda q, k: solutions.causal_attention(q, k).transpose(-1, -2)
    verdicts(checks.check_causal_attention, solutions.causal_attention, (no_mask, "weight on future keys"),
             (no_scale, "too peaked"), (wrong_axis, "the last dimension, the keys"))


def test_check_strongest_induction_head(verdicts):
    def duplicate_token_head(weights, period):  # off by one: the previous occurrence itself
        rows = torch.arange(period, weights.shape[-1])
        scores = weights[:, :, rows, rows - period].mean(-1)
        return divmod(int(scores.argmax()), scores.shape[1])

    def swapped(weights, period):
        return solutions.strongest_induction_head(weights, period)[::-1]

    verdicts(checks.check_strongest_induction_head, solutions.strongest_induction_head,
             (duplicate_token_head, "a duplicate-token head"), (swapped, "layer and head are swapped"),
             (lambda w, p: (0, 0), "an induction head at token i looks at the token that came AFTER"))


def test_planted_heads_are_where_the_checker_says():
    weights = _planted_maps((4, 3), 5, {(2, 1): 4, (1, 2): 5}, seed=0)
    assert solutions.strongest_induction_head(weights, 5) == (2, 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3, 10))


def test_check_rope_rotate(verdicts):
    interleaved = lambda x, pos, theta: solutions.rope_rotate(  # pairs (0, 1), (2, 3): another layout
        x.view(-1, 2).T.reshape(-1), pos, theta).view(2, -1).T.reshape(-1)
    backwards = lambda x, pos, theta: solutions.rope_rotate(x, -pos, theta)
    verdicts(checks.check_rope_rotate, solutions.rope_rotate, (interleaved, "you paired neighbours"),
             (backwards, "turned the wrong way"), (lambda x, pos, theta: x, "x came back unchanged"))
