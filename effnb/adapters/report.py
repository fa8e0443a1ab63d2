"""Numbers of ``effnb.lora`` / ``finetune`` / ``merge``: trainable share, adapter bytes, memory budgets, figures.

Memory of fine-tuning = weights + gradients + optimizer state + activations. For the variant that
ran, weights and gradients are counted from the tensors, optimizer state from AdamW's own state and
the peak is measured; for the variants that did not run (full fine-tuning, LoRA, QLoRA) the first
three are computed from parameter counts (fp32 gradients, two fp32 AdamW moments), without
activations, and labelled "computed".
"""

from __future__ import annotations

import os
import tempfile

QLORA_BLOCKSIZE = 64  # the QLoRA paper's NF4 block (and bitsandbytes' default)


BNB_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' quantized layers, by name: the library is optional


def is_quantized_layer(m) -> bool:
    """A quantized base layer (effnb's or bitsandbytes'), not one already wrapped with adapters."""
    from ..torch_utils import is_quantized_linear

    return (is_quantized_linear(m) or type(m).__name__ in BNB_LAYERS) and not hasattr(m, "lora_A")


def quantized_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized_layer(m)]


def adapter_state(model) -> dict:
    """The adapter tensors PEFT would save for the active adapter."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=active_adapter(model))


def active_adapter(model) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def adapter_file_bytes(model) -> int:
    """Bytes of ``adapter_model.safetensors`` for the active adapter, measured by writing it."""
    with tempfile.TemporaryDirectory(prefix="effnb-adapter-") as d:
        model.save_pretrained(d, selected_adapters=[active_adapter(model)], safe_serialization=True)
        total = 0
        for root, _, files in os.walk(d):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))
        return total


def float_checkpoint_bytes(model) -> int:
    """Bytes of a full fp32 checkpoint of the base model (state-dict tensors, packed weights as fp32)."""
    from ..measure.memory import count_parameters

    total, trainable = count_parameters(model)
    adapter = sum(t.numel() for t in adapter_state(model).values()) if hasattr(model, "peft_config") else 0
    return (total - adapter) * 4


def light_audit():
    """The measurement of ``measure=True``: one short run of speed and perplexity, no energy (fine-tuning
    and adapters are judged by their own numbers; this is a quick look, not a benchmark)."""
    from ..measure import AuditConfig

    return AuditConfig(repeats=1, warmup=0, decode_tokens=8, quality_tokens=512, window=256, energy=False)


def memory_budgets(*, base_params: int, trainable: int, linear_params: int) -> list[dict]:
    """Weights / gradients / AdamW state for full fine-tuning, LoRA and QLoRA (nf4) of this model, computed.

    ``base_params``: parameters of the model without adapters; ``trainable``: adapter parameters;
    ``linear_params``: the base weights a QLoRA base stores in NF4 (the rest stays fp32).
    """
    from ..kernels.formats import get_format

    fp32 = 4
    # 4-bit codes + one fp32 absmax per block, as the Format table stores NF4 (0.5625 bytes per weight)
    nf4 = get_format("nf4").storage_bytes(1, QLORA_BLOCKSIZE, QLORA_BLOCKSIZE) / QLORA_BLOCKSIZE
    other = base_params - linear_params
    rows = [
        {"variant": "full fine-tuning (fp32)", "weights_bytes": base_params * fp32,
         "gradients_bytes": base_params * fp32, "optimizer_bytes": 2 * base_params * fp32},
        {"variant": "LoRA (fp32 base)", "weights_bytes": base_params * fp32 + trainable * fp32,
         "gradients_bytes": trainable * fp32, "optimizer_bytes": 2 * trainable * fp32},
        {"variant": f"QLoRA (nf4 base, blocksize {QLORA_BLOCKSIZE})",
         "weights_bytes": int(other * fp32 + linear_params * nf4) + trainable * fp32,
         "gradients_bytes": trainable * fp32, "optimizer_bytes": 2 * trainable * fp32},
    ]
    for r in rows:
        r["total_bytes"] = r["weights_bytes"] + r["gradients_bytes"] + r["optimizer_bytes"]
        r["method"] = "computed (fp32 gradients, 2 fp32 AdamW moments; activations not included)"
    return rows


def linear_parameter_count(model) -> int:
    """Logical weights of the Linear-like layers the quantizer would pack (output head excluded)."""
    from ..torch_utils import linear_layers, output_head

    head = output_head(model)
    head_base = getattr(head, "base_layer", head)  # the head as PEFT wraps it, when it carries an adapter
    n = 0
    for name, m in linear_layers(model):
        if m is head or m is head_base or ".lora_" in name:  # adapter matrices are not base weights
            continue
        logical = getattr(m, "effnb_logical_numel", None)
        if callable(logical):
            n += int(logical())
        else:
            qs = getattr(getattr(m, "weight", None), "quant_state", None)
            n += int(qs.shape[0] * qs.shape[1]) if qs is not None else m.weight.numel()
    return n


def memory_figure(rows: list[dict], title: str):
    """Stacked bars: weights, gradients, optimizer state (and measured activations where known)."""
    import plotly.graph_objects as go

    names = [r["variant"] for r in rows]
    fig = go.Figure()
    for key, label in (("weights_bytes", "weights"), ("gradients_bytes", "gradients"),
                       ("optimizer_bytes", "optimizer state"), ("activations_bytes", "activations + other (measured)")):
        fig.add_trace(go.Bar(x=names, y=[(r.get(key) or 0) / 1e6 for r in rows], name=label))
    fig.update_layout(barmode="stack", title_text=title, yaxis_title="MB", height=340,
                      margin={"t": 40, "b": 40, "l": 50, "r": 10})
    return fig


def generations_figure(rows: list[dict], title: str = "held-out questions: before and after"):
    """A table of the held-out questions with the reference answer and the model's before/after answers."""
    import plotly.graph_objects as go

    cols = ["question", "reference", "before", "after"]
    fig = go.Figure(go.Table(header={"values": cols, "align": "left"},
                             cells={"values": [[r[c] for r in rows] for c in cols], "align": "left"},
                             columnwidth=[2, 3, 3, 3]))
    fig.update_layout(title_text=title, height=120 + 70 * len(rows), margin={"t": 40, "b": 10, "l": 10, "r": 10})
    return fig
