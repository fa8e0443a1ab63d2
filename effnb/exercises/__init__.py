"""Checked exercises for the tutorial notebooks.

A notebook asks the participant to compute something, then calls::

    from effnb import exercises
    exercises.check("quant.bytes", answer, model=qmodel)    # prints a verdict, returns True/False
    exercises.hint("quant.bytes")                           # a nudge, always available
    exercises.solution("quant.bytes")                       # instructors only (see below)

Each topic lives in its own module ``effnb/exercises/<topic>.py`` (loaded on first use) and
declares its exercises with the :func:`exercise` decorator::

    @exercise("quant.bytes", prompt="How many bytes ...?", hint="...", solution="answer = ...")
    def _(answer, *, model):
        if answer != expected:
            raise ExerciseError(f"{answer} is not ...; remember that ...")

A checker raises :class:`ExerciseError` with a message that helps (what was expected, in what
unit, the usual mistake); any other exception from a checker is a bug in the checker and is not
hidden. Solutions are not printed next to the exercises: :func:`solution` shows them only when
``EFFNB_SOLUTIONS=1`` is set in the environment or :func:`show_solutions` was called (the
instructor's copy), and says how to enable them otherwise.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExerciseError", "Exercise", "exercise", "check", "hint", "solution", "show_solutions",
           "list_exercises", "TOPICS", "as_number", "close_to", "report_row"]

# topic -> module effnb.exercises.<topic>; a key is "<topic>.<name>"
TOPICS = ("quickstart", "baseline", "quant", "lora", "moe", "kernels", "capstone")


class ExerciseError(ValueError):
    """Raised by a checker when the answer is wrong; its message is shown to the participant."""


@dataclass
class Exercise:
    key: str
    prompt: str
    checker: Callable[..., Any]
    hint: str = ""
    solution: str = ""
    tags: tuple = field(default_factory=tuple)


_REGISTRY: dict[str, Exercise] = {}
_solutions_enabled = False


def exercise(key: str, *, prompt: str, hint: str = "", solution: str = "") -> Callable:
    """Register the decorated function as the checker of exercise ``key`` ("topic.name")."""
    topic = key.split(".", 1)[0]
    if topic not in TOPICS or "." not in key:
        raise ValueError(f"exercise key {key!r} must be '<topic>.<name>' with topic in {', '.join(TOPICS)}")

    def register(fn: Callable) -> Callable:
        _REGISTRY[key] = Exercise(key, prompt, fn, hint, solution)
        return fn

    return register


def _load_all() -> None:
    for topic in TOPICS:
        _load(topic)


def _load(topic: str) -> None:
    try:
        importlib.import_module(f"{__name__}.{topic}")
    except ModuleNotFoundError as exc:  # a topic without exercises yet
        if exc.name != f"{__name__}.{topic}":
            raise


def _get(key: str) -> Exercise:
    if not isinstance(key, str):
        raise TypeError(f"an exercise key is a string like 'quant.bytes', got {type(key).__name__}")
    topic = key.split(".", 1)[0]
    if topic in TOPICS:
        _load(topic)
    if key not in _REGISTRY:
        _load_all()
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        more = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown exercise {key!r}{more} Known exercises: {known}")
    return _REGISTRY[key]


def check(key: str, answer: Any, *, quiet: bool = False, **context: Any) -> bool:
    """Check ``answer`` for exercise ``key``; print a one-line verdict and return True/False.

    ``context`` passes objects the checker needs (the model the participant worked on, ...).
    """
    ex = _get(key)
    try:
        ex.checker(answer, **context)
    except ExerciseError as exc:
        if not quiet:
            print(f"✗ {key}: {exc}")
            if ex.hint:
                print(f"  hint: exercises.hint({key!r})")
        return False
    if not quiet:
        print(f"✓ {key}: correct")
    return True


def hint(key: str) -> str:
    """The exercise's hint (printed and returned)."""
    text = _get(key).hint or "No hint for this one: re-read the cell above the exercise."
    print(text)
    return text


def show_solutions(enabled: bool = True) -> None:
    """Enable (or disable) :func:`solution` in this process: for instructors."""
    global _solutions_enabled
    _solutions_enabled = bool(enabled)


def _solutions_on() -> bool:
    return _solutions_enabled or os.environ.get("EFFNB_SOLUTIONS", "") not in ("", "0", "false", "no")


def solution(key: str) -> str | None:
    """The reference solution, shown only in the instructor's setting (see module docstring)."""
    ex = _get(key)
    if not _solutions_on():
        print("Solutions are for instructors: run with EFFNB_SOLUTIONS=1 or call "
              "effnb.exercises.show_solutions(). Try exercises.hint(...) first.")
        return None
    print(ex.solution)
    return ex.solution


def list_exercises(topic: str | None = None) -> list[str]:
    """Keys of the registered exercises, optionally for one topic."""
    if topic is not None and topic not in TOPICS:
        close = difflib.get_close_matches(str(topic), TOPICS, n=1)
        more = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown topic {topic!r}{more} Topics: {', '.join(TOPICS)}")
    _load_all()
    return sorted(k for k in _REGISTRY if topic is None or k.startswith(topic + "."))


# ----------------------------------------------------------------------------- helpers for checkers


def as_number(answer: Any, what: str = "the answer") -> float:
    """``answer`` as a float, or an ExerciseError that says what was expected instead."""
    if isinstance(answer, bool) or answer is None:
        raise ExerciseError(f"{what} should be a number, got {answer!r}; did you forget to assign `answer`?")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        raise ExerciseError(f"{what} should be a number, got {type(answer).__name__} {answer!r}") from None
    if value != value:  # NaN
        raise ExerciseError(f"{what} is NaN: check for a division by zero or a missing value")
    return value


def close_to(value: float, expected: float, rel: float = 0.01, abs_tol: float = 0.0) -> bool:
    """True when ``value`` is within ``rel`` (relative) or ``abs_tol`` (absolute) of ``expected``."""
    return abs(value - expected) <= max(rel * abs(expected), abs_tol)


def report_row(report: Any, index: int = 0) -> dict:
    """Row ``index`` of a Report, a Result, a report dict (``to_dict()``) or a single row dict."""
    if hasattr(report, "report") and hasattr(report, "model"):  # a Result
        report = report.report
    rows = getattr(report, "rows", None)
    if rows is None and isinstance(report, dict):
        rows = report.get("variants") or ([report] if "name" in report else None)
    if not rows:
        raise TypeError(f"expected an effnb Report (or its to_dict()), got {type(report).__name__}")
    if index >= len(rows):
        raise ExerciseError(f"the report has {len(rows)} variant(s); this exercise needs at least {index + 1} "
                            "(run the comparison cell above first)")
    return rows[index]
