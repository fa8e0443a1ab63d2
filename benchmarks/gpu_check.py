"""``make gpu-check``: effnb on an offline CUDA machine in one command, inside a hard time budget.

    python3 benchmarks/gpu_check.py [--out DIR] [--wheels DIR] [--budget 480] [--dry-run] [--only a,b]

Steps (STEPS below), each a subprocess whose timeout comes from what is left of the budget: install
(``pip install --no-deps --no-index --no-build-isolation -e .``, then the wheels of --wheels the same way;
torch, triton and nvidia wheels are refused), probe, kernel-tests (tests/kernels/test_gpu.py), smoke
(gpu_smoke.py: every technique on a ~1.1B model), kernel-bench (gpu_kernels.py --short), decode
(gpu_decode.py --short) and moe (moe.py on Mixtral shapes), with PASS/FAIL lines for issue 4's and 6's targets.
``--dry-run`` installs into a temporary folder and skips every CUDA step with its reason; ``--cpu-smoke``
runs the smoke step on the CPU at a tiny size. Results in --out: ``gpu_check.json`` (rewritten after each
step), ``gpu_check.log`` and each benchmark's JSON. Exit status 0 when no step failed or timed out.
Standard library only: it runs before effnb is installed. docs/gpu.md says how to use it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
RESERVE_S = 5  # kept back for writing the results
GRACE_S = 5  # between SIGTERM and SIGKILL of a step that ran out of time
PROTECTED = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton")  # and nvidia-*: never installed
# name: (what it is, needs CUDA, most seconds, fewest seconds worth starting it)
STEPS = {
    "install": ("install effnb from this tree (no deps, no index) and the carried wheels", False, 60, 5),
    "probe": ("torch, CUDA and optional packages of this Python", False, 30, 5),
    "kernel-tests": ("tests/kernels/test_gpu.py: kernels at real sizes vs their references", True, 140, 30),
    "smoke": ("every technique end to end on a ~1.1B Llama-shaped model (bf16)", True, 140, 40),
    "kernel-bench": ("benchmarks/gpu_kernels.py --short: issue 4's kernel targets", True, 70, 30),
    "decode": ("benchmarks/gpu_decode.py --short: 7B-shaped decode vs fp16", True, 150, 60),
    "moe": ("benchmarks/moe.py --shape mixtral: MoE block vs its peers", True, 60, 25),
}


class Check:
    """The run's state: budget, results, log and JSON."""

    def __init__(self, args):
        self.args, self.t0, self.out, self.probe = args, time.monotonic(), Path(args.out).resolve(), {}
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "w", buffering=1)  # noqa: SIM115 - open for the whole run
        self.target = tempfile.mkdtemp(prefix="gpu-check-site-") if args.dry_run else None
        self.env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        self.doc = {"schema": "effnb.gpu_check", "version": 1, "dry_run": args.dry_run, "budget_s": args.budget,
                    "python": args.python, "out": str(self.out), "command": " ".join(sys.argv),
                    "started": _now(), "finished": None, "elapsed_s": None, "probe": None, "targets": [],
                    "steps": [{"name": n, "title": STEPS[n][0], "status": "pending", "reason": None, "seconds": None,
                               "timeout_s": None, "commands": [], "figures": {}} for n in args.steps]}
        self.write()

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")

    def run(self, argv: list[str], timeout: float, rec: dict) -> tuple[int | None, str]:
        """Run one command (own process group), its output to the console and the log; None rc: timed out."""
        rec["commands"].append(argv)
        self.say("$ " + " ".join(argv))
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=self._pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            _stop(proc, 0)  # what the step left running in its group
        except subprocess.TimeoutExpired:
            rc = _stop(proc)
        except KeyboardInterrupt:  # gpu-check itself is stopped: stop the step with it
            _stop(proc)
            raise
        reader.join(1)  # the pipe closes with the group
        return rc, "".join(lines)

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            sys.stdout.write(line)
            self.log.write(line)

    def close(self) -> None:
        if self.target:
            shutil.rmtree(self.target, ignore_errors=True)
        self.log.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _stop(proc, wait: float = GRACE_S) -> None:
    """SIGTERM the step's process group, then SIGKILL whatever is left of it; returns None (no exit status)."""
    for sig, seconds in ((signal.SIGTERM, wait), (signal.SIGKILL, min(wait, 1))):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return None
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------------------------ the steps


