"""Which layers get adapters: presets per architecture, user names, and what is available.

A preset names module suffixes per model family (``config.model_type``); ``resolve`` turns a preset
or a user list into exact module names (and, for fused MoE experts, parameter names), so PEFT
receives an explicit list and the report can say what was adapted. Unknown architectures fall back
to recognising common projection names, and "all" to every Linear layer but the output head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LLAMA = {
    "attn": ["self_attn.q_proj", "self_attn.v_proj"],
    "attn-all": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
_MIXTRAL = {  # attention as Llama; experts are fused 3-D parameters in transformers 5 (PEFT target_parameters)
    "attn": _LLAMA["attn"], "attn-all": _LLAMA["attn-all"],
    "mlp": [], "mlp_params": ["experts.gate_up_proj", "experts.down_proj"],
    # transformers < 5 kept one Linear per expert
    "mlp_legacy": ["block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w2", "block_sparse_moe.experts.*.w3"],
}
_GPT2 = {"attn": ["attn.c_attn"], "attn-all": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]}
_BERT = {
    "attn": ["attention.self.query", "attention.self.value"],
    "attn-all": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    "mlp": ["intermediate.dense", "layer.*.output.dense"],
}
_DISTILBERT = {"attn": ["attention.q_lin", "attention.v_lin"],
               "attn-all": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"],
               "mlp": ["ffn.lin1", "ffn.lin2"]}
_PHI3 = {"attn": ["self_attn.qkv_proj"], "attn-all": ["self_attn.qkv_proj", "self_attn.o_proj"],
         "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]}
_FALCON = {"attn": ["self_attention.query_key_value"],
           "attn-all": ["self_attention.query_key_value", "self_attention.dense"],
           "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}

#: model_type -> preset -> module-name suffixes (or fnmatch patterns)
PRESET_TABLE: dict[str, dict[str, list[str]]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3",
                           "granite", "cohere", "starcoder2_llama")},
    "mixtral": _MIXTRAL, "qwen2_moe": _MIXTRAL, "qwen3_moe": _MIXTRAL,
    "gpt2": _GPT2,
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": _DISTILBERT, "phi3": _PHI3, "falcon": _FALCON, "gpt_neox": _FALCON,
}

# names recognised when the architecture is not in the table (leaf names)
_GENERIC_ATTN_QV = ("q_proj", "v_proj", "query", "value", "q_lin", "v_lin", "c_attn", "qkv_proj", "Wqkv",
                    "query_key_value")
_GENERIC_ATTN_ALL = (*_GENERIC_ATTN_QV, "k_proj", "o_proj", "key", "out_proj", "k_lin", "out_lin")
_GENERIC_MLP = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "lin1", "lin2",
                "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj")


@dataclass
class Targets:
    """What ``resolve`` found: exact module names, fused expert parameters, how it was chosen."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)
    how: str = ""
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights as [in, out]


def is_adaptable(m) -> bool:
    """A layer PEFT can carry LoRA on: nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt derive from
    it), transformers' Conv1D, or effnb's QuantLinear (recognised by what it holds: no import of the
    quantizer)."""
    import torch

    from ..torch_utils import is_quantized_linear

    if isinstance(m, torch.nn.Linear) or is_quantized_linear(m):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # plain torch models
        return False
    return isinstance(m, Conv1D)


def adaptable_modules(model) -> dict[str, object]:
    """{module name: module} of the layers an adapter can sit on (output head and embeddings excluded)."""
    from ..torch_utils import output_head

    head = output_head(model)
    out = {}
    for name, m in model.named_modules():
        if ".lora_" in name or ".base_layer" in name or m is head:
            continue
        # a layer that already carries an adapter (a PEFT LoRA layer) can take another one
        inner = m.base_layer if hasattr(m, "lora_A") and hasattr(m, "base_layer") else m
        if is_adaptable(inner) and inner is not head:
            out[name] = m
    return out


def fused_expert_parameters(model) -> list[str]:
    """Names of 3-D expert parameters (Mixtral-style fused experts, effnb MoE blocks): [experts, in, out]."""
    names = []
    for mname, m in model.named_modules():
        if ".lora_" in mname:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim == 3 and ("expert" in type(m).__name__.lower() or type(m).__name__ == "MoEFFN"):
                names.append(f"{mname}.{pname}" if mname else pname)
    return names


