"""llama_lab.sampling against transformers: the logits transforms, generate, streaming."""

import dataclasses
import functools
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TextIteratorStreamer
from transformers.generation import logits_process as hf

from llama_lab import chat, checks, sampling, scratch, solutions, tokenization, widgets
from llama_lab.errors import ContextLengthError, InvalidSettingError
from llama_lab.models import load_model

INF = float("inf")


@functools.cache
def tiny():
    return load_model("tiny-random")


@functools.cache
def smollm2():
    return load_model("smollm2-135m")


# --- the transforms, bit for bit against the transformers warpers ---------------------------------

# Few distinct values, so ties are common; -inf, as left by an earlier filter.
VALUES = st.sampled_from([-INF, -3.0, -1.0, 0.0, 0.0, 0.5, 1.0, 2.0, 7.0]) | st.floats(-20, 20, width=32)


@st.composite
def logits_batches(draw):
    batch, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    rows = draw(st.lists(st.lists(VALUES, min_size=vocab, max_size=vocab), min_size=batch, max_size=batch))
    return torch.tensor(rows, dtype=torch.float32)


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(ours, theirs), (ours, theirs)


# Each filter, the transformers warper it must equal, and the settings to try.
FILTERS = {
    "temperature": (sampling.temperature, hf.TemperatureLogitsWarper, st.floats(0.05, 5)),
    "top_k": (sampling.top_k, hf.TopKLogitsWarper, st.integers(1, 15)),
    "top_p": (sampling.top_p, hf.TopPLogitsWarper, st.floats(0, 1)),
    "min_p": (sampling.min_p, hf.MinPLogitsWarper, st.floats(0, 1)),
}


@pytest.mark.parametrize("ours, warper, settings_to_try", FILTERS.values(), ids=FILTERS)
@settings(max_examples=200, deadline=None)
@given(logits=logits_batches(), data=st.data())
def test_filter_equals_transformers(ours, warper, settings_to_try, logits, data):
    value = data.draw(settings_to_try, label="setting")
    same(ours(logits, value), warper(value)(None, logits))


@settings(max_examples=200, deadline=None)
@given(logits_batches(), st.floats(0.1, 3), st.data())
def test_repetition_penalty_equals_transformers(logits, penalty, data):
    n = data.draw(st.integers(1, 10))
    row = st.lists(st.integers(0, logits.shape[1] - 1), min_size=n, max_size=n)
    ids = torch.tensor(data.draw(st.lists(row, min_size=logits.shape[0], max_size=logits.shape[0])))
    same(sampling.repetition_penalty(logits, ids, penalty),
         hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


def test_ties_at_the_cut_are_kept():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert sampling.top_k(logits, 2).isfinite().tolist() == [[True, True, True, False]]


def test_filters_never_remove_the_most_likely_token():
    logits = torch.tensor([[5.0, 1.0, -INF]])
    assert sampling.top_p(logits, 0.0).isfinite().tolist() == [[True, False, False]]
    assert sampling.min_p(logits, 1.0).isfinite().tolist() == [[True, False, False]]


@pytest.mark.parametrize("fn, value, valid", [
    (sampling.temperature, 0.0, "> 0"), (sampling.temperature, -1.0, "> 0"),
    (sampling.top_k, 0, ">= 1"), (sampling.top_k, 2.5, "integer"),
    (sampling.top_p, 1.5, "between 0 and 1"), (sampling.top_p, -0.1, "between 0 and 1"),
    (sampling.min_p, 2.0, "between 0 and 1"),
])
def test_invalid_settings_name_the_valid_range(fn, value, valid):
    with pytest.raises(InvalidSettingError, match=valid) as info:
        fn(torch.zeros(1, 3), value)
    assert isinstance(info.value, ValueError)


def test_invalid_penalty_and_generate_settings_raise_before_running_the_model():
    model, tok = tiny()
    with pytest.raises(InvalidSettingError, match="> 0"):
        sampling.repetition_penalty(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), 0.0)
    ids = tok("Hi", return_tensors="pt").input_ids
    with pytest.raises(InvalidSettingError, match="top_p"):
        sampling.generate(model, ids, 3, do_sample=True, top_p=2.0)
    with pytest.raises(InvalidSettingError, match="max_new_tokens"):
        sampling.generate(model, ids, -1)
    with pytest.raises(InvalidSettingError, match="batch, tokens"):
        sampling.generate(model, ids[0], 3)


