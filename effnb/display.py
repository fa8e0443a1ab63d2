"""What every effnb display shares (widgets, the training monitor): a live ipywidgets view in a kernel, a static
view everywhere else. Core layer: techniques (the fine-tuning monitor) and front ends (the widgets) both build on it.

A widget displays as one MIME bundle holding both views:

- ``application/vnd.jupyter.widget-view+json``: the live view (ipywidgets; each plotly figure sits
  in an ``Output`` widget as plotly's MIME type and is re-sent on a change, so the live view needs
  only ipywidgets' and plotly's own front-end renderers, no custom widget code). JupyterLab 4,
  Notebook 7, VS Code and Colab render this one first: its renderer outranks the others.
- ``text/html`` and ``application/vnd.plotly.v1+json``: the static view (a table and a plotly
  figure, as ``effnb.report`` shows). Front ends without a widget manager, nbconvert, papermill
  outputs and the docs fall back to it, so a headless run keeps something useful.

Outside a kernel (plain IPython, a script) only the static bundle is shown. Set the environment
variable ``EFFNB_STATIC_WIDGETS=1`` to force the static view everywhere.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any


def in_kernel() -> bool:
    """True inside a Jupyter kernel, where a front end with a widget manager may be attached."""
    if os.environ.get("EFFNB_STATIC_WIDGETS", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def require_widget_libraries() -> None:
    """ipywidgets is there, or one clear line."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        raise ImportError("effnb widgets need ipywidgets: pip install 'ipywidgets>=8.1' "
                          "(then reload the browser tab)") from None


def figure_bundle(fig) -> dict:
    """plotly's own MIME type: the figure's JSON is kept in the notebook and renders without a kernel."""
    return {"application/vnd.plotly.v1+json": json.loads(fig.to_json())}


class PlotOutput:
    """A plotly figure shown live inside an ipywidgets ``Output``; ``refresh()`` re-sends it.

    Not plotly's FigureWidget: on a loaded machine its figures sometimes stayed empty in
    JupyterLab (seen in the browser test), and it needs anywidget in every front end. An Output
    holding plotly's MIME type is drawn by plotly's own renderer, which every front end has.
    """

    def __init__(self, fig):
        import ipywidgets as W

        self.fig = fig
        self.widget = W.Output()
        self.widget.add_class("effnb-plot")
        self.refresh()

    def refresh(self) -> None:
        data = figure_bundle(self.fig) | {"text/plain": "<plotly figure>"}
        self.widget.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)


def html_table(head: list[str], rows: list[list[Any]], css_class: str = "effnb-table") -> str:
    esc = html.escape
    th = "".join(f"<th style='text-align:right'>{esc(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td style='text-align:right'>{esc(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table class='{css_class}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


class DisplayWidget:
    """Base class: subclasses give ``static_html()``, ``static_figure()`` and ``_build()`` (the live view)."""

    #: shown in the static view's heading and in ``text/plain``
    title = "effnb widget"

    _box = None

    # ------------------------------------------------------------------ to implement

    def static_html(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def static_figure(self):
        """The plotly figure: ``_empty_figure()`` (layout and empty traces) filled by ``_fill(fig)``.

        The live view redraws the same figure through ``_fill``; widgets without those two hooks override this.
        """
        fig = self._empty_figure()
        self._fill(fig)
        return fig

    def _build(self):  # pragma: no cover - abstract
        """The live ipywidgets view (a Box)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def widget(self):
        """The live ipywidgets view, built on first use."""
        if self._box is None:
            require_widget_libraries()
            self._box = self._build()
        return self._box

    def static_bundle(self) -> dict:
        fig = self.static_figure()
        note = ("<p style='font-size:smaller;color:#666'>static view of an effnb widget "
                "(open the notebook in JupyterLab with a running kernel for the interactive one)</p>")
        bundle = {"text/plain": f"<{self.title}>",
                  "text/html": f"<div class='effnb-widget-static'><h4>{html.escape(self.title)}</h4>"
                               f"{self.static_html()}{note}</div>"}
        if fig is not None:
            bundle.update(figure_bundle(fig))
        return bundle

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:  # noqa: ARG002 - IPython's signature
        return self.static_bundle()

    def live_bundle(self) -> dict:
        """The widget view with the static view as its fallback, in one bundle."""
        bundle = self.static_bundle()
        view = self.widget._repr_mimebundle_()
        bundle.update({k: v for k, v in view.items() if k != "text/plain"})
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.live_bundle() if in_kernel() else self.static_bundle(), raw=True)

    def show(self, static: bool | None = None) -> None:
        """Display the widget (``static=True``: the static view only)."""
        from IPython.display import display

        live = in_kernel() if static is None else not static
        display(self.live_bundle() if live else self.static_bundle(), raw=True)

    def to_text(self) -> str:
        """The static view as plain text (the command line prints this)."""
        return f"{self.title}\n" + html_to_text(self.static_html())

    def __repr__(self) -> str:
        return f"<{self.title}>"




def html_to_text(text: str) -> str:
    """A rough plain-text version of the static HTML (for the ``effnb`` command line)."""
    import re

    text = re.sub(r"</(tr|p|h4|div)>", "\n", text)
    text = re.sub(r"</t[hd]>", "  ", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
