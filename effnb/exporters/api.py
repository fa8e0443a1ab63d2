"""``effnb.export``: write a model in a format a serving engine reads, atomically, validated before returning.

    effnb.export(q, "gguf", "out.gguf")      # llama.cpp: Q8_0 / Q4_0 / Q4_1 from effnb's int8 / int4 group 32
    effnb.export(q, "vllm", "out_dir")       # compressed-tensors pack-quantized: vLLM, transformers

The model is only read: nothing in it changes (``effnb.state_hash`` is the same before and after).
Files are written beside the target under a temporary name, checked, then renamed into place.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..quant.serialize import swap_in
from .config import ExportConfig


@dataclass
class ExportResult:
    """What ``effnb.export`` wrote: the path, the tensor types, the size, and notes on exactness."""

    format: str
    path: str
    tensor_types: Counter = field(default_factory=Counter)
    bytes: int = 0
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        lines = [f"exported {self.format} to {self.path} ({self.bytes / 1e6:.2f} MB; tensors: {types})"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def _repr_html_(self) -> str:  # a notebook shows the same text
        import html

        return f"<pre>{html.escape(str(self))}</pre>"


def export(model, format: str = "gguf", path: str = "", **options) -> ExportResult:
    """Write ``model`` as ``format`` ("gguf", "vllm" / "compressed-tensors", "bitsandbytes") to ``path``.

    Options (``ExportConfig``): ``overwrite`` (replace an existing export), ``tokenizer`` (include the
    model's tokenizer; default True). ``model``: an ``nn.Module`` (a name or folder is loaded first).
    Raises ValueError naming the supported choices when a layer's format has no equivalent.
    """
    cfg = ExportConfig.from_kwargs(format=format, path=path, **options)
    from ..models import resolve_model

    model = resolve_model(model)
    check_plain(model)
    module, function, folder = _EXPORTERS[cfg.format]
    check_target(cfg.path, folder=folder)
    return getattr(importlib.import_module(module, __package__), function)(model, cfg)


# export format -> (module, its function(model, cfg) -> ExportResult, whether it writes a folder); the
# modules import torch, gguf and safetensors, so each loads only when its format is asked for
_EXPORTERS = {"gguf": (".gguf", "export_gguf", False), "vllm": (".compressed", "export_compressed", True),
              "bitsandbytes": (".bitsandbytes", "export_bnb", True)}


def check_plain(model) -> None:
    """TypeError/ValueError unless ``model`` is an nn.Module without unmerged adapters."""
    from ..models import check_model

    check_model(model)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model has LoRA adapters that are not merged; merge them first (effnb.merge(model)) "
                         "and export the merged model")


def float_state(model, skip_prefixes) -> dict:
    """The state dict without the quantized layers' buffers, non-persistent buffers and a tied output head."""
    state = model.state_dict()
    out = {}
    for k, v in state.items():
        if any(k.startswith(p + ".") for p in skip_prefixes) or k.endswith("rotary_emb.inv_freq"):
            continue
        out[k] = v.detach()
    emb, head = out.get("model.embed_tokens.weight"), out.get("lm_head.weight")
    if emb is not None and head is not None and head.data_ptr() == emb.data_ptr():
        del out["lm_head.weight"]  # tied: readers tie it again from the config
    return {k: v.cpu() for k, v in out.items()}


# ------------------------------------------------------------------------------- atomic writes


def temp_beside(path: str, is_dir: bool) -> str:
    """A new temporary file or folder in ``path``'s folder (same file system: the rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.effnb-tmp-"
    if is_dir:
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
    return tmp


def discard(tmp: str) -> None:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.unlink(tmp)


def _looks_exported(path: str) -> bool:
    p = Path(path)
    if not p.is_dir():
        return True
    names = {c.name for c in p.iterdir()}
    return not names or "config.json" in names


def check_target(path: str, folder: bool) -> None:
    """ValueError, before any work, when an existing ``path`` is the wrong kind or a folder not to replace."""
    if not os.path.lexists(path):
        return
    is_dir = os.path.isdir(path) and not os.path.islink(path)
    if folder and not is_dir:
        raise ValueError(f"{path!r} exists and is not a folder; give a folder path for this format")
    if not folder and is_dir:
        raise ValueError(f"{path!r} is a folder; give a file path ending in .gguf")
    if is_dir and not _looks_exported(path):
        raise ValueError(f"{path!r} is a folder that does not look like a model export (no config.json); "
                         "not replacing it: give another path")


def move_into_place(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``; an existing target (``overwrite``) is replaced, never left half-written."""
    check_target(path, folder=os.path.isdir(tmp))
    if os.path.isdir(tmp):
        swap_in(Path(tmp), Path(path))  # the same folder swap as effnb.save
        return
    os.replace(tmp, path)  # a single file: one rename replaces it atomically


def write_then_rename(path: str, is_dir: bool, write) -> None:
    """``write(tmp)`` (it writes and validates) on a new temporary file or folder beside ``path``, then rename
    it to ``path``; on any failure, Ctrl-C included, the temporary goes and ``path`` is left as it was."""
    tmp = temp_beside(path, is_dir)
    try:
        write(tmp)
        move_into_place(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def size_of(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

