"""``effnb.quantize``: pick layers, quantize them with a method, swap them in, report before/after.

    res = effnb.quantize(model, method="nf4", group_size=64)
    res.model, res.report, res.details["layers"]

The input model is never changed unless ``inplace=True``: the new layers are all built first,
from read-only views of the input's weights, and only then put into a copy (or, with
``inplace=True``, into the model itself, undoing the swaps if anything interrupts them).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import sys
import time

from .config import BNB_BLOCKSIZES, GROUP_SIZES, QuantConfig

log = logging.getLogger(__name__)


def quantize(model, method: str = "nf4", *, name: str | None = None, **options):
    """Quantize ``model``'s Linear layers; returns a Result (new model + before/after report).

    ``model``: an ``nn.Module``, an embedded name, a folder, or a hub id in the local cache. With
    ``save_to`` and a checkpoint folder (or cached hub id), the checkpoint is streamed tensor by
    tensor and never loaded whole (``effnb.quant.stream``). See ``QuantConfig`` for the options
    (method, bits, group_size, symmetric, double_quant, include/exclude, quantize_lm_head, backend,
    calibration..., inplace, measure, save_to).
    """
    cfg = QuantConfig.from_kwargs(method=method, **options)
    if isinstance(model, (str, os.PathLike)) and cfg.save_to is not None:
        from .stream import checkpoint_folder, quantize_checkpoint, refuse_writing_into

        refuse_writing_into(model, cfg.save_to)
        folder = checkpoint_folder(model)
        if folder is not None:
            return quantize_checkpoint(folder, cfg, name=name)
    from ..models import resolve_model

    model = resolve_model(model)
    res = _quantize_module(model, cfg, name)
    if cfg.save_to is not None:
        from .serialize import save

        save(res.model, cfg.save_to)
    return res


def _quantize_module(model, cfg: QuantConfig, name: str | None):
    t0 = time.perf_counter()
    targets = select_layers(model, cfg)
    from ..experts.quant import prepare_moe  # effnb MoE blocks: experts quantized one by one, routers kept

    targets, finish_moe = prepare_moe(model, targets, cfg)
    from ..measure.memory import trim_heap

    cache: dict = {}  # per call: concurrent calls share nothing
    note = None
    try:
        if cfg.method == "gptq":
            new_layers, layer_stats, note = _gptq(model, targets, cfg, cache)
        else:
            new_layers, layer_stats = {}, []
            for i, (lname, module) in enumerate(targets.items(), start=1):
                new, stats = _quantize_layer(lname, module, cfg, None, cache)
                new_layers[lname] = new
                layer_stats.append(stats)
                if i % 32 == 0:
                    trim_heap()  # each layer frees a few layer-sized temporaries: keep the resident set near what is live
    finally:
        cache.clear()
        trim_heap()
    qmodel = model if cfg.inplace else _copy_without(model, targets, share=cfg.share_unquantized)
    _swap(qmodel, new_layers)
    layer_stats += finish_moe(qmodel)
    from .report import build_result

    return build_result(model, qmodel, cfg, layer_stats, time.perf_counter() - t0, name=name, calibration=note)


def _gptq(model, targets: dict, cfg: QuantConfig, cache: dict):
    """GPTQ: block by block where the model has decoder blocks, else the whole model at once.

    Returns ({name: new layer}, [stats], how it calibrated)."""
    from ..models import model_kind
    from . import calibrate

    def quantize_one(lname, module, hessian):
        return _quantize_layer(lname, module, cfg, hessian, cache)

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


def _linear_types():
    import torch

    types = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # transformers is optional for plain torch models
        pass
    return tuple(types)


def _quantized_types():
    from .linear import QuantLinear

    types = [QuantLinear]
    # a model can hold bitsandbytes layers only if bitsandbytes is imported already; importing it
    # just to look would cost ~10 s on a 2-core CPU
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def select_layers(model, cfg: QuantConfig) -> dict:
    """{name: module} of the layers to quantize; raises ValueError when there is nothing to do."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, _quantized_types())]
    if quantized:
        raise ValueError(f"model is already quantized ({len(quantized)} quantized layers, e.g. {quantized[0]!r}); "
                         "quantize the original model instead")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_types = _linear_types()
    found, targets = [], {}
    for lname, m in model.named_modules():
        if not isinstance(m, linear_types):
            continue
        found.append(lname)
        if m is head and not cfg.quantize_lm_head:
            continue
        if cfg.include and not any(fnmatch.fnmatch(lname, p) for p in cfg.include):
            continue
        if cfg.exclude and any(fnmatch.fnmatch(lname, p) for p in cfg.exclude):
            continue
        targets[lname] = m
    if not targets:
        if not found:
            raise ValueError(f"nothing to quantize: {type(model).__name__} has no nn.Linear or Conv1D layers")
        raise ValueError(f"nothing to quantize: include={cfg.include} exclude={cfg.exclude} "
                         f"quantize_lm_head={cfg.quantize_lm_head} leave none of the {len(found)} Linear layers "
                         f"(e.g. {', '.join(found[:3])})")
    if cfg.method not in ("nf4", "fp4", "llm.int8") and cfg.group_size:
        for lname, m in targets.items():
            k = _in_out(m)[0]
            if k % cfg.group_size:
                ok = [g for g in GROUP_SIZES if k % g == 0]
                hint = f"group sizes that divide it: {', '.join(map(str, ok))}" if ok else "no group size divides it"
                raise ValueError(f"group_size={cfg.group_size} does not divide layer {lname!r} "
                                 f"(in_features={k}); {hint}; or exclude the layer")
    from .backends import availability

    if cfg.backend not in ("auto", "bitsandbytes"):
        why = availability(cfg.backend, cfg.fmt)
        if why:
            raise ValueError(f"backend={cfg.backend!r} cannot run {cfg.method}: {why} "
                             "(use backend='auto' or 'reference')")
    if cfg.method in ("nf4", "fp4") and cfg.group_size not in BNB_BLOCKSIZES:  # pragma: no cover - config checks
        raise ValueError(f"blocksize {cfg.group_size} not supported")
    return targets


