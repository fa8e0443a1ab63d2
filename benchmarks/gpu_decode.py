"""End-to-end decode speed of a Llama-shaped model (random weights): fp16 vs bitsandbytes NF4 vs effnb NF4/int4.

    python benchmarks/gpu_decode.py [--config 7b|3b|1b|tiny] [--tokens 128] [--rounds 3] [--eager]
                                    [--variants fp16,bnb-nf4,effnb-nf4,effnb-int4] [--json out.json] [--short]

Random weights are fine for speed (the work does not depend on the values). Each variant greedily
decodes --tokens new tokens after a 16-token prompt at batch 1. Decode time excludes the prompt:
time(generate N tokens) - time(generate 1 token), per generated token. Variants are timed in
interleaved rounds (round r times each variant once) after a warm-up generation each (which also
compiles); the median over rounds is reported with the ratio to fp16 from the same run.

By default generation uses a static KV cache so transformers compiles the forward
(torch.compile, CUDA graphs): without that, Python launch overhead, not memory traffic, sets
the pace at batch 1 and every variant looks alike. --eager skips compilation; a variant whose
compilation fails falls back to eager and says so in its row.

``--short`` (for ``make gpu-check``) generates 64 tokens in 2 rounds unless --tokens / --rounds are given.

Without CUDA the script exits with status 2 (``--device cpu --config tiny`` runs the harness on
the CPU to check it; those numbers say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

CONFIGS = {  # Llama-2 shapes; "tiny" only checks the harness
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}
VARIANTS = ("fp16", "bnb-nf4", "effnb-nf4", "effnb-int4")
SHORT = {"tokens": 64, "rounds": 2}


def build(variant: str, cfg_kwargs: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, **cfg_kwargs)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if variant == "fp16":
        return model
    if variant == "bnb-nf4":
        import bitsandbytes as bnb

        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                        compute_dtype=dtype, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(mod.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                               blocksize=64).to(device)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        return model
    import effnb

    method = variant.split("-", 1)[1]
    # effnb's report wants a tokenizer; any one does (measure=False runs no text through the model)
    effnb.attach_tokenizer(model, effnb.tokenizer_for(effnb.load_model("tiny-llama")))
    opts = {"group_size": 128} if method == "int4" else {"group_size": 64}
    return effnb.quantize(model, method, measure=False, inplace=True, **opts).model


def timed_generate(model, ids, new_tokens: int, static: bool) -> float:
    import torch

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kw)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="7b", choices=list(CONFIGS))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eager", action="store_true", help="no static cache / torch.compile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--short", action="store_true", help="fewer tokens and rounds (make gpu-check)")
    args = ap.parse_args(argv)
    for key, value in SHORT.items() if args.short else ():
        if getattr(args, key) == ap.get_default(key):  # options given explicitly win
            setattr(args, key, value)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_decode.py needs a CUDA GPU (none found); nothing was measured. "
              "(--device cpu --config tiny only checks the harness.)", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from gpu_kernels import _load_kernels

    _load_kernels()
    models, modes = {}, {}
    ids = torch.randint(10, CONFIGS[args.config]["vocab_size"] - 10, (1, 16), device=args.device)
    for v in variants:
        models[v] = build(v, CONFIGS[args.config], args.device, dtype)
        static = not args.eager
        try:
            timed_generate(models[v], ids, 4, static)  # warm-up, compiles
        except Exception as exc:  # noqa: BLE001 - report and go on eagerly
            print(f"# {v}: compiled generation failed ({type(exc).__name__}: {str(exc)[:200]}); timing it eagerly")
            static = False
            timed_generate(models[v], ids, 4, static)
        modes[v] = "static cache + compile" if static else "eager"
    per_token = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            static = modes[v] != "eager"
            t_long = timed_generate(models[v], ids, args.tokens, static)
            t_short = timed_generate(models[v], ids, 1, static)
            per_token[v].append((t_long - t_short) / (args.tokens - 1))
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (harness check only)"
    print(f"# {dev_name}  {datetime.date.today()}  Llama {args.config} random weights, batch 1, "
          f"{args.tokens} new tokens, median of {args.rounds} rounds")
    rows = []
    base = statistics.median(per_token["fp16"]) if "fp16" in per_token else None
    for v in variants:
        s = statistics.median(per_token[v])
        calls = {}
        for m in models[v].modules():
            if hasattr(m, "backend_calls"):
                for key, count in m.backend_calls.items():
                    calls[key] = calls.get(key, 0) + count
        row = {"variant": v, "tokens_per_s": 1 / s, "ms_per_token": s * 1e3, "mode": modes[v],
               "vs_fp16": (base / s) if base else None, "backend_calls": calls}
        rows.append(row)
        ratio = f"{base / s:5.2f}x" if base else "  -  "
        print(f"{v:<12} {1 / s:8.1f} tok/s  {s * 1e3:7.2f} ms/token  {ratio}  {modes[v]}  {calls or ''}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev_name, "config": args.config, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
