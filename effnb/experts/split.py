"""MoEfication: split each dense FFN's intermediate neurons into equal-sized experts, with a router.

A dense FFN is a sum over its intermediate neurons: ``y = sum_i d_i * a_i(x)``. Partitioning the
neurons into E groups writes it exactly as a sum of E smaller FFNs ("experts"); running only the
top_k groups a router picks for each token skips the rest. With top_k == E nothing is skipped and
the output is the dense one (up to float summation order).

Neuron clustering (balanced k-means, ``balanced_kmeans``):

- ``activations`` (default): each neuron is described by the magnitudes of its activation
  ``|a_i(t)|`` over calibration tokens, L2-normalised; neurons that fire on the same tokens land in
  the same expert (MoEfication's co-activation idea), so a token's active neurons concentrate in few
  experts.
- ``weights``: each neuron is described by its input weight rows (gate and up rows for SwiGLU),
  L2-normalised (MoEfication's parameter clustering); needs no data.

Balanced k-means: k-means++ seeding, then rounds of (assign under equal capacity, recompute
centroids). The capacity-constrained assignment lets every neuron bid for its most similar cluster
that still has room; an over-subscribed cluster keeps the neurons most similar to it and the rest
bid again (at most E rounds), so every expert gets exactly I / E neurons.

Routers (a Linear(H, E) whose top_k logits pick the experts):

- ``calibration`` (default): least-squares fit (ridge 1e-3 * mean diagonal) of each expert's output
  norm ``||W_down[:, e] a_e(x)||`` from the FFN input x over calibration tokens;
- ``weights``: expert e scores ``x . c_e`` with ``c_e`` the mean gate (plain: input) row of its
  neurons, each weighted by its down-projection column norm; no data, cruder.
"""

from __future__ import annotations

import math

import torch

from .block import MoEFFN
from .ffn import DenseFFN

