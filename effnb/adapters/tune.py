"""``effnb.finetune``'s work: the task and tokenizer checked before any copy, the training run, its report.

The report compares the input model with the trained copy on held-out loss (nats per answer token,
the quality metric of both rows), says how much memory training took (measured) beside what full
fine-tuning, LoRA and QLoRA would take (computed), and keeps the history and the held-out answers
before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..technique import Change
from .config import FinetuneConfig
from .report import light_audit
from .state import base_of, is_peft, lora_meta

log = logging.getLogger(__name__)

TOKEN_IDS = "<token ids>"  # what FinetuneConfig.data records when the data were token ids


@dataclass
class Setup:
    """What ``prepare`` found on the input model: the task, its tokenizer, padding, LoRA+ ratio, names."""

    task: object  # task.Task
    tok: object  # the tokenizer, or None (token ids given)
    pad_id: int
    plus_ratio: float | None
    base_name: str


def token_ids_data(data):
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


def prepare(model, cfg: FinetuneConfig, token_ids: list[int] | None) -> Setup:
    """Everything that can be refused before the model is copied: kind, trainable parameters, data, LoRA+."""
    from ..models import find_tokenizer, model_kind, model_name
    from .task import build_task

    if model_kind(model) != "causal-lm":
        raise ValueError(f"finetune trains causal language models; this {type(model).__name__} is an encoder")
    if sum(p.numel() for p in model.parameters() if p.requires_grad) == 0:
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
    plus_ratio = cfg.plus_ratio if cfg.plus_ratio is not None else lora_meta(model).get("plus_ratio")
    if plus_ratio is not None and not is_peft(model):
        raise ValueError("plus_ratio (LoRA+) needs LoRA adapters; attach them with effnb.lora(model) first")
    _check_scale_out(model, cfg)
    return Setup(task, tok, _pad_id(tok, model), plus_ratio, cfg.name or model_name(model))


def _check_scale_out(model, cfg: FinetuneConfig) -> None:
    """Refused before the copy: a GPU model for forked ranks, a checkpoint folder of another run."""
    from .distributed import check_placement, resolve_strategy
    from .resume import check_checkpoint

    check_placement(model, cfg.processes)
    if cfg.resume_from is not None:
        check_checkpoint(cfg, resolve_strategy(cfg, model))


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


def training_mode(model) -> str:
    """How ``model`` is trained: "full fine-tuning", or "LoRA" / "DoRA" / "QLoRA" on its adapters."""
    from .report import quantized_layers

    if not is_peft(model):
        return "full fine-tuning"
    return "QLoRA" if quantized_layers(base_of(model)) else ("DoRA" if lora_meta(model).get("dora") else "LoRA")


def train_work(work, cfg: FinetuneConfig, s: Setup) -> Change:
    """The technique's transform: held-out loss and answers, training, the same again after."""
    from ..torch_utils import trim_heap
    from . import train as TR

    checkpointing = cfg.gradient_checkpointing and hasattr(work, "gradient_checkpointing_enable")
    if checkpointing:
        work.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qs = s.task.questions[: cfg.generations]
    before_loss = TR.held_out_loss(work, s.task, cfg.seq_len, s.pad_id, max_tokens=cfg.eval_tokens)
    before_answers = TR.answers(work, s.tok, qs, cfg.max_new_tokens) if qs else []
    mode = training_mode(work)
    if cfg.processes > 1 or cfg.resume_from is not None:  # several processes, or checkpoints to resume from
        from .distributed import train as train_fn
    else:
        train_fn = TR.train
    run = train_fn(work, s.task, cfg, plus_ratio=s.plus_ratio, pad_id=s.pad_id, title=f"{mode} on {s.base_name}",
                   before_loss=before_loss)
    if checkpointing and hasattr(work, "gradient_checkpointing_disable"):
        work.gradient_checkpointing_disable()
    trim_heap()  # activations and gradients freed by the loop
    hist = run["history"]
    done = len(hist["step"])
    after_loss = TR.held_out_loss(work, s.task, cfg.seq_len, s.pad_id, max_tokens=cfg.eval_tokens)
    if not hist["eval_step"] or hist["eval_step"][-1] != done:
        hist["eval_step"].append(done)
        hist["eval_loss"].append(after_loss)
    after_answers = TR.answers(work, s.tok, qs, cfg.max_new_tokens) if qs else []
    run["plot"].update(hist, force=True)
    run["plot"].close()
    gens = [{"question": q, "reference": ref, "before": b, "after": a}
            for (q, ref), b, a in zip(qs, before_answers, after_answers)]
    if run["interrupted"]:
        log.warning(run["interrupted"])
    return _change(work, cfg, s, run, mode, (before_loss, after_loss), gens)


