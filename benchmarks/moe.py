"""MoE block time: effnb's block vs a per-expert loop vs transformers' Mixtral experts vs the dense FFN.

    python benchmarks/moe.py                       # CPU: SmolLM2-sized FFN (hidden 576, FFN 1536), 8 experts, top-2
    python benchmarks/moe.py --tokens 1,64,512,2048 --rounds 9 --json moe.json
    python benchmarks/moe.py --shape mixtral --device cuda --dtype bfloat16   # hidden 4096, FFN 14336 (GPU only)

Shapes: ``smollm2`` splits one SwiGLU FFN of hidden 576 and FFN size 1536 into 8 experts of 192
neurons (MoEfication, as ``effnb.moe(method="split")`` does), so the dense FFN and the MoE at top-8
compute the same thing; ``mixtral`` is 8 full experts of FFN size 14336 (4096 hidden) and has no
dense twin. Variants, timed in one run, interleaved round by round (load from other processes hits
all alike), median over rounds after a warm-up:

- ``dense``: the dense FFN (``down(silu(gate x) * up x)``), smollm2 shape only;
- ``effnb``: ``MoEFFN``'s own dispatch (sort by expert, matmuls over the selected slices only, gather back;
  on the CPU one matmul per non-empty expert, on CUDA bf16 ``torch._grouped_mm``);
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

SHAPES = {"smollm2": (576, 1536, 8), "mixtral": (4096, 14336, 8)}


def build(shape: str, top_k: int, dtype, device):
    import torch
    from torch import nn

    from effnb.moe.block import MoEFFN

    hidden, ffn, experts = SHAPES[shape]
    expert_size = ffn // experts if shape == "smollm2" else ffn
    gen = torch.Generator().manual_seed(0)
    block = MoEFFN(hidden, expert_size, experts, top_k, nn.SiLU(), gated=True, combine="softmax")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * hidden ** -0.5)
    block = block.to(device=device, dtype=dtype).eval()
    dense = None
    if shape == "smollm2":  # the dense FFN whose neurons the experts partition
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
    args = ap.parse_args(argv)
    import torch

    from effnb.measure.env import environment
    from effnb.moe import block as B

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

    def forced(use_grouped_mm: bool):
        def fn(x, i, w):
            real = B._grouped_mm_supported
            B._grouped_mm_supported = lambda a, b: use_grouped_mm  # same sorted layout, backend forced
            try:
                return B.moe_ffn(x, i, w, block.w_in, block.w_out, None, block.act, True)
            finally:
                B._grouped_mm_supported = real
        return fn

    variants = {
        "effnb": grouped,
        "grouped_mm": moe_with(forced(True)),
        "loop": moe_with(forced(False)),
        "reference": moe_with(lambda x, i, w: B.moe_ffn_reference(x, i, w, block.w_in, block.w_out, None,
                                                                  block.act, True)),
        "transformers": moe_with(lambda x, i, w: hf(x, i, w)),
    }
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
