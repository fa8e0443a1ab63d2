"""Checks shared by every config (no torch import): unknown keyword options, "did you mean" hints, and the
typed, bounded validators the config dataclasses call in ``__post_init__``.

A wrong type raises ``TypeError``, a value out of range or not among the allowed ones ``ValueError``;
either way the message names the option, the bad value and what is allowed, on one line.
"""

from __future__ import annotations

import difflib
import math
import operator
from dataclasses import fields

#: upper bound on token counts (prompt, decode, quality, calibration...): far above any model's context,
#: low enough that a typo such as 10**7 is refused instead of allocating gigabytes
MAX_TOKENS = 1_000_000
#: devices a ``device=`` option accepts (``cuda:N`` for a given GPU)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def closest_match(value, allowed, cutoff: float = 0.6) -> str | None:
    """The one of ``allowed`` closest to ``value`` (difflib's ratio at least ``cutoff``), or None.

    Every "did you mean" of effnb comes from here; callers word the hint to fit their message."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(value, allowed, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``allowed``, or ``""`` when none is close."""
    close = closest_match(value, allowed, cutoff)
    return f"; did you mean {close!r}?" if close else ""


def reject_unknown(cls, what: str, kwargs: dict, cutoff: float = 0.6) -> None:
    """TypeError naming the first keyword that is not a field of the dataclass ``cls``, with the known ones."""
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"unknown {what} option {unknown[0]!r}{did_you_mean(unknown[0], known, cutoff)} "
                        f"(known: {', '.join(known)})")


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None, *, upper: str | None = None,
              hint: str = "") -> int:
    """``value`` as an int in ``minimum..maximum``: TypeError for a non-integer (bools and floats included),
    ValueError out of range. ``upper`` names the maximum in the message (e.g. ``"experts=4"``)."""
    need = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {need}{hint}, got {value!r}")
    try:
        number = operator.index(value)  # int, numpy integers; not 64.0 nor "8"
    except TypeError:
        raise TypeError(f"{name} must be {need}{hint}, got {value!r} ({type(value).__name__})") from None
    if number < minimum:
        raise ValueError(f"{name} must be {need}{hint}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be at most {upper or f'{maximum:,}'}{hint}, got {value!r}")
    return number


def check_number(name: str, value, minimum: float = 0.0, maximum: float | None = None, *,
                 allow_minimum: bool = True, hint: str = "") -> float:
    """``value`` as a finite float with ``minimum <= value`` (``<`` when not ``allow_minimum``) and
    ``value <= maximum``: TypeError for a non-number, ValueError out of range."""
    low = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
    need = f"a number {low}" + (f" and <= {maximum:g}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be {need}{hint}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (number == minimum and not allow_minimum) \
            or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {need}{hint}, got {value!r}")
    return number


def check_bool(name: str, value) -> bool:
    """TypeError unless ``value`` is True or False (not 1, "yes" or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value, allowed, cutoff: float = 0.6):
    """ValueError unless ``value`` is one of ``allowed``, with the allowed ones and the closest."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                         f"{did_you_mean(value, allowed, cutoff)}")
    return value


def check_device(value, name: str = "device") -> str:
    """A device string effnb can place a model on: auto, cpu, cuda, cuda:N or mps (torch-free check)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string ({', '.join(DEVICES)}), got {value!r} ({type(value).__name__})")
    kind, _, index = value.partition(":")
    if kind in ("auto", "cpu", "cuda", "mps") and (not index or (kind == "cuda" and index.isdigit())):
        return value
    raise ValueError(f"unknown {name} {value!r}{did_you_mean(value, DEVICES)} (devices: {', '.join(DEVICES)})")