def pip_commands(python: str, wheels_dir: str | None, target: str | None) -> tuple[list[list[str]], list[str]]:
    """The pip command lines: effnb editable from the tree, then the carried wheels; and the notes."""
    base = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation"]
    if target:
        base += ["--target", target]
    cmds, notes = [[*base, "-e", str(ROOT)]], []
    if wheels_dir:
        folder = Path(wheels_dir)
        if not folder.is_dir():
            raise ValueError(f"GPU_WHEELS={wheels_dir}: no such folder")
        found = sorted(folder.glob("*.whl"))
        keep = [w for w in found if not _protected(w.name)]
        notes += [f"refused {w.name}: the machine's own torch/triton/CUDA stay as they are" for w in found
                  if w not in keep]
        if keep:
            cmds.append([*base, *map(str, keep)])
        else:
            notes.append(f"no installable wheel in {wheels_dir}")
    return cmds, notes


def _protected(wheel: str) -> bool:
    dist = wheel.split("-")[0].lower().replace("_", "-")
    return dist in PROTECTED or dist.startswith("nvidia-")


def step_install(c: Check, rec: dict, timeout: float) -> None:
    cmds, notes = pip_commands(c.args.python, c.args.wheels, c.target)
    rec["figures"].update({"target": c.target or "this Python's environment", "notes": notes})
    for note in notes:
        c.say("# " + note)
    deadline = time.monotonic() + timeout
    for cmd in cmds:
        rc, _ = c.run(cmd, deadline - time.monotonic(), rec)
        if rc is None:
            raise TimeoutError("pip ran out of its time")
        if rc != 0:
            raise RuntimeError(f"pip exited with status {rc} (see gpu_check.log)")
    rec["figures"]["wheels_installed"] = [Path(a).name for cmd in cmds[1:] for a in cmd if a.endswith(".whl")]


def use_tree_if_not_installed(c: Check) -> None:
    """Later steps import effnb from the tree (or the dry run's target) when it was not installed here."""
    install = next((r for r in c.doc["steps"] if r["name"] == "install"), None)
    extra = [c.target] if c.target else ([] if install and install["status"] == "passed" else [str(ROOT)])
    c.env["PYTHONPATH"] = os.pathsep.join([*extra, *filter(None, [os.environ.get("PYTHONPATH")])])


def step_probe(c: Check, rec: dict, timeout: float) -> None:
    rc, text = c.run([c.args.python, "benchmarks/gpu_smoke.py", "--probe"], timeout, rec)
    line = next((ln for ln in text.splitlines() if ln.startswith("PROBE ")), None)
    if rc is None:
        raise TimeoutError("the probe ran out of its time")
    if rc != 0 or line is None:
        raise RuntimeError(f"the probe failed (status {rc}; see gpu_check.log)")
    c.probe = json.loads(line[len("PROBE "):])
    c.doc["probe"] = c.probe
    rec["figures"].update({k: c.probe.get(k) for k in ("torch", "cuda", "gpu", "capability")})


