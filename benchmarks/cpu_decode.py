"""CPU decode speed of SmolLM2-135M: fp32 vs effnb's quantized layers vs bitsandbytes and torch int8.

    python benchmarks/cpu_decode.py [--tokens 64] [--rounds 5] [--threads 2] [--only ...] [--json out.json]
    python benchmarks/cpu_decode.py --threading  # also int8/int4 with the kernels' threads forced to OpenMP / effnb's pool

Greedy decode of --tokens new tokens after a short prompt; all variants are timed in interleaved
rounds (round r times every variant once) so load from other processes hits them alike; the
median over rounds is reported, after one warm-up generation each. Ratios are against fp32 in
the same run. Each variant also gets the bytes one decode step reads (effnb.measure.bytes_per_token)
and the share of the bandwidth limit its speed reaches: tokens/s x bytes per token / the read
bandwidth measured once in this process with the same threads (effnb.measure.read_bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

EFFNB = {
    "effnb int8 per-channel": {"method": "int8", "group_size": 0},
    "effnb int8 g64": {"method": "int8", "group_size": 64},
    "effnb int4 g64 (rtn)": {"method": "int4", "group_size": 64},
    "effnb hqq g64 (nf4 grid)": {"method": "hqq", "group_size": 64},
    "effnb nf4 g64": {"method": "nf4", "group_size": 64},
    "effnb nf4 (reference path) g64": {"method": "nf4", "group_size": 64, "backend": "reference"},
    "effnb int8 per-channel + lm_head": {"method": "int8", "group_size": 0, "quantize_lm_head": True},
}
FORCED = ("effnb int8 per-channel", "effnb int4 g64 (rtn)")  # timed again with --threading


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2, help="torch and kernel threads (acceptance: 2)")
    ap.add_argument("--threading", action="store_true", help="also time " + ", ".join(FORCED) + " with the decode "
                    "kernels' threads forced to OpenMP and to effnb's pool (default: auto; same models, same run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from _peers import bnb_model, torch_dynamic_int8
    from _results import envelope, finish
    from effnb.kernels import cpu as cpu_ext

    import effnb
    from effnb.measure import bytes_per_token, read_bandwidth
    from effnb.quant.report import backend_summary

    record = envelope("cpu_decode", "SmolLM2-135M greedy decode on the CPU", "cpu_decode",
                      method=f"{args.tokens} new tokens after a short prompt, {args.threads} threads, median of "
                             f"{args.rounds} interleaved rounds (every variant once per round); ratios against "
                             "fp32 in the same run.")

    only = [o for o in args.only.split(",") if o]
    model = effnb.load_model("smollm2-135m")
    tok = effnb.tokenizer_for(model)
    ids = tok("def parse_args(argv):\n    \"\"\"", return_tensors="pt").input_ids
    variants = {"fp32": model}
    for label, opts in EFFNB.items():
        if not only or any(o in label for o in only):
            variants[label] = effnb.quantize(model, **opts, measure=False, share_unquantized=True).model
    threading = {k: "auto" for k in variants}
    if args.threading:
        for label in FORCED:
            if label in variants:
                for mode in ("openmp", "pool"):
                    variants[f"{label} [{mode}]"] = variants[label]
                    threading[f"{label} [{mode}]"] = mode
    if not only or any("bnb" in o for o in only):
        variants["bnb nf4 b64"] = bnb_model(model, "nf4", 64)
    if not only or any("torch" in o for o in only):
        variants["torch dynamic int8"] = torch_dynamic_int8(model)

    def gen(m, label=None):
        cpu_ext.set_decode_threading(threading.get(label, "auto"))
        with torch.inference_mode():
            return m.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    for label, m in variants.items():
        gen(m, label)  # warm-up (also builds effnb's CPU kernels on first use)
        for q in m.modules():
            if hasattr(q, "reset_backend_calls"):
                q.reset_backend_calls()
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, m in variants.items():
            t = time.perf_counter()
            gen(m, k)
            times[k].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {args.tokens / v[-1]:.1f}" for k, v in times.items())
              + f" tok/s (load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    base = args.tokens / statistics.median(times["fp32"])
    bandwidth = read_bandwidth("cpu")  # after the rounds: its tensor (64-256 MB) never competes with a timing
    rows = []
    print(f"SmolLM2-135M greedy decode, {args.tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"read bandwidth {bandwidth['bytes_per_s'] / 1e9:.2f} GB/s ({bandwidth['method']}); % of limit = tok/s x "
          "MB/token / read bandwidth (tok/s here includes the prompt's prefill, so the share reads a little low)")
    print(f"{'variant':30s} {'tok/s':>7s} {'vs fp32':>8s} {'MB/token':>9s} {'% limit':>8s}  backend")
    cpu_ext.set_decode_threading("auto")
    for k, ts in times.items():
        tps = args.tokens / statistics.median(ts)
        calls = backend_summary(variants[k])
        per_token = bytes_per_token(variants[k])
        fraction = tps * per_token / bandwidth["bytes_per_s"]
        rows.append({"variant": k, "tokens_per_s": tps, "vs_fp32": tps / base, "backend_calls": calls,
                     "spread_s": [min(ts), max(ts)], "bytes_per_token": per_token,
                     "read_bandwidth_bytes_per_s": bandwidth["bytes_per_s"], "bandwidth_fraction": fraction})
        print(f"{k:30s} {tps:7.1f} {tps / base:8.2f} {per_token / 1e6:9.1f} {fraction:8.1%}  {calls or ''}")
    stats = cpu_ext.decode_threading_stats()
    print(f"decode kernels' OpenMP calls that stalled > 1 ms: {stats['stalls']}; auto mode moved to effnb's pool "
          f"{stats['switches']} times")
    if args.json:
        Path(args.json).write_text(json.dumps(finish({**record, "threads": args.threads, "tokens": args.tokens,
                                                      "rounds": args.rounds, "rows": rows,
                                                      "read_bandwidth": bandwidth,
                                                      "threading_stats": stats}), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
