"""``effnb.save`` / ``effnb.load`` (safetensors only, never pickle) and a bitsandbytes export.

    effnb.save(qmodel, "smol-nf4")          # directory: model.safetensors + effnb.json (+ config, tokenizer)
    model = effnb.load("smol-nf4")          # identical logits
    effnb.quant.serialize.export_bitsandbytes(qmodel, "smol-bnb")
    AutoModelForCausalLM.from_pretrained("smol-bnb")   # transformers reads it as a bnb 4-bit checkpoint

The architecture is rebuilt from the transformers config (no code is unpickled); for a plain
``nn.Module`` pass a freshly built one as ``load(path, model=skeleton)``.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "effnb.quantized"
VERSION = 1


def _quant_layers(model) -> dict:
    from .linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save(model, path) -> Path:
    """Write ``model`` (quantized or not) to directory ``path`` as safetensors + JSON; returns the path."""
    import torch
    from safetensors.torch import save_file

    from ..models import _TOKENIZER_ATTR, _find_attr, check_model

    check_model(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
    save_file(state, str(path / "model.safetensors"))
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__, "tied": tied,
            "layers": {n: m.config_dict() for n, m in _quant_layers(model).items()}}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        (path / "config.json").write_text(config.to_json_string())
    (path / "effnb.json").write_text(json.dumps(meta, indent=1))
    tok = _find_attr(model, _TOKENIZER_ATTR)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(path / "tokenizer"))
    return path


def load(path, model=None, backend: str = "auto"):
    """Rebuild a model saved by ``save``; ``model``: an unquantized skeleton for non-transformers models."""
    from safetensors.torch import load_file

    from .linear import QuantLinear

    path = Path(path)
    meta_file = path / "effnb.json"
    if not meta_file.exists():
        raise ValueError(f"{path} is not an effnb checkpoint (no effnb.json); effnb.save writes one")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    state = load_file(str(path / "model.safetensors"))
    if model is None:
        model = _skeleton(path, meta)
    for lname, cfg in meta["layers"].items():
        parent, _, child = lname.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantLinear.empty_like_config(cfg, state, lname + ".", backend=backend))
    for k, src in meta.get("tied", {}).items():
        state[k] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in meta.get("tied", {})]
    if not missing:
        missing = [n for n, p in model.named_parameters() if p.is_meta]  # never in the checkpoint
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights") and meta.get("tied"):
        model.tie_weights()
    tok_dir = path / "tokenizer"
    if tok_dir.exists():
        from transformers import AutoTokenizer

        from ..models import attach_tokenizer

        attach_tokenizer(model, AutoTokenizer.from_pretrained(str(tok_dir)))
    model._effnb_name = path.name
    return model.eval()


def _skeleton(path: Path, meta: dict):
    import transformers

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path} has no config.json: pass the unquantized architecture as load(path, model=...)")
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = getattr(transformers, meta["class"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {meta['class']!r}; pass load(path, model=...)")
    # Parameters on the "meta" device (no memory, no random init: SmolLM2's would be 538 MB of fp32 that
    # the checkpoint replaces at once); buffers stay real, since non-persistent ones such as rotary
    # frequencies are not in the checkpoint and must be computed by the constructor. accelerate's helper
    # does exactly this and comes with peft.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(config)


def export_bitsandbytes(model, path) -> Path:
    """Write a transformers checkpoint with bitsandbytes 4-bit (nf4/fp4) or 8-bit (per-channel int8) layers.

    The nf4/fp4 bytes are effnb's own, unchanged; transformers loads the result with
    ``from_pretrained(path)`` (bitsandbytes installed).
    """
    import copy

    import torch
    from transformers import BitsAndBytesConfig

    from .bnb import (
        from_bnb_module,  # noqa: F401 - same module family; import checks bitsandbytes
        quant_state,
    )

    layers = _quant_layers(model)
    if not layers:
        raise ValueError("model has no effnb quantized layers to export; quantize it with nf4, fp4 or int8 first")
    fmts = {m.fmt for m in layers.values()}
    if len(fmts) != 1 or fmts.pop() not in ("nf4", "fp4", "int8"):
        raise ValueError(f"bitsandbytes stores nf4, fp4 or per-channel int8; this model has {sorted({m.fmt for m in layers.values()})}")
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    first = next(iter(layers.values()))
    for lname, m in _quant_layers(out).items():
        dtype = torch.float32
        if m.fmt == "int8":
            if m.group_size != m.in_features:
                raise ValueError(f"layer {lname!r} uses int8 groups of {m.group_size}; bitsandbytes int8 is per channel "
                                 "(quantize with group_size=0 to export)")
            new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False,
                                      threshold=0.0, device="meta")
            scb = (m.scales.float().reshape(-1) * 127.0)
            new.weight = bnb.nn.Int8Params(m.qweight.clone(), requires_grad=False, has_fp16_weights=False,
                                           CB=m.qweight.clone(), SCB=scb)
        else:
            tensors = {n: getattr(m, n) for n in ("qweight", "absmax", "qabsmax", "absmax2", "code2", "offset")}
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=dtype,
                                    compress_statistics=m.double_quant, quant_type=m.fmt, device="meta")
            qs = quant_state(tensors, m.fmt, m.group_size, (m.out_features, m.in_features), dtype)
            new.weight = bnb.nn.Params4bit(m.qweight.reshape(-1, 1), requires_grad=False, quant_state=qs,
                                           blocksize=m.group_size, compress_statistics=m.double_quant,
                                           quant_type=m.fmt, bnb_quantized=True, module=new)
        if m.bias is not None:
            new.bias = torch.nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        parent, _, child = lname.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    skip = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and n not in layers})
    if first.fmt == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip or None)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=first.fmt,
                                bnb_4bit_use_double_quant=first.double_quant, bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=skip or None)
    out.config.quantization_config = qc
    out.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