def _component_regex(pattern: str) -> str:
    # fnmatch-style, but a wildcard stays inside one dotted name component: "layer.*.output.dense"
    # matches "encoder.layer.3.output.dense" and not "encoder.layer.3.attention.output.dense"
    out = []
    for c in pattern:
        out.append({"*": r"[^.]*", "?": r"[^.]"}.get(c, re.escape(c) if c not in "[]" else c))
    return "".join(out)


def _suffix_match(name: str, pattern: str) -> bool:
    """``pattern`` matches the whole name or its last dotted components (wildcards within a component)."""
    if any(c in pattern for c in "*?["):
        return re.fullmatch(r"(?:.*\.)?" + _component_regex(pattern), name) is not None
    return name == pattern or name.endswith("." + pattern)


def available_summary(model, limit: int = 12) -> str:
    """Short list of adaptable layer kinds, e.g. 'self_attn.q_proj, self_attn.k_proj, mlp.up_proj'."""
    kinds: list[str] = []
    for name in adaptable_modules(model):
        parts = name.split(".")
        kind = ".".join(parts[-2:]) if len(parts) >= 2 else name
        if kind not in kinds:
            kinds.append(kind)
    experts = sorted({".".join(n.split(".")[-2:]) for n in fused_expert_parameters(model)})
    text = ", ".join(kinds[:limit]) + (f", ... ({len(kinds)} kinds)" if len(kinds) > limit else "")
    if experts:
        text += "; expert parameters: " + ", ".join(experts)
    return text or "none"


def resolve(model, targets) -> Targets:
    """Exact module (and fused expert parameter) names for a preset or a user list; ValueError if none."""
    mods = adaptable_modules(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    expert_params = fused_expert_parameters(model)
    if isinstance(targets, str) and targets in ("attn", "attn-all", "mlp", "all"):
        table = PRESET_TABLE.get(model_type)
        keys = ["attn-all", "mlp"] if targets == "all" else [targets]
        if table is not None:
            patterns = [p for k in keys for p in table[k]]
            if "mlp" in keys and table is _MIXTRAL:
                patterns += table["mlp_legacy"]
            how = f"preset {targets!r} for {model_type}"
        else:
            leaf = {"attn": _GENERIC_ATTN_QV, "attn-all": _GENERIC_ATTN_ALL, "mlp": _GENERIC_MLP}
            patterns = [p for k in keys for p in leaf[k]]
            how = f"preset {targets!r}, generic names ({model_type or type(model).__name__} has no preset table)"
        names = [n for n in mods if any(_suffix_match(n, p) for p in patterns)]
        params = []
        if "mlp" in keys:
            params = [n for n in expert_params if not any(n.startswith(m + ".") for m in names)]
        if targets == "all" and table is None and not names:  # unknown architecture: every Linear but the head
            names, how = list(mods), "preset 'all': every Linear layer but the output head"
        if not names and not params:
            raise ValueError(f"targets={targets!r} matches no layer of this {type(model).__name__} "
                             f"({model_type}); available: {available_summary(model)}. "
                             "Pass module names, e.g. targets=['q_proj', 'v_proj']")
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        names, params, missing = [], [], []
        for pat in wanted:
            hit = [n for n in mods if _suffix_match(n, pat)]
            phit = [n for n in expert_params if _suffix_match(n, pat)]
            if not hit and not phit:
                missing.append(pat)
            names += [n for n in hit if n not in names]
            params += [n for n in phit if n not in params]
        if missing:
            raise ValueError(f"targets {missing} match no adaptable layer of this {type(model).__name__}; "
                             f"available: {available_summary(model)}")
        how = f"modules matching {wanted}"
    fan_in_fan_out = False
    try:
        from transformers.pytorch_utils import Conv1D

        fan_in_fan_out = any(isinstance(mods[n], Conv1D) for n in names)
    except ImportError:
        pass
    return Targets(names, params, how, fan_in_fan_out)
