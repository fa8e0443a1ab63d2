"""How a dense FFN becomes experts: one registry entry per ``effnb.moe`` method (no torch import here).

    get_method("split").routers        # ("calibration", "weights"): the first is what router="auto" means
    get_method("upcycle").build(spec, cfg, index, x)   # one MoE block for one dense FFN

split    partition each FFN's neurons into equal expert groups (MoEfication): experts must divide the
         FFN size; the neurons are clustered (by co-activation or by weight vectors) and the router
         is fitted on calibration activations or built from the weights
upcycle  copy each FFN into every expert behind a new random router (sparse upcycling); equal to
         the dense model at initialisation

``effnb.moe`` and ``MoEConfig`` ask this table instead of testing method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..options import check_choice


@dataclass(frozen=True)
class ExpertMethod:
    """``routers``: the routers the method takes (first: the default); ``equal_experts``: experts are
    equal slices of the FFN, so their number must divide its size; ``clustering``: the method groups
    neurons (``MoEConfig.clustering`` applies); ``needs_inputs(cfg)``: whether it needs the FFNs'
    calibration inputs; ``build(spec, cfg, index, x)``: the MoE block of one FFN (``x``: its inputs or None)."""

    name: str
    routers: tuple[str, ...]
    equal_experts: bool
    clustering: bool
    needs_inputs: Callable
    build: Callable


def _split(spec, cfg, index: int, x):
    from .split import split_ffn

    block, _ = split_ffn(spec, cfg.experts, cfg.top_k, clustering=cfg.clustering, router=cfg.router, x=x,
                         seed=cfg.seed + index, aux_loss_coef=cfg.aux_loss_coef)
    return block


def _upcycle(spec, cfg, index: int, x):
    from .upcycle import upcycle_ffn

    return upcycle_ffn(spec, cfg.experts, cfg.top_k, router_std=cfg.router_std, expert_noise=cfg.expert_noise,
                       seed=cfg.seed + index, aux_loss_coef=cfg.aux_loss_coef)


def _split_needs_inputs(cfg) -> bool:
    return cfg.router == "calibration" or cfg.clustering == "activations"


METHODS: dict[str, ExpertMethod] = {m.name: m for m in (
    ExpertMethod("split", ("calibration", "weights"), equal_experts=True, clustering=True,
                 needs_inputs=_split_needs_inputs, build=_split),
    ExpertMethod("upcycle", ("random",), equal_experts=False, clustering=False,
                 needs_inputs=lambda cfg: False, build=_upcycle),
)}


def get_method(name: str) -> ExpertMethod:
    """The registry entry of ``name``; ValueError naming the methods (and the closest) otherwise."""
    return METHODS[check_choice("method", name, tuple(METHODS))]
