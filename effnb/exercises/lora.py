"""Exercises of notebook 03 (LoRA and QLoRA): counting adapter parameters, adapter bytes, merging by hand."""

from __future__ import annotations

from . import ExerciseError, as_number, as_tensor, exercise


def _lora_counts(model, rank: int, suffixes=("q_proj", "v_proj")) -> dict[str, int]:
    """{module name: (in, out)} of the Linear layers whose names end with ``suffixes``."""
    import torch

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(suffixes):
            out[name] = (m.in_features, m.out_features)
    return out


@exercise(
    "lora.trainable",
    solution="answer = sum(RANK * (m.in_features + m.out_features) for n, m in model.named_modules() if n.endswith(('q_proj', 'v_proj')))",
)
def _trainable(answer, *, model, rank):
    """LoRA of rank `rank` on every query and value projection (q_proj, v_proj) of `model`: how many trainable
    parameters does it add? Each adapted layer W [out, in] gets A [rank, in] and B [out, rank].

    Hint: Per layer: rank * in + out * rank. Sum over the q_proj and v_proj of every block; note that v_proj's
    out is smaller than q_proj's in models with grouped-query attention.

    Why: Each adapted layer W [out, in] trains A [rank, in] and B [out, rank]: rank x (in + out) numbers,
    summed over every q_proj and v_proj. With grouped-query attention v_proj has a smaller out than q_proj, so
    use each layer's own sizes; the frozen W is not counted.
    """
    layers = _lora_counts(model, rank)
    if not layers:
        raise TypeError("the model has no q_proj / v_proj Linear layers: pass the base model (not the PEFT model)")
    value = as_number(answer, "the number of trainable parameters")
    expected = sum(rank * (i + o) for i, o in layers.values())
    if value == expected:
        return
    n = len(layers)
    if value == sum(rank * i for i, o in layers.values()) or value == sum(o * rank for i, o in layers.values()):
        raise ExerciseError("that counts only one of the two matrices: each layer has A [rank, in] AND B [out, rank]")
    if value == sum(i * o for i, o in layers.values()):
        raise ExerciseError("that is the size of the frozen weights W [out, in] themselves; LoRA trains only A and B")
    if value * n == expected or value * (n // 2) == expected:
        raise ExerciseError(f"that looks like one layer (or one block): there are {n} adapted layers "
                            f"({n // 2} blocks x q_proj and v_proj)")
    q_only = [(i, o) for name, (i, o) in layers.items() if name.endswith("q_proj")]
    if value == 2 * sum(rank * (i + o) for i, o in q_only):
        raise ExerciseError("v_proj is smaller than q_proj here (grouped-query attention: fewer key/value heads); "
                            "use each layer's own out_features")
    raise ExerciseError(f"{value:,.0f} is not the count; expected rank*(in+out) summed over {n} layers")


@exercise("lora.adapter_bytes", solution="answer = trainable * 4")
def _adapter_bytes(answer, *, trainable, file_bytes=None):
    """The adapter is saved as fp32 safetensors. Roughly how many bytes of tensor data does it hold, given
    `trainable` parameters? (The file adds a small JSON header.)

    Hint: fp32 = 4 bytes per number.

    Why: Every trainable number is saved as fp32, 4 bytes; the file on disk adds a small JSON header, which is
    why it is slightly larger. The adapter is tiny next to the base model, which is what makes sharing LoRA
    adapters cheap.
    """
    value = as_number(answer, "the adapter size in bytes")
    expected = 4 * int(trainable)
    if value == expected:
        return
    if value == 2 * trainable:
        raise ExerciseError("2 bytes per number is fp16/bf16; the adapter here is saved in fp32 (4 bytes)")
    if value == trainable:
        raise ExerciseError("that is the number of parameters, not bytes: each fp32 number takes 4 bytes")
    if value == 32 * trainable:
        raise ExerciseError("that is bits (32 per number): divide by 8 for bytes")
    if file_bytes is not None and abs(value - file_bytes) <= 0.02 * file_bytes:
        raise ExerciseError("that is the file size measured on disk (tensor data + a JSON header): "
                            "compute the tensor data from the parameter count instead")
    raise ExerciseError(f"{value:,.0f} bytes is not right for {int(trainable):,} fp32 numbers: count the bytes "
                        "of one fp32 number and multiply")


@exercise("lora.merge", solution="answer = W + scaling * (B @ A)")
def _merge(answer, *, layer):
    """Merge by hand: `layer` is a PEFT LoRA layer with base weight W = layer.base_layer.weight, adapter
    matrices A = layer.lora_A['default'].weight and B = layer.lora_B['default'].weight, and scaling =
    layer.scaling['default'] (= alpha / rank). Compute the merged weight [out, in].

    Hint: The adapter adds scaling * (B @ A) to W; B is [out, rank] and A is [rank, in].

    Why: The adapted layer computes x W^T + scaling x (x A^T B^T), which is x (W + scaling B A)^T: folding
    scaling x B @ A into W gives the same outputs with no extra matmul at inference.
    """
    import torch

    as_tensor(answer, "the merged weight should be a tensor [out, in]")
    w = layer.base_layer.weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    if tuple(answer.shape) != tuple(w.shape):
        raise ExerciseError(f"shape {tuple(answer.shape)} differs from the weight's {tuple(w.shape)}: "
                            "B @ A is [out, in]; A @ B is not defined for these shapes")
    expected = w + s * (b @ a)
    ans = answer.detach().to(expected.dtype)
    tol = 1e-5 * float(expected.abs().max()) + 1e-7
    if torch.allclose(ans, expected, atol=tol, rtol=0):
        return
    if s != 1 and torch.allclose(ans, w + b @ a, atol=tol, rtol=0):
        raise ExerciseError(f"the scaling is missing: the update is scaling * B @ A with scaling = alpha / rank "
                            f"= {s:g} here")
    if torch.allclose(ans, w, atol=tol, rtol=0):
        raise ExerciseError("that is the base weight unchanged: add the adapter's update (train it first if "
                            "B is still zero)")
    if torch.allclose(ans, s * (b @ a), atol=tol, rtol=0):
        raise ExerciseError("that is only the update: the merged weight is the base weight PLUS the update")
    if torch.allclose(ans, w - s * (b @ a), atol=tol, rtol=0):
        raise ExerciseError("the update is subtracted: the merged weight is W PLUS scaling * (B @ A)")
    worst = float((ans - expected).abs().max())
    raise ExerciseError(f"not the merged weight (largest difference {worst:.3g}): expected W + scaling * (B @ A), "
                        "with B [out, rank] on the left")
