"""Checks ``effnb.load`` runs on a checkpoint before any of it is used (see serialize.py and
docs/reliability.md): every failure is one ValueError (FileNotFoundError for a missing file) naming
the file, the tensor or layer, and what is wrong."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "effnb.quantized"
VERSION = 2  # 2: a SHA-256 of every tensor in "checksums"; version 1 (none) still loads, with a warning
_READABLE = (1, 2)
_MAX_JSON = 64 << 20  # effnb.json / config.json larger than this are not effnb's


def digest(t) -> str:
    """SHA-256 of a tensor's bytes, as safetensors stores them."""
    import torch

    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _read_json(f: Path) -> dict:
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (effnb.save writes it)")
    size = f.stat().st_size
    if size > _MAX_JSON:
        raise ValueError(f"{f}: {size} bytes, more than the {_MAX_JSON} a checkpoint's JSON may have")
    try:
        data = json.loads(f.read_bytes())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{f}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def read_meta(path: Path) -> dict:
    f = path / "effnb.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing, so {path} is not an effnb checkpoint (effnb.save writes one)")
    meta = _read_json(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r} is not {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in _READABLE:
        newer = isinstance(version, int) and version > VERSION
        raise ValueError(f"{f}: format version {version!r} " + ("is newer than this effnb reads" if newer else "is unknown")
                         + f" (readable: {', '.join(map(str, _READABLE))})" + ("; upgrade effnb" if newer else ""))
    if not isinstance(meta.get("class"), str) or not meta["class"].isidentifier():
        raise ValueError(f"{f}: 'class' must be a Python class name, got {meta.get('class')!r}")
    meta.setdefault("tied", {})
    _check_mapping(f, "tied", meta["tied"], str)
    _check_mapping(f, "layers", meta.get("layers"), dict)
    if version >= 2:
        _check_mapping(f, "checksums", meta.get("checksums"), str)
    for lname, cfg in meta["layers"].items():
        if not lname or any(not part for part in lname.split(".")):
            raise ValueError(f"{f}: layer name {lname!r} is not a module path")
        buffers = cfg.get("buffers")
        if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
            raise ValueError(f"{f}: layer {lname!r}: 'buffers' must be a list of tensor names, got {buffers!r}")
        if not isinstance(cfg.get("bias"), bool):
            raise ValueError(f"{f}: layer {lname!r}: 'bias' must be true or false, got {cfg.get('bias')!r}")
        if not isinstance(cfg.get("method"), (str, type(None))):
            raise ValueError(f"{f}: layer {lname!r}: 'method' must be a string, got {cfg.get('method')!r}")
    return meta


def _check_mapping(f: Path, key: str, value, kind: type) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, kind) for k, v in value.items()):
        raise ValueError(f"{f}: {key!r} must map names to {kind.__name__} values, got {type(value).__name__}")


def read_tensors(path: Path, meta: dict) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (effnb.save writes it)")
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{f}: not a readable safetensors file ({_first_line(exc)})") from None
    if meta["version"] < 2:
        msg = (f"{path}: checkpoint format version {meta['version']} has no checksums, so damaged tensors cannot be "
               "detected; save it again with effnb.save to add them")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
        return state
    sums = meta["checksums"]
    for name in sorted(set(sums) ^ set(state)):
        where = "has no checksum in effnb.json" if name in state else "is listed in effnb.json but missing"
        raise ValueError(f"{f}: tensor {name!r} {where}")
    for name, t in state.items():
        if digest(t) != sums[name]:
            raise ValueError(f"{f}: tensor {name!r} fails its SHA-256 check (changed or damaged since it was saved)")
    return state


def check_layers(path: Path, meta: dict, state: dict) -> None:
    """Each quantized layer's tensors against its sizes in effnb.json (linear.check_layer)."""
    from ..kernels.formats import FORMATS
    from ..kernels.linear import check_layer

    for lname, cfg in meta["layers"].items():
        where, prefix = f"{path}: layer {lname!r}", lname + "."
        fmt = cfg.get("fmt")
        if fmt not in FORMATS:
            raise ValueError(f"{where}: unknown format {fmt!r} in effnb.json; supported: {', '.join(FORMATS)}")
        allowed = FORMATS[fmt].buffers
        for name in cfg["buffers"]:
            if name not in allowed:
                raise ValueError(f"{where}: effnb.json lists buffer {name!r}, which format {fmt!r} does not have")
            if prefix + name not in state:
                raise ValueError(f"{where}: tensor {prefix + name!r} listed in effnb.json is missing from model.safetensors")
        stray = [prefix + n for n in allowed if n not in cfg["buffers"] and prefix + n in state]
        stray += [prefix + "bias"] if not cfg["bias"] and prefix + "bias" in state else []
        if stray:
            raise ValueError(f"{where}: tensor {stray[0]!r} in model.safetensors is not listed in effnb.json")
        if cfg["bias"] and prefix + "bias" not in state:
            raise ValueError(f"{where}: tensor {prefix + 'bias'!r} listed in effnb.json is missing from model.safetensors")
        tensors = {n: state[prefix + n] for n in cfg["buffers"]}
        check_layer(cfg.get("in_features"), cfg.get("out_features"), fmt, cfg.get("group_size"), tensors,
                    state.get(prefix + "bias") if cfg["bias"] else None, where=where, prefix=prefix)


