"""Report and Result: rows of measurements, ratios computed from them, HTML, JSON, DataFrame, figure.

A Report is a list of rows (one per variant; the first is the baseline) plus the environment they
were measured in. Ratios are always computed from the rows, never typed in. ``to_dict()`` is the
versioned, JSON-ready form anyone can compare; ``REPORT_SCHEMA`` is its JSON schema.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from typing import Any

SCHEMA_NAME = "effnb.report"
SCHEMA_VERSION = 1

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "effnb efficiency report",
    "type": "object",
    "required": ["schema", "schema_version", "environment", "variants", "ratios"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "title": {"type": ["string", "null"]},
        "environment": {
            "type": "object",
            "required": ["device", "date", "versions", "threads"],
            "properties": {
                "device": {"type": "string"},
                "date": {"type": "string"},
                "threads": {"type": "integer"},
                "versions": {"type": "object"},
            },
        },
        "variants": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "parameters", "weight_bytes", "peak_memory_bytes", "prefill_ms",
                             "decode_tokens_per_s", "quality", "energy", "flops_per_token", "extra"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "integer", "minimum": 0},
                    "trainable_parameters": {"type": "integer", "minimum": 0},
                    "weight_bytes": {"type": "integer", "minimum": 0},
                    "weight_bytes_by_dtype": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "peak_memory_bytes": _INT,
                    "prefill_ms": _NUM,
                    "decode_tokens_per_s": _NUM,
                    # optional (absent from reports written before they existed): decode's bandwidth accounting
                    "bytes_per_token": _INT,
                    "read_bandwidth_bytes_per_s": _NUM,
                    "bandwidth_fraction": _NUM,
                    "flops_per_token": _NUM,
                    "quality": {
                        "type": ["object", "null"],
                        "required": ["metric", "value"],
                        "properties": {"metric": {"type": "string"}, "value": _NUM},
                    },
                    "energy": {
                        "type": "object",
                        "required": ["joules_per_token", "method"],
                        "properties": {
                            "joules_per_token": _NUM,
                            "method": {"type": "string", "pattern": "^(measured|estimated|not measured)"},
                        },
                    },
                    "extra": {"type": "object"},
                },
            },
        },
        "ratios": {"type": "array"},
    },
}


def validate(report_dict: dict) -> None:
    """Raise ``ValueError`` if ``report_dict`` does not follow ``REPORT_SCHEMA``."""
    import jsonschema

    try:
        jsonschema.validate(report_dict, REPORT_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"report does not follow the effnb.report schema at {where}: {exc.message}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _ratio(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# --------------------------------------------------------------------------- formatting


def _mb(b) -> str:
    return "—" if b is None else f"{b / 1e6:,.1f} MB"


def _fmt_params(n) -> str:
    return "—" if n is None else f"{n / 1e6:,.2f} M"


def _fmt(v, spec: str, unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def _quality_text(q) -> str:
    if not q:
        return "—"
    text = f"{q['metric']} {q['value']:.4g}" if q.get("value") is not None else f"{q['metric']} —"
    agree = q.get("agreement")
    if agree:
        text += "; vs baseline: " + ", ".join(f"{k} {v:.4f}" for k, v in agree.items() if isinstance(v, float))
    return text


def _energy_text(e) -> str:
    if not e or e.get("joules_per_token") is None:
        reason = (e or {}).get("reason")
        return "not measured" + (f" ({reason})" if reason else "")
    return f"{e['joules_per_token']:.4g} J/token ({e['method']})"


_METRICS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("parameters", "parameters", lambda r: _fmt_params(r.get("parameters"))),
    ("trainable", "trainable_parameters", lambda r: _fmt_params(r.get("trainable_parameters"))),
    ("weight memory", "weight_bytes", lambda r: _mb(r.get("weight_bytes"))),
    ("peak memory", "peak_memory_bytes", lambda r: _mb(r.get("peak_memory_bytes"))),
    ("prefill latency", "prefill_ms", lambda r: _fmt(r.get("prefill_ms"), ".1f", " ms")
     + (f" ({r['prompt_tokens']} tokens)" if r.get("prefill_ms") is not None and r.get("prompt_tokens") else "")),
    ("decode speed", "decode_tokens_per_s", lambda r: _fmt(r.get("decode_tokens_per_s"), ".1f", " tokens/s")
     if r.get("kind") not in ("encoder", "module") else f"— ({r.get('kind')})"),
    ("quality", "quality", lambda r: _quality_text(r.get("quality"))),
    ("FLOPs per token", "flops_per_token", lambda r: _fmt(r.get("flops_per_token") and r["flops_per_token"] / 1e9, ".4g", " GFLOP")),
    ("energy", "energy", lambda r: _energy_text(r.get("energy"))),
]


def _bandwidth_text(r: dict) -> str:
    frac, per_token, bw = r.get("bandwidth_fraction"), r.get("bytes_per_token"), r.get("read_bandwidth_bytes_per_s")
    if frac is None or not per_token or not bw:
        return "—"
    return f"{frac:.0%} of the {bw / per_token:,.1f} tokens/s limit ({_mb(per_token)} per token)"


#: shown under decode speed when some row measured it: decode tokens/s x bytes per token / read bandwidth
_BANDWIDTH_METRIC = ("decode vs bandwidth limit", "bandwidth_fraction", _bandwidth_text)


class Report:
    """Measurements of one or more variants of a model; the first row is the baseline."""

    def __init__(self, rows: list[dict], environment: dict, title: str | None = None):
        if not rows:
            raise ValueError("a Report needs at least one row")
        self.rows = rows
        self.environment = environment
        self.title = title

    # ----------------------------------------------------------------- data

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.rows]

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no variant named {name!r}; variants: {', '.join(self.names)}")

    def ratios(self) -> list[dict]:
        """Each variant against the baseline: how many times smaller, faster, and the quality change."""
        base = self.rows[0]
        out = []
        for r in self.rows[1:]:
            qb, qr = base.get("quality") or {}, r.get("quality") or {}
            q_change = None
            if qb.get("value") is not None and qr.get("value") is not None and qb.get("metric") == qr.get("metric"):
                q_change = _ratio(qr["value"] - qb["value"], abs(qb["value"]))
            out.append({
                "variant": r["name"],
                "baseline": base["name"],
                "weight_bytes_smaller_x": _ratio(base.get("weight_bytes"), r.get("weight_bytes")),
                "peak_memory_smaller_x": _ratio(base.get("peak_memory_bytes"), r.get("peak_memory_bytes")),
                "prefill_speedup_x": _ratio(base.get("prefill_ms"), r.get("prefill_ms")),
                "decode_speedup_x": _ratio(r.get("decode_tokens_per_s"), base.get("decode_tokens_per_s")),
                "quality_relative_change": q_change,
            })
        return out

    def to_dict(self) -> dict:
        """JSON-ready, versioned form (see ``REPORT_SCHEMA``)."""
        return _jsonable({
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "title": self.title,
            "environment": self.environment,
            "variants": self.rows,
            "ratios": self.ratios(),
        })

    def to_json(self, path: str | None = None, indent: int = 2) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        return to_json(self.to_dict(), path, indent)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        validate(d)
        return cls(d["variants"], d["environment"], d.get("title"))

    def to_dataframe(self):
        """One row per variant with the headline columns (pandas DataFrame)."""
        import pandas as pd

        records = []
        for r in self.rows:
            q = r.get("quality") or {}
            records.append({
                "name": r["name"], "parameters": r.get("parameters"), "weight_bytes": r.get("weight_bytes"),
                "peak_memory_bytes": r.get("peak_memory_bytes"), "prefill_ms": r.get("prefill_ms"),
                "decode_tokens_per_s": r.get("decode_tokens_per_s"), "bandwidth_fraction": r.get("bandwidth_fraction"),
                "quality_metric": q.get("metric"),
                "quality": q.get("value"), "flops_per_token": r.get("flops_per_token"),
                "joules_per_token": (r.get("energy") or {}).get("joules_per_token"),
            })
        return pd.DataFrame.from_records(records).set_index("name")

    # ----------------------------------------------------------------- display

    def _metrics(self) -> list[tuple[str, str, Callable[[dict], str]]]:
        if all(r.get("bandwidth_fraction") is None for r in self.rows):
            return _METRICS
        at = [m[1] for m in _METRICS].index("decode_tokens_per_s") + 1
        return [*_METRICS[:at], _BANDWIDTH_METRIC, *_METRICS[at:]]

    def _ratio_note(self, i: int, key: str) -> str:
        if i == 0:
            return ""
        rat = self.ratios()[i - 1]
        mapping = {"weight_bytes": ("weight_bytes_smaller_x", "smaller"),
                   "peak_memory_bytes": ("peak_memory_smaller_x", "smaller"),
                   "prefill_ms": ("prefill_speedup_x", "faster"),
                   "decode_tokens_per_s": ("decode_speedup_x", "faster"),
                   "quality": ("quality_relative_change", None)}
        if key not in mapping or rat[mapping[key][0]] is None:
            return ""
        value = rat[mapping[key][0]]
        if mapping[key][1] is None:
            return f" ({value:+.2%})"
        return f" ({value:.2f}x {mapping[key][1]})"

    def to_text(self) -> str:
        """Plain-text table for terminals and logs."""
        header = ["metric", *self.names]
        lines = [header]
        for label, key, fmt in self._metrics():
            lines.append([label, *[fmt(r) + self._ratio_note(i, key) for i, r in enumerate(self.rows)]])
        widths = [max(len(str(row[c])) for row in lines) for c in range(len(header))]
        out = [("  ".join(str(v).ljust(w) for v, w in zip(row, widths))).rstrip() for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        if self.title:
            out.insert(0, self.title)
        out.append(self._footer())
        return "\n".join(out)

    def _footer(self) -> str:
        e = self.environment
        a = e.get("audit", {})
        where = e.get("gpu") or e.get("cpu")
        timing = (f"median of {a.get('repeats')} after {a.get('warmup')} warm-up" if a else "")
        bw = e.get("read_bandwidth")
        limit = (f" Decode's bandwidth limit = read bandwidth / bytes per token; read bandwidth "
                 f"{bw['bytes_per_s'] / 1e9:.1f} GB/s: {bw['method']}." if bw else "")
        return (f"Measured {e.get('date', '?')} on {e.get('device')} ({where}), {e.get('threads')} threads, "
                f"torch {e.get('versions', {}).get('torch')}; {timing}. Ratios are against '{self.names[0]}'.{limit}")

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th style='text-align:right'>{esc(n)}</th>" for n in self.names)
        body = []
        for label, key, fmt in self._metrics():
            cells = "".join(
                f"<td style='text-align:right'>{esc(fmt(r))}<span style='color:#2a7'>{esc(self._ratio_note(i, key))}</span></td>"
                for i, r in enumerate(self.rows)
            )
            body.append(f"<tr><th style='text-align:left'>{esc(label)}</th>{cells}</tr>")
        title = f"<h4>{esc(self.title)}</h4>" if self.title else ""
        return (f"<div class='effnb-report'>{title}<table><thead><tr><th>metric</th>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>"
                f"<p style='font-size:smaller;color:#666'>{esc(self._footer())}</p></div>")

    def __repr__(self) -> str:
        return self.to_text()

    def figure(self):
        """A plotly figure: weight memory, peak memory, speed and quality per variant."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        encoder = self.rows[0].get("kind") == "encoder"
        speed_key, speed_title = ("prefill_ms", "latency (ms)") if encoder else ("decode_tokens_per_s", "decode (tokens/s)")
        q = self.rows[0].get("quality") or {}
        panels = [("weight_bytes", "weight memory (MB)", 1e-6), ("peak_memory_bytes", "peak memory (MB)", 1e-6),
                  (speed_key, speed_title, 1.0), ("quality", q.get("metric", "quality"), 1.0)]
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels])
        for col, (key, _title, scale) in enumerate(panels, start=1):
            vals = []
            for r in self.rows:
                v = (r.get("quality") or {}).get("value") if key == "quality" else r.get(key)
                vals.append(None if v is None else v * scale)
            fig.add_trace(go.Bar(x=self.names, y=vals, name=_title, showlegend=False), row=1, col=col)
        fig.update_layout(height=320, margin={"t": 40, "b": 20, "l": 30, "r": 10},
                          title_text=self.title or None)
        return fig

    def _ipython_display_(self) -> None:
        display_all(self._repr_html_(), [self.figure])


