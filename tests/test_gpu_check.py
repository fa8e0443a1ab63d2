"""``make gpu-check``'s rehearsal on the CPU: the dry run, the budget, the pip lines, the technique smoke.

The GPU machine it is made for is offline and has its own CUDA torch: these tests check that the
script installs nothing from an index and never a torch wheel, stops inside its budget with what it
did saved, and that every technique step of the smoke runs (at a tiny size, on the CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SMOKE = ROOT / "benchmarks" / "gpu_smoke.py"
STEPS = ["install", "probe", "kernel-tests", "smoke", "kernel-bench", "decode", "moe"]
CUDA_STEPS = {"kernel-tests": "tests/kernels/test_gpu.py", "smoke": "benchmarks/gpu_smoke.py",
              "kernel-bench": "benchmarks/gpu_kernels.py --short", "decode": "benchmarks/gpu_decode.py --short",
              "moe": "benchmarks/moe.py --shape mixtral --device cuda"}
DEAD = "http://127.0.0.1:9"  # nothing listens: any attempt to reach an index or a proxy fails at once


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "GPU_WHEELS"))}
    return env | {"PIP_INDEX_URL": DEAD + "/simple", "http_proxy": DEAD, "https_proxy": DEAD,
                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _wheel(folder: Path, dist: str, version: str = "0.1") -> Path:
    """A minimal, installable pure-Python wheel."""
    mod = dist.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]))
    return path


def _result(out: Path) -> dict:
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["schema"] == "effnb.gpu_check" and doc["version"] == 1
    assert [s["name"] for s in doc["steps"]] == [s for s in STEPS if s in {x["name"] for x in doc["steps"]}]
    for step in doc["steps"]:
        assert step["status"] in ("passed", "failed", "skipped", "timed out"), step
        assert set(step) >= {"name", "status", "reason", "seconds", "figures", "commands"}
    assert doc["finished"] is not None
    return doc


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="setuptools is not installed in this Python (pip --no-build-isolation builds with it)")
def test_dry_run_installs_offline_into_a_temporary_target_and_lists_every_step(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "effnb-gpu-check-dummy")
    _wheel(wheels, "torch", "99.0")  # never to be installed: the GPU machine's own CUDA torch stays
    out = tmp_path / "out"
    proc = _run(["--dry-run", "--out", str(out), "--wheels", str(wheels)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = _result(out)
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == STEPS and doc["dry_run"] is True
    assert steps["install"]["status"] == "passed" and steps["probe"]["status"] == "passed"
    install = steps["install"]
    assert install["figures"]["wheels_installed"] == ["effnb_gpu_check_dummy-0.1-py3-none-any.whl"]
    assert any("refused torch-99.0" in n for n in install["figures"]["notes"])
    assert len(install["commands"]) == 2
    for cmd in install["commands"]:
        assert cmd[1:5] == ["-m", "pip", "install", "--no-deps"] and "--no-index" in cmd and "--target" in cmd
        assert not any(Path(a).name.startswith("torch") for a in cmd), cmd
    assert not Path(install["figures"]["target"]).exists()  # the temporary target is removed afterwards
    log = (out / "gpu_check.log").read_text()
    assert re.search(r"Successfully installed effnb-0\.1\.0", log), "effnb was not installed"
    assert re.search(r"Successfully installed effnb[-_]gpu[-_]check[-_]dummy-0\.1", log), "the wheel was not installed"
    for name, command in CUDA_STEPS.items():
        assert steps[name]["status"] == "skipped"
        assert steps[name]["reason"].startswith(("no CUDA", "dry run")), steps[name]
        assert f"{name:<13} skipped: {steps[name]['reason']}" in proc.stdout
        assert command in log, f"the dry run does not show what {name} would run"


def test_pip_lines_never_reach_an_index_and_never_install_torch(tmp_path):
    gc = _gpu_check()
    for dist, version in (("torch", "2.11.0"), ("triton", "3.6.0"), ("nvidia-cublas-cu12", "12.4"),
                          ("bitsandbytes", "0.48.0"), ("plotly", "6.0.0")):
        _wheel(tmp_path, dist, version)
    cmds, notes = gc.pip_commands("python3", str(tmp_path), None)
    assert cmds[0] == ["python3", "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                       "-e", str(ROOT)]
    assert [Path(a).name.split("-")[0] for a in cmds[1] if a.endswith(".whl")] == ["bitsandbytes", "plotly"]
    for cmd in cmds:
        assert "--no-deps" in cmd and "--no-index" in cmd
        assert not any("index-url" in a or "torch" in Path(a).name or "nvidia" in a for a in cmd)
    assert len(notes) == 3 and all(n.startswith("refused") for n in notes)
    with pytest.raises(ValueError, match="no such folder"):
        gc.pip_commands("python3", str(tmp_path / "missing"), None)


def test_no_budget_skips_every_step_and_still_writes_the_results(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--dry-run", "--budget", "0", "--out", str(out)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["name"]: s for s in _result(out)["steps"]}
    assert list(steps) == STEPS
    for name in ("install", "probe"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("budget:"), steps[name]
        assert steps[name]["commands"] == []  # nothing ran
    assert all(s["status"] == "skipped" for s in steps.values())


def test_a_step_past_its_time_is_stopped_and_the_results_so_far_are_kept(tmp_path):
    out = tmp_path / "out"
    budget = 14  # leaves the tiny CPU smoke 2 s: far too little for it anywhere
    proc = _run(["--only", "smoke", "--cpu-smoke", "--budget", str(budget), "--out", str(out)], timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = _result(out)
    (smoke,) = doc["steps"]
    assert smoke["status"] == "timed out" and smoke["timeout_s"] <= 2.5, smoke
    assert doc["elapsed_s"] < budget, doc["elapsed_s"]
    assert "benchmarks/gpu_smoke.py --device cpu" in (out / "gpu_check.log").read_text()
    partial = out / "gpu_smoke.json"
    if partial.exists():  # written before the first step when the imports were fast enough
        assert json.loads(partial.read_text())["schema"] == "effnb.gpu_smoke"


def test_judges_turn_benchmark_output_into_pass_and_fail_lines():
    gc = _gpu_check()
    text = ("PASS  effnb nf4 b64 4096x11008 M=1 vs fp16: 2.61x (need >= 2.5x)\n"
            "FAIL  effnb int4 g64 8192x8192 M=16 vs fp16: 1.20x (need >= 1.5x)\n")
    figures, targets = gc.judge_kernels(text, {"rows": [{"check": "err 1e-3", "variant": "x"}]}, {"packages": {}})
    assert [(t["result"], t["detail"]) for t in targets] == [("PASS", "2.61x (need >= 2.5x)"),
                                                            ("FAIL", "1.20x (need >= 1.5x)")]
    assert "problem" not in figures and "bitsandbytes" in figures["note"]
    figures, _ = gc.judge_kernels("", {"rows": [{"check": "err 3e-1 WRONG", "variant": "v", "shape": "s", "m": 1}]},
                                  {"packages": {"bitsandbytes": "0.48"}})
    assert "differ from the reference" in figures["problem"]
    rows = [{"variant": "fp16", "vs_fp16": 1.0}, {"variant": "effnb-nf4", "vs_fp16": 2.3},
            {"variant": "effnb-int4", "vs_fp16": 1.9}]
    _, targets = gc.judge_decode("", {"rows": rows}, {})
    assert [t["result"] for t in targets] == ["PASS", "FAIL"]
    results = [{"tokens": t, "variant": v, "median_ms": ms} for t, v, ms in
               ((1, "effnb", 1.0), (1, "transformers", 2.0), (1, "loop", 0.9), (1, "grouped_mm", 1.0))]
    _, targets = gc.judge_moe("", {"results": results}, {})
    assert {t["check"].split()[-4]: t["result"] for t in targets} == {
        "transformers": "PASS", "loop": "FAIL", "grouped_mm": "PASS"}
    counts, _ = gc.judge_tests("FAILED tests/kernels/test_gpu.py::test_x - boom\n1 failed, 209 passed in 90s\n",
                               None, {})
    assert counts["failed"] == 1 and counts["passed"] == 209 and counts["failed_tests"] == [
        "tests/kernels/test_gpu.py::test_x"] and counts["problem"].startswith("1 failed, e.g. tests/kernels")


def test_a_benchmark_step_keeps_its_targets_fails_on_a_wrong_kernel_and_keeps_partial_results(tmp_path, monkeypatch):
    gc = _gpu_check()
    out = tmp_path / "bench.json"
    wrong = ("import json, sys, time; print('PASS  effnb nf4 b64 4096x11008 M=1 vs fp16: 2.61x (need >= 2.5x)'); "
             "json.dump({'rows': [{'check': 'err 2e-1 WRONG', 'variant': 'v', 'shape': 's', 'm': 1}]}, "
             "open(sys.argv[1], 'w')); time.sleep(float(sys.argv[2]))")
    monkeypatch.setitem(gc.STEPS, "kernel-bench", ("a stand-in benchmark", True, 4, 1))
    for sleep, status in ((0, "failed"), (60, "timed out")):
        c = gc.Check(gc.parse(["--out", str(tmp_path / f"out{sleep}"), "--only", "kernel-bench", "--budget", "60"]))
        c.probe = {"cuda": True, "packages": {}}  # as on a CUDA machine without bitsandbytes
        monkeypatch.setattr(gc, "step_command", lambda c, name, s=sleep: (
            [sys.executable, "-c", wrong, str(out), str(s)], str(out)))
        gc.run_step(c, c.args.steps.index("kernel-bench"))
        c.close()
        rec = c.doc["steps"][-1]
        assert rec["status"] == status, rec
        assert c.doc["targets"] == [{"step": "kernel-bench", "check": "effnb nf4 b64 4096x11008 M=1 vs fp16",
                                     "result": "PASS", "detail": "2.61x (need >= 2.5x)"}]
        assert "differ from the reference" in rec["figures"]["problem"]
        assert rec["reason"].startswith("1 kernel results differ" if sleep == 0 else "ran out of its 4 s (partial")


def test_gpu_check_target_needs_no_setup():
    """The GPU machine has no network and its own torch: the target must not pull in `setup`."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    rule = next(ln for ln in lines if ln.startswith("gpu-check:"))
    assert rule.split(":", 1)[1].strip() == "", rule
    assert "gpu-check" in next(ln for ln in lines if ln.startswith(".PHONY"))