def check_fits(path: Path, model, meta: dict, state: dict) -> None:
    """Every tensor has its place in ``model`` with the right shape, before the model is changed."""
    from torch import nn

    from ..kernels.linear import QuantLinear

    f = path / "model.safetensors"
    expected = {k: t for k, t in model.state_dict().items() if hasattr(t, "shape")}
    for lname, cfg in meta["layers"].items():
        parent, _, child = lname.rpartition(".")
        try:
            old = (model.get_submodule(parent) if parent else model)._modules.get(child)
        except AttributeError:
            old = None
        if not isinstance(old, (nn.Linear, QuantLinear)) or (old.in_features, old.out_features) != (
                cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"{path}: layer {lname!r} in effnb.json is not a Linear layer of {cfg['in_features']} -> "
                             f"{cfg['out_features']} features in the model ({type(model).__name__})")
        prefix = lname + "."
        expected = {k: t for k, t in expected.items() if not (k.startswith(prefix) and "." not in k[len(prefix):])}
        expected.update({prefix + n: None for n in cfg["buffers"] + (["bias"] if cfg["bias"] else [])})
    for k, src in meta["tied"].items():
        if k in state or src not in state or k not in expected:
            raise ValueError(f"{path / 'effnb.json'}: tied tensor {k!r} -> {src!r} does not fit the checkpoint")
    for k in sorted(set(state) - set(expected)):
        raise ValueError(f"{f}: tensor {k!r} has no place in the model ({type(model).__name__})")
    for k in sorted(set(expected) - set(state) - set(meta["tied"])):
        raise ValueError(f"{f}: the model's tensor {k!r} is missing")
    for k, want in expected.items():
        have = state.get(k, state.get(meta["tied"].get(k, ""), None))
        if want is None or have is None:
            continue
        if tuple(have.shape) != tuple(want.shape) or have.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(f"{f}: tensor {k!r} is {str(have.dtype).replace('torch.', '')} {list(have.shape)}; the "
                             f"model needs {str(want.dtype).replace('torch.', '')} {list(want.shape)}")


_CUSTOM_CODE = "needs custom code ({}), which effnb never runs; load the model yourself and pass it as load(path, model=...)"


def build_skeleton(path: Path, meta: dict):
    import transformers

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path} has no config.json: pass the unquantized architecture as load(path, model=...)")
    if "auto_map" in _read_json(cfg_file):
        raise ValueError(f"{cfg_file}: the model " + _CUSTOM_CODE.format("auto_map in config.json"))
    cls = getattr(transformers, meta["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{path / 'effnb.json'}: transformers has no model class {meta['class']!r}; "
                         "pass the architecture as load(path, model=...)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
        raise ValueError(f"{cfg_file}: transformers cannot read it ({_first_line(exc)})") from None
    # Parameters on the "meta" device (no memory, no random init: SmolLM2's would be 538 MB of fp32 that
    # the checkpoint replaces at once); buffers stay real, since non-persistent ones such as rotary
    # frequencies are not in the checkpoint and must be computed by the constructor. accelerate's helper
    # does exactly this and comes with peft.
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return cls(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{cfg_file}: cannot build {meta['class']} from it ({_first_line(exc)})") from None


def load_tokenizer(path: Path):
    tok_dir = path / "tokenizer"
    if not tok_dir.is_dir():
        return None
    tok_cfg = tok_dir / "tokenizer_config.json"
    if tok_cfg.exists() and "auto_map" in _read_json(tok_cfg):
        raise ValueError(f"{tok_cfg}: the tokenizer " + _CUSTOM_CODE.format("auto_map in tokenizer_config.json"))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the Rust tokenizers library raises plain Exception on a bad file
        raise ValueError(f"{tok_dir}: cannot load the tokenizer ({_first_line(exc)})") from None