def step_command(c: Check, name: str) -> tuple[list[str], str | None]:
    """(command line, JSON file it writes) of a test or benchmark step."""
    cpu, has = c.args.cpu_smoke, lambda package: _pkg(c.probe, package)
    args = {"kernel-tests": ["-m", "pytest", "-q", "-p", "no:cacheprovider",  # ~180 Triton variants to compile
                             *(["-n", "8"] if has("xdist") else []), "tests/kernels/test_gpu.py"],
            "smoke": ["benchmarks/gpu_smoke.py", "--device", "cpu" if cpu else "cuda", *(["--tiny"] if cpu else [])],
            "kernel-bench": ["benchmarks/gpu_kernels.py", "--short"],
            "decode": ["benchmarks/gpu_decode.py", "--short", "--variants",
                       "fp16,effnb-nf4,effnb-int4" + (",bnb-nf4" if has("bitsandbytes") else "")],
            "moe": ["benchmarks/moe.py", "--shape", "mixtral", "--device", "cuda", "--dtype", "bfloat16",
                    "--tokens", "1,16,128,512,4096", "--rounds", "5"]}[name]
    files = {"smoke": "gpu_smoke.json", "kernel-bench": "gpu_kernels.json", "decode": "gpu_decode.json",
             "moe": "moe_cuda.json"}
    path = str(c.out / files[name]) if name in files else None
    return [c.args.python, *args, *(["--json", path] if path else [])], path


def step_benchmark(c: Check, name: str, rec: dict, timeout: float) -> None:
    cmd, json_file = step_command(c, name)
    if json_file:  # a stale file from an earlier run must not pass for this run's results
        Path(json_file).unlink(missing_ok=True)
    rc, text = c.run(cmd, timeout, rec)
    try:
        data = json.loads(Path(json_file).read_text()) if json_file else None
    except (OSError, ValueError):  # not written (yet), or cut off mid-write by the timeout
        data = None
    figures, judged = JUDGES[name](text, data, c.probe)
    rec["figures"].update(figures)
    for t in judged:
        c.doc["targets"].append({"step": name, **t})
    if rc is None:
        raise TimeoutError(f"ran out of its {timeout:.0f} s" + (" (partial results kept)" if data else ""))
    if rc != 0 or figures.get("problem"):
        raise RuntimeError(figures.get("problem") or f"exited with status {rc} (see gpu_check.log)")


def judge_tests(text: str, data, probe) -> tuple[dict, list]:
    counts = {}
    tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", tail[-1] if tail else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    failed = [ln.split(" - ")[0].split(" ", 1)[1] for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    problem = f"{len(failed)} failed, e.g. {failed[0]}" if failed else None
    return {**counts, "failed_tests": failed[:30], "problem": problem}, []


def judge_smoke(text: str, data, probe) -> tuple[dict, list]:
    if not data:
        return {}, []
    keys = ("name", "status", "reason", "seconds", "peak_cuda_bytes", "energy_j")
    failed = [st["name"] for st in data.get("steps", []) if st.get("status") == "failed"]
    return {"config": data.get("config"), "dtype": data.get("dtype"), "parameters": data.get("parameters"),
            "steps": [{k: st.get(k) for k in keys} for st in data.get("steps", [])],
            "problem": f"smoke steps failed: {', '.join(failed)}" if failed else None}, []


def judge_kernels(text: str, data, probe) -> tuple[dict, list]:
    pat = re.compile(r"^(PASS|FAIL)\s+(.+): ([\d.]+x) \((need >= [\d.]+x)\)$")
    targets = [{"check": m[2], "result": m[1], "detail": f"{m[3]} ({m[4]})"}
               for m in (pat.match(ln.strip()) for ln in text.splitlines()) if m]
    figures = {"copy_bandwidth_GBps": ((data or {}).get("environment") or {}).get("copy_bandwidth_GBps")}
    wrong = [r for r in (data or {}).get("rows", []) if "WRONG" in str(r.get("check"))]
    if wrong:
        figures["problem"] = (f"{len(wrong)} kernel results differ from the reference, e.g. {wrong[0]['variant']} "
                            f"{wrong[0]['shape']} M={wrong[0]['m']}: {wrong[0]['check']}")
    if not _pkg(probe, "bitsandbytes"):
        figures["note"] = "bitsandbytes is not installed (or does not import): the 'vs bitsandbytes NF4' " \
                          "targets were not judged"
    return figures, targets


