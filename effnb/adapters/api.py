"""``effnb.lora``, ``effnb.finetune``, ``effnb.merge``: LoRA, QLoRA, LoRA+ and DoRA on Hugging Face PEFT.

    res = effnb.lora(model, rank=8, alpha=16, targets="attn")       # Result: a PEFT model
    res = effnb.finetune(res.model, data="python-api", steps=60)     # trained copy, history, before/after
    res = effnb.merge(res.model)                                     # adapters folded in, error reported
    effnb.adapters.save_adapter(res.model, "adapter/"); effnb.adapters.load_adapter(model, "adapter/")

PEFT does the LoRA itself (LoraConfig, get_peft_model, LoRA+ through its optimizer helper, DoRA
through use_dora). effnb adds the target presets, QLoRA on its own NF4 layers, the training loop,
the report and safe merging. Inputs are never changed unless ``inplace=True``.
"""

from __future__ import annotations

import logging
import warnings

from .config import FinetuneArgs, LoraArgs, MergeArgs

log = logging.getLogger(__name__)

_META = "_effnb_lora"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _light_audit(measure: bool):
    from ..measure import AuditConfig

    if measure:
        return AuditConfig(repeats=1, warmup=0, decode_tokens=8, quality_tokens=512, window=256, energy=False)
    return AuditConfig(repeats=1, warmup=0, speed=False, quality=False, flops=False, energy=False)


# ------------------------------------------------------------------------------------------ lora