def _in_out(m) -> tuple[int, int]:
    import torch

    if isinstance(m, torch.nn.Linear):
        return m.in_features, m.out_features
    k, n = m.weight.shape  # transformers' Conv1D stores [in, out]
    return k, n


def _weight_nk(m):
    """The layer's weight as fp32 [out, in] (a new tensor: the input is never written)."""
    import torch

    w = m.weight.detach()
    if not isinstance(m, torch.nn.Linear):
        w = w.t()
    return w.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------- quantization


def _quantize_layer(lname: str, m, cfg: QuantConfig, hessian, cache: dict | None = None):
    """(new layer, its stats). ``cache``: the caller's, where gptq keeps the factorisation of the last
    Hessian (q/k/v and gate/up share one)."""
    from . import methods
    from .linear import QuantLinear

    k, n = _in_out(m)
    w = _weight_nk(m)
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    if cfg.method == "hqq" and cfg.fmt == "nf4":
        tensors = methods.hqq_nf4(w, cfg.group_size)
    elif cfg.method == "hqq":
        tensors = methods.hqq(w, cfg.bits, cfg.group_size, iters=cfg.hqq_iters, symmetric=cfg.symmetric)
    elif cfg.method == "gptq":
        cache = {} if cache is None else cache
        if cache.get("hessian") is not hessian:  # q/k/v and gate/up share one factorisation
            cache.update(hessian=hessian, factor=methods.gptq_inverse_factor(hessian, cfg.gptq_damp))
        tensors = methods.gptq(w, hessian, cfg.bits, cfg.group_size, damp=cfg.gptq_damp, symmetric=cfg.symmetric,
                               factor=cache["factor"])
    elif cfg.method == "llm.int8":
        tensors = None
    else:
        tensors = methods.rtn(w, cfg.fmt, cfg.group_size, symmetric=cfg.symmetric, double_quant=cfg.double_quant)
    sq_err = tensors.pop("_sq_err", None) if tensors else None
    g = cfg.group_size or k
    if cfg.backend == "bitsandbytes" or cfg.method == "llm.int8":
        from .bnb import to_bnb_module

        new = to_bnb_module(w, bias, cfg, tensors, k, n, dtype=m.weight.dtype)
        approx = _bnb_dequant(new)
    else:
        new = QuantLinear(k, n, cfg.fmt, g, tensors, bias, backend=cfg.backend, method=cfg.method)
        if bias is not None:
            new.bias.data = new.bias.data.to(m.weight.dtype)
        approx = new.dequantize() if sq_err is None else None
    snr = _snr_db(w, approx) if sq_err is None else _snr_from_error(w, sq_err)
    stats = {"name": lname, "in_features": k, "out_features": n, "snr_db": snr,
             "bytes_before": m.weight.numel() * m.weight.element_size(), "bytes_bf16": m.weight.numel() * 2,
             "bytes_after": _module_weight_bytes(new)}
    return new, stats


def _snr_db(ref, approx) -> float:
    """10 log10(|w|^2 / |w - w_q|^2) (norms accumulated by torch in fp32 with pairwise sums)."""
    import math

    import torch

    err = torch.linalg.vector_norm(ref - approx).item() ** 2
    sig = torch.linalg.vector_norm(ref).item() ** 2
    return math.inf if err == 0 else 10 * math.log10(sig / err) if sig > 0 else -math.inf


def _snr_from_error(ref, sq_err: float) -> float:
    import math

    import torch

    sig = torch.linalg.vector_norm(ref).item() ** 2
    return math.inf if sq_err == 0 else 10 * math.log10(sig / sq_err) if sig > 0 else -math.inf


def _module_weight_bytes(m) -> int:
    """Stored bytes of a quantized module's weight with its scales/statistics (bias excluded)."""
    from .linear import QuantLinear

    if isinstance(m, QuantLinear):
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


def _bnb_dequant(m):
    from .bnb import dequantize_bnb

    return dequantize_bnb(m)


# ------------------------------------------------------------------------------------- swapping


def _copy_without(model, targets: dict, share: bool = False):
    """Deep copy of ``model`` that does not copy the weights about to be replaced (nor the tokenizer).

    ``share``: every other parameter shares the input's storage (``models.copy_model``)."""
    import torch

    from ..models import copy_model

    memo = {}
    placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not _owned_by(n, targets)}
    for m in targets.values():
        if id(m.weight) not in tied:
            memo[id(m.weight)] = placeholder
    return copy_model(model, share_parameters=share, memo=memo)


def _owned_by(param_name: str, targets: dict) -> bool:
    return param_name.rsplit(".", 1)[0] in targets


def _swap(model, new_layers: dict) -> None:
    done = []
    try:
        for lname, new in new_layers.items():
            parent_name, _, child = lname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    except BaseException:  # Ctrl-C or an error part-way: put every original layer back
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


def layer_position(lname: str) -> tuple[str, str]:
    """('block index', 'layer kind') for the heatmap, e.g. 'model.layers.3.mlp.up_proj' -> ('3', 'mlp.up_proj')."""
    m = re.search(r"\.(\d+)\.(.+)$", lname)
    return (m.group(1), m.group(2)) if m else ("-", lname)
