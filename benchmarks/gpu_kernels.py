"""GPU weight-only matmul: effnb's Triton kernels vs fp16 cuBLAS, bitsandbytes NF4 and torch int4 (tinygemm).

    python benchmarks/gpu_kernels.py [--batches 1,4,16,64,256] [--shapes 4096x4096,...] [--paths auto|all]
                                     [--reps 30] [--json out.json] [--short]

Shapes are in_features x out_features (K x N) of the Llama-2-7B / Llama-3-8B linear layers and
8192x8192. Every variant of a (shape, batch) cell is timed in the same run: each is captured
into a CUDA graph of many calls (so Python and launch gaps stay out; weights rotate over enough
copies to overflow L2), replayed after a warm-up, timed with CUDA events; the median over --reps
replays, divided by the calls per graph, is the time of one call. Achieved bandwidth counts the
bytes a call must move (weights and their scales once, x read once, y written once) and is
also shown as a share of the device-to-device copy bandwidth measured at the start.

``--short`` times issue 4's acceptance cells only (4096x11008 and 8192x8192 at batch 1, 16 and 256;
NF4 b64, int4 g64 and g128 beside fp16, bitsandbytes and tinygemm), for ``make gpu-check``.

``--compile-only`` needs no GPU: it compiles effnb's kernels for sm_90 (Hopper) with the ptxas
bundled in triton and prints, per format and path, registers, stack (spills), shared memory and
counts of telling SASS instructions (16-byte loads LDG.E.128, async copies LDGSTS, HGMMA/HMMA,
local-memory LDL/STL).

Every effnb result is checked against the PyTorch reference before it is timed (max relative
error printed; a wrong kernel is reported, never timed silently). Without CUDA the script exits
with status 2 and a message. ``--paths all`` also times each forced effnb path (gemv,
gemm-small, gemm, dequant+cublas) so the thresholds in kernels/triton/__init__.py (``plan``) can be set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "14336x4096", "8192x8192"]
FORMATS = {  # name -> (fmt, group, options)
    "effnb int4 g128": ("int4", 128, {}),
    "effnb int4 g64": ("int4", 64, {}),
    "effnb nf4 b64": ("nf4", 64, {}),
    "effnb nf4 b64 dq": ("nf4", 64, {"double_quant": True}),
    "effnb int8 g128": ("int8", 128, {}),
}
SHORT = {"shapes": "4096x11008,8192x8192", "batches": "1,16,256",
         "formats": "effnb nf4 b64,effnb int4 g64,effnb int4 g128"}  # issue 4's acceptance cells


def _load_kernels():
    """(kt, reference, testing): ``kt`` is ``effnb.kernels.triton``, the Triton launcher (``run_kernel``,
    ``plan``, ``PATHS``, ``FMT_CODE``); also from a checkout whose editable install predates the kernels/ mapping."""
    import importlib.util
    import pathlib

    if importlib.util.find_spec("effnb.kernels") is None:
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("effnb.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["effnb.kernels"] = mod
        spec.loader.exec_module(mod)
    from effnb.kernels import reference, testing
    from effnb.kernels import triton as kt

    return kt, reference, testing


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def time_calls(torch, make_call, copies: int, calls_per_graph: int, reps: int) -> tuple[float, str]:
    """Median microseconds per call; make_call(i) returns a zero-arg callable using weight copy i."""
    fns = [make_call(i % copies) for i in range(calls_per_graph)]
    for f in fns[: min(len(fns), copies)] * 2:  # warm-up: compile kernels, create handles
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns[:3]:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run, mode = graph.replay, "graph"
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be captured is timed eagerly
        torch.cuda.synchronize()

        def run():
            for f in fns:
                f()

        mode = f"eager ({type(exc).__name__})"
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls_per_graph)
    return statistics.median(times), mode


def copy_bandwidth(torch) -> float:
    """Bytes read + written per second of a large device-to-device copy (median of 20)."""
    n = 1 << 28  # 256 Mi fp32 = 1 GiB each way
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(20):
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="in_features x out_features, comma separated")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"of: {', '.join(FORMATS)}")
    ap.add_argument("--paths", default="auto", choices=["auto", "all"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 and report resources (no GPU)")
    ap.add_argument("--sweep-gemv", action="store_true",
                    help="time a grid of GEMV launch configurations at M=1 per shape and format; print the best")
    ap.add_argument("--short", action="store_true", help="issue 4's acceptance cells only (make gpu-check)")
    args = ap.parse_args(argv)
    for key, value in SHORT.items() if args.short else ():
        if getattr(args, key) == ap.get_default(key):  # options given explicitly win
            setattr(args, key, value)
    if args.compile_only:
        names = [f.strip() for f in args.formats.split(",") if f.strip()]
        return compile_report([FORMATS[f] for f in names if f in FORMATS], [int(b) for b in args.batches.split(",")])

    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU (none found); nothing was measured. "
              "The CPU checks of the kernels are: pytest tests/kernels", file=sys.stderr)
        return 2
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        print(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    kt, reference, testing = _load_kernels()
    import torch.nn.functional as F

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth(torch)
    env = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_bandwidth_GBps": bw / 1e9, "sms": props.multi_processor_count}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        env["bitsandbytes"] = bnb.__version__
    except Exception as exc:  # noqa: BLE001
        bnb = None
        env["bitsandbytes"] = f"unavailable ({exc})"
    print(f"# {env['device']}  {env['date']}  torch {env['torch']}  triton {env['triton']}  "
          f"bitsandbytes {env['bitsandbytes']}  measured copy bandwidth {bw / 1e9:.0f} GB/s")

    if args.sweep_gemv:
        return sweep_gemv(torch, kt, testing, formats, args, l2)
    rows = []
    header = f"{'K x N':>12} {'M':>4}  {'variant':<28} {'path':<15} {'us':>8} {'GB/s':>7} {'%copy':>6} {'vs fp16':>8}  check"
    print(header)
    batches = [int(b) for b in args.batches.split(",")]
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        k, n = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device=dev).manual_seed(0)
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=gen)
        copies16 = max(2, math.ceil(3 * l2 / _nbytes(w16)))
        ws16 = [w16] + [w16.clone() for _ in range(copies16 - 1)]
        cases = {}
        for name in formats:
            fmt, g, opts = FORMATS[name]
            c0 = testing.make_case(fmt, n, k, g, device=dev, seed=1, **opts)
            tensors = [v for v in testing.weight_args(c0).values() if isinstance(v, torch.Tensor)]
            tensors += list(c0.get("dq", ()))
            nb = _nbytes(*tensors)
            cp = max(2, math.ceil(3 * l2 / nb))
            reps_ = [c0] + [{key: (v.clone() if isinstance(v, torch.Tensor) else
                                   tuple(t.clone() for t in v) if isinstance(v, tuple) else v)
                             for key, v in c0.items()} for _ in range(cp - 1)]
            cases[name] = (fmt, reps_, nb)
        bnb_w = None
        if bnb is not None and "nf4" in " ".join(formats):
            try:
                cp_bnb = max(2, math.ceil(3 * l2 / (n * k * 0.5625)))  # enough copies to overflow L2 3x
                bnb_w = [bnbf.quantize_4bit(w16, blocksize=64, quant_type="nf4") for _ in range(cp_bnb)]
            except Exception as exc:  # noqa: BLE001
                print(f"# bitsandbytes NF4 unavailable: {exc}")
        tiny = None
        try:  # torch's tinygemm int4 (the kernel torchao's int4 uses): bf16 activations, group 128
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
            packed_in = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            tp = torch._convert_weight_to_int4pack(packed_in, 8)
            sz = torch.randn(k // 128, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
            tiny = [(tp, sz)] + [(tp.clone(), sz.clone()) for _ in range(max(1, math.ceil(3 * l2 / _nbytes(tp, sz))) - 1)]
        except Exception as exc:  # noqa: BLE001
            print(f"# torch._weight_int4pack_mm unavailable: {type(exc).__name__}: {exc}")
        for m in batches:
            x16 = torch.randn(m, k, device=dev, dtype=torch.float16, generator=gen)
            cell = []
            fp16_us, mode = time_calls(torch, lambda i, x=x16, ws=ws16: (lambda: F.linear(x, ws[i])), copies16,
                                       args.calls, args.reps)
            moved = _nbytes(w16, x16) + m * n * 2
            cell.append(("fp16 cuBLAS", "cublas", fp16_us, moved, mode, ""))
            for name in formats:
                fmt, reps_, nb = cases[name]
                paths = [None] + (list(kt.PATHS) if args.paths == "all" else [])
                for path in paths:
                    c = reps_[0]
                    y, used = kt.run_kernel(fmt, x16, path=path, return_path=True, **testing.weight_args(c))
                    ref = reference.reference_linear(fmt, x16.float(), **testing.weight_args(c))
                    err = testing.rel_error(y, ref)
                    ok = err <= testing.TOLERANCE[torch.float16]
                    check = f"err {err:.1e}" + ("" if ok else " WRONG")

                    def make(i, path=path, fmt=fmt, reps_=reps_, x=x16):
                        wa = testing.weight_args(reps_[i])
                        return lambda: kt.run_kernel(fmt, x, path=path, **wa)

                    us, mode = time_calls(torch, make, len(reps_), args.calls, args.reps)
                    label = name if path is None else f"{name} [{path}]"
                    cell.append((label, used, us, nb + _nbytes(x16) + m * n * 2, mode, check))
            if bnb_w:
                def make_bnb(i, ws=bnb_w, x=x16):
                    qw, st = ws[i]
                    return lambda: bnb.matmul_4bit(x, qw.t(), quant_state=st)

                try:
                    us, mode = time_calls(torch, make_bnb, len(bnb_w), args.calls, args.reps)
                    nb = _nbytes(bnb_w[0][0], bnb_w[0][1].absmax)
                    cell.append(("bitsandbytes NF4 b64", "bnb", us, nb + _nbytes(x16) + m * n * 2, mode, ""))
                except Exception as exc:  # noqa: BLE001
                    print(f"# bitsandbytes NF4 failed at M={m}: {exc}")
            if tiny:
                xb = x16.to(torch.bfloat16)

                def make_tiny(i, ts=tiny, x=xb):
                    tp, sz = ts[i]
                    return lambda: torch._weight_int4pack_mm(x, tp, 128, sz)

                try:
                    us, mode = time_calls(torch, make_tiny, len(tiny), args.calls, args.reps)
                    cell.append(("torch int4pack g128 (bf16)", "tinygemm", us,
                                 _nbytes(*tiny[0]) + _nbytes(xb) + m * n * 2, mode, ""))
                except Exception as exc:  # noqa: BLE001
                    print(f"# torch._weight_int4pack_mm failed at M={m}: {type(exc).__name__}: {exc}")
            for label, used, us, moved, mode, check in cell:
                gbs = moved / (us * 1e-6) / 1e9
                row = {"shape": shape, "k": k, "n": n, "m": m, "variant": label, "path": used, "us": us,
                       "GBps": gbs, "copy_share": gbs * 1e9 / bw, "speedup_vs_fp16": fp16_us / us, "timing": mode,
                       "check": check}
                rows.append(row)
                print(f"{shape:>12} {m:>4}  {label:<28} {used:<15} {us:8.1f} {gbs:7.0f} {100 * gbs * 1e9 / bw:5.0f}% "
                      f"{fp16_us / us:7.2f}x  {check}{'' if mode == 'graph' else ' ' + mode}")
    print()
    _acceptance(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
    return 0


def sweep_gemv(torch, kt, testing, formats, args, l2) -> int:
    """Time GEMV configurations (BLOCK_N, BLOCK_K, split-K, warps) at M=1: data for ``plan``."""
    import itertools

    dev = torch.device("cuda")
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        k, n = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        for name in formats:
            fmt, g, opts = FORMATS[name]
            c0 = testing.make_case(fmt, n, k, g, device=dev, seed=1, **opts)
            nb = _nbytes(*[v for v in testing.weight_args(c0).values() if isinstance(v, torch.Tensor)],
                         *c0.get("dq", ()))
            reps_ = [c0] + [{key: (v.clone() if isinstance(v, torch.Tensor) else
                                   tuple(t.clone() for t in v) if isinstance(v, tuple) else v)
                             for key, v in c0.items()} for _ in range(max(1, math.ceil(3 * l2 / nb)) - 1)]
            ref = _load_kernels()[1].reference_linear(fmt, x.float(), **testing.weight_args(c0))
            default = kt.plan(fmt, 1, n, k, g, dev)
            results = []
            bks = (128, 256) if fmt == "int8" else (256, 512)
            for bn, bk, sk, nw in itertools.product((8, 16, 32), bks, (1, 2, 4), (2, 4)):
                cfg = {"block_m": 1, "block_n": bn, "block_k": bk, "use_dot": False,
                       "split_k": sk, "num_warps": nw}
                err = testing.rel_error(kt.run_kernel(fmt, x, config=cfg, **testing.weight_args(c0)), ref)
                if err > testing.TOLERANCE[torch.float16]:
                    print(f"# {shape} {name} {cfg}: WRONG (error {err:.2e}), not timed")
                    continue

                def make(i, cfg=cfg, reps_=reps_, fmt=fmt, x=x):
                    wa = testing.weight_args(reps_[i])
                    return lambda: kt.run_kernel(fmt, x, config=cfg, **wa)

                us, _ = time_calls(torch, make, len(reps_), args.calls, args.reps)
                results.append((us, cfg))
            results.sort(key=lambda r: r[0])
            d_us = next((us for us, c in results if all(c.get(key) == default.get(key) for key in
                                                         ("block_n", "block_k", "split_k", "num_warps"))), None)
            best_us, best = results[0]
            print(f"{shape:>12} {name:<18} best {best_us:7.1f} us ({nb / best_us / 1e3:5.0f} GB/s) "
                  f"block_n={best['block_n']} block_k={best['block_k']} split_k={best['split_k']} "
                  f"warps={best['num_warps']}; plan's default: {d_us if d_us is None else round(d_us, 1)} us")
    return 0


def compile_report(formats, batches, n: int = 4096, k: int = 4096) -> int:
    """Compile the fused kernel for sm_90 per format and path; print resources and SASS op counts."""
    import os
    import pathlib
    import re
    import subprocess
    import tempfile

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kt, _, _ = _load_kernels()
    import triton
    from effnb.kernels.triton import qmm
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from effnb.torch_utils import triton_interpreting

    if triton_interpreting():
        print("--compile-only needs triton without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    binp = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ops = ("LDG.E.128", "LDGSTS", "HGMMA", "HMMA", "LDL", "STL")
    print(f"# fused kernel compiled for sm_90 (no GPU needed), weight {k} x {n} (in x out), fp16 activations")
    print(f"{'format':<12} {'M':>4} {'path':<11} {'regs':>5} {'stack':>5} {'smem':>6}  " + " ".join(ops))
    failed = 0
    for fmt, group, opts in formats:
        dq = bool(opts.get("double_quant"))
        label = f"{fmt} g{group}{' dq' if dq else ''}"
        code = kt.FMT_CODE[fmt]
        for m in batches:
            cfg = kt.plan(fmt, m, n, k, group, "cpu", sms=132)  # as on an H100 SXM
            if cfg["path"] == "dequant+cublas":
                continue
            sig = {"x_ptr": "*fp16", "w_ptr": "*i8" if fmt == "int8" else "*u8",
                   "s_ptr": "*fp32" if fmt == "nf4" else "*fp16", "z_ptr": "*fp16", "q2_ptr": "*u8",
                   "c2_ptr": "*fp32", "a2_ptr": "*fp32", "off_ptr": "*fp32", "tab_ptr": "*fp32", "b_ptr": "*fp16",
                   "y_ptr": "*fp16" if cfg["split_k"] == 1 else "*fp32", "M": "i32", "N": "i32", "K": "i32",
                   "KG": "i32", "stride_wn": "i32", "stride_xm": "i32", "stride_ym": "i32", "k_per_split": "i32"}
            const = {"FMT": code, "HAS_Z": fmt == "int4", "DQ": dq, "HAS_BIAS": False, "GROUP": group,
                     "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"],
                     "SPLIT_K": cfg["split_k"], "USE_DOT": cfg["use_dot"], "IEEE": False, "EMU": False,
                     "EVEN_K": k % cfg["block_k"] == 0}
            sig.update({name: "constexpr" for name in const})
            names = list(sig)
            # as the launcher specialises: 16-byte aligned pointers, sizes and strides divisible by 16
            div = [i for i, nm in enumerate(names) if sig[nm].startswith("*")
                   or nm in ("K", "stride_wn", "stride_xm", "stride_ym", "k_per_split")]
            src = ASTSource(qmm.QMM, sig, constexprs={(names.index(c),): v for c, v in const.items()},
                            attrs={(i,): [["tt.divisibility", 16]] for i in div})
            try:
                kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)})
            except Exception as exc:  # noqa: BLE001
                print(f"{label:<12} {m:>4} {cfg['path']:<11} FAILED to compile: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            with tempfile.TemporaryDirectory() as td:
                cub = pathlib.Path(td) / "k.cubin"
                cub.write_bytes(kern.asm["cubin"])
                res = subprocess.run([str(binp / "cuobjdump"), "-res-usage", str(cub)], capture_output=True,
                                     text=True).stdout
                sass = subprocess.run([str(binp / "cuobjdump"), "-sass", str(cub)], capture_output=True,
                                      text=True).stdout
            regs = re.search(r"REG:(\d+)", res)
            stack = re.search(r"STACK:(\d+)", res)
            counts = " ".join(f"{len(re.findall(re.escape(op) + r'(?![A-Z0-9])', sass)):>{len(op)}}" for op in ops)
            print(f"{label:<12} {m:>4} {cfg['path']:<11} {regs.group(1) if regs else '?':>5} "
                  f"{stack.group(1) if stack else '?':>5} {kern.metadata.shared:>6}  {counts}")
    return 1 if failed else 0


def _acceptance(rows) -> None:
    """The issue's acceptance points, from this run's rows."""
    def get(shape, m, variant):
        for r in rows:
            if r["shape"] == shape and r["m"] == m and r["variant"] == variant:
                return r
        return None

    checks = []
    for v in ("effnb nf4 b64", "effnb int4 g64", "effnb int4 g128"):
        for shape, need in (("4096x11008", 2.5), ("8192x8192", 2.8)):
            r = get(shape, 1, v)
            if r:
                checks.append((f"{v} {shape} M=1 vs fp16", r["speedup_vs_fp16"], need))
        for shape in ("4096x11008", "8192x8192"):
            r, b = get(shape, 1, v), get(shape, 1, "bitsandbytes NF4 b64")
            if r and b:
                checks.append((f"{v} {shape} M=1 vs bitsandbytes NF4", b["us"] / r["us"], 2.0))
        for shape in ("4096x11008", "8192x8192"):
            r = get(shape, 16, v)
            if r:
                checks.append((f"{v} {shape} M=16 vs fp16", r["speedup_vs_fp16"], 1.5))
            r = get(shape, 256, v)
            if r:
                checks.append((f"{v} {shape} M=256 vs fp16", r["speedup_vs_fp16"], 0.95))
    for what, got, need in checks:
        print(f"{'PASS' if got >= need else 'FAIL'}  {what}: {got:.2f}x (need >= {need}x)")


if __name__ == "__main__":
    sys.exit(main())
