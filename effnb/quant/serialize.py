"""``effnb.save`` / ``effnb.load``: effnb's own checkpoints (safetensors only, never pickle).

    effnb.save(qmodel, "smol-nf4")          # directory: model.safetensors + effnb.json (+ config, tokenizer)
    model = effnb.load("smol-nf4")          # identical logits

(Checkpoints other programs read are ``effnb.export``'s: ``effnb.exporters``.)

Checkpoints are data, never code, validated before any kernel reads them, and saved atomically
(docs/reliability.md): effnb.json's schema and format version, a SHA-256 of every tensor (since
version 2; version 1 loads with a warning), each quantized layer's buffers against its sizes and
every other tensor against the model; a bad file is one ValueError (FileNotFoundError if missing)
naming the file, the tensor and the fault. The architecture is rebuilt with
``trust_remote_code=False`` (``auto_map`` is refused); for other models pass
``load(path, model=skeleton)``, which is changed only once every check passed. A save writes a
hidden folder beside the target, fsyncs it and swaps it in by two renames; the next save or load
repairs what a kill left (restores the backup if the target is gone, removes leftovers).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import warnings
from pathlib import Path

from .checkpoint import (
    FORMAT,
    VERSION,
    build_skeleton,
    check_fits,
    check_layers,
    digest,
    load_tokenizer,
    read_meta,
    read_tensors,
)

log = logging.getLogger(__name__)

_WRITTEN = {"model.safetensors", "effnb.json", "config.json", "tokenizer"}  # what save puts in a checkpoint
_TMP, _OLD = ".effnb-tmp-", ".effnb-old-"  # .<name>.effnb-tmp-<pid>-<hex>: beside the target, never in it
_LOAD_BACKENDS = ("auto", "reference", "cpu", "cuda")  # what a QuantLinear can run on (kernels/linear.py)
_save_hook = None  # tests only: called with each stage's name during a save (the kill tests)


def quant_layers(model) -> dict:
    """effnb's quantized layers (``QuantLinear``) by module name."""
    from ..kernels.linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _stage(name: str) -> None:
    if _save_hook is not None:
        _save_hook(name)


# ------------------------------------------------------------------------------------------ save


def save(model, path) -> Path:
    """Write ``model`` (quantized or not) to directory ``path`` as safetensors + JSON; returns the path.

    Atomic: ``path`` holds either the previous checkpoint or the new one, whatever happens (see above).
    """
    from ..models import check_model

    check_model(model)
    path = Path(path)
    _recover(path)
    _check_target(path)
    state, tied = _state(model)
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__, "tied": tied,
            "layers": {n: m.config_dict() for n, m in quant_layers(model).items()},
            "checksums": {k: digest(t) for k, t in state.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    _stage("begin")
    tmp = path.parent / f".{path.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _stage("tmp-created")
        _write(tmp, model, state, meta)
        swap_in(tmp, path)
    finally:
        if tmp.exists():  # the save failed before the swap: the target was never touched
            shutil.rmtree(tmp)
    return path


def _check_target(path: Path) -> None:
    """Refuse to replace anything but an effnb checkpoint (a user's folder is never deleted)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder: effnb.save writes a checkpoint folder; choose another path")
    names = set(os.listdir(path))
    if names and "effnb.json" not in names:
        raise ValueError(f"{path} exists and is not an effnb checkpoint (no effnb.json): refusing to replace it; "
                         "choose a new folder")
    if names - _WRITTEN:
        raise ValueError(f"{path} holds files effnb.save did not write ({', '.join(sorted(names - _WRITTEN)[:5])}): "
                         "refusing to replace them; move them or choose a new folder")


def _state(model) -> tuple[dict, dict]:
    import torch

    state, seen, tied = {}, {}, {}
    for k, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in seen:  # tied weights: stored once, re-tied on load
            tied[k] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = k
        state[k] = t.detach().contiguous().cpu()
    return state, tied


def _write(tmp: Path, model, state: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    from ..models import TOKENIZER_ATTR, find_attr

    save_file(state, str(tmp / "model.safetensors"))
    _stage("tensors-written")
    (tmp / "effnb.json").write_text(json.dumps(meta, indent=1))
    _stage("meta-written")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        (tmp / "config.json").write_text(config.to_json_string())
    _stage("config-written")
    tok = find_attr(model, TOKENIZER_ATTR)  # the attached one only: saving never goes looking on disk
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(tmp / "tokenizer"))
    _stage("tokenizer-written")
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))
    _stage("synced")


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` by rename: an existing ``path`` is moved aside first and
    removed only after the new one is in place, so a kill at any moment leaves one complete folder there
    (a backup left by a kill is put back by the next ``save``/``load`` of ``path``). Used by exports too."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(path, old)
        _stage("old-moved")
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _stage("new-moved")
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old)
        _stage("old-removed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        pass
    return True


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Temporary (``_TMP``) or backup (``_OLD``) folders of ``path`` whose writer is gone."""
    prefix = f".{path.name}{kind}"
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is saving right now
        found.append(entry)
    return sorted(found, key=lambda e: e.stat().st_mtime)


def _recover(path: Path) -> None:
    """Finish what a killed save left: restore the backup if the target is gone, drop the rest."""
    backups = _leftovers(path, _OLD)
    if backups and not path.exists():
        os.rename(backups.pop(), path)
        msg = f"{path}: restored the previous checkpoint left by an interrupted effnb.save"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    for left in backups + _leftovers(path, _TMP):
        log.info("removing %s, left by an interrupted effnb.save", left)
        shutil.rmtree(left)


# ------------------------------------------------------------------------------------------ load


def load(path, model=None, backend: str = "auto"):
    """Rebuild a model saved by ``save``; ``model``: an unquantized skeleton for non-transformers models."""
    from ..kernels.linear import QuantLinear

    if backend not in _LOAD_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choices: {', '.join(_LOAD_BACKENDS)}")
    path = Path(path)
    _recover(path)
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"{path} is a file, not a checkpoint folder (effnb.save writes a folder)")
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    meta = read_meta(path)
    state = read_tensors(path, meta)
    check_layers(path, meta, state)
    if model is None:
        model = build_skeleton(path, meta)
    else:
        from ..models import check_model

        check_model(model, loaded=False)  # a skeleton built on the meta device is what load fills
    check_fits(path, model, meta, state)
    tok = load_tokenizer(path)
    for lname, cfg in meta["layers"].items():  # everything is checked: from here on the model changes
        parent, _, child = lname.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantLinear.empty_like_config(cfg, state, lname + ".", backend=backend))
    for k, src in meta["tied"].items():
        state[k] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in meta["tied"]] or [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights") and meta["tied"]:
        model.tie_weights()
    from ..models import NAME_ATTR, attach_tokenizer

    if tok is not None:
        attach_tokenizer(model, tok)
    setattr(model, NAME_ATTR, path.name)
    return model.eval()

