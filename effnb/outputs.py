"""The output paths of ``%efficient`` and ``effnb`` commands: checked before any work (a bad path must not
cost the result), and a report written whole or not at all. No torch import here."""

from __future__ import annotations

import os
import tempfile

from .commands import CommandError
from .files import write_atomic


def _probe_file(path: str) -> None:
    """Open ``path`` for writing without changing it (an existing file keeps its bytes, a new one is removed)."""
    if os.path.lexists(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        try:
            os.write(fd, b"")  # /dev/full refuses even this
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(path)


def check_output_file(path: str, option: str = "--json") -> str:
    """Check before any work that ``path`` can be written; returns it with ``~`` expanded."""
    full = os.path.expanduser(path)
    if not full.strip():
        raise CommandError(f"{option} needs a file path, got {path!r}")
    if os.path.isdir(full):
        raise CommandError(f"{option} {path}: is a directory; give a file path such as {os.path.join(path, 'report.json')}")
    parent = os.path.dirname(os.path.abspath(full))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise CommandError(f"{option} {path}: the folder {parent} {what}")
    try:
        _probe_file(full)
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    return full


def check_output_dir(path: str, option: str = "-o") -> str:
    """Check before any work that the directory ``path`` can be created or written into."""
    full = os.path.expanduser(path)
    if not full.strip():
        raise CommandError(f"{option} needs a directory path, got {path!r}")
    existing = os.path.abspath(full)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(full) else f" ({existing})"
        raise CommandError(f"{option} {path}: not a directory{where}; give a directory path for the checkpoint")
    try:
        fd, probe = tempfile.mkstemp(prefix=".effnb-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot write into {existing} ({exc.strerror or exc})") from None
    return full


def write_json(report, path: str, option: str = "--json") -> None:
    """Write ``report.to_json()`` to ``path``: a regular file is replaced whole (never left half-written)."""
    if not hasattr(report, "to_json"):
        raise CommandError(f"{option}: this command gives no report to write")
    text = report.to_json() + "\n"
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a device or pipe: written as it is
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        write_atomic(path, text.encode("utf-8"))
    except OSError as exc:
        raise CommandError(f"{option} {path}: could not write the report ({exc.strerror or exc})") from None