def test_settings_are_checked_once_when_made_and_then_fixed():
    with pytest.raises(InvalidSettingError, match="repetition_penalty=0 is invalid"):
        sampling.SamplingSettings(10, repetition_penalty=0)
    with pytest.raises(InvalidSettingError, match="max_new_tokens"):
        sampling.SamplingSettings(-1)
    settings = sampling.SamplingSettings(10, do_sample=True, top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.top_k = 0  # no way around the check
    model, tok = tiny()
    ids = tok("Hi", return_tensors="pt").input_ids
    with pytest.raises(InvalidSettingError, match="min_p"):
        next(sampling.stream(model, tok, ids, 3, min_p=2.0))
    with pytest.raises(TypeError, match="top_q"):
        next(sampling.stream(model, tok, ids, 3, top_q=0.5))  # a misspelt setting is not ignored


def test_process_logits_applies_the_settings_in_transformers_order():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[1, 2, 3], [4, 4, 5]])
    settings = sampling.SamplingSettings(1, do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05,
                                         repetition_penalty=1.3)
    expected = logits
    for warper in (hf.RepetitionPenaltyLogitsProcessor(1.3), hf.TemperatureLogitsWarper(0.7),
                   hf.TopKLogitsWarper(10), hf.TopPLogitsWarper(0.8), hf.MinPLogitsWarper(0.05)):
        expected = warper(ids, expected.clone())
    same(sampling.process_logits(logits, ids, settings), expected)
    greedy = dataclasses.replace(settings, do_sample=False)  # only the penalty applies
    penalized = hf.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    same(sampling.process_logits(logits, ids, greedy), penalized)


# --- the distribution and its picture ------------------------------------------------------------

def test_next_token_logits_and_their_plot():
    model, tok = tiny()
    logits = sampling.next_token_logits(model, tok, "Hello")
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tok("Hello", return_tensors="pt").input_ids).logits[0, -1])
    ax = sampling.plot_distribution(logits, tok, sampling.top_k(logits, 3), k=8)
    top = logits.topk(8).indices.tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == tokenization.token_labels(tok, top)
    assert ax.get_title().endswith(f"{int(sampling.top_k(logits, 3).isfinite().sum())} tokens left")


# --- generate against model.generate -------------------------------------------------------------

SAMPLED = [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
           dict(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.2)]


def hf_settings(kw: dict) -> dict:
    """transformers' generation config fills in top_k=50 when it is not given: switch it off."""
    return {"top_k": 0} | kw


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("penalty", [None, 1.5])
def test_greedy_equals_model_generate_tiny(use_cache, penalty):
    model, tok = tiny()
    ids = tok(["Hello there", "Good night!"], return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=penalty)
    got = sampling.generate(model, ids, 20, use_cache=use_cache, repetition_penalty=penalty)
    assert torch.equal(got, expected)


def test_greedy_equals_model_generate_smollm2():
    model, tok = smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(sampling.generate(model, ids, 12), expected)


@pytest.mark.parametrize("kw", SAMPLED, ids=str)
def test_sampling_equals_model_generate_with_the_same_seed(kw):
    model, tok = tiny()
    ids = tok("Once upon", return_tensors="pt").input_ids
    torch.manual_seed(7)
    expected = model.generate(ids, max_new_tokens=24, do_sample=True, **hf_settings(kw))
    got = sampling.generate(model, ids, 24, do_sample=True, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, expected)