def judge_decode(text: str, data, probe) -> tuple[dict, list]:
    rows = {r["variant"]: r for r in (data or {}).get("rows", [])}
    figures = {v: {k: r.get(k) for k in ("tokens_per_s", "ms_per_token", "vs_fp16", "mode")} for v, r in rows.items()}
    targets = [{"check": f"7B-shaped decode, {v} vs fp16", "result": "PASS" if r["vs_fp16"] >= 2.0 else "FAIL",
                "detail": f"{r['vs_fp16']:.2f}x (need >= 2.0x)"}
               for v, r in rows.items() if v.startswith("effnb") and r.get("vs_fp16")]
    return figures, targets


def judge_moe(text: str, data, probe) -> tuple[dict, list]:
    ms: dict = {}
    for r in (data or {}).get("results", []):
        ms.setdefault(r["tokens"], {})[r["variant"]] = r["median_ms"]
    targets = []
    for peer, need in (("transformers", "faster than"), ("loop", "faster than"), ("grouped_mm", "no slower than")):
        pairs = [(t, v["effnb"] / v[peer]) for t, v in sorted(ms.items()) if "effnb" in v and peer in v]
        ok = all(x < 1 if need == "faster than" else x <= 1 for _, x in pairs)
        targets += [{"check": f"Mixtral MoE block: effnb {need} {peer} at every size", "result": "PASS" if ok else
                     "FAIL", "detail": ", ".join(f"T={t}: {x:.2f}x its time" for t, x in pairs)}] if pairs else []
    return {"median_ms": {str(t): v for t, v in ms.items()}, "note": "issue 6's bandwidth (>= 70% of copy) and "
            "matmul-rate (>= 60%) targets are not judged here"}, targets


def _pkg(probe: dict, name: str) -> bool:
    return bool((probe.get("packages") or {}).get(name))


JUDGES = {"kernel-tests": judge_tests, "smoke": judge_smoke, "kernel-bench": judge_kernels,
          "decode": judge_decode, "moe": judge_moe}


# ------------------------------------------------------------------------------------ the driver


def needs_cuda(args, name: str) -> bool:
    """Whether step ``name`` needs CUDA (the smoke with --cpu-smoke does not)."""
    return STEPS[name][1] and not (name == "smoke" and args.cpu_smoke)


def skip_reason(c: Check, name: str) -> str | None:
    if not needs_cuda(c.args, name):
        return None
    if not c.probe:  # the probe did not run: a dry run stops here, a real one tries
        return "dry run" if c.args.dry_run else None
    if not c.probe.get("cuda"):
        why = c.probe.get("torch_error")
        return "no CUDA" + (f" (torch does not import: {why})" if why else "")
    if c.args.dry_run:
        return "dry run"
    if name == "kernel-tests" and not _pkg(c.probe, "triton"):
        return "triton is not installed"
    return None


def timeout_for(c: Check, i: int) -> tuple[float, str | None]:
    """Seconds step i may take: its cap, or what the budget leaves after the later steps' minimums."""
    name = c.args.steps[i]
    _, _, cap, floor = STEPS[name]
    floor = 1 if name == "smoke" and c.args.cpu_smoke else floor  # the tiny CPU smoke rehearses timeouts
    later = sum(STEPS[n][3] for n in c.args.steps[i + 1:] if skip_reason(c, n) is None)
    allowed = min(cap, c.remaining() - RESERVE_S - GRACE_S - 2 - later)  # 2: SIGKILL's and the reader's second
    if allowed < floor:
        return allowed, f"budget: {max(0.0, c.remaining()):.0f} s left, this step needs at least {floor} s"
    return allowed, None


