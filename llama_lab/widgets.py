"""ipywidgets front-ends for the notebooks: small controls around functions of the library.

Each widget only wires inputs to a library function that does the work (and is tested on
its own), so the notebooks stay readable and the logic stays testable: the token explorer
(notebook 01) around `tokenization`, the sampling playground (notebook 04) around `sampling`.

>>> from llama_lab.models import load_model
>>> model, tokenizer = load_model("tiny-random")
>>> pg = SamplingPlayground(model, tokenizer, prompt="Hi")
>>> pg.max_tokens.value = 5
>>> len(pg.run()) > 0
True
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import torch

from llama_lab import sampling, tokenization


class Panel(widgets.VBox):
    """A VBox whose text form says what it is. A notebook stores that text beside the widget, and
    JupyterLab shows it where no kernel drives the widget (a notebook opened, untrusted, before it
    runs), instead of `VBox(children=(...`.

    >>> Panel([], "Token explorer")
    [Token explorer: an interactive widget. Run the notebook's cells from the top to use it.]
    """

    def __init__(self, children, name: str):
        super().__init__(children)
        self._name = name

    def __repr__(self) -> str:
        return f"[{self._name}: an interactive widget. Run the notebook's cells from the top to use it.]"


# --- token explorer (notebook 01) ----------------------------------------------------------------


def token_explorer(tokenizers: dict[str, Any], text: str = "Llamas 🦙 don't tokenize 12,345 words alike.",
                   ) -> Panel:
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
    return Panel([choice, box, view, counts], "Token explorer")


# --- sampling playground (notebook 04) ----------------------------------------------------------

class SamplingPlayground:
    """Sliders for temperature, top-k, top-p, max tokens and the seed; the text streams in as
    it is generated. `display(pg.widget)` shows it; `pg.run()` generates with the current
    settings (the Generate button calls it) and returns the text."""

    def __init__(self, model, tokenizer, prompt: str = "Once upon a time"):
        self.model, self.tokenizer = model, tokenizer
        style = {"description_width": "90px"}
        self.prompt = widgets.Textarea(value=prompt, description="prompt", style=style,
                                       layout=widgets.Layout(width="95%"))
        self.temperature = widgets.FloatSlider(value=0.8, min=0.05, max=2.0, step=0.05,
                                               description="temperature", style=style)
        self.top_k = widgets.IntSlider(value=50, min=0, max=200, description="top-k (0: off)", style=style)
        self.top_p = widgets.FloatSlider(value=0.95, min=0.05, max=1.0, step=0.05, description="top-p",
                                         style=style)
        self.max_tokens = widgets.IntSlider(value=30, min=1, max=200, description="max tokens", style=style)
        self.seed = widgets.IntText(value=0, description="seed", style=style)
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.output = widgets.Textarea(layout=widgets.Layout(width="95%", height="120px"),
                                       description="output", style=style)
        self.button.on_click(lambda _: self.run())
        self.widget = Panel([self.prompt, widgets.HBox([self.temperature, self.top_k]),
                             widgets.HBox([self.top_p, self.max_tokens]),
                             widgets.HBox([self.seed, self.button]), self.output], "Sampling playground")

    def run(self) -> str:
        """Generate from the prompt with the sliders' settings, streaming into the output box."""
        ids = self.tokenizer(self.prompt.value, return_tensors="pt").input_ids
        self.output.value = ""
        for piece in sampling.stream(self.model, self.tokenizer, ids, self.max_tokens.value, do_sample=True,
                                     temperature=self.temperature.value, top_k=self.top_k.value or None,
                                     top_p=self.top_p.value,
                                     generator=torch.Generator().manual_seed(self.seed.value)):
            self.output.value += piece
        return self.output.value
