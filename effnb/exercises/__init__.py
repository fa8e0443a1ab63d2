"""Checked exercises for the tutorial notebooks.

A notebook asks the participant to compute something, then calls::

    from effnb import exercises
    exercises.check("quant.bytes", answer, model=qmodel)    # prints a verdict, returns True/False
    exercises.hint("quant.bytes")                           # a nudge, always available
    exercises.solution("quant.bytes")                       # instructors only (see below)
    exercises.write_solutions_notebook("solutions.ipynb")   # every solution, for the instructor

Each topic lives in its own module ``effnb/exercises/<topic>.py`` (loaded on first use) and
declares its exercises with the :func:`exercise` decorator, the checker's docstring holding the
text (kept beside the check, and prose rather than a block of keyword arguments per exercise)::

    @exercise("quant.bytes", solution="answer = ...")
    def _(answer, *, model):
        '''How many bytes ...?

        Hint: ...

        Why: why that is the answer, in a sentence or two.
        '''
        if answer != expected:
            raise ExerciseError(f"{answer} is not ...; remember that ...")

A checker raises :class:`ExerciseError` with a message that helps (what was expected, in what
unit, the usual mistake); any other exception from a checker is a bug in the checker and is not
hidden. Solutions are not printed next to the exercises: :func:`solution` shows them only when
``EFFNB_SOLUTIONS=1`` is set in the environment or :func:`show_solutions` was called (the
instructor's copy), and says how to enable them otherwise. A solution is written with the
variable names of its notebook's exercise cell, so an instructor can paste it there; the
instructor's notebook of every solution comes from the same registry
(:func:`write_solutions_notebook`, or ``python -m effnb.exercises solutions.ipynb``).
"""

from __future__ import annotations

import importlib
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..options import did_you_mean

__all__ = ["ExerciseError", "Exercise", "Solution", "exercise", "check", "hint", "solution", "show_solutions",
           "list_exercises", "write_solutions_notebook", "TOPICS", "NOTEBOOKS", "as_number", "as_tensor", "close_to",
           "report_row"]

# topic -> module effnb.exercises.<topic>; a key is "<topic>.<name>"
TOPICS = ("quickstart", "baseline", "quant", "lora", "moe", "kernels", "capstone")
# topic -> the tutorial notebook whose exercise cells call check() for it
NOTEBOOKS = {"quickstart": "notebooks/00_quickstart.ipynb", "baseline": "notebooks/01_baseline.ipynb",
             "quant": "notebooks/02_quantization.ipynb", "lora": "notebooks/03_lora_qlora.ipynb",
             "moe": "notebooks/04_moe.ipynb", "kernels": "notebooks/05_kernels.ipynb",
             "capstone": "notebooks/06_capstone.ipynb"}


class ExerciseError(ValueError):
    """Raised by a checker when the answer is wrong; its message is shown to the participant."""


@dataclass
class Exercise:
    key: str
    prompt: str
    checker: Callable[..., Any]
    hint: str = ""
    solution: str = ""
    explanation: str = ""
    tags: tuple = field(default_factory=tuple)

    @property
    def topic(self) -> str:
        return self.key.split(".", 1)[0]


class Solution(str):
    """An exercise's reference solution: the code itself (a ``str``, so ``exec`` takes it) plus
    ``key`` and ``explanation``. :func:`solution` has already printed it, so a notebook does not
    display the returned object a second time."""

    key: str
    explanation: str

    def __new__(cls, code: str, key: str, explanation: str = "") -> Solution:
        self = super().__new__(cls, code)
        self.key, self.explanation = key, explanation
        return self

    @property
    def code(self) -> str:
        return str(self)

    def text(self) -> str:
        """The code, then the explanation as comment lines (what :func:`solution` prints)."""
        why = "\n".join("# " + line for line in textwrap.wrap(self.explanation, 96))
        return f"{self.code}\n{why}" if why else self.code

    def _ipython_display_(self) -> None:  # printed by solution() already
        return None


_REGISTRY: dict[str, Exercise] = {}
_solutions_enabled = False


def exercise(key: str, *, solution: str = "") -> Callable:
    """Register the decorated function as the checker of exercise ``key`` ("topic.name").

    The checker's docstring is the exercise's text: the prompt, then a paragraph starting ``Hint:``
    and one starting ``Why:`` (the explanation shown with the solution, to instructors); lines of a
    paragraph join with spaces. ``solution``: code that sets ``answer``, in the variable names of the
    notebook's exercise cell."""
    topic = key.split(".", 1)[0]
    if topic not in TOPICS or "." not in key:
        raise ValueError(f"exercise key {key!r} must be '<topic>.<name>' with topic in {', '.join(TOPICS)}")

    def register(fn: Callable) -> Callable:
        text = _texts(fn.__doc__ or "")
        _REGISTRY[key] = Exercise(key, text["prompt"], fn, text["Hint"], solution, text["Why"])
        return fn

    return register


