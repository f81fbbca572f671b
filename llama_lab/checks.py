"""Exercise checkers: `check_...(student_answer)` prints a verdict and a hint.

A checker never raises: an exception in the learner's code becomes a hint,
so the notebook goes on. Each returns a `Verdict`, true when the answer
passed, which the tests use to prove it passes the solution in
`llama_lab.solutions` and fails a wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llama_lab import sizing, solutions


class Verdict:
    """A checker's result: truthy when the answer passed. A notebook shows nothing for it,
    since the checker has already printed its verdict."""

    def __init__(self, passed: bool):
        self.passed = passed

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Verdict(passed={self.passed})"

    def _ipython_display_(self) -> None:
        pass


def _same(got: Any, expected: Any, rel: float) -> bool:
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, expected, rel_tol=rel, abs_tol=rel)
    try:  # tensors and arrays
        import torch

        if isinstance(expected, torch.Tensor):
            got = torch.as_tensor(got, dtype=expected.dtype)
            return got.shape == expected.shape and torch.allclose(got, expected, rtol=rel, atol=rel,
                                                                  equal_nan=True)
    except (TypeError, ValueError, RuntimeError):
        return False
    return got == expected


def run_check(title: str, cases: list[tuple[str, Callable[[], Any], Any]], hint: str,
              rel: float = 1e-6) -> Verdict:
    """Try each case `(description, compute_student_answer, expected)`; print one verdict.

    The first failing case is shown with what was expected and what came back.
    """
    for description, compute, expected in cases:
        try:
            got = compute()
        except NotImplementedError:
            print(f"⏳ {title}: not answered yet. Replace `raise NotImplementedError` with your code, "
                  "then run the cell again.")
            return Verdict(False)
        except Exception as err:  # the learner's code failed: explain, never crash the notebook
            print(f"❌ {title}: your code raised {type(err).__name__}: {err}\n   Hint: {hint}")
            return Verdict(False)
        if not _same(got, expected, rel):
            print(f"❌ {title}: for {description} the answer should be {_short(expected)}, "
                  f"yours is {_short(got)}.\n   Hint: {hint}")
            return Verdict(False)
    print(f"✅ {title}: correct ({len(cases)} case{'s' * (len(cases) > 1)} checked).")
    return Verdict(True)


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


# --- notebook 00 ------------------------------------------------------------------------------

def check_layer_params(student_fn: Callable) -> Verdict:
    """Exercise (00): `student_fn(config)` returns the parameter count of ONE decoder layer."""
    configs = {size: sizing.llama2_config(size) for size in ("13b", "7b", "70b")}
    cases = [(f"Llama-2-{size.upper()}", (lambda c=c: student_fn(c)), solutions.layer_params(c))
             for size, c in configs.items()]
    return run_check(
        "Parameters of one decoder layer", cases,
        hint="a layer holds q/k/v/o projections (k and v are smaller with GQA: "
             "num_key_value_heads x head_dim columns), three MLP matrices of hidden x intermediate, "
             "and two RMSNorm weight vectors of size hidden. There are no biases.")


def check_kv_cache_gb(student_fn: Callable) -> Verdict:
    """Exercise (00): `student_fn(config, n_tokens)` returns the bf16 KV-cache size in GB (1e9 bytes)."""
    cases = [(f"Llama-2-{size.upper()} at {n} tokens", (lambda c=c, n=n: student_fn(c, n)),
              solutions.kv_cache_gb(c, n))
             for size, n in [("13b", 4096), ("7b", 1000), ("70b", 4096)]
             for c in [sizing.llama2_config(size)]]
    return run_check(
        "KV-cache size", cases, rel=1e-3,
        hint="per token, every layer stores one key and one value vector per KV head: "
             "2 x layers x kv_heads x head_dim numbers, 2 bytes each in bf16. Divide bytes by 1e9.")


# --- notebook 02 ------------------------------------------------------------------------------

def check_causal_attention(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(q, k)` turns queries and keys (heads, tokens, head_dim) into
    causal softmax attention weights (heads, tokens, tokens), equal to the model's own."""
    import torch

    from llama_lab import attention, models

    model, tokenizer = models.load_model("tiny-random", attn_implementation="eager")
    ids = tokenizer("attention!", return_tensors="pt").input_ids
    maps = attention.collect_attention(model, tokenizer, ids)
    cases = [(f"layer {layer} of the tiny model (its own attention maps)",
              (lambda qk=qk: student_fn(*qk)), maps.weights[layer])
             for layer in (0, 3) for qk in [attention.queries_keys(model, ids, layer)]]
    q, k = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    cases.append(("random q, k (3 heads, 5 tokens, head_dim 8)", lambda: student_fn(q, k),
                  solutions.causal_attention(q, k)))
    return run_check(
        "Causal attention", cases, rel=1e-5,
        hint="scores = q @ k^T / sqrt(head_dim); set the scores of future keys (column > row) to -inf; "
             "softmax over the last dimension (the keys).")