def lora(model, rank: int = 8, alpha: float = 16, targets="attn", *, name: str | None = None, **options):
    """Attach LoRA adapters (PEFT) to a copy of ``model``; returns a Result with the PEFT model.

    ``targets``: "attn" (query and value projections), "attn-all", "mlp" (Mixtral experts too),
    "all", or module names / suffixes / patterns. ``dora=True`` for DoRA, ``plus_ratio=16`` for LoRA+
    (used by ``finetune``). A model quantized by ``effnb.quantize`` or bitsandbytes gives QLoRA.
    See ``LoraArgs`` for every option.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models import check_model, copy_model, model_kind, model_name
    from . import targets as T
    from .report import quantized_layers

    cfg = LoraArgs.from_kwargs(rank=rank, alpha=alpha, targets=targets, **options)
    check_model(model)
    base = model.get_base_model() if _is_peft(model) else model
    if _is_peft(model) and cfg.adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {cfg.adapter_name!r} "
                         f"(adapters: {', '.join(model.peft_config)}); pass adapter_name='another_name'")
    found = T.resolve(base, cfg.targets)
    quantized = quantized_layers(base)
    effnb_quant = [n for n in found.modules if type(base.get_submodule(n)).__name__ == "QuantLinear"]
    if cfg.dora and effnb_quant:
        raise ValueError(f"dora=True is not supported on effnb-quantized layers ({effnb_quant[0]!r}, ...); "
                         "use dora=False, or quantize with backend='bitsandbytes'")
    if cfg.dora and found.parameters:
        raise ValueError("dora=True is not supported on fused expert parameters; target modules instead")
    kind = model_kind(model)
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.dora,
        target_modules=found.modules, target_parameters=found.parameters or None,
        fan_in_fan_out=found.fan_in_fan_out, init_lora_weights=True if cfg.init == "default" else "gaussian",
        task_type="CAUSAL_LM" if kind == "causal-lm" else None, bias="none")
    if effnb_quant:
        from .qlora import register

        register(peft_cfg)
    work = model if cfg.inplace else copy_model(model, share_parameters=cfg.share_base)
    _mark_bnb(work.get_base_model() if _is_peft(work) else work)
    torch.manual_seed(cfg.seed)
    if _is_peft(work):
        work.add_adapter(cfg.adapter_name, peft_cfg)
        work.set_adapter(cfg.adapter_name)
        peft_model = work
    else:
        with warnings.catch_warnings():  # transformers 5 deprecation raised inside PEFT, not actionable here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(work, peft_cfg, adapter_name=cfg.adapter_name)
    if effnb_quant:
        from .qlora import keep_frozen_layers_lean

        keep_frozen_layers_lean(peft_model)
    meta = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets, "dora": cfg.dora,
            "plus_ratio": cfg.plus_ratio, "adapter_name": cfg.adapter_name,
            "quantized_base": bool(quantized), "effnb_quant_layers": len(effnb_quant)}
    object.__setattr__(peft_model, _META, meta)
    base_name = name or model_name(model)
    return _lora_result(model, peft_model, cfg, found, base_name, quantized)


def _mark_bnb(model) -> None:
    """Tell PEFT that bitsandbytes layers are there, as ``from_pretrained(quantization_config=...)`` would.

    PEFT picks its bitsandbytes LoRA layers (whose merge dequantizes and re-quantizes) only when the
    model says ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``; a model quantized after loading (by
    ``effnb.quantize(..., backend="bitsandbytes")``) does not say it by itself.
    """
    kinds = {type(m).__name__ for m in model.modules()}
    if "Linear4bit" in kinds:
        model.is_loaded_in_4bit = True
    if "Linear8bitLt" in kinds:
        model.is_loaded_in_8bit = True


def _lora_result(model, peft_model, cfg: LoraArgs, found, base_name: str, quantized: list[str]):
    from ..measure import compare
    from ..report import Result
    from .report import (
        adapter_file_bytes,
        float_checkpoint_bytes,
        linear_parameter_count,
        memory_budgets,
        memory_figure,
    )

    variant = "QLoRA" if quantized else ("DoRA" if cfg.dora else "LoRA")
    new_name = f"{base_name} + {variant} r{cfg.rank}"
    rep = compare(model, peft_model, names=[base_name, new_name], config=_light_audit(cfg.measure),
                  title=f"{variant} adapters on {base_name}")
    row = rep.rows[1]
    total, trainable = row["parameters"], row["trainable_parameters"]
    base_params = total - trainable
    adapter_bytes = adapter_file_bytes(peft_model)
    full_bytes = float_checkpoint_bytes(peft_model)
    budgets = memory_budgets(peft_model, base_params=base_params, trainable=trainable,
                             linear_params=linear_parameter_count(peft_model))
    row["extra"].update({
        "technique": variant,
        "trainable_share": trainable / total if total else None,
        "adapter_file_bytes": adapter_bytes,
        "adapter_file_method": "measured: size of adapter_model.safetensors written by PEFT",
        "full_checkpoint_bytes": full_bytes,
        "full_checkpoint_method": "computed: logical base parameters x 4 bytes (fp32)",
        "adapter_vs_checkpoint": adapter_bytes / full_bytes if full_bytes else None,
        "adapted_modules": len(found.modules), "adapted_expert_parameters": len(found.parameters),
        "targets": found.how, "quantized_base_layers": len(quantized),
        "training_memory": budgets,
    })
    details = {
        "config": cfg.to_dict(), "technique": variant, "targets": found.how,
        "modules": found.modules, "expert_parameters": found.parameters,
        "trainable_parameters": trainable, "parameters": total, "trainable_share": trainable / total if total else None,
        "adapter_file_bytes": adapter_bytes, "full_checkpoint_bytes": full_bytes, "training_memory": budgets,
        "quantized_base_layers": len(quantized),
    }
    figs = [lambda: memory_figure(budgets, f"training memory of {base_name} (computed, without activations)")]
    return Result(peft_model, rep, details, figures=figs)


# -------------------------------------------------------------------------------------- finetune


def finetune(model, data="python-api", steps: int = 60, *, name: str | None = None, **options):
    """Train ``model``'s trainable parameters (its adapters, after ``effnb.lora``) on ``data``.

    Returns a Result holding the trained copy, a before/after report (held-out loss as quality,
    training peak memory, tokens/s, time per step) and ``details["history"]``. Shows a progress bar
    and, in a notebook, a live loss plot. Ctrl-C stops training and keeps what was trained.
    A model with every parameter trainable (no adapters) gets full fine-tuning.
    See ``FinetuneArgs`` for every option.
    """

    from ..models import check_model, copy_model, find_tokenizer, model_kind, model_name
    from . import train as TR
    from .task import build_task

    token_ids = _token_ids_data(data)
    cfg = FinetuneArgs.from_kwargs(data=TOKEN_IDS if token_ids is not None else data, steps=steps, **options)
    check_model(model)
    if model_kind(model) != "causal-lm":
        raise ValueError(f"finetune trains causal language models; this {type(model).__name__} is an encoder")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("finetune: the model has nothing trainable (every parameter is frozen); "
                         "attach adapters first with effnb.lora(model), or unfreeze parameters")
    tok = find_tokenizer(model)
    if token_ids is not None:
        task = ids_task(token_ids)
    elif tok is None:
        raise ValueError(f"finetune: this {type(model).__name__} has no tokenizer, so effnb cannot turn "
                         f"data={_short(cfg.data)} into tokens; attach one with effnb.attach_tokenizer(model, tok), "
                         "or pass data= the token ids to train on (a 1-D LongTensor or a list of ints)")
    else:
        task = build_task(tok, cfg.data)
    pad_id = _pad_id(tok, model)
    meta = dict(getattr(model, _META, None) or {})
    plus_ratio = cfg.plus_ratio if cfg.plus_ratio is not None else meta.get("plus_ratio")
    if plus_ratio is not None and not _is_peft(model):
        raise ValueError("plus_ratio (LoRA+) needs LoRA adapters; attach them with effnb.lora(model) first")
    work = model if cfg.inplace else copy_model(model)
    if cfg.gradient_checkpointing and hasattr(work, "gradient_checkpointing_enable"):
        work.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_name = name or model_name(model)
    qs = task.questions[: cfg.generations]
    before_loss = TR.held_out_loss(work, task, cfg.seq_len, pad_id, max_tokens=cfg.eval_tokens)
    before_answers = TR.answers(work, tok, qs, cfg.max_new_tokens) if qs else []
    mode = _mode(work)
    run = TR.train(work, task, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                   eval_every=cfg.eval_every, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                   plus_ratio=plus_ratio, max_grad_norm=cfg.max_grad_norm, aux_loss_coef=cfg.aux_loss_coef,
                   seed=cfg.seed, pad_id=pad_id, live=cfg.live, title=f"{mode} on {base_name}",
                   before_loss=before_loss, eval_tokens=cfg.eval_tokens)
    if cfg.gradient_checkpointing and hasattr(work, "gradient_checkpointing_disable"):
        work.gradient_checkpointing_disable()
    from ..measure.memory import trim_heap

    trim_heap()  # activations and gradients freed by the loop
    hist = run["history"]
    done = len(hist["step"])
    after_loss = TR.held_out_loss(work, task, cfg.seq_len, pad_id, max_tokens=cfg.eval_tokens)
    if not hist["eval_step"] or hist["eval_step"][-1] != done:
        hist["eval_step"].append(done)
        hist["eval_loss"].append(after_loss)
    after_answers = TR.answers(work, tok, qs, cfg.max_new_tokens) if qs else []
    run["plot"].update(hist, force=True)
    run["plot"].close()
    gens = [{"question": q, "reference": ref, "before": b, "after": a}
            for (q, ref), b, a in zip(qs, before_answers, after_answers)]
    return _finetune_result(model, work, cfg, task, run, mode, base_name, before_loss, after_loss, gens,
                            plus_ratio)


TOKEN_IDS = "<token ids>"  # what FinetuneArgs.data records when the data were token ids


def _token_ids_data(data):
    """``data`` as a list of token ids when it is a 1-D integer tensor or a list of ints; else None."""
    import torch

    if isinstance(data, torch.Tensor):
        if data.dim() != 1 or data.dtype.is_floating_point or data.dtype == torch.bool:
            raise ValueError(f"finetune: token ids must be a 1-D integer tensor, got {data.dim()}-D {data.dtype}")
        return data.tolist()
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        return list(data)
    return None


def ids_task(ids: list[int]):
    """A language-modelling task over the user's token ids: the last tenth held out."""
    from .task import Task

    if len(ids) < 4:
        raise ValueError(f"finetune: {len(ids)} token ids are too few to train on and hold out a tenth (need 4 or more)")
    cut = max(2, int(len(ids) * 0.9))
    train, held = ids[:cut], ids[cut:] if len(ids) - cut >= 2 else ids[-2:]
    return Task("token ids", [(train, [True] * len(train))], [(held, [True] * len(held))], [],
                f"{len(ids)} token ids given by the user; the last tenth held out")


