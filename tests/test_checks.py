"""The checker machinery, and the notebook-00 exercises: each checker passes its
solution and fails a wrong answer."""

from llama_lab import checks, sizing, solutions


def test_verdict_is_truthy_and_silent_in_notebooks():
    assert checks.Verdict(True) and not checks.Verdict(False)
    assert checks.Verdict(True)._ipython_display_() is None  # IPython shows nothing for it


def test_run_check_verdicts(capsys):
    assert checks.run_check("sum", [("1+1", lambda: 2, 2)], hint="add")
    assert "✅" in capsys.readouterr().out
    assert not checks.run_check("sum", [("1+1", lambda: 3, 2)], hint="add them")
    out = capsys.readouterr().out
    assert "❌" in out and "should be 2" in out and "add them" in out


def test_run_check_survives_the_learners_exceptions(capsys):
    def todo():
        raise NotImplementedError

    assert not checks.run_check("t", [("x", todo, 1)], hint="h")
    assert "not answered yet" in capsys.readouterr().out
    assert not checks.run_check("t", [("x", lambda: 1 / 0, 1)], hint="h")
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_run_check_compares_tensors():
    import torch

    assert checks.run_check("t", [("x", lambda: [1.0, 2.0], torch.tensor([1.0, 2.0]))], hint="")
    assert not checks.run_check("t", [("x", lambda: [1.0], torch.tensor([1.0, 2.0]))], hint="")
    assert not checks.run_check("t", [("x", lambda: "abc", torch.tensor([1.0]))], hint="")


def test_layer_params_solution_adds_up_to_the_model():
    for size in ("7b", "13b", "70b"):
        c = sizing.llama2_config(size)
        rest = 2 * c.vocab_size * c.hidden_size + c.hidden_size  # embedding, lm_head, final norm
        assert c.num_hidden_layers * solutions.layer_params(c) + rest == sizing.count_parameters(c)


def test_check_layer_params(verdicts):
    def no_gqa(c):  # ignores num_key_value_heads: right for 13B, wrong for 70B
        d = c.hidden_size
        return 4 * d * d + 3 * d * c.intermediate_size + 2 * d

    verdicts(checks.check_layer_params, solutions.layer_params, no_gqa, lambda c: 4 * c.hidden_size ** 2)


def test_check_kv_cache_gb(verdicts):
    c = sizing.llama2_config("13b")
    assert solutions.kv_cache_gb(c, 1000) * 1e9 == sizing.kv_cache_bytes_per_token(c, "bf16") * 1000
    verdicts(checks.check_kv_cache_gb, solutions.kv_cache_gb,
             lambda c, n: solutions.kv_cache_gb(c, n) / 2)  # forgot the V
