"""Quantized experts: ``effnb.quantize`` on a model with effnb MoE blocks quantizes every expert.

A ``MoEFFN`` keeps its experts as two 3-D parameters (``w_in`` [E, H, n_in*Ie], ``w_out``
[E, Ie, H]), which ``effnb.quantize``'s Linear-layer walk does not see. The block offers them
through two methods any technique may call without importing this package (duck typing):
``expert_matrices()`` (what may be quantized, with its input size) and
``quantize_experts(quantize_layer, which)``, which receives the quantizer as a callable, so this
package never imports ``effnb.quant``. ``quantize_experts`` (below):

* keeps each block's router in full precision (an [E, H] matrix, a tiny share of the weights,
  and the top-k choice is sensitive to it; AutoAWQ/llm-compressor also leave MoE gates unquantized);
* quantizes each expert's input matrix (gate|up, [n_in*Ie, H]) and output matrix ([H, Ie]) as
  its own layer with the per-layer quantizer it is given (effnb.quantize's: same formats,
  methods, backends, per-layer SNR and byte counts in the report);
* returns a ``QuantMoEFFN`` to put in the block's place: same routing, tokens sorted by expert, and per expert
  ``out_e(act(in_e(x_e)))`` with the quantized layers (the fused CPU kernel or the reference).

Memory: the experts are the bulk of an MoE model, so this is where quantization pays most
("compound saving": an 8-expert MoE stores ~8x the FFN weights of the dense model it came from;
int4/nf4 stores each at about 1/7 of fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from .block import MoEFFN, activate, permute, unpermute_combine


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

    # its experts are per-expert layers already: effnb.quantize sees them as ordinary Linear layers
    quantize_experts = None

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
                outs.append(self.experts_out[e](activate(h, self.act, self.gated, self.expert_size)))
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


def _dense_copy(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype,
                    device=lin.weight.device)
    with torch.no_grad():
        out.weight.copy_(lin.weight)
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    out.requires_grad_(False)
    return out


def quantize_experts(block: MoEFFN, quantize_layer, which) -> QuantMoEFFN:
    """``block`` as a ``QuantMoEFFN``: each expert's matrices named in ``which`` (``"w_in"``, ``"w_out"``)
    become ``quantize_layer(name, linear)`` with ``name`` like ``"experts.3.w_in"``; the others plain
    Linear copies. ``block``'s router, output bias and settings are taken over as they are."""
    ins, outs = [], []
    for e in range(block.experts):
        lin_in = _expert_linear(block.w_in[e], block.b_in[e] if block.b_in is not None else None)
        lin_out = _expert_linear(block.w_out[e], None)
        for lin, dst, what in ((lin_in, ins, "w_in"), (lin_out, outs, "w_out")):
            dst.append(quantize_layer(f"experts.{e}.{what}", lin) if what in which else _dense_copy(lin))
    return QuantMoEFFN(block, ins, outs)
