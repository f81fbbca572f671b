"""The checker machinery (verdicts, the hint ladder, the solution reveal, the lesson files),
and the notebook-00 exercises."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from llama_lab import checks, errors, sizing, solutions
from llama_lab.checks import Case, Mistake

NOTEBOOKS = sorted(Path(__file__).parent.parent.glob("notebooks/*.ipynb"))


def square(x):  # the solution of a made-up exercise, for the machinery's tests
    return x * x


@pytest.fixture(autouse=True)
def first_try(monkeypatch):
    """Every test starts the hint ladder from the bottom, with the made-up exercise declared."""
    monkeypatch.setattr(checks, "_misses", Counter())
    monkeypatch.setitem(solutions._HINTS, "square", solutions.Hints("multiply the number by itself",
                                                                   "return x * x"))


def check_square(student_fn, mistakes=()):
    return checks.run_check("Square", student_fn, square, [Case("x=3", (3,)), Case("x=-2", (-2,))],
                            mistakes=mistakes)


def test_verdict_is_truthy_and_silent_in_notebooks():
    assert checks.Verdict(True, "square") and not checks.Verdict(False, "square")
    assert checks.Verdict(True, "square")._ipython_display_() is None  # IPython shows nothing for it


def test_a_verdict_names_the_solution_even_for_the_untouched_exercise(capsys):
    def todo(*args):
        raise NotImplementedError

    assert checks.check_top_k(todo).exercise == "top_k_filter"  # how to fill in an instructor's copy


def test_a_pass_and_the_untouched_exercise_print_what_the_stored_notebooks_show(capsys):
    def todo(x):
        raise NotImplementedError

    assert check_square(lambda x: x ** 2)
    assert capsys.readouterr().out == "✅ Square: correct (2 cases checked).\n"
    assert not check_square(todo)
    assert capsys.readouterr().out == ("⏳ Square: not answered yet. Replace `raise NotImplementedError` "
                                       "with your code, then run the cell again.\n")


def test_the_hint_ladder_gives_the_idea_then_the_step_and_never_the_solution(capsys):
    assert not check_square(lambda x: 2 * x)
    first = capsys.readouterr().out
    assert "for x=3 the answer should be 9, yours is 6" in first
    assert "Hint: multiply the number by itself" in first and "return x * x" not in first
    assert not check_square(lambda x: 2 * x)
    second = capsys.readouterr().out
    assert "Hint, the step: return x * x" in second and 'lab.solutions.show("square")' in second
    assert "def square" not in first + second  # the solution itself only on request


def test_a_recognised_mistake_gets_its_own_hint_and_the_step_at_once(capsys):
    negative = Mistake("the sign: a square is never negative", lambda got, want, x: got == -want)
    assert not check_square(lambda x: -x * x, mistakes=[negative])
    out = capsys.readouterr().out
    assert "Hint: the sign: a square is never negative" in out and "Hint, the step: return x * x" in out
    cube = Mistake.answer("that is the cube", lambda x: x ** 3)
    assert not check_square(lambda x: x ** 3, mistakes=[negative, cube])
    assert "that is the cube" in capsys.readouterr().out


def test_a_mistake_that_cannot_read_the_answer_is_not_that_mistake(capsys):
    assert not check_square(lambda x: "nine", mistakes=[Mistake("never", lambda got, want, x: got.shape)])
    assert "never" not in capsys.readouterr().out


def test_the_learners_exceptions_become_hints(capsys):
    assert not check_square(lambda x: 1 / 0)
    out = capsys.readouterr().out
    assert "ZeroDivisionError" in out and "Hint: multiply the number by itself" in out


def test_the_learners_code_gets_copies_of_the_inputs():
    def squares_in_place(x):  # spoils its input: the solution must still see the case's own tensor
        return x.mul_(x)

    cases = [Case("x=[1, 2, 3]", (torch.tensor([1.0, 2.0, 3.0]),))]
    assert checks.run_check("Square", squares_in_place, square, cases)
    assert cases[0].args[0].tolist() == [1.0, 2.0, 3.0]


def test_same_compares_numbers_tensors_and_the_rest():
    assert checks.same([1.0, 2.0], torch.tensor([1.0, 2.0]))
    assert not checks.same([1.0], torch.tensor([1.0, 2.0]))
    assert not checks.same("abc", torch.tensor([1.0]))
    assert checks.same(0.1 + 0.2, 0.3) and not checks.same(1.1, 1.0) and checks.same((1, 2), (1, 2))


def test_show_prints_the_solution_without_its_hints(capsys):
    solutions.show("layer_params")
    out = capsys.readouterr().out
    assert out.startswith("def layer_params(config) -> int:") and "@exercise" not in out
    assert "return attention + mlp + norms" in out


def test_hint_prints_each_level_on_request(capsys):
    solutions.hint("kv_cache_gb")
    assert "hint 1 of 2 (the idea)" in capsys.readouterr().out
    solutions.hint("kv_cache_gb", 2)
    assert "hint 2 of 2 (the step): 2 (K and V)" in capsys.readouterr().out
    with pytest.raises(errors.InvalidSettingError, match="use 1 .* or 2"):
        solutions.hint("kv_cache_gb", 3)


def test_an_unknown_exercise_names_the_known_ones():
    with pytest.raises(errors.UnknownExerciseError, match="'layer_param'.*layer_params"):
        solutions.show("layer_param")


def test_every_exercise_declares_two_different_hints():
    for name, hints in solutions.exercises().items():
        assert hints.idea and hints.step and hints.idea != hints.step, name


def test_every_lesson_has_a_checks_file_and_a_solutions_file():
    package = Path(checks.__file__).parent.parent
    for lesson in solutions.LESSONS:
        assert (package / "checks" / f"{lesson}.py").exists(), lesson
        assert (package / "solutions" / f"{lesson}.py").exists(), lesson
    checkers = {name for name in dir(checks) if name.startswith("check_")}
    assert set(solutions.lesson_names("llama_lab.checks")) == checkers
    assert "torch" not in solutions.lesson_names("llama_lab.checks")  # only what the lesson files define


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_checker_and_solution_a_notebook_calls_exists(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    for package, name in re.findall(r"lab\.(checks|solutions)\.(\w+)", code):
        assert callable(getattr({"checks": checks, "solutions": solutions}[package], name)), name


# --- notebook 00 ------------------------------------------------------------------------------

def test_layer_params_solution_adds_up_to_the_model():
    for size in ("7b", "13b", "70b"):
        c = sizing.llama2_config(size)
        rest = 2 * c.vocab_size * c.hidden_size + c.hidden_size  # embedding, lm_head, final norm
        assert c.num_hidden_layers * solutions.layer_params(c) + rest == sizing.count_parameters(c)


def test_check_layer_params(verdicts):
    def no_gqa(c):  # ignores num_key_value_heads: right for 13B, wrong for 70B
        d = c.hidden_size
        return 4 * d * d + 3 * d * c.intermediate_size + 2 * d

    verdicts(checks.check_layer_params, solutions.layer_params,
             (no_gqa, "num_key_value_heads x head_dim columns, not hidden"),
             (lambda c: solutions.layer_params(c) - 2 * c.hidden_size, "the two RMSNorm weight vectors"),
             (lambda c: 4 * c.hidden_size ** 2, "the MLP is missing"))


def test_check_kv_cache_gb(verdicts):
    c = sizing.llama2_config("13b")
    assert solutions.kv_cache_gb(c, 1000) * 1e9 == sizing.kv_cache_bytes_per_token(c, "bf16") * 1000
    verdicts(checks.check_kv_cache_gb, solutions.kv_cache_gb,
             (lambda c, n: solutions.kv_cache_gb(c, n) / 2, "a key AND a value"),
             (lambda c, n: solutions.kv_cache_gb(c, n) * 2, "2 bytes"),
             (lambda c, n: 4 * c.num_hidden_layers * c.hidden_size * n / 1e9, "not num_attention_heads"),
             (lambda c, n: solutions.kv_cache_gb(c, n) * 1e9 / 2**30, "not by 2**30"))
