"""Scale: wall time and peak memory of audit and quantize as a Llama-shaped model grows.

    python benchmarks/scale.py --sizes 135m,0.5b --json scale.json
    python benchmarks/scale.py --sizes 1.5b --runs stream --methods nf4 --limit-gb 4

Synthetic checkpoints (random weights, fixed seed, fp16, sharded safetensors as transformers writes
them) are written tensor by tensor, a shard at a time, under ``--dir`` (reused when present), at
three sizes shaped like SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B (tied embeddings). For each:

    audit      effnb.load_model(folder) + effnb.audit(model) (no tokenizer: fixed token ids)
    memory     effnb.load_model(folder) + effnb.quantize(model, method, measure=False)
    stream     effnb.quantize(folder, method, save_to=tmp, measure=False)

Each run is a fresh subprocess: peak memory is its VmHWM (the high-water mark of the resident set,
imports included; reliable in a fresh process), with the resident set after the imports (torch,
transformers, effnb and the model class's module) beside it.
``--limit-gb``: streaming runs of checkpoints whose fp32 size exceeds it run under
``RLIMIT_AS`` = that many GiB. RLIMIT_AS caps *virtual* memory, which is larger than the resident
set (thread stacks, malloc arenas, libraries mapped but not touched), so a run that passes under it
is certainly within it resident; the limit is set in the child before torch is imported. Such a
child also runs with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc otherwise serves allocations below its
adaptive threshold (up to 32 MB, e.g. a 1.5B model's 27 MB fp16 MLP weights) from its heap, and the
address space of freed heap blocks stays mapped (``malloc_trim`` returns their pages, not their
addresses), so virtual memory would grow with every tensor read although the resident set does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "135m": (576, 1536, 30, 9, 3, 49152),
    "0.5b": (896, 4864, 24, 14, 2, 151936),
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
}
METHODS = ("int8", "nf4", "hqq", "gptq")
SHARD_BYTES = 1 << 30
MMAP_THRESHOLD = 1 << 20  # glibc's, fixed for runs under RLIMIT_AS (see the module docstring)

CHILD = r"""
import json, os, re, resource, sys, time
limit = float(sys.argv[5])
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit * 2**30), int(limit * 2**30)))
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
t0 = time.perf_counter()
import torch, transformers, effnb
import effnb.quant.api, effnb.quant.stream, effnb.measure.core
from transformers import LlamaForCausalLM  # the model's code (and torch._dynamo, which it imports): in the baseline
out = {"import_s": time.perf_counter() - t0, "rss_after_imports": status("VmRSS")}
run, folder, method, save_to = sys.argv[1:5]
opts = json.loads(sys.argv[6])
t = time.perf_counter()
if run == "stream":
    res = effnb.quantize(folder, method=method, save_to=save_to, measure=False, **opts)
else:
    model = effnb.load_model(folder)
    out["load_s"] = time.perf_counter() - t
    t1 = time.perf_counter()
    if run == "audit":
        effnb.audit(model)
    else:
        res = effnb.quantize(model, method=method, measure=False, **opts)
    out["op_s"] = time.perf_counter() - t1
out["wall_s"] = time.perf_counter() - t
out["peak_rss"] = status("VmHWM")
out["peak_virtual"] = status("VmPeak")
if run != "audit":
    out["calibration"] = res.details.get("calibration")
print("RESULT " + json.dumps(out))
"""


def shapes(size: str) -> tuple:
    return SIZES[size]


def config_for(size: str):
    from transformers import LlamaConfig

    h, inter, layers, heads, kv, vocab = shapes(size)
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                       tie_word_embeddings=True, dtype="float16", architectures=["LlamaForCausalLM"])


def write_checkpoint(size: str, folder: Path, seed: int = 0) -> Path:
    """Write the checkpoint a tensor at a time (fp16, random normal * 0.02, norms 1), shards of ~1 GiB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = config_for(size)
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(cfg).named_parameters()]  # ties once
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in names:
        t = torch.empty(shape, dtype=torch.float16)
        if "norm" in name:
            t.fill_(1.0)
        else:
            rows = t.view(shape[0], -1)
            for i in range(0, shape[0], 4096):  # fp32 temporaries of 4096 rows at most
                rows[i:i + 4096] = (torch.randn(rows[i:i + 4096].shape, generator=gen) * 0.02).to(torch.float16)
        shard[name] = t
        shard_bytes += t.nbytes
        total += t.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    n = len(files)
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def parameters(size: str) -> int:
    h, inter, layers, heads, kv, vocab = shapes(size)
    head_dim = h // heads
    per_layer = h * h * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h


