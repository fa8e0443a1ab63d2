"""compressed-tensors export (``pack-quantized``): the weight-only int4/int8 format vLLM and transformers load.

Per quantized Linear ``p`` (compressed-tensors' spec for ``pack-quantized`` weights):

  p.weight_packed  int32 [N, K * bits / 32]  codes + 2^(bits-1) (unsigned), element i of a row at bits
                                             ``bits * (i % (32 / bits))`` of word ``i // (32 / bits)``
  p.weight_scale   float [N, K / g]          (strategy "group") or [N, 1] (strategy "channel")
  p.weight_shape   int64 [2]                 [N, K]
                                             w = (code - 2^(bits-1)) * scale   (symmetric: zero point 0)

effnb's symmetric int4 codes are already "signed code + 8" and packed two per byte, column 2j in the low
nibble: read little-endian, four such bytes are exactly one int32 word of this layout, so effnb's bytes go
into the file unchanged. int8 codes get + 128. Scales are effnb's fp16 values, written in the model's float
dtype (fp32 or fp16: both hold them exactly). config.json carries ``quantization_config``.

effnb's asymmetric int4 keeps a fractional zero per group; the format's zero points are integers, so it is
refused (quantize with ``symmetric=True``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..quant.serialize import quant_layers
from .api import ExportResult, float_state, size_of, write_then_rename

CHOICES = ("quantize(method='int4', symmetric=True, group_size=32/64/128/256) -> 4-bit pack-quantized; "
           "quantize(method='int8', group_size=32/64/128/256 or 0 = per channel) -> 8-bit; gptq with "
           "symmetric=True (4 or 8 bits)")


def _int4_codes(qweight):
    return qweight  # uint8 [N, K/2], already the unsigned nibbles in order


def _int8_codes(qweight):
    import torch

    return qweight.view(torch.uint8) ^ 0x80  # int8 code + 128


# effnb formats with a pack-quantized layout -> their codes as the layout's unsigned bytes
_CODES = {"int4": _int4_codes, "int8": _int8_codes}


def scheme(layer, groups: frozenset = frozenset()) -> tuple[int, str, int | None]:
    """(bits, strategy, group_size) of a layer; ValueError naming the choices for anything else.

    A layer whose one group spans its row is "channel", unless ``groups`` (the group sizes of the model's
    other layers) holds its size: then it stays in that group scheme, so one config group covers the model.
    """
    from ..kernels.formats import get_format

    zeros = getattr(layer, "zeros", None) is not None  # the format's zero points are integers: none stored
    if layer.fmt in _CODES and not zeros:
        bits = get_format(layer.fmt).bits
        if layer.group_size == layer.in_features and layer.group_size not in groups:
            return bits, "channel", None
        return bits, "group", layer.group_size
    why = f"asymmetric {layer.fmt} (fractional zero points)" if layer.fmt in _CODES else layer.fmt
    raise ValueError(f"compressed-tensors (vllm) has no pack-quantized layout for {why} (method {layer.method}); "
                     f"choices: {CHOICES}")


def group_sizes(layers: dict) -> frozenset:
    """Group sizes of the layers quantized in groups shorter than their rows."""
    return frozenset(m.group_size for m in layers.values() if m.group_size < m.in_features)


def packed(layer):
    """int32 [N, K * bits / 32]: effnb's codes in the pack-quantized layout."""
    import torch

    raw = _CODES[layer.fmt](layer.qweight.detach().cpu().contiguous())
    return raw.view(torch.int32).clone()


def _float_dtype(model):
    import torch

    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dt if dt in (torch.float32, torch.float16) else torch.float16


def _weights(args: tuple[int, str, int | None]) -> dict:
    bits, strategy, group = args
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def quantization_config(model, layers: dict) -> dict:
    """``quantization_config`` for config.json: one config group per scheme, float Linears ignored."""
    from torch import nn

    schemes: dict = {}
    for name, m in layers.items():
        schemes.setdefault(scheme(m, group_sizes(layers)), []).append(name)
    floats = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    groups = {}
    for i, (args, names) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": _weights(args), "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": floats, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}}


def tensors(model, layers: dict) -> dict:
    import torch

    dtype = _float_dtype(model)
    out = {k: v.contiguous() for k, v in float_state(model, layers).items()}
    for name, m in layers.items():
        scheme(m)
        out[f"{name}.weight_packed"] = packed(m)
        out[f"{name}.weight_scale"] = m.scales.detach().cpu().to(dtype).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().cpu().contiguous()
    return out


def _write(folder: Path, model, state: dict, qconfig: dict, with_tokenizer: bool) -> None:
    from safetensors.torch import save_file

    from ..models import find_tokenizer

    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok = find_tokenizer(model) if with_tokenizer else None
    if tok is not None:
        tok.save_pretrained(str(folder))


def validate(folder: Path, expected: dict) -> None:
    """Read back: every tensor's name, dtype, shape and bytes as meant, and config.json's quantization_config."""
    import torch
    from safetensors.torch import load_file

    back = load_file(str(folder / "model.safetensors"))
    if set(back) != set(expected):
        raise ValueError(f"compressed-tensors validation failed in {folder}: tensors {sorted(set(back) ^ set(expected))}")
    for k, v in expected.items():
        if back[k].dtype != v.dtype or back[k].shape != v.shape or not torch.equal(back[k], v):
            raise ValueError(f"compressed-tensors validation failed in {folder}: {k} is {back[k].dtype} "
                             f"{list(back[k].shape)}, expected {v.dtype} {list(v.shape)} with the same values")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config", {}).get("format") != "pack-quantized":
        raise ValueError(f"compressed-tensors validation failed in {folder}: config.json has no pack-quantized "
                         "quantization_config")


def _label(args: tuple[int, str, int | None]) -> str:
    bits, strategy, group = args
    return f"int{bits} per channel" if strategy == "channel" else f"int{bits} group {group}"


def export_compressed(model, cfg) -> ExportResult:
    layers = quant_layers(model)
    if not layers:
        raise ValueError(f"the model has no effnb quantized layers to export as compressed-tensors; {CHOICES}")
    qconfig = quantization_config(model, layers)
    state = tensors(model, layers)
    def write(tmp: str) -> None:
        _write(Path(tmp), model, state, qconfig, cfg.tokenizer)
        validate(Path(tmp), state)

    write_then_rename(cfg.path, True, write)
    sizes = group_sizes(layers)
    types = Counter(_label(scheme(m, sizes)) for m in layers.values())
    return ExportResult("vllm", cfg.path, types, size_of(cfg.path),
                        details={"quantization_config": qconfig})
