"""llama_lab.chat: the Llama-2-chat formatter against meta-llama's template, the system prompts,
and the assistant spans a loss mask is built from."""

import pytest

from llama_lab import chat, models, tokenization


@pytest.fixture(scope="module")
def llama_style():
    """A Llama-2-style tokenizer carrying meta-llama's chat template."""
    return tokenization.to_transformers(tokenization.train_sentencepiece(tokenization.load_corpus(), 1000))


SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [SYSTEM, {"role": "user", "content": " Hi! "}],
    [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def test_llama2_chat_format_by_hand():
    assert chat.format_llama2_chat(CONVERSATIONS[2]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST]")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama2_chat_format_equals_the_template(llama_style, messages):
    rendered = llama_style.apply_chat_template(messages, tokenize=False)
    assert chat.format_llama2_chat(messages) == rendered


def test_llama2_chat_format_refuses_roles_out_of_order(llama_style):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternating"):
        chat.format_llama2_chat(bad)
    with pytest.raises(Exception, match="alternate"):
        llama_style.apply_chat_template(bad, tokenize=False)


def test_double_bos(llama_style):
    text = chat.format_llama2_chat(CONVERSATIONS[1])
    assert llama_style(text).input_ids[:2] == [1, 1]
    assert llama_style.apply_chat_template(CONVERSATIONS[1], return_dict=False)[:2] != [1, 1]


def test_a_system_prompt_goes_where_a_system_message_would(llama_style):
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system":  # the conversation's own system message wins
            assert chat.format_llama2_chat(messages, system_prompt="No.") == chat.format_llama2_chat(messages)
            continue
        with_prompt = chat.format_llama2_chat(messages, system_prompt=chat.LLAMA2_DEFAULT_SYSTEM_PROMPT)
        as_message = [{"role": "system", "content": chat.LLAMA2_DEFAULT_SYSTEM_PROMPT}, *messages]
        assert with_prompt == llama_style.apply_chat_template(as_message, tokenize=False)
        assert with_prompt.startswith("<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest")


def test_meta_default_system_prompt_is_the_two_paragraphs_of_the_llama_repository():
    first, second = chat.LLAMA2_DEFAULT_SYSTEM_PROMPT.split("\n\n")
    assert first.endswith("socially unbiased and positive in nature.") and "  " not in first
    assert second.startswith("If a question does not make any sense") and second.endswith("information.")


def test_assistant_spans_are_the_replies_and_their_end_of_turn_token():
    tok = models.tiny_tokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    text, spans = chat.assistant_char_spans(tok, messages)
    assert text == tok.apply_chat_template(messages, tokenize=False)
    assert [text[start:end] for start, end in spans] == ["A1<|im_end|>", "A2<|im_end|>"]


def test_assistant_spans_refuse_a_template_that_rewrites_the_reply():
    tok = models.tiny_tokenizer()
    tok.chat_template = chat.CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(ValueError, match="cannot locate"):
        chat.assistant_char_spans(tok, [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}])
