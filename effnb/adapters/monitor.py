"""``TrainingMonitor``: the live loss / held-out loss view of a training loop (used by ``effnb.finetune``).

    mon = TrainingMonitor(title="fine-tuning", total_steps=60)
    for step in range(60):
        ...
        mon.update(step, loss=loss.item())
        if step % 10 == 0:
            mon.update(step, eval_loss=held_out)
    mon.close()

In a Jupyter kernel the first ``update`` shows the live curves and a progress bar, redrawn at
most every ``min_interval_s`` (the loop is not slowed by drawing) and always at ``close()``.
Headless (a script, ``EFFNB_STATIC_WIDGETS=1``) nothing is drawn while training; ``close()`` then
shows the static figure when IPython is running. ``display=False`` keeps the history only.

It lives with the fine-tuning technique because it is that technique's own display (as its report
figures are); ``effnb.widgets.TrainingMonitor`` re-exports it for users of the widgets.
"""

from __future__ import annotations

import math
import time

from ..display import DisplayWidget, PlotOutput, html_table, in_kernel


class TrainingMonitor(DisplayWidget):
    """Loss per step and held-out loss, live in a notebook, a static figure elsewhere."""

    def __init__(self, title: str = "training", total_steps: int | None = None, *, display: bool = True,
                 min_interval_s: float = 0.5):
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
        self.title = title
        self.total_steps = total_steps
        self.display = display
        self.min_interval_s = float(min_interval_s)
        self.history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "eval_loss": [], "extra": []}
        self.closed = False
        self._live = False
        self._handle = None
        self._last_draw = 0.0
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ the training loop's side

    def update(self, step: int, loss: float | None = None, eval_loss: float | None = None, **extra) -> None:
        """Record the training loss and/or the held-out loss at ``step`` (other scalars go to ``extra``)."""
        if self.closed:
            raise RuntimeError("this TrainingMonitor is closed; make a new one for another run")
        step = int(step)
        if loss is not None:
            self.history["step"].append(step)
            self.history["loss"].append(float(loss))
        if eval_loss is not None:
            self.history["eval_step"].append(step)
            self.history["eval_loss"].append(float(eval_loss))
        if extra:
            self.history["extra"].append({"step": step, **{k: float(v) for k, v in extra.items()}})
        self._maybe_draw(step)

    def close(self) -> None:
        """Final redraw (live) or the static figure (headless). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if not self.display:
            return
        if self._live:
            self._draw(final=True)
            if self._handle is not None:  # the static fallback in the notebook now holds the final curves
                self._handle.update(self.live_bundle(), raw=True)
        else:
            try:
                from IPython import get_ipython
            except ImportError:  # pragma: no cover
                return
            if get_ipython() is not None:
                from IPython.display import display

                display(self.static_bundle(), raw=True)

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ views

    def _maybe_draw(self, step: int) -> None:
        if not self.display:
            return
        if not self._live and self._handle is None:
            if not in_kernel():
                return
            from IPython.display import display

            self._live = True
            self._handle = display(self.live_bundle(), raw=True, display_id=True)
            self._last_draw = time.perf_counter()
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            self._draw()

    def _status_text(self, final: bool = False) -> str:
        h = self.history
        parts = []
        last = max([*h["step"], *h["eval_step"]], default=None)
        if last is not None:
            parts.append(f"step {last}" + (f" / {self.total_steps}" if self.total_steps else ""))
        if h["loss"]:
            parts.append(f"loss {h['loss'][-1]:.4f}")
        if h["eval_loss"]:
            parts.append(f"held-out loss {h['eval_loss'][-1]:.4f}")
        parts.append(f"{time.perf_counter() - self._t0:.1f} s")
        if final:
            parts.append("done")
        return " · ".join(parts)

    def _draw(self, final: bool = False) -> None:
        if self._box is None:
            return
        h = self.history
        with self._fig.batch_update():
            self._fig.data[0].x, self._fig.data[0].y = list(h["step"]), list(h["loss"])
            self._fig.data[1].x, self._fig.data[1].y = list(h["eval_step"]), list(h["eval_loss"])
        self._plot.refresh()
        if self._bar is not None:
            last = max([*h["step"], *h["eval_step"]], default=0)
            self._bar.value = min(self.total_steps, last + 1)
        self._label.value = self._status_text(final)

    def _traces(self):
        import plotly.graph_objects as go

        h = self.history
        return [go.Scatter(x=list(h["step"]), y=list(h["loss"]), mode="lines", name="train loss"),
                go.Scatter(x=list(h["eval_step"]), y=list(h["eval_loss"]), mode="lines+markers",
                           name="held-out loss")]

    def _layout(self) -> dict:
        return {"title_text": self.title, "xaxis_title": "step", "yaxis_title": "loss", "height": 320,
                "margin": {"t": 40, "b": 40, "l": 50, "r": 10}}

    def figure(self):
        """The curves so far as a static plotly figure."""
        import plotly.graph_objects as go

        fig = go.Figure(self._traces())
        fig.update_layout(**self._layout())
        return fig

    static_figure = figure

    def static_html(self) -> str:
        h = self.history
        rows = []
        if h["loss"]:
            rows.append(["train loss", h["step"][0], f"{h['loss'][0]:.4f}", h["step"][-1], f"{h['loss'][-1]:.4f}",
                         f"{min(h['loss']):.4f}"])
        if h["eval_loss"]:
            rows.append(["held-out loss", h["eval_step"][0], f"{h['eval_loss'][0]:.4f}", h["eval_step"][-1],
                         f"{h['eval_loss'][-1]:.4f}", f"{min(h['eval_loss']):.4f}"])
        if not rows:
            return "<p>no steps recorded yet</p>"
        return html_table(["", "first step", "loss", "last step", "loss", "lowest"], rows, "effnb-training-table")

    def _build(self):
        import ipywidgets as W

        self._plot = PlotOutput(self.figure())
        self._fig = self._plot.fig
        self._bar = (W.IntProgress(value=0, min=0, max=self.total_steps, description="steps")
                     if self.total_steps else None)
        self._label = W.Label(self._status_text())
        top = W.HBox([self._bar, self._label] if self._bar is not None else [self._label])
        box = W.VBox([top, self._plot.widget])
        box.add_class("effnb-training")
        return box

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict:
        """First, last and lowest losses (NaN-free), for tests and reports."""
        h = self.history

        def stats(values):
            vals = [v for v in values if not math.isnan(v)]
            return {"first": vals[0], "last": vals[-1], "lowest": min(vals)} if vals else None

        return {"steps": len(h["step"]), "loss": stats(h["loss"]), "eval_loss": stats(h["eval_loss"])}