def _pad_id(tok, model) -> int:
    for source in (tok, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(source, attr, None)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int):
                return v
    return 0


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mode(model) -> str:
    from .report import quantized_layers

    base = model.get_base_model() if _is_peft(model) else model
    if not _is_peft(model):
        return "full fine-tuning"
    meta = getattr(model, _META, None) or {}
    kind = "QLoRA" if quantized_layers(base) else ("DoRA" if meta.get("dora") else "LoRA")
    return kind


def _finetune_result(model, work, cfg: FinetuneArgs, task, run, mode, base_name, before_loss, after_loss,
                     gens, plus_ratio):
    import statistics

    from ..measure import compare
    from ..measure.memory import count_parameters, weight_bytes
    from ..report import Result
    from .report import generations_figure, linear_parameter_count, memory_budgets, memory_figure
    from .train import loss_figure

    hist = run["history"]
    done = len(hist["step"])
    label = mode + (f"+ (ratio {plus_ratio:g})" if plus_ratio is not None else "")
    rep = compare(model, work, names=[f"{base_name} (before)", f"{base_name} ({label}, {done} steps)"],
                  config=_light_audit(False), title=f"{label} fine-tuning of {base_name} on {task.name}")
    source = {"python-api": " (python-api answers)", "token ids": " (user token ids)"}
    metric = "held-out loss" + source.get(task.name, " (user text)")
    rep.rows[0]["quality"] = {"metric": metric, "value": before_loss, "higher_is_better": False}
    rep.rows[1]["quality"] = {"metric": metric, "value": after_loss, "higher_is_better": False}
    total, trainable = count_parameters(work)
    wbytes = weight_bytes(work)[0]
    grads = sum(p.numel() * p.element_size() for p in work.parameters() if p.requires_grad)
    opt_bytes = run["optimizer_state_bytes"]
    peak = run["peak"]
    peak_total = wbytes + peak.peak_bytes
    step_s = hist["step_s"]
    # the first steps include one-time costs (allocator growth, lazy init): report the median
    median_step = statistics.median(step_s) if step_s else None
    tokens = sum(hist["tokens"])
    train_s = sum(step_s)
    measured = {"variant": f"{label} (this run, measured)", "weights_bytes": wbytes, "gradients_bytes": grads,
                "optimizer_bytes": opt_bytes,
                "activations_bytes": max(0, peak_total - wbytes - grads - opt_bytes),
                "total_bytes": peak_total,
                "method": f"measured: weights and gradients from the tensors, optimizer from AdamW's state, "
                          f"total = weights + transient peak ({peak.method})"}
    budgets = memory_budgets(work, base_params=total - trainable if _is_peft(work) else total,
                             trainable=trainable if _is_peft(work) else 0,
                             linear_params=linear_parameter_count(work))
    memory_rows = [measured, *budgets]
    row = rep.rows[1]
    row["peak_memory_bytes"] = peak_total
    row["peak_memory"] = {"transient_bytes": peak.peak_bytes, "method": measured["method"], "during": "training"}
    rep.rows[0]["peak_memory_bytes"] = None
    rep.rows[0]["peak_memory"] = {"method": "not measured (no training ran on the input model)"}
    row["extra"].update({
        "technique": label, "steps": done, "steps_asked": cfg.steps, "interrupted": run["interrupted"],
        "trainable_share": trainable / total if total else None,
        "train_seconds": train_s, "wall_seconds": run["wall_s"],
        "step_seconds_median": median_step, "tokens_per_s": tokens / train_s if train_s else None,
        "tokens_trained": tokens, "held_out_loss_before": before_loss, "held_out_loss_after": after_loss,
        "held_out_loss_change": (after_loss - before_loss) / before_loss if before_loss else None,
        "training_memory": memory_rows,
    })
    details = {
        "config": cfg.to_dict(), "technique": label, "task": task.describe(),
        "history": hist, "interrupted": run["interrupted"], "steps": done,
        "held_out_loss": {"before": before_loss, "after": after_loss,
                          "relative_change": (after_loss - before_loss) / before_loss if before_loss else None},
        "generations": gens, "step_seconds_median": median_step,
        "tokens_per_s": tokens / train_s if train_s else None, "train_seconds": train_s,
        "peak_memory_bytes": peak_total, "memory": memory_rows, "optimizer_groups": run["param_groups"],
        "plus_ratio": plus_ratio,
        "live_view": run["plot"].kind if run["plot"].enabled else "none (not in a notebook, or live=False)",
    }
    if run["interrupted"]:
        log.warning(run["interrupted"])
    title = f"{label} on {base_name}: loss"
    figs = [lambda: loss_figure(hist, title),
            lambda: memory_figure(memory_rows, "fine-tuning memory: this run (measured) vs computed budgets")]
    if gens:
        figs.append(lambda: generations_figure(gens))
    return Result(work, rep, details, figures=figs)


