"""Offline text: evaluation, calibration and retrieval pairs from the Python standard library.

Everything here is built from the docstrings of a fixed list of standard-library modules, so it
needs no download and is deterministic for a given Python version (docstrings change between
Python releases, so compare perplexities measured on the same Python). The evaluation and
calibration module lists are disjoint, so a calibrated method never sees the text it is judged on.

Wherever effnb takes text, it also takes the user's: a string, a path to a text file, or a list of
strings (see ``resolve_text``). A one-line string that looks like a path but names no file is an
error (FileNotFoundError), never the text to score or train on (``check_text``).
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
    exactly one right answer. Used by ``doc_pairs`` and by the fine-tuning task (``effnb.adapters.task``).
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


_PATH_PREFIXES = ("/", "~", "./", "../")
_TEXT_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv")


def looks_like_path(text: str) -> bool:
    """True for a one-line string that reads as a file name: it starts with / ~ ./ ../ or ends with
    .txt .md .json .jsonl .csv. Such a string is never taken as the text itself."""
    one_line = len(text) < 4096 and "\n" not in text
    stripped = text.strip()
    return one_line and (stripped.startswith(_PATH_PREFIXES) or stripped.lower().endswith(_TEXT_SUFFIXES))


def _file_kind(path: Path) -> str | None:
    try:
        return "dir" if path.is_dir() else "file" if path.is_file() else "other" if path.exists() else None
    except OSError:  # a name too long to be a file, for one
        return None


def check_text(text, name: str = "text") -> Path | None:
    """Check a text argument without reading it; returns the file to read, or None for literal text.

    A string (or ``os.PathLike``) that names an existing file is that file; one that looks like a path
    (``looks_like_path``) but names nothing raises FileNotFoundError, a directory ValueError. To train
    on or score a string that merely looks like a path, pass it in a list: ``[text]``.
    """
    if isinstance(text, os.PathLike) or (isinstance(text, str) and text.strip() and len(text) < 4096
                                         and "\n" not in text):
        path = Path(os.path.expanduser(os.fspath(text)))
        kind = _file_kind(path)
        if kind == "dir":
            raise ValueError(f"{name} {os.fspath(text)!r} is a directory; give a text file, a text or a list of texts")
        if kind == "file":
            return path
        if kind == "other":
            raise ValueError(f"{name} {os.fspath(text)!r} is not a regular file (a device, pipe or socket); "
                             "give a text file, a text or a list of texts")
        if not isinstance(text, str) or looks_like_path(text):
            raise FileNotFoundError(f"{name} file not found: {os.fspath(text)!r} (to use the string itself as "
                                    f"text, pass it in a list: [{name}])")
        return None
    if isinstance(text, str):
        if not text.strip():
            raise ValueError(f"{name} is empty: give a non-empty string, a file path or a list of strings")
        return None
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        if not any(t.strip() for t in text):
            raise ValueError(f"the list of texts given as {name} is empty: give at least one non-empty string")
        return None
    raise TypeError(f"{name} must be a string, a file path or a list of strings, got {type(text).__name__}")


def resolve_text(text=None, *, default=eval_text, name: str = "text") -> str:
    """Text from a string, a file path, a list of strings, or ``None`` (the default corpus).

    See ``check_text`` for when a string is a file: a missing file is an error, never the text.
    """
    if text is None:
        return default()
    path = check_text(text, name)
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            raise ValueError(f"{name} file {str(path)!r} is empty")
        return text
    return text if isinstance(text, str) else "\n\n".join(text)  # check_text refused empty ones


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