def run_step(c: Check, i: int) -> None:
    name = c.args.steps[i]
    rec = c.doc["steps"][i]
    reason = skip_reason(c, name)
    timeout, budget_reason = timeout_for(c, i)
    if reason or budget_reason:
        rec.update(status="skipped", reason=reason or budget_reason)
        if name in JUDGES:
            c.say(f"# would run: {' '.join(step_command(c, name)[0])}")
    else:
        rec.update(status="running", timeout_s=round(timeout, 1))
        c.write()
        c.say(f"\n## {name} ({STEPS[name][0]}), at most {timeout:.0f} s")
        t0 = time.monotonic()
        try:
            if name != "install":
                use_tree_if_not_installed(c)
            if name in ("install", "probe"):
                (step_install if name == "install" else step_probe)(c, rec, timeout)
            else:
                step_benchmark(c, name, rec, timeout)
            rec["status"] = "passed"
        except TimeoutError as exc:
            rec.update(status="timed out", reason=str(exc))
        except (RuntimeError, ValueError, OSError) as exc:
            rec.update(status="failed", reason=str(exc))
        rec["seconds"] = round(time.monotonic() - t0, 2)
    c.say(f"{name:<13} {rec['status']}" + (f": {rec['reason']}" if rec["reason"] else "")
          + (f" ({rec['seconds']:.1f} s)" if rec["seconds"] is not None else ""))
    c.write()


def summary(c: Check) -> int:
    c.say("\n# gpu-check summary" + (" (dry run)" if c.args.dry_run else ""))
    p = c.probe
    c.say(f"# python {p['python']}, torch {p['torch']}, CUDA {p['cuda']}" + (f", {p['gpu']} (sm {p.get('capability')})"
          if p.get("gpu") else "") if p else "# the probe did not run")
    for rec in c.doc["steps"]:
        secs = f"{rec['seconds']:7.1f} s" if rec["seconds"] is not None else "        -"
        c.say(f"{rec['name']:<13} {secs}  {rec['status']}" + (f": {rec['reason']}" if rec["reason"] else ""))
    for t in c.doc["targets"]:
        c.say(f"{t['result']}  [{t['step']}] {t['check']}: {t['detail']}")
    c.doc["finished"] = _now()
    c.write()
    c.say(f"# results: {c.out / 'gpu_check.json'}, log: {c.out / 'gpu_check.log'}")
    c.close()
    return 1 if any(r["status"] in ("failed", "timed out") for r in c.doc["steps"]) else 0


def parse(argv):
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=env("GPU_CHECK_OUT") or str(ROOT / "reports" / "gpu-check"))
    ap.add_argument("--wheels", default=env("GPU_WHEELS") or None, help="folder of wheels to install (--no-index)")
    ap.add_argument("--budget", type=float, default=env("GPU_CHECK_BUDGET") or str(BUDGET_S), help="seconds")
    ap.add_argument("--dry-run", action="store_true", default=env("GPU_CHECK_DRY", "") not in ("", "0"))
    ap.add_argument("--cpu-smoke", action="store_true", help="run the smoke step on the CPU at a tiny size")
    ap.add_argument("--only", default=env("GPU_CHECK_ONLY") or "", help=f"comma-separated steps, of: {', '.join(STEPS)}")
    ap.add_argument("--python", default=sys.executable, help="the Python to install into and run with")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if [s for s in only if s not in STEPS] or args.budget < 0:
        ap.error(f"--only takes steps of: {', '.join(STEPS)}; --budget seconds >= 0 (got {args.only!r}, {args.budget})")
    args.steps = [s for s in STEPS if not only or s in only]
    if "probe" not in args.steps and any(needs_cuda(args, s) for s in args.steps):  # CUDA steps need it
        args.steps.insert(args.steps.index("install") + 1 if "install" in args.steps else 0, "probe")
    return args


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse(argv)
    c = Check(args)
    c.say(f"# gpu-check {'dry run ' if args.dry_run else ''}{_now()}: budget {args.budget:.0f} s, steps "
          + ", ".join(args.steps) + f"; results in {c.out}")
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        for i in range(len(args.steps)):
            run_step(c, i)
    except KeyboardInterrupt:
        for rec in c.doc["steps"]:
            if rec["status"] in ("pending", "running"):
                rec.update(status="skipped" if rec["status"] == "pending" else "timed out",
                           reason="gpu-check itself was stopped")
    return summary(c)


if __name__ == "__main__":
    sys.exit(main())
