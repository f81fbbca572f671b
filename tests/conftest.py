"""Fixtures shared by the unit tests."""

import pytest


def _not_answered(*args):
    """An exercise as the learner first finds it: its body raises NotImplementedError."""
    raise NotImplementedError


@pytest.fixture
def verdicts(capsys):
    """`verdicts(check, solution, *wrong_answers)` asserts what a learner sees from a checker:
    a pass for the solution, a fail with a hint for each wrong answer, and "not answered yet"
    for the untouched exercise."""
    def assert_verdicts(check, solution, *wrong_answers):
        assert check(solution)
        assert "✅" in capsys.readouterr().out
        for wrong in wrong_answers:
            assert not check(wrong)
            out = capsys.readouterr().out
            assert "❌" in out and "Hint" in out
        assert not check(_not_answered)
        out = capsys.readouterr().out
        assert "⏳" in out and "not answered yet" in out
    return assert_verdicts
