"""ipywidgets front-ends for the notebooks: small controls around functions of the library.

Each widget only wires inputs to a library function that does the work (and is tested on
its own), so the notebooks stay readable and the logic stays testable.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from llama_lab import tokenization

# --- token explorer (notebook 01) ----------------------------------------------------------------


def token_explorer(tokenizers: dict[str, Any], text: str = "Llamas 🦙 don't tokenize 12,345 words alike.",
                   ) -> widgets.VBox:
    """Type text, pick a tokenizer, see its coloured tokens with their ids, and what every
    tokenizer would count for the same text.

    tokenizers: name -> any tokenizer `tokenization.token_bytes` accepts.
    """
    choice = widgets.Dropdown(options=list(tokenizers), description="Tokenizer",
                              layout=widgets.Layout(width="60%"))
    box = widgets.Textarea(value=text, description="Text", layout=widgets.Layout(width="95%", height="5em"))
    view, counts = widgets.HTML(), widgets.HTML()

    def render(_change=None) -> None:
        view.value = tokenization.tokens_html(tokenizers[choice.value], box.value)
        counts.value = "Tokens for this text: " + " · ".join(
            f"<b>{name}</b> {tokenization.count_tokens(tok, box.value)}" for name, tok in tokenizers.items())

    choice.observe(render, names="value")
    box.observe(render, names="value")
    render()
    return widgets.VBox([choice, box, view, counts])
