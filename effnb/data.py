"""Offline text: evaluation, calibration and retrieval pairs from the Python standard library.

Everything here is built from the docstrings of a fixed list of standard-library modules, so it
needs no download and is deterministic for a given Python version (docstrings change between
Python releases, so compare perplexities measured on the same Python). The evaluation and
calibration module lists are disjoint, so a calibrated method never sees the text it is judged on.

Wherever effnb takes text, it also takes the user's: a string, a path to a text file, or a list of
strings (see ``resolve_text``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from pathlib import Path

#: modules whose docstrings make the evaluation text (perplexity, speed prompts)
EVAL_MODULES = ("json", "textwrap", "collections", "functools", "pathlib", "string",
                "datetime", "statistics", "fractions", "heapq", "shlex", "fnmatch")
#: modules whose docstrings make the calibration text (GPTQ, router fitting); disjoint from EVAL_MODULES
CALIBRATION_MODULES = ("argparse", "csv", "difflib", "shutil", "random", "logging", "enum",
                       "dataclasses", "contextlib", "bisect", "calendar", "copy", "gettext", "zipfile")
#: modules whose public functions give (name, first docstring line) retrieval pairs for encoders
RETRIEVAL_MODULES = ("os", "os.path", "shutil", "json", "re", "math", "string", "textwrap", "random",
                     "statistics", "itertools", "functools", "operator", "time", "heapq", "bisect",
                     "base64", "binascii", "zlib", "glob", "fnmatch", "tempfile", "calendar", "html",
                     "urllib.parse", "difflib", "shlex", "copy", "inspect")

assert not set(EVAL_MODULES) & set(CALIBRATION_MODULES)  # a module-level invariant, not user input


def _public_members(module_name: str):
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    names = exported or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        if exported is None and getattr(obj, "__module__", None) not in (module_name, "_" + module_name):
            continue  # re-exported from another module: its docstring belongs there
        yield name, obj


def _module_docs(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    parts = []
    doc = inspect.getdoc(module)
    if doc:
        parts.append(f"Module {module_name}\n{doc}")
    for name, obj in _public_members(module_name):
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 20:
            parts.append(f"{module_name}.{name}\n{doc}")
    return parts


@functools.cache
def eval_text() -> str:
    """Evaluation text: docstrings of ``EVAL_MODULES`` (about 60 k characters)."""
    return "\n\n".join(p for m in EVAL_MODULES for p in _module_docs(m))


@functools.cache
def _calibration_chunks() -> tuple[str, ...]:
    return tuple(p for m in CALIBRATION_MODULES for p in _module_docs(m))


def calibration_texts(n: int = 128, min_chars: int = 200) -> list[str]:
    """``n`` calibration passages from ``CALIBRATION_MODULES`` (disjoint from ``eval_text``).

    Short docstrings are joined with their neighbours until each passage has ``min_chars``.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    passages, buf = [], ""
    for chunk in _calibration_chunks():
        buf = f"{buf}\n\n{chunk}" if buf else chunk
        if len(buf) >= min_chars:
            passages.append(buf)
            buf = ""
    if buf:
        passages.append(buf)
    return passages[:n]


@functools.cache
def doc_pairs() -> tuple[tuple[str, str], ...]:
    """(qualified function name, first docstring line) pairs for retrieval scores of encoders.

    Names are de-duplicated, and pairs whose first line is too short or shared by another
    function are dropped, so every query has exactly one right answer.
    """
    def first_line(doc: str) -> str | None:
        first = doc.strip().splitlines()[0].strip()
        return first if len(first) >= 25 else None  # shorter lines are too short to tell functions apart

    return function_summaries(first_line)


def function_summaries(summarise) -> tuple[tuple[str, str], ...]:
    """(qualified name, ``summarise(docstring)``) for the public functions of ``RETRIEVAL_MODULES``.

    Modules in their fixed order, names sorted within each; functions without a docstring or whose
    summary is ``None`` are skipped, and a summary shared by two functions is dropped, so each name has
    exactly one right answer. Used by ``doc_pairs`` and by the fine-tuning task (``effnb.lora.task``).
    """
    pairs: dict[str, str] = {}
    for module_name in RETRIEVAL_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            summary = summarise(doc) if doc else None
            if summary:
                pairs.setdefault(f"{module_name}.{name}", summary)
    counts: dict[str, int] = {}
    for summary in pairs.values():
        counts[summary] = counts.get(summary, 0) + 1
    return tuple((k, v) for k, v in pairs.items() if counts[v] == 1)


def resolve_text(text=None, *, default=eval_text) -> str:
    """Text from a string, a file path, a list of strings, or ``None`` (the default corpus)."""
    if text is None:
        return default()
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and "\n" not in text
                                  and os.path.isfile(os.path.expanduser(text))):
        return Path(os.path.expanduser(str(text))).read_text(encoding="utf-8")
    if isinstance(text, str):
        if not text.strip():
            raise ValueError("text is empty: give a non-empty string, a file path or a list of strings")
        return text
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        if not any(t.strip() for t in text):
            raise ValueError("the list of texts is empty: give at least one non-empty string")
        return "\n\n".join(text)
    raise TypeError(f"text must be a string, a file path or a list of strings, got {type(text).__name__}")


def describe() -> dict:
    """What the built-in corpora are made of, for reports and docs."""
    import sys

    return {
        "source": "Python standard-library docstrings (inspect.getdoc)",
        "python": sys.version.split()[0],
        "eval_modules": list(EVAL_MODULES),
        "calibration_modules": list(CALIBRATION_MODULES),
        "eval_chars": len(eval_text()),
        "retrieval_pairs": len(doc_pairs()),
    }
