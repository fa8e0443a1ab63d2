"""``LoraExplorer(model)``: what LoRA costs before you train: trainable parameters, adapter size, memory.

    lx = LoraExplorer(model)                       # rank, targets, DoRA and LoRA+ switches
    lx.set(rank=16, targets="all", dora=True)
    lx.stats                                       # trainable parameters, adapter bytes, memory budgets
    res = lx.apply()                               # effnb.lora(model, rank=..., targets=..., ...) -> Result

Counts are computed from the layer shapes of the targets ``effnb.lora`` would adapt (its own target
resolution): LoRA adds rank x (in + out) weights per layer, DoRA one magnitude per output feature
more. Memory budgets (weights + gradients + AdamW's two moments, fp32, activations not included):
full fine-tuning, LoRA on the fp32 model, QLoRA on an NF4 model (4 bits + an fp32 absmax per 64
weights = 4.5 bits). These are computed, not measured; ``apply`` measures the real model.
"""

from __future__ import annotations

import html
import time

from ._base import EffnbWidget, PlotOutput, html_table, mb

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
TARGETS = ("attn", "attn-all", "mlp", "all")
PLUS_RATIO = 16.0  # LoRA+ paper's learning-rate ratio of B to A


class LoraExplorer(EffnbWidget):
    """Rank, targets, DoRA/LoRA+: trainable parameters, adapter size, memory of full vs LoRA vs QLoRA."""

    title = "effnb LoRA explorer"

    def __init__(self, model, rank: int = 8, targets: str = "attn", dora: bool = False, lora_plus: bool = False):
        from ..models import check_model
        from ..torch_utils import linear_layers

        check_model(model)
        self.model = model
        self._linears = dict(linear_layers(model, include_quantized=False, skip_head=True))
        if not self._linears:
            raise ValueError(f"LoraExplorer: {type(model).__name__} has no nn.Linear layers an adapter can sit on")
        self.parameters = sum(p.numel() for p in model.parameters())
        self.linear_parameters = sum(m.weight.numel() for m in self._linears.values())
        self.rank, self.targets, self.dora, self.lora_plus = 8, "attn", False, False
        self.stats: dict = {}
        self.result = None
        self.set(rank=rank, targets=targets, dora=dora, lora_plus=lora_plus)

    # ------------------------------------------------------------------ state

    def set(self, rank: int | None = None, targets: str | None = None, dora: bool | None = None,
            lora_plus: bool | None = None) -> dict:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if targets is not None and targets not in TARGETS:
            raise ValueError(f"targets {targets!r} is not a preset ({', '.join(TARGETS)}); "
                             "for module names call effnb.lora(model, targets=[...]) directly")
        self.rank = rank or self.rank
        self.targets = targets or self.targets
        self.dora = self.dora if dora is None else bool(dora)
        self.lora_plus = self.lora_plus if lora_plus is None else bool(lora_plus)
        self._recompute()
        self._sync_controls()
        return self.stats

    def _shapes(self) -> tuple[list[tuple[str, int, int, int]], str]:
        """[(name, in, out, copies)] of the layers effnb.lora would adapt, and how they were chosen."""
        import torch

        from ..adapters import resolve_targets

        found = resolve_targets(self.model, self.targets)
        shapes = []
        for name in found.modules:
            m = self.model.get_submodule(name)
            if isinstance(m, torch.nn.Linear):
                shapes.append((name, m.in_features, m.out_features, 1))
            else:  # transformers' Conv1D: weight [in, out]
                shapes.append((name, m.weight.shape[0], m.weight.shape[1], 1))
        for pname in found.parameters:  # fused experts [E, in, out] (or [E, out, in]): one adapter per expert
            p = self.model.get_parameter(pname)
            shapes.append((pname, p.shape[1], p.shape[2], p.shape[0]))
        return shapes, found.how

    def _recompute(self) -> None:
        t0 = time.perf_counter()
        try:
            shapes, how = self._shapes()
        except ValueError as exc:
            self.stats = {"error": str(exc), "rank": self.rank, "targets": self.targets}
            self._redraw()
            return
        r = self.rank
        lora_params = sum(c * r * (k + n) for _, k, n, c in shapes)
        dora_params = sum(c * n for _, k, n, c in shapes) if self.dora else 0
        trainable = lora_params + dora_params
        fp32 = 4
        base = self.parameters
        from ..adapters.report import memory_budgets  # the same computed budgets as effnb.lora's report

        budgets = memory_budgets(base_params=base, trainable=trainable, linear_params=self.linear_parameters)
        self.stats = {
            "error": None, "rank": r, "targets": self.targets, "dora": self.dora, "lora_plus": self.lora_plus,
            "how": how, "layers": len(shapes), "trainable_parameters": trainable, "parameters": base,
            "trainable_share": trainable / base, "adapter_bytes": trainable * fp32,
            "full_checkpoint_bytes": base * fp32, "memory": budgets,
            "method": "computed from layer shapes (fp32 adapters, AdamW; activations not included)",
            "compute_ms": (time.perf_counter() - t0) * 1e3,
        }
        self._redraw()

    def lora_options(self) -> dict:
        """The ``effnb.lora`` / ``effnb.finetune`` options matching the current setting."""
        opts = {"rank": self.rank, "alpha": 2 * self.rank, "targets": self.targets, "dora": self.dora}
        if self.lora_plus:
            opts["plus_ratio"] = PLUS_RATIO
        return opts

    # ------------------------------------------------------------------ views

    def _summary_html(self) -> str:
        s = self.stats
        if s.get("error"):
            return f"<p class='effnb-lora-error' style='color:#c00'>{html.escape(s['error'])}</p>"
        rows = [["layers adapted", f"{s['layers']} ({s['how']})"],
                ["trainable parameters", f"{s['trainable_parameters']:,} ({s['trainable_share']:.3%} of {s['parameters']:,})"],
                ["adapter file (fp32)", f"{mb(s['adapter_bytes'])} vs checkpoint {mb(s['full_checkpoint_bytes'])}"]]
        rows += [[f"training memory: {b['variant']}", mb(b["total_bytes"])] for b in s["memory"]]
        if self.dora:
            rows.append(["DoRA", "adds one trained magnitude per output feature of each adapted layer"])
        if self.lora_plus:
            rows.append(["LoRA+", f"B learns {PLUS_RATIO:g}x faster than A during finetune (same parameter count)"])
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        return (f"<div class='effnb-lora-summary'><table>{body}</table>"
                f"<p style='font-size:smaller;color:#666'>{html.escape(s['method'])}; "
                f"apply: effnb.lora(model, {', '.join(f'{k}={v!r}' for k, v in self.lora_options().items())})</p></div>")

    def static_html(self) -> str:
        return self._summary_html()

    def _bars(self) -> dict:
        budgets = self.stats.get("memory") or []
        names = [b["variant"] for b in budgets]
        return {key: (names, [b[key] / 1e6 for b in budgets])
                for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes")}

    def _empty_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for label in ("weights", "gradients", "optimizer state (AdamW)"):
            fig.add_trace(go.Bar(name=label))
        fig.update_layout(barmode="stack", yaxis_title="MB", height=320, title={"font": {"size": 13}},
                          margin={"t": 50, "b": 40, "l": 60, "r": 10})
        return fig

    def _fill(self, fig) -> None:
        bars = self._bars()
        with fig.batch_update():
            for trace, key in zip(fig.data, ("weights_bytes", "gradients_bytes", "optimizer_bytes")):
                trace.x, trace.y = bars[key]
            fig.layout.title.text = (f"training memory, rank {self.rank}, targets {self.targets}"
                                     f"{' + DoRA' if self.dora else ''} (computed, no activations)")

    def _build(self):
        import ipywidgets as W

        self._plot = PlotOutput(self.static_figure())
        self._fig = self._plot.fig
        self._w_rank = W.SelectionSlider(options=list(RANKS), value=self.rank if self.rank in RANKS else 8,
                                         description="rank", continuous_update=False)
        self._w_targets = W.ToggleButtons(options=list(TARGETS), value=self.targets, description="targets")
        self._w_dora = W.Checkbox(value=self.dora, description="DoRA", indent=False)
        self._w_plus = W.Checkbox(value=self.lora_plus, description="LoRA+", indent=False)
        self._w_summary = W.HTML(self._summary_html())
        self._w_apply = W.Button(description="attach adapters", icon="play", button_style="primary")
        self._w_status = W.HTML()
        self._w_out = W.Output()
        self._bind({"rank": self._w_rank, "targets": self._w_targets, "dora": self._w_dora,
                    "lora_plus": self._w_plus}, lambda key, value: self.set(**{key: value}))
        self._w_apply.on_click(lambda _b: self._apply_clicked())
        box = W.VBox([W.HBox([self._w_rank, self._w_dora, self._w_plus]), self._w_targets,
                      W.HBox([self._plot.widget, self._w_summary]), W.HBox([self._w_apply, self._w_status]), self._w_out])
        box.add_class("effnb-lora")
        return box

    def _set_controls(self) -> None:
        if self.rank in RANKS:
            self._w_rank.value = self.rank
        self._w_targets.value = self.targets
        self._w_dora.value, self._w_plus.value = self.dora, self.lora_plus

    def _redraw(self) -> None:
        if self._box is None:
            return
        self._w_summary.value = self._summary_html()
        if not self.stats.get("error"):
            self._fill(self._fig)
            self._plot.refresh()

    # ------------------------------------------------------------------ apply

    def apply(self, **options):
        """``effnb.lora(model, **self.lora_options(), **options)``: a PEFT copy of the model and its Report."""
        from ..adapters import (
            lora,  # not effnb.lora: once the subpackage is imported, that name is the package
        )

        self.result = lora(self.model, **(self.lora_options() | options))
        return self.result

    def _apply_clicked(self) -> None:
        self._run_apply(self.apply, "attaching adapters… (interrupt the kernel to stop; the model is not changed)",
                        "done in {seconds:.1f} s: <code>explorer.result.model</code>", enabled_after=lambda: True)

    def table(self) -> str:
        """Trainable parameters at every rank for the current targets (HTML)."""
        keep = self.rank
        rows = []
        for r in RANKS:
            self.rank = r
            self._recompute()
            if self.stats.get("error"):
                break
            rows.append([r, f"{self.stats['trainable_parameters']:,}", mb(self.stats["adapter_bytes"])])
        self.rank = keep
        self._recompute()
        return html_table(["rank", "trainable parameters", "adapter (fp32)"], rows)