def test_sampling_with_the_global_generator_equals_model_generate():
    model, tok = smollm2()
    ids = tok("My favourite food is", return_tensors="pt").input_ids
    torch.manual_seed(1)
    kw = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.8)
    expected = model.generate(ids, max_new_tokens=10, **kw)
    torch.manual_seed(1)
    assert torch.equal(sampling.generate(model, ids, 10, **kw), expected)


def test_seeds_reproduce_and_differ():
    model, tok = tiny()
    ids = tok("Hi", return_tensors="pt").input_ids
    run = lambda seed: sampling.generate(model, ids, 30, do_sample=True,
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_scratch_model_decodes_like_the_hf_model():
    model, tok = tiny()
    mine = scratch.from_hf(model)
    ids = tok("Hello", return_tensors="pt").input_ids
    expected = sampling.generate(model, ids, 25)
    assert mine.config.eos_token_id == model.config.eos_token_id  # both stop at the same token
    assert torch.equal(sampling.generate(mine, ids, 25), expected)
    assert torch.equal(sampling.generate(mine, ids, 25, use_cache=False), expected)


def test_generation_stops_at_the_end_of_sequence_token():
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    free = sampling.generate(model, ids, 10, eos_token_id=[])  # never stops early
    stop = int(free[0, ids.shape[1] + 3])  # make the 4th new token the end-of-sequence one
    first = (free[0, ids.shape[1]:] == stop).nonzero()[0].item()
    out = sampling.generate(model, ids, 10, eos_token_id=stop)
    assert torch.equal(out, free[:, :ids.shape[1] + first + 1])
    assert torch.equal(out, model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop))


def test_prompt_longer_than_the_context_is_refused():
    model, _ = tiny()
    too_long = torch.zeros(1, sampling.context_length(model) + 1, dtype=torch.long)
    with pytest.raises(ContextLengthError, match="Shorten the prompt"):
        sampling.generate(model, too_long, 1)
    with pytest.raises(ContextLengthError):
        sampling.generate(scratch.from_hf(model), too_long, 1)


def test_generation_stops_at_the_context_length():
    model, _ = tiny()
    context = sampling.context_length(model)
    prompt = torch.full((1, context - 3), 70, dtype=torch.long)
    assert sampling.generate(scratch.from_hf(model), prompt, 10).shape == (1, context)


# --- streaming ------------------------------------------------------------------------------------

def test_incremental_decoding_equals_decoding_the_whole():
    _, tok = smollm2()
    text = "Café ☕ naïve 日本語 👩‍💻 done.\n  Next line,   spaced"
    decoder = sampling.IncrementalDecoder(tok)
    pieces = [decoder.add(t) for t in tok(text).input_ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 10  # it really streams


def test_stream_gives_the_same_text_as_transformers_streamer():
    model, tok = smollm2()
    ids = tok("Write a haiku about the sea.", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(input_ids=ids, max_new_tokens=16,
                                                                 do_sample=False, streamer=streamer))
    thread.start()
    expected = "".join(streamer)
    thread.join()
    pieces = list(sampling.stream(model, tok, ids, 16))
    assert "".join(pieces) == expected and len(pieces) > 3


def test_stream_takes_one_prompt():
    model, tok = tiny()
    with pytest.raises(InvalidSettingError, match="batch 1"):
        next(sampling.stream(model, tok, torch.zeros(2, 3, dtype=torch.long), 4))


# --- the playground and the exercises ------------------------------------------------------------

def test_playground_streams_into_its_output_box():
    model, tok = tiny()
    pg = widgets.SamplingPlayground(model, tok, prompt="Hi")
    pg.max_tokens.value, pg.seed.value = 12, 3
    seen = []
    pg.output.observe(lambda change: seen.append(change["new"]), names="value")
    text = pg.run()
    expected = sampling.generate(model, tok("Hi", return_tensors="pt").input_ids, 12, do_sample=True,
                                 temperature=pg.temperature.value, top_k=pg.top_k.value, top_p=pg.top_p.value,
                                 generator=torch.Generator().manual_seed(3))
    assert text == tok.decode(expected[0, 2:], skip_special_tokens=True)
    assert len(seen) > 2 and seen[-1] == text  # the box filled piece by piece


def test_solutions_equal_the_library():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 7, 300):
        assert torch.equal(solutions.top_k_filter(logits, k), sampling.top_k(logits, k))
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(solutions.top_p_filter(logits, p), sampling.top_p(logits, p))
    model, tok = tiny()
    ids = tok("abc", return_tensors="pt").input_ids
    expected = sampling.generate(model, ids, 9, eos_token_id=[])
    assert torch.equal(solutions.greedy_decode(model, ids, 9), expected)
    seen = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    for penalty in (0.7, 1.0, 1.3):
        assert torch.equal(solutions.apply_repetition_penalty(logits, seen, penalty),
                           sampling.repetition_penalty(logits, seen, penalty))


