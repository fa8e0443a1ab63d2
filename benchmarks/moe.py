"""MoE block time: effnb's block vs a per-expert loop vs transformers' Mixtral experts vs the dense FFN.

    python benchmarks/moe.py                       # CPU: SmolLM2-sized FFN (hidden 576, FFN 1536), 8 experts, top-2
    python benchmarks/moe.py --tokens 1,64,512,2048 --rounds 9 --json moe.json
    python benchmarks/moe.py --shape mixtral --device cuda --dtype bfloat16   # hidden 4096, FFN 14336 (GPU only)
    python benchmarks/moe.py --quantized            # SmolLM2 split into 8 experts, experts quantized: bytes, quality

Shapes: ``smollm2`` splits one SwiGLU FFN of hidden 576 and FFN size 1536 into 8 experts of 192
neurons (MoEfication, as ``effnb.moe(method="split")`` does), so the dense FFN and the MoE at top-8
compute the same thing; ``mixtral`` is 8 full experts of FFN size 14336 (4096 hidden) and has no
dense twin. Variants, timed in one run, interleaved round by round (load from other processes hits
all alike), median over rounds after a warm-up:

- ``dense``: the dense FFN (``down(silu(gate x) * up x)``), smollm2 shape only;
- ``effnb``: ``MoEFFN``'s own dispatch (sort by expert, matmuls over the selected slices only, gather back;
  on the CPU one matmul per non-empty expert, on CUDA bf16 ``torch._grouped_mm``);
- ``triton``: the same sorted layout through effnb's Triton grouped GEMM (``effnb.kernels.triton.grouped``;
  on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` with ``--dry-run``);
- ``grouped_mm``: the same sorted layout through ``torch._grouped_mm`` (forced);
- ``loop``: the same sorted layout with one matmul per non-empty expert (forced);
- ``reference``: ``moe_ffn_reference`` (a token mask per expert);
- ``transformers``: transformers' ``MixtralExperts`` holding the same weights, fed the same routing.

All variants are checked to give the same output before timing. Routing comes from a router with
random weights (close to balanced); the ratio column is against ``dense`` (or ``effnb``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPES = {"smollm2": (576, 1536, 8), "mixtral": (4096, 14336, 8), "tiny": (64, 256, 8)}


def build(shape: str, top_k: int, dtype, device):
    import torch
    from torch import nn

    from effnb.experts.block import MoEFFN

    hidden, ffn, experts = SHAPES[shape]
    expert_size = ffn if shape == "mixtral" else ffn // experts
    gen = torch.Generator().manual_seed(0)
    block = MoEFFN(hidden, expert_size, experts, top_k, nn.SiLU(), gated=True, combine="softmax")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * hidden ** -0.5)
    block = block.to(device=device, dtype=dtype).eval()
    dense = None
    if shape != "mixtral":  # the dense FFN whose neurons the experts partition
        w_gate = block.w_in[:, :, :expert_size].permute(0, 2, 1).reshape(ffn, hidden)  # [I, H]
        w_up = block.w_in[:, :, expert_size:].permute(0, 2, 1).reshape(ffn, hidden)
        w_down = block.w_out.reshape(ffn, hidden).T.contiguous()  # [H, I]
        w_gu = torch.cat([w_gate, w_up]).contiguous()

        def dense(x):
            g, u = nn.functional.linear(x, w_gu).chunk(2, dim=-1)
            return nn.functional.linear(nn.functional.silu(g) * u, w_down)

    return block, dense


def transformers_experts(block):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=block.hidden, intermediate_size=block.expert_size,
                        num_local_experts=block.experts, num_experts_per_tok=block.top_k)
    mod = MixtralExperts(cfg).to(device=block.w_in.device, dtype=block.w_in.dtype)
    mod.gate_up_proj.data.copy_(block.w_in.transpose(1, 2))  # [E, 2Ie, H]: gate rows first, as in effnb
    mod.down_proj.data.copy_(block.w_out.transpose(1, 2))  # [E, H, Ie]
    return mod.eval()


def quantized_experts(args) -> int:
    """Memory and quality of SmolLM2 dense vs split into 8 experts vs the split MoE with quantized experts."""
    import torch

    import effnb
    from effnb.measure.env import environment
    from effnb.measure.memory import weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    dense = effnb.load_model("smollm2-135m")
    tok = effnb.tokenizer_for(dense)
    ids = tok(effnb.data.eval_text(), return_tensors="pt").input_ids[:, :256]
    moe = effnb.moe(dense, experts=8, top_k=args.quant_top_k, method="split", measure=False).model

    def expert_bytes(model):
        from effnb.experts.quant import QuantMoEFFN

        n = 0
        for _, b in effnb.experts.moe_blocks(model):
            mods = [*b.experts_in, *b.experts_out] if isinstance(b, QuantMoEFFN) else []
            n += sum(m.storage_bytes() for m in mods) if mods else b.w_in.nbytes + b.w_out.nbytes
        return n

    def logits(model):
        with torch.inference_mode():
            return model(input_ids=ids).logits

    ref = logits(moe)
    rows = []

    def row(name, model, t=None):
        err = (logits(model) - ref).abs().max().item() if name.startswith("MoE") and model is not moe else None
        ppl = effnb.measure.perplexity(model, max_tokens=args.quant_tokens)
        r = {"name": name, "weight_bytes": weight_bytes(model)[0],
             "expert_bytes": expert_bytes(model) if name.startswith("MoE") else None,
             "perplexity": ppl, "max_abs_logit_diff_vs_moe": err, "quantize_s": t}
        rows.append(r)
        eb = f"{r['expert_bytes'] / 2**20:7.1f} MiB experts" if r["expert_bytes"] is not None else " " * 19
        print(f"{name:24s} {r['weight_bytes'] / 2**20:7.1f} MiB total  {eb}  ppl {ppl:9.3f}"
              + (f"  max|logit - MoE| {err:.3g}" if err is not None else ""), flush=True)

    print(f"# SmolLM2-135M, split 8 experts top-{args.quant_top_k}, perplexity over {args.quant_tokens} eval tokens, "
          f"{torch.get_num_threads()} threads")
    row("dense fp32", dense)
    row(f"MoE fp32 (top-{args.quant_top_k}/8)", moe)
    for method in args.quant_methods.split(","):
        t0 = time.perf_counter()
        q = effnb.quantize(moe, method=method, group_size=64, measure=False).model
        row(f"MoE {method}-g64", q, time.perf_counter() - t0)
        del q
        if args.quant_dense:  # the dense model quantized alike: what per-expert quantization costs extra
            t0 = time.perf_counter()
            q = effnb.quantize(dense, method=method, group_size=64, measure=False).model
            row(f"dense {method}-g64", q, time.perf_counter() - t0)
            del q
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "environment": environment("cpu"), "results": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--tokens", default="1,16,128,512,2048")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shape, 1 round: run every variant once (with TRITON_INTERPRET=1 the Triton kernel too)")
    ap.add_argument("--quantized", action="store_true", help="memory/quality of quantized experts on SmolLM2")
    ap.add_argument("--quant-methods", default="int8,int4,nf4")
    ap.add_argument("--quant-top-k", type=int, default=8)
    ap.add_argument("--quant-tokens", type=int, default=1024)
    ap.add_argument("--no-quant-dense", dest="quant_dense", action="store_false",
                    help="skip the dense model quantized alike")
    args = ap.parse_args(argv)
    if args.quantized:
        return quantized_experts(args)
    if args.dry_run:  # every variant once on a tiny shape: checks the code paths, times nothing worth reading
        args.shape, args.tokens, args.rounds = "tiny", "1,24", 1
    import torch
    from effnb.kernels.ops import supports

    from effnb.experts import block as B
    from effnb.measure.env import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    block, dense = build(args.shape, args.top_k, dtype, args.device)
    hf = transformers_experts(block)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def moe_with(fn):
        def run(x):
            logits = block.router(x)
            weights, index = B.route(logits, block.top_k, block.combine)
            return fn(x, index, weights)
        return run

    grouped = moe_with(lambda x, i, w: B.moe_ffn(x, i, w, block.w_in, block.w_out, None, block.act, True))

    def forced(backend: str):
        def fn(x, i, w):
            old = B.set_grouped_backend(backend)  # same sorted layout, backend forced
            try:
                return B.moe_ffn(x, i, w, block.w_in, block.w_out, None, block.act, True)
            finally:
                B.set_grouped_backend(old)
        return fn

    variants = {"effnb": grouped}
    probe = block.w_in.new_zeros(1, block.hidden)
    if supports("triton", x=probe, w=block.w_in) is None:  # CUDA, or the CPU under TRITON_INTERPRET=1 (--dry-run)
        variants["triton"] = moe_with(forced("triton"))
    variants.update({
        "grouped_mm": moe_with(forced("torch._grouped_mm")),
        "loop": moe_with(forced("per-expert loop")),
        "reference": moe_with(lambda x, i, w: B.moe_ffn_reference(x, i, w, block.w_in, block.w_out, None,
                                                                  block.act, True)),
        "transformers": moe_with(lambda x, i, w: hf(x, i, w)),
    })
    if dense is not None:
        variants = {"dense": dense, **variants}
    print(f"# MoE block, shape {args.shape} {SHAPES[args.shape]}, top-{args.top_k}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, effnb grouped matmul: "
          f"{B.grouped_backend(block.w_in.new_zeros(1, block.hidden), block.w_in)}")
    results = []
    base_name = "dense" if dense is not None else "effnb"
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, block.hidden, generator=torch.Generator().manual_seed(T)).to(args.device, dtype)
        samples = {n: [] for n in variants}
        with torch.inference_mode():
            ref = variants["effnb"](x)
            for name, fn in variants.items():  # warm-up and agreement check
                out = fn(x)
                if name != "dense":
                    err = (out - ref).abs().max().item()
                    assert err <= 1e-3 * max(1.0, ref.abs().max().item()), f"{name} differs by {err}"
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    sync()
                    t0 = time.perf_counter()
                    fn(x)
                    sync()
                    samples[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(s) * 1e3 for n, s in samples.items()}
        for n, ms in med.items():
            results.append({"tokens": T, "variant": n, "median_ms": ms, "vs_" + base_name: ms / med[base_name],
                            "samples_ms": [s * 1e3 for s in samples[n]]})
        print(f"T={T:5d}  " + "  ".join(f"{n} {ms:8.2f} ms ({ms / med[base_name]:.2f}x)" for n, ms in med.items()),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "environment": environment(args.device), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
