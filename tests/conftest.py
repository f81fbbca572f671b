"""Fixtures shared by the unit tests."""

from collections import Counter

import pytest


def _not_answered(*args):
    """An exercise as the learner first finds it: its body raises NotImplementedError."""
    raise NotImplementedError


@pytest.fixture
def verdicts(capsys, monkeypatch):
    """`verdicts(check, solution, (wrong, hint), ...)` asserts what a learner sees from a checker:
    a pass for the solution; for each typical wrong answer (two at least), a fail whose hint
    contains `hint`, as on a first try; "not answered yet" for the untouched exercise."""
    from llama_lab import checks

    def assert_verdicts(check, solution, *wrong_answers):
        assert len(wrong_answers) >= 2, "give two typical wrong answers at least, each with its hint"
        assert check(solution)
        assert "✅" in capsys.readouterr().out
        for wrong, hint in wrong_answers:
            monkeypatch.setattr(checks, "_misses", Counter())  # a first try: the hint ladder starts again
            assert not check(wrong)
            out = capsys.readouterr().out
            assert "❌" in out and "Hint" in out and hint in out, out
        assert not check(_not_answered)
        out = capsys.readouterr().out
        assert "⏳" in out and "not answered yet" in out
    return assert_verdicts
