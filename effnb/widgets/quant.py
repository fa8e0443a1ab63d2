"""``QuantExplorer(model)``: one layer's weights under a quantization setting, and the whole model on "apply".

    qx = QuantExplorer(model)              # pickers: layer, method, bits, group size
    qx.set(method="int", bits=3, group_size=64)
    qx.stats                               # {"snr_db", "max_abs_error", "layer_bytes", "layer_bytes_after", ...}
    res = qx.apply()                       # effnb.quantize(model, method=..., group_size=...) -> Result

The preview quantizes the chosen layer with the same storage formats ``effnb.quantize`` writes
(``effnb.kernels.formats``: int4 asymmetric with fp16 scale and zero, int8 and fp8 with a scale per
group, bitsandbytes' NF4/FP4 blocks), so its SNR is the one the applied layer gets. ``int`` at
2-8 bits is round to nearest with a min/max grid per group: a preview of what fewer or more bits
would cost (effnb.quantize stores 4 and 8 bits). Memory counts the codes plus the scales (and
zeros) exactly as stored. The model itself is never changed.
"""

from __future__ import annotations

import html
import math
import time

from ..options import did_you_mean
from ._base import EffnbWidget, PlotOutput, error_html, html_table, mb
from .preview import (
    BITS_RANGE,
    GROUP_CHOICES,
    HIST_BINS,
    METHODS,
    group_label,
    quantize_preview,
    stored_format,
    weight_nk,
)


