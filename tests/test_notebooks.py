"""The tutorial notebooks: committed clean, built to the course's conventions, and run headless.

Hygiene tests (fast, no kernel): no outputs, one ``parameters`` cell, CI parameters that exist, learning goals at
the top, a summary at the end, 2-3 checked exercises whose keys are registered, no solutions printed, and the
course list in docs/workshop.md matching the files.

Execution tests (``slow``): every notebook runs under papermill with its ``metadata.effnb.ci_parameters`` in its
own process, with a notebook-wide time limit (the kernel is killed past it, so nothing hangs); a failure names
the cell (index in the committed notebook, first line) and the error; a dead kernel fails the run.
Time limit per notebook: ``metadata.effnb.ci_timeout_s`` or 600 s (``EFFNB_NOTEBOOK_TIMEOUT`` overrides).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
WORKSHOP = ROOT / "docs" / "workshop.md"
DEFAULT_TIMEOUT_S = 600


def _runner():
    """benchmarks/notebooks.py, which holds the runner (also used to measure the notebooks)."""
    name = "effnb_bench_notebooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "notebooks.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _nb(path: Path) -> dict:
    return json.loads(path.read_text())


def ci_parameters(path: Path) -> dict:
    """CI-sized parameters live in the notebook's own metadata: ``metadata.effnb.ci_parameters``.

    Every value not named there keeps the notebook's default (the size a participant runs).
    """
    return _nb(path)["metadata"].get("effnb", {}).get("ci_parameters", {})


def _timeout(path: Path) -> float:
    env = os.environ.get("EFFNB_NOTEBOOK_TIMEOUT")
    if env:
        return float(env)
    return float(_nb(path)["metadata"].get("effnb", {}).get("ci_timeout_s", DEFAULT_TIMEOUT_S))


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _markdown(nb) -> list[str]:
    return [_source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]


def _code(nb) -> str:
    return "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")


def test_there_is_a_course():
    names = [p.name for p in NOTEBOOKS]
    for required in ("00_quickstart.ipynb", "01_baseline.ipynb", "06_capstone.ipynb"):
        assert required in names, f"{required} is missing from notebooks/"


# ----------------------------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_valid_and_committed_without_outputs(path):
    nbformat.validate(nbformat.read(str(path), as_version=4))
    nb = _nb(path)
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_one_parameters_cell_and_ci_parameters_exist(path):
    nb = _nb(path)
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters', found {len(tagged)}"
    tree = ast.parse(_source(tagged[0]))
    names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    unknown = sorted(set(ci_parameters(path)) - names)
    assert not unknown, (f"{path.name}: metadata.effnb.ci_parameters names {unknown}, which the parameters cell "
                         f"does not define (it defines {sorted(names)})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_learning_goals_at_the_top_and_summary_at_the_end(path):
    md = _markdown(_nb(path))
    assert md, f"{path.name}: no markdown cells"
    assert re.search(r"learning goals|you will learn", md[0], re.I), \
        f"{path.name}: the first markdown cell must state the learning goals ('Learning goals' or 'You will learn')"
    assert any(re.search(r"^#+\s*(summary|key takeaways|recap)\b", m, re.I | re.M) for m in md[-2:]), \
        f"{path.name}: one of the last two markdown cells must be a '## Summary'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_exercises_are_checked_and_registered(path):
    from effnb import exercises

    src = _code(_nb(path))
    keys = re.findall(r"exercises\.check\(\s*['\"]([\w.]+)['\"]", src)
    assert 2 <= len(keys) <= 4, f"{path.name}: has {len(keys)} checked exercises (exercises.check), the course asks for 2-3"
    for key in keys:
        try:
            exercises._get(key)
        except ValueError as exc:
            pytest.fail(f"{path.name}: {exc}", pytrace=False)
    assert "exercises.solution(" not in src and "show_solutions(" not in src, \
        f"{path.name}: solutions must not be printed next to the exercises (instructors enable them)"


def _listed_in_docs() -> set[str]:
    return set(re.findall(r"\b(\d\d_[A-Za-z0-9_]+)\.ipynb", WORKSHOP.read_text()))


def test_every_notebook_is_in_the_workshop_docs_and_vice_versa():
    assert WORKSHOP.exists(), "docs/workshop.md is missing"
    listed = _listed_in_docs()
    present = {p.stem for p in NOTEBOOKS}
    assert not present - listed, f"notebooks not listed in docs/workshop.md: {sorted(present - listed)}"
    assert not listed - present, f"docs/workshop.md lists notebooks that do not exist: {sorted(listed - present)}"


def test_notebooks_readme_matches_the_files():
    readme = ROOT / "notebooks" / "README.md"
    if not readme.exists():
        pytest.skip("notebooks/README.md not written")
    listed = set(re.findall(r"\b(\d\d_[A-Za-z0-9_]+)\.ipynb", readme.read_text()))
    present = {p.stem for p in NOTEBOOKS}
    assert listed == present, f"notebooks/README.md lists {sorted(listed)}, the folder has {sorted(present)}"


# ---------------------------------------------------------------------------------- the runner itself


def _tiny_notebook(tmp_path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("X = 1")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), p, nbformat.v4.new_code_cell("y = X + 1"),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_runner_names_the_failing_cell(tmp_path):
    res = _runner().run_notebook(_tiny_notebook(tmp_path, "raise ValueError(f'boom {X}')"), {"X": 7},
                                 timeout_s=120, cwd=tmp_path)
    assert not res.ok
    assert "cell 3" in res.message and "ValueError: boom 7" in res.message, res.message


def test_runner_fails_fast_when_the_kernel_dies(tmp_path):
    res = _runner().run_notebook(_tiny_notebook(tmp_path, "import os\nos._exit(1)"), {}, timeout_s=120, cwd=tmp_path)
    assert not res.ok
    assert res.wall_s < 110, f"a dead kernel took {res.wall_s:.0f} s to be noticed"
    assert "cell 3" in res.message and "died" in res.message.lower(), res.message


def test_runner_kills_a_notebook_past_its_time_limit(tmp_path):
    res = _runner().run_notebook(_tiny_notebook(tmp_path, "import time\ntime.sleep(600)"), {}, timeout_s=20,
                                 cwd=tmp_path)
    assert not res.ok and res.wall_s < 60
    assert "timed out" in res.message and "cell 3" in res.message, res.message


# ------------------------------------------------------------------------------------------- execution


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_headless(path, tmp_path):
    res = _runner().run_notebook(path, ci_parameters(path), timeout_s=_timeout(path), cwd=tmp_path)
    if not res.ok:
        pytest.fail(f"{path.name} (CI parameters {res.parameters}): {res.message}", pytrace=False)
    if path.stem == "06_capstone":
        from effnb.report import validate

        card = json.loads((tmp_path / "capstone-report-card.json").read_text())
        validate(card)  # the report card follows the effnb.report schema
        assert len(card["variants"]) >= 2 and card["ratios"], "the report card compares no variants"
        page = (tmp_path / "capstone-report-card.html").read_text()
        assert "<table" in page and card["variants"][1]["name"] in page
