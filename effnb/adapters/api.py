"""``effnb.lora``, ``effnb.finetune``, ``effnb.merge``: LoRA, QLoRA, LoRA+ and DoRA on Hugging Face PEFT.

    res = effnb.lora(model, rank=8, alpha=16, targets="attn")       # Result: a PEFT model
    res = effnb.finetune(res.model, data="python-api", steps=60)     # trained copy, history, before/after
    res = effnb.merge(res.model)                                     # adapters folded in, error reported
    effnb.adapters.save_adapter(res.model, "adapter/"); effnb.adapters.load_adapter(model, "adapter/")

PEFT does the LoRA itself (its LoraConfig, get_peft_model, LoRA+ through its optimizer helper, DoRA
through use_dora). effnb adds the target presets, QLoRA on its own quantized layers, the training
loop, the report and safe merging. Each function checks what it can before copying anything, then
runs through ``effnb.technique.run_technique`` (copy unless ``inplace=True``, transform, measure,
Result); the transforms are in ``attach.py``, ``tune.py`` and ``merging.py``.
"""

from __future__ import annotations

from functools import partial

from .adapter_io import load_adapter, save_adapter
from .config import FinetuneConfig, LoraConfig, MergeConfig

__all__ = ["finetune", "load_adapter", "lora", "merge", "save_adapter"]


def lora(model, rank: int = 8, alpha: float = 16, targets="attn", *, name: str | None = None, **options):
    """Attach LoRA adapters (PEFT) to a copy of ``model``; returns a Result with the PEFT model.

    ``targets``: "attn" (query and value projections), "attn-all", "mlp" (Mixtral experts too),
    "all", or module names / suffixes / patterns. ``dora=True`` for DoRA, ``plus_ratio=16`` for LoRA+
    (used by ``finetune``). A model quantized by ``effnb.quantize`` or bitsandbytes gives QLoRA.
    See ``LoraConfig`` for every option.
    """
    from ..models import check_model, copy_model, model_name
    from ..technique import run_technique
    from .attach import attach, plan

    cfg = LoraConfig.from_kwargs(rank=rank, alpha=alpha, targets=targets, name=name, **options)
    check_model(model)
    chosen = plan(model, cfg)
    transform = partial(attach, cfg=cfg, p=chosen, base_name=cfg.name or model_name(model))
    return run_technique(model, cfg, transform, copy=partial(copy_model, share_parameters=cfg.share_base))


def finetune(model, data="python-api", steps: int = 60, *, name: str | None = None, **options):
    """Train ``model``'s trainable parameters (its adapters, after ``effnb.lora``) on ``data``.

    Returns a Result holding the trained copy, a before/after report (held-out loss as quality,
    training peak memory, tokens/s, time per step) and ``details["history"]``. Shows a progress bar
    and, in a notebook, a live loss plot. Ctrl-C stops training and keeps what was trained.
    A model with every parameter trainable (no adapters) gets full fine-tuning.
    See ``FinetuneConfig`` for every option.
    """
    from ..models import check_model
    from ..technique import run_technique
    from . import tune

    token_ids = tune.token_ids_data(data)
    cfg = FinetuneConfig.from_kwargs(data=tune.TOKEN_IDS if token_ids is not None else data, steps=steps, name=name,
                                     **options)
    check_model(model)
    setup = tune.prepare(model, cfg, token_ids)
    return run_technique(model, cfg, partial(tune.train_work, cfg=cfg, s=setup))


def merge(model, *, name: str | None = None, **options):
    """Fold the adapters into the base weights; returns a Result with a plain (PEFT-free) model.

    Float base: the merged model gives the adapted model's logits (max abs difference reported).
    Quantized base: each adapted layer is dequantized, merged and quantized again in its own format;
    the added error (max abs logit difference on held-out text, and per layer) is reported.
    """
    from ..models import check_model, model_name
    from ..technique import run_technique
    from .merging import check_inputs, merge_work
    from .report import active_adapter, quantized_layers
    from .state import is_peft

    cfg = MergeConfig.from_kwargs(name=name, **options)
    check_model(model)
    if not is_peft(model):
        raise ValueError(f"merge: this {type(model).__name__} has no LoRA adapters to merge; "
                         "attach and train them with effnb.lora / effnb.finetune first")
    adapter = cfg.adapter_name or active_adapter(model)
    if adapter not in model.peft_config:
        raise ValueError(f"merge: no adapter named {adapter!r}; adapters: {', '.join(model.peft_config)}")
    check = check_inputs(model, cfg.check_tokens)
    quantized = bool(quantized_layers(model.get_base_model()))
    transform = partial(merge_work, cfg=cfg, adapter=adapter, check=check, base_name=cfg.name or model_name(model),
                        quantized=quantized)
    return run_technique(model, cfg, transform)
