"""Every notebook runs headless under papermill with CPU-sized parameters, and is committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))



def ci_parameters(path: Path) -> dict:
    """CI-sized parameters live in the notebook's own metadata: ``metadata.effnb.ci_parameters``.

    Every value not named there keeps the notebook's default (the size a participant runs).
    """
    return json.loads(path.read_text())["metadata"].get("effnb", {}).get("ci_parameters", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters', found {len(tagged)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless(path, tmp_path):
    import papermill as pm

    out = tmp_path / path.name
    try:
        pm.execute_notebook(str(path), str(out), parameters=ci_parameters(path), cwd=str(tmp_path),
                            kernel_name="python3", execution_timeout=600, progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as exc:  # name the failing cell, not a wall of JSON
        pytest.fail(f"{path.name}: cell {exc.exec_count} failed: {exc.ename}: {exc.evalue}", pytrace=False)
