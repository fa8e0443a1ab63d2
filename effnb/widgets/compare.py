"""``CompareDashboard(reports)``: variants on a memory / quality / speed chart with the Pareto front.

    dash = CompareDashboard([report_fp32, res_nf4.report, res_int8])   # Reports, Results or report dicts
    dash                        # scatter (x memory, y quality, colour speed), Pareto front, sortable table
    dash.pareto()               # names of the variants no other variant beats on both memory and quality
    dash.to_json("cmp.json"); dash.to_html("cmp.html")

A variant is on the Pareto front when no other variant needs no more memory *and* has no worse
quality, being strictly better in one of the two. Quality's direction comes from the report
(``higher_is_better``: perplexity lower, recall@1 higher); variants measured with another metric
than the first one's are plotted on the table only.
"""

from __future__ import annotations

import html
from typing import Any

from ._base import EffnbWidget, PlotOutput, error_html, html_table

#: x axis choices: label -> row key
MEMORY_KEYS = {"weight memory (MB)": "weight_bytes", "peak memory (MB)": "peak_memory_bytes"}
SORT_KEYS = ("name", "weight MB", "peak MB", "quality", "speed", "Pareto")


def _as_report_dicts(reports) -> list[dict]:
    """Reports, Results, report dicts (``Report.to_dict()``) or a list of them -> list of report dicts."""
    from ..report import Report, Result

    if isinstance(reports, (Report, Result, dict)):
        reports = [reports]
    if not isinstance(reports, (list, tuple)):
        raise TypeError(f"CompareDashboard takes a Report, a Result or a list of them, got {type(reports).__name__}")
    if not reports:
        raise ValueError("CompareDashboard needs at least one report; got an empty list "
                         "(make one with effnb.audit(model) or effnb.compare(model, other))")
    out = []
    for i, r in enumerate(reports):
        if isinstance(r, Result):
            r = r.report
        if isinstance(r, Report):
            out.append(r.to_dict())
        elif isinstance(r, dict) and "variants" in r:
            out.append(r)
        else:
            raise TypeError(f"CompareDashboard: item {i} is a {type(r).__name__}, not a Report, Result or "
                            "report dict (Report.to_dict())")
    return out


