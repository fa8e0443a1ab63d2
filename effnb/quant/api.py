"""``effnb.quantize``: pick layers, quantize them with a method, swap them in, report before/after.

    res = effnb.quantize(model, method="nf4", group_size=64)
    res.model, res.report, res.details["layers"]

The input model is never changed unless ``inplace=True``: the run goes through
``effnb.technique.run_technique``, which hands this module a copy of the input (without the weights
about to be replaced); the new layers are built from read-only views of the input's weights and
only then swapped in (with ``inplace=True``, into the model itself, undoing the swaps if anything
interrupts them).

Blocks that keep their experts as 3-D parameters (effnb's MoE blocks) are quantized through a
duck-typed protocol, so this package needs no import of theirs: a module offering
``expert_matrices()`` ({name: in_features}) and ``quantize_experts(quantize_layer, which)`` gets
its selected expert matrices quantized by ``quantize_layer`` below, its own Linear layers (the
router) kept in full precision.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import time

from .config import GROUP_SIZES, QuantConfig
from .methods import get_method

log = logging.getLogger(__name__)


def quantize(model, method: str = "nf4", *, name: str | None = None, **options):
    """Quantize ``model``'s Linear layers; returns a Result (new model + before/after report).

    ``model``: an ``nn.Module``, an embedded name, a folder, or a hub id in the local cache. With
    ``save_to`` and a checkpoint folder (or cached hub id), the checkpoint is streamed tensor by
    tensor and never loaded whole (``effnb.quant.stream``). See ``QuantConfig`` for the options
    (method, bits, group_size, symmetric, double_quant, include/exclude, quantize_lm_head, backend,
    calibration..., inplace, measure, save_to).
    """
    cfg = QuantConfig.from_kwargs(method=method, name=name, **options)
    if isinstance(model, (str, os.PathLike)) and cfg.save_to is not None:
        from .stream import checkpoint_folder, quantize_checkpoint, refuse_writing_into

        refuse_writing_into(model, cfg.save_to)
        folder = checkpoint_folder(model)
        if folder is not None:
            return quantize_checkpoint(folder, cfg, name=name)
    from ..models import resolve_model

    model = resolve_model(model)
    res = quantize_module(model, cfg)
    if cfg.save_to is not None:
        from .serialize import save

        save(res.model, cfg.save_to)
    return res


def quantize_module(model, cfg: QuantConfig):
    """``effnb.quantize`` on a loaded module, through the technique runner."""
    from ..models import model_name
    from ..technique import run_technique
    from .report import quant_change

    t0 = time.perf_counter()
    base = cfg.name or model_name(model)
    targets = select_layers(model, cfg)
    experts = select_experts(model, cfg)
    owners = experts_owners(model)  # their own Linear layers (MoE routers) stay in full precision
    targets = {n: m for n, m in targets.items() if not _inside(n, owners)}

    def transform(work):
        new_layers, layer_stats, note = quantize_targets(model, targets, cfg)
        _swap(work, new_layers)
        layer_stats += _quantize_experts(work, experts, cfg)
        return quant_change(work, cfg, layer_stats, time.perf_counter() - t0, base, calibration=note)

    return run_technique(model, cfg, transform, base_name=base,
                         copy=lambda m: _copy_without(m, targets, share=cfg.share_unquantized))


def quantize_targets(model, targets: dict, cfg: QuantConfig) -> tuple[dict, list, str | None]:
    """({name: new layer}, [per-layer stats], how gptq calibrated or None); ``model`` is only read."""
    from ..torch_utils import trim_heap

    cache: dict = {}  # per call: concurrent calls share nothing
    try:
        if get_method(cfg.method).calibrated:
            return _gptq(model, targets, cfg, cache)
        new_layers, layer_stats = {}, []
        for i, (lname, module) in enumerate(targets.items(), start=1):
            new_layers[lname], stats = quantize_layer(lname, module, cfg, None, cache)
            layer_stats.append(stats)
            if i % 32 == 0:
                trim_heap()  # each layer frees a few layer-sized temporaries: keep the resident set near what is live
        return new_layers, layer_stats, None
    finally:
        cache.clear()
        trim_heap()


def _gptq(model, targets: dict, cfg: QuantConfig, cache: dict):
    """GPTQ: block by block where the model has decoder blocks, else the whole model at once.

    Returns ({name: new layer}, [stats], how it calibrated)."""
    from ..models import model_kind
    from . import calibrate

    def quantize_one(lname, module, hessian):
        return quantize_layer(lname, module, cfg, hessian, cache)

    if model_kind(model) == "module":
        batches, note = None, "the model's example inputs (not a language model)"
    else:
        batches, note = calibrate.calibration_batches(model, cfg)
    path = calibrate.find_blocks(model, targets)
    if path is not None:
        inputs = calibrate.capture_block_inputs(model, path, batches)
        new_layers, stats = calibrate.gptq_by_block(model, path, targets, inputs, quantize_one)
        log.info("gptq: calibrated block by block on %s", note)
        return new_layers, stats, note + ", block by block"
    hessians = calibrate.whole_model_hessians(model, targets, batches)
    new_layers, stats = {}, []
    for lname, module in targets.items():
        new_layers[lname], st = quantize_one(lname, module, hessians.pop(lname))
        stats.append(st)
    log.info("gptq: calibrated on %s, whole model", note)
    return new_layers, stats, note + ", whole model"


# ------------------------------------------------------------------------------ layer selection


def _quantized(m) -> bool:
    from ..torch_utils import is_quantized_linear

    if is_quantized_linear(m):
        return True
    # a model can hold bitsandbytes layers only if bitsandbytes is imported already; importing it
    # just to look would cost ~10 s on a 2-core CPU
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _selected(lname: str, cfg: QuantConfig) -> bool:
    if cfg.include and not any(fnmatch.fnmatch(lname, p) for p in cfg.include):
        return False
    return not (cfg.exclude and any(fnmatch.fnmatch(lname, p) for p in cfg.exclude))


def select_layers(model, cfg: QuantConfig) -> dict:
    """{name: module} of the Linear layers to quantize; raises ValueError when there is nothing to do."""
    from ..torch_utils import linear_layers, output_head

    quantized = [n for n, m in model.named_modules() if _quantized(m)]
    if quantized:
        raise ValueError(f"model is already quantized ({len(quantized)} quantized layers, e.g. {quantized[0]!r}); "
                         "quantize the original model instead")
    head = output_head(model)
    found, targets = [], {}
    for lname, m in linear_layers(model, include_quantized=False):
        found.append(lname)
        if (m is not head or cfg.quantize_lm_head) and _selected(lname, cfg):
            targets[lname] = m
    if not targets:
        if not found:
            raise ValueError(f"nothing to quantize: {type(model).__name__} has no nn.Linear or Conv1D layers")
        raise ValueError(f"nothing to quantize: include={cfg.include} exclude={cfg.exclude} "
                         f"quantize_lm_head={cfg.quantize_lm_head} leave none of the {len(found)} Linear layers "
                         f"(e.g. {', '.join(found[:3])})")
    for lname, m in targets.items():
        _check_divides(cfg, in_out(m)[0], f"layer {lname!r}", "the layer")
    from ..kernels.ops import availability

    if cfg.backend not in ("auto", "bitsandbytes"):
        why = availability(cfg.backend, cfg.fmt)
        if why:
            raise ValueError(f"backend={cfg.backend!r} cannot run {cfg.method}: {why} "
                             "(use backend='auto' or 'reference')")
    return targets


def _check_divides(cfg: QuantConfig, k: int, what: str, exclude: str) -> None:
    """ValueError unless the group size divides ``k`` (methods that group along rows only)."""
    if get_method(cfg.method).group_rule != "groups" or not cfg.group_size or k % cfg.group_size == 0:
        return
    ok = [g for g in GROUP_SIZES if k % g == 0]
    hint = f"group sizes that divide it: {', '.join(map(str, ok))}" if ok else "no group size divides it"
    raise ValueError(f"group_size={cfg.group_size} does not divide {what} (in_features={k}); {hint}; "
                     f"or exclude {exclude}")


def experts_owners(model) -> list[str]:
    """Names of the modules that quantize their own experts (the protocol in the module docstring)."""
    return [n for n, m in model.named_modules() if callable(getattr(m, "quantize_experts", None))]


def _inside(lname: str, owners: list[str]) -> bool:
    return any(not o or lname.startswith(o + ".") for o in owners)


def select_experts(model, cfg: QuantConfig) -> dict[str, tuple[str, ...]]:
    """{block name: its expert matrices to quantize} for the blocks offering ``quantize_experts``; the
    matrices are named ``<block>.<matrix>`` (e.g. ``layers.0.mlp.w_in``) for include/exclude."""
    plan = {}
    for n in experts_owners(model):
        block = model.get_submodule(n) if n else model
        sizes = block.expert_matrices()
        which = tuple(w for w in sizes if _selected(f"{n}.{w}", cfg))
        if not which:
            continue
        if get_method(cfg.method).calibrated:
            raise ValueError(f"{cfg.method} cannot quantize the MoE experts of {n!r} (it needs per-expert calibration "
                             "Hessians); use method 'hqq', 'int4', 'int8' or 'nf4', or exclude=['*.w_in', '*.w_out']")
        for w in which:
            _check_divides(cfg, sizes[w], f"the experts' {w} of {n!r}", f"'{n}.{w}'")
        plan[n] = which
    return plan


def _quantize_experts(work, plan: dict, cfg: QuantConfig) -> list[dict]:
    """Swap each planned block of ``work`` for its quantized form; returns the per-matrix stats."""
    stats, new_blocks = [], {}
    for n, which in plan.items():
        def quantize_one(rel, lin, n=n):
            new, st = quantize_layer(f"{n}.{rel}", lin, cfg, None)
            stats.append(st)
            return new

        block = work.get_submodule(n) if n else work
        new_blocks[n] = block.quantize_experts(quantize_one, which)
    _swap(work, new_blocks)
    return stats


def in_out(m) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D (weight stored [in, out])."""
    import torch

    if isinstance(m, torch.nn.Linear):
        return m.in_features, m.out_features
    k, n = m.weight.shape
    return k, n


