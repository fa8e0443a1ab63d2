"""End-to-end smoke of every effnb technique on one synthetic Llama-shaped model, step by step.

    python benchmarks/gpu_smoke.py [--device cuda] [--json smoke.json]          # ~1.1B params, bf16
    python benchmarks/gpu_smoke.py --device cpu --tiny --json smoke.json        # a few MB, fp32: checks the code

The model is built in memory from a LlamaConfig (TinyLlama-1.1B's shape, random weights, seed 0; no
download) with effnb's byte tokenizer attached. Steps: build, audit, quantize to nf4, QLoRA for 10
steps on the nf4 model, merge, save and load, MoE split and upcycle (forward through the grouped
GEMM; the upcycled one also backward; on CUDA, or under TRITON_INTERPRET=1, the Triton grouped GEMM
is checked against the default), then quantize with int8, int4, fp4, fp8, hqq, gptq and llm.int8
(where bitsandbytes is installed).

Each step records its status (passed / failed / skipped with the reason), wall time, peak CUDA
memory (``torch.cuda.max_memory_allocated`` during the step, earlier allocations included; null
on the CPU), energy
(effnb.measure's counters: NVML on CUDA, RAPL on the CPU where readable, else null with the reason)
and its own figures. The JSON is rewritten after every step, so a run stopped part-way keeps what it
did. Exit status: 0 if no step failed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback

CONFIGS = {  # TinyLlama-1.1B's shape; "tiny" only checks the code paths
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
METHODS = ("int8", "int4", "nf4", "fp4", "hqq", "gptq", "fp8", "llm.int8")
KERNEL_METHODS = ("int8", "int4", "nf4", "fp4", "hqq", "gptq")  # formats effnb's CUDA kernels run
QLORA_STEPS = 10
OPTIONAL = {"triton": "triton", "bitsandbytes": "bitsandbytes", "plotly": "plotly", "pynvml": "nvidia-ml-py",
            "transformers": "transformers", "peft": "peft", "effnb": "effnb", "xdist": "pytest-xdist"}  # module: dist


class Skip(Exception):
    """A step that cannot run here; the message says why."""


class Smoke:
    """Runs steps in order, records each one, rewrites the JSON after each."""

    def __init__(self, args, torch):
        self.args, self.torch = args, torch
        self.cuda = args.device.startswith("cuda")
        self.ctx: dict = {}
        self.doc = {"schema": "effnb.gpu_smoke", "version": 1, "device": args.device,
                    "dtype": args.dtype, "config": args.config, "steps": [],
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join([os.path.basename(sys.executable), *sys.argv])}

    def write(self) -> None:
        if not self.args.json:
            return
        tmp = self.args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.doc, fh, indent=1, default=str)
        os.replace(tmp, self.args.json)

    def run(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        rec = {"name": name, "status": "passed", "reason": None, "seconds": None,
               "peak_cuda_bytes": None, "energy_j": None, "energy_method": None, "figures": {}}
        missing = [n for n in needs if n not in self.ctx]
        t0 = time.perf_counter()
        try:
            if missing:
                raise Skip(f"needs the result of step {missing[0]!r}, which did not pass")
            rec["figures"] = self._measured(fn, rec) or {}
        except Skip as exc:
            rec["status"], rec["reason"] = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - a failing step is recorded and the next one runs
            rec["status"], rec["reason"] = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback"] = traceback.format_exc()[-4000:]
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.doc["steps"].append(rec)
        self.write()
        print(f"{rec['status'].upper():7} {name:<18} {rec['seconds']:8.2f} s  "
              f"{rec['reason'] or _short(rec['figures'])}", flush=True)

    def _measured(self, fn, rec: dict):
        from effnb.measure.energy import EnergyMeter

        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        meter = EnergyMeter(self.args.device)
        with meter:
            figures = fn()
        if self.cuda:
            rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        rec["energy_j"] = meter.joules
        rec["energy_method"] = meter.method if meter.joules is not None else f"not measured: {meter.reason}"
        return figures


def _short(figures: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
             if not isinstance(v, (dict, list))]
    return ", ".join(items)[:160]


# ------------------------------------------------------------------------------------ helpers


def rel_error(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    if not torch.isfinite(out).all():
        raise AssertionError("the logits hold NaN or inf")
    return out


def backend_calls(model) -> dict:
    from effnb.quant.report import backend_summary

    return backend_summary(model)


# -------------------------------------------------------------------------------------- steps


def step_build(s: Smoke) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import effnb
    from effnb.models import byte_tokenizer

    torch = s.torch
    tok = byte_tokenizer()
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **CONFIGS[s.args.config])
    torch.manual_seed(0)
    with torch.device(s.args.device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, s.args.dtype)).eval()
    effnb.attach_tokenizer(model, tok)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 32), generator=gen).to(s.args.device)
    s.ctx.update(model=model, ids=ids, ref=logits(model, ids))
    params = sum(p.numel() for p in model.parameters())
    s.doc["parameters"] = params
    return {"parameters": params, "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def step_audit(s: Smoke) -> dict:
    import effnb

    rep = effnb.audit(s.ctx["model"], prompt_tokens=64, decode_tokens=8, repeats=1, warmup=1,
                      quality_tokens=512, window=256)
    row = rep.rows[0]
    if not row["prefill_ms"] or not row["decode_tokens_per_s"]:
        raise AssertionError(f"the audit measured no speed: {row['prefill_ms']}, {row['decode_tokens_per_s']}")
    return {"prefill_ms": row["prefill_ms"], "decode_tokens_per_s": row["decode_tokens_per_s"],
            "perplexity": (row["quality"] or {}).get("value"), "peak_memory_bytes": row["peak_memory_bytes"],
            "flops_per_token": row["flops_per_token"], "energy": row["energy"]}


def quant_options(method: str, tiny: bool) -> dict:
    if method == "gptq":
        return {"calibration_samples": 4 if tiny else 8, "calibration_tokens": 64 if tiny else 128}
    return {}


def step_quantize(s: Smoke, method: str) -> dict:
    import effnb

    if method == "llm.int8" and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (carry its wheel: docs/gpu.md)")
    res = effnb.quantize(s.ctx["model"], method, measure=False, **quant_options(method, s.args.tiny))
    qmodel = res.model
    t0 = time.perf_counter()
    out = logits(qmodel, s.ctx["ids"])
    forward_ms = (time.perf_counter() - t0) * 1e3
    extra = res.report.rows[1]["extra"]
    calls = backend_calls(qmodel)
    figures = {"quantize_s": extra["quantize_wall_s"], "bits_per_weight": extra["bits_per_weight"],
               "snr_db_mean": extra["snr_db_mean"], "logits_rel_error_vs_base": rel_error(out, s.ctx["ref"]),
               "first_forward_ms": forward_ms, "backend_calls": calls}
    if s.cuda and method in KERNEL_METHODS and not calls.get("cuda-kernel"):
        raise AssertionError(f"effnb's CUDA kernel did not run for {method}: backend calls {calls}")
    if method == "nf4":
        s.ctx["nf4"] = qmodel
    return figures


def step_qlora(s: Smoke) -> dict:
    import effnb

    lora = effnb.lora(s.ctx["nf4"], rank=8, alpha=16, targets="attn")
    res = effnb.finetune(lora.model, steps=QLORA_STEPS, batch_size=2, seq_len=64 if s.args.tiny else 256,
                         eval_every=0, eval_tokens=256, generations=0, live=False)
    d = res.details
    if d["technique"] != "QLoRA" or d["steps"] != QLORA_STEPS:
        raise AssertionError(f"expected {QLORA_STEPS} QLoRA steps, got {d['steps']} of {d['technique']}")
    losses = d["history"]["train_loss"]
    if not all(x == x and abs(x) != float("inf") for x in losses):
        raise AssertionError(f"non-finite training loss: {losses}")
    s.ctx["trained"] = res.model
    return {"technique": d["technique"], "steps": d["steps"], "first_loss": losses[0], "last_loss": losses[-1],
            "held_out_loss_before": d["held_out_loss"]["before"], "held_out_loss_after": d["held_out_loss"]["after"],
            "step_seconds_median": d["step_seconds_median"], "tokens_per_s": d["tokens_per_s"],
            "training_peak_memory_bytes": d["peak_memory_bytes"]}


def step_merge(s: Smoke) -> dict:
    import effnb

    res = effnb.merge(s.ctx["trained"])
    merged = res.model
    if hasattr(merged, "peft_config"):
        raise AssertionError("the merged model still carries PEFT adapters")
    logits(merged, s.ctx["ids"])
    err = res.details["merge_error"]
    return {"max_abs_logit_diff": err["max_abs_diff"], "max_abs_weight_error": err.get("max_abs_weight_error"),
            "quantized_base": res.details["quantized_base"], "backend_calls": backend_calls(merged)}


def _moe_forward(s: Smoke, model) -> dict:
    from effnb.kernels.ops import supports

    from effnb.experts import block as B

    out = logits(model, s.ctx["ids"])
    figures = {"logits_rel_error_vs_dense": rel_error(out, s.ctx["ref"])}
    w = next(m for _, m in B.moe_blocks(model)).w_in
    x = w.new_zeros(1, w.shape[1])
    figures["grouped_matmul"] = B.grouped_backend(x, w)
    if supports("triton", x=x, w=w) is None and figures["grouped_matmul"] != "triton":
        old = B.set_grouped_backend("triton")
        try:
            figures["triton_rel_error_vs_default"] = rel_error(logits(model, s.ctx["ids"]), out)
        finally:
            B.set_grouped_backend(old)
        if figures["triton_rel_error_vs_default"] > 2e-2:
            raise AssertionError(f"the Triton grouped GEMM differs: {figures['triton_rel_error_vs_default']:.3g}")
    elif figures["grouped_matmul"] != "triton":
        figures["triton"] = "not run: no CUDA (and TRITON_INTERPRET unset)"
    return figures


def step_moe(s: Smoke, method: str) -> dict:
    import effnb

    opts = {"calibration_tokens": 256} if method == "split" else {}
    res = effnb.moe(s.ctx["model"], experts=8, top_k=2, method=method, measure=False, **opts)
    figures = {"build_s": res.details["build_seconds"], "experts": 8, "top_k": 2,
               "active_parameters_per_token": res.details["active_parameters_per_token"]}
    figures.update(_moe_forward(s, res.model))
    if method == "upcycle":
        figures.update(_moe_backward(s, res.model))
    return figures


def _moe_backward(s: Smoke, model) -> dict:
    from effnb.experts import block as B

    torch = s.torch
    model.train()
    out = model(input_ids=s.ctx["ids"], labels=s.ctx["ids"])
    loss = out.loss + B.aux_loss(model)
    loss.backward()
    blocks = [m for _, m in B.moe_blocks(model)]
    grads = [p.grad for m in blocks for p in m.parameters()]
    if any(g is None or not torch.isfinite(g).all() for g in grads):
        raise AssertionError("an expert or router weight got no gradient, or a non-finite one")
    w = blocks[0].w_in
    return {"train_loss": loss.item(), "grouped_matmul_backward": B.grouped_backend(
        w.new_zeros(1, w.shape[1], requires_grad=True), w, needs_grad=True)}


def step_save_load(s: Smoke) -> dict:
    import effnb

    model = s.ctx["nf4"]
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        path = effnb.save(model, os.path.join(td, "nf4"))
        save_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
        t0 = time.perf_counter()
        loaded = effnb.load(path).to(s.args.device)
        load_s = time.perf_counter() - t0
    err = rel_error(logits(loaded, s.ctx["ids"]), logits(model, s.ctx["ids"]))
    if err > 1e-2:
        raise AssertionError(f"the loaded model's logits differ from the saved one's: relative error {err:.3g}")
    return {"save_s": save_s, "load_s": load_s, "checkpoint_bytes": size, "logits_rel_error": err,
            "backend_calls": backend_calls(loaded)}


# --------------------------------------------------------------------------------------- main


def plan(s: Smoke) -> list:
    """The steps in order: nf4 and what builds on it first, the slow quantizers (hqq, gptq) last, so a run
    stopped by its time limit has covered the most techniques."""
    quant = {m: (f"quantize-{m}", lambda m=m: step_quantize(s, m), ("model",)) for m in s.args.methods}
    steps = [("build", lambda: step_build(s), ()), ("audit", lambda: step_audit(s), ("model",))]
    steps += [quant.pop("nf4")] if "nf4" in quant else []
    steps += [("qlora", lambda: step_qlora(s), ("nf4",)), ("merge", lambda: step_merge(s), ("trained",)),
              ("save-load", lambda: step_save_load(s), ("nf4",)),
              ("moe-split", lambda: step_moe(s, "split"), ("model",)),
              ("moe-upcycle", lambda: step_moe(s, "upcycle"), ("model",))]
    return steps + list(quant.values())


def block_imports(names: list[str]) -> None:
    """Make packages look absent (as on a machine without them): import fails, find_spec gives None."""
    for name in names:
        sys.modules[name] = None


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a few-MB model in fp32: checks the code on any device")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"quantization methods, of: {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --tiny, where more only add hand-offs; else torch's)")
    ap.add_argument("--block-imports", default="", help="comma-separated packages to treat as not installed")
    ap.add_argument("--json", default=None, help="write (and rewrite after each step) the results here")
    ap.add_argument("--probe", action="store_true", help="print one line 'PROBE {json}' about this Python and exit")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    args.config = "tiny" if args.tiny else "1b"
    args.dtype = args.dtype or ("float32" if args.tiny or not args.device.startswith("cuda") else "bfloat16")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.probe:  # for gpu_check.py
        print("PROBE " + json.dumps(describe()))
        return 0
    block_imports([n.strip() for n in args.block_imports.split(",") if n.strip()])
    import torch

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        print(f"unknown dtype {args.dtype!r} (e.g. bfloat16, float16, float32)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke.py: no CUDA device; nothing was run (--device cpu --tiny checks the code on the CPU)",
              file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.tiny else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    s = Smoke(args, torch)
    s.doc["environment"] = describe()
    s.write()
    for name, fn, needs in plan(s):
        s.run(name, fn, needs)
    failed = [r["name"] for r in s.doc["steps"] if r["status"] == "failed"]
    print(f"# {len(s.doc['steps']) - len(failed)} of {len(s.doc['steps'])} steps did not fail"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def describe() -> dict:
    """This Python, its torch and CUDA device, the optional packages: the probe's line, the JSON's environment."""
    import importlib.metadata as md

    out: dict = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
    for name, dist in OPTIONAL.items():
        try:
            out["packages"][name] = md.version(dist) if importlib.util.find_spec(name) is not None else None
        except md.PackageNotFoundError:
            out["packages"][name] = "installed (version unknown)"
    try:
        import torch
    except ImportError as exc:
        return out | {"torch": None, "cuda": False, "torch_error": str(exc)}
    out.update(torch=torch.__version__, cuda=torch.cuda.is_available(), threads=torch.get_num_threads())
    if out["cuda"]:
        out.update(gpu=torch.cuda.get_device_name(), cuda_runtime=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
        if out["packages"]["bitsandbytes"]:  # a carried wheel may lack this CUDA's library: try it once
            try:
                import bitsandbytes  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any failure means it is not usable here
                out["packages"]["bitsandbytes"], out["bitsandbytes_error"] = None, f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    sys.exit(main())
