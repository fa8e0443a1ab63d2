"""``effnb.moe`` and ``effnb.moe_stats``: the one entry point each, shared by the magic and the CLI.

``moe`` turns a dense model into a Mixture-of-Experts (split or upcycle), then measures it against
the dense model: the usual before/after report, plus, for each top_k of the sweep, perplexity,
active FFN parameters and FLOPs per token (analytic and counted), and the measured time of all
FFN blocks, dense and MoE, at ``ffn_tokens`` tokens in one interleaved run.
"""

from __future__ import annotations

import logging
import statistics
import time

from ..options import reject_unknown
from .config import MoEConfig, MoEStatsConfig

log = logging.getLogger(__name__)


def _config(experts, top_k, method, options) -> MoEConfig:
    reject_unknown(MoEConfig, "moe", options)
    for name, v in (("experts", experts), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if experts < 1:
        raise ValueError(f"experts must be at least 1, got {experts}")
    if top_k <= 0:
        raise ValueError(f"top_k must be at least 1 (experts each token uses), got {top_k}")
    if top_k > experts:
        raise ValueError(f"top_k={top_k} is more than experts={experts}; choose top_k from 1 to {experts}")
    return MoEConfig(experts=experts, top_k=top_k, method=method, **options)


def text_ids(model, text, max_tokens: int):
    """The first ``max_tokens`` token ids of ``text``; fixed ids from the vocabulary when the model has no tokenizer."""
    from ..measure.inputs import fixed_token_ids
    from ..measure.quality import token_ids
    from ..models import find_tokenizer

    tok = find_tokenizer(model)
    if tok is None:
        return fixed_token_ids(model, max_tokens)
    return token_ids(tok, text)[:max_tokens]


def _token_windows(model, text, max_tokens: int):
    ids = text_ids(model, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError(f"the calibration text gives {ids.numel()} token(s); at least 2 are needed")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512
    win = min(512, int(limit))
    return [ids[i : i + win] for i in range(0, ids.numel(), win) if ids[i : i + win].numel() >= 2]


def collect_inputs(model, specs, windows) -> list:
    """The FFN inputs [T, H] of every FFN in ``specs`` over the token ``windows`` (one forward each)."""
    import torch

    from ..models import model_kind

    store: list[list] = [[] for _ in specs]
    hooks = []
    for i, spec in enumerate(specs):
        mod = model.get_submodule(spec.input_name)
        hooks.append(mod.register_forward_pre_hook(
            lambda _m, args, i=i: store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())))
    device = _device(model)
    extra = {"use_cache": False} if model_kind(model) == "causal-lm" else {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w.unsqueeze(0).to(device), **extra)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


def set_top_k(model, top_k: int) -> None:
    """Route every effnb MoE block of ``model`` to ``top_k`` experts (in place)."""
    from .block import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("set_top_k: the model has no effnb MoE blocks")
    experts = blocks[0][1].experts
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be an integer from 1 to experts={experts}, got {top_k!r}")
    for _, b in blocks:
        b.top_k = top_k


# --------------------------------------------------------------------------- measurements


def _ffn_times(dense_fns, blocks, inputs, ks, repeats: int) -> dict:
    """Median wall time (ms) of all FFN blocks, dense and at each top_k, in one interleaved run."""
    import torch

    def run_dense():
        for f, x in zip(dense_fns, inputs):
            f(x)

    def run_moe():
        for b, x in zip(blocks, inputs):
            b(x)

    samples: dict = {"dense": [], **{k: [] for k in ks}}
    with torch.inference_mode():
        for k in ks:  # warm-up: one pass of each variant
            for b in blocks:
                b.top_k = k
            run_moe()
        run_dense()
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_dense()
            samples["dense"].append(time.perf_counter() - t0)
            for k in ks:
                for b in blocks:
                    b.top_k = k
                t0 = time.perf_counter()
                run_moe()
                samples[k].append(time.perf_counter() - t0)
    return {key: {"median_ms": statistics.median(v) * 1e3, "samples_ms": [s * 1e3 for s in v]}
            for key, v in samples.items()}


def _sweep(original, new, specs, cfg: MoEConfig, eval_ids, audit_cfg, measured: dict) -> tuple[list[dict], dict]:
    """Perplexity, active FFN parameters, FLOPs per token and FFN time for each top_k of the sweep.

    One MoE model serves every top_k: its blocks are re-routed in place (``set_top_k``) and put back
    to ``cfg.top_k`` afterwards, so nothing is split twice and no copy is made. ``measured`` holds
    perplexities the report already measured ({"dense": .., cfg.top_k: ..}), which are reused.
    """
    from ..data import resolve_text
    from ..measure.flops import flops_per_token
    from ..measure.quality import perplexity
    from ..models import find_tokenizer, model_kind
    from .block import moe_blocks

    causal = model_kind(new) == "causal-lm" and find_tokenizer(new) is not None  # perplexity needs text
    blocks = [b for _, b in moe_blocks(new)]
    dense_ffn_params = sum(s.parameters() for s in specs)

    def ppl(model, key):
        if not causal:
            return None
        if measured.get(key) is not None:
            return measured[key]
        return perplexity(model, audit_cfg.text, max_tokens=cfg.quality_tokens, window=audit_cfg.window,
                          tokenizer=find_tokenizer(new))

    # FFN time: the dense FFNs of the original and the MoE blocks, on the same real FFN inputs
    ffn_ids = _token_windows(original, resolve_text(audit_cfg.text), cfg.ffn_tokens)[:1]
    inputs = collect_inputs(original, specs, ffn_ids)
    rows = []
    try:
        for k in cfg.sweep_values():
            set_top_k(new, k)
            row = {
                "top_k": k,
                "active_ffn_parameters": sum(b.active_parameters() for b in blocks),
                "ffn_flops_per_token": sum(b.flops_per_token() for b in blocks),
                "flops_per_token_counted": flops_per_token(new, eval_ids),
                "perplexity": ppl(new, k),
            }
            row["active_ffn_share"] = row["active_ffn_parameters"] / dense_ffn_params
            rows.append(row)
        times = _ffn_times([s.forward for s in specs], blocks, inputs, cfg.sweep_values(), cfg.timing_repeats)
    finally:
        set_top_k(new, cfg.top_k)
    dense = {
        "ffn_parameters": dense_ffn_params,
        "ffn_flops_per_token": sum(s.flops_per_token() for s in specs),
        "flops_per_token_counted": flops_per_token(original, eval_ids),
        "perplexity": ppl(original, "dense"),
        "ffn_ms": times["dense"]["median_ms"],
        "ffn_ms_samples": times["dense"]["samples_ms"],
        "ffn_tokens": int(inputs[0].shape[0]),
    }
    for row in rows:
        row["ffn_ms"] = times[row["top_k"]]["median_ms"]
        row["ffn_ms_samples"] = times[row["top_k"]]["samples_ms"]
        row["ffn_time_vs_dense"] = row["ffn_ms"] / dense["ffn_ms"]
    return rows, dense


def _sweep_figure(rows, dense, title):
    def make():
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        causal = dense["perplexity"] is not None
        fig = make_subplots(rows=1, cols=2, subplot_titles=[
            "perplexity vs active FFN share" if causal else "FLOPs per token vs top_k",
            f"FFN blocks time at {dense['ffn_tokens']} tokens (ms, measured)"])
        x = [r["active_ffn_share"] for r in rows]
        labels = [f"top-{r['top_k']}" for r in rows]
        if causal:
            fig.add_trace(go.Scatter(x=x, y=[r["perplexity"] for r in rows], mode="lines+markers+text", text=labels,
                                     textposition="top center", name="MoE"), row=1, col=1)
            fig.add_hline(y=dense["perplexity"], line_dash="dot", annotation_text="dense", row=1, col=1)
            fig.update_xaxes(title_text="active FFN parameters / dense", row=1, col=1)
        else:
            fig.add_trace(go.Bar(x=labels, y=[r["ffn_flops_per_token"] for r in rows], name="FFN FLOPs"), row=1, col=1)
        fig.add_trace(go.Bar(x=["dense", *labels], y=[dense["ffn_ms"], *[r["ffn_ms"] for r in rows]],
                             name="FFN time", showlegend=False), row=1, col=2)
        fig.update_layout(height=340, title_text=title, margin={"t": 60, "b": 30, "l": 40, "r": 10})
        return fig

    return make


# --------------------------------------------------------------------------- public API


def moe(model, experts: int = 8, top_k: int = 2, method: str = "split", *, inplace: bool = False,
        name: str | None = None, audit: dict | None = None, **options):
    """Turn ``model``'s dense FFNs into Mixture-of-Experts blocks; returns a ``Result``.

    ``method="split"`` partitions each FFN's neurons into ``experts`` equal groups (``experts`` must
    divide the FFN size) and routes each token to ``top_k`` of them; ``top_k == experts`` is the
    dense model. ``method="upcycle"`` copies each FFN into ``experts`` experts behind a new router;
    at initialisation it equals the dense model, and ``effnb.experts.aux_loss(model)`` gives the
    load-balancing loss to add while fine-tuning. Other options: see ``MoEConfig``; ``audit``:
    options of the before/after report (``effnb.AuditConfig`` fields). The input model is never
    changed unless ``inplace=True``.
    """
    from ..data import calibration_texts, resolve_text
    from ..measure import AuditConfig
    from ..models import check_model, copy_model, model_name
    from ..report import Result
    from .ffn import find_ffns, install
    from .split import split_ffn
    from .upcycle import upcycle_ffn

    check_model(model)
    cfg = _config(experts, top_k, method, options)
    if inplace and cfg.share_unchanged:
        raise ValueError("share_unchanged applies to a new model; with inplace=True there is nothing to share")
    audit_opts = {"quality_tokens": cfg.quality_tokens} | dict(audit or {})
    audit_cfg = AuditConfig.from_kwargs(**audit_opts)
    specs_in = find_ffns(model)  # errors (no FFN, sizes) before any work
    if cfg.method == "split":
        bad = sorted({s.intermediate for s in specs_in if s.intermediate % cfg.experts})
        if bad:
            divisors = [d for d in range(2, 129) if all(s.intermediate % d == 0 for s in specs_in)]
            raise ValueError(f"experts={cfg.experts} does not divide the FFN size {bad[0]}: split makes equal experts "
                             f"and drops no neuron; choose experts from {', '.join(map(str, divisors[:16])) or '1'} "
                             "(or use method='upcycle', which has no such constraint)")
    from ..measure.memory import trim_heap

    total_ffn = sum(s.parameters() for s in specs_in)
    dense_ffn_flops = sum(s.flops_per_token() for s in specs_in)
    del specs_in  # with inplace=True they would keep the replaced weights alive
    trim_heap()  # what earlier work left in the heap, before this adds a model
    t0 = time.perf_counter()
    # the dense snapshot for the measurements shares every tensor with the input: nothing here
    # changes a tensor's values, the FFN modules are replaced
    baseline = copy_model(model, share_parameters=True) if (inplace and cfg.measure) else model
    new = model if inplace else copy_model(model, share_parameters=cfg.share_unchanged)
    specs = find_ffns(new)
    inputs = [None] * len(specs)
    if cfg.method == "split" and (cfg.router == "calibration" or cfg.clustering == "activations"):
        text = resolve_text(cfg.calibration, default=lambda: "\n\n".join(calibration_texts(10_000)))
        inputs = collect_inputs(new, specs, _token_windows(new, text, cfg.calibration_tokens))
    blocks = []
    for i, spec in enumerate(specs):
        if cfg.method == "split":
            block, _ = split_ffn(spec, cfg.experts, cfg.top_k, clustering=cfg.clustering, router=cfg.router,
                                 x=inputs[i], seed=cfg.seed + i, aux_loss_coef=cfg.aux_loss_coef)
        else:
            block = upcycle_ffn(spec, cfg.experts, cfg.top_k, router_std=cfg.router_std,
                                expert_noise=cfg.expert_noise, seed=cfg.seed + i, aux_loss_coef=cfg.aux_loss_coef)
        blocks.append(block)
    del inputs
    for spec, block in zip(specs, blocks):  # only now is the model changed
        install(new, spec, block)
    if new.training:
        new.eval()
    gated, hidden, ffn_size = specs[0].gated, specs[0].hidden, specs[0].intermediate
    del specs, spec  # they hold the replaced FFN weights: free them (a copy's: 318 MB on SmolLM2) before measuring
    trim_heap()  # and the calibration's activations

    build_s = time.perf_counter() - t0

    all_params = sum(p.numel() for p in new.parameters())
    active = all_params - sum(sum(p.numel() for p in b.parameters()) for b in blocks) + sum(
        b.active_parameters() for b in blocks)
    info = {
        "method": cfg.method, "experts": cfg.experts, "top_k": cfg.top_k, "router": cfg.router,
        "clustering": cfg.clustering if cfg.method == "split" else None,
        "combine": blocks[0].combine, "ffn_blocks": len(blocks), "ffn_kind": "SwiGLU" if gated else "plain",
        "hidden": hidden, "ffn_size": ffn_size, "expert_size": blocks[0].expert_size,
        "dense_ffn_parameters": total_ffn,
        "moe_ffn_parameters": sum(sum(p.numel() for p in b.parameters()) for b in blocks),
        "total_parameters": all_params,
        "active_parameters_per_token": active,
        "dense_ffn_flops_per_token": dense_ffn_flops,
        "moe_ffn_flops_per_token": sum(b.flops_per_token() for b in blocks),
        "build_seconds": build_s,
        "grouped_matmul": _backend_name(blocks[0]),
        "config": cfg.to_dict(),
    }
    base_name = name or model_name(model)
    new_name = f"moe-{cfg.method} top-{cfg.top_k}/{cfg.experts}"
    if not cfg.measure:
        from ..measure.env import environment
        from ..report import Report

        row = _structure_row(new, new_name) | {"extra": {"moe": info}}
        report = Report([_structure_row(baseline, base_name), row], environment("cpu"),
                        title=f"Mixture-of-Experts ({cfg.method}), not measured")
        return Result(new, report, details=info)
    from ..measure import compare

    report = compare(baseline, new, names=[base_name, new_name], config=audit_cfg,
                     title=f"Mixture-of-Experts: {cfg.method}, top-{cfg.top_k} of {cfg.experts} experts")
    eval_ids = _eval_ids(new, audit_cfg)
    q = [(r.get("quality") or {}).get("value") if (r.get("quality") or {}).get("metric") == "perplexity" else None
         for r in report.rows]
    measured = {"dense": q[0], cfg.top_k: q[1]} if cfg.quality_tokens == audit_cfg.quality_tokens else {}
    sweep_rows, dense = _sweep(baseline, new, find_ffns(baseline), cfg, eval_ids, audit_cfg, measured)
    info["sweep"] = sweep_rows
    info["dense"] = dense
    chosen = next(r for r in sweep_rows if r["top_k"] == cfg.top_k)
    info["ffn_ms_dense"] = dense["ffn_ms"]
    info["ffn_ms_moe"] = chosen["ffn_ms"]
    info["ffn_time_vs_dense"] = chosen["ffn_time_vs_dense"]
    report.rows[1]["extra"]["moe"] = info
    report.rows[0]["extra"]["moe_dense"] = {"ffn_parameters": total_ffn, "ffn_ms": dense["ffn_ms"],
                                            "ffn_flops_per_token": dense["ffn_flops_per_token"]}
    report.environment["moe_timing"] = (f"FFN blocks timed on {dense['ffn_tokens']} tokens of the evaluation text, "
                                        f"median of {cfg.timing_repeats} interleaved repeats after 1 warm-up; "
                                        f"grouped matmul: {info['grouped_matmul']}")
    return Result(new, report, details=info, figures=[_sweep_figure(sweep_rows, dense, report.title)])


def _device(model):
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _eval_ids(model, audit_cfg):
    """[1, prompt_tokens] ids of the evaluation text: what FLOPs per token are counted on."""
    from ..data import resolve_text

    ids = text_ids(model, resolve_text(audit_cfg.text), audit_cfg.prompt_tokens)
    return ids.unsqueeze(0).to(_device(model))


def _backend_name(block) -> str:
    from .block import grouped_backend

    return grouped_backend(block.w_in.new_zeros(1, block.hidden), block.w_in)


def _structure_row(model, name: str) -> dict:
    from ..measure.memory import count_parameters, weight_bytes

    total, trainable = count_parameters(model)
    wbytes, by_dtype, _ = weight_bytes(model)
    return {"name": name, "parameters": total, "trainable_parameters": trainable, "weight_bytes": wbytes,
            "weight_bytes_by_dtype": by_dtype, "peak_memory_bytes": None, "prefill_ms": None,
            "decode_tokens_per_s": None, "quality": None, "flops_per_token": None,
            "energy": {"joules_per_token": None, "method": "not measured", "reason": "measure=False"}, "extra": {}}


def moe_stats(model, text=None, *, max_tokens: int = 512, window: int = 512, show_tokens: int = 48, name=None):
    """Routing statistics of an MoE model over ``text`` (effnb's MoE blocks, or transformers' Mixtral,
    Qwen2-MoE, OLMoE and other top-k routers). Returns ``MoEStats`` (HTML table, heatmap, JSON)."""
    from ..models import check_model
    from .stats import routing_stats

    check_model(model)
    cfg = MoEStatsConfig(text=text, max_tokens=max_tokens, window=window, show_tokens=show_tokens)
    return routing_stats(model, cfg.text, max_tokens=cfg.max_tokens, window=cfg.window, show_tokens=cfg.show_tokens,
                         name=name)
