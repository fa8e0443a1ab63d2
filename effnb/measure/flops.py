"""FLOPs per token, counted by torch.utils.flop_counter over one forward pass."""

from __future__ import annotations


def flops_per_token(model, input_ids) -> float:
    """Floating-point operations per token of a forward over ``input_ids`` [1, T] (prefill, no cache).

    Counts what torch's FlopCounterMode knows (matmuls, convolutions, attention); elementwise ops
    are not counted, and custom kernels it does not know are counted as zero.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(input_ids=input_ids, **({"use_cache": False} if _accepts_cache(model) else {}))
    return counter.get_total_flops() / input_ids.shape[-1]


def _accepts_cache(model) -> bool:
    from ..models import model_kind

    return model_kind(model) == "causal-lm"