def test_the_cpu_smoke_runs_every_technique_without_the_optional_packages(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SMOKE), "--device", "cpu", "--tiny", "--json", str(out),
                           "--block-imports", "plotly,ipywidgets,papermill,gguf,bitsandbytes"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "effnb.gpu_smoke" and doc["device"] == "cpu" and doc["dtype"] == "float32"
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["build", "audit", "quantize-nf4", "qlora", "merge", "save-load", "moe-split",
                           "moe-upcycle", *(f"quantize-{m}" for m in ("int8", "int4", "fp4", "hqq", "gptq", "fp8",
                                                                       "llm.int8"))]
    skipped = {n: s["reason"] for n, s in steps.items() if s["status"] != "passed"}
    assert skipped == {"quantize-llm.int8": "bitsandbytes is not installed (carry its wheel: docs/gpu.md)"}, skipped
    for s in steps.values():
        assert s["seconds"] >= 0 and s["peak_cuda_bytes"] is None and s["energy_method"] or s["status"] == "skipped"
    assert steps["qlora"]["figures"]["technique"] == "QLoRA" and steps["qlora"]["figures"]["steps"] == 10
    assert steps["merge"]["figures"]["quantized_base"] is True
    assert steps["moe-upcycle"]["figures"]["logits_rel_error_vs_dense"] < 1e-4  # upcycling starts as the dense model
    assert steps["save-load"]["figures"]["logits_rel_error"] <= 1e-2
    for method in ("int8", "nf4", "gptq", "fp8"):
        assert 0 < steps[f"quantize-{method}"]["figures"]["logits_rel_error_vs_base"] < 1
