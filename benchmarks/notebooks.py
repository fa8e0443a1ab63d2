"""Run the tutorial notebooks headless and measure each one: wall time and peak memory of its kernel.

    python benchmarks/notebooks.py                      # every notebooks/NN_*.ipynb, default parameters
    python benchmarks/notebooks.py --ci                 # with each notebook's metadata.effnb.ci_parameters
    python benchmarks/notebooks.py 00 06 --json out.json --timeout 900 --keep runs/

Each notebook runs in its own ``papermill`` process (a fresh kernel, in a temporary directory). A poller
samples, every ``--poll`` seconds, the memory of the kernel's process tree (the kernel and anything it
starts) and keeps the peak: the kernel's resident set (RSS) plus the private memory (USS,
/proc/PID/smaps_rollup) of anything it starts, so a forked child's pages, shared with the kernel, count
once, as the session's memory limit counts them; and, as an upper bound, the summed RSS of the tree (a
forked child briefly doubles it). The check
is against 2 GB = 2,000 MB (Binder's limit per session is 2 GiB = 2,147 MB, so this is the stricter).

``run_notebook`` is also what ``tests/test_notebooks.py`` uses: a notebook-wide time limit (the process
group is killed, kernel included, so nothing hangs), a dead kernel reported as such, and the failing
cell named by its index in the committed notebook, its first source line and the error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
BINDER_LIMIT_BYTES = 2_000_000_000  # "under 2 GB"; mybinder.org's limit is 2 GiB, so this is the stricter
_SKIP_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def notebooks(selectors: list[str] | None = None) -> list[Path]:
    """The course's notebooks (``notebooks/NN_*.ipynb``), optionally only those whose name starts with a selector."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selectors:
        found = [p for p in found if any(p.name.startswith(s) for s in selectors)]
    return found


def ci_parameters(path: Path) -> dict:
    """CI-sized parameters from the notebook's metadata (``metadata.effnb.ci_parameters``)."""
    return json.loads(Path(path).read_text())["metadata"].get("effnb", {}).get("ci_parameters", {})


@dataclass
class RunResult:
    notebook: str
    ok: bool
    wall_s: float
    peak_rss_bytes: int | None
    returncode: int | None
    message: str = ""
    parameters: dict = field(default_factory=dict)
    peak_kernel_bytes: int | None = None  # kernel RSS + private memory of its children (see _tree_mem)
    peak_cell: str = ""  # the code cell running when the peak was sampled

    @property
    def peak_mb(self) -> float | None:
        """The peak the 2 GB check uses: kernel RSS + children's private memory where readable, else summed RSS."""
        b = self.peak_kernel_bytes if self.peak_kernel_bytes is not None else self.peak_rss_bytes
        return None if b is None else b / 1e6


def _private_bytes(pid: int) -> int | None:
    """Memory only this process maps (USS: Private_Clean + Private_Dirty in /proc/PID/smaps_rollup)."""
    total, seen = 0, 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
                    seen += 1
    except OSError:
        return None
    return total if seen == 2 else None


CHILDREN_SEEN: dict = {}  # (pid, name) -> largest RSS seen: what the kernel started (printed with --verbose)


