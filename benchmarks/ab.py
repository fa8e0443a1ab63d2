"""A/B: one benchmark script against two source trees, interleaved round by round, in fresh processes.

    python benchmarks/ab.py --base /tmp/effnb-base --rounds 5 --metrics vs_fp32 -- benchmarks/cpu_decode.py --rounds 3
    python benchmarks/ab.py --base /tmp/effnb-base --rounds 1 --exact -- benchmarks/quantize_quality.py --models minilm

Round r runs the script once from tree A (``--base``, the previous code) and once from tree B (``--new``,
this checkout by default), alternating which goes first, so load from other processes hits both alike.
Each run is a fresh interpreter with ``PYTHONPATH=<tree>`` and the tree as working directory, running
that tree's own copy of the script (``--same-script`` runs B's copy in both) with ``--json <file>``
appended; the script's JSON ``rows`` are matched between the trees by their text fields (variant,
model, method ...) and every numeric field is compared: median per tree over the rounds, the ratio
B / A, and A's own spread over the rounds (min-max), so a B median inside A's spread is "within the
run-to-run spread of the previous code".

``--exact`` compares instead every numeric field not named like a time (``--volatile``) for equality
across all runs of both trees (quantize_quality.py's perplexities and agreements are deterministic).

effnb is installed editable from one checkout, and ``effnb.kernels`` is the top-level ``kernels/``
folder mapped by setuptools' editable finder, which would hand the *installed* checkout's kernels to
the other tree. For a tree that is not the installed one the harness makes ``<tree>/effnb/kernels`` a
symlink to ``../kernels`` (only if nothing is there), so the plain path finder resolves it first; each
tree is then checked with ``import effnb, effnb.kernels`` and the run stops if either module comes
from outside its tree.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
VOLATILE = "*_s,*seconds*,*spread*,*load*,*date*,*time*,*ms*,threads,stalls,switches,*calls*"


def prepare_tree(tree: Path, installed: Path) -> None:
    """Make ``effnb.kernels`` resolve inside ``tree`` (see the module docstring)."""
    if tree.resolve() == installed.resolve():
        return
    link = tree / "effnb" / "kernels"
    if not link.exists() and not link.is_symlink() and (tree / "kernels" / "__init__.py").exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def check_tree(tree: Path, python: str) -> dict:
    code = "import json, effnb, effnb.kernels; print(json.dumps([effnb.__file__, effnb.kernels.__file__]))"
    out = subprocess.run([python, "-c", code], cwd=tree, env=env_for(tree), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ab.py: {tree}: import effnb failed:\n{out.stderr[-2000:]}")
    files = json.loads(out.stdout.strip().splitlines()[-1])
    for f in files:
        if not Path(f).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"ab.py: {tree}: {f} is outside the tree (effnb.kernels mapped by the editable "
                             "install?); nothing was run")
    return {"effnb": files[0], "effnb.kernels": files[1]}


def run_once(tree: Path, script: Path, args: list[str], python: str, timeout: float) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="effnb-ab-") as tmp:
        out_json = Path(tmp) / "out.json"
        t = time.perf_counter()
        proc = subprocess.run([python, str(script), *args, "--json", str(out_json)], cwd=tree, env=env_for(tree),
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"ab.py: {script} in {tree} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return json.loads(out_json.read_text()), wall


def metrics(doc: dict) -> dict[tuple, dict[str, float]]:
    """{row identity (its text fields): {numeric field: value}} over the script's ``rows``."""
    out = {}
    for row in doc.get("rows", []):
        ident = tuple(sorted((k, v) for k, v in row.items() if isinstance(v, str)))
        nums = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in row.items():  # lists of numbers (e.g. quantize_time.py's "seconds"): their median
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                nums[k] = float(statistics.median(v))
        out[ident] = nums
    return out


def label(ident: tuple) -> str:
    return " / ".join(v for _, v in ident) or "(row)"


