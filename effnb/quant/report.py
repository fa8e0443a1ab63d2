"""The before/after report of a quantization: effnb.measure's rows plus quantization specifics.

Added to the quantized row's ``extra``: method and config, quantization wall time, the backend
that ran (counted per call), bytes of the quantized layers before/after (and vs bf16), per-layer
SNR in dB with the worst layers named. ``Result.figures`` holds a plotly heatmap of per-layer SNR.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from .config import QuantConfig
from .methods import get_method


def backend_summary(model) -> dict:
    """Calls served by each backend over the quantized layers (what actually ran)."""
    from ..torch_utils import is_quantized_linear

    calls: Counter = Counter()
    bnb_layers = 0
    for m in model.modules():
        if is_quantized_linear(m):
            calls.update(m.backend_calls)
        elif type(m).__module__.startswith("bitsandbytes"):
            bnb_layers += 1
    out = dict(calls)
    if bnb_layers:
        out["bitsandbytes"] = out.get("bitsandbytes", 0) + bnb_layers
    return out


def _backend_text(calls: dict, measured: bool) -> str:
    if not calls:
        return "not run yet" if not measured else "none"
    if set(calls) == {"bitsandbytes"}:
        return "bitsandbytes"
    total = sum(calls.values())
    parts = [f"{k} {100 * v / total:.0f}% of calls" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])]
    return ", ".join(parts)


def quant_change(qmodel, cfg: QuantConfig, layer_stats: list[dict], quant_s: float, base: str,
                 calibration: str | None = None):
    """The ``technique.Change`` of a quantization: ``qmodel`` named after ``base`` and the method; its
    row extras and details (method and config, backend that ran, bytes, per-layer SNR) filled once
    the report is measured. ``calibration`` says how gptq calibrated (in the extra and the details)."""
    from ..technique import Change

    qname = f"{base} {get_method(cfg.method).label(cfg)}"
    try:
        qmodel._effnb_name = qname
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    for m in qmodel.modules():  # count the calls of the measurement only
        if hasattr(m, "reset_backend_calls"):
            m.reset_backend_calls()

    def finish(change, report, baseline) -> None:
        extra = quant_extra(qmodel, cfg, layer_stats, quant_s, calibration)
        change.rows = ({}, {"extra": extra})
        change.details = {"config": extra["config"], "layers": layer_stats, "worst_layers": extra["worst_layers"],
                          "quantize_wall_s": quant_s, "backend": extra["backend"]}
        if calibration is not None:
            change.details["calibration"] = calibration

    return Change(qmodel, qname, f"quantize: {qname}", finish=finish,
                  figures=[lambda: snr_heatmap(layer_stats, qname)])


def quant_extra(qmodel, cfg: QuantConfig, layer_stats: list[dict], quant_s: float, calibration: str | None) -> dict:
    """The quantized row's ``extra``: method and config, backend calls so far, bytes and per-layer SNR."""
    from ..kernels.cpu import status

    calls = backend_summary(qmodel)
    before = sum(s["bytes_before"] for s in layer_stats)
    bf16 = sum(s["bytes_bf16"] for s in layer_stats)
    after = sum(s["bytes_after"] for s in layer_stats)
    finite = [s for s in layer_stats if math.isfinite(s["snr_db"])]
    worst = sorted(finite, key=lambda s: s["snr_db"])[:5]
    extra = {
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("inplace", "name")},
        "quantize_wall_s": quant_s,
        "backend": _backend_text(calls, cfg.measure),
        "backend_calls": calls,
        "cpu_kernels": status(),
        "layers_quantized": len(layer_stats),
        "quantized_layers_bytes_before": before,
        "quantized_layers_bytes_after": after,
        "quantized_layers_ratio_vs_before": before / after if after else None,
        "quantized_layers_ratio_vs_bf16": bf16 / after if after else None,
        "bits_per_weight": 8 * after / max(1, sum(s["in_features"] * s["out_features"] for s in layer_stats)),
        "snr_db_mean": sum(s["snr_db"] for s in finite) / len(finite) if finite else math.inf,
        "snr_db_min": worst[0]["snr_db"] if worst else math.inf,
        "worst_layers": [{"name": s["name"], "snr_db": s["snr_db"]} for s in worst],
    }
    if calibration is not None:
        extra["calibration"] = calibration
    return extra


def build_result(original, qmodel, cfg: QuantConfig, layer_stats: list[dict], quant_s: float,
                 name: str | None = None, calibration: str | None = None):
    """The Result of a quantization that did not go through ``run_technique`` (a streamed checkpoint):
    ``original`` measured against ``qmodel`` unless ``cfg.measure`` is off."""
    from .. import technique
    from ..models import model_name

    base = name or model_name(original)
    change = quant_change(qmodel, cfg, layer_stats, quant_s, base, calibration)
    return technique.build_result(change, technique.measure_change(original, change, cfg.measure, base))


def layer_position(lname: str) -> tuple[str, str]:
    """('block index', 'layer kind') for the heatmap, e.g. 'model.layers.3.mlp.up_proj' -> ('3', 'mlp.up_proj')."""
    m = re.search(r"\.(\d+)\.(.+)$", lname)
    return (m.group(1), m.group(2)) if m else ("-", lname)


def snr_heatmap(layer_stats: list[dict], title: str = ""):
    """Plotly heatmap of per-layer SNR (dB): blocks down, layer kinds across; low = more error."""
    import plotly.graph_objects as go

    cells = {}
    for s in layer_stats:
        blk, kind = layer_position(s["name"])
        cells[(blk, kind)] = s["snr_db"]
    blocks = sorted({b for b, _ in cells}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    kinds = list(dict.fromkeys(k for _, k in cells))
    z = [[cells.get((b, k)) for k in kinds] for b in blocks]
    fig = go.Figure(go.Heatmap(z=z, x=kinds, y=blocks, colorscale="RdYlGn", colorbar={"title": "SNR dB"},
                               hovertemplate="block %{y}<br>%{x}<br>SNR %{z:.1f} dB<extra></extra>"))
    fig.update_layout(title=f"per-layer weight SNR (dB), {title}", xaxis_title="layer", yaxis_title="block",
                      yaxis={"autorange": "reversed"}, height=max(300, 18 * len(blocks) + 150))
    return fig
