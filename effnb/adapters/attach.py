"""``effnb.lora``'s work: PEFT LoRA adapters attached to a model, and what they cost.

PEFT does the LoRA itself (its ``LoraConfig``, ``get_peft_model``, DoRA through ``use_dora``);
effnb chooses the layers (``targets.py``), wraps its own quantized layers (``qlora.py``) and
reports the trainable share, the adapter file size and the training memory of each variant.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

from ..technique import Change
from .config import LoraConfig
from .report import light_audit
from .state import base_of, is_peft, set_lora_meta


@dataclass
class Plan:
    """What ``plan`` decided before any copy is made: the layers, the PEFT config, the variant."""

    found: object  # targets.Targets
    peft_config: object  # peft.LoraConfig
    quantized: list[str]  # quantized base layers (effnb or bitsandbytes): QLoRA
    effnb_quant: list[str]  # adapted layers that are effnb QuantLinear (wrapped by qlora.QuantLoraLinear)

    def variant(self, cfg: LoraConfig) -> str:
        return "QLoRA" if self.quantized else ("DoRA" if cfg.dora else "LoRA")


def plan(model, cfg: LoraConfig) -> Plan:
    """Resolve the targets and build PEFT's config; ValueError for what cannot work, before any copy."""
    import peft

    from ..models import model_kind
    from ..torch_utils import is_quantized_linear
    from . import targets as T
    from .report import quantized_layers

    base = base_of(model)
    if is_peft(model) and cfg.adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {cfg.adapter_name!r} "
                         f"(adapters: {', '.join(model.peft_config)}); pass adapter_name='another_name'")
    found = T.resolve(base, cfg.targets)
    effnb_quant = [n for n in found.modules if is_quantized_linear(base.get_submodule(n))]
    if cfg.dora and effnb_quant:
        raise ValueError(f"dora=True is not supported on effnb-quantized layers ({effnb_quant[0]!r}, ...); "
                         "use dora=False, or quantize with backend='bitsandbytes'")
    if cfg.dora and found.parameters:
        raise ValueError("dora=True is not supported on fused expert parameters; target modules instead")
    peft_cfg = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.dora,
        target_modules=found.modules, target_parameters=found.parameters or None,
        fan_in_fan_out=found.fan_in_fan_out, init_lora_weights=True if cfg.init == "default" else "gaussian",
        task_type="CAUSAL_LM" if model_kind(model) == "causal-lm" else None, bias="none")
    if effnb_quant:
        from .qlora import register

        register(peft_cfg)
    return Plan(found, peft_cfg, quantized_layers(base), effnb_quant)


def attach(work, cfg: LoraConfig, p: Plan, base_name: str) -> Change:
    """The technique's transform: adapters on ``work`` (a copy, or the input with ``inplace=True``)."""
    import torch

    mark_bnb(base_of(work))
    torch.manual_seed(cfg.seed)
    if is_peft(work):
        work.add_adapter(cfg.adapter_name, p.peft_config)
        work.set_adapter(cfg.adapter_name)
        peft_model = work
    else:
        from peft import get_peft_model

        with warnings.catch_warnings():  # transformers 5 deprecation raised inside PEFT, not actionable here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(work, p.peft_config, adapter_name=cfg.adapter_name)
    if p.effnb_quant:
        from .qlora import keep_frozen_layers_lean

        keep_frozen_layers_lean(peft_model)
    set_lora_meta(peft_model, {
        "rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets, "dora": cfg.dora,
        "plus_ratio": cfg.plus_ratio, "adapter_name": cfg.adapter_name,
        "quantized_base": bool(p.quantized), "effnb_quant_layers": len(p.effnb_quant)})
    variant = p.variant(cfg)
    return Change(peft_model, label=f"{base_name} + {variant} r{cfg.rank}", title=f"{variant} adapters on {base_name}",
                  audit=light_audit(), finish=partial(_finish, cfg=cfg, p=p, base_name=base_name))


def mark_bnb(model) -> None:
    """Tell PEFT that bitsandbytes layers are there, as ``from_pretrained(quantization_config=...)`` would.

    PEFT picks its bitsandbytes LoRA layers (whose merge dequantizes and re-quantizes) only when the
    model says ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``; a model quantized after loading (by
    ``effnb.quantize(..., backend="bitsandbytes")``) does not say it by itself.
    """
    kinds = {type(m).__name__ for m in model.modules()}
    if "Linear4bit" in kinds:
        model.is_loaded_in_4bit = True
    if "Linear8bitLt" in kinds:
        model.is_loaded_in_8bit = True


def _finish(change: Change, report, baseline, *, cfg: LoraConfig, p: Plan, base_name: str) -> None:  # noqa: ARG001
    """The adapter's numbers, from the measured row (parameters) and the PEFT model (file size, budgets)."""
    from .report import (
        adapter_file_bytes,
        float_checkpoint_bytes,
        linear_parameter_count,
        memory_budgets,
        memory_figure,
    )

    peft_model, row = change.model, report.rows[1]
    total, trainable = row["parameters"], row["trainable_parameters"]
    share = trainable / total if total else None
    adapter_bytes = adapter_file_bytes(peft_model)
    full_bytes = float_checkpoint_bytes(peft_model)
    budgets = memory_budgets(base_params=total - trainable, trainable=trainable,
                             linear_params=linear_parameter_count(peft_model))
    variant, found = p.variant(cfg), p.found
    change.rows = ({}, {"extra": {
        "technique": variant, "trainable_share": share, "adapter_file_bytes": adapter_bytes,
        "adapter_file_method": "measured: size of adapter_model.safetensors written by PEFT",
        "full_checkpoint_bytes": full_bytes,
        "full_checkpoint_method": "computed: logical base parameters x 4 bytes (fp32)",
        "adapter_vs_checkpoint": adapter_bytes / full_bytes if full_bytes else None,
        "adapted_modules": len(found.modules), "adapted_expert_parameters": len(found.parameters),
        "targets": found.how, "quantized_base_layers": len(p.quantized), "training_memory": budgets}})
    change.details = {
        "config": cfg.to_dict(), "technique": variant, "targets": found.how,
        "modules": found.modules, "expert_parameters": found.parameters,
        "trainable_parameters": trainable, "parameters": total, "trainable_share": share,
        "adapter_file_bytes": adapter_bytes, "full_checkpoint_bytes": full_bytes, "training_memory": budgets,
        "quantized_base_layers": len(p.quantized)}
    change.figures = [lambda: memory_figure(budgets, f"training memory of {base_name} (computed, without activations)")]
