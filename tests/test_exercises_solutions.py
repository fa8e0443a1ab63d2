"""The instructor's kit: every exercise has a solution and an explanation, written in its notebook's
variable names, shown only to instructors, and collected into a solutions notebook."""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

import pytest

from effnb import exercises

ROOT = Path(__file__).resolve().parents[1]
KEYS = exercises.list_exercises()


def test_every_topic_has_exercises_and_a_notebook():
    assert set(exercises.NOTEBOOKS) == set(exercises.TOPICS)
    for topic in exercises.TOPICS:
        assert exercises.list_exercises(topic), topic
        assert (ROOT / exercises.NOTEBOOKS[topic]).is_file(), exercises.NOTEBOOKS[topic]


@pytest.mark.parametrize("key", KEYS)
def test_every_exercise_has_a_solution_and_an_explanation(key, monkeypatch, capsys):
    monkeypatch.setenv("EFFNB_SOLUTIONS", "1")
    sol = exercises.solution(key)
    out = capsys.readouterr().out
    assert isinstance(sol, str) and sol.key == key
    tree = ast.parse(sol)  # valid Python that sets `answer`
    assert any(isinstance(t, ast.Name) and t.id == "answer" and isinstance(t.ctx, ast.Store) for t in ast.walk(tree))
    assert len(sol.explanation) > 40, f"{key}: the explanation says why, in a sentence or two"
    assert exercises.hint(key)
    capsys.readouterr()
    # printed: the code, then the explanation as comments
    assert out.startswith(sol.code)
    assert "# " + sol.explanation.split()[0] in out


def _read_names(code: str) -> set[str]:
    """Names the solution reads and does not assign itself (builtins left out)."""
    tree = ast.parse(code)
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    stored |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.Lambda) for a in n.args.args}
    stored |= {n.target.id for c in ast.walk(tree) if isinstance(c, ast.comprehension)
               for n in [c] if isinstance(n.target, ast.Name)}
    stored |= {e.id for c in ast.walk(tree) if isinstance(c, ast.comprehension) and isinstance(c.target, ast.Tuple)
               for e in c.target.elts if isinstance(e, ast.Name)}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - stored - set(dir(builtins))


def _defined_names(src: str) -> set[str]:
    """Names a notebook cell defines: assignments, imports, loop targets, defs, and `-o NAME` of a magic."""
    names, lines = set(), []
    for line in src.splitlines():
        if line.lstrip().startswith(("%", "!")):
            names |= set(re.findall(r"(?:-o|--output)\s+([A-Za-z_]\w*)", line))
            lines.append("")
        else:
            lines.append(line)
    tree = ast.parse("\n".join(lines))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


@pytest.mark.parametrize("key", KEYS)
def test_solution_uses_the_names_its_notebook_defines(key):
    """Pasted into the exercise cell, the solution finds its variables: each name it reads is defined by the
    notebook's code up to that cell (the check's keyword names do not count: the cell passes them)."""
    ex = exercises._get(key)
    nb = json.loads((ROOT / exercises.NOTEBOOKS[ex.topic]).read_text())
    defined = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        defined |= _defined_names(src)
        if f'exercises.check("{key}"' in src:
            break
    else:
        pytest.fail(f"{exercises.NOTEBOOKS[ex.topic]} has no exercise cell for {key}")
    missing = _read_names(ex.solution) - defined
    assert not missing, f"{key}: the solution reads {sorted(missing)}, which {exercises.NOTEBOOKS[ex.topic]} " \
                        "does not define before its check"


def test_solutions_stay_hidden_from_participants(monkeypatch, capsys):
    monkeypatch.delenv("EFFNB_SOLUTIONS", raising=False)
    exercises.show_solutions(False)
    assert exercises.solution("quant.snr") is None
    out = capsys.readouterr().out
    assert "Solutions are for instructors: run with EFFNB_SOLUTIONS=1" in out and "log10" not in out


