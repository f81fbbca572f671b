"""benchmarks/gpu_13b.py on a CPU, truncated to one decoder layer: every phase of the GPU run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_lab import sizing

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_13b.py"
SMALL = ["--layers", "1", "--vocab-size", "512", "--device", "cpu", "--prompt-tokens", "8",
         "--new-tokens", "4", "--repeats", "1"]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def config():
    c = sizing.llama2_config("13b")
    c.num_hidden_layers, c.vocab_size = 1, 512
    return c


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu_13b.json"
    result = run(*SMALL, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def test_every_phase_runs_and_is_reported(report):
    data, stdout = report
    assert data["status"] == "complete" and not data["errors"] and not data["skipped"]
    assert data["model"]["parameters"] == sizing.count_parameters(config())
    assert data["bandwidth"]["copy_gb_s"] > 0 and data["machine"]["device"] == "cpu"
    assert set(data["runs"]) == {"eager", "compiled", "nf4_eager"}
    for name, weights in [("eager", "bf16"), ("compiled", "bf16"), ("nf4_eager", "nf4")]:
        r = data["runs"][name]
        assert r["generate_tokens_per_s"] > 0 and len(r["rounds"]) == 1
        assert r["bytes_read_per_step"] == sizing.bytes_read_per_token(config(), weights, 8 + 2)
        estimate = sizing.memory_estimate(config(), weights, context_len=8 + 4)
        assert r["memory_estimate_bytes"] == estimate.total
        assert r["peak_bytes"] > 0 and r["peak_kind"].startswith("process peak RSS")
        if r["decode_tokens_per_s"] is not None:  # None only if 4 tokens took no longer than 1 (a noisy CPU)
            assert r["fraction_of_measured_roofline"] == pytest.approx(
                r["decode_tokens_per_s"] / r["roofline_measured_tokens_per_s"])
        assert f"{name}: round 1/1" in stdout
    nf4 = data["nf4_model"]
    assert nf4["estimate_bytes"] == sizing.weight_bytes(config(), "nf4")
    assert 0.9 < nf4["weight_bytes"] / nf4["estimate_bytes"] < 1.1
    assert "summary:" in stdout and "report written to" in stdout


def test_out_of_time_skips_phases_and_still_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    result = run(*SMALL, "--budget-s", "1", "--out", str(out), timeout=300)
    assert result.returncode == 1
    data = json.loads(out.read_text())
    assert data["status"] == "failed: no model"
    assert "bandwidth" in data["skipped"] and "build" in data["skipped"]
    assert "skipped" in result.stdout


def test_a_killed_run_leaves_a_partial_report(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (out.exists() and "model" in json.loads(out.read_text())):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    data = json.loads(out.read_text())
    assert data["status"] == "interrupted by signal 15" and data["model"]["layers"] == 1
    assert proc.returncode == 128 + 15
