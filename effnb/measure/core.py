"""Audit one model or compare several: every measurement of ``effnb.measure`` gathered into rows.

Any model can be measured. With a tokenizer (attached, or found where the model came from), an LM
gets perplexity and an encoder retrieval recall on effnb's built-in text. Without one, speed is
measured on fixed token ids and quality as agreement with the first model of the comparison
(``agreement.py``). A module that is not a transformers model runs on ``example_inputs`` (given,
attached with ``effnb.attach_example_inputs``, or inferred when its first layer is a Linear).
With speed, quality and FLOPs all switched off nothing is run at all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass

from .. import data as _data
from .config import AuditConfig
from .energy import EnergyMeter
from .memory import PeakMemory, count_parameters, weight_bytes
from .quality import embedding_agreement, perplexity, retrieval_recall, token_ids


@dataclass
class _Subject:
    """One model to measure and what it runs on."""

    model: object
    name: str
    kind: str  # "causal-lm" | "encoder" | "module"
    tokenizer: object | None
    inputs: object | None  # token ids [1, T] or the module's example inputs
    inputs_note: str


def _dominant_dtype(by_dtype: dict[str, int]) -> str:
    return max(by_dtype, key=by_dtype.get) if by_dtype else "unknown"


def _needs_run(cfg: AuditConfig) -> bool:
    return cfg.speed or cfg.quality or cfg.flops


def _check_positions(model, cfg: AuditConfig, kind: str) -> None:
    from .inputs import max_positions

    limit = max_positions(model)
    if limit is None or kind == "module":
        return
    n = cfg.prompt_tokens + (cfg.decode_tokens if kind == "causal-lm" else 0)
    if cfg.speed or cfg.flops:
        if n > limit:
            what = "prompt_tokens + decode_tokens" if kind == "causal-lm" else "prompt_tokens"
            raise ValueError(f"{what} = {n} exceeds this model's {limit} positions (max_position_embeddings); "
                             f"use at most {limit} in all")


def _window(model, cfg: AuditConfig) -> int:
    """The quality window: ``cfg.window``, cut to the model's positions (windows only chunk the text)."""
    from .inputs import max_positions

    limit = max_positions(model)
    return min(cfg.window, limit) if limit else cfg.window


def _subject(model, name: str, cfg: AuditConfig, example_inputs=None) -> _Subject:
    from ..models import find_tokenizer, model_kind
    from ..torch_utils import device_of
    from .agreement import to_device
    from .inputs import fixed_token_ids, token_ids_for

    kind = model_kind(model)
    tok = find_tokenizer(model) if kind != "module" else None
    if not _needs_run(cfg):
        return _Subject(model, name, kind, tok, None, "nothing run")
    _check_positions(model, cfg, kind)
    device = device_of(model)
    if kind == "module":
        given = _module_inputs(model, example_inputs)
        return _Subject(model, name, kind, None, to_device(given.inputs, device), given.note)
    if tok is None:
        ids, note = fixed_token_ids(model, cfg.prompt_tokens), f"{cfg.prompt_tokens} fixed token ids (no tokenizer)"
    else:
        ids, note = token_ids_for(model, cfg.prompt_tokens)
    return _Subject(model, name, kind, tok, ids.unsqueeze(0).to(device), note)


def _module_inputs(model, example_inputs):
    from ..models import example_inputs_for

    if isinstance(example_inputs, _Given):
        return example_inputs
    if example_inputs is not None:
        return _Given(example_inputs, "example inputs given")
    found, note = example_inputs_for(model)
    if found is None:
        raise ValueError(f"effnb cannot tell what this {type(model).__name__} takes as input (it is not a "
                         "transformers model); pass example_inputs=... (a tensor, a tuple or a dict of tensors), "
                         "or attach them once with effnb.attach_example_inputs(model, inputs)")
    return _Given(found, note)


@dataclass
class _Given:
    """Inputs found once for the baseline and shared by every variant of a comparison."""

    inputs: object
    note: str


def _quality(s: _Subject, cfg: AuditConfig, reference: _Subject | None) -> tuple[dict, object]:
    """(quality dict, encoder document embeddings or None)."""
    if s.tokenizer is not None and s.kind == "causal-lm":
        window = _window(s.model, cfg)
        ppl = perplexity(s.model, cfg.text, max_tokens=cfg.quality_tokens, window=window, tokenizer=s.tokenizer)
        n = min(cfg.quality_tokens, token_ids(s.tokenizer, _data.resolve_text(cfg.text)).numel())
        return {"metric": "perplexity", "value": ppl, "higher_is_better": False,
                "text": "built-in" if cfg.text is None else "user", "tokens": n, "window": window}, None
    if s.tokenizer is not None:
        recall, embeddings = retrieval_recall(s.model, tokenizer=s.tokenizer)
        return {"metric": "recall@1", "value": recall, "higher_is_better": True,
                "task": f"match {len(_data.doc_pairs())} standard-library function names to their docstring lines"}, \
            embeddings
    return _agreement_quality(s, cfg, reference), None


