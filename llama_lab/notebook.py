"""What every notebook calls first: fixed seeds, quiet logs, one plot style."""

from __future__ import annotations

import random
import warnings

import matplotlib as mpl
import numpy as np
import torch


def setup(seed: int = 0) -> None:
    """Make a notebook reproducible and its output stable.

    Seeds Python, NumPy and torch; silences transformers' info logs, progress
    bars and the warnings they print on every load; sets a small, readable
    figure style so stored notebooks stay light.
    """
    import huggingface_hub.utils
    import transformers

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    warnings.filterwarnings("ignore", module="transformers")
    mpl.rcParams.update({"figure.figsize": (7, 3.5), "figure.dpi": 80, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False})
