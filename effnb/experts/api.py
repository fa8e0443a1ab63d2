"""``effnb.moe`` and ``effnb.moe_stats``: the one entry point each, shared by the magic and the CLI.

``moe`` turns a dense model into a Mixture-of-Experts (split or upcycle) through the technique
runner (``effnb.technique``), then measures it against the dense model: the usual before/after
report plus, for each top_k of the sweep, perplexity, active FFN parameters and FLOPs per token
(analytic and counted), and the measured time of all FFN blocks (``sweep.py``).
"""

from __future__ import annotations

import logging
import time

from ..options import reject_unknown
from .config import MoEConfig, MoEStatsConfig
from .methods import get_method
from .sweep import collect_inputs, token_windows

log = logging.getLogger(__name__)

def _config(experts, top_k, method, name, options) -> MoEConfig:
    reject_unknown(MoEConfig, "moe", options)
    for what, v in (("experts", experts), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{what} must be an integer, got {v!r}")
    if experts < 1:
        raise ValueError(f"experts must be at least 1, got {experts}")
    if top_k <= 0:
        raise ValueError(f"top_k must be at least 1 (experts each token uses), got {top_k}")
    if top_k > experts:
        raise ValueError(f"top_k={top_k} is more than experts={experts}; choose top_k from 1 to {experts}")
    return MoEConfig(experts=experts, top_k=top_k, method=method, name=name, **options)


def moe(model, experts: int = 8, top_k: int = 2, method: str = "split", *, name: str | None = None,
        audit: dict | None = None, **options):
    """Turn ``model``'s dense FFNs into Mixture-of-Experts blocks; returns a ``Result``.

    ``method="split"`` partitions each FFN's neurons into ``experts`` equal groups (``experts`` must
    divide the FFN size) and routes each token to ``top_k`` of them; ``top_k == experts`` is the
    dense model. ``method="upcycle"`` copies each FFN into ``experts`` experts behind a new router;
    at initialisation it equals the dense model, and ``effnb.experts.aux_loss(model)`` gives the
    load-balancing loss to add while fine-tuning. Other options: see ``MoEConfig`` (``inplace``,
    ``measure`` included); ``audit``: options of the before/after report (``effnb.AuditConfig``
    fields). The input model is never changed unless ``inplace=True``.
    """
    from ..measure import AuditConfig
    from ..models import check_model, copy_model
    from ..technique import run_technique
    from ..torch_utils import trim_heap
    from .ffn import find_ffns

    check_model(model)
    cfg = _config(experts, top_k, method, name, options)
    audit_cfg = AuditConfig.from_kwargs(**({"quality_tokens": cfg.quality_tokens} | dict(audit or {})))
    _check_sizes(find_ffns(model), cfg)  # errors (no FFN, sizes) before any work
    trim_heap()  # what earlier work left in the heap, before this adds a model
    t0 = time.perf_counter()
    return run_technique(model, cfg, lambda new: _convert(new, cfg, audit_cfg, t0),
                         copy=lambda m: copy_model(m, share_parameters=cfg.share_unchanged))


def _check_sizes(specs, cfg: MoEConfig) -> None:
    if not get_method(cfg.method).equal_experts:
        return
    bad = sorted({s.intermediate for s in specs if s.intermediate % cfg.experts})
    if bad:
        divisors = [d for d in range(2, 129) if all(s.intermediate % d == 0 for s in specs)]
        raise ValueError(f"experts={cfg.experts} does not divide the FFN size {bad[0]}: split makes equal experts "
                         f"and drops no neuron; choose experts from {', '.join(map(str, divisors[:16])) or '1'} "
                         "(or use method='upcycle', which has no such constraint)")


def _convert(new, cfg: MoEConfig, audit_cfg, t0: float):
    """The runner's transform: ``new``'s FFNs replaced by MoE blocks; returns the ``technique.Change``."""
    from ..technique import Change
    from ..torch_utils import trim_heap
    from .ffn import find_ffns, install
    from .sweep import add_sweep

    specs = find_ffns(new)
    shape = {"ffn_parameters": sum(s.parameters() for s in specs),
             "ffn_flops_per_token": sum(s.flops_per_token() for s in specs),
             "gated": specs[0].gated, "hidden": specs[0].hidden, "ffn_size": specs[0].intermediate}
    blocks = _build_blocks(new, specs, cfg)
    for spec, block in zip(specs, blocks):  # only now is the model changed
        install(new, spec, block)
    if new.training:
        new.eval()
    del specs, spec  # they hold the replaced FFN weights: free them (a copy's: 318 MB on SmolLM2) before measuring
    trim_heap()  # and the calibration's activations
    info = _info(new, blocks, cfg, shape, time.perf_counter() - t0)
    label = f"moe-{cfg.method} top-{cfg.top_k}/{cfg.experts}"
    if not cfg.measure:
        return Change(new, label, f"Mixture-of-Experts ({cfg.method}), not measured",
                      rows=({}, {"extra": {"moe": info}}), details=info)
    title = f"Mixture-of-Experts: {cfg.method}, top-{cfg.top_k} of {cfg.experts} experts"
    return Change(new, label, title, audit=audit_cfg, details=info,
                  finish=lambda change, report, baseline: add_sweep(change, report, baseline, cfg, audit_cfg, info))


def _build_blocks(new, specs, cfg: MoEConfig) -> list:
    """One MoE block per FFN spec (the model is not changed yet)."""
    from ..data import calibration_texts, resolve_text

    method = get_method(cfg.method)
    inputs = [None] * len(specs)
    if method.needs_inputs(cfg):
        text = resolve_text(cfg.calibration, default=lambda: "\n\n".join(calibration_texts(10_000)))
        inputs = collect_inputs(new, specs, token_windows(new, text, cfg.calibration_tokens))
    return [method.build(spec, cfg, i, inputs[i]) for i, spec in enumerate(specs)]


def _info(new, blocks, cfg: MoEConfig, shape: dict, build_s: float) -> dict:
    """The MoE facts of the report's new row and of ``Result.details``."""
    all_params = sum(p.numel() for p in new.parameters())
    moe_params = sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    return {
        "method": cfg.method, "experts": cfg.experts, "top_k": cfg.top_k, "router": cfg.router,
        "clustering": cfg.clustering if get_method(cfg.method).clustering else None,
        "combine": blocks[0].combine, "ffn_blocks": len(blocks), "ffn_kind": "SwiGLU" if shape["gated"] else "plain",
        "hidden": shape["hidden"], "ffn_size": shape["ffn_size"], "expert_size": blocks[0].expert_size,
        "dense_ffn_parameters": shape["ffn_parameters"],
        "moe_ffn_parameters": moe_params,
        "total_parameters": all_params,
        "active_parameters_per_token": all_params - moe_params + sum(b.active_parameters() for b in blocks),
        "dense_ffn_flops_per_token": shape["ffn_flops_per_token"],
        "moe_ffn_flops_per_token": sum(b.flops_per_token() for b in blocks),
        "build_seconds": build_s,
        "grouped_matmul": _backend_name(blocks[0]),
        "config": cfg.to_dict(),
    }


def _backend_name(block) -> str:
    from .block import grouped_backend

    return grouped_backend(block.w_in.new_zeros(1, block.hidden), block.w_in)


def moe_stats(model, text=None, *, max_tokens: int = 512, window: int = 512, show_tokens: int = 48, name=None):
    """Routing statistics of an MoE model over ``text`` (effnb's MoE blocks, or transformers' Mixtral,
    Qwen2-MoE, OLMoE and other top-k routers). Returns ``MoEStats`` (HTML table, heatmap, JSON)."""
    from ..models import check_model
    from .stats import routing_stats

    check_model(model)
    cfg = MoEStatsConfig(text=text, max_tokens=max_tokens, window=window, show_tokens=show_tokens)
    return routing_stats(model, cfg.text, max_tokens=cfg.max_tokens, window=cfg.window, show_tokens=cfg.show_tokens,
                         name=name)
