"""The training loop of ``effnb.finetune``: progress bar, live plot, tokens/s, peak memory, Ctrl-C.

One optimizer step per packed batch: forward with labels (answer tokens only), plus an auxiliary
loss where the model exposes one (effnb MoE load balancing), backward, clipping, AdamW (LoRA+ groups
when asked). Held-out loss is measured before training, every ``eval_every`` steps and after.

In a notebook the loss curves update live in one output (a display handle re-rendering a plotly
figure, which works in JupyterLab, Notebook 7, VS Code and under papermill); elsewhere the figure
is only built at the end. Ctrl-C stops after the current step and keeps what was trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..torch_utils import device_of, eval_mode, trim_heap
from .qlora import bnb_layers_for_training
from .task import Task, pack


@torch.no_grad()
def held_out_loss(model, task: Task, seq_len: int, pad_id: int, batch_rows: int = 1,
                  max_tokens: int | None = None) -> float:
    """Mean cross-entropy (nats per answer token) over the held-out examples, packed as in training
    (the first ``max_tokens`` of them when given, so every evaluation scores the same tokens).

    One row at a time by default: a row's logits over SmolLM2's 49k-token vocabulary are 25 MB at
    128 tokens, and the evaluation runs in the middle of training, on top of its memory.
    """
    trim_heap()  # the training steps' freed activations, before this adds its own
    x, y = pack(task.held_out, seq_len, pad_id)
    if max_tokens is not None:
        rows = max(1, -(-max_tokens // seq_len))
        x, y = x[:rows], y[:rows]
    device = device_of(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_rows):
            xb, yb = x[i:i + batch_rows].to(device), y[i:i + batch_rows].to(device)
            logits = model(input_ids=xb).logits.float()
            target = yb[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((target != -100).sum())
    if count == 0:
        raise ValueError("the held-out data yields no tokens to score")
    return total / count


@torch.no_grad()
def answers(model, tok, questions: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy answers to held-out questions (cut at the end of the first line)."""
    device = device_of(model)
    out = []
    with eval_mode(model):
        for prompt, _ in questions:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                 else tok.eos_token_id)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(text.strip().split("\n")[0].strip())
    return out


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def loss_figure(history: dict, title: str = "fine-tuning"):
    """Plotly figure: training loss per step and held-out loss at the evaluation steps."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=history["step"], y=history["train_loss"], mode="lines", name="train loss"))
    fig.add_trace(go.Scatter(x=history["eval_step"], y=history["eval_loss"], mode="lines+markers",
                             name="held-out loss"))
    fig.update_layout(title_text=title, xaxis_title="step", yaxis_title="loss (nats per answer token)",
                      height=320, margin={"t": 40, "b": 40, "l": 50, "r": 10})
    return fig


class LivePlot:
    """A plotly figure that updates in place in a notebook (no-op elsewhere)."""

    kind = "plotly display handle"

    def __init__(self, enabled: bool, title: str, min_interval_s: float = 1.0):
        self.enabled = enabled and _in_notebook()
        self.title, self.min_interval_s = title, min_interval_s
        self.handle, self._last = None, 0.0

    def _bundle(self, history):
        import json

        fig = loss_figure(history, self.title)
        return {"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": f"<{self.title}>"}

    def update(self, history: dict, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        from IPython.display import display

        if self.handle is None:
            self.handle = display(self._bundle(history), raw=True, display_id=True)
        else:
            self.handle.update(self._bundle(history), raw=True)

    def close(self) -> None:
        pass


class WidgetMonitor:
    """Feeds effnb's ``TrainingMonitor`` widget (``monitor.py``) from the loop's history."""

    kind = "effnb TrainingMonitor widget"

    def __init__(self, monitor):
        self.monitor = monitor
        self._sent_train = 0
        self._sent_eval = 0
        self.enabled = True

    def update(self, history: dict, force: bool = False) -> None:
        for i in range(self._sent_train, len(history["step"])):
            self.monitor.update(history["step"][i], loss=history["train_loss"][i])
        self._sent_train = len(history["step"])
        for i in range(self._sent_eval, len(history["eval_step"])):
            self.monitor.update(history["eval_step"][i], eval_loss=history["eval_loss"][i])
        self._sent_eval = len(history["eval_step"])

    def close(self) -> None:
        self.monitor.close()


def make_live_view(live: bool, title: str, steps: int):
    """The live loss view of a notebook: effnb's TrainingMonitor widget where it is installed, else a
    plotly figure re-rendered through a display handle; outside a notebook, nothing (a static
    figure is in the Result)."""
    if not (live and _in_notebook()):
        return LivePlot(False, title)
    try:
        from .monitor import TrainingMonitor
    except ImportError:  # the widget base or ipywidgets missing
        return LivePlot(True, title)
    try:
        monitor = TrainingMonitor(title=title, total_steps=steps)
    except (TypeError, ValueError) as exc:  # an older or newer widget with another signature
        import logging

        logging.getLogger(__name__).warning("TrainingMonitor could not start (%s); showing a plotly figure", exc)
        return LivePlot(True, title)
    return WidgetMonitor(monitor)


def lr_lambda(warmup: int, steps: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def make_optimizer(model, lr: float, weight_decay: float, plus_ratio: float | None):
    params = [p for p in model.parameters() if p.requires_grad]
    if plus_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=plus_ratio,
                                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _hf_router_aux(model) -> float | None:
    """``router_aux_loss_coef`` of a transformers MoE model (Mixtral, Qwen-MoE), or None for other models."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def _effnb_aux_loss(model):
    """Mean load-balancing loss of the last forward over the modules that offer one, or None.

    A module offers it with an ``effnb_aux_loss()`` method (effnb's MoE blocks, whose own coefficient
    is included): found by that method on its class, so training needs no import of ``effnb.experts``,
    and a wrapper that forwards attributes to such a block (PEFT's) is not counted twice.
    """
    losses = [m.effnb_aux_loss() for m in model.modules() if callable(getattr(type(m), "effnb_aux_loss", None))]
    return torch.stack(losses).mean() if losses else None