def _weight_nk(m):
    """The layer's weight as fp32 [out, in] (a new tensor: the input is never written)."""
    import torch

    w = m.weight.detach()
    if not isinstance(m, torch.nn.Linear):
        w = w.t()
    return w.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------- quantization


def quantize_layer(lname: str, m, cfg: QuantConfig, hessian, cache: dict | None = None):
    """(new layer, its stats) for one Linear-like layer ``m`` (only read). ``cache``: the caller's, where
    gptq keeps the factorisation of the last Hessian (q/k/v and gate/up share one)."""
    from ..torch_utils import snr_db

    method = get_method(cfg.method)
    k, n = in_out(m)
    w = _weight_nk(m)
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    fmt, tensors = method.quantize(w, cfg, hessian, cache=cache)
    sq_err = tensors.pop("_sq_err", None) if tensors else None
    if cfg.backend == "bitsandbytes" or method.bitsandbytes_only:
        from ..kernels.bnb import dequantize_bnb, to_bnb_module

        # llm.int8's outlier threshold: a method that runs only through bitsandbytes is LLM.int8()
        threshold = cfg.llm_int8_threshold if method.bitsandbytes_only else 0.0
        new = to_bnb_module(w, bias, tensors, fmt=fmt, group_size=cfg.group_size, k=k, n=n, dtype=m.weight.dtype,
                            double_quant=cfg.double_quant, threshold=threshold)
        approx = dequantize_bnb(new)
    else:
        from ..kernels.linear import QuantLinear

        new = QuantLinear(k, n, fmt, cfg.group_size or k, tensors, bias, backend=cfg.backend, method=cfg.method)
        if bias is not None:
            new.bias.data = new.bias.data.to(m.weight.dtype)
        approx = new.dequantize() if sq_err is None else None
    snr = snr_db(w, approx) if sq_err is None else snr_db(w, squared_error=sq_err)
    stats = {"name": lname, "in_features": k, "out_features": n, "snr_db": snr,
             "bytes_before": m.weight.numel() * m.weight.element_size(), "bytes_bf16": m.weight.numel() * 2,
             "bytes_after": _module_weight_bytes(new)}
    return new, stats