# ----------------------------------------------------------------------------------------- merge


def merge(model, *, name: str | None = None, **options):
    """Fold the adapters into the base weights; returns a Result with a plain (PEFT-free) model.

    Float base: the merged model gives the adapted model's logits (max abs difference reported).
    Quantized base: each adapted layer is dequantized, merged and quantized again in its own format;
    the added error (max abs logit difference on held-out text, and per layer) is reported.
    """
    import torch

    from ..models import check_model, copy_model, model_name
    from .qlora import QuantLoraLinear
    from .report import quantized_layers

    cfg = MergeArgs.from_kwargs(**options)
    check_model(model)
    if not _is_peft(model):
        raise ValueError(f"merge: this {type(model).__name__} has no LoRA adapters to merge; "
                         "attach and train them with effnb.lora / effnb.finetune first")
    adapter = cfg.adapter_name or _active(model)
    if adapter not in model.peft_config:
        raise ValueError(f"merge: no adapter named {adapter!r}; adapters: {', '.join(model.peft_config)}")
    check = _check_inputs(model, cfg.check_tokens)
    work = model if cfg.inplace else copy_model(model)
    ref = _logits(work, check["inputs"])
    quantized = bool(quantized_layers(work.get_base_model()))
    # per-layer: what the merge should give (dequantized base + delta) vs what the re-quantized layer holds
    targets = {}
    restored: list[str] = []  # bitsandbytes layers put back from its CPU layout
    for lname, m in work.named_modules():
        if isinstance(m, QuantLoraLinear):
            with torch.no_grad():
                targets[lname.removeprefix("base_model.model.")] = (
                    m.get_base_layer().dequantize().float() + m.get_delta_weight(adapter))
        elif quantized and hasattr(m, "lora_A") and adapter in m.lora_A and hasattr(m, "get_delta_weight"):
            base_layer = m.get_base_layer()
            if type(base_layer).__name__ == "Linear4bit":
                from ..quant.bnb import dequantize_bnb, guard_layout, restore_layout

                # PEFT's merge decodes weight.data with quant_state as canonical bytes; bitsandbytes may
                # have repacked them for its AVX512-BF16 CPU kernel on the forward above
                if restore_layout(base_layer):
                    restored.append(lname.removeprefix("base_model.model."))
                guard_layout(base_layer)  # the merged layer's state_dict() will not corrupt it either
                with torch.no_grad():
                    targets[lname.removeprefix("base_model.model.")] = (
                        dequantize_bnb(base_layer) + m.get_delta_weight(adapter).float())
    merged = work.merge_and_unload(adapter_names=[adapter], safe_merge=True)
    out = _logits(merged, check["inputs"])
    diff = (out - ref).abs()
    layer_errors = []
    for lname, want in targets.items():
        got = _dequant_any(merged.get_submodule(lname))
        err = (got - want).float()
        layer_errors.append({"layer": lname, "max_abs_weight_error": err.abs().max().item(),
                             "relative_error": (err.norm() / want.norm().clamp_min(1e-12)).item()})
    meta = getattr(model, _META, None) or {}
    object.__setattr__(merged, _META, {**meta, "merged": adapter})
    base_name = name or model_name(model)
    res = _merge_result(model, merged, base_name, adapter, quantized, diff, check, layer_errors)
    if restored:  # the same dict is in the report row's extra
        res.details["merge_error"]["bitsandbytes_layout"] = (
            f"{len(restored)} base layers were in bitsandbytes' AVX512-BF16 CPU layout; put back to the canonical "
            "layout before merging")
        log.info("merge: %d bitsandbytes layers put back from the CPU layout: %s", len(restored), restored)
    return res


