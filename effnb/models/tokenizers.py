"""The tokenizer that travels with a model: attached by effnb, or found offline where the model came from."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import (
    NO_TOKENIZER_ATTR,
    TOKENIZER_ATTR,
    check_model,
    find_attr,
    looks_like_hub_id,
    quiet_transformers,
)

log = logging.getLogger(__name__)


def tokenizer_for(model):
    """The tokenizer that travels with ``model`` (also through PEFT wrappers and copies).

    Found as ``find_tokenizer`` finds it; raises ValueError when there is none.
    """
    tok = find_tokenizer(model)
    if tok is None:
        raise ValueError(
            f"no tokenizer is attached to this {type(model).__name__} and none was found beside it; load it with "
            "effnb.load_model(...) or attach one once with effnb.attach_tokenizer(model, tokenizer)"
        )
    return tok


def find_tokenizer(model):
    """The model's tokenizer, or None: the attached one, else one found offline where the model came from.

    Where it came from is ``model.name_or_path`` (transformers sets it): a local folder holding
    tokenizer files, or a hub id whose tokenizer is already in the local Hugging Face cache. A
    tokenizer found this way is attached, so the search runs once. Nothing is downloaded.
    """
    tok = find_attr(model, TOKENIZER_ATTR)
    if tok is not None:
        return tok
    if find_attr(model, NO_TOKENIZER_ATTR):
        return None
    source = _name_or_path(model)
    tok = tokenizer_from(source) if source else None
    target = _innermost(model)
    if tok is not None:
        object.__setattr__(target, TOKENIZER_ATTR, tok)
    else:
        object.__setattr__(target, NO_TOKENIZER_ATTR, True)  # looked once: don't look again
    return tok


def _name_or_path(model) -> str | None:
    seen, obj = 0, model
    while obj is not None and seen < 6:
        config = obj.__dict__.get("config") if hasattr(obj, "__dict__") else None
        src = (getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None)) \
            if config is not None else None
        if src:
            return str(src)
        modules = obj.__dict__.get("_modules", {}) if hasattr(obj, "__dict__") else {}
        obj, seen = modules.get("base_model") or modules.get("model"), seen + 1
    return None


def _innermost(model):
    seen, obj = 0, model
    while seen < 6:
        modules = obj.__dict__.get("_modules", {}) if hasattr(obj, "__dict__") else {}
        nxt = modules.get("base_model")
        if nxt is None:
            return obj
        obj, seen = nxt, seen + 1
    return obj


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "merges.txt")


def tokenizer_from(source: str):
    """A tokenizer from a local folder, or a hub id already cached locally; None when there is none."""
    path = Path(source).expanduser()
    if path.is_dir():
        folders = [path, path / "tokenizer"]
        where = next((d for d in folders if any((d / f).exists() for f in _TOKENIZER_FILES)), None)
        if where is None:
            return None
        return auto_tokenizer(str(where), local_files_only=True)
    if not looks_like_hub_id(source):
        return None
    return auto_tokenizer(source, local_files_only=True)


def auto_tokenizer(source: str, **kw):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.info("no tokenizer at %s (%s)", source, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def attach_tokenizer(model, tokenizer):
    """Attach ``tokenizer`` to ``model`` so every effnb call can find it; returns the model."""
    check_model(model, loaded=False)
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer (e.g. a transformers tokenizer), got {type(tokenizer).__name__}")
    object.__setattr__(model, TOKENIZER_ATTR, tokenizer)
    model.__dict__.pop(NO_TOKENIZER_ATTR, None)
    return model


def attached_tokenizer(model):
    """The tokenizer attached to ``model`` (or a model it wraps), without searching for one; None if none."""
    return find_attr(model, TOKENIZER_ATTR)