def _module_weight_bytes(m) -> int:
    """Stored bytes of a quantized module's weight with its scales/statistics (bias excluded)."""
    if hasattr(m, "storage_bytes"):  # effnb's QuantLinear
        return m.storage_bytes()
    total = m.weight.nbytes
    qs = getattr(m.weight, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            total += t.nbytes if t is not None and hasattr(t, "nbytes") else 0
        if qs.state2 is not None:
            total += qs.state2.absmax.nbytes + qs.state2.code.nbytes
    scb = getattr(m.weight, "SCB", None)
    return total + (scb.nbytes if scb is not None else 0)


# ------------------------------------------------------------------------------------- swapping


def _copy_without(model, targets: dict, share: bool = False):
    """Deep copy of ``model`` that does not copy the weights about to be replaced (nor the tokenizer).

    ``share``: every other parameter shares the input's storage (``models.copy_model``)."""
    import torch

    from ..models import copy_model

    memo = {}
    placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n.rsplit(".", 1)[0] not in targets}
    for m in targets.values():
        if id(m.weight) not in tied:
            memo[id(m.weight)] = placeholder
    return copy_model(model, share_parameters=share, memo=memo)


def _swap(model, new_modules: dict) -> None:
    """Put each new module in its place; on an error or Ctrl-C part-way, every original is put back."""
    done = []
    try:
        for lname, new in new_modules.items():
            parent_name, _, child = lname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    except BaseException:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise
