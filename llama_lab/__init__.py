"""llama-lab: learn how Llama 2 13B works, with code that runs on a laptop.

>>> import llama_lab as lab
>>> lab.count_parameters(lab.llama2_config("13b"))
13015864320

Every module of the package is reachable as `lab.<module>`; the lesson modules load on first
use, so `import llama_lab` stays quick: `lab.tokenization`, `lab.chat`, `lab.attention`, `lab.scratch`,
`lab.sampling`, `lab.compiled_decode`, `lab.finetune`, ...
"""

import importlib
import pkgutil

from llama_lab.hardware import choose_track, pick_track
from llama_lab.models import MODELS, available_memory, default_model_name, load_model
from llama_lab.notebook import best_seconds, release_memory, setup, show
from llama_lab.sizing import (
    count_parameters,
    decode_roofline,
    kv_cache_bytes_per_token,
    llama2_config,
    memory_estimate,
    parameter_breakdown,
)

__version__ = "0.1.0"

# Every module but the command line's, found in the package: a new lesson module needs no entry here.
_LESSON_MODULES = {m.name for m in pkgutil.iter_modules(__path__)} - {"cli"}

__all__ = [
    "MODELS", "available_memory", "best_seconds", "choose_track", "count_parameters", "decode_roofline",
    "default_model_name", "pick_track",
    "kv_cache_bytes_per_token", "llama2_config", "load_model", "memory_estimate", "parameter_breakdown",
    "release_memory", "setup", "show", *sorted(_LESSON_MODULES),
]


def __getattr__(name: str):
    """Import a lesson module the first time it is used (`lab.sampling.top_k`)."""
    if name in _LESSON_MODULES:
        return importlib.import_module(f"llama_lab.{name}")
    raise AttributeError(f"module 'llama_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What `lab.<Tab>` offers: the public names and the lesson modules not loaded yet."""
    return sorted(set(globals()) | set(__all__))
