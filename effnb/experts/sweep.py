"""What ``effnb.moe``'s report adds to the before/after rows: the top_k sweep.

For each top_k of the sweep: perplexity, active FFN parameters and FLOPs per token (analytic and
counted), and the measured time of all FFN blocks, dense and MoE, at ``ffn_tokens`` tokens in one
interleaved run. One MoE model serves every top_k: its blocks are re-routed in place.
"""

from __future__ import annotations

import statistics
import time

from .config import MoEConfig


def text_ids(model, text, max_tokens: int):
    """The first ``max_tokens`` token ids of ``text``; fixed ids from the vocabulary when the model has no tokenizer."""
    from ..measure.inputs import fixed_token_ids
    from ..measure.quality import token_ids
    from ..models import find_tokenizer

    tok = find_tokenizer(model)
    if tok is None:
        return fixed_token_ids(model, max_tokens)
    return token_ids(tok, text)[:max_tokens]


def token_windows(model, text, max_tokens: int):
    """``text``'s first ``max_tokens`` ids cut into windows the model's positions can hold (at most 512)."""
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
    from ..torch_utils import capture_inputs, device_of, eval_mode

    mods = [model.get_submodule(spec.input_name) for spec in specs]
    device = device_of(model)
    extra = {"use_cache": False} if model_kind(model) == "causal-lm" else {}
    flat = lambda x: x.detach().reshape(-1, x.shape[-1]).clone()  # noqa: E731 - [T, H], kept past the forward
    with capture_inputs(mods, transform=flat) as store, eval_mode(model), torch.inference_mode():
        for w in windows:
            model(input_ids=w.unsqueeze(0).to(device), **extra)
    return [torch.cat(store[i]) for i in range(len(mods))]


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


def ffn_times(dense_fns, blocks, inputs, ks, repeats: int) -> dict:
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


def sweep(original, new, specs, cfg: MoEConfig, eval_ids, audit_cfg, measured: dict) -> tuple[list[dict], dict]:
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
    ffn_ids = token_windows(original, resolve_text(audit_cfg.text), cfg.ffn_tokens)[:1]
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
        times = ffn_times([s.forward for s in specs], blocks, inputs, cfg.sweep_values(), cfg.timing_repeats)
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


def sweep_figure(rows, dense, title):
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


def add_sweep(change, report, baseline, cfg: MoEConfig, audit_cfg, info: dict) -> None:
    """``technique.Change.finish`` of a measured ``effnb.moe``: the sweep into the rows, details and figures.

    The perplexities the report measured (dense and at ``cfg.top_k``) are reused when the sweep
    would measure the same thing (same number of tokens)."""
    from .ffn import find_ffns

    eval_ids = eval_token_ids(change.model, audit_cfg)
    q = [(r.get("quality") or {}).get("value") if (r.get("quality") or {}).get("metric") == "perplexity" else None
         for r in report.rows]
    measured = {"dense": q[0], cfg.top_k: q[1]} if cfg.quality_tokens == audit_cfg.quality_tokens else {}
    sweep_rows, dense = sweep(baseline, change.model, find_ffns(baseline), cfg, eval_ids, audit_cfg, measured)
    chosen = next(r for r in sweep_rows if r["top_k"] == cfg.top_k)
    info.update(sweep=sweep_rows, dense=dense, ffn_ms_dense=dense["ffn_ms"], ffn_ms_moe=chosen["ffn_ms"],
                ffn_time_vs_dense=chosen["ffn_time_vs_dense"])
    change.rows = ({"extra": {"moe_dense": {"ffn_parameters": info["dense_ffn_parameters"], "ffn_ms": dense["ffn_ms"],
                                            "ffn_flops_per_token": dense["ffn_flops_per_token"]}}},
                   {"extra": {"moe": info}})
    change.environment["moe_timing"] = (f"FFN blocks timed on {dense['ffn_tokens']} tokens of the evaluation text, "
                                        f"median of {cfg.timing_repeats} interleaved repeats after 1 warm-up; "
                                        f"grouped matmul: {info['grouped_matmul']}")
    change.figures.append(sweep_figure(sweep_rows, dense, report.title))


def eval_token_ids(model, audit_cfg):
    """[1, prompt_tokens] ids of the evaluation text: what FLOPs per token are counted on."""
    from ..data import resolve_text
    from ..torch_utils import device_of

    ids = text_ids(model, resolve_text(audit_cfg.text), audit_cfg.prompt_tokens)
    return ids.unsqueeze(0).to(device_of(model))
