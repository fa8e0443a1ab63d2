"""The MoE block: route, sort tokens by expert, grouped matmuls, un-permute and combine.

``MoEFFN`` replaces one dense FFN of a model. Its experts are stored as 3-D tensors so one grouped
matmul (``torch._grouped_mm``) runs every expert's slice of the work in one call:

    x [T, H] --router--> logits [T, E] --top-k--> expert index [T, k], combine weight [T, k]
    sort the T*k (token, expert) assignments by expert; gather xs = x[token]           [T*k, H]
    h  = grouped_mm(xs, w_in, offsets)      one [n_e, H] @ [H, n_in*Ie] product per expert
    a  = act(gate) * up  (SwiGLU)  or  act(h)  (plain)                                   [T*k, Ie]
    ys = grouped_mm(a, w_out, offsets)      one [n_e, Ie] @ [Ie, H] product per expert  [T*k, H]
    out[token] += weight * ys               (index_add: un-permute and combine)          [T, H]

Only the selected expert slices are multiplied: at top-2 of 8 experts the matmul work is a quarter
of the dense FFN's. ``moe_ffn_reference`` is the plain per-expert-mask version the fast path is
tested against. On the CPU, and where ``torch._grouped_mm`` cannot run a case (dtype, alignment),
the same sorted layout is processed by one matmul per non-empty expert (measured faster than the
CPU ``_grouped_mm``). On CUDA without ``_grouped_mm`` support (fp16, pre-sm90), inference runs
effnb's Triton grouped GEMM (``effnb.kernels.ops.grouped_mm``). ``grouped_backend()`` says which
runs; ``set_grouped_backend()`` forces one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..kernels.ops import GROUPED_PATHS, grouped_mm, grouped_path, supports

log = logging.getLogger(__name__)

COMBINES = ("sum", "softmax")


# --------------------------------------------------------------------------- routing


def route(logits: torch.Tensor, top_k: int, combine: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Top-k routing. Returns (combine weights [T, k] or None for plain sums, expert index [T, k]).

    ``sum`` (MoEfication): the experts partition one FFN, so the selected outputs are added with
    weight 1 and ``top_k == experts`` is exactly the dense FFN. ``softmax`` (Mixtral, upcycling):
    softmax over all experts, keep the top k, renormalise so the weights sum to 1.
    """
    if combine == "sum":
        return None, logits.topk(top_k, dim=-1).indices
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    return (top / top.sum(-1, keepdim=True)).to(logits.dtype), idx