def _tree_mem(proc) -> tuple[int, int | None]:
    """(summed RSS of the kernel tree, memory with each page once or None).

    The second figure is the RSS of the kernel (papermill's child) plus only the private memory (USS)
    of anything the kernel starts: a forked child shares its parent's pages, which the kernel's RSS
    already counts. Pages the kernel shares with processes outside its tree (another notebook's
    torch libraries) stay counted in full, so running notebooks side by side cannot lower it.
    """
    import psutil

    rss, once = 0, 0
    try:
        kernels = proc.children()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, None
    for kernel in kernels:
        try:
            k_rss = kernel.memory_info().rss
            rss += k_rss
            if once is not None:
                once += k_rss
            descendants = kernel.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for child in descendants:
            try:
                c_rss = child.memory_info().rss
                rss += c_rss
                key = (child.pid, child.name())
                CHILDREN_SEEN[key] = max(CHILDREN_SEEN.get(key, 0), c_rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            private = _private_bytes(child.pid)
            once = None if once is None or private is None else once + private
    return rss, once


def _cell_label(cell: dict, index: int) -> str:
    first = next((ln for ln in "".join(cell.get("source", "")).splitlines() if ln.strip()), "")
    return f"cell {index} ({first[:70]!r})"


def _diagnose(out_path: Path, stderr: str) -> str:
    """Which cell failed (index in the committed notebook) and with what error, from papermill's output."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    died = "DeadKernelError" in stderr or "Kernel died" in stderr or "kernel died" in stderr.lower()
    tail = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    try:
        nb = json.loads(out_path.read_text())
    except (OSError, ValueError):
        nb = None
    if nb is not None:
        index, unfinished = -1, None
        for cell in nb["cells"]:
            if _SKIP_TAGS & set(cell.get("metadata", {}).get("tags", [])):
                continue
            index += 1
            pm = cell.get("metadata", {}).get("papermill", {})
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                e = errors[0]
                return f"{_cell_label(cell, index)} raised {e.get('ename')}: {e.get('evalue')}"
            if cell["cell_type"] != "code" or unfinished is not None:
                continue
            # a cell that never got its reply: papermill marks it "completed" when the kernel died in it
            no_reply = pm.get("start_time") and "shell.execute_reply" not in cell.get("metadata", {}).get("execution", {})
            if pm.get("exception") or no_reply or pm.get("status") in ("running", "failed", "pending"):
                unfinished = _cell_label(cell, index)  # the first code cell that did not complete
        if unfinished is not None:
            what = "the kernel died" if died else (tail or "did not complete")
            return f"{unfinished}: {what}"
    if died:
        return f"the kernel died ({tail})"
    return tail or "papermill failed without a message"


def run_notebook(path: Path, parameters: dict | None = None, *, timeout_s: float = 600, cwd: Path | None = None,
                 out_path: Path | None = None, poll_s: float = 0.25, env: dict | None = None) -> RunResult:
    """Execute ``path`` with papermill in a child process; measure wall time and peak kernel RSS.

    The whole run is limited to ``timeout_s`` seconds (the process group, kernel included, is killed past
    it); each cell is also limited to ``timeout_s`` by papermill itself.
    """
    import psutil

    path = Path(path)
    parameters = dict(parameters or {})
    tmp = None
    if cwd is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"effnb-{path.stem}-")
        cwd = Path(tmp.name)
    out_path = Path(out_path) if out_path else Path(cwd) / f"{path.stem}.out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(path), str(out_path), "--cwd", str(cwd), "-k", "python3",
           "--execution-timeout", str(int(timeout_s)), "--no-progress-bar", "--log-level", "ERROR",
           "-y", json.dumps(parameters)]
    run_env = dict(os.environ) | {"TOKENIZERS_PARALLELISM": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    run_env.update(env or {})
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env,
                        start_new_session=True)
    peak, peak_once = 0, 0
    timed_out = False
    err_chunks: list[str] = []
    import threading

    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    out_drain = threading.Thread(target=lambda: proc.stdout.read(), daemon=True)
    out_drain.start()
    peak_at = None
    while proc.poll() is None:
        rss, once = _tree_mem(proc)
        peak = max(peak, rss)
        if once is not None and peak_once is not None and once > peak_once:
            peak_at = time.time()
        peak_once = None if once is None or peak_once is None else max(peak_once, once)
        if time.perf_counter() - t0 > timeout_s:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # papermill and its kernel: nothing is left hanging
            except ProcessLookupError:
                pass
            proc.wait()
            break
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    drain.join(timeout=5)
    stderr = "".join(err_chunks)
    ok = proc.returncode == 0 and not timed_out
    message = ""
    if timed_out:
        message = f"timed out after {timeout_s:.0f} s; " + _diagnose(out_path, "")
    elif not ok:
        message = _diagnose(out_path, stderr)
    peak_cell = _cell_at(out_path, peak_at) if peak_at is not None else ""
    if tmp is not None:
        tmp.cleanup()
    return RunResult(path.name, ok, wall, peak or None, proc.returncode, message, parameters, peak_once or None,
                     peak_cell)


def _cell_at(out_path: Path, when: float) -> str:
    """The code cell of the executed notebook that was running at ``when`` (from papermill's timestamps)."""
    from datetime import datetime

    try:
        nb = json.loads(Path(out_path).read_text())
    except (OSError, ValueError):
        return ""
    for index, cell in enumerate(nb.get("cells", [])):
        pm = cell.get("metadata", {}).get("papermill", {})
        start, end = pm.get("start_time"), pm.get("end_time")
        if cell.get("cell_type") != "code" or not start:
            continue
        t0 = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
        t1 = datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() if end else float("inf")
        if t0 <= when <= t1:
            return _cell_label(cell, index)
    return ""


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("select", nargs="*", help="notebook name prefixes (e.g. 00 06); default: all")
    ap.add_argument("--ci", action="store_true", help="use each notebook's metadata.effnb.ci_parameters")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per notebook (default 1200)")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between memory samples")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--verbose", action="store_true", help="also list the processes each kernel started")
    ap.add_argument("--keep", help="keep each executed notebook and its files in KEEP/<notebook name>/")
    args = ap.parse_args(argv)
    paths = notebooks(args.select)
    if not paths:
        print(f"no notebooks match {args.select} in {NOTEBOOK_DIR}", file=sys.stderr)
        return 2
    import torch  # only for the environment line

    print(f"# {len(paths)} notebook(s), {'CI' if args.ci else 'default'} parameters; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {_load_average()} (1/5/15 min); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'notebook':28} {'ok':3} {'wall s':>8} {'peak MB':>12} {'(RSS sum)':>10} {'< 2 GB':>7}  load after  message")
    results = []
    for p in paths:
        cwd = None
        if args.keep:
            cwd = Path(args.keep) / p.stem
            cwd.mkdir(parents=True, exist_ok=True)
        res = run_notebook(p, ci_parameters(p) if args.ci else {}, timeout_s=args.timeout, poll_s=args.poll, cwd=cwd)
        results.append(res)
        if args.verbose and CHILDREN_SEEN:
            print("  processes the kernel started (largest RSS seen): " + ", ".join(
                f"{name} {b / 1e6:,.0f} MB" for (_, name), b in sorted(CHILDREN_SEEN.items())), flush=True)
        CHILDREN_SEEN.clear()
        under = "-" if res.peak_mb is None else ("yes" if res.peak_mb * 1e6 < BINDER_LIMIT_BYTES else "NO")
        peak = "-" if res.peak_mb is None else f"{res.peak_mb:,.0f}"
        rss = "-" if res.peak_rss_bytes is None else f"{res.peak_rss_bytes / 1e6:,.0f}"
        print(f"{p.name:28} {'ok' if res.ok else 'NO':3} {res.wall_s:8.1f} {peak:>12} {rss:>10} {under:>7}  "
              f"{_load_average():11} {res.message}", flush=True)
        if res.peak_cell:
            print(f"  peak during {res.peak_cell}", flush=True)
    total = sum(r.wall_s for r in results)
    print(f"# total wall time {total:.1f} s ({total / 60:.1f} min); failures: {sum(not r.ok for r in results)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "parameters": "ci" if args.ci else "default", "load_average_end": os.getloadavg(),
            "method": "papermill per notebook, fresh kernel; peak_kernel_bytes = max over samples of the kernel's "
                      "RSS plus the private memory (USS) of its children (every page once), peak_rss_bytes = the "
                      f"same for the summed RSS (upper bound); sampled every {args.poll} s; threads: OMP_NUM_THREADS="
                      f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
