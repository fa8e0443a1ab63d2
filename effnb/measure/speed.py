"""Speed and energy of one model: prefill (or forward) latency, greedy decode tokens/s, joules per token."""

from __future__ import annotations

import statistics
import time


def sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int, device) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` untimed ones. ``fn`` may time itself (returns seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        inner = fn()
        sync(device)
        samples.append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return samples


def spread(samples: list[float], scale: float = 1.0) -> dict:
    vals = [s * scale for s in samples]
    return {"min": min(vals), "max": max(vals), "samples": vals}


def speed(model, kind: str, inputs, cfg, device) -> dict:
    """Prefill latency (or a module's forward latency) and, for causal LMs, greedy decode speed.

    ``inputs``: token ids [1, T] for transformers models, the example inputs for other modules.
    The returned dict carries ``_energy_work``: (a callable, tokens it produces) for the energy meter.
    """
    import torch

    from .agreement import call_model

    out: dict = {}
    causal = kind == "causal-lm"
    if kind == "module":
        forward = lambda: call_model(model, inputs)  # noqa: E731 - one-line closure
    else:
        extra = {"use_cache": True} if causal else {}
        forward = lambda: model(input_ids=inputs, **extra)  # noqa: E731
    with torch.inference_mode():
        prefill = timed(forward, cfg.repeats, cfg.warmup, device)
        out["prefill_ms"] = statistics.median(prefill) * 1e3
        out["prefill_ms_spread"] = spread(prefill, 1e3)
        if not causal:
            out["decode_tokens_per_s"] = None
            out["decode_note"] = "encoder: no decoding" if kind == "encoder" else "not a language model: no decoding"
            n = inputs.shape[-1] if kind != "module" else 1
            return out | {"_energy_work": (forward, n)}

        def decode() -> float:
            res = model(input_ids=inputs, use_cache=True)
            cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(cfg.decode_tokens):
                res = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            sync(device)
            return time.perf_counter() - t0

        samples = timed(decode, cfg.repeats, cfg.warmup, device)
        rates = [cfg.decode_tokens / s for s in samples]
        out["decode_tokens_per_s"] = statistics.median(rates)
        out["decode_spread"] = {"min": min(rates), "max": max(rates), "samples": rates}
        return out | {"_energy_work": (decode, cfg.decode_tokens)}


def energy(work, device) -> dict:
    """Joules per token of one run of ``work`` = (callable, tokens), or null with the reason."""
    from .energy import EnergyMeter

    fn, tokens = work
    meter = EnergyMeter(str(device))
    if not meter.available:
        return {"joules_per_token": None, "method": "not measured", "reason": meter.reason}
    import torch

    with torch.inference_mode(), meter:
        fn()
    if meter.joules is None:
        return {"joules_per_token": None, "method": "not measured", "reason": meter.reason}
    return {"joules_per_token": meter.joules / tokens, "method": meter.method, "reason": None}