def forward_loss(model, xb, yb, aux_loss_coef: float):
    """(total loss to backpropagate, language-model loss, auxiliary loss or None) of one batch.

    transformers MoE models return ``aux_loss`` when asked with ``output_router_logits=True`` and
    already add ``router_aux_loss_coef * aux_loss`` to ``loss``; effnb MoE blocks expose it through
    an ``effnb_aux_loss()`` method (their own coefficient included). Either way the auxiliary term is
    added with ``aux_loss_coef`` as an extra multiplier (0 turns it off).
    """
    router_coef = _hf_router_aux(model) if aux_loss_coef else None
    if router_coef is not None:
        out = model(input_ids=xb, labels=yb, output_router_logits=True)
        raw = getattr(out, "aux_loss", None)
        if raw is None:
            return out.loss, out.loss, None
        aux = router_coef * raw.to(out.loss.device)
        lm = out.loss - aux  # transformers already added router_coef * aux_loss
        return lm + aux_loss_coef * aux, lm, aux
    out = model(input_ids=xb, labels=yb)
    aux = _effnb_aux_loss(model) if aux_loss_coef else None
    if aux is None:
        return out.loss, out.loss, None
    return out.loss + aux_loss_coef * aux, out.loss, aux


def optimizer_step(total, run, cfg, step: int) -> None:
    """Backpropagate ``total`` and take one optimizer step on ``run`` (its ``trainable``, ``opt`` and ``sched``):
    a non-finite loss stops training with one line; gradients are clipped to ``cfg.max_grad_norm`` (0: off).
    One process and each rank of several take their steps here."""
    if not torch.isfinite(total):
        raise FloatingPointError(f"the training loss became {total.item()} at step {step}; "
                                 f"lower lr (now {cfg.lr:g}) or max_grad_norm")
    total.backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)