def _change(work, cfg: FinetuneConfig, s: Setup, run: dict, mode: str, losses: tuple, gens: list) -> Change:
    """The Change of one training run: held-out loss as both rows' quality, memory, speed, history."""
    from .report import generations_figure, memory_figure
    from .train import loss_figure

    hist, done = run["history"], len(run["history"]["step"])
    label = mode + (f"+ (ratio {s.plus_ratio:g})" if s.plus_ratio is not None else "")
    source = {"python-api": " (python-api answers)", "token ids": " (user token ids)"}
    metric = "held-out loss" + source.get(s.task.name, " (user text)")
    before, after = ({"metric": metric, "value": v, "higher_is_better": False} for v in losses)
    memory, numbers = _measured(work, run, label), _numbers(work, run, losses)
    peak = run["peak"]
    rows = ({"name": f"{s.base_name} (before)",  # the input model's row says which side it is
             "quality": before, "peak_memory_bytes": None,
             "peak_memory": {"method": "not measured (no training ran on the input model)"}},
            {"quality": after, "peak_memory_bytes": memory[0]["total_bytes"],
             "peak_memory": {"transient_bytes": peak.peak_bytes, "method": memory[0]["method"], "during": "training"},
             "extra": {"technique": label, "steps": done, "steps_asked": cfg.steps, "interrupted": run["interrupted"],
                       **numbers, "training_memory": memory}})
    details = {
        "config": cfg.to_dict(), "technique": label, "task": s.task.describe(),
        "history": hist, "interrupted": run["interrupted"], "steps": done,
        "held_out_loss": {"before": losses[0], "after": losses[1], "relative_change": numbers["held_out_loss_change"]},
        "generations": gens, "step_seconds_median": numbers["step_seconds_median"],
        "tokens_per_s": numbers["tokens_per_s"], "train_seconds": numbers["train_seconds"],
        "peak_memory_bytes": memory[0]["total_bytes"], "memory": memory, "optimizer_groups": run["param_groups"],
        "plus_ratio": s.plus_ratio,
        "scale_out": {"processes": cfg.processes, "strategy": run.get("strategy", "none"),
                      "resumed_from_step": run.get("resumed_from_step", 0)},
        "live_view": run["plot"].kind if run["plot"].enabled else "none (not in a notebook, or live=False)",
    }
    title = f"{label} on {s.base_name}: loss"
    figs = [lambda: loss_figure(hist, title),
            lambda: memory_figure(memory, "fine-tuning memory: this run (measured) vs computed budgets")]
    if gens:
        figs.append(lambda: generations_figure(gens))
    return Change(work, label=f"{s.base_name} ({label}, {done} steps)", audit=light_audit(),
                  title=f"{label} fine-tuning of {s.base_name} on {s.task.name}", rows=rows, details=details,
                  figures=figs)


def _measured(work, run: dict, label: str) -> list[dict]:
    """Memory of this run (measured) followed by the computed budgets of full fine-tuning, LoRA and QLoRA."""
    from ..measure.memory import count_parameters, weight_bytes
    from .report import linear_parameter_count, memory_budgets

    total, trainable = count_parameters(work)
    wbytes = weight_bytes(work)[0]
    grads = sum(p.numel() * p.element_size() for p in work.parameters() if p.requires_grad)
    opt_bytes, peak = run["optimizer_state_bytes"], run["peak"]
    peak_total = wbytes + peak.peak_bytes
    measured = {"variant": f"{label} (this run, measured)", "weights_bytes": wbytes, "gradients_bytes": grads,
                "optimizer_bytes": opt_bytes,
                "activations_bytes": max(0, peak_total - wbytes - grads - opt_bytes),
                "total_bytes": peak_total,
                "method": f"measured: weights and gradients from the tensors, optimizer from AdamW's state, "
                          f"total = weights + transient peak ({peak.method})"}
    adapters = is_peft(work)  # full fine-tuning: every parameter is a base parameter, none is an adapter
    budgets = memory_budgets(base_params=total - trainable if adapters else total,
                             trainable=trainable if adapters else 0, linear_params=linear_parameter_count(work))
    return [measured, *budgets]


def _numbers(work, run: dict, losses: tuple) -> dict:
    """Speed and held-out loss figures of the run (the new row's extra)."""
    import statistics

    from ..measure.memory import count_parameters

    total, trainable = count_parameters(work)
    hist = run["history"]
    step_s = hist["step_s"]
    tokens, train_s = sum(hist["tokens"]), sum(step_s)
    before, after = losses
    return {
        "trainable_share": trainable / total if total else None,
        "train_seconds": train_s, "wall_seconds": run["wall_s"],
        # the first steps include one-time costs (allocator growth, lazy init): report the median
        "step_seconds_median": statistics.median(step_s) if step_s else None,
        "tokens_per_s": tokens / train_s if train_s else None,
        "tokens_trained": tokens, "held_out_loss_before": before, "held_out_loss_after": after,
        "held_out_loss_change": (after - before) / before if before else None,
    }
