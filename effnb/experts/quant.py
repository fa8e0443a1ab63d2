"""Quantized experts: ``effnb.quantize`` on a model with effnb MoE blocks quantizes every expert.

A ``MoEFFN`` keeps its experts as two 3-D parameters (``w_in`` [E, H, n_in*Ie], ``w_out``
[E, Ie, H]), which ``effnb.quantize``'s Linear-layer walk does not see. Its hook
(``prepare_moe``) hands the MoE blocks to this module, which:

* keeps each block's router in full precision (an [E, H] matrix, a tiny share of the weights,
  and the top-k choice is sensitive to it; AutoAWQ/llm-compressor also leave MoE gates unquantized);
* quantizes each expert's input matrix (gate|up, [n_in*Ie, H]) and output matrix ([H, Ie]) as
  its own layer with effnb.quantize's own per-layer code (same formats, methods, backends,
  per-layer SNR and byte counts in the report);
* swaps the block for a ``QuantMoEFFN``: same routing, tokens sorted by expert, and per expert
  ``out_e(act(in_e(x_e)))`` with the quantized layers (the fused CPU kernel or the reference).

Memory: the experts are the bulk of an MoE model, so this is where quantization pays most
("compound saving": an 8-expert MoE stores ~8x the FFN weights of the dense model it came from;
int4/nf4 stores each at about 1/7 of fp32).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from .block import MoEFFN, _activate, moe_blocks, permute, unpermute_combine


class QuantMoEFFN(MoEFFN):
    """An effnb MoE block whose experts are per-expert (quantized) linear layers.

    ``experts_in[e]``: x [n, H] -> [n, n_in*Ie] (gate | up for SwiGLU, with the input bias);
    ``experts_out[e]``: [n, Ie] -> [n, H]. Either may be a quantized layer or a plain
    ``nn.Linear`` (a matrix left out by include/exclude). Routing, statistics, ``aux_loss`` and
    ``set_top_k`` work as on ``MoEFFN``.
    """

    def __init__(self, block: MoEFFN, experts_in: list[nn.Module], experts_out: list[nn.Module]):
        nn.Module.__init__(self)  # no 3-D expert parameters: the per-expert layers hold the weights
        self.hidden, self.expert_size, self.experts, self.top_k = (block.hidden, block.expert_size, block.experts,
                                                                  block.top_k)
        self.gated, self.combine, self.aux_loss_coef, self.act = block.gated, block.combine, block.aux_loss_coef, block.act
        self.router = block.router
        self.experts_in = nn.ModuleList(experts_in)
        self.experts_out = nn.ModuleList(experts_out)
        self.b_out = block.b_out
        self.b_in = self.w_in = self.w_out = None
        self.last_router_logits = self.last_expert_index = None
        self.reference = False

    def active_parameters(self) -> int:
        n_in = 2 if self.gated else 1
        per_expert = self.hidden * self.expert_size * (n_in + 1)
        in_bias = getattr(self.experts_in[0], "bias", None)
        per_expert += in_bias.numel() if in_bias is not None else 0
        router = sum(p.numel() for p in self.router.parameters())
        return router + self.top_k * per_expert + (self.b_out.numel() if self.b_out is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, H]
        weights, index = self._route(x2)
        T, k = index.shape
        order, token, counts = permute(index, self.experts)
        xs = x2.index_select(0, token)  # [T*k, H] sorted by expert
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                h = self.experts_in[e](xs[start:start + n])
                outs.append(self.experts_out[e](_activate(h, self.act, self.gated, self.expert_size)))
                start += n
        ys = torch.cat(outs)
        return self._finish(unpermute_combine(ys.to(x2.dtype), order, weights, T, k), shape)


def _expert_linear(w_kn: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight is a read-only VIEW of one expert's [K, N] matrix (no copy)."""
    k, n = w_kn.shape
    lin = nn.Linear(k, n, bias=False, device="meta")
    lin.weight = nn.Parameter(w_kn.detach().t(), requires_grad=False)  # [N, K] view
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _selected(name: str, cfg) -> bool:
    if cfg.include and not any(fnmatch.fnmatch(name, p) for p in cfg.include):
        return False
    return not (cfg.exclude and any(fnmatch.fnmatch(name, p) for p in cfg.exclude))


def _dense_copy(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype,
                    device=lin.weight.device)
    with torch.no_grad():
        out.weight.copy_(lin.weight)
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    out.requires_grad_(False)
    return out


def prepare_moe(model, targets: dict, cfg):
    """``effnb.quantize``'s hook. Returns (targets without the MoE routers, finish).

    ``finish(qmodel) -> list of per-layer stats`` swaps every MoE block of ``qmodel`` (the copy,
    or the model itself with ``inplace=True``) for a ``QuantMoEFFN`` built from ``model``'s
    block; the expert matrices are named ``<block>.w_in`` / ``<block>.w_out`` for include/exclude
    and ``<block>.experts.<e>.w_in`` / ``.w_out`` in the per-layer statistics.
    """
    blocks = [(n, b) for n, b in moe_blocks(model) if not isinstance(b, QuantMoEFFN)]
    if not blocks:
        return targets, lambda qmodel: []
    routers = {f"{n}.router" if n else "router" for n, _ in blocks}
    targets = {k: v for k, v in targets.items() if k not in routers}
    plan = []  # (block name, block, quantize w_in?, quantize w_out?)
    for n, b in blocks:
        q_in, q_out = _selected(f"{n}.w_in", cfg), _selected(f"{n}.w_out", cfg)
        if not (q_in or q_out):
            continue
        if cfg.method == "gptq":
            raise ValueError(f"gptq cannot quantize the MoE experts of {n!r} (it needs per-expert calibration "
                             "Hessians); use method 'hqq', 'int4', 'int8' or 'nf4', or exclude=['*.w_in', '*.w_out']")
        if cfg.method not in ("nf4", "fp4", "llm.int8") and cfg.group_size:
            for what, k, ok in (("w_in", b.hidden, q_in), ("w_out", b.expert_size, q_out)):
                if ok and k % cfg.group_size:
                    from ..quant.config import GROUP_SIZES

                    good = [g for g in GROUP_SIZES if k % g == 0]
                    hint = f"group sizes that divide it: {', '.join(map(str, good))}" if good else "no group size divides it"
                    raise ValueError(f"group_size={cfg.group_size} does not divide the experts' {what} of {n!r} "
                                     f"(in_features={k}); {hint}; or exclude '{n}.{what}'")
        plan.append((n, b, q_in, q_out))

    def finish(qmodel) -> list[dict]:
        from ..quant.api import _quantize_layer

        stats, new_blocks = [], {}
        for n, b, q_in, q_out in plan:
            ins, outs = [], []
            for e in range(b.experts):
                lin_in = _expert_linear(b.w_in[e], b.b_in[e] if b.b_in is not None else None)
                lin_out = _expert_linear(b.w_out[e], None)
                for lin, ok, dst, what in ((lin_in, q_in, ins, "w_in"), (lin_out, q_out, outs, "w_out")):
                    if ok:
                        new, st = _quantize_layer(f"{n}.experts.{e}.{what}", lin, cfg, None)
                        stats.append(st)
                    else:
                        new = _dense_copy(lin)
                    dst.append(new)
            target = qmodel.get_submodule(n) if n else qmodel
            new_blocks[n] = QuantMoEFFN(target, ins, outs)
        for n, new in new_blocks.items():
            parent_name, _, child = n.rpartition(".")
            setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, child, new)
        return stats

    return targets, finish