def switch_aux_loss(logits: torch.Tensor, expert_index: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, as transformers computes it for Mixtral.

    ``E * sum_e f_e * P_e`` with ``f_e`` = assignments to expert e per token (sums to top_k) and
    ``P_e`` = mean router probability of e. Perfect balance with uniform probabilities gives top_k.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    counts = torch.bincount(expert_index.reshape(-1), minlength=experts).to(probs.dtype)  # [E]
    return experts * (counts / logits.shape[0] * probs.mean(0)).sum()


# --------------------------------------------------------------------------- grouped matmul


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``_grouped_mm``'s backward needs one)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


BACKENDS = ("auto", *GROUPED_PATHS)
_backend = {"name": "auto"}
_backend_logged: set[str] = set()


def set_grouped_backend(name: str) -> str:
    """Force the grouped matmul of every effnb MoE block ('auto' restores the default). Returns the previous one.

    'auto': ``torch._grouped_mm`` where it runs (CUDA bf16, sm90+), else effnb's Triton kernel on
    CUDA (inference only), else one matmul per expert. Which of the two GPU kernels is faster has
    not been measured yet (no GPU was available): compare with ``benchmarks/moe.py --device cuda``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown grouped matmul backend {name!r}; choose one of {', '.join(BACKENDS)}")
    old, _backend["name"] = _backend["name"], name
    return old


def grouped_backend(x: torch.Tensor, w: torch.Tensor, needs_grad: bool = False) -> str:
    """Which grouped matmul runs for these operands: 'torch._grouped_mm', 'triton' or 'per-expert loop'
    (``effnb.kernels.ops`` decides what can run; a backend forced by ``set_grouped_backend`` is checked)."""
    forced = _backend["name"]
    if forced == "auto":
        name = grouped_path(x, w, needs_grad)
    else:
        if supports(forced, x=x, w=w, needs_grad=needs_grad) is not None:
            raise ValueError(f"grouped matmul backend {forced!r} cannot run {x.device.type} {x.dtype}"
                             + (" with gradients" if needs_grad else "") + "; use set_grouped_backend('auto')")
        name = forced
    key = f"{name}:{x.device.type}:{x.dtype}"
    if key not in _backend_logged:
        _backend_logged.add(key)
        log.info("MoE grouped matmul on %s %s: %s", x.device.type, x.dtype, name)
    return name


def grouped_matmul(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_list: list[int] | None = None,
                   backend: str | None = None):
    """Rows of ``xs`` [N, K] sorted by expert (``counts`` [E] rows each) times ``w[e]`` [K, M] -> [N, M]."""
    needs_grad = torch.is_grad_enabled() and (xs.requires_grad or w.requires_grad)
    backend = backend or grouped_backend(xs, w, needs_grad)
    if backend == "torch._grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)
        if needs_grad:
            return _ContiguousGrad.apply(torch._grouped_mm(xs, w, offs=offs))
        return torch._grouped_mm(xs, w, offs=offs)
    if backend == "triton":
        return grouped_mm(xs, w, counts.cumsum(0).to(torch.int32))
    counts_list = counts.tolist() if counts_list is None else counts_list
    outs, start = [], 0
    for e, n in enumerate(counts_list):
        if n:
            outs.append(xs[start : start + n] @ w[e])
            start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[-1])


def _register_grouped_mm_flops() -> None:
    """Teach torch's FlopCounterMode the cost of ``_grouped_mm`` (it counts it as zero otherwise)."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:  # pragma: no cover - older torch
        return
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # 2-D [N, K] x 3-D [E, K, M] with offsets: every row meets one expert's [K, M]
        if len(a_shape) == 2 and len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if out_shape is not None:  # other layouts: 2 * output elements * reduction size
            n = 1
            for s in out_shape:
                n *= s
            return 2 * n * a_shape[-1]
        return 0


_register_grouped_mm_flops()


# --------------------------------------------------------------------------- the FFN over experts


def activate(h: torch.Tensor, act, gated: bool, expert_size: int) -> torch.Tensor:
    if gated:
        return act(h[:, :expert_size]) * h[:, expert_size:]
    return act(h)


def moe_ffn(x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor | None, w_in: torch.Tensor,
            w_out: torch.Tensor, b_in: torch.Tensor | None, act, gated: bool) -> torch.Tensor:
    """Experts' FFN over routed tokens (sorted, grouped matmuls). Bias of the output is not added here.

    x [T, H]; expert_index [T, k]; weights [T, k] or None (weight 1); w_in [E, H, n_in*Ie] with
    n_in = 2 (gate | up) for SwiGLU; w_out [E, Ie, H]; b_in [E, n_in*Ie] or None. Returns [T, H].
    """
    T, k = expert_index.shape
    E, _, n_in_ie = w_in.shape
    ie = w_out.shape[1]
    if k == E:  # every token meets every expert: batched matmuls, no sorting
        h = torch.matmul(x.unsqueeze(0), w_in)  # [E, T, n_in*Ie]
        if b_in is not None:
            h = h + b_in.unsqueeze(1)
        a = act(h[..., :ie]) * h[..., ie:] if gated else act(h)  # [E, T, Ie]
        if weights is not None:  # weight of expert e for token t sits where index == e
            w_te = torch.zeros(T, E, dtype=a.dtype, device=a.device).scatter(1, expert_index, weights.to(a.dtype))
            a = a * w_te.t().unsqueeze(-1)
        return a.transpose(0, 1).reshape(T, E * ie) @ w_out.reshape(E * ie, -1)  # [T, H]
    order, token, counts = permute(expert_index, E)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad)
    backend = grouped_backend(x, w_in, needs_grad)
    if backend == "torch._grouped_mm" and _backend["name"] == "auto" and w_out.shape[1] % 8:
        # the second product reads activations [rows, Ie]: torch._grouped_mm needs 16-byte rows there too
        backend = "triton" if supports("triton", x=x, w=w_out, needs_grad=needs_grad) is None else "per-expert loop"
    counts_list = counts.tolist() if backend == "per-expert loop" else None
    xs = x.index_select(0, token)  # [T*k, H]
    h = grouped_matmul(xs, w_in, counts, counts_list, backend)  # [T*k, n_in*Ie]
    if b_in is not None:
        h = h + b_in.repeat_interleave(counts, dim=0, output_size=T * k)
    ys = grouped_matmul(activate(h, act, gated, ie), w_out, counts, counts_list, backend)  # [T*k, H]
    return unpermute_combine(ys, order, weights, T, k)


