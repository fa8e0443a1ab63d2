"""Each widget's static view (HTML + plotly figure) lands in a papermill-executed notebook."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent / "browser" / "widgets.ipynb"
# widget class in the static HTML -> the widget
STATIC_MARKERS = {"effnb-quant-summary": "QuantExplorer", "effnb-lora-summary": "LoraExplorer",
                  "effnb-router-text": "RouterExplorer", "effnb-compare-table": "CompareDashboard",
                  "effnb-training-table": "TrainingMonitor"}


def test_widgets_leave_static_views_in_a_papermill_run(tmp_path):
    import nbformat
    import papermill as pm

    out = tmp_path / "widgets.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), cwd=str(tmp_path), kernel_name="python3",
                        execution_timeout=300, progress_bar=False, log_output=False)
    nb = nbformat.read(str(out), as_version=4)
    found = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            html = data.get("text/html", "")
            for marker, name in STATIC_MARKERS.items():
                if marker in html and "effnb-widget-static" in html:
                    fig = data.get("application/vnd.plotly.v1+json")
                    assert fig and fig["data"], f"{name}: static view without a plotly figure"
                    found[name] = output
    assert sorted(found) == sorted(STATIC_MARKERS.values())
    # the training curves in the notebook are the final ones (updated at close), not the first step's
    training = found["TrainingMonitor"]["data"]["application/vnd.plotly.v1+json"]["data"]
    assert len(training[0]["x"]) == 20 and len(training[1]["x"]) == 4


@pytest.mark.parametrize("static", ["1"])
def test_static_mode_shows_no_widget_view(tmp_path, monkeypatch, static):
    """EFFNB_STATIC_WIDGETS=1: only the static view, even in a kernel."""
    from effnb.display import in_kernel

    monkeypatch.setenv("EFFNB_STATIC_WIDGETS", static)
    assert in_kernel() is False
