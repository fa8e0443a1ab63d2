"""docs/benchmarks.md is what benchmarks/results/*.json render to; the renderer on a small fixture."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "benchmarks" / "render.py"


def _render_module():
    spec = importlib.util.spec_from_file_location("effnb_bench_render", RENDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_matches_results():
    out = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", f"import runpy, sys; runpy.run_path({str(RENDER)!r}); print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=60).stdout


FIXTURE = {
    "schema": "effnb.bench-result/1", "section": "demo", "order": 1, "title": "Decode", "status": "measured",
    "device": "test CPU (2 cores)", "date": "2026-01-02 03:04 UTC", "command": "python benchmarks/cpu_decode.py",
    "versions": {"torch": "9.9"}, "load_average": "1.0-1.5", "format": "cpu_decode", "tokens": 10,
    "rows": [{"variant": "fp32", "tokens_per_s": 10.0, "vs_fp32": 1.0, "spread_s": [0.5, 2.0], "backend_calls": {}},
             {"variant": "int8 | x", "tokens_per_s": 21.234, "vs_fp32": 2.1234, "spread_s": [0.25, 1.0],
              "backend_calls": {}}],
    "notes": ["A note."],
}
TRANSCRIBED = {
    "schema": "effnb.bench-result/1", "section": "demo", "order": 2, "title": "Facts", "status": "transcribed",
    "device": "old CPU", "date": "2026-01-01", "command": ["a --x", "b"], "provenance": "from commit abc",
    "table": {"columns": ["what", "figure"], "rows": [["x", "1"]]},
}
EXPECTED = """intro
<!-- results:demo -->
**Decode**
Measured 2026-01-02 03:04 UTC; test CPU (2 cores); torch 9.9; load average 1.0-1.5.
Command: `python benchmarks/cpu_decode.py`.

| variant | tok/s | vs fp32 | fastest / slowest round (tok/s) |
| --- | --- | --- | --- |
| fp32 | 10.0 | 1.00 | 20.0 / 5.0 |
| int8 \\| x | 21.2 | 2.12 | 40.0 / 10.0 |

A note.

**Facts**
Measured 2026-01-01; old CPU. Transcribed from an earlier page: provenance in `benchmarks/results/b.json`.
Commands: `a --x`; `b`.

| what | figure |
| --- | --- |
| x | 1 |
<!-- /results -->
outro
"""


def _write(folder: Path, docs: dict) -> None:
    folder.mkdir()
    for name, doc in docs.items():
        (folder / name).write_text(json.dumps(doc))


def test_render_fixture_exact(tmp_path):
    render = _render_module()
    _write(tmp_path / "results", {"a.json": FIXTURE, "b.json": TRANSCRIBED})
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- results:demo -->\nstale text\n<!-- /results -->\noutro\n")
    args = ["--page", str(page), "--results", str(tmp_path / "results")]
    assert render.main(args + ["--check"]) == 1
    assert render.main(args) == 0
    assert page.read_text() == EXPECTED
    assert render.main(args + ["--check"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"provenance": None}, "needs its provenance"),
    ({"status": "guessed"}, "status must be"),
    ({"device": ""}, "missing device"),
    ({"section": "other"}, "no marker"),
])
def test_render_refuses_bad_results(tmp_path, capsys, change, message):
    render = _render_module()
    bad = {k: v for k, v in {**TRANSCRIBED, **change}.items() if v is not None}
    _write(tmp_path / "results", {"a.json": FIXTURE, "b.json": bad})
    page = tmp_path / "page.md"
    page.write_text("<!-- results:demo -->\n<!-- /results -->\n")
    assert render.main(["--page", str(page), "--results", str(tmp_path / "results"), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_ab_compare_ratios_and_exact():
    spec = importlib.util.spec_from_file_location("effnb_bench_ab", ROOT / "benchmarks" / "ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    def run(vs, ppl):
        return {"rows": [{"variant": "int8", "vs_fp32": vs, "quantize_s": vs * 3, "perplexity": ppl}]}

    a = [run(1.8, 10.0), run(2.0, 10.0), run(1.9, 10.0)]
    b = [run(1.9, 10.0), run(1.95, 10.0), run(2.1, 10.0)]
    rows, _ = ab.compare(a, b, ["*_s"], exact=False, wanted=["vs_fp32"])
    assert [(r["metric"], r["a_median"], r["b_median"], r["b_within_a_spread"]) for r in rows] == [
        ("vs_fp32", 1.9, 1.95, True)]
    rows, ok = ab.compare(a, b, ["*_s"], exact=True)
    assert ok is False and {r["metric"]: r["identical"] for r in rows} == {"vs_fp32": False, "perplexity": True}
    rows, ok = ab.compare(a, [run(5.0, 10.0)], ["*_s", "vs_*"], exact=True)
    assert ok is True and [r["metric"] for r in rows] == ["perplexity"]


def test_formatters_of_quantize_scripts():
    render = _render_module()
    quality = {"rows": [
        {"model": "smollm2", "variant": "fp32", "perplexity": 10.0, "quantize_s": 0.0},
        {"model": "smollm2", "variant": "effnb nf4 g64", "perplexity": 12.5, "quantize_s": 1.234},
        {"model": "minilm", "variant": "fp32", "cosine": 1.0, "top5": 1.0, "quantize_s": 0.0},
        {"model": "minilm", "variant": "effnb nf4 g64", "cosine": 0.975384, "top5": 0.90191, "quantize_s": 0.5}]}
    assert render.table(*render.drop_empty_columns(*render.FORMATTERS["quantize_quality"](quality))) == [
        "| model | variant | perplexity | vs fp32 | cosine | top-5 agreement | quantize s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| smollm2 | fp32 | 10.000 |  |  |  |  |",
        "| smollm2 | effnb nf4 g64 | 12.500 | +25.0% |  |  | 1.2 |",
        "| minilm | fp32 |  |  | 1.00000 | 1.0000 |  |",
        "| minilm | effnb nf4 g64 |  |  | 0.97538 | 0.9019 | 0.5 |"]
    times = {"rows": [{"method": "nf4", "seconds": [1.3, 1.1, 1.2]}]}
    assert render.table(*render.FORMATTERS["quantize_time"](times))[2] == "| nf4 | 1.20 | 1.10, 1.20, 1.30 |"
