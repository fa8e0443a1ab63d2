"""Decode-kernel threading on a CPU: auto (the default), OpenMP, effnb's pool, and fp32 ``F.linear``, in one run.

    python benchmarks/cpu_kernel_threads.py [--threads 2] [--rounds 7] [--layers 40]

One matrix-vector product (a decode step's input, 1 row) through SmolLM2-sized layers
(1536x576 and 576x1536), cycling over ``--layers`` distinct weights so they come from memory, not
cache, as in a real decode. Variants are interleaved round by round; the median over rounds is
reported. Run it on a quiet machine and again while another process keeps the cores busy
(e.g. ``python -c "while True: pass" &`` twice): OpenMP's end-of-region barrier waits for every
thread, so one descheduled worker stalls a call; effnb's pool lets the caller finish the work; auto
uses OpenMP and moves to the pool for 2 s when stalls add up to 10 % of a 200 ms window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--formats", default="int8:0,int4:64,nf4:64")
    args = ap.parse_args(argv)
    import torch
    from effnb.kernels import cpu as cpu_ext

    from effnb.quant.api import quantize_layer
    from effnb.quant.config import QuantConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {args.threads} threads, {args.layers} layers per shape, median of {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} at start")
    for n, k in [(1536, 576), (576, 1536)]:
        lins = [torch.nn.Linear(k, n, bias=False) for _ in range(args.layers)]
        variants = {"fp32 F.linear": (lins, None)}
        for spec in args.formats.split(","):
            method, g = spec.split(":")
            cfg = QuantConfig.from_kwargs(method=method, group_size=int(g))
            layers = [quantize_layer("x", lin, cfg, None)[0] for lin in lins]
            variants[f"{method} g{g}, auto"] = (layers, "auto")
            variants[f"{method} g{g}, OpenMP"] = (layers, "openmp")
            variants[f"{method} g{g}, effnb pool"] = (layers, "pool")
        x = torch.randn(1, 1, k)
        times: dict[str, list[float]] = {v: [] for v in variants}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for label, (mods, mode) in variants.items():
                    if mode:
                        cpu_ext.set_decode_threading(mode)
                    for m in mods:
                        m(x)
                    t = time.perf_counter()
                    for _ in range(5):
                        for m in mods:
                            m(x)
                    times[label].append((time.perf_counter() - t) / (5 * len(mods)) * 1e6)
        cpu_ext.set_decode_threading("auto")
        base = statistics.median(times["fp32 F.linear"])
        print(f"\n{n}x{k} (out x in), microseconds per call, load average {os.getloadavg()[0]:.1f} at the end")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"  {label:24s} {med:9.1f} us   {base / med:5.2f}x fp32   (min {min(ts):.1f}, max {max(ts):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
