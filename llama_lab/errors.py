"""The exceptions a llama-lab user can meet.

Each message says what went wrong, with the numbers, and what to do next.
All of them derive from `LlamaLabError`, so a notebook can catch them in one
place and keep the kernel alive.
"""

from __future__ import annotations


class LlamaLabError(Exception):
    """Base class of every error llama-lab raises on purpose."""


class UnknownNameError(LlamaLabError, KeyError):
    """A name that is not among the known ones of its `kind`; the message lists them."""

    kind = "name"

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"Unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(known)}.")

    def __str__(self) -> str:  # KeyError would otherwise print the repr
        return self.args[0]


class UnknownModelError(UnknownNameError):
    """A model name that is not in the registry."""

    kind = "model"


class ModelTooLargeError(LlamaLabError, MemoryError):
    """The model would not fit in the memory of the chosen device."""

    def __init__(self, name: str, device: str, needed: int, available: int, advice: str):
        self.name, self.device, self.needed, self.available = name, device, needed, available
        super().__init__(
            f"{name} needs about {needed / 1e9:.1f} GB on {device}, "
            f"but only {available / 1e9:.1f} GB is available. {advice}"
        )


class ModelNotInstalledError(LlamaLabError, FileNotFoundError):
    """A model whose files ship in a package that is not installed."""


class ModelAccessError(LlamaLabError, PermissionError):
    """A gated Hub model that this machine cannot download (no access, no token, no network)."""


class QuantizationError(LlamaLabError, ValueError):
    """A quantization that this device or installation cannot do."""


class InvalidSettingError(LlamaLabError, ValueError):
    """A setting outside its valid range (sampling, sizes, dtypes)."""


class AttentionNotAvailableError(LlamaLabError, ValueError):
    """The model computes attention with a kernel that returns no attention weights."""


class CompilerNotFoundError(LlamaLabError, RuntimeError):
    """torch.compile was asked for, and this machine has no C++ compiler for it."""


class ContextLengthError(LlamaLabError, ValueError):
    """A prompt longer than the model's context window."""

    def __init__(self, n_tokens: int, context_len: int):
        self.n_tokens, self.context_len = n_tokens, context_len
        super().__init__(
            f"The prompt has {n_tokens} tokens but the model's context holds {context_len}. "
            f"Shorten the prompt by at least {n_tokens - context_len} tokens."
        )


class UnknownExerciseError(UnknownNameError):
    """An exercise name that no lesson declares (in `solutions.show`, `solutions.hint`)."""

    kind = "exercise"


class PackError(LlamaLabError, RuntimeError):
    """`llama-lab pack` could not fetch or build a wheel (the message carries pip's own lines)."""
