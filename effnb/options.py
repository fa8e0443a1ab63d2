"""Checks shared by every config: unknown keyword options and "did you mean" hints (no torch import)."""

from __future__ import annotations

import difflib
from dataclasses import fields


def did_you_mean(value, allowed, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``allowed``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def reject_unknown(cls, what: str, kwargs: dict, cutoff: float = 0.6) -> None:
    """TypeError naming the first keyword that is not a field of the dataclass ``cls``, with the known ones."""
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"unknown {what} option {unknown[0]!r}{did_you_mean(unknown[0], known, cutoff)} "
                        f"(known: {', '.join(known)})")