def optimizer_state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.nbytes
    return total


def train(model, task: Task, cfg, *, plus_ratio: float | None, pad_id: int, title: str,
          before_loss: float | None = None) -> dict:
    """Train ``model`` in place with the schedule of ``cfg`` (a ``FinetuneConfig``); returns the history
    and measurements (see ``finetune``)."""
    from ..measure.memory import PeakMemory
    from .task import batches

    torch.manual_seed(cfg.seed)
    device = device_of(model)
    data = batches(task, cfg.seq_len, cfg.batch_size, cfg.steps, cfg.seed, pad_id)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, plus_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    history: dict = {"step": [], "train_loss": [], "aux_loss": [], "lr": [], "step_s": [], "tokens": [],
                     "eval_step": [], "eval_loss": []}
    if before_loss is not None:
        history["eval_step"].append(0)
        history["eval_loss"].append(before_loss)
    plot = make_live_view(cfg.live, title, cfg.steps)
    plot.update(history, force=True)
    peak = PeakMemory(str(device))
    model.train()
    # bitsandbytes' AVX512-BF16 CPU path repacks 4-bit layers on eval forwards (the held-out loss above)
    # and then computes without gradients: put them back before training forwards
    bnb_layers_for_training(model)
    loop = _Loop(model, task, cfg, opt, sched, history, plot, pad_id, device,
                 [p for p in model.parameters() if p.requires_grad])
    t_start = time.perf_counter()
    with peak:
        interrupted = loop.run(data, title)
    return {"history": history, "peak": peak, "optimizer_state_bytes": optimizer_state_bytes(opt),
            "wall_s": time.perf_counter() - t_start, "interrupted": interrupted, "plot": plot,
            "param_groups": [{"lr": g.get("initial_lr", g["lr"]), "params": len(g["params"])} for g in opt.param_groups]}


@dataclass
class _Loop:
    """One training run's state, so that a step and the loop around it are separate functions."""

    model: object
    task: Task
    cfg: object  # FinetuneConfig
    opt: object
    sched: object
    history: dict
    plot: object
    pad_id: int
    device: torch.device
    trainable: list

    def run(self, data, title: str) -> str | None:
        """All steps with a progress bar; returns why training stopped early (Ctrl-C), else None."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, desc=title, unit="step", leave=True)
        try:
            for step, (xb, yb) in enumerate(data, start=1):
                loss, dt, tokens = self.step(step, xb, yb)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}")
                bar.update(1)
                self.plot.update(self.history)
        except KeyboardInterrupt:
            self.opt.zero_grad(set_to_none=True)
            return (f"stopped by Ctrl-C after {len(self.history['step'])} of {self.cfg.steps} steps; "
                    "the adapter trained so far is kept")
        finally:
            bar.close()
            self.model.eval()
        return None

    def step(self, step: int, xb, yb) -> tuple[float, float, int]:
        """One optimizer step (and the held-out loss when due); returns (loss, seconds, tokens)."""
        cfg, h = self.cfg, self.history
        t0 = time.perf_counter()
        xb, yb = xb.to(self.device), yb.to(self.device)
        total, loss, aux = forward_loss(self.model, xb, yb, cfg.aux_loss_coef)
        optimizer_step(total, self, cfg, step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        h["step"].append(step)
        h["train_loss"].append(loss.item())
        h["aux_loss"].append(aux.item() if aux is not None else None)
        h["lr"].append(self.opt.param_groups[0]["lr"])
        h["step_s"].append(dt)
        h["tokens"].append(int(xb.numel()))
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            h["eval_step"].append(step)
            h["eval_loss"].append(held_out_loss(self.model, self.task, cfg.seq_len, self.pad_id,
                                                max_tokens=cfg.eval_tokens))
            self.model.train()
            bnb_layers_for_training(self.model)
        return loss.item(), dt, int(xb.numel())
