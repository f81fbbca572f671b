"""llama_lab.notebook: quiet_stderr keeps C++ log lines (the profiler's) out of a cell's output."""

import os

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
