"""Peer variants built by the peers' own code: bitsandbytes NF4/FP4/int8 and torch dynamic int8."""

from __future__ import annotations

import copy

import torch


def bnb_model(model, kind: str, blocksize: int = 64, keep=("lm_head",)):
    """Copy of ``model`` with every Linear but ``keep`` replaced by bitsandbytes' own quantized layer."""
    import bitsandbytes as bnb

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name.split(".")[-1] in keep:
            continue
        if kind in ("nf4", "fp4"):
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, quant_type=kind, device="meta")
            new.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type=kind,
                                           blocksize=blocksize).to("cpu")
        else:
            new = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      has_fp16_weights=False, threshold=6.0 if kind == "llm.int8" else 0.0, device="meta")
            new.weight = bnb.nn.Int8Params(mod.weight.data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        if mod.bias is not None:
            new.bias = torch.nn.Parameter(mod.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child, new)
    return m


def torch_dynamic_int8(model):
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
