"""Audit one model or compare several: every measurement of ``effnb.measure`` gathered into rows."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections import Counter

from .. import data as _data
from .config import AuditConfig
from .energy import EnergyMeter
from .memory import PeakMemory, count_parameters, trim_heap, weight_bytes
from .quality import _device_of, embedding_agreement, perplexity, retrieval_recall, token_ids


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, repeats: int, warmup: int, device) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` untimed ones. ``fn`` may time itself (returns seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        inner = fn()
        _sync(device)
        samples.append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return samples


def _spread(samples: list[float], scale: float = 1.0) -> dict:
    vals = [s * scale for s in samples]
    return {"min": min(vals), "max": max(vals), "samples": vals}


def _prompt(tokenizer, n: int, device):
    ids = token_ids(tokenizer, _data.eval_text())
    while ids.numel() < n:  # a tiny vocabulary never runs short, but be safe for any tokenizer
        ids = ids.repeat(2)
    return ids[:n].unsqueeze(0).to(device)  # [1, n]


def _dominant_dtype(by_dtype: dict[str, int]) -> str:
    return max(by_dtype, key=by_dtype.get) if by_dtype else "unknown"


def _speed(model, kind: str, ids, cfg: AuditConfig, device) -> dict:
    import torch

    out: dict = {}
    causal = kind == "causal-lm"
    extra = {"use_cache": True} if causal else {}
    with torch.inference_mode():
        prefill = _timed(lambda: model(input_ids=ids, **extra), cfg.repeats, cfg.warmup, device)
        out["prefill_ms"] = statistics.median(prefill) * 1e3
        out["prefill_ms_spread"] = _spread(prefill, 1e3)
        if not causal:
            out["decode_tokens_per_s"] = None
            out["decode_note"] = "encoder: no decoding"
            return out | {"_energy_work": (lambda: model(input_ids=ids), ids.shape[-1])}

        def decode() -> float:
            res = model(input_ids=ids, use_cache=True)
            cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(cfg.decode_tokens):
                res = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            _sync(device)
            return time.perf_counter() - t0

        samples = _timed(decode, cfg.repeats, cfg.warmup, device)
        rates = [cfg.decode_tokens / s for s in samples]
        out["decode_tokens_per_s"] = statistics.median(rates)
        out["decode_spread"] = {"min": min(rates), "max": max(rates), "samples": rates}
        return out | {"_energy_work": (decode, cfg.decode_tokens)}


def _energy(work, device) -> dict:
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


def _measure(model, name: str, cfg: AuditConfig):
    """One report row for ``model``, and the encoder's document embeddings (None for causal LMs)."""
    from ..models import check_model, model_kind, tokenizer_for
    from .flops import flops_per_token

    check_model(model)
    tok = tokenizer_for(model)
    kind = model_kind(model)
    device = _device_of(model)
    total, trainable = count_parameters(model)
    wbytes, by_dtype, by_module = weight_bytes(model)
    row: dict = {
        "name": name,
        "model_class": type(model).__name__,
        "kind": kind,
        "device": str(device),
        "dtype": _dominant_dtype(by_dtype),
        "parameters": total,
        "trainable_parameters": trainable,
        "weight_bytes": wbytes,
        "weight_bytes_by_dtype": by_dtype,
        "weight_bytes_by_module": by_module,
        "peak_memory_bytes": None,
        "peak_memory": None,
        "prompt_tokens": cfg.prompt_tokens,
        "prefill_ms": None,
        "prefill_ms_spread": None,
        "decode_tokens": cfg.decode_tokens if kind == "causal-lm" else None,
        "decode_tokens_per_s": None,
        "decode_spread": None,
        "quality": None,
        "flops_per_token": None,
        "energy": {"joules_per_token": None, "method": "not measured", "reason": "energy measurement switched off"},
        "extra": {},
    }
    was_training = model.training
    model.eval()
    embeddings = None
    try:
        ids = _prompt(tok, cfg.prompt_tokens, device)
        import torch

        with torch.inference_mode():  # touch every weight once: memory-mapped checkpoints are
            model(input_ids=ids[:, :8])  # paged in here, not counted as the run's transient memory
        peak = PeakMemory(str(device))
        with peak:
            if cfg.speed:
                speed = _speed(model, kind, ids, cfg, device)
                work = speed.pop("_energy_work")
                row.update(speed)
                if cfg.energy:
                    row["energy"] = _energy(work, device)
            if cfg.quality:
                if kind == "causal-lm":
                    ppl = perplexity(model, cfg.text, max_tokens=cfg.quality_tokens, window=cfg.window, tokenizer=tok)
                    row["quality"] = {"metric": "perplexity", "value": ppl, "higher_is_better": False,
                                      "text": "built-in" if cfg.text is None else "user",
                                      "tokens": min(cfg.quality_tokens, token_ids(tok, _data.resolve_text(cfg.text)).numel()),
                                      "window": cfg.window}
                else:
                    recall, embeddings = retrieval_recall(model, tokenizer=tok)
                    row["quality"] = {"metric": "recall@1", "value": recall, "higher_is_better": True,
                                      "task": f"match {len(_data.doc_pairs())} standard-library function names to their docstring lines"}
        row["peak_memory_bytes"] = wbytes + peak.peak_bytes
        row["peak_memory"] = {"transient_bytes": peak.peak_bytes, "method": f"weight bytes + transient peak ({peak.method})"}
        if cfg.flops:
            row["flops_per_token"] = flops_per_token(model, ids)
    finally:
        model.train(was_training)
        trim_heap()  # the measurements' activations: variants measured one after another stay lean
    return row, embeddings


