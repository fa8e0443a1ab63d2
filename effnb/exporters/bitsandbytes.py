"""bitsandbytes export: a transformers checkpoint whose quantized layers bitsandbytes loads.

    effnb.export(q, "bitsandbytes", "smol-bnb")
    AutoModelForCausalLM.from_pretrained("smol-bnb")   # transformers reads it as a bnb 4-bit / 8-bit checkpoint

nf4/fp4 layers become ``Linear4bit`` with effnb's bytes unchanged (bitsandbytes' layout is effnb's); int8
layers quantized per channel become ``Linear8bitLt`` (same codes, bitsandbytes' row statistics). Which
effnb formats have a bitsandbytes equivalent is the Format table's ``bnb`` field; what is written for each
is the table below.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..quant.serialize import quant_layers
from .api import ExportResult, size_of, write_then_rename


def _int8_layer(bnb, lname: str, m):
    if m.group_size != m.in_features:
        raise ValueError(f"layer {lname!r} uses int8 groups of {m.group_size}; bitsandbytes int8 is per channel "
                         "(quantize with group_size=0 to export)")
    new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False,
                              threshold=0.0, device="meta")
    scb = (m.scales.float().reshape(-1) * 127.0)
    new.weight = bnb.nn.Int8Params(m.qweight.clone(), requires_grad=False, has_fp16_weights=False,
                                   CB=m.qweight.clone(), SCB=scb)
    return new


def _4bit_layer(bnb, lname: str, m):
    import torch

    from ..kernels.bnb import quant_state

    dtype = torch.float32
    tensors = {n: getattr(m, n) for n in ("qweight", "absmax", "qabsmax", "absmax2", "code2", "offset")}
    new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=dtype,
                            compress_statistics=m.double_quant, quant_type=m.fmt, device="meta")
    qs = quant_state(tensors, m.fmt, m.group_size, (m.out_features, m.in_features), dtype)
    new.weight = bnb.nn.Params4bit(m.qweight.reshape(-1, 1), requires_grad=False, quant_state=qs,
                                   blocksize=m.group_size, compress_statistics=m.double_quant,
                                   quant_type=m.fmt, bnb_quantized=True, module=new)
    return new


def _int8_config(first, skip):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip or None)


def _4bit_config(first, skip):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=first.fmt,
                              bnb_4bit_use_double_quant=first.double_quant, bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=skip or None)


# bitsandbytes' kind (the Format table's ``bnb``) -> (layer writer, transformers' quantization_config)
_WRITERS = {"int8": (_int8_layer, _int8_config), "nf4": (_4bit_layer, _4bit_config),
            "fp4": (_4bit_layer, _4bit_config)}


def _bnb_kind(layers: dict) -> str:
    """The one bitsandbytes kind every layer has; ValueError when the formats differ or have none."""
    from ..kernels.formats import get_format

    fmts = sorted({m.fmt for m in layers.values()})
    kind = get_format(fmts[0]).bnb if len(fmts) == 1 else None
    if kind not in _WRITERS:
        raise ValueError(f"bitsandbytes stores nf4, fp4 or per-channel int8; this model has {fmts}")
    return kind


def export_bitsandbytes(model, path) -> Path:
    """Write a transformers checkpoint with bitsandbytes 4-bit (nf4/fp4) or 8-bit (per-channel int8) layers.

    The nf4/fp4 bytes are effnb's own, unchanged; transformers loads the result with
    ``from_pretrained(path)`` (bitsandbytes installed).
    """
    import copy

    import torch

    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no effnb quantized layers to export; quantize it with nf4, fp4 or int8 first")
    write_layer, make_config = _WRITERS[_bnb_kind(layers)]
    import bitsandbytes as bnb
    out = copy.deepcopy(model)
    for lname, m in quant_layers(out).items():
        new = write_layer(bnb, lname, m)
        if m.bias is not None:
            new.bias = torch.nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        parent, _, child = lname.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    skip = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and n not in layers})
    out.config.quantization_config = make_config(next(iter(layers.values())), skip)
    out.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def export_bnb(model, cfg) -> ExportResult:
    """``export_bitsandbytes`` written to a temporary folder, checked, and renamed into place."""
    from ..models import find_tokenizer

    def write(tmp: str) -> None:
        export_bitsandbytes(model, tmp)
        if not (Path(tmp) / "config.json").is_file():
            raise ValueError(f"bitsandbytes export wrote no config.json into {tmp!r}")
        tok = find_tokenizer(model) if cfg.tokenizer else None
        if tok is not None:
            tok.save_pretrained(tmp)

    write_then_rename(cfg.path, True, write)
    types = Counter(m.fmt for m in quant_layers(model).values())
    return ExportResult("bitsandbytes", cfg.path, types, size_of(cfg.path))
