"""Quality without a tokenizer: how closely a variant's outputs agree with the original model's.

Perplexity needs text, and text needs a tokenizer. A model without one is judged against the
model it came from, on the same inputs:
- causal LMs: KL divergence KL(original || variant) of the next-token distributions, and the share of
  positions whose most likely next token is the same (top-1 agreement), on fixed token-id windows;
- encoders: cosine between mean-pooled hidden states, and the share of each sequence's 5 nearest
  neighbours kept (as ``quality.embedding_agreement`` does for sentence embeddings);
- any other module: relative output error |y - y_ref| / |y_ref| on the example inputs.
Both models see the very same inputs, one window at a time, so no more than one window's outputs of
each are held at once.
"""

from __future__ import annotations

import math


def call_model(model, inputs):
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(inputs, device):
    """``inputs`` (a tensor, or a tuple/list/dict of them) on ``device``; anything else as it is."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def output_tensor(out):
    """The main tensor of a model's output: logits, last hidden state, or the first tensor found."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for t in items:
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"cannot find a tensor in the model's output ({type(out).__name__}) to compare")


def _windows(ids, window: int):
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window]
        if chunk.numel() >= 2:
            yield chunk.unsqueeze(0)  # [1, T]


def lm_agreement(reference, candidate, ids, window: int) -> dict:
    """Mean KL(reference || candidate) per token (nats) and top-1 agreement over ``ids`` [N] in windows."""
    import torch
    import torch.nn.functional as F

    from ..torch_utils import device_of

    kl_sum, same, count = 0.0, 0, 0
    with torch.inference_mode():
        for chunk in _windows(ids, window):
            ref = reference(input_ids=chunk.to(device_of(reference)), use_cache=False).logits[0].float().cpu()
            cand = candidate(input_ids=chunk.to(device_of(candidate)), use_cache=False).logits[0].float().cpu()
            log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(cand, -1)  # [T, V]
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
            same += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
            count += chunk.shape[-1]
    return {"kl_divergence": kl_sum / count, "top1_agreement": same / count, "tokens": count}


def _pooled(model, seqs):
    import torch

    from ..torch_utils import device_of

    hidden = output_tensor(model(input_ids=seqs.to(device_of(model)))).float().cpu()  # [n, T, H]
    return torch.nn.functional.normalize(hidden.mean(1), dim=-1)  # [n, H]


def encoder_agreement(reference, candidate, seqs) -> dict:
    """Cosine of mean-pooled hidden states and top-5 neighbour agreement over ``seqs`` [n, T]."""
    import torch

    from .quality import embedding_agreement

    with torch.inference_mode():
        a, b = _pooled(reference, seqs), _pooled(candidate, seqs)
    return embedding_agreement(a, b, k=min(5, max(1, seqs.shape[0] - 1)))


def output_error(reference, candidate, inputs) -> dict:
    """Relative error |y - y_ref| / |y_ref| of the main output tensor (and the max abs difference)."""
    import torch

    with torch.inference_mode():
        ref = output_tensor(call_model(reference, inputs)).float()
        out = output_tensor(call_model(candidate, inputs)).float()
    if ref.shape != out.shape:
        raise ValueError(f"the outputs differ in shape ({tuple(ref.shape)} vs {tuple(out.shape)}): cannot compare")
    norm = ref.norm().item()
    err = (out - ref).norm().item()
    rel = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    return {"relative_error": rel, "max_abs_diff": (out - ref).abs().max().item()}