def test_solutions_notebook_has_a_cell_per_exercise(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    path = exercises.write_solutions_notebook(tmp_path / "solutions.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    keys = [c.metadata["effnb"]["exercise"] for c in code]
    assert sorted(keys) == sorted(KEYS) and len(keys) == len(KEYS)  # one cell per exercise
    # topics in course order, exercises in the order their notebook asks them
    assert [k.split(".")[0] for k in keys] == [t for t in exercises.TOPICS for _ in exercises.list_exercises(t)]
    assert keys[:3] == ["quickstart.weight_mb", "quickstart.ms_per_token", "quickstart.bf16_smaller"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all("solution" in c.metadata["tags"] for c in code)
    snr = next(c for c in code if c.metadata["effnb"]["exercise"] == "quant.snr")
    assert snr.source.startswith("# quant.snr (notebooks/02_quantization.ipynb)\n")
    assert exercises._get("quant.snr").solution in snr.source
    # the notebook's own check line follows, so the cell can replace the exercise cell as it is
    assert snr.source.endswith('\nexercises.check("quant.snr", answer, w=w, w_q=w_q)')
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "### `lora.merge`" in text and exercises._get("lora.merge").explanation in text


def test_solutions_notebook_for_one_topic_and_bad_input(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(exercises.write_solutions_notebook(tmp_path / "moe.ipynb", topics="moe"), as_version=4)
    assert [c.metadata["effnb"]["exercise"] for c in nb.cells if c.cell_type == "code"] == \
        ["moe.active_share", "moe.tokens_per_expert", "moe.imbalance"]
    with pytest.raises(ValueError, match="unknown topic 'mow'; did you mean 'moe'"):
        exercises.write_solutions_notebook(tmp_path / "x.ipynb", topics=["mow"])
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        exercises.write_solutions_notebook(tmp_path / "missing" / "x.ipynb")


def test_solutions_notebook_from_the_command_line(tmp_path, capsys):
    from effnb.exercises.__main__ import main

    path = tmp_path / "kit.ipynb"
    assert main([str(path), "--topic", "kernels"]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    nb = json.loads(path.read_text())
    keys = [c["metadata"]["effnb"]["exercise"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert keys == exercises.list_exercises("kernels")
    assert main([str(tmp_path / "no" / "kit.ipynb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cheatsheet_names_every_command_and_only_real_options():
    """docs/cheatsheet.md (the instructor's printable page): each row's options exist in that command's parser."""
    from effnb.commands import build_parser, commands

    table = commands()
    seen = set()
    for line in (ROOT / "docs" / "cheatsheet.md").read_text().splitlines():
        m = re.match(r"\| `([a-z-]+)", line)
        if not m or m.group(1) not in table:
            continue
        name = m.group(1)
        seen.add(name)
        known = build_parser(table[name], f"%efficient {name}")._option_string_actions
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
        assert used, f"cheat sheet row for {name} names no option"
        assert not used - set(known), f"cheat sheet: {name} has no option {sorted(used - set(known))}"
    assert seen == set(table), f"cheat sheet misses {sorted(set(table) - seen)}"


def test_solution_cells_pass_their_notebooks_checks(tmp_path, capsys):
    """A cell of the solutions notebook, run where its notebook's variables exist, passes the check."""
    nbformat = pytest.importorskip("nbformat")
    torch = pytest.importorskip("torch")
    nb = nbformat.read(exercises.write_solutions_notebook(tmp_path / "k.ipynb", topics=["kernels", "baseline"]),
                       as_version=4)
    ns = {"exercises": exercises, "torch": torch, "statistics": __import__("statistics"),
          "bits": 4, "group": 64, "scale_bytes": 4, "bytes_per_weight": 0.5625,  # notebook 05's values
          "packed": torch.tensor([[0x21, 0xF0, 0x93], [0x7A, 0x05, 0x4C]], dtype=torch.uint8),
          "samples": [0.9, 0.2, 0.3, 0.25], "WARMUP": 1, "base": [0.5, 0.52, 0.49], "cand": [0.25, 0.26, 0.24]}
    capsys.readouterr()
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        exec(cell.source, dict(ns))
        key = cell.metadata["effnb"]["exercise"]
        assert f"✓ {key}: correct" in capsys.readouterr().out, key
