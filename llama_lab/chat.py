"""Chat formats: how a conversation becomes the one string a chat model reads.

A chat model sees no roles, only text: a chat template (Jinja, stored with the
tokenizer) writes the messages between the special markers the model was tuned
on. Two formats appear in this project:

* ChatML (`CHATML_TEMPLATE`), SmolLM2's: `<|im_start|>role\\ncontent<|im_end|>\\n` per message;
* Llama-2-chat's (`LLAMA2_CHAT_TEMPLATE`, and `format_llama2_chat` in plain Python):
  `<s>[INST] user [/INST] answer </s>`, the system prompt inside the first user turn
  between <<SYS>> tags.

Fine-tuning trains on the assistant's part only: `assistant_char_spans` finds it in
the rendered text (`SMOLLM2_TEMPLATE_WITH_GENERATION_TAGS` lets transformers find
it too, to check against).

>>> print(format_llama2_chat([{"role": "user", "content": "Hi!"},
...                           {"role": "assistant", "content": "Hello."}]))
<s>[INST] Hi! [/INST] Hello. </s>
"""

from __future__ import annotations

Messages = list[dict[str, str]]

# --- ChatML ----------------------------------------------------------------------------------------

# The tiny model's template (`llama_lab.models.tiny_tokenizer`): ChatML, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolLM2's chat template with the assistant's part inside {% generation %} tags: with it,
# transformers computes the assistant mask itself (return_assistant_tokens_mask=True), which
# checks `llama_lab.finetune.build_example` in the tests and in notebook 05.
SMOLLM2_TEMPLATE_WITH_GENERATION_TAGS = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --- Llama-2-chat ----------------------------------------------------------------------------------

# The chat template meta-llama ships in Llama-2-*-chat-hf's tokenizer_config.json.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# The system prompt of Meta's first Llama 2 code: llama/generation.py, DEFAULT_SYSTEM_PROMPT, as it
# stood from 19 July 2023 (commit 6c7fe27, "remove double-spacing") until 4 August 2023 (a971c41),
# when Meta stopped adding it by default because it made the model refuse harmless questions.
LLAMA2_DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
    "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false "
    "information."
)


def format_llama2_chat(messages: Messages, system_prompt: str | None = None, bos: str = "<s>",
                       eos: str = "</s>") -> str:
    """Render a conversation in Llama-2-chat's format, as Meta's `chat_completion` does:
    each (user, answer) turn is `<s>[INST] user [/INST] answer </s>`; the system prompt goes
    inside the first user message between <<SYS>> tags.

    system_prompt: used when the conversation opens without a system message of its own
    (Meta's first code put `LLAMA2_DEFAULT_SYSTEM_PROMPT` there; None, the default, puts none,
    like Meta's later code and the template).

    >>> format_llama2_chat([{"role": "user", "content": "Hi!"}], system_prompt="Be brief.")
    '<s>[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nHi! [/INST]'
    """
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if messages and messages[0]["role"] == "system":
        first = messages[1]["content"]
        messages = [{"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + first},
                    *messages[2:]]
    text = ""
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}; Llama 2 chat needs "
                             "system (optional), then user and assistant turns alternating.")
        if expected == "user":
            text += f"{bos}{B_INST} {message['content'].strip()} {E_INST}"
        else:
            text += f" {message['content'].strip()} {eos}"
    return text


# --- the assistant's part --------------------------------------------------------------------------

def assistant_char_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character spans the
    assistant wrote: each reply's content plus the end-of-turn token that follows it
    (the model must learn to stop).

    >>> from llama_lab.models import tiny_tokenizer
    >>> text, spans = assistant_char_spans(tiny_tokenizer(), [{"role": "user", "content": "Hi"},
    ...                                                       {"role": "assistant", "content": "Yo"}])
    >>> [text[start:end] for start, end in spans]
    ['Yo<|im_end|>']
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = start + len(message["content"])
        if text[start:end] != message["content"]:
            raise ValueError("the chat template does not render the reply right after the "
                             "generation prompt; cannot locate the assistant's tokens")
        if text.startswith(tokenizer.eos_token, end):
            end += len(tokenizer.eos_token)
        spans.append((start, end))
    return text, spans


# --- generating a reply ----------------------------------------------------------------------------

def prompt_ids(tokenizer, messages: Messages):
    """The token ids (1, tokens) the model reads to write the next assistant turn: the messages
    rendered by the tokenizer's chat template, ending with the generation prompt
    (`<|im_start|>assistant\\n` in ChatML)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ChatML's <|im_end|> when the vocabulary has it
    (SmolLM2), else the tokenizer's end-of-sequence token (Llama-2-chat's </s>).

    >>> from llama_lab.models import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> tok.convert_ids_to_tokens(end_of_turn_id(tok))
    '<|im_end|>'
    """
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if im_end is not None and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id
