"""Fine-tuning on the built-in task: full vs LoRA vs QLoRA (memory, step time), LoRA vs LoRA+ (convergence).

    .venv/bin/python benchmarks/finetune.py                    # SmolLM2-135M, the issue-5 acceptance figures
    .venv/bin/python benchmarks/finetune.py --model tiny-llama --steps 6 --mem-steps 2   # a smoke run
    .venv/bin/python benchmarks/finetune.py --only memory      # or: --only convergence, --only acceptance

Every variant runs in its own fresh Python process, so one variant's memory cannot inflate another's.
Memory per variant (measured, by effnb.finetune): weight bytes of the model being trained plus the
rise of the process's peak resident set while training (VmHWM after /proc/self/clear_refs on Linux;
torch.cuda.max_memory_allocated on a GPU). The fp32 input model is deleted before training starts.

Sections:
  acceptance   LoRA r8 on attention, 60 steps at sequence 128: wall time of the loop, held-out loss
               before/after, trainable share (issue 5's first acceptance item)
  memory       full fine-tuning vs LoRA (fp32 base) vs QLoRA (effnb NF4 base): peak memory, median step time
               (these runs fix glibc's mmap threshold for honest peaks, which slows their steps: take step
               times from the acceptance section)
  convergence  LoRA vs LoRA+ (ratio 16), same seed and learning rate, held-out loss every --eval-every
               steps: the first step at which LoRA+ reaches LoRA's final held-out loss

The load average (`uptime`) is printed next to the figures: the build machine's 2 cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])
    except OSError:
        return "load average unknown"


def child(spec: dict) -> dict:
    """Run one variant in this process; returns its figures."""
    import gc

    import torch

    import effnb
    from effnb.torch_utils import trim_heap

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = spec.get("device") or None
    model = effnb.load_model(spec["model"], device=device)
    variant = spec["variant"]
    lora_kw = {"rank": spec["rank"], "targets": spec["targets"], "seed": spec["seed"], "inplace": True}
    if variant == "full":
        work = model
    elif variant in ("lora", "lora+"):
        work = effnb.lora(model, **lora_kw).model
    elif variant == "qlora":
        q = effnb.quantize(model, method="nf4", group_size=64).model
        del model
        gc.collect()
        work = effnb.lora(q, **lora_kw).model
    else:
        raise ValueError(f"unknown variant {variant!r}")
    gc.collect()
    trim_heap()  # hand memory freed above (the fp32 model of QLoRA) back to the OS, so the peak's rise is real
    t0 = time.perf_counter()
    res = effnb.finetune(work, steps=spec["steps"], lr=spec["lr"], batch_size=spec["batch_size"],
                         seq_len=spec["seq_len"], eval_every=spec["eval_every"], seed=spec["seed"],
                         plus_ratio=16.0 if variant == "lora+" else None, generations=spec["generations"],
                         live=False, inplace=True)
    wall = time.perf_counter() - t0
    d = res.details
    h = d["history"]
    return {
        "variant": variant, "steps": d["steps"], "finetune_wall_s": wall, "train_s": d["train_seconds"],
        "step_s_median": d["step_seconds_median"], "tokens_per_s": d["tokens_per_s"],
        "peak_memory_bytes": d["peak_memory_bytes"], "memory": d["memory"][0],
        "held_out_before": d["held_out_loss"]["before"], "held_out_after": d["held_out_loss"]["after"],
        "eval_step": h["eval_step"], "eval_loss": h["eval_loss"],
        "trainable_share": res.report.rows[1]["extra"]["trainable_share"],
        "generations": d["generations"], "device": str(next(res.model.parameters()).device),
    }


def run_child(spec: dict, fixed_mmap: bool = False) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if fixed_mmap:
        # memory runs only: a fixed glibc mmap threshold sends large freed blocks back to the OS at once
        # in every variant, so memory freed before training (QLoRA's fp32 model) cannot hide part of the
        # training peak, nor heap fragmentation inflate it. It costs time (every activation above 64 KiB
        # is mapped and unmapped, about 60 % more per step on the 2-core CPU), so the timed runs keep
        # glibc's default, as a user's notebook does.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(b) -> str:
    return f"{b / 1e6:,.0f} MB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=60, help="steps of the acceptance and convergence runs")
    p.add_argument("--mem-steps", type=int, default=8, help="steps of each memory run (the peak comes early)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--plus-lr", type=float, default=None, help="learning rate of the LoRA vs LoRA+ runs "
                   "(default: --lr)")
    p.add_argument("--eval-every", type=int, default=5, help="held-out loss interval of the convergence runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own)")
    p.add_argument("--only", choices=["acceptance", "memory", "convergence"], action="append")
    p.add_argument("--json", default=None, help="write all figures to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    sections = a.only or ["acceptance", "memory", "convergence"]
    base = {"model": a.model, "seq_len": a.seq_len, "batch_size": a.batch_size, "rank": a.rank,
            "targets": a.targets, "seed": a.seed, "device": a.device, "lr": a.lr, "threads": a.threads}
    results: dict = {"args": vars(a), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(f"# effnb fine-tuning benchmark: {a.model}, seq {a.seq_len}, batch {a.batch_size}, rank {a.rank} "
          f"on {a.targets!r}")

    if "acceptance" in sections:
        print(f"\n## acceptance: LoRA, {a.steps} steps ({_uptime()} before)")
        r = run_child({**base, "variant": "lora", "steps": a.steps, "eval_every": 20, "generations": 3})
        results["acceptance"] = {**r, "load_after": _uptime()}
        fall = (r["held_out_before"] - r["held_out_after"]) / r["held_out_before"]
        print(f"trainable share {r['trainable_share'] * 100:.3f} % | {r['steps']} steps: loop {r['train_s']:.1f} s, "
              f"finetune() incl. before/after evaluation and generations {r['finetune_wall_s']:.1f} s | "
              f"median step {r['step_s_median']:.3f} s | held-out loss {r['held_out_before']:.3f} -> "
              f"{r['held_out_after']:.3f} ({fall * 100:.1f} % lower) | {_uptime()} after")
        for g in r["generations"]:
            print(f"  {g['question']!r}\n    before: {g['before']!r}\n    after:  {g['after']!r}\n"
                  f"    reference: {g['reference']!r}")

    if "memory" in sections:
        print(f"\n## memory and step time, {a.mem_steps} steps each, one process per variant ({_uptime()})")
        rows = []
        for v in ("full", "lora", "qlora"):
            r = run_child({**base, "variant": v, "steps": a.mem_steps, "eval_every": 0, "generations": 0},
                          fixed_mmap=True)
            rows.append(r)
        results["memory"] = rows
        print("| variant | peak memory (measured) | weights | gradients | optimizer | median step | tokens/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            m = r["memory"]
            print(f"| {r['variant']} | {_mb(r['peak_memory_bytes'])} | {_mb(m['weights_bytes'])} | "
                  f"{_mb(m['gradients_bytes'])} | {_mb(m['optimizer_bytes'])} | {r['step_s_median']:.3f} s | "
                  f"{r['tokens_per_s']:,.0f} |")
        peaks = {r["variant"]: r["peak_memory_bytes"] for r in rows}
        print(f"QLoRA < LoRA < full: {peaks['qlora'] < peaks['lora'] < peaks['full']} ({_uptime()})")

    if "convergence" in sections:
        lr = a.plus_lr or a.lr
        print(f"\n## LoRA vs LoRA+ (ratio 16), lr {lr:g}, {a.steps} steps, held-out loss every {a.eval_every} "
              f"({_uptime()})")
        spec = {**base, "lr": lr, "steps": a.steps, "eval_every": a.eval_every, "generations": 0}
        plain = run_child({**spec, "variant": "lora"})
        plus = run_child({**spec, "variant": "lora+"})
        target = plain["held_out_after"]
        reached = next((s for s, v in zip(plus["eval_step"], plus["eval_loss"]) if v <= target), None)
        results["convergence"] = {"lora": plain, "lora+": plus, "target": target, "lora+_reaches_at": reached}
        print("| step | " + " | ".join(str(s) for s in plain["eval_step"]) + " |")
        print("| --- | " + " | ".join("---" for _ in plain["eval_step"]) + " |")
        print("| LoRA | " + " | ".join(f"{v:.3f}" for v in plain["eval_loss"]) + " |")
        print("| LoRA+ | " + " | ".join(f"{v:.3f}" for v in plus["eval_loss"]) + " |")
        print(f"LoRA's {a.steps}-step held-out loss {target:.3f}; LoRA+ reaches it at step "
              f"{reached if reached is not None else 'never (within the run)'} ({_uptime()})")

    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
