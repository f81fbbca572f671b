"""Attention maps of a Llama model: collect them, score what each head does, test it, draw them.

Where a head looks (its maps, `induction_score`...) is a hint; the causal test is to take the
head out (`ablate_heads`, zero or mean) and measure what the model loses (`repeat_test` on
repeated random tokens), against as many `random_heads`; what a head writes is its OV circuit
(`ov_matrix`, `head_writes`, `copying_scores`).

>>> import llama_lab as lab
>>> model, tokenizer = lab.load_model("tiny-random", attn_implementation="eager")
>>> maps = collect_attention(model, tokenizer, "hello", layers=[0, 3], heads=[1])
>>> tuple(maps.weights.shape), maps.tokens  # (layers, heads, queries, keys)
((2, 1, 5, 5), ['h', 'e', 'l', 'l', 'o'])

Weights come from transformers' eager attention, the numbers
`output_attentions=True` returns; the fused kernels (sdpa, FlashAttention) do
not return them. Three ways to look at them:

* `plot_heads` / `plot_layer_head_map`: matplotlib pictures (GitHub shows them);
* `attention_viewer`: an interactive view of our own, plain HTML/SVG and a
  little inline JavaScript, no network (JupyterLab, Colab, VS Code);
* `bertviz_view`: bertviz's head and model views, which load their
  JavaScript from a CDN (online only).
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import HTML
from transformers.models.llama.modeling_llama import repeat_kv

from llama_lab import scratch, sizing, tokenization
from llama_lab.errors import AttentionNotAvailableError, InvalidSettingError

DATA_DIR = Path(__file__).parent / "data"


@dataclass
class AttentionMaps:
    """Attention weights of some layers and heads for one input.

    weights[i, j, q, k] is how much query position q of head `heads[j]` in
    layer `layers[i]` attends to key position k (each row sums to 1).
    """

    weights: torch.Tensor  # (layers, heads, tokens, tokens), float32 on the CPU
    tokens: list[str]
    layers: list[int]
    heads: list[int]

    def head(self, layer: int, head: int) -> torch.Tensor:
        """The (tokens x tokens) map of one head, by its layer and head number in the model."""
        return self.weights[self.layers.index(layer), self.heads.index(head)]

    @property
    def nbytes(self) -> int:
        return self.weights.numel() * self.weights.element_size()


# --- collecting -----------------------------------------------------------------------------------

def require_eager(model) -> None:
    """Raise `AttentionNotAvailableError` unless `model` uses eager attention."""
    implementation = model.config._attn_implementation
    if implementation != "eager":
        raise AttentionNotAvailableError(
            f"This model computes attention with {implementation!r}, a fused kernel that does not "
            "return the (heads x tokens x tokens) attention weights, so there are no maps to show. "
            "Load it with lab.load_model(attn_implementation='eager'), or switch this model with "
            "model.set_attn_implementation('eager').")


def _as_ids(tokenizer, text) -> torch.Tensor:
    if isinstance(text, str):
        return tokenizer(text, return_tensors="pt").input_ids
    return torch.as_tensor(text).reshape(1, -1)


def _checked(kind: str, chosen, total: int) -> list[int]:
    chosen = list(range(total)) if chosen is None else [int(i) for i in chosen]
    bad = [i for i in chosen if not 0 <= i < total]
    if bad or not chosen:
        raise InvalidSettingError(f"{kind} {bad or chosen} out of range: this model has {total} {kind}, "
                                  f"numbered 0 to {total - 1}.")
    return chosen


def collect_attention(model, tokenizer, text, *, layers=None, heads=None,
                      max_tokens: int | None = None) -> AttentionMaps:
    """Run `text` (a string or token ids) through `model` and keep the chosen attention maps.

    layers, heads: numbers to keep (default all); max_tokens: keep only the first
    tokens. Attention is causal, so the maps of a prefix are exactly the top-left
    corner of the maps of the whole text.

    Hooks on the chosen layers keep only the chosen heads as the model runs: the
    same numbers as `output_attentions=True`, without holding every layer's maps
    (which for 13B at 1,000 tokens would be 3 GB).
    """
    require_eager(model)
    config = model.config
    layers = _checked("layers", layers, config.num_hidden_layers)
    heads = _checked("heads", heads, config.num_attention_heads)
    ids = _as_ids(tokenizer, text)[:, :max_tokens]
    kept = {}

    def keeper(layer: int):
        def keep(module, args, output):  # eager attention returns (output, weights)
            kept[layer] = output[1][0, heads].float().cpu()
        return keep

    handles = [model.model.layers[layer].self_attn.register_forward_hook(keeper(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model(ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return AttentionMaps(torch.stack([kept[layer] for layer in layers]),
                         tokenization.token_labels(tokenizer, ids[0]), layers, heads)


def queries_keys(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of `layer` after RoPE, as the attention scores see them.

    Returns q and k of shape (query heads, tokens, head_dim): the keys are
    already repeated for grouped-query attention, so q[h] pairs with k[h].
    Forward hooks keep what the model computes on the way: the outputs of the
    layer's q and k projections, and the cos and sin of its rotary embedding.
    """
    attention = model.model.layers[layer].self_attn
    watched = {"q": attention.q_proj, "k": attention.k_proj, "cos_sin": model.model.rotary_emb}
    seen = _run_keeping(model, input_ids, watched)
    cos, sin = (t[0] for t in seen["cos_sin"])  # (tokens, head_dim): batch 1
    q, k = (seen[name][0].unflatten(-1, (-1, attention.head_dim)).transpose(0, 1) for name in "qk")
    q, k = scratch.apply_rotary(q, cos, sin), scratch.apply_rotary(k, cos, sin)
    return q.float().cpu(), k.repeat_interleave(attention.num_key_value_groups, dim=0).float().cpu()


