"""Small helpers for tests of effnb and of projects built on it."""

from __future__ import annotations

#: audit options that keep a measurement to a fraction of a second on tiny models
QUICK = {"repeats": 1, "warmup": 0, "decode_tokens": 4, "prompt_tokens": 16, "quality_tokens": 256, "window": 128}
