"""llama_lab.notebook: quiet_stderr keeps C++ log lines (the profiler's) out of a cell's output;
release_memory hands freed memory back to the operating system."""

import os
import sys

import psutil
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llama_lab import notebook


def test_quiet_stderr_drops_the_profilers_lines_and_only_inside_the_block(capfd):
    os.write(2, b"before\n")
    with notebook.quiet_stderr(), profile(activities=[ProfilerActivity.CPU]):
        torch.ones(3).sum()
        os.write(2, b"inside\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_memory_returns_freed_pages():
    process = psutil.Process()
    blocks = [bytes(100_000) + bytes([i % 256]) for i in range(2_000)]  # 200 MB on malloc's heap
    keep = blocks[-1]  # a live block above the others: malloc cannot shrink the heap on its own
    del blocks
    before = process.memory_info().rss
    notebook.release_memory()
    assert before - process.memory_info().rss > 100e6
    assert keep[-1] == 1999 % 256
