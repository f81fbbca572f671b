"""The answer keys of the exercises, one file per lesson, each declared with its two hints.

A solution is a short function; `@exercise` registers the hints that lead to it:
the idea to think about, then the step to take.

    @exercise(idea="what a decoder layer holds", step="q, o: hidden x hidden; ...")
    def layer_params(config) -> int: ...

A checker (`llama_lab.checks`) shows the idea after a first miss and the step after the next;
the solution is printed only on request:

>>> from llama_lab import solutions
>>> solutions.hint("apply_merge")  # doctest: +ELLIPSIS
💡 apply_merge, hint 1 of 2 (the idea): ...
>>> solutions.show("apply_merge")  # doctest: +ELLIPSIS
def apply_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
...

Every public function of a lesson file is reachable here too (`solutions.top_k_filter`):
the lesson files load on first use.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

from llama_lab.errors import InvalidSettingError, UnknownExerciseError

# The lessons that have exercises, one file of that name in `checks/` and in `solutions/`.
LESSONS = ("nb00_meet", "nb01_tokenization", "nb02_attention", "nb03_block", "nb04_sampling",
           "nb05_finetuning", "nb06_gpu", "nb07_serving")

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Hints:
    """The graded hints of one exercise: `idea` points to it, `step` names what to do."""

    idea: str
    step: str

    def level(self, n: int) -> str:
        if n not in (1, 2):
            raise InvalidSettingError(f"Hint level {n} does not exist: use 1 (the idea) or 2 (the step); "
                                      "the solution itself is solutions.show(name).")
        return self.idea if n == 1 else self.step


_HINTS: dict[str, Hints] = {}


def exercise(idea: str, step: str) -> Callable[[F], F]:
    """Register the decorated solution with its two hints; the function itself is unchanged."""
    def register(solution: F) -> F:
        _HINTS[solution.__name__] = Hints(idea, step)
        return solution
    return register


def lesson_modules(package: str) -> list[ModuleType]:
    """The lesson files of `package` (`llama_lab.checks` or `llama_lab.solutions`), imported."""
    return [importlib.import_module(f"{package}.{lesson}") for lesson in LESSONS]


def lesson_names(package: str) -> dict[str, object]:
    """Every public function defined in the lesson files of `package`, by name."""
    return {name: value for module in lesson_modules(package) for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}


def exercises() -> dict[str, Hints]:
    """Every exercise's hints, by the name of its solution."""
    lesson_modules(__name__)
    return dict(_HINTS)


def hints(name: str) -> Hints:
    """The hints of the exercise whose solution is called `name`."""
    known = exercises()
    if name not in known:
        raise UnknownExerciseError(name, sorted(known))
    return known[name]


def hint(name: str, level: int = 1) -> None:
    """Print hint `level` of an exercise: 1 the idea, 2 the step."""
    text = hints(name).level(level)
    print(f"💡 {name}, hint {level} of 2 ({'the idea' if level == 1 else 'the step'}): {text}")


def show(name: str) -> None:
    """Print the source of the solution `name` (without its hints)."""
    hints(name)  # an unknown name fails here, with the list of exercises
    source = inspect.getsource(lesson_names(__name__)[name])
    print(source[re.search(r"^def ", source, re.MULTILINE).start():], end="")


def lesson_access(package: str) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of a package whose public names live in its lesson
    files: `solutions.layer_params`, `checks.check_top_k` import the lessons on first use."""
    def __getattr__(name: str) -> object:
        found = lesson_names(package)
        if name in found:
            return found[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *lesson_names(package)])

    return __getattr__, __dir__


__getattr__, __dir__ = lesson_access(__name__)