def _planted_maps(shape: tuple[int, int], period: int, plants: dict, seed: int):
    """Causal random attention maps (layers, heads, 2*period, 2*period) with some heads
    overwritten: plants maps (layer, head) -> the offset that head attends to."""
    import torch

    n = 2 * period
    scores = torch.randn(*shape, n, n, generator=torch.Generator().manual_seed(seed))
    weights = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    for (layer, head), offset in plants.items():
        rows = torch.arange(offset, n)
        weights[layer, head, rows] *= 0.1
        weights[layer, head, rows, rows - offset] += 0.9
    return weights


def check_strongest_induction_head(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(weights, period)` returns (layer, head) of the strongest
    induction head in maps (layers, heads, tokens, tokens) of a sequence repeated every `period`."""
    setups = [((4, 3), 5, {(2, 1): 4, (1, 2): 5, (3, 0): 1}, 0),   # induction, duplicate-token, previous
              ((6, 9), 8, {(5, 0): 7, (0, 4): 8, (2, 2): 1}, 1),
              ((3, 4), 6, {(0, 3): 5, (2, 3): 6, (1, 0): 1}, 2)]
    cases = []
    for shape, period, plants, seed in setups:
        weights = _planted_maps(shape, period, plants, seed)
        cases.append((f"{shape[0]} layers x {shape[1]} heads, period {period}",
                      (lambda w=weights, p=period: tuple(int(v) for v in student_fn(w, p))),
                      solutions.strongest_induction_head(weights, period)))
    return run_check(
        "Strongest induction head", cases,
        hint="in the repeat (query positions period, period+1, ...), an induction head at query i looks "
             "at key i - period + 1: the token AFTER the previous occurrence of token i (not the "
             "occurrence itself, i - period). Average that weight per head, then take the argmax.")


def check_rope_rotate(student_fn: Callable) -> Verdict:
    """Exercise (02): `student_fn(x, position, theta)` rotates x (head_dim,) like the model's RoPE."""
    import torch

    from llama_lab import attention

    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    cases = [(f"head_dim {d}, position {pos}, theta {theta:g}",
              (lambda d=d, pos=pos, theta=theta: student_fn(x[:d], pos, theta)),
              attention.rope(x[None, :d], [pos], theta)[0])
             for d, pos, theta in [(8, 0, 10000.0), (8, 3, 10000.0), (64, 17, 100000.0), (64, 250, 10000.0)]]
    return run_check(
        "RoPE rotation", cases, rel=1e-4,
        hint="split x in halves x1 = x[:d/2], x2 = x[d/2:]; pair i turns by angle "
             "position * theta ** (-2i/d); the result is cat(x1*cos - x2*sin, x2*cos + x1*sin).")


# --- notebook 03 ------------------------------------------------------------------------------

def check_ffn_dim(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(dim, multiple_of, multiplier)` returns the SwiGLU hidden width."""
    shapes = [("Llama-2-7B", 4096, 256, None), ("Llama-2-13B", 5120, 256, None),
              ("Llama-2-70B", 8192, 4096, 1.3), ("SmolLM2-135M", 576, 256, None), ("dim 1000", 1000, 64, 1.5)]
    cases = [(f"{name} (dim {dim}, multiple_of {m}, multiplier {mult})",
              (lambda dim=dim, m=m, mult=mult: student_fn(dim, m, mult)), solutions.ffn_dim(dim, m, mult))
             for name, dim, m, mult in shapes]
    return run_check(
        "SwiGLU hidden width", cases,
        hint="start from int(2 * 4 * dim / 3); if a multiplier is given, take int(multiplier * that); "
             "then round UP to the next multiple of multiple_of (not to the nearest one).")


def check_rotary_interleaved(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(x, theta)` applies Meta's complex-number RoPE to x (seq, head_dim)."""
    import torch

    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    cases = [(f"{seq} positions, head_dim {d}, theta {theta:g}",
              (lambda seq=seq, d=d, theta=theta: student_fn(x[:seq, :d].clone(), theta)),
              solutions.apply_rotary_interleaved(x[:seq, :d], theta))
             for seq, d, theta in [(1, 8, 10000.0), (5, 8, 10000.0), (40, 64, 500000.0), (17, 64, 10000.0)]]
    return run_check(
        "RoPE with complex numbers", cases, rel=1e-4,
        hint="pairs = torch.view_as_complex(x.reshape(seq, d // 2, 2)); angle[p, i] = p * theta ** (-2i/d); "
             "multiply by torch.polar(torch.ones_like(angle), angle); then view_as_real(...).flatten(1).")


def check_causal_mask_after_cache(student_fn: Callable) -> Verdict:
    """Exercise (03): `student_fn(n_new, n_cached)` returns the boolean mask (n_new, n_cached + n_new)."""
    cases = [(f"{n_new} new token(s) after {n_cached} cached",
              (lambda n_new=n_new, n_cached=n_cached: student_fn(n_new, n_cached)),
              solutions.causal_mask_after_cache(n_new, n_cached))
             for n_new, n_cached in [(4, 0), (1, 6), (3, 5), (2, 1)]]
    return run_check(
        "Causal mask after a KV cache", cases,
        hint="new token i sits at position n_cached + i and may see key j when j <= n_cached + i: "
             "torch.ones(n_new, n_cached + n_new, dtype=torch.bool).tril(diagonal=...).")


# --- notebook 01 ------------------------------------------------------------------------------

def check_count_pairs(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(ids)` returns {(a, b): how often b follows a in ids}."""
    inputs = [[1, 2, 3, 1, 2], [7, 7, 7], [5], [], list(b"hello, hello!")]
    cases = [(f"ids={ids}", (lambda ids=ids: dict(student_fn(list(ids)))), solutions.count_pairs(ids))
             for ids in inputs]
    return run_check(
        "Count adjacent pairs", cases,
        hint="walk over neighbours with zip(ids, ids[1:]) and count each (a, b) tuple in a dict; "
             "overlapping pairs count: [7, 7, 7] holds (7, 7) twice.")


def check_apply_merge(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(ids, pair, new_id)` replaces each occurrence of pair, left to right."""
    inputs = [([1, 2, 3, 1, 2], (1, 2), 4), ([7, 7, 7], (7, 7), 9), ([1, 2, 1, 2, 1], (2, 1), 8),
              ([1, 2], (2, 1), 5), ([], (1, 2), 3), ([3, 3, 3, 3], (3, 3), 6)]
    cases = [(f"ids={ids}, pair={pair}, new_id={new}",
              (lambda ids=ids, pair=pair, new=new: student_fn(list(ids), pair, new)),
              solutions.apply_merge(ids, pair, new)) for ids, pair, new in inputs]
    return run_check(
        "Apply one merge", cases,
        hint="build a new list: at position i, if (ids[i], ids[i + 1]) is the pair, append new_id and "
             "jump two places, else append ids[i] and move one. [7, 7, 7] with (7, 7) -> [9, 7].")


def check_chat_prompt_tokens(student_fn: Callable) -> Verdict:
    """Exercise (01): `student_fn(tokenizer, messages)` counts the tokens of the rendered chat prompt."""
    from llama_lab import models, tokenization

    chatml = models.tiny_tokenizer()
    llama = tokenization.to_transformers(tokenization.train_sentencepiece(tokenization.load_corpus(), 1000))
    conversations = [[{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Answer in Portuguese."},
                      {"role": "user", "content": "Where do llamas 🦙 live? Café?"}],
                     [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3 + 3?"}]]
    cases = [(f"{name} tokenizer, {len(messages)} message(s)", (lambda t=tok, m=messages: student_fn(t, m)),
              solutions.chat_prompt_tokens(tok, messages))
             for name, tok in [("ChatML (byte-level)", chatml), ("Llama-2-style", llama)]
             for messages in conversations]
    return run_check(
        "Tokens of a chat prompt", cases,
        hint="let the chat template render AND tokenize in one call (apply_chat_template, with the "
             "generation prompt; return_dict=False gives the list of ids). Tokenizing the rendered "
             "string again adds a second BOS; characters are not tokens.")


# --- notebook 04 ------------------------------------------------------------------------------

def _sampling_logits():
    """Logits to test filters on: a random batch, exact ties, and entries already at -inf."""
    import torch

    random_rows = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 2
    ties = torch.tensor([4.0, 1.0, 4.0, 2.0, 2.0, -1.0, 0.5, 3.0])
    masked = torch.tensor([float("-inf"), 2.0, 0.0, float("-inf"), 1.0, -3.0, 2.5, 0.1])
    return {"a batch of 3 random rows": random_rows, "a row with ties": ties, "a row with -inf": masked}


def check_top_k(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(logits, k)` keeps the k largest logits (ties with the k-th too)."""
    cases = [(f"{name}, k={k}", (lambda x=x, k=k: student_fn(x.clone(), k)), solutions.top_k_filter(x, k))
             for name, x in _sampling_logits().items() for k in (1, 3, 5)]
    return run_check(
        "Top-k filter", cases,
        hint="find the k-th largest value with logits.topk(k, dim=-1).values[..., -1:], then set every "
             "logit strictly below it to float('-inf') with masked_fill (ties with it stay).")


def check_top_p(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(logits, p)` keeps the smallest set of top tokens with mass >= p."""
    cases = [(f"{name}, p={p}", (lambda x=x, p=p: student_fn(x.clone(), p)), solutions.top_p_filter(x, p))
             for name, x in _sampling_logits().items() if name != "a row with ties"
             for p in (0.05, 0.5, 0.93)]
    return run_check(
        "Top-p (nucleus) filter", cases,
        hint="sort the probabilities in descending order; a token stays when the probability of the "
             "tokens ranked above it is still below p (so the most likely token always stays); put the "
             "answer back in vocabulary order with scatter, and mask the rest with -inf.")


def check_greedy_decode(student_fn: Callable) -> Verdict:
    """Exercise (04): `student_fn(model, input_ids, n_new)` appends n_new greedy tokens, no KV cache."""
    import torch

    from llama_lab.models import load_model

    model, _ = load_model("tiny-random")
    prompts = {"one prompt": torch.tensor([[5, 80, 81]]), "a batch of two": torch.tensor([[70, 71], [3, 9]])}
    cases = [(f"{name}, {n} new tokens", (lambda ids=ids, n=n: student_fn(model, ids.clone(), n)),
              solutions.greedy_decode(model, ids, n))
             for name, ids in prompts.items() for n in (1, 6)]
    return run_check(
        "Greedy decoding", cases,
        hint="n_new times: logits = model(input_ids).logits; "
             "next_id = logits[:, -1].argmax(-1, keepdim=True); "
             "input_ids = torch.cat([input_ids, next_id], dim=-1). Return all of input_ids.")


# --- notebook 05 ------------------------------------------------------------------------------

def check_loss_mask(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(input_ids, start, end)` returns the SFT labels."""
    ids = [101, 7, 8, 9, 42, 43, 44, 2, 13]
    cases = [(f"input_ids={ids}, start={s}, end={e}",
              (lambda s=s, e=e: [int(t) for t in student_fn(ids, s, e)]),  # a tensor answer is fine too
              solutions.loss_mask_labels(ids, s, e)) for s, e in [(4, 8), (0, 9), (3, 3)]]
    return run_check(
        "Loss mask", cases,
        hint="copy the token id at positions start <= i < end (the assistant's reply and its end-of-turn "
             "token) and put -100 everywhere else: cross_entropy ignores -100.")


def check_lora_forward(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(x, W, A, B, alpha, r)` returns a LoRA layer's output."""
    import torch

    g = torch.Generator().manual_seed(5)
    x, W = torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g)
    cases = []
    for r, alpha in [(2, 4), (4, 4), (1, 8)]:
        A, B = torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g)
        cases.append((f"r={r}, alpha={alpha}",
                      (lambda A=A, B=B, r=r, alpha=alpha: student_fn(x, W, A, B, alpha, r)),
                      solutions.lora_forward(x, W, A, B, alpha, r)))
    return run_check(
        "LoRA forward", cases, rel=1e-5,
        hint="W is (out, in) like nn.Linear's weight, so the base output is x @ W.T; the update goes "
             "through A (r, in) then B (out, r) and is multiplied by alpha / r.")


def check_dpo_loss(student_fn: Callable) -> Verdict:
    """Exercise (05): `student_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)`."""
    import torch

    g = torch.Generator().manual_seed(6)
    cases = []
    for beta in (0.1, 0.5):
        logps = [-20 * torch.rand(4, generator=g) for _ in range(4)]
        cases.append((f"beta={beta} on 4 pairs", (lambda logps=logps, beta=beta: student_fn(*logps, beta)),
                      solutions.dpo_loss(*logps, beta)))
    zero = torch.zeros(3)
    cases.append(("policy == reference", lambda: student_fn(zero, zero, zero, zero, 0.1),
                  solutions.dpo_loss(zero, zero, zero, zero, 0.1)))
    return run_check(
        "DPO loss", cases, rel=1e-5,
        hint="each reply's implicit reward is beta x (policy log-prob - reference log-prob); the loss is "
             "-logsigmoid(reward of chosen - reward of rejected), averaged over pairs "
             "(log 2 when policy and reference agree).")
