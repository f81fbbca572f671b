"""Exercise checkers, one file per lesson: `check_...(student_fn)` prints a verdict and a hint.

A checker runs the learner's function and the solution (`llama_lab.solutions`) on the same
cases and compares the answers. It never raises: an exception in the learner's code becomes
a hint, so the notebook goes on. The hints are graded, as in ARENA: the first miss shows the
idea, the next ones the step, and a wrong answer the checker recognises (a `Mistake`) gets its
own hint and the step at once. The solution is printed only on request:
`lab.solutions.show(name)`.

>>> from llama_lab import checks
>>> verdict = checks.check_count_pairs(lambda ids: {})  # doctest: +ELLIPSIS
❌ Count adjacent pairs: for ids=[1, 2, 3, 1, 2] the answer should be {(1, 2): 2, ...}, yours is {}.
   Hint: a pair is two neighbours: ...
   (A second miss names the step.)
>>> bool(verdict)
False
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_lab import solutions

_BY_SOLUTION = object()
_misses: Counter[str] = Counter()  # failed checks per exercise in this session: the hint ladder


@dataclass(frozen=True)
class Case:
    """One input to try: `args` go to the learner's function and to the solution (fresh copies
    each); `expected`, when given, is the answer instead of the solution's (the model's own)."""

    description: str
    args: tuple
    expected: Any = _BY_SOLUTION


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: `looks_like(answer, expected, *case.args)` recognises it,
    `hint` says what went wrong."""

    hint: str
    looks_like: Callable[..., bool]

    @classmethod
    def answer(cls, hint: str, wrong: Callable, rel: float = 1e-5) -> Mistake:
        """The mistake of an answer equal to `wrong(*case.args)`, a typical wrong formula."""
        return cls(hint, lambda got, expected, *args: same(got, wrong(*args), rel))


class Verdict:
    """A checker's result: truthy when the answer passed; `exercise` names the solution it was
    compared with. A notebook shows nothing for it, since the checker has printed its verdict."""

    def __init__(self, passed: bool, exercise: str):
        self.passed, self.exercise = passed, exercise

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Verdict(passed={self.passed}, exercise={self.exercise!r})"

    def _ipython_display_(self) -> None:
        pass


def same(got: Any, expected: Any, rel: float = 1e-6) -> bool:
    """Whether an answer equals the expected one: numbers and tensors within `rel`, the rest by ==.

    >>> same([1.0, 2.0], torch.tensor([1.0, 2.0])), same(0.3, 0.1 + 0.2), same("a", "b")
    (True, True, False)
    """
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, expected, rel_tol=rel, abs_tol=rel)
    if isinstance(expected, torch.Tensor):
        try:
            got = torch.as_tensor(got, dtype=expected.dtype)
        except (TypeError, ValueError, RuntimeError):
            return False
        return got.shape == expected.shape and torch.allclose(got, expected, rel, rel, equal_nan=True)
    return got == expected


def run_check(title: str, student_fn: Callable, solution: Callable, cases: Sequence[Case], *,
              mistakes: Sequence[Mistake] = (), convert: Callable[[Any], Any] = lambda answer: answer,
              rel: float = 1e-6) -> Verdict:
    """Call `student_fn(*case.args)` on each case (its answer passed through `convert`) and compare
    it with `solution(*case.args)`; print one verdict, with a graded hint on a miss.

    The first failing case is shown with what was expected and what came back.
    """
    for case in cases:
        try:
            got = convert(student_fn(*_fresh(case.args)))
        except NotImplementedError:
            print(f"⏳ {title}: not answered yet. Replace `raise NotImplementedError` with your code, "
                  "then run the cell again.")
            return Verdict(False, solution.__name__)
        except Exception as err:  # the learner's code failed: explain, never crash the notebook
            return _miss(title, solution.__name__, f"your code raised {type(err).__name__}: {err}")
        expected = solution(*_fresh(case.args)) if case.expected is _BY_SOLUTION else case.expected
        if not same(got, expected, rel):
            mistake = next((m for m in mistakes if _looks_like(m, got, expected, case.args)), None)
            return _miss(title, solution.__name__, f"for {case.description} the answer should be "
                         f"{_short(expected)}, yours is {_short(got)}.", mistake)
    print(f"✅ {title}: correct ({len(cases)} case{'s' * (len(cases) > 1)} checked).")
    return Verdict(True, solution.__name__)


def _miss(title: str, name: str, what: str, mistake: Mistake | None = None) -> Verdict:
    """Print a failed check with the next hint of the ladder: the idea first, then the step."""
    _misses[name] += 1
    hints = solutions.hints(name)
    lines = [f"❌ {title}: {what}"]
    if mistake is None and _misses[name] == 1:
        lines += [f"   Hint: {hints.idea}", "   (A second miss names the step.)"]
    else:
        lines += [f"   Hint: {mistake.hint}"] if mistake else []
        lines += [f"   Hint, the step: {hints.step}",
                  f'   Still stuck? lab.solutions.show("{name}") prints a solution.']
    print("\n".join(lines))
    return Verdict(False, name)


def _looks_like(mistake: Mistake, got: Any, expected: Any, args: tuple) -> bool:
    try:
        return bool(mistake.looks_like(got, expected, *_fresh(args)))
    except Exception:  # an answer of another shape or type is not this mistake
        return False


def _fresh(args: tuple) -> tuple:
    """Copies of a case's tensors and containers, so that code that edits its input spoils nothing."""
    return tuple(copy.deepcopy(a) if isinstance(a, (torch.Tensor, list, dict, tuple)) else a for a in args)


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


__getattr__, __dir__ = solutions.lesson_access(__name__)
