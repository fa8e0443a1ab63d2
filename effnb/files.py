"""Files written whole or not at all (no torch import): the one write-then-rename for small files.

Used by the command line's ``--json`` reports and by fine-tuning's checkpoints; folders (``effnb.save``,
the exports) are swapped in by ``effnb.quant.serialize.swap_in``.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """``data`` into ``path`` whole or not at all: a temporary file beside it (same file system), flushed to
    disk, renamed over it; on any failure, Ctrl-C included, the temporary goes and ``path`` is as it was.
    ``mode``: the new file's permissions (default: those of the file it replaces, else 0o644)."""
    if mode is None:
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.effnb-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