# --------------------------------------------------------------------------- balanced k-means


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign N items to C clusters of exactly ``capacity`` each, preferring high ``sim`` [N, C]."""
    N, C = sim.shape
    labels = torch.full((N,), -1, dtype=torch.long)
    room = torch.full((C,), capacity, dtype=torch.long)
    free = torch.ones(N, dtype=torch.bool)
    for _ in range(C + 1):
        if not free.any():
            break
        rows = free.nonzero().squeeze(-1)
        s = sim[rows].clone()
        s[:, room == 0] = -math.inf
        best = s.argmax(1)
        best_sim = s.gather(1, best[:, None]).squeeze(1)
        for c in range(C):
            bidders = rows[best == c]
            if bidders.numel() == 0:
                continue
            keep = bidders[best_sim[best == c].argsort(descending=True)[: int(room[c])]]
            labels[keep] = c
            free[keep] = False
            room[c] -= keep.numel()
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, *, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Labels [N] putting exactly N / clusters rows of ``features`` [N, D] in each cluster (cosine k-means)."""
    N = features.shape[0]
    if N % clusters:
        raise ValueError(f"{N} items cannot be split into {clusters} equal clusters")
    f = torch.nn.functional.normalize(features.float(), dim=1)
    if clusters == 1:
        return torch.zeros(N, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    centers = [int(torch.randint(N, (1,), generator=gen))]
    dist = 1 - f @ f[centers[0]]
    for _ in range(clusters - 1):  # k-means++: far-away neurons are likelier seeds
        p = dist.clamp(min=0) ** 2
        nxt = int(torch.multinomial(p / p.sum() if p.sum() > 0 else torch.ones(N) / N, 1, generator=gen))
        centers.append(nxt)
        dist = torch.minimum(dist, 1 - f @ f[nxt])
    c = f[centers].clone()
    labels = torch.zeros(N, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(f @ c.T, N // clusters)
        if torch.equal(new, labels):
            break
        labels = new
        # cluster sums as a one-hot matmul (index_add_ on the CPU is many times slower)
        onehot = torch.nn.functional.one_hot(labels, clusters).to(f.dtype)  # [N, C]
        c = torch.nn.functional.normalize(onehot.T @ f, dim=1)
    return labels


# --------------------------------------------------------------------------- calibration


def neuron_features(spec: DenseFFN, clustering: str, x: torch.Tensor | None) -> torch.Tensor:
    """What each of the FFN's I neurons is clustered by: [I, D]."""
    if clustering == "weights":
        rows = [torch.nn.functional.normalize(spec.w_up.float(), dim=1)]
        if spec.gated:
            rows.insert(0, torch.nn.functional.normalize(spec.w_gate.float(), dim=1))
        return torch.cat(rows, dim=1)
    if x is None:
        raise ValueError("clustering='activations' needs calibration inputs")
    with torch.no_grad():
        return spec.activation(x).abs().T.float()  # [I, T]


def fit_router(spec: DenseFFN, labels: torch.Tensor, experts: int, how: str, x: torch.Tensor | None):
    """Router weight [E, H] and bias [E] (or None) for the experts ``labels`` defines."""
    w_down = spec.w_down.float()  # [H, I]
    if how == "weights":
        w_in = (spec.w_gate if spec.gated else spec.w_up).float()  # [I, H]
        scale = w_down.norm(dim=0, keepdim=True).T  # [I, 1]
        onehot = torch.nn.functional.one_hot(labels, experts).to(w_in.dtype)  # [I, E]
        centers = onehot.T @ (w_in * scale)  # [E, H]
        return centers / torch.bincount(labels, minlength=experts).clamp(min=1)[:, None].float(), None
    if x is None:
        raise ValueError("router='calibration' needs calibration inputs")
    with torch.no_grad():
        xf = x.float()
        a = spec.activation(x).float()  # [T, I]
        target = torch.stack([(a[:, labels == e] @ w_down[:, labels == e].T).norm(dim=1)
                              for e in range(experts)], dim=1)  # [T, E]
        xb = torch.cat([xf, torch.ones(xf.shape[0], 1)], dim=1)  # [T, H+1]
        gram = xb.T @ xb
        gram += 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0])
        theta = torch.linalg.solve(gram.double(), (xb.T @ target).double()).float()  # [H+1, E]
    return theta[:-1].T.contiguous(), theta[-1].contiguous()


# --------------------------------------------------------------------------- building blocks


def split_ffn(spec: DenseFFN, experts: int, top_k: int, *, clustering: str, router: str, x: torch.Tensor | None,
              seed: int = 0, aux_loss_coef: float = 0.01) -> tuple[MoEFFN, torch.Tensor]:
    """An MoE block equal to ``spec`` at top_k == experts, and the neuron labels [I] it used."""
    inter = spec.intermediate
    if inter % experts:
        divisors = [d for d in range(2, min(inter, 128) + 1) if inter % d == 0]
        raise ValueError(f"experts={experts} does not divide the FFN size {inter} of {spec.name or 'the FFN'}; "
                         f"split needs equal experts: choose one of {', '.join(map(str, divisors[:16]))}")
    labels = balanced_kmeans(neuron_features(spec, clustering, x), experts, seed=seed)
    ie = inter // experts
    w = spec.w_up
    block = MoEFFN(spec.hidden, ie, experts, top_k, spec.act, gated=spec.gated, in_bias=spec.b_up is not None,
                   out_bias=spec.b_down is not None, router_bias=router == "calibration", combine="sum",
                   aux_loss_coef=aux_loss_coef, dtype=w.dtype, device=w.device)
    r_w, r_b = fit_router(spec, labels, experts, router, x)
    with torch.no_grad():
        block.router.weight.copy_(r_w)
        if r_b is not None:
            block.router.bias.copy_(r_b)
        for e in range(experts):
            idx = (labels == e).nonzero().squeeze(-1).to(w.device)  # [Ie] neurons of expert e
            rows = [spec.w_gate[idx], spec.w_up[idx]] if spec.gated else [spec.w_up[idx]]
            block.w_in[e].copy_(torch.cat(rows, 0).T)  # [H, n_in*Ie]
            block.w_out[e].copy_(spec.w_down[:, idx].T)  # [Ie, H]
            if block.b_in is not None:
                b = [spec.b_gate[idx], spec.b_up[idx]] if spec.gated else [spec.b_up[idx]]
                block.b_in[e].copy_(torch.cat(b))
        if block.b_out is not None:
            block.b_out.copy_(spec.b_down)
    return block, labels