def _agreement_quality(s: _Subject, cfg: AuditConfig, reference: _Subject | None) -> dict:
    from . import agreement as A
    from .inputs import fixed_token_ids

    why = "no tokenizer" if s.kind != "module" else "not a transformers model"
    if s.kind == "causal-lm":
        q = {"metric": "top-1 agreement", "higher_is_better": True}
        work = lambda ref: A.lm_agreement(ref, s.model, fixed_token_ids(s.model, cfg.quality_tokens),  # noqa: E731
                                          min(_window(s.model, cfg), cfg.quality_tokens))
        what = f"next-token agreement with the original on {cfg.quality_tokens:,} fixed token ids"
        same = {"kl_divergence": 0.0, "top1_agreement": 1.0}
    elif s.kind == "encoder":
        q = {"metric": "cosine to original", "higher_is_better": True}
        seq_len = min(32, _window(s.model, cfg))
        seqs = fixed_token_ids(s.model, 64 * seq_len).reshape(64, seq_len)
        work = lambda ref: A.encoder_agreement(ref, s.model, seqs)  # noqa: E731
        what = f"mean-pooled hidden states of 64 fixed {seq_len}-token sequences"
        same = {"cosine": 1.0, "top5_agreement": 1.0}
    else:
        q = {"metric": "relative output error", "higher_is_better": False}
        work = lambda ref: A.output_error(ref, s.model, s.inputs)  # noqa: E731
        what = f"outputs on the {s.inputs_note}"
        same = {"relative_error": 0.0, "max_abs_diff": 0.0}
    key = {"top-1 agreement": "top1_agreement", "cosine to original": "cosine",
           "relative output error": "relative_error"}[q["metric"]]
    q["method"] = f"{why}: {what}"
    if reference is None:
        return q | {"value": None, "reason": f"{why}: quality is measured as agreement with the original model, "
                                             "which a single audit does not have (compare it with a variant)"}
    if reference.model is s.model:
        return q | same | {"value": same[key], "reference": "itself (the baseline)"}
    found = work(reference.model)
    return q | found | {"value": found[key], "reference": reference.name}


def _base_row(s: _Subject, cfg: AuditConfig, wbytes: int, by_dtype: dict, by_module: dict) -> dict:
    from ..torch_utils import device_of  # here: this module loads without torch (%%efficient, AuditConfig)

    total, trainable = count_parameters(s.model)
    causal = s.kind == "causal-lm"
    return {
        "name": s.name, "model_class": type(s.model).__name__, "kind": s.kind,
        "device": str(device_of(s.model)), "dtype": _dominant_dtype(by_dtype),
        "parameters": total, "trainable_parameters": trainable,
        "weight_bytes": wbytes, "weight_bytes_by_dtype": by_dtype, "weight_bytes_by_module": by_module,
        "peak_memory_bytes": None, "peak_memory": None,
        "prompt_tokens": cfg.prompt_tokens if s.kind != "module" else None, "inputs": s.inputs_note,
        "tokenizer": "attached or found" if s.tokenizer is not None else "none",
        "prefill_ms": None, "prefill_ms_spread": None,
        "decode_tokens": cfg.decode_tokens if causal else None, "decode_tokens_per_s": None, "decode_spread": None,
        "bytes_per_token": None, "read_bandwidth_bytes_per_s": None, "bandwidth_fraction": None,
        "quality": None, "flops_per_token": None,
        "energy": {"joules_per_token": None, "method": "not measured", "reason": "energy measurement switched off"},
        "extra": {},
    }


def _measure(s: _Subject, cfg: AuditConfig, reference: _Subject | None = None):
    """One report row for subject ``s`` and the encoder's document embeddings (None otherwise)."""
    import torch

    from ..torch_utils import device_of, eval_mode, trim_heap
    from .bandwidth import decode_bandwidth
    from .flops import flops_per_token
    from .speed import energy, speed

    wbytes, by_dtype, by_module = weight_bytes(s.model)
    row = _base_row(s, cfg, wbytes, by_dtype, by_module)
    if not _needs_run(cfg):
        row["peak_memory_bytes"] = wbytes
        row["peak_memory"] = {"transient_bytes": 0, "method": "weight bytes only: nothing was run (measurement off)"}
        row["quality"] = {"metric": "not measured", "value": None, "reason": "measurement switched off"}
        return row, None
    model, device, embeddings = s.model, device_of(s.model), None
    try:
        with eval_mode(model):
            with torch.inference_mode():  # touch every weight once: memory-mapped checkpoints are paged in
                _warm(s)                  # here, not counted as the run's transient memory
            peak = PeakMemory(str(device))
            with peak:
                if cfg.speed:
                    sp = speed(model, s.kind, s.inputs, cfg, device)
                    work = sp.pop("_energy_work")
                    row.update(sp)
                    if cfg.energy:
                        row["energy"] = energy(work, device)
                if cfg.quality:
                    row["quality"], embeddings = _quality(s, cfg, reference)
            row["peak_memory_bytes"] = wbytes + peak.peak_bytes
            row["peak_memory"] = {"transient_bytes": peak.peak_bytes,
                                  "method": f"weight bytes + transient peak ({peak.method})"}
            if cfg.flops and s.kind != "module":
                row["flops_per_token"] = flops_per_token(model, s.inputs)
        # outside the peak-memory region: the bandwidth tensor (measured once per process) is no model's memory
        row.update(decode_bandwidth(model, row["decode_tokens_per_s"], str(device)))
    finally:
        trim_heap()  # the measurements' activations: variants measured one after another stay lean
    return row, embeddings