def _active(model) -> str:
    from .report import active_adapter

    return active_adapter(model)


def _check_inputs(model, n: int) -> dict:
    """What the merge is checked on: the built-in text's first ``n`` ids (fixed ids without a tokenizer),
    or a plain module's example inputs; with the words the report uses for them."""
    from ..measure.inputs import token_ids_for
    from ..models import example_inputs_for, model_kind

    kind = model_kind(model)
    if kind == "module":
        inputs, note = example_inputs_for(model)
        if inputs is None:
            raise ValueError(f"merge cannot check this {type(model).__name__}: effnb cannot tell what it takes as "
                             "input; attach example inputs with effnb.attach_example_inputs(model, inputs)")
        return {"inputs": inputs, "compared": "outputs", "what": note, "tokens": None}
    ids, note = token_ids_for(model, n)
    return {"inputs": {"input_ids": ids.unsqueeze(0)}, "tokens": int(ids.numel()),
            "compared": "logits" if kind == "causal-lm" else "hidden states",
            "what": "first tokens of effnb's built-in evaluation text" if "text" in note else note}


def _logits(model, inputs):
    import torch

    from ..measure.agreement import call_model, output_tensor, to_device
    from .train import device_of

    moved = to_device(inputs, device_of(model))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, moved)
    finally:
        model.train(was)
    return output_tensor(out).float().cpu()