def test_the_stop_sequence_solution_equals_transformers_stop_strings():
    from transformers import StoppingCriteriaList, StopStringCriteria

    model, tok = smollm2()
    ids = tok("The days of the week: Monday, Tuesday,", return_tensors="pt").input_ids
    stops = [" Friday", " Thursday"]
    free = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    criteria = StoppingCriteriaList([StopStringCriteria(tok, stops)])
    stopped = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False, stopping_criteria=criteria)[
        0, ids.shape[1]:])
    cut = solutions.cut_at_stop(free, stops)
    assert cut != free and stopped.startswith(cut) and any(stopped == cut + s for s in stops)


def wrong_top_k(logits, k):  # off by one: keeps k + 1
    return solutions.top_k_filter(logits, min(k + 1, logits.shape[-1]))


def wrong_top_p(logits, p):  # forgets the token that crosses p
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    remove = probs.cumsum(-1) > p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def top_k_without_ties(logits, k):  # keeps k positions, drops the ties of the k-th
    top = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)


def top_p_in_sorted_order(logits, p):  # forgets to scatter the mask back to vocabulary order
    probs = logits.softmax(-1).sort(dim=-1, descending=True).values
    return logits.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf"))


def wrong_greedy(model, ids, n):  # samples the second most likely token
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].topk(2).indices[:, 1:]], dim=-1)
    return ids


@pytest.mark.parametrize("check, solution, wrong_answers", [
    (checks.check_top_k, solutions.top_k_filter,
     [(wrong_top_k, "too many tokens kept"), (top_k_without_ties, "logits tied with the k-th"),
      (lambda logits, k: solutions.top_k_filter(logits, k).softmax(-1).log(), "the kept logits changed")]),
    (checks.check_top_p, solutions.top_p_filter,
     [(wrong_top_p, "the token whose probability makes the total reach p"),
      (top_p_in_sorted_order, "but other ones")]),
    (checks.check_greedy_decode, solutions.greedy_decode,
     [(wrong_greedy, "the new tokens differ"),
      (lambda model, ids, n: solutions.greedy_decode(model, ids, n)[:, ids.shape[-1]:], "only the new")]),
    (checks.check_repetition_penalty, solutions.apply_repetition_penalty,
     [(lambda x, ids, pen: x.scatter(-1, ids, x.gather(-1, ids) / pen), "multiply the negative ones"),
      (lambda x, ids, pen: functools.reduce(lambda acc, i: sampling.repetition_penalty(acc, i[:, None], pen),
                                            ids.unbind(-1), x), "penalized several times")]),
    (checks.check_stop_sequence, solutions.cut_at_stop,
     [(lambda text, stops: next((text[:text.find(s) + len(s)] for s in stops if s in text), text),
       "cut before it"),
      (lambda text, stops: next((text[:text.find(s)] for s in stops if s in text), text),
       "not the earliest in the text")]),
], ids=["top_k", "top_p", "greedy", "repetition_penalty", "stop_sequence"])
def test_checkers_pass_the_solution_and_fail_wrong_answers(check, solution, wrong_answers, verdicts):
    verdicts(check, solution, *wrong_answers)