class QuantExplorer(EffnbWidget):
    """Pick a layer, method, bits and group size; see the weights, the grid, the error and the memory."""

    title = "effnb quantization explorer"

    def __init__(self, model, layer: str | None = None, method: str = "int4", bits: int | None = None,
                 group_size: int = 64):
        from ..models import check_model

        check_model(model)
        self.model = model
        from ..torch_utils import linear_layers

        self.layers = dict(linear_layers(model, include_quantized=False, skip_head=True))
        if not self.layers:
            raise ValueError(f"QuantExplorer: {type(model).__name__} has no nn.Linear or Conv1D layers to quantize")
        self.layer = None
        self.method, self.bits, self.group_size = "int4", 4, 64
        self.stats: dict = {}
        self.result = None
        self._model_other_bytes = None
        self._cache: dict = {}
        self._grid, self._err_hist = None, None
        self.set(layer=layer or next(iter(self.layers)), method=method, bits=bits, group_size=group_size)

    # ------------------------------------------------------------------ state

    def set(self, layer: str | None = None, method: str | None = None, bits: int | None = None,
            group_size: int | None = None) -> dict:
        """Change any of the settings, recompute, redraw; returns ``stats``."""
        if layer is not None and layer not in self.layers:
            raise ValueError(f"no Linear layer named {layer!r}{did_you_mean(layer, self.layers)}"
                             f" ({len(self.layers)} layers, e.g. {', '.join(list(self.layers)[:3])})")
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
        if group_size is not None and group_size not in GROUP_CHOICES:
            raise ValueError(f"group_size {group_size!r} is not one of {', '.join(map(str, GROUP_CHOICES))} "
                             "(0 = per output channel)")
        new_method = method or self.method
        if bits is not None and METHODS[new_method] is None and not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
            raise ValueError(f"bits {bits!r} out of range {BITS_RANGE[0]}-{BITS_RANGE[1]} for method 'int'")
        if bits is not None and METHODS[new_method] is not None and bits != METHODS[new_method]:
            raise ValueError(f"method {new_method!r} has {METHODS[new_method]} bits, not {bits} "
                             "(use method 'int' for other bit widths)")
        self.layer = layer or self.layer
        self.method = new_method
        self.bits = METHODS[new_method] or bits or (self.bits if METHODS[self.method] is None else 4)
        if group_size is not None:
            self.group_size = group_size
        self._recompute()
        self._sync_controls()
        return self.stats

    def quantize_config(self) -> dict | None:
        """The ``effnb.quantize`` options matching the preview, or None when it is a preview only: the
        previewed format's method where ``QuantConfig`` accepts this group size."""
        from ..quant.config import QuantConfig

        fmt = stored_format(self.method, self.bits)
        if fmt is None:
            return None
        options = {"method": fmt.name, "group_size": self.group_size}
        try:
            QuantConfig(**options)
        except ValueError:
            return None
        return options

    def _layer_data(self) -> dict:
        """The chosen layer's fp32 weight, its histogram and energy, computed once per layer."""
        import torch

        if getattr(self, "_cache", {}).get("layer") != self.layer:
            w = weight_nk(self.layers[self.layer])
            lo, hi = float(w.min()), float(w.max())
            self._cache = {"layer": self.layer, "w": w, "lo": lo, "hi": hi,
                           "counts": torch.histc(w, bins=HIST_BINS, min=lo, max=hi).tolist(),
                           "energy": float(torch.sum(w * w, dtype=torch.float64))}
        return self._cache

    def _recompute(self) -> None:
        import torch

        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # one thread: these tensors are small (under a few million weights), and on a busy machine
        # a second thread waiting for a core made each op several times slower (measured, 2 cores)
        torch.set_num_threads(1)
        try:
            self._recompute_inner(t0)
        finally:
            torch.set_num_threads(threads)
        self._redraw()

    def _recompute_inner(self, t0: float) -> None:
        import torch

        m = self.layers[self.layer]
        data = self._layer_data()
        w = data["w"]
        stats = {"layer": self.layer, "method": self.method, "bits": self.bits, "group_size": self.group_size,
                 "shape": list(w.shape), "layer_bytes": m.weight.numel() * m.weight.element_size(), "error": None}
        try:
            approx, grid, after = quantize_preview(w, self.method, self.bits, self.group_size)
        except ValueError as exc:
            stats.update(error=str(exc), snr_db=None, max_abs_error=None, layer_bytes_after=None,
                         bits_per_weight=None)
            self.stats, self._grid, self._err_hist = stats, None, None
            return
        err = (w - approx).reshape(-1)
        noise = float(torch.sum(err * err, dtype=torch.float64))
        elo, ehi = (float(v) for v in torch.aminmax(err))
        # SNR as effnb.torch_utils.snr_db defines it, 10 log10(|w|^2 / |w - q(w)|^2), from the cached |w|^2
        snr = math.inf if noise == 0 else 10 * math.log10(data["energy"] / noise)
        stats.update(snr_db=snr, max_abs_error=max(-elo, ehi), layer_bytes_after=after,
                     bits_per_weight=after * 8 / w.numel())
        stats.update(self._model_estimate(stats["bits_per_weight"]))
        self._err_hist = (elo, ehi, torch.histc(err, bins=60, min=elo, max=ehi).tolist() if ehi > elo else [])
        stats["compute_ms"] = (time.perf_counter() - t0) * 1e3
        self.stats, self._grid = stats, grid

    def _model_estimate(self, bits_per_weight: float) -> dict:
        """Whole-model weight bytes if every listed layer were stored at this layer's bits per weight."""
        from ..measure.memory import weight_bytes

        if self._model_other_bytes is None:
            total = weight_bytes(self.model)[0]
            linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.layers.values())
            self._model_total_bytes, self._model_other_bytes = int(total), int(total) - linear_bytes
            self._linear_numel = sum(m.weight.numel() for m in self.layers.values())
        after = self._model_other_bytes + self._linear_numel * bits_per_weight / 8
        return {"model_bytes": self._model_total_bytes, "model_bytes_estimate": int(after),
                "model_estimate_method": "computed: every listed Linear at this layer's bits per weight"}

    # ------------------------------------------------------------------ views

    def _summary_rows(self) -> list[list[str]]:
        s = self.stats
        if s.get("error"):
            return [["error", s["error"]]]
        ratio = s["layer_bytes"] / s["layer_bytes_after"]
        return [["SNR", f"{s['snr_db']:.2f} dB"], ["max |error|", f"{s['max_abs_error']:.3g}"],
                ["bits per weight (with scales)", f"{s['bits_per_weight']:.3f}"],
                ["layer memory", f"{mb(s['layer_bytes'])} → {mb(s['layer_bytes_after'])} ({ratio:.2f}x smaller)"],
                ["model weights (estimate)", f"{mb(s['model_bytes'])} → {mb(s['model_bytes_estimate'])}"]]

    def _summary_html(self) -> str:
        s = self.stats
        head = (f"<b>{html.escape(self.layer)}</b> {s['shape'][0]}x{s['shape'][1]} · {html.escape(self.method)} "
                f"{self.bits}-bit · group {group_label(self.group_size)}")
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td class='effnb-q-{k.split()[0].strip('|').lower()}'>{html.escape(v)}</td></tr>"
                       for k, v in self._summary_rows())
        cfg = self.quantize_config()
        note = (f"apply: effnb.quantize(model, method={cfg['method']!r}, group_size={cfg['group_size']})"
                if cfg else "preview only: effnb.quantize stores 4-bit (int4, nf4, fp4) and 8-bit (int8, fp8) layers")
        return (f"<div class='effnb-quant-summary'><p>{head}</p><table>{rows}</table>"
                f"<p style='font-size:smaller;color:#666'>{html.escape(note)}</p></div>")

    def static_html(self) -> str:
        return self._summary_html()

    def _figure_parts(self) -> dict:
        """Weight histogram, grid segments and error histogram as plain lists for plotly."""
        data = self._layer_data()
        lo, hi, counts = data["lo"], data["hi"], data["counts"]
        width = (hi - lo) / HIST_BINS or 1.0
        parts = {"x": [lo + (i + 0.5) * width for i in range(HIST_BINS)], "y": counts, "width": width,
                 "grid_x": [], "grid_y": [], "err_x": [], "err_y": []}
        if self._grid is not None:
            top = max(counts)
            for v in self._grid.tolist():
                if lo - width <= v <= hi + width:
                    parts["grid_x"] += [v, v, None]
                    parts["grid_y"] += [0, top, None]
            elo, ehi, ecounts = self._err_hist
            if ecounts:
                ew = (ehi - elo) / len(ecounts)
                parts["err_x"] = [elo + (i + 0.5) * ew for i in range(len(ecounts))]
                parts["err_y"] = ecounts
        return parts

    def _fill(self, fig) -> None:
        p = self._figure_parts()
        s = self.stats
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y, fig.data[0].width = p["x"], p["y"], p["width"]
            fig.data[1].x, fig.data[1].y = p["grid_x"], p["grid_y"]
            fig.data[2].x, fig.data[2].y = p["err_x"], p["err_y"]
            title = (f"{self.layer}: {self.method} {self.bits}-bit, group {group_label(self.group_size)} · "
                     + (f"SNR {s['snr_db']:.1f} dB" if s.get("snr_db") is not None else s.get("error", "")))
            fig.layout.title.text = title

    def _empty_figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                            subplot_titles=["weights and the quantization grid (widest group)",
                                            "error (weight - quantized)"])
        fig.add_trace(go.Bar(name="weights", marker={"color": "#4c78a8"}), row=1, col=1)
        fig.add_trace(go.Scatter(name="grid levels", mode="lines", line={"color": "#e45756", "width": 1}),
                      row=1, col=1)
        fig.add_trace(go.Bar(name="error", marker={"color": "#72b7b2"}, showlegend=False), row=1, col=2)
        fig.update_layout(height=340, margin={"t": 60, "b": 40, "l": 50, "r": 10}, bargap=0,
                          legend={"orientation": "h", "y": -0.15}, title={"font": {"size": 13}})
        return fig

    def _build(self):
        import ipywidgets as W

        self._plot = PlotOutput(self.static_figure())
        self._fig = self._plot.fig
        self._w_layer = W.Dropdown(options=list(self.layers), value=self.layer, description="layer",
                                   layout=W.Layout(width="420px"))
        self._w_method = W.ToggleButtons(options=list(METHODS), value=self.method, description="method",
                                         style={"button_width": "56px"})
        self._w_bits = W.IntSlider(value=self.bits, min=BITS_RANGE[0], max=BITS_RANGE[1], description="bits",
                                   continuous_update=False, disabled=METHODS[self.method] is not None)
        self._w_group = W.SelectionSlider(options=[(group_label(g), g) for g in GROUP_CHOICES],
                                          value=self.group_size, description="group size", continuous_update=False)
        self._w_summary = W.HTML(self._summary_html())
        self._w_apply = W.Button(description="apply to the model", icon="play", button_style="primary",
                                 layout=W.Layout(width="190px"),
                                 disabled=self.quantize_config() is None)
        self._w_measure = W.Checkbox(value=True, description="measure speed and quality", indent=False)
        self._w_status = W.HTML()
        self._w_out = W.Output()

        def changed(key, value):
            try:
                self.set(**{key: value})  # a new method starts at its own bits (set's bits=None)
            except ValueError as exc:
                self._w_status.value = error_html(exc)

        self._bind({"layer": self._w_layer, "method": self._w_method, "bits": self._w_bits,
                    "group_size": self._w_group}, changed)
        self._w_apply.on_click(lambda _b: self._apply_clicked())
        controls = W.VBox([self._w_layer, self._w_method, W.HBox([self._w_bits, self._w_group])])
        box = W.VBox([controls, W.HBox([self._plot.widget, self._w_summary]),
                      W.HBox([self._w_apply, self._w_measure, self._w_status]), self._w_out])
        box.add_class("effnb-quant")
        return box

    def _set_controls(self) -> None:
        self._w_layer.value, self._w_method.value = self.layer, self.method
        self._w_bits.value = self.bits
        self._w_bits.disabled = METHODS[self.method] is not None
        self._w_group.value = self.group_size
        self._w_apply.disabled = self.quantize_config() is None

    def _redraw(self) -> None:
        if self._box is None:
            return
        self._w_summary.value = self._summary_html()
        self._fill(self._fig)
        self._plot.refresh()
        self._w_status.value = ""

    # ------------------------------------------------------------------ apply

    def apply(self, **options):
        """Quantize the whole model with the previewed setting: ``effnb.quantize(model, ...)`` (a new model)."""
        cfg = self.quantize_config()
        if cfg is None:
            raise ValueError(f"{self.method} {self.bits}-bit with group {group_label(self.group_size)} is a preview "
                             "only; effnb.quantize stores int4 (groups 32-256), int8, nf4, fp4 and fp8")
        from ..quant.api import quantize

        self.result = quantize(self.model, **cfg, **options)
        return self.result

    def _apply_clicked(self) -> None:
        self._run_apply(lambda: self.apply(measure=self._w_measure.value),
                        f"quantizing {len(self.layers)} layers with {html.escape(str(self.quantize_config()))}… "
                        "(interrupt the kernel to stop; the model is not changed)",
                        "done in {seconds:.1f} s: the result is <code>explorer.result</code> "
                        "(model: <code>explorer.result.model</code>)",
                        enabled_after=lambda: self.quantize_config() is not None)

    def table(self) -> str:
        """Every layer at the current setting: SNR and bytes (HTML; quantizes each layer once)."""
        from ..torch_utils import snr_db

        rows = []
        for name, m in self.layers.items():
            w = weight_nk(m)
            try:
                approx, _grid, after = quantize_preview(w, self.method, self.bits, self.group_size)
            except ValueError as exc:
                rows.append([name, "—", "—", str(exc)])
                continue
            rows.append([name, f"{snr_db(w, approx):.2f}", mb(after), ""])
        return html_table(["layer", "SNR dB", "bytes after", "note"], rows)