def permute(expert_index: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k (token, expert) assignments by expert.

    Returns (order [T*k]: flat assignment index of each sorted row, token [T*k]: its token,
    counts [E]: rows per expert). ``x.index_select(0, token)`` is the permuted input.
    """
    k = expert_index.shape[1]
    flat = expert_index.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # assignments sorted by expert
    return order, order // k, torch.bincount(flat, minlength=experts)


def unpermute_combine(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, T: int, k: int):
    """Rows ``ys`` [T*k, H] in expert order back to token order, combined over the k experts -> [T, H]."""
    # un-permute with a gather (index_add_/scatter on the CPU is many times slower), then combine the k
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = ys.index_select(0, inverse).view(T, k, -1)  # [T, k, H]
    if weights is None:
        return y.sum(1) if k > 1 else y[:, 0]
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # [T, 1, k] @ [T, k, H]


def moe_ffn_reference(x, expert_index, weights, w_in, w_out, b_in, act, gated: bool) -> torch.Tensor:
    """Plain reference: for each expert, a mask over tokens, its FFN slice, a weighted add. [T, H]."""
    E = w_in.shape[0]
    ie = w_out.shape[1]
    out = torch.zeros(x.shape[0], w_out.shape[-1], dtype=x.dtype, device=x.device)
    for e in range(E):
        hit = expert_index == e  # [T, k]
        rows = hit.any(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        h = x[rows] @ w_in[e] + (b_in[e] if b_in is not None else 0)
        y = activate(h, act, gated, ie) @ w_out[e]
        if weights is not None:
            y = y * (weights[rows] * hit[rows]).sum(-1, keepdim=True)
        out[rows] += y
    return out


class MoEFFN(nn.Module):
    """A Mixture-of-Experts FFN that stands in for one dense FFN block.

    ``combine='sum'``: experts are slices of one dense FFN (MoEfication); ``'softmax'``: experts are
    full FFNs mixed with renormalised router probabilities (upcycling, Mixtral). After each forward
    ``last_router_logits`` [T, E] and ``last_expert_index`` [T, k] hold the routing (with their
    autograd graph), which ``aux_loss`` and the routing statistics read.
    """

    def __init__(self, hidden: int, expert_size: int, experts: int, top_k: int, act, *, gated: bool,
                 in_bias: bool = False, out_bias: bool = False, router_bias: bool = False, combine: str = "sum",
                 aux_loss_coef: float = 0.01, dtype=None, device=None):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be from 1 to experts={experts}, got {top_k}")
        kw = {"dtype": dtype, "device": device}
        n_in = 2 if gated else 1
        self.hidden, self.expert_size, self.experts, self.top_k = hidden, expert_size, experts, top_k
        self.gated, self.combine, self.aux_loss_coef = gated, combine, aux_loss_coef
        self.act = act
        self.router = nn.Linear(hidden, experts, bias=router_bias, **kw)
        self.w_in = nn.Parameter(torch.empty(experts, hidden, n_in * expert_size, **kw))  # [E, H, (gate|up) Ie]
        self.b_in = nn.Parameter(torch.zeros(experts, n_in * expert_size, **kw)) if in_bias else None
        self.w_out = nn.Parameter(torch.empty(experts, expert_size, hidden, **kw))  # [E, Ie, H]
        self.b_out = nn.Parameter(torch.zeros(hidden, **kw)) if out_bias else None
        self.last_router_logits: torch.Tensor | None = None
        self.last_expert_index: torch.Tensor | None = None
        self.reference = False  # True: run moe_ffn_reference (for tests and comparisons)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, experts={self.experts}, expert_size={self.expert_size}, top_k={self.top_k}, "
                f"gated={self.gated}, combine={self.combine!r}")

    def active_parameters(self) -> int:
        """Parameters one token uses: router plus top_k experts (and the shared output bias)."""
        per_expert = self.w_in[0].numel() + self.w_out[0].numel() + (self.b_in[0].numel() if self.b_in is not None else 0)
        router = sum(p.numel() for p in self.router.parameters())
        return router + self.top_k * per_expert + (self.b_out.numel() if self.b_out is not None else 0)

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of the router and the top_k experts' matmuls for one token."""
        n_in = 2 if self.gated else 1
        return 2 * self.hidden * self.experts + 2 * self.top_k * self.hidden * self.expert_size * (n_in + 1)

    def _route(self, x2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Route tokens [T, H]; keeps the router logits and expert indices for aux_loss and moe_stats."""
        logits = self.router(x2)  # [T, E]
        weights, index = route(logits, self.top_k, self.combine)
        self.last_router_logits, self.last_expert_index = logits, index
        return weights, index

    def effnb_aux_loss(self) -> torch.Tensor:
        """This block's load-balancing loss of the last forward, ``aux_loss_coef * switch_aux_loss``.

        Trainers find it by this name (duck typing), without importing ``effnb.experts``."""
        if self.last_router_logits is None:
            raise ValueError("aux_loss: run a forward pass first; it reads the routing of the last forward")
        return self.aux_loss_coef * switch_aux_loss(self.last_router_logits, self.last_expert_index, self.experts)

    def expert_matrices(self) -> dict[str, int]:
        """The per-expert matrices a quantizer may replace, with their input size: {"w_in": H, "w_out": Ie}."""
        return {"w_in": self.hidden, "w_out": self.expert_size}

    def quantize_experts(self, quantize_layer, which) -> nn.Module:
        """A new block (with this one's router) whose experts' matrices named in ``which`` are ``quantize_layer(name, linear)``
        (``name`` like ``"experts.3.w_in"``); the router stays in full precision. See ``effnb.experts.quant``."""
        from .quant import quantize_experts

        return quantize_experts(self, quantize_layer, which)

    def _finish(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(*shape[:-1], y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, H]
        weights, index = self._route(x2)
        fn = moe_ffn_reference if self.reference else moe_ffn
        y = fn(x2, index, weights, self.w_in, self.w_out, self.b_in, self.act, self.gated)
        return self._finish(y, shape)


def moe_blocks(model) -> list[tuple[str, MoEFFN]]:
    """The effnb MoE blocks in ``model``, with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def aux_loss(model) -> torch.Tensor:
    """Load-balancing loss of the last forward, to add to the training loss.

    ``coef * mean over MoE blocks of switch_aux_loss`` (coef: ``aux_loss_coef`` of ``effnb.moe``).
    Use it as ``loss = model(**batch).loss + effnb.experts.aux_loss(model)``; it keeps the router's
    autograd graph, so it trains the routers toward balanced loads.
    """
    blocks = [m for _, m in moe_blocks(model)]
    if not blocks:
        raise ValueError("aux_loss: the model has no effnb MoE blocks (make one with effnb.moe)")
    return torch.stack([m.effnb_aux_loss() for m in blocks]).mean()