def to_json(data: dict, path: str | None = None, indent: int = 2) -> str:
    """``data`` (already JSON-ready) as JSON text; also written to ``path`` when given, with a final newline.

    The one writer behind every ``to_json`` method (reports, MoE statistics, comparisons)."""
    text = json.dumps(data, indent=indent)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


def display_all(html_text: str, figures: list[Callable[[], Any]]) -> None:
    """Show ``html_text`` then each figure (``figures``: callables making plotly figures) in a notebook."""
    from IPython.display import HTML, display

    display(HTML(html_text))
    for make in figures:
        fig = make()
        # the figure's JSON is kept in the notebook (plotly's own MIME type), so it survives
        # headless execution and renders in JupyterLab, Notebook 7, VS Code and Colab.
        display({"application/vnd.plotly.v1+json": json.loads(fig.to_json()),
                 "text/plain": f"<plotly figure: {fig.layout.title.text or 'effnb'}>"}, raw=True)


class Result:
    """What a technique returns: the new model, its before/after Report, and technique details."""

    def __init__(self, model, report: Report, details: dict | None = None,
                 figures: list[Callable[[], Any]] | None = None):
        self.model = model
        self.report = report
        self.details = details or {}
        self.figures = list(figures or [])

    def __iter__(self):  # model, report = effnb.quantize(...)
        yield self.model
        yield self.report

    def to_dict(self) -> dict:
        return self.report.to_dict() | {"details": _jsonable(self.details)}

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def __repr__(self) -> str:
        return self.report.to_text()

    def _ipython_display_(self) -> None:
        display_all(self.report._repr_html_(), [self.report.figure, *self.figures])
