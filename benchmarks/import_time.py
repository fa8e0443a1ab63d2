"""How long `import effnb` and `%load_ext effnb` take (median of fresh interpreters), and what they load.

    python benchmarks/import_time.py [--json benchmarks/results/import_time.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = {
    "python -c pass (interpreter start, the baseline)": "pass",
    "import effnb": "import effnb",
    "%load_ext effnb (IPython shell included)": (
        "from IPython.core.interactiveshell import InteractiveShell; s = InteractiveShell.instance(); "
        "import time; t = time.perf_counter(); s.run_line_magic('load_ext', 'effnb'); "
        "import sys; print(time.perf_counter() - t, file=sys.stderr)"
    ),
}


def run(code: str, repeats: int = 7) -> tuple[float, float | None]:
    """Median wall time of a fresh interpreter running ``code``, and of the timing it prints itself."""
    times, inner = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        if out.stderr.strip():
            inner.append(float(out.stderr.strip().splitlines()[-1]))
    return statistics.median(times), (statistics.median(inner) if inner else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the results here (benchmarks/render.py's schema)")
    args = ap.parse_args(argv)
    from _results import envelope, finish

    record = envelope("import_load", "Import time", "import_time",
                      method="wall: whole fresh interpreter, start-up included, median of 7; in-process: the "
                             "magic alone.")
    rows = []
    heavy = subprocess.run([sys.executable, "-c", "import sys, effnb, effnb.magics; effnb.commands.commands(); "
                            "print([m for m in ('torch','transformers','peft','plotly','ipywidgets') if m in sys.modules])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"{'case':55s} {'wall (s)':>12s} {'load_ext (s)':>13s}")
    for label, code in CASES.items():
        total, inner = run(code)
        print(f"{label:55s} {total:12.3f} {'' if inner is None else f'{inner:13.3f}'}")
        rows.append({"case": label, "wall_s": total, "inner_s": inner})
    print(f"heavy libraries loaded by import effnb + effnb.magics: {heavy}")
    print("wall: whole fresh interpreter, start-up included, median of 7; load_ext: the magic alone, in-process")
    if args.json:
        names = [] if heavy in ("", "[]") else [n.strip(" '") for n in heavy.strip("[]").split(",")]
        Path(args.json).write_text(json.dumps(finish({**record, "rows": rows, "heavy": names}), indent=1) + "\n")


if __name__ == "__main__":
    main()