def _texts(doc: str) -> dict[str, str]:
    """{"prompt", "Hint", "Why"} from a checker's docstring (see ``exercise``)."""
    import inspect

    out = {"prompt": [], "Hint": [], "Why": []}
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.splitlines())
        label, sep, rest = text.partition(": ")
        if sep and label in ("Hint", "Why"):
            out[label].append(rest)
        elif text:
            out["prompt"].append(text)
    return {name: " ".join(parts) for name, parts in out.items()}


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
        more = did_you_mean(key, _REGISTRY)
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


def solution(key: str) -> Solution | None:
    """The reference solution (code and explanation), shown only in the instructor's setting.

    Prints the code followed by its explanation as comments and returns a :class:`Solution` (a
    ``str`` of the code, with ``.explanation``); prints where to enable solutions and returns None
    for participants (see module docstring)."""
    ex = _get(key)
    if not _solutions_on():
        print("Solutions are for instructors: run with EFFNB_SOLUTIONS=1 or call "
              "effnb.exercises.show_solutions(). Try exercises.hint(...) first.")
        return None
    sol = Solution(ex.solution, key, ex.explanation)
    print(sol.text())
    return sol


def list_exercises(topic: str | None = None) -> list[str]:
    """Keys of the registered exercises, optionally for one topic."""
    if topic is not None and topic not in TOPICS:
        more = did_you_mean(topic, TOPICS)
        raise ValueError(f"unknown topic {topic!r}{more} Topics: {', '.join(TOPICS)}")
    _load_all()
    return sorted(k for k in _REGISTRY if topic is None or k.startswith(topic + "."))


def _notebook_checks(topic: str) -> dict[str, tuple[int, str]]:
    """{key: (position, the check line)} of the exercise cells in the topic's notebook; empty when the
    notebook is not there (an installed package without the repository's notebooks/)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / NOTEBOOKS[topic]
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return {}
    keys = list_exercises(topic)
    found: dict[str, tuple[int, str]] = {}
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        for line in "".join(cell.get("source", [])).splitlines():
            stripped = line.strip()
            for key in keys:
                if stripped.startswith(f'exercises.check("{key}"') and key not in found:
                    found[key] = (len(found), stripped)
    return found


def write_solutions_notebook(path: str | os.PathLike = "solutions.ipynb", *, topics=None) -> str:
    """Write the instructor's notebook: for every exercise (or those of ``topics``), a Markdown cell
    with its prompt and explanation, then one code cell with its solution (tagged ``solution``,
    ``metadata.effnb.exercise`` = the key) followed by the notebook's own check line, in the order
    the notebook asks them. Outputs are empty; a cell is meant to be read, or pasted into the
    tutorial notebook named above it in place of its exercise cell. Returns the path written."""
    import nbformat
    from nbformat import v4

    chosen = TOPICS if topics is None else ((topics,) if isinstance(topics, str) else tuple(topics))
    for t in chosen:
        list_exercises(t)  # unknown topic: a helpful ValueError
    cells = [v4.new_markdown_cell(
        "# effnb course: exercise solutions (instructors)\n\n"
        "Generated by `effnb.exercises.write_solutions_notebook()` from the same registry that "
        "`exercises.check(...)` uses in the tutorial notebooks. Each solution uses the variable names of "
        "its notebook's exercise cell: paste it there (or run it after the cells above the exercise) and "
        "re-run the check. Keep this file away from participants.")]
    for topic in chosen:
        keys = list_exercises(topic)
        if not keys:
            continue
        checks = _notebook_checks(topic)
        keys.sort(key=lambda k: (checks[k][0] if k in checks else len(checks), list(_REGISTRY).index(k)))
        cells.append(v4.new_markdown_cell(f"## {topic}: `{NOTEBOOKS[topic]}`"))
        for key in keys:
            ex = _REGISTRY[key]
            text = f"### `{key}`\n\n**Exercise.** {ex.prompt}"
            if ex.explanation:
                text += f"\n\n**Why.** {ex.explanation}"
            cells.append(v4.new_markdown_cell(text))
            code = f"# {key} ({NOTEBOOKS[topic]})\n{ex.solution}"
            if key in checks:
                code += f"\n{checks[key][1]}"
            cells.append(v4.new_code_cell(code, metadata={"tags": ["solution"], "effnb": {"exercise": key}}))
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}, "effnb": {"solutions": True}})
    nbformat.validate(nb)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path!r}: the folder {parent!r} does not exist")
    with open(path, "w", encoding="utf-8") as fh:
        nbformat.write(nb, fh)
    return path


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


def as_tensor(answer: Any, wanted: str):
    """``answer`` when it is a torch.Tensor, else an ExerciseError: ``wanted`` (what it should be), then
    what it is."""
    import torch

    if not isinstance(answer, torch.Tensor):
        raise ExerciseError(f"{wanted}, got {type(answer).__name__}")
    return answer


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