# --- wrong input ids, beams, batches, chat ---------------------------------------------------------

@pytest.mark.parametrize("ids, says", [
    ([[1, 2]], "torch.Tensor of token ids"),
    (torch.tensor([1, 2]), r"pass ids\[None\]"),
    (torch.tensor([[1.0, 2.0]]), r"integer token ids.*ids.long\(\)"),
    (torch.zeros(1, 0, dtype=torch.long), "the prompt is empty"),
    (torch.tensor([[1, 10**6]]), r"\[1000000\], outside the model's vocabulary \(ids 0 to"),
    (torch.tensor([[-1, 2]]), "outside the model's vocabulary"),
])
def test_wrong_input_ids_say_what_to_pass(ids, says):
    model, tok = tiny()
    for run in (lambda m: sampling.generate(m, ids, 2), lambda m: list(sampling.stream(m, tok, ids, 2)),
                lambda m: sampling.beam_search(m, ids, 2, 2)):
        for m in (model, scratch.from_hf(model)):
            with pytest.raises(InvalidSettingError, match=says):
                run(m)


def test_a_right_padded_mask_or_a_padded_scratch_batch_is_refused():
    model, tok = tiny()
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(InvalidSettingError, match="pad on the left"):
        sampling.generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(InvalidSettingError, match="generate each prompt alone"):
        sampling.generate(scratch.from_hf(model), ids, 2, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))


@pytest.mark.parametrize("load, prompt", [(tiny, "Hello there"), (smollm2, "The best way to learn is")])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers_num_beams(load, prompt, num_beams):
    model, tok = load()
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, num_beams=num_beams, max_new_tokens=8, do_sample=False)
    assert torch.equal(sampling.beam_search(model, ids, num_beams, 8), expected)
    if load is tiny:  # and stopping at an end-of-sequence token the beams meet
        stop = int(expected[0, ids.shape[1] + 2])
        ours = sampling.beam_search(model, ids, num_beams, 8, eos_token_id=stop)
        assert torch.equal(ours, model.generate(ids, num_beams=num_beams, max_new_tokens=8, do_sample=False,
                                                eos_token_id=stop))
        assert torch.equal(sampling.beam_search(scratch.from_hf(model), ids, num_beams, 8), expected)


def test_greedy_beam_search_of_one_beam_is_greedy():
    model, tok = tiny()
    ids = tok("Hello", return_tensors="pt").input_ids
    assert torch.equal(sampling.beam_search(model, ids, 1, 6, eos_token_id=[]),
                       sampling.generate(model, ids, 6, eos_token_id=[]))


@pytest.mark.parametrize("load", [tiny, smollm2])
def test_a_left_padded_batch_equals_each_prompt_alone(load):
    model, tok = load()
    prompts = ["Hi", "The capital of France is", "Once upon a time, in a land"]
    alone = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        alone.append(tok.decode(sampling.generate(model, ids, 8)[0, ids.shape[1]:], skip_special_tokens=True))
    assert sampling.generate_batch(model, tok, prompts, 8) == alone
    assert tok.padding_side == "right"  # put back as it was
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(sampling.generate(model, batch.input_ids, 8, attention_mask=batch.attention_mask),
                       model.generate(**batch, max_new_tokens=8, do_sample=False))


def test_chat_uses_the_template_and_stops_at_the_end_of_turn():
    model, tok = smollm2()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = chat.prompt_ids(tok, messages)
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    im_end = chat.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(im_end) == "<|im_end|>"
    expected = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=im_end)
    assert expected[0, -1] == im_end and expected.shape[1] < ids.shape[1] + 40  # it ended its turn
    reply = sampling.chat(model, tok, messages, 40)
    assert reply == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply and "<|im_end|>" not in reply and "user" not in reply