def compare(runs_a: list[dict], runs_b: list[dict], volatile: list[str], exact: bool,
            wanted: list[str] = ()) -> tuple[list[dict], bool]:
    ma, mb = [metrics(d) for d in runs_a], [metrics(d) for d in runs_b]
    idents = [i for i in ma[0] if all(i in m for m in ma + mb)]
    missing = sorted({label(i) for m in ma + mb for i in m} - {label(i) for i in idents})
    rows, ok = [], True
    for ident in idents:
        for key in ma[0][ident]:
            va = [m[ident].get(key) for m in ma]
            vb = [m[ident].get(key) for m in mb]
            if None in va or None in vb or (wanted and not any(fnmatch.fnmatch(key, p) for p in wanted)):
                continue
            is_volatile = any(fnmatch.fnmatch(key, p) for p in volatile)
            row = {"row": label(ident), "metric": key, "a": va, "b": vb, "a_median": statistics.median(va),
                   "b_median": statistics.median(vb)}
            if exact:
                if is_volatile:
                    continue
                row["identical"] = len(set(va + vb)) == 1
                ok &= row["identical"]
            else:
                row["ratio_b_over_a"] = row["b_median"] / row["a_median"] if row["a_median"] else None
                row["a_spread"] = [min(va), max(va)]
                row["b_within_a_spread"] = min(va) <= row["b_median"] <= max(va)
            rows.append(row)
    if missing:
        ok = False
        rows.append({"row": "rows not in every run of both trees", "metric": ", ".join(missing)})
    return rows, ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s --base TREE [options] -- SCRIPT [script args]")
    ap.add_argument("--base", required=True, help="tree A: the previous code (a plain copy of a commit)")
    ap.add_argument("--new", default=str(HERE), help="tree B (default: this checkout)")
    ap.add_argument("--installed", default=str(HERE), help="the checkout effnb is installed editable from")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--same-script", action="store_true", help="run tree B's copy of the script in both trees")
    ap.add_argument("--exact", action="store_true", help="non-volatile figures must be identical in every run")
    ap.add_argument("--volatile", default=VOLATILE, help="comma-separated field patterns that are timings")
    ap.add_argument("--metrics", default="", help="comma-separated field patterns to compare (default: all; for "
                    "cpu_decode.py the acceptance is vs_fp32)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--json", default=None, help="write every run's JSON and the comparison here")
    args = ap.parse_args(argv[:cut])
    if len(argv) <= cut + 1:
        ap.error("no script: put it after --")
    script, script_args = argv[cut + 1], argv[cut + 2:]
    trees = {"A": Path(args.base).resolve(), "B": Path(args.new).resolve()}
    found = {}
    for name, tree in trees.items():
        prepare_tree(tree, Path(args.installed))
        found[name] = check_tree(tree, args.python)
        print(f"{name}: {tree}  (effnb {found[name]['effnb']}, effnb.kernels {found[name]['effnb.kernels']})")
    scripts = {n: (trees["B"] if args.same_script else t) / script for n, t in trees.items()}
    for s in scripts.values():
        if not s.exists():
            raise SystemExit(f"ab.py: no {s}")
    runs = {"A": [], "B": []}
    walls = {"A": [], "B": []}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for name in order:
            doc, wall = run_once(trees[name], scripts[name], script_args, args.python, args.timeout)
            runs[name].append(doc)
            walls[name].append(wall)
            print(f"round {r + 1} {name}: {wall:.1f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows, ok = compare(runs["A"], runs["B"], [p for p in args.volatile.split(",") if p], args.exact,
                       [p for p in args.metrics.split(",") if p])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\n{script} {' '.join(script_args)}: A = {trees['A']}, B = {trees['B']}, {args.rounds} rounds, {when}")
    if args.exact:
        for row in rows:
            if "a" in row and not row["identical"]:
                print(f"DIFFERS {row['row']:40s} {row['metric']:16s} A {row['a']} B {row['b']}")
            elif "a" not in row:
                print(f"DIFFERS {row['row']}: {row['metric']}")
        print(("IDENTICAL" if ok else "NOT IDENTICAL") + f": {sum('a' in r for r in rows)} figures compared")
    else:
        print(f"{'row':40s} {'metric':16s} {'A median':>10s} {'B median':>10s} {'B/A':>6s}  A spread (min-max)")
        for row in rows:
            if "a" not in row:
                print(f"{row['row']}: {row['metric']}")
                continue
            ratio = "" if row["ratio_b_over_a"] is None else f"{row['ratio_b_over_a']:.3f}"
            mark = "" if row["b_within_a_spread"] else "  (B outside A's spread)"
            print(f"{row['row']:40s} {row['metric']:16s} {row['a_median']:10.4g} {row['b_median']:10.4g} {ratio:>6s}  "
                  f"{row['a_spread'][0]:.4g}-{row['a_spread'][1]:.4g}{mark}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": when, "script": script, "args": script_args, "rounds": args.rounds, "trees": found,
            "load_average_end": os.getloadavg(), "wall_s": walls, "comparison": rows, "identical": ok if args.exact
            else None, "runs": runs}, indent=1))
    return 0 if ok or not args.exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
