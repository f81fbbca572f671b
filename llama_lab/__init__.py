"""llama-lab: learn how Llama 2 13B works, with code that runs on a laptop.

>>> import llama_lab as lab
>>> lab.count_parameters(lab.llama2_config("13b"))
13015864320

The lesson modules load on first use, so `import llama_lab` stays quick:
`lab.tokenization`, `lab.attention`, `lab.scratch`, `lab.sampling`, `lab.finetune`, ...
"""

import importlib

from llama_lab import checks, errors, solutions
from llama_lab.models import MODELS, available_memory, default_model_name, load_model
from llama_lab.notebook import setup
from llama_lab.sizing import (
    count_parameters,
    decode_roofline,
    kv_cache_bytes_per_token,
    llama2_config,
    memory_estimate,
    parameter_breakdown,
)

__version__ = "0.1.0"

_LESSON_MODULES = {"attention", "finetune", "sampling", "scratch", "tokenization", "widgets"}

__all__ = [
    "MODELS", "available_memory", "checks", "count_parameters", "decode_roofline", "default_model_name",
    "errors", "kv_cache_bytes_per_token", "llama2_config", "load_model", "memory_estimate",
    "parameter_breakdown", "setup", "solutions", *sorted(_LESSON_MODULES),
]


def __getattr__(name: str):
    """Import a lesson module the first time it is used (`lab.sampling.top_k`)."""
    if name in _LESSON_MODULES:
        return importlib.import_module(f"llama_lab.{name}")
    raise AttributeError(f"module 'llama_lab' has no attribute {name!r}")