def _unique_names(models, names) -> list[str]:
    from ..models import model_name

    if names is None:
        names = [model_name(m) for m in models]
    names = [str(n) for n in names]
    if len(names) != len(models):
        raise ValueError(f"got {len(models)} models but {len(names)} names; give one name per model")
    counts: Counter = Counter()
    out = []
    for n in names:
        counts[n] += 1
        out.append(n if counts[n] == 1 else f"{n}#{counts[n]}")
    return out


def measure_model(model, name: str | None = None, config: AuditConfig | None = None, **options) -> dict:
    """One report row for ``model`` (see ``AuditConfig`` for the options)."""
    cfg = config or AuditConfig.from_kwargs(**options)
    return _measure(model, _unique_names([model], [name] if name else None)[0], cfg)[0]


def audit(model, *, name: str | None = None, config: AuditConfig | None = None, **options):
    """Report of one model's costs: parameters, weight bytes, peak memory, speed, quality, FLOPs, energy."""
    from ..models import check_model

    check_model(model)
    return compare(model, names=[name] if name else None, config=config, **options)


def compare(*models, names=None, config: AuditConfig | None = None, title: str | None = None, **options):
    """One Report over several variants; the first is the baseline that ratios refer to.

    Encoders are also scored on how well their embeddings agree with the baseline's (cosine and
    the share of 5 nearest neighbours kept).
    """
    from ..models import model_kind
    from ..report import Report
    from .env import environment

    if len(models) == 1 and isinstance(models[0], (list, tuple)):
        models = tuple(models[0])
    if not models:
        raise ValueError("compare needs at least one model")
    cfg = config or AuditConfig.from_kwargs(**options)
    labels = _unique_names(models, names)
    kinds = {model_kind(m) for m in models}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare models of different kinds in one report: {sorted(kinds)}")
    rows, base_emb = [], None
    for i, (m, label) in enumerate(zip(models, labels)):
        row, emb = _measure(m, label, cfg)
        if emb is not None:
            if i == 0:
                base_emb = emb
            elif base_emb is not None:
                row["quality"]["agreement"] = embedding_agreement(base_emb, emb) | {"baseline": labels[0]}
        rows.append(row)
    env = environment(rows[0]["device"])
    env["audit"] = cfg.to_dict()
    env["corpus"] = _data.describe()
    return Report(rows, env, title=title)


@contextlib.contextmanager
def measure_region(device: str | None = None):
    """Measure the code inside: wall time, peak memory (CPU and CUDA), energy. Yields a dict filled on exit."""
    torch = sys.modules.get("torch")  # a cell that never loaded torch is measured without loading it
    dev = device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    result: dict = {"device": dev}
    cpu_peak = PeakMemory("cpu")
    gpu_peak = PeakMemory("cuda") if dev.startswith("cuda") else None
    meter = EnergyMeter(dev)
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_peak)
        if gpu_peak:
            stack.enter_context(gpu_peak)
        stack.enter_context(meter)
        t0 = time.perf_counter()
        try:
            yield result
        finally:
            _sync(dev)
            result["wall_s"] = time.perf_counter() - t0
    result["cpu_peak_bytes"] = cpu_peak.peak_bytes
    result["cpu_peak_method"] = cpu_peak.method
    result["gpu_peak_bytes"] = gpu_peak.peak_bytes if gpu_peak else None
    result["energy_joules"] = meter.joules
    result["energy_method"] = meter.method
    result["energy_reason"] = meter.reason
