"""Pictures and a live playground for notebook 04: how each sampling setting reshapes
the next-token distribution, and what text comes out of it.

>>> from llama_lab.models import load_model
>>> model, tokenizer = load_model("tiny-random")
>>> pg = SamplingPlayground(model, tokenizer, prompt="Hi")
>>> pg.max_tokens.value = 5
>>> len(pg.run()) > 0
True
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from llama_lab import sampling


def next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """The model's logits (vocab,) for the token that follows `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(ids).logits[0, -1].float()


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable labels for token ids: leading spaces shown as '␣', newlines as '⏎'."""
    labels = [repr(tokenizer.decode([i]))[1:-1] for i in ids]
    return [label.replace(" ", "␣").replace("\\n", "⏎") or "∅" for label in labels]


def plot_distribution(logits: torch.Tensor, tokenizer, filtered: torch.Tensor | None = None, k: int = 20,
                      title: str = "next-token probabilities", ax=None):
    """Bar plot of the `k` most likely next tokens. With `filtered` (the logits after a
    transform), grey bars are the original probabilities and blue bars the probabilities
    sampling uses after the transform (removed tokens have none)."""
    ax = ax or plt.subplots(figsize=(7, 3))[1]
    probs = logits.softmax(-1)
    top = probs.topk(k).indices
    positions = range(k)
    if filtered is None:
        ax.bar(positions, probs[top], color="tab:blue")
    else:
        kept = filtered.softmax(-1)
        ax.bar(positions, probs[top], color="lightgrey", label="before")
        ax.bar(positions, kept[top], width=0.5, color="tab:blue", label="after")
        ax.legend(loc="upper right", fontsize=8)
        title += f": {int(filtered.isfinite().sum())} tokens left"
    ax.set_xticks(list(positions), token_labels(tokenizer, top.tolist()), rotation=60, fontsize=8)
    ax.set_ylabel("probability")
    ax.set_title(title, fontsize=10)
    return ax


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
        self.widget = widgets.VBox([self.prompt, widgets.HBox([self.temperature, self.top_k]),
                                    widgets.HBox([self.top_p, self.max_tokens]),
                                    widgets.HBox([self.seed, self.button]), self.output])

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