def _warm(s: _Subject) -> None:
    from .agreement import call_model

    if s.kind == "module":
        call_model(s.model, s.inputs)
    else:
        s.model(input_ids=s.inputs[:, :8])


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


def measure_model(model, name: str | None = None, config: AuditConfig | None = None, *, example_inputs=None,
                  **options) -> dict:
    """One report row for ``model`` (see ``AuditConfig`` for the options)."""
    from ..models import check_model

    check_model(model)
    cfg = config or AuditConfig.from_kwargs(**options)
    label = _unique_names([model], [name] if name else None)[0]
    return _measure(_subject(model, label, cfg, example_inputs), cfg)[0]


def audit(model, *, name: str | None = None, config: AuditConfig | None = None, example_inputs=None, **options):
    """Report of one model's costs: parameters, weight bytes, peak memory, speed, quality, FLOPs, energy.

    ``example_inputs``: what a module that is not a transformers model runs on (tensor, tuple or dict).
    """
    from ..models import check_model

    check_model(model)
    return compare(model, names=[name] if name else None, config=config, example_inputs=example_inputs, **options)


def compare(*models, names=None, config: AuditConfig | None = None, title: str | None = None, example_inputs=None,
            **options):
    """One Report over several variants; the first is the baseline that ratios refer to.

    Encoders with a tokenizer are also scored on how well their embeddings agree with the
    baseline's (cosine and the share of 5 nearest neighbours kept); models without one are scored
    by agreement with the baseline's outputs.
    """
    from ..models import check_model, model_kind
    from ..report import Report
    from .bandwidth import read_bandwidth
    from .env import environment

    if len(models) == 1 and isinstance(models[0], (list, tuple)):
        models = tuple(models[0])
    if not models:
        raise ValueError("compare needs at least one model")
    for m in models:
        check_model(m)
    cfg = config or AuditConfig.from_kwargs(**options)
    labels = _unique_names(models, names)
    kinds = {model_kind(m) for m in models}
    if len(kinds) > 1:
        raise ValueError(f"cannot compare models of different kinds in one report: {sorted(kinds)}")
    if kinds == {"module"} and example_inputs is None and _needs_run(cfg):
        example_inputs = _module_inputs(models[0], None)  # every variant runs on the baseline's inputs
    subjects = [_subject(m, label, cfg, example_inputs) for m, label in zip(models, labels)]
    rows, base_emb = [], None
    for i, s in enumerate(subjects):
        reference = subjects[0] if len(subjects) > 1 else None
        row, emb = _measure(s, cfg, reference)
        if emb is not None:
            if i == 0:
                base_emb = emb
            elif base_emb is not None:
                row["quality"]["agreement"] = embedding_agreement(base_emb, emb) | {"baseline": labels[0]}
        rows.append(row)
    env = environment(rows[0]["device"])
    if any(r["read_bandwidth_bytes_per_s"] is not None for r in rows):
        env["read_bandwidth"] = read_bandwidth(rows[0]["device"])  # the figure the rows used, kept from their run
    env["audit"] = cfg.to_dict()
    env["corpus"] = _data.describe()
    return Report(rows, env, title=title)


@contextlib.contextmanager
def measure_region(device: str | None = None):
    """Measure the code inside: wall time, peak memory (CPU and CUDA), energy. Yields a dict filled on exit."""
    from .speed import sync

    torch = sys.modules.get("torch")  # a cell that never loaded torch is measured without loading it
    dev = device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    result: dict = {"device": dev}
    # a measured cell may itself run audits (or wait on a thread that does): it never blocks them
    cpu_peak = PeakMemory("cpu", exclusive=False)
    gpu_peak = PeakMemory("cuda", exclusive=False) if dev.startswith("cuda") else None
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
            sync(dev)
            result["wall_s"] = time.perf_counter() - t0
    result["cpu_peak_bytes"] = cpu_peak.peak_bytes
    result["cpu_peak_method"] = cpu_peak.method
    result["gpu_peak_bytes"] = gpu_peak.peak_bytes if gpu_peak else None
    result["energy_joules"] = meter.joules
    result["energy_method"] = meter.method
    result["energy_reason"] = meter.reason