# --- what heads do: scores per head ---------------------------------------------------------------

def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Mean attention from each token to the token just before it (over the last two dims)."""
    rows = torch.arange(1, weights.shape[-1])
    return weights[..., rows, rows - 1].mean(-1)


def first_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Mean attention from each token (but the first) to the first token: the "attention sink"."""
    return weights[..., 1:, 0].mean(-1)


def induction_score(weights: torch.Tensor, period: int) -> torch.Tensor:
    """On a sequence that repeats every `period` tokens: mean attention from each token of
    the repeat to the token that FOLLOWED its previous occurrence (offset period - 1).

    An induction head does exactly that: "last time I saw this token, B came next;
    look at B", which lets the model copy the continuation.
    """
    rows = torch.arange(period, weights.shape[-1])
    return weights[..., rows, rows - period + 1].mean(-1)


def repeated_random_tokens(vocab_size: int, period: int, repeats: int = 2, seed: int = 0) -> torch.Tensor:
    """`period` random token ids, repeated `repeats` times: shape (period * repeats,).

    >>> ids = repeated_random_tokens(100, period=3)
    >>> ids.shape, bool((ids[:3] == ids[3:]).all())
    (torch.Size([6]), True)
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (period,), generator=generator).repeat(repeats)


def entropy_bits(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each attention row in bits: 0 when a row looks at one token,
    log2(k) when it spreads evenly over k tokens.

    >>> entropy_bits(torch.tensor([[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]])).tolist()
    [1.0, 2.0]
    """
    return -torch.special.xlogy(weights, weights).sum(-1) / torch.log(torch.tensor(2.0))


# --- causal evidence: ablating heads, and the in-context repeat test ------------------------------

Head = tuple[int, int]  # (layer, head)


def _head_slices(model, heads: Iterable[Head]) -> dict[int, list[slice]]:
    """Per layer, the slices of its o_proj input that the chosen heads write (head h: h*d .. (h+1)*d)."""
    config = model.config
    d = sizing.head_dim(config)
    by_layer: dict[int, list[slice]] = {}
    for layer, head in heads:
        _checked("layers", [layer], config.num_hidden_layers)
        _checked("heads", [head], config.num_attention_heads)
        by_layer.setdefault(layer, []).append(slice(head * d, (head + 1) * d))
    return by_layer


