"""``RouterExplorer(moe_model, text)``: where tokens go in a Mixture-of-Experts model.

    rx = RouterExplorer(moe_model, "def add(a, b): return a + b")
    rx.stats                  # effnb.moe_stats(...): per-layer load, imbalance, aux loss, token -> experts
    rx.set(layer=1)           # which layer colours the text
    rx.set(text="...")        # route another text

Works on effnb's MoE models (``effnb.moe``) and on transformers' top-k MoE models (Mixtral,
Qwen2-MoE, OLMoE), through ``effnb.moe_stats``, which hooks the routers (no model change).
Views: the expert-load heatmap (share of the assignments each expert gets, per layer), the text
with each token coloured by its first-choice expert in the chosen layer, and imbalance figures
(max/mean load, coefficient of variation, Switch aux loss; 1, 0 and top_k when balanced).
"""

from __future__ import annotations

import html

from ._base import EffnbWidget, PlotOutput, error_html, html_table

# 20 distinguishable colours (Tableau 20), cycled past 20 experts
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#a0cbe8", "#ffbe7d", "#ff9d9a", "#8cd17d", "#b6992d", "#f1ce63",
           "#86bcb6", "#d37295", "#fabfd2", "#d4a6c8")


class RouterExplorer(EffnbWidget):
    """Experts-per-layer heatmap, the text coloured by expert, imbalance figures."""

    title = "effnb router explorer"

    def __init__(self, moe_model, text: str | None = None, *, max_tokens: int = 256, show_tokens: int = 64):
        from ..models import check_model

        check_model(moe_model)
        self.model = moe_model
        self.max_tokens, self.show_tokens = max_tokens, show_tokens
        self.layer = 0
        self.text = text
        self.stats = self._route(text)

    def _route(self, text):
        from ..experts.api import moe_stats

        try:
            return moe_stats(self.model, text, max_tokens=self.max_tokens, show_tokens=self.show_tokens)
        except ValueError as exc:
            msg = str(exc).splitlines()[0]
            if "no MoE routers" in msg:
                raise ValueError(f"RouterExplorer needs a Mixture-of-Experts model: {msg}; "
                                 "make one with effnb.moe(model) or load 'tiny-mixtral'") from None
            raise

    def set(self, layer: int | str | None = None, text: str | None = None):
        """Colour the text by another layer (index or name), or route a new text."""
        if text is not None:
            self.stats = self._route(text)
            self.text = text
            self.layer = min(self.layer, len(self.stats.layers) - 1)
        if layer is not None:
            names = [r["layer"] for r in self.stats.layers]
            if isinstance(layer, str):
                if layer not in names:
                    raise ValueError(f"no router layer named {layer!r}; layers: {', '.join(names)}")
                layer = names.index(layer)
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(names):
                raise ValueError(f"layer must be 0..{len(names) - 1} or a name, got {layer!r}")
            self.layer = layer
        self._redraw(figure=text is not None)
        return self.stats

    # ------------------------------------------------------------------ numbers

    def imbalance(self) -> list[dict]:
        """Per layer: max/mean load, coefficient of variation, aux loss, router entropy share."""
        return [{k: r[k] for k in ("layer", "max_over_mean", "coefficient_of_variation", "aux_loss",
                                    "router_entropy_share", "top_k")} for r in self.stats.layers]

    def experts(self) -> int:
        return len(self.stats.layers[0]["tokens_per_expert"])

    # ------------------------------------------------------------------ views

    def coloured_text_html(self, layer: int | None = None) -> str:
        """The shown tokens, each on the colour of its first-choice expert in ``layer``."""
        li = self.layer if layer is None else layer
        spans = []
        for tok, experts in zip(self.stats.tokens, self.stats.token_experts[li]):
            e = experts[0]
            shown = html.escape(tok).replace("\n", "⏎<br>")
            spans.append(f"<span class='effnb-token' data-expert='{e}' title='experts {'/'.join(map(str, experts))}' "
                         f"style='background:{PALETTE[e % len(PALETTE)]};padding:1px 2px;margin:1px;"
                         f"border-radius:3px;white-space:pre-wrap'>{shown}</span>")
        legend = " ".join(f"<span style='background:{PALETTE[e % len(PALETTE)]};padding:0 6px'>e{e}</span>"
                          for e in range(self.experts()))
        name = self.stats.layers[li]["layer"]
        return (f"<div class='effnb-router-text'><p>first-choice expert per token in <b>{html.escape(name)}</b> "
                f"(first {len(self.stats.tokens)} tokens): {legend}</p>"
                f"<div style='line-height:1.9;font-family:monospace'>{''.join(spans)}</div></div>")

    def _imbalance_html(self) -> str:
        rows = [[r["layer"], f"{r['max_over_mean']:.2f}", f"{r['coefficient_of_variation']:.3f}",
                 f"{r['aux_loss']:.3f} (balanced: {r['top_k']})", f"{r['router_entropy_share']:.0%}"]
                for r in self.imbalance()]
        return html_table(["layer", "max/mean load", "CV", "aux loss", "router entropy (share of ln E)"], rows,
                          "effnb-router-table")

    def static_html(self) -> str:
        return (self.coloured_text_html() + self._imbalance_html()
                + f"<p style='font-size:smaller;color:#666'>{html.escape(self.stats._footer())}</p>")

    def static_figure(self):
        return self.stats.figure()

    def _build(self):
        import ipywidgets as W

        self._plot = PlotOutput(self.stats.figure())
        self._fig = self._plot.fig
        names = [r["layer"] for r in self.stats.layers]
        self._w_layer = W.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=self.layer,
                                   description="colour by", layout=W.Layout(width="420px"))
        self._w_text = W.Textarea(value=self.text or "", placeholder="text to route (empty: built-in text)",
                                  layout=W.Layout(width="100%", height="70px"))
        self._w_route = W.Button(description="route this text", icon="random")
        self._w_tokens = W.HTML(self.coloured_text_html())
        self._w_table = W.HTML(self._imbalance_html())
        self._w_status = W.HTML()

        def route(_b):
            try:
                self.set(text=self._w_text.value or None)
                self._w_status.value = ""
            except ValueError as exc:
                self._w_status.value = error_html(exc)

        self._bind({"layer": self._w_layer}, lambda key, value: self.set(layer=value))
        self._w_route.on_click(route)
        box = W.VBox([self._plot.widget, self._w_layer, self._w_tokens, self._w_table,
                      W.HBox([self._w_route, self._w_status]), self._w_text])
        box.add_class("effnb-router")
        return box

    def _redraw(self, figure: bool = False) -> None:
        if self._box is None:
            return
        with self._setting_controls():
            self._w_layer.value = self.layer
        self._w_tokens.value = self.coloured_text_html()
        self._w_table.value = self._imbalance_html()
        if figure:
            new = self.stats.figure()
            with self._fig.batch_update():
                self._fig.data[0].z = new.data[0].z
                self._fig.data[0].y = new.data[0].y
            self._plot.refresh()