def _speed(row: dict) -> tuple[float | None, str]:
    """(value, label): decode tokens/s for causal LMs, prefill ms for encoders."""
    if row.get("decode_tokens_per_s") is not None:
        return row["decode_tokens_per_s"], "decode tokens/s"
    if row.get("prefill_ms") is not None:
        return row["prefill_ms"], "prefill ms"
    return None, "speed"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points (memory, quality) no other point dominates (less memory, better quality)."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (m, q) in enumerate(points):
        dominated = any(
            m2 <= m and sign * q2 >= sign * q and (m2 < m or sign * q2 > sign * q)
            for j, (m2, q2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


class CompareDashboard(EffnbWidget):
    """Variants of one or more reports side by side: scatter with the Pareto front, sortable table, export."""

    title = "effnb compare dashboard"

    def __init__(self, reports, memory: str = "weight memory (MB)"):
        self.reports = _as_report_dicts(reports)
        if memory not in MEMORY_KEYS:
            raise ValueError(f"memory axis {memory!r} is not one of {', '.join(MEMORY_KEYS)}")
        self.memory_axis = memory
        self.sort_by, self.ascending = "name", True
        self.rows = self._flatten()
        self.metric = next((r["quality"]["metric"] for r in self.rows if r["quality"]), None)
        self.higher_is_better = next((bool(r["quality"].get("higher_is_better", False)) for r in self.rows
                                      if r["quality"] and r["quality"]["metric"] == self.metric), False)

    # ------------------------------------------------------------------ data

    def _flatten(self) -> list[dict]:
        rows, seen = [], {}
        for rep in self.reports:
            for v in rep["variants"]:
                name = v["name"]
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:  # the same name in two reports: keep both, tell them apart
                    name = f"{name} ({seen[name]})"
                speed, speed_label = _speed(v)
                rows.append({"name": name, "weight_bytes": v.get("weight_bytes"),
                             "peak_memory_bytes": v.get("peak_memory_bytes"),
                             "quality": v.get("quality") or None, "speed": speed, "speed_label": speed_label,
                             "parameters": v.get("parameters")})
        return rows

    def _plottable(self) -> list[int]:
        key = MEMORY_KEYS[self.memory_axis]
        return [i for i, r in enumerate(self.rows)
                if r[key] is not None and r["quality"] and r["quality"]["metric"] == self.metric
                and r["quality"].get("value") is not None]

    def pareto(self) -> list[str]:
        """Names of the variants on the memory/quality Pareto front (for the current memory axis)."""
        key = MEMORY_KEYS[self.memory_axis]
        idx = self._plottable()
        pts = [(self.rows[i][key], self.rows[i]["quality"]["value"]) for i in idx]
        return [self.rows[idx[k]]["name"] for k in pareto_front(pts, self.higher_is_better)]

    def table_rows(self) -> list[list[Any]]:
        """The table as shown: [name, weight MB, peak MB, quality, speed, Pareto], sorted as selected."""
        front = set(self.pareto())
        out = []
        for r in self.rows:
            q = r["quality"]["value"] if r["quality"] else None
            out.append([r["name"], r["weight_bytes"] and r["weight_bytes"] / 1e6,
                        r["peak_memory_bytes"] and r["peak_memory_bytes"] / 1e6, q, r["speed"],
                        "yes" if r["name"] in front else ""])
        col = SORT_KEYS.index(self.sort_by)
        present = [row for row in out if row[col] is not None]
        missing = [row for row in out if row[col] is None]  # unmeasured values go last either way
        present.sort(key=lambda row: row[col], reverse=not self.ascending)
        return present + missing

    def sort(self, by: str, ascending: bool = True) -> CompareDashboard:
        """Sort the table by one of ``SORT_KEYS``."""
        if by not in SORT_KEYS:
            raise ValueError(f"cannot sort by {by!r}; columns: {', '.join(SORT_KEYS)}")
        self.sort_by, self.ascending = by, bool(ascending)
        self._refresh()
        return self

    # ------------------------------------------------------------------ views

    def _table_html(self) -> str:
        def fmt(v, spec):
            return "—" if v is None else format(v, spec)

        speed_label = next((r["speed_label"] for r in self.rows if r["speed"] is not None), "speed")
        head = ["variant", "weight MB", "peak MB", self.metric or "quality", speed_label, "Pareto front"]
        rows = [[r[0], fmt(r[1], ",.1f"), fmt(r[2], ",.1f"), fmt(r[3], ".4g"), fmt(r[4], ".4g"), r[5]]
                for r in self.table_rows()]
        arrow = "ascending" if self.ascending else "descending"
        return (html_table(head, rows, "effnb-compare-table")
                + f"<p style='font-size:smaller;color:#666'>sorted by {html.escape(self.sort_by)} ({arrow}); "
                  f"Pareto front over {html.escape(self.memory_axis)} and {html.escape(self.metric or 'quality')} "
                  f"({'higher' if self.higher_is_better else 'lower'} is better)</p>")

    def static_html(self) -> str:
        return self._table_html()

    def static_figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        self._draw(fig)
        return fig

    def _draw(self, fig) -> None:
        import plotly.graph_objects as go

        key = MEMORY_KEYS[self.memory_axis]
        idx = self._plottable()
        xs = [self.rows[i][key] / 1e6 for i in idx]
        ys = [self.rows[i]["quality"]["value"] for i in idx]
        speeds = [self.rows[i]["speed"] for i in idx]
        names = [self.rows[i]["name"] for i in idx]
        speed_label = next((self.rows[i]["speed_label"] for i in idx if self.rows[i]["speed"] is not None), "speed")
        front = set(self.pareto())
        fidx = sorted((k for k in range(len(idx)) if names[k] in front), key=lambda k: xs[k])
        has_speed = any(s is not None for s in speeds)
        marker = {"size": 14, "line": {"width": 1, "color": "#333"}}
        if has_speed:
            marker.update(color=[s if s is not None else float("nan") for s in speeds], colorscale="Viridis",
                          showscale=True, colorbar={"title": {"text": speed_label}})
        hover = [f"{n}<br>{x:,.1f} MB<br>{self.metric} {y:.4g}<br>{speed_label} "
                 + ("—" if s is None else f"{s:.4g}") for n, x, y, s in zip(names, xs, ys, speeds)]
        scatter = go.Scatter(x=xs, y=ys, mode="markers+text", text=names, textposition="top center",
                             marker=marker, hovertext=hover, hoverinfo="text", name="variants")
        line = go.Scatter(x=[xs[k] for k in fidx], y=[ys[k] for k in fidx], mode="lines",
                          line={"dash": "dash", "color": "#d62728"}, name="Pareto front", hoverinfo="skip")
        with fig.batch_update():
            fig.data = []
            fig.add_trace(line)
            fig.add_trace(scatter)
            fig.update_layout(title_text=f"memory vs {self.metric or 'quality'} (colour: {speed_label})",
                              xaxis_title=self.memory_axis,
                              yaxis_title=f"{self.metric or 'quality'} ({'higher' if self.higher_is_better else 'lower'}"
                                          " is better)",
                              height=380, margin={"t": 50, "b": 40, "l": 60, "r": 20}, showlegend=True,
                              legend={"orientation": "h", "y": -0.2})

    def _build(self):
        import ipywidgets as W

        self._plot = PlotOutput(self.static_figure())
        self._fig = self._plot.fig
        self._table = W.HTML(self._table_html())
        self._axis = W.Dropdown(options=list(MEMORY_KEYS), value=self.memory_axis, description="memory")
        self._sort = W.Dropdown(options=list(SORT_KEYS), value=self.sort_by, description="sort by")
        self._order = W.ToggleButton(value=not self.ascending, description="descending", icon="sort")
        self._path = W.Text(value="effnb-compare", description="file", layout=W.Layout(width="260px"))
        self._export_json = W.Button(description="export JSON", icon="download")
        self._export_html = W.Button(description="export HTML", icon="download")
        self._status = W.HTML()
        self._axis.observe(lambda ch: self.set_memory_axis(ch["new"]), names="value")
        self._sort.observe(lambda ch: self.sort(ch["new"], self.ascending), names="value")
        self._order.observe(lambda ch: self.sort(self.sort_by, not ch["new"]), names="value")
        self._export_json.on_click(lambda _b: self._export("json"))
        self._export_html.on_click(lambda _b: self._export("html"))
        controls = W.HBox([self._axis, self._sort, self._order])
        export = W.HBox([self._path, self._export_json, self._export_html, self._status])
        box = W.VBox([controls, self._plot.widget, self._table, export])
        box.add_class("effnb-compare")
        return box

    def set_memory_axis(self, label: str) -> None:
        if label not in MEMORY_KEYS:
            raise ValueError(f"memory axis {label!r} is not one of {', '.join(MEMORY_KEYS)}")
        self.memory_axis = label
        self._refresh(figure=True)

    def _refresh(self, figure: bool = False) -> None:
        if self._box is None:
            return
        self._table.value = self._table_html()
        if figure:
            self._draw(self._fig)
            self._plot.refresh()

    def _export(self, kind: str) -> None:
        base = self._path.value.strip() or "effnb-compare"
        path = base if base.endswith(f".{kind}") else f"{base}.{kind}"
        try:
            (self.to_json if kind == "json" else self.to_html)(path)
            self._status.value = f"written to <code>{html.escape(path)}</code>"
        except OSError as exc:
            self._status.value = error_html(f"cannot write {path}: {exc}")

    # ------------------------------------------------------------------ export

    def to_dict(self) -> dict:
        return {"schema": "effnb.compare", "schema_version": 1, "memory_axis": self.memory_axis,
                "quality_metric": self.metric, "higher_is_better": self.higher_is_better,
                "pareto_front": self.pareto(), "reports": self.reports}

    def to_json(self, path: str | None = None, indent: int = 2) -> str:
        """All reports, the axis and the Pareto front as JSON (written to ``path`` when given)."""
        from ..report import to_json

        return to_json(self.to_dict(), path, indent)

    def to_html(self, path: str | None = None, include_plotlyjs: str | bool = "cdn") -> str:
        """A standalone HTML page: the figure and the table (plotly.js from its CDN unless told otherwise)."""
        fig_html = self.static_figure().to_html(full_html=False, include_plotlyjs=include_plotlyjs)
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title></head>"
                f"<body><h2>{html.escape(self.title)}</h2>{fig_html}{self._table_html()}</body></html>")
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page
