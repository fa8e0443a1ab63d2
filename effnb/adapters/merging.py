"""``effnb.merge``'s work: fold the adapters into the base weights and measure what that changed.

Float base: the merged model gives the adapted model's outputs up to rounding. Quantized base:
each adapted layer is dequantized, merged and quantized again in its own format, so the merge
adds a rounding error; it is measured twice, on the outputs (merged vs adapted model on the same
held-out tokens) and per layer (re-quantized weight vs dequantized base + B @ A * scaling).
"""

from __future__ import annotations

import logging

from ..technique import Change
from .config import MergeConfig
from .report import light_audit
from .state import lora_meta, set_lora_meta

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # module names inside a PEFT model start with it


def check_inputs(model, n: int) -> dict:
    """What the merge is checked on: the built-in text's first ``n`` ids (fixed ids without a tokenizer),
    or a plain module's example inputs; with the words the report uses for them."""
    from ..measure.inputs import token_ids_for
    from ..models import example_inputs_for, model_kind

    kind = model_kind(model)
    if kind == "module":
        inputs, note = example_inputs_for(model)
        if inputs is None:
            raise ValueError(f"merge cannot check this {type(model).__name__}: effnb cannot tell what it takes as "
                             "input; attach example inputs with effnb.attach_example_inputs(model, inputs)")
        return {"inputs": inputs, "compared": "outputs", "what": note, "tokens": None}
    ids, note = token_ids_for(model, n)
    return {"inputs": {"input_ids": ids.unsqueeze(0)}, "tokens": int(ids.numel()),
            "compared": "logits" if kind == "causal-lm" else "hidden states",
            "what": "first tokens of effnb's built-in evaluation text" if "text" in note else note}


def outputs(model, inputs):
    """The model's output tensor on ``inputs`` (fp32, on the CPU), in evaluation mode without gradients."""
    import torch

    from ..measure.agreement import call_model, output_tensor, to_device
    from ..torch_utils import device_of, eval_mode

    moved = to_device(inputs, device_of(model))
    with eval_mode(model), torch.no_grad():
        out = call_model(model, moved)
    return output_tensor(out).float().cpu()


def merge_work(work, cfg: MergeConfig, adapter: str, check: dict, base_name: str, quantized: bool) -> Change:
    """The technique's transform: merge ``adapter`` into ``work``'s base, measure outputs and layers."""
    ref = outputs(work, check["inputs"])
    targets, restored = merge_targets(work, adapter, quantized)
    merged = work.merge_and_unload(adapter_names=[adapter], safe_merge=True)
    diff = (outputs(merged, check["inputs"]) - ref).abs()
    layer_errors = []
    for lname, want in targets.items():
        err = (dequantized_weight(merged.get_submodule(lname)) - want).float()
        layer_errors.append({"layer": lname, "max_abs_weight_error": err.abs().max().item(),
                             "relative_error": (err.norm() / want.norm().clamp_min(1e-12)).item()})
    set_lora_meta(merged, {**lora_meta(work), "merged": adapter})
    error = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "compared": check["compared"],
             "tokens": check["tokens"], "text": check["what"],
             "method": "measured: merged model vs adapted model on the same inputs"}
    if layer_errors:
        error["layers"] = layer_errors
        error["max_abs_weight_error"] = max(e["max_abs_weight_error"] for e in layer_errors)
        error["requantized"] = "dequantize, add B@A*scaling, quantize again in the layer's own format (round to nearest)"
    if restored:  # the same dict is the report row's extra and the details' entry
        error["bitsandbytes_layout"] = (
            f"{len(restored)} base layers were in bitsandbytes' AVX512-BF16 CPU layout; put back to the canonical "
            "layout before merging")
        log.info("merge: %d bitsandbytes layers put back from the CPU layout: %s", len(restored), restored)
    base = "the quantized" if quantized else "the float"
    return Change(merged, label=f"{base_name} merged", title=f"adapter {adapter!r} merged into {base} base",
                  audit=light_audit(),
                  rows=({}, {"extra": {"merged_adapter": adapter, "quantized_base": quantized, "merge_error": error}}),
                  details={"adapter": adapter, "quantized_base": quantized, "merge_error": error})


def merge_targets(work, adapter: str, quantized: bool) -> tuple[dict, list[str]]:
    """Per adapted quantized layer, what the merge should give: its dequantized base + its delta
    ({layer name: fp32 [out, in]}); and the bitsandbytes layers put back from their CPU layout."""
    import torch

    from .qlora import QuantLoraLinear

    targets: dict = {}
    restored: list[str] = []
    for lname, m in work.named_modules():
        name = lname.removeprefix(PEFT_PREFIX)
        if isinstance(m, QuantLoraLinear):
            with torch.no_grad():
                targets[name] = m.get_base_layer().dequantize().float() + m.get_delta_weight(adapter)
        elif quantized and hasattr(m, "lora_A") and adapter in m.lora_A and hasattr(m, "get_delta_weight"):
            base_layer = m.get_base_layer()
            if type(base_layer).__name__ == "Linear4bit":  # by name: bitsandbytes is optional
                from ..kernels.bnb import dequantize_bnb, guard_layout, restore_layout

                # PEFT's merge decodes weight.data with quant_state as canonical bytes; bitsandbytes may
                # have repacked them for its AVX512-BF16 CPU kernel on the forward above
                if restore_layout(base_layer):
                    restored.append(name)
                guard_layout(base_layer)  # the merged layer's state_dict() will not corrupt it either
                with torch.no_grad():
                    targets[name] = dequantize_bnb(base_layer) + m.get_delta_weight(adapter).float()
    return targets, restored


def dequantized_weight(m):
    """The fp32 weight [out, in] a merged layer holds: decoded when it is quantized (effnb or bitsandbytes)."""
    from ..torch_utils import is_quantized_linear

    if is_quantized_linear(m):
        return m.dequantize().float()
    if type(m).__name__ == "Linear4bit":
        from ..kernels.bnb import dequantize_bnb

        return dequantize_bnb(m)
    return m.weight.detach().float()