def run_child(run: str, folder: Path, method: str, limit_gb: float, opts: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="effnb-scale-") as out:
        cmd = [sys.executable, "-c", CHILD, run, str(folder), method, str(Path(out) / "q"), str(limit_gb),
               json.dumps(opts)]
        env = dict(os.environ)
        if limit_gb > 0:  # large tensors mmapped and unmapped when freed: the address space follows what is live
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {p.returncode}: {tail[:300]}", "elapsed_s": time.perf_counter() - t}
        return json.loads(lines[-1][len("RESULT "):])


def environment() -> dict:
    import torch
    import transformers

    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_start": open("/proc/loadavg").read().split()[:3],
            "command": " ".join(sys.argv)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,0.5b,1.5b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", default="audit,memory,stream", help="audit, memory (load + quantize), stream")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "effnb-scale"), help="checkpoint folder")
    ap.add_argument("--limit-gb", type=float, default=4.0,
                    help="RLIMIT_AS (GiB) for streaming checkpoints whose fp32 size is above it (0: none)")
    ap.add_argument("--gptq-samples", type=int, default=8, help="gptq calibration sequences (of 256 tokens)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown size {bad[0]!r} (sizes: {', '.join(SIZES)})")
    runs = [r for r in args.runs.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    results = {"environment": environment(), "gptq_samples": args.gptq_samples, "rows": []}
    for size in sizes:
        t = time.perf_counter()
        folder = write_checkpoint(size, Path(args.dir) / f"llama-{size}-fp16")
        n = parameters(size)
        print(f"# {size}: {n / 1e6:.1f} M parameters, {folder} ready in {time.perf_counter() - t:.0f} s", flush=True)
        plan = [("audit", "-")] if "audit" in runs else []
        plan += [(r, m) for m in methods for r in ("memory", "stream") if r in runs]
        for run, method in plan:
            limit = args.limit_gb if run == "stream" and n * 4 > args.limit_gb * 2**30 and args.limit_gb > 0 else 0
            opts = {"calibration_samples": args.gptq_samples} if method == "gptq" else {}
            r = run_child(run, folder, method, limit, opts, args.timeout)
            row = {"size": size, "parameters": n, "run": run, "method": method, "limit_gb": limit or None, **r,
                   "loadavg": open("/proc/loadavg").read().split()[:3]}
            results["rows"].append(row)
            print(line(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(table(results["rows"]))
    return 0


def _gb(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else "-"


def _s(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['size']:>5} {r['run']:>6} {r['method']:>5}  ERROR {r['error']}"
    return (f"{r['size']:>5} {r['run']:>6} {r['method']:>5}  wall {_s(r['wall_s'])} s (load {_s(r.get('load_s'))}, "
            f"op {_s(r.get('op_s'))})  peak RSS {_gb(r['peak_rss'])} GiB  after imports "
            f"{_gb(r['rss_after_imports'])} GiB  limit {r['limit_gb'] or '-'}  load {' '.join(r['loadavg'])}")


def table(rows: list) -> str:
    out = ["| size | parameters | run | method | wall s | load s | op s | peak RSS GiB | RSS after imports GiB | "
           "RLIMIT_AS GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | {r['parameters'] / 1e6:.0f} M | {r['run']} | {r['method']} | "
                       f"{r['error']} | | | | | {r['limit_gb'] or '-'} |")
            continue
        out.append(f"| {r['size']} | {r['parameters'] / 1e6:.0f} M | {r['run']} | {r['method']} | {_s(r['wall_s'])} | "
                   f"{_s(r.get('load_s'))} | {_s(r.get('op_s'))} | {_gb(r['peak_rss'])} | "
                   f"{_gb(r['rss_after_imports'])} | {r['limit_gb'] or '-'} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