def _dequant_any(m):
    if hasattr(m, "dequantize") and type(m).__name__ == "QuantLinear":
        return m.dequantize().float()
    if type(m).__name__ == "Linear4bit":
        from ..quant.bnb import dequantize_bnb

        return dequantize_bnb(m)
    return m.weight.detach().float()


def _merge_result(model, merged, base_name, adapter, quantized, diff, check, layer_errors):
    from ..measure import compare
    from ..report import Result

    new_name = f"{base_name} merged"
    rep = compare(model, merged, names=[base_name, new_name], config=_light_audit(False),
                  title=f"adapter {adapter!r} merged into {'the quantized' if quantized else 'the float'} base")
    error = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "compared": check["compared"],
             "tokens": check["tokens"], "text": check["what"],
             "method": "measured: merged model vs adapted model on the same inputs"}
    if layer_errors:
        error["layers"] = layer_errors
        error["max_abs_weight_error"] = max(e["max_abs_weight_error"] for e in layer_errors)
        error["requantized"] = "dequantize, add B@A*scaling, quantize again in the layer's own format (round to nearest)"
    rep.rows[1]["extra"].update({"merged_adapter": adapter, "quantized_base": quantized, "merge_error": error})
    details = {"adapter": adapter, "quantized_base": quantized, "merge_error": error}
    return Result(merged, rep, details)


# -------------------------------------------------------------------------------- save and load


def save_adapter(model, path, adapter_name: str | None = None) -> str:
    """Write the adapter (safetensors + adapter_config.json) to directory ``path``; returns the path."""
    from pathlib import Path

    if not _is_peft(model):
        raise ValueError(f"save_adapter: this {type(model).__name__} has no adapters; use effnb.lora first")
    name = adapter_name or _active(model)
    if name not in model.peft_config:
        raise ValueError(f"save_adapter: no adapter named {name!r}; adapters: {', '.join(model.peft_config)}")
    out = Path(path).expanduser()
    import sys

    if sys.modules.get("bitsandbytes") is not None:  # PEFT reads state_dict(): bitsandbytes' CPU layout must not leak into it
        from ..quant.bnb import guard_layout

        guard_layout(model)
    model.save_pretrained(str(out), selected_adapters=[name], safe_serialization=True)
    # PEFT writes non-default adapters under a sub-directory of their name
    return str(out / name) if name != "default" else str(out)


def load_adapter(model, path, adapter_name: str = "default", *, trainable: bool = False, inplace: bool = False):
    """A copy of ``model`` with the adapter saved at ``path`` attached (frozen unless ``trainable``)."""
    from pathlib import Path

    from peft import LoraConfig, PeftModel

    from ..models import check_model, copy_model

    check_model(model)
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").exists():
        raise ValueError(f"load_adapter: {str(p)!r} holds no adapter_config.json (save one with save_adapter)")
    if _is_peft(model) and adapter_name in model.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pass adapter_name='other'")
    config = LoraConfig.from_pretrained(str(p))
    config.inference_mode = not trainable
    from .report import quantized_layers

    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        from .qlora import register

        register(config)
    work = model if inplace else copy_model(model)
    if _is_peft(work):
        work.load_adapter(str(p), adapter_name=adapter_name, is_trainable=trainable)
        work.set_adapter(adapter_name)
        out = work
    else:
        out = PeftModel.from_pretrained(work, str(p), adapter_name=adapter_name, config=config,
                                        is_trainable=trainable)
    object.__setattr__(out, _META, {"adapter_name": adapter_name, "loaded_from": str(p),
                                    "quantized_base": bool(quantized_layers(out.get_base_model()))})
    return out
