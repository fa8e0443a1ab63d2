"""``explore(kind, objects)``: the one call behind ``%efficient explore``."""

from __future__ import annotations

import json
import os


def _namespace() -> dict:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return {}
    shell = get_ipython()
    return shell.user_ns if shell is not None else {}


def _resolve(token, load):
    """An object as it is; a name: the notebook variable, else what ``load(name)`` makes of it."""
    if not isinstance(token, str):
        return token
    ns = _namespace()
    return ns[token] if token in ns else load(token)


def _load_model(token: str):
    from ..commands import load_named_model, undefined_name

    model = load_named_model(token)
    if model is None:
        raise ValueError(undefined_name(token))
    return model


def _load_report(token: str):
    if token.endswith(".json") and os.path.exists(token):
        from ..report import Report

        with open(token, encoding="utf-8") as f:
            return Report.from_dict(json.load(f))
    raise ValueError(f"{token!r} is neither a notebook variable nor a report JSON file")


def explore(kind: str, objects, *, text: str | None = None, layer: str | None = None, method: str | None = None,
            rank: int | None = None):
    """Make the widget ``kind`` (quant, lora, router, compare) for ``objects`` (names or objects)."""
    from .command import KINDS

    objects = list(objects) if isinstance(objects, (list, tuple)) else [objects]
    if kind not in KINDS:
        raise ValueError(f"unknown widget {kind!r} (widgets: {', '.join(KINDS)})")
    if kind == "compare":
        from .compare import CompareDashboard

        return CompareDashboard([_resolve(o, _load_report) for o in objects])
    if len(objects) != 1:
        raise ValueError(f"explore {kind} takes one model, got {len(objects)}: {' '.join(map(str, objects))}")
    model = _resolve(objects[0], _load_model)
    from ..commands import check_loaded

    check_loaded(model, objects[0] if isinstance(objects[0], str) else type(model).__name__)
    if kind == "quant":
        from .quant import QuantExplorer

        return QuantExplorer(model, layer=layer, **({"method": method} if method else {}))
    if kind == "lora":
        from .lora import LoraExplorer

        return LoraExplorer(model, **({"rank": rank} if rank else {}))
    from .router import RouterExplorer

    return RouterExplorer(model, text)
