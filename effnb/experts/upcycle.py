"""Sparse upcycling: copy a dense FFN into E experts behind a new router.

Every expert starts as an exact copy of the dense FFN, and the router's top-k softmax weights are
renormalised to sum to 1, so at initialisation ``sum_e w_e FFN(x) = FFN(x)``: the upcycled model
computes what the dense one did (to float rounding), whatever the router says. Training then
specialises the experts; ``effnb.experts.aux_loss(model)`` is the load-balancing term to add to the loss
(Switch-Transformer form, weight ``aux_loss_coef``). ``expert_noise`` > 0 perturbs each copy
(relative Gaussian noise) to break the symmetry at the cost of exact equality.
"""

from __future__ import annotations

import torch

from .block import MoEFFN
from .ffn import DenseFFN


def upcycle_ffn(spec: DenseFFN, experts: int, top_k: int, *, router_std: float = 0.02, expert_noise: float = 0.0,
                seed: int = 0, aux_loss_coef: float = 0.01) -> MoEFFN:
    """An MoE block of ``experts`` copies of ``spec`` with a new router (normal, std ``router_std``)."""
    w = spec.w_up
    block = MoEFFN(spec.hidden, spec.intermediate, experts, top_k, spec.act, gated=spec.gated,
                   in_bias=spec.b_up is not None, out_bias=spec.b_down is not None, combine="softmax",
                   aux_loss_coef=aux_loss_coef, dtype=w.dtype, device=w.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=gen) * router_std)
        w_in = torch.cat([spec.w_gate, spec.w_up], 0).T if spec.gated else spec.w_up.T  # [H, n_in*I]
        b_in = None
        if block.b_in is not None:
            b_in = torch.cat([spec.b_gate, spec.b_up]) if spec.gated else spec.b_up
        for e in range(experts):
            block.w_in[e].copy_(w_in)
            block.w_out[e].copy_(spec.w_down.T)  # [I, H]
            if b_in is not None:
                block.b_in[e].copy_(b_in)
            if expert_noise > 0:
                for p in (block.w_in[e], block.w_out[e]):
                    p.mul_(1 + expert_noise * torch.randn(p.shape, generator=gen).to(p))
        if block.b_out is not None:
            block.b_out.copy_(spec.b_down)
    return block