def head_means(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Each head's mean output (layers, heads, head_dim) over every position of `input_ids`
    (batch, seq): what mean ablation puts in place of a head's output."""
    kept = {}

    def keeper(layer: int):
        def keep(module, args):  # o_proj's input: the heads' outputs side by side
            kept[layer] = args[0].float().mean(dim=(0, 1)).cpu()
        return keep

    layers = model.model.layers
    handles = [block.self_attn.o_proj.register_forward_pre_hook(keeper(i)) for i, block in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    means = torch.stack([kept[i] for i in range(len(layers))])  # (layers, heads * head_dim)
    return means.unflatten(-1, (model.config.num_attention_heads, -1))


@contextmanager
def ablate_heads(model, heads: Iterable[Head], means: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the `with` block the chosen (layer, head) pairs write nothing: their slice of the
    o_proj input is set to zero (zero ablation) or, with `means` from `head_means`, to the head's
    mean output (mean ablation: the head says what it says on average, not what it read here).

    A forward pre-hook on each layer's o_proj, removed on leaving the block.
    """
    by_layer = _head_slices(model, heads)
    d = sizing.head_dim(model.config)

    def ablator(layer: int, slices: list[slice]):
        def ablate(module, args):
            x = args[0].clone()
            for s in slices:
                x[..., s] = 0 if means is None else means[layer, s.start // d].to(x)
            return (x, *args[1:])
        return ablate

    handles = [model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(ablator(layer, slices))
               for layer, slices in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def random_heads(config, n: int, seed: int = 0, exclude: Iterable[Head] = ()) -> list[Head]:
    """`n` (layer, head) pairs drawn at random without repeats, none of `exclude`: the control group.

    >>> from transformers import LlamaConfig
    >>> random_heads(LlamaConfig(num_hidden_layers=2, num_attention_heads=2), 3, exclude=[(0, 0)])
    [(1, 1), (0, 1), (1, 0)]
    """
    excluded = set(exclude)
    pool = [h for h in itertools.product(range(config.num_hidden_layers), range(config.num_attention_heads))
            if h not in excluded]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return [pool[i] for i in order.tolist()]


@dataclass
class RepeatTest:
    """How well a model continues random tokens that repeat: the in-context test of induction heads.

    position_loss[t]: mean cross-entropy (nats) of predicting token t + 1 from tokens 0..t.
    repeat_loss, repeat_accuracy: over the second copy (targets period + 1 .. 2 period - 1: the
    first token of the copy cannot be guessed); first_loss: over the first copy, pure chance.
    """

    position_loss: torch.Tensor
    repeat_loss: float
    repeat_accuracy: float
    first_loss: float
    period: int


def repeat_test(model, input_ids: torch.Tensor, period: int) -> RepeatTest:
    """Run `input_ids` (batch, 2 * period), each row `period` tokens twice, and score the repeat.
    `repeated_random_sequences` makes such rows."""
    with torch.no_grad():
        logits = model(input_ids.to(model.device), use_cache=False).logits[:, :-1].float().cpu()
    targets = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (batch, t)
    repeat = slice(period, 2 * period - 1)  # predicting targets period+1 .. 2*period-1
    correct = (logits.argmax(-1) == targets)[:, repeat]
    return RepeatTest(loss.mean(0), loss[:, repeat].mean().item(), correct.float().mean().item(),
                      loss[:, :period - 1].mean().item(), period)


def repeated_random_sequences(vocab_size: int, period: int, batch: int, seed: int = 0) -> torch.Tensor:
    """`batch` rows of `period` random token ids repeated twice: shape (batch, 2 * period).

    >>> rows = repeated_random_sequences(100, period=4, batch=3)
    >>> rows.shape, bool((rows[:, :4] == rows[:, 4:]).all())
    (torch.Size([3, 8]), True)
    """
    return torch.stack([repeated_random_tokens(vocab_size, period, 2, seed + i) for i in range(batch)])


def plot_position_loss(tests: dict[str, RepeatTest], ax=None):
    """Per-position loss of several runs (clean, ablations) on one plot; the repeat starts at the line."""
    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    for name, test in tests.items():
        ax.plot(range(1, len(test.position_loss) + 1), test.position_loss, label=name, lw=1.2)
    period = next(iter(tests.values())).period
    ax.axvline(period, color="grey", ls=":", lw=1)
    ax.set(xlabel="position of the predicted token", ylabel="loss (nats)", title="Loss per position")
    ax.legend(fontsize=8)
    return ax


# --- what a head writes: the OV circuit -----------------------------------------------------------

def ov_matrix(model, layer: int, head: int) -> torch.Tensor:
    """W_O^h W_V^h (dim, dim): what head `head` of `layer` adds to the residual stream for a token
    it attends to fully, from that token's normed residual vector. With GQA the values come from
    the key/value head the query head shares (`kv_head_map`)."""
    attention = model.model.layers[layer].self_attn
    d = sizing.head_dim(model.config)
    kv = kv_head_map(model.config)[head]
    w_v = attention.v_proj.weight[kv * d:(kv + 1) * d]  # (head_dim, dim)
    w_o = attention.o_proj.weight[:, head * d:(head + 1) * d]  # (dim, head_dim)
    return (w_o @ w_v).detach().float()


def _run_keeping(model, input_ids: torch.Tensor, modules: dict, pre: bool = False) -> dict:
    """Run the model once; return the input (`pre`) or the output of each watched module by name."""
    seen = {}

    def keeper(name: str):
        def keep(module, args, output=None):
            seen[name] = args[0] if pre else output
        return keep

    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(module, register)(keeper(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids.reshape(1, -1).to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def heads_writes(model, input_ids: torch.Tensor, heads: Iterable[Head]) -> dict[Head, torch.Tensor]:
    """What each (layer, head) adds to the residual stream at each position (tokens, dim), from one
    forward pass: the head's slice of the o_proj input (its attention-weighted values) times its
    columns of W_O."""
    heads = list(heads)
    layers = model.model.layers
    d = sizing.head_dim(model.config)
    watched = {layer: layers[layer].self_attn.o_proj for layer in _head_slices(model, heads)}
    heads_out = _run_keeping(model, input_ids, watched, pre=True)
    writes = {}
    for layer, head in heads:
        w_o = watched[layer].weight[:, head * d:(head + 1) * d]
        writes[layer, head] = (heads_out[layer][0][:, head * d:(head + 1) * d] @ w_o.T).detach().float().cpu()
    return writes


def head_writes(model, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """What one head adds to the residual stream at each position (tokens, dim): `heads_writes`."""
    return heads_writes(model, input_ids, [(layer, head)])[layer, head]


def direct_logits(model, written: torch.Tensor) -> torch.Tensor:
    """Vectors of the residual stream read as the model reads its last one: final RMSNorm, then
    the unembedding (the "logit lens"): which tokens a head's output promotes, on its own."""
    weight = model.lm_head.weight
    with torch.no_grad():
        return model.lm_head(model.model.norm(written.to(weight))).float().cpu()


def copying_scores(model, input_ids: torch.Tensor, period: int, heads: Iterable[Head]) -> dict[Head, float]:
    """On a sequence repeating every `period` tokens: for each head, over the positions of the
    repeat, the mean share of the vocabulary that the next token (the one an induction head attends
    to) beats in the head's direct logits. 0.5 is chance, 1.0 the top token everywhere. Where a head
    looks (QK) says what it reads; this says whether what it writes promotes that token by itself (OV).
    One forward pass for all the heads."""
    ids = input_ids.reshape(-1)
    scores = {}
    for head, written in heads_writes(model, ids, heads).items():
        logits = direct_logits(model, written)[period:-1]
        target = logits.gather(1, ids[period + 1:, None])
        scores[head] = (logits < target).float().mean().item()
    return scores


def copying_score(model, input_ids: torch.Tensor, period: int, layer: int, head: int) -> float:
    """`copying_scores` of one head."""
    return copying_scores(model, input_ids, period, [(layer, head)])[layer, head]


# --- grouped-query attention and RoPE -------------------------------------------------------------

def kv_head_map(config) -> list[int]:
    """For each query head, the key/value head it reads, from transformers' own `repeat_kv`.

    >>> from transformers import LlamaConfig
    >>> kv_head_map(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3))
    [0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    n_kv = config.num_key_value_heads
    kv_index = torch.arange(n_kv).view(1, n_kv, 1, 1)
    return repeat_kv(kv_index, config.num_attention_heads // n_kv)[0, :, 0, 0].tolist()


def rope(x: torch.Tensor, positions, theta: float = 10000.0) -> torch.Tensor:
    """Rotate vectors `x` (n, head_dim) to `positions` (n,): Llama's RoPE, the one written out in
    `llama_lab.scratch` (`rope_tables`, `apply_rotary`), at any positions."""
    positions = torch.as_tensor(positions).reshape(-1)
    cos, sin = scratch.rope_tables(x.shape[-1], int(positions.max()) + 1, theta)
    return scratch.apply_rotary(x, cos[positions], sin[positions])


# --- cost -----------------------------------------------------------------------------------------

def attention_map_bytes(config, n_tokens: int, dtype: str | torch.dtype = "fp32",
                        layers: int | None = None, heads: int | None = None) -> int:
    """Bytes of the attention maps of `layers` x `heads` (default: all of them) for `n_tokens`.

    >>> attention_map_bytes(sizing.llama2_config("13b"), 4096, "bf16")  # every map of 13B: 54 GB
    53687091200
    """
    layers = config.num_hidden_layers if layers is None else layers
    heads = config.num_attention_heads if heads is None else heads
    return round(layers * heads * n_tokens**2 * sizing.BYTES_PER_PARAM[sizing.dtype_name(dtype)])


# --- matplotlib pictures --------------------------------------------------------------------------

def plot_attention(weights: torch.Tensor, tokens: list[str], ax=None, title: str | None = None):
    """One (queries x keys) map as a heatmap with the tokens on both axes."""
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    ax.imshow(weights, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(tokens))
    ax.set_xticks(ticks, tokens, rotation=90, fontsize=8)
    ax.set_yticks(ticks, tokens, fontsize=8)
    ax.set(xlabel="key (attended to)", ylabel="query (attending)", title=title)
    ax.grid(False)
    return ax


def plot_heads(maps: AttentionMaps, size: float = 1.6):
    """A grid of heatmaps: one row per collected layer, one column per collected head."""
    n_layers, n_heads = maps.weights.shape[:2]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False)
    for (i, layer), (j, head) in itertools.product(enumerate(maps.layers), enumerate(maps.heads)):
        ax = axes[i, j]
        ax.imshow(maps.weights[i, j], cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(f"L{layer} H{head}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_layer_head_map(scores: torch.Tensor, title: str, ax=None, layers=None):
    """A (layers x heads) score map with a colour bar; the best head is boxed."""
    ax = ax or plt.subplots(figsize=(3, 6))[1]
    layers = list(range(scores.shape[0])) if layers is None else list(layers)
    image = ax.imshow(scores, cmap="viridis", aspect="auto", vmin=0, vmax=max(float(scores.max()), 1e-9))
    best_layer, best_head = divmod(int(scores.argmax()), scores.shape[1])
    ax.add_patch(plt.Rectangle((best_head - 0.5, best_layer - 0.5), 1, 1, fill=False, color="red", lw=2))
    ax.set_xticks(range(scores.shape[1]))
    step = max(1, len(layers) // 10)
    ax.set_yticks(range(0, len(layers), step), layers[::step])
    ax.set(xlabel="head", ylabel="layer", title=title)
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, fraction=0.08)
    return ax


# --- interactive views ----------------------------------------------------------------------------

# The viewer's style and script, with __ROOT__ standing for the id of its <div> and __DATA__ for the maps.
VIEWER_CSS = DATA_DIR / "attention_viewer.css"
VIEWER_JS = DATA_DIR / "attention_viewer.js"

_viewer_count = itertools.count()


def attention_viewer(maps: AttentionMaps, decimals: int = 3) -> HTML:
    """An interactive view of `maps` that needs no network: pick a layer and a head,
    hover a token on the left to see where it looks; or switch to the matrix.

    Plain HTML/SVG with inline JavaScript: it renders in JupyterLab, Colab and
    VS Code. Like every script output, it runs only in a trusted notebook
    (the one you just ran); elsewhere it says so.
    """
    rounded = maps.weights.double().round(decimals=decimals).tolist()
    causal = [[[row[:q + 1] for q, row in enumerate(head)] for head in layer] for layer in rounded]
    data = {"tokens": maps.tokens, "layers": maps.layers, "heads": maps.heads, "weights": causal}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
    root = f"llama-lab-attention-{digest}-{next(_viewer_count)}"
    style = VIEWER_CSS.read_text(encoding="utf-8").replace("__ROOT__", root)
    script = VIEWER_JS.read_text(encoding="utf-8").replace("__ROOT__", root).replace("__DATA__", payload)
    return HTML(
        f'<div class="llama-lab-attention-viewer" id="{root}">'
        f"<style>{style}</style>"
        '<div data-role="nojs">Attention viewer: run this cell to see it (stored notebooks '
        "do not run scripts until you trust them).</div>"
        '<div data-role="controls" style="display:none">'
        '<select data-role="layer"></select><select data-role="head"></select>'
        '<select data-role="mode"><option value="lines">lines (hover a token)</option>'
        '<option value="matrix">matrix</option></select></div>'
        '<svg xmlns="http://www.w3.org/2000/svg"></svg>'
        f"<script>{script}</script>"
        "</div><!-- /llama-lab-attention-viewer -->"
    )


def _bertviz_attention(maps: AttentionMaps, n_heads: int) -> list:
    """bertviz wants one (1, heads, tokens, tokens) tensor per layer of the model and picks
    layers and heads by number: put the collected maps where their numbers say."""
    n = len(maps.tokens)
    empty = torch.zeros(1, n_heads, n, n, dtype=torch.float64)
    per_layer = [empty] * (max(maps.layers) + 1)
    for i, layer in enumerate(maps.layers):
        full = empty.clone()
        full[0, maps.heads] = maps.weights[i].double().round(decimals=3)  # 3 decimals keep the page small
        per_layer[layer] = full
    return per_layer


BERTVIZ_OFFLINE = ("bertviz shows nothing here: it loads its scripts (require.js, d3, jQuery) from "
                   "cdnjs.cloudflare.com, and this browser cannot reach it. It needs the internet; "
                   "attention.attention_viewer(maps) shows the same maps with no network.")

# Shown at the top of bertviz's page when one of its scripts fails to load, or nothing is drawn after 15 s.
_BERTVIZ_OFFLINE_NOTE = f"""
<p class="llama-lab-bertviz-offline" hidden style="font-family: sans-serif; color: #a00">{BERTVIZ_OFFLINE}</p>
<script>
(function () {{
  const note = document.currentScript.previousElementSibling, show = () => {{ note.hidden = false; }};
  addEventListener("error", e => {{ if (e.target.tagName === "SCRIPT") show(); }}, true);
  setTimeout(() => {{ if (!document.querySelector("#vis *")) show(); }}, 15000);  // bertviz drew nothing
}})();
</script>"""


def bertviz_view(maps: AttentionMaps, view: str = "head", height: int | None = None) -> HTML:
    """bertviz's `head_view` or `model_view` of `maps`, inside an iframe.

    bertviz loads require.js, d3 and jQuery from a CDN, so it needs the network:
    offline, the page says so (`BERTVIZ_OFFLINE`) instead of an empty box.
    The iframe's `srcdoc` runs its scripts in order, which avoids JupyterLab's
    "require is not defined" race on a first Run All.
    """
    from bertviz import head_view, model_view

    n_heads = max(maps.heads) + 1
    attention = _bertviz_attention(maps, n_heads)
    if view == "head":
        heads_only = [a[:, maps.heads] for a in attention]  # head_view has no include_heads
        page = head_view(heads_only, maps.tokens, include_layers=maps.layers, layer=maps.layers[0],
                         html_action="return")
        height = height or 120 + 25 * len(maps.tokens)
    elif view == "model":
        page = model_view(attention, maps.tokens, include_layers=maps.layers, include_heads=maps.heads,
                          html_action="return")
        n = len(maps.tokens)  # bertviz's layout: a thumbnail row is 84 / n_heads px per token
        height = height or round(60 + max(len(maps.layers) * (n * 84 / n_heads + 10), n * 18 + 55))
    else:
        raise InvalidSettingError(f"view={view!r}: use 'head' or 'model'.")
    page = _BERTVIZ_OFFLINE_NOTE + page.data
    return HTML(f'<div><iframe class="llama-lab-bertviz" srcdoc="{html.escape(page, quote=True)}" '
                f'style="width:100%;height:{height}px;border:0"></iframe></div>')
