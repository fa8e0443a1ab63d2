"""Wall time of effnb.quantize on SmolLM2-135M per method (all Linear layers but lm_head, group 64).

    python benchmarks/quantize_time.py [--methods nf4,int4,int8,hqq,gptq] [--repeats 3] [--json out.json]

Each method is timed ``--repeats`` times (gptq once: it calibrates for tens of seconds) with
``measure=False`` (no before/after audit), after the model is loaded; the median is reported with the
load average, since the build machine's 2 cores are shared. Issue 3's targets: nf4 and int4 under 3 s,
hqq under 30 s, gptq under 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="nf4,int4,int8,hqq,gptq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from _results import envelope, finish

    import effnb

    model = effnb.load_model("smollm2-135m")
    out = {**envelope("quantize_time", "Quantization wall time, SmolLM2-135M", "quantize_time",
                      method=f"{torch.get_num_threads()} threads; all Linear layers but `lm_head`, group 64, "
                             f"`measure=False`; {args.repeats} calls per method (gptq 1)."),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "threads": torch.get_num_threads(), "rows": []}
    for method in args.methods.split(","):
        repeats = 1 if method == "gptq" else args.repeats
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = effnb.quantize(model, method=method, group_size=64, measure=False)
            times.append(time.perf_counter() - t)
            del res
        times.sort()
        print(f"{method}: median {times[len(times) // 2]:.2f} s over {repeats} "
              f"(all {', '.join(f'{t:.2f}' for t in times)}), load average {os.getloadavg()[0]:.1f}", flush=True)
        out["rows"].append({"method": method, "seconds": times})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finish(out), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
