"""What the notebooks call besides the lessons: `setup` first (fixed seeds, quiet logs, one
plot style), `show` to print a library function's code, `best_seconds` to time a call,
`quiet_stderr` to keep a C++ library's log lines (the profiler's) out of a cell's output,
`release_memory` to hand freed memory back between the sections of a heavy notebook."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator

import matplotlib as mpl
import numpy as np
import torch


def setup(seed: int = 0) -> None:
    """Make a notebook reproducible and its output stable.

    Seeds Python, NumPy and torch; silences transformers' info logs, progress
    bars and the warnings they print on every load (and bitsandbytes' notices
    about its optional CPU kernels, the `kernels` package's when bitsandbytes asks it for one
    offline, and waitress' "Task queue depth" line, whose count depends on
    the timing of a run; the notebook shows the queue itself); sets a small, readable
    figure style so stored notebooks stay light.
    """
    import huggingface_hub.utils
    import transformers

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notices when peft imports it on a CPU
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "Skipping publisher trust check", offline
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    warnings.filterwarnings("ignore", module="transformers")
    mpl.rcParams.update({"figure.figsize": (7, 3.5), "figure.dpi": 80, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False})


def show(obj: Callable | type) -> None:
    """Print the source code of a function or class of llama_lab, as the lesson reads it.

    >>> show(show)  # doctest: +ELLIPSIS
    def show(obj: Callable | type) -> None:
    ...
    """
    print(inspect.getsource(obj))


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best time of `fn()` over a few runs, after one warm-up run: on a busy laptop timings jump
    around, and the best run is the least disturbed one.

    >>> best_seconds(lambda: sum(range(1000))) < 1
    True
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send whatever is written to the process's standard error (file descriptor 2, where C++
    libraries log: torch.profiler's "profiler_start" lines) to /dev/null inside the block.

    >>> with quiet_stderr():
    ...     _ = os.write(2, b"this line goes nowhere\\n")
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_memory() -> None:
    """Hand back to the operating system the memory this process has freed: a garbage
    collection, then glibc's `malloc_trim` (Linux). PyTorch's CPU tensors come from malloc,
    which keeps freed pages for later and, after a training run, scattered among live ones, so a
    notebook that trains, then trains again, peaks higher than it needs. Elsewhere (macOS,
    Windows) only the garbage collection runs.
    """
    gc.collect()
    if (libc := glibc()) is not None:
        libc.malloc_trim(0)


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), for its memory allocator's controls; None elsewhere
    (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
