"""``effnb.finetune(..., processes=N)``: the same training on N data-parallel processes, checkpoints, resume.

The notebook's process launches the ranks with ``accelerate.notebook_launcher`` (which forks them
through ``torch.distributed``'s elastic launcher, the engine of ``torch.distributed.run`` and
``accelerate launch``); the CLI calls the same function. Fork hands every rank the model, the task
and the config; gloo joins them on CPUs, NCCL on GPUs.

- Data: every rank builds the same global batches as a one-process run (``task.batches``, same seed)
  and trains on its contiguous slice of each (``batch_size`` is the global batch). Each rank's loss
  is its sum over answer tokens divided by the global count of answer tokens (all-reduced), times
  the world size; averaging the gradients over ranks then gives exactly the one-process gradient,
  and the loss reported per step is the all-reduced sum over the global count: the one-process loss.
- ``strategy="ddp"``: ``DistributedDataParallel`` synchronises the trainable parameters only (the
  adapters after ``effnb.lora``); ``"fsdp"``: ``fully_shard`` (FSDP2) per decoder layer and the root,
  parameters, gradients and AdamW state sharded. ``"auto"``: ddp when adapters train, fsdp otherwise.
- Rank 0 writes its history after every step (the caller draws the progress bar and live view from
  it) and the trained weights at the end (the caller loads them into its copy); checkpoints and
  resuming (``resume_from``) are in ``resume.py``. See docs/scale-out.md.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from ..files import write_atomic
from .resume import (
    START_ATTEMPTS,
    clear_stuck,
    copy_weights,
    end_if_stuck,
    gather_states,
    load_checkpoint,
    record_failure,
    save_checkpoint,
    save_torch,
    why_failed,
)

STEP_HOOK = None  # callable(rank, step) run by every rank after each step and its checkpoint (tests kill ranks here)


@dataclass
class Job:
    """What every rank needs (inherited through fork) and the folder where rank 0 reports back."""

    model: object
    task: object
    cfg: object  # FinetuneConfig
    plus_ratio: float | None
    pad_id: int
    before_loss: float | None
    strategy: str
    folder: str

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


def resolve_strategy(cfg, model) -> str:
    """``cfg.strategy``, with "auto" resolved: DDP when only adapters train, FSDP for full fine-tuning."""
    from .state import is_peft

    if cfg.strategy != "auto":
        return cfg.strategy
    return "ddp" if is_peft(model) else "fsdp"


def train(model, task, cfg, *, plus_ratio: float | None, pad_id: int, title: str,
          before_loss: float | None = None) -> dict:
    """``train.train``'s contract on ``cfg.processes`` processes (or one, resuming): trains ``model`` in
    place (the trained weights come back from rank 0) and returns the same dict."""
    from .train import make_live_view

    plot = make_live_view(cfg.live, title, cfg.steps)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effnb-finetune-") as folder:
        job = Job(model, task, cfg, plus_ratio, pad_id, before_loss, resolve_strategy(cfg, model), folder)
        interrupted = follow(job, plot, title)
        result = _read_result(job)
    _load_trained(model, result["weights"])
    model.eval()
    return {"history": result["history"], "peak": SimpleNamespace(**result["peak"]),
            "optimizer_state_bytes": result["optimizer_state_bytes"], "wall_s": time.perf_counter() - t0,
            "interrupted": interrupted or result["interrupted"], "plot": plot, "param_groups": result["param_groups"],
            "strategy": job.strategy if cfg.processes > 1 else "none", "processes": cfg.processes, "resumed_from_step": result["resumed_from_step"]}


def follow(job: Job, plot, title: str) -> str | None:
    """Run the ranks (a thread launches them) while this thread draws rank 0's progress; Ctrl-C asks
    the ranks to stop after the current step. Returns why training stopped early, else None.

    Ranks that never formed their group (a rare deadlock right after fork, cause not yet found) are
    ended and launched again, up to ``START_ATTEMPTS`` times: nothing has trained by then."""
    from tqdm.auto import tqdm

    bar = tqdm(total=job.cfg.steps, desc=title, unit="step", leave=True)
    seen = 0
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            errors, interrupted, seen = _run_ranks(job, plot, bar, seen)
            if not errors or attempt == START_ATTEMPTS or not clear_stuck(job):
                break
    finally:
        _show_progress(job, plot, bar, seen)
        bar.close()
    if errors:
        hint = f"; run again with resume_from={job.cfg.resume_from!r} to continue" if job.cfg.resume_from else ""
        raise RuntimeError(f"finetune on {job.cfg.processes} processes failed: {why_failed(job, errors[0])}"
                           f"{hint}") from errors[0]
    return interrupted


def _run_ranks(job: Job, plot, bar, seen: int) -> tuple[list, str | None, int]:
    """One launch of the ranks, followed to its end: (errors, why stopped early, progress shown)."""
    errors: list[BaseException] = []
    done = threading.Event()  # waited on rather than Thread.join, which a KeyboardInterrupt can leave wrong (3.11)
    runner = threading.Thread(target=_launch_catching, args=(job, errors, done), daemon=True, name="effnb-launch")
    interrupted = None
    runner.start()
    t0 = time.monotonic()
    try:
        while not done.wait(0.25):
            seen = _show_progress(job, plot, bar, seen)
            end_if_stuck(job, t0)
    except KeyboardInterrupt:
        open(job.path("stop"), "w").close()  # every rank stops after its current step
        interrupted = "stopped by Ctrl-C; the adapter trained so far is kept"
        while not done.wait(0.25):
            seen = _show_progress(job, plot, bar, seen)
    runner.join()
    return errors, interrupted, seen


def _launch_catching(job: Job, errors: list, done) -> None:
    try:
        launch(job)
    except BaseException as exc:  # noqa: BLE001 - reported by the following thread
        errors.append(exc)
    finally:
        done.set()


def launch(job: Job) -> None:
    """Start ``cfg.processes`` ranks running ``worker(job)`` and wait for them (one: run it here)."""
    import sys

    n = job.cfg.processes
    if n == 1:
        worker(job)
        return
    port = str(free_port())
    check_placement(job.model, n)
    if "bitsandbytes" in sys.modules:
        # accelerate refuses to fork once bitsandbytes is imported (it may have touched CUDA); a CPU run has
        # no CUDA state to protect, so start the same elastic launch notebook_launcher would
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id="effnb", rdzv_backend="static",
                              rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0}, max_restarts=0,
                              monitor_interval=0.1, start_method="fork")
        elastic_launch(config, worker)(job)
        return
    from accelerate import notebook_launcher

    notebook_launcher(worker, args=(job,), num_processes=n, use_port=port)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_placement(model, processes: int) -> None:
    """ValueError for a model on a GPU when ranks are to be forked (a forked child cannot use CUDA once its
    parent has); on the CPU, each rank moves it to its own GPU when there is one per rank."""
    if processes > 1 and any(p.is_cuda for p in model.parameters()):
        raise ValueError(f"finetune with processes={processes} forks its ranks, which cannot use CUDA once this "
                         "process has: pass the model on the CPU (model.cpu()); each rank moves it to its own GPU")


def worker(job: Job) -> None:
    """One rank: join the process group (world > 1), train, leave the group."""
    import torch
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if world > 1:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel interrupt reaches the whole group: the caller stops us
        if torch.cuda.is_available() and torch.cuda.device_count() >= world:  # one GPU per rank, NCCL
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // world)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank == 0:
            open(job.path("ready"), "w").close()  # every rank has joined: the caller's start watchdog stands down
    try:
        if world > 1:
            job.model.to(device)
        Rank(job, rank, world, device).run()
    except Exception as exc:
        if world > 1:
            record_failure(job, rank, exc)
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


class Rank:
    """One rank's training run: wrap, optimizer, resume, the steps, checkpoints, the result."""

    def __init__(self, job: Job, rank: int, world: int, device):
        import torch

        from .task import batches
        from .train import lr_lambda, make_optimizer

        self.job, self.cfg, self.rank, self.world, self.device = job, job.cfg, rank, world, device
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model = job.model
        self.net = self._wrap()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.model, cfg.lr, cfg.weight_decay, job.plus_ratio)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.warmup_steps, cfg.steps))
        self.data = batches(job.task, cfg.seq_len, cfg.batch_size, cfg.steps, cfg.seed, job.pad_id)
        self.history: dict = {"step": [], "train_loss": [], "aux_loss": [], "lr": [], "step_s": [], "tokens": [],
                              "eval_step": [], "eval_loss": []}
        if job.before_loss is not None:
            self.history["eval_step"].append(0)
            self.history["eval_loss"].append(job.before_loss)
        self.start = load_checkpoint(self)

    def _wrap(self):
        if self.world == 1:
            return self.model
        if self.job.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for module in self.model.modules():
                if type(module).__name__.endswith(("DecoderLayer", "Block")):  # one shard unit per block
                    fully_shard(module)
            fully_shard(self.model)
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (rotary tables) are equal on every rank: forked from one model, never trained
        ddp = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        if hasattr(self.model, "config"):
            ddp.config = self.model.config  # forward_loss reads the MoE router settings from it
        return ddp

    def run(self) -> None:
        from ..measure.memory import PeakMemory

        peak = PeakMemory(str(self.device))
        self.model.train()
        interrupted = None
        with peak:
            try:
                for step in range(self.start + 1, self.cfg.steps + 1):
                    self.step(step)
                    if self._should_checkpoint(step):
                        save_checkpoint(self, step)
                    if STEP_HOOK is not None:
                        STEP_HOOK(self.rank, step)
                    if self._stop_asked():
                        interrupted = f"stopped after {step} of {self.cfg.steps} steps; the adapter trained so far is kept"
                        break
            except KeyboardInterrupt:  # one process: Ctrl-C lands here
                self.opt.zero_grad(set_to_none=True)
                interrupted = f"stopped by Ctrl-C after {len(self.history['step'])} of {self.cfg.steps} steps"
        self.model.eval()
        self.finish(peak, interrupted)

    def _should_checkpoint(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return self.cfg.resume_from is not None and (step == self.cfg.steps or (every and step % every == 0))

    def _stop_asked(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.rank == 0 and os.path.exists(self.job.path("stop")))])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _all_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def step(self, step: int) -> None:
        """One optimizer step on this rank's slice of the global batch; rank 0 records the global loss."""

        from .train import forward_loss, held_out_loss, optimizer_step

        cfg, h = self.cfg, self.history
        t0 = time.perf_counter()
        xb, yb = self.data[step - 1]
        per = xb.shape[0] // self.world
        xs, ys = xb[self.rank * per:(self.rank + 1) * per].to(self.device), yb[self.rank * per:(self.rank + 1) * per]
        ys = ys.to(self.device)
        local = int((ys[:, 1:] != -100).sum())
        count = self._all_sum([float(local)])[0]
        total, lm, aux = forward_loss(self.net, xs, ys, cfg.aux_loss_coef)
        lm_sum = lm * local if local else lm.nan_to_num() * 0.0
        scaled = lm_sum * (self.world / max(count, 1.0)) + (total - lm if aux is not None else 0.0)
        optimizer_step(scaled, self, cfg, step)
        loss_sum, aux_sum = self._all_sum([float(lm_sum.detach()), float(aux.detach()) if aux is not None else 0.0])
        h["step"].append(step)
        h["train_loss"].append(loss_sum / max(count, 1.0))
        h["aux_loss"].append(aux_sum / self.world if aux is not None else None)
        h["lr"].append(self.opt.param_groups[0]["lr"])
        h["step_s"].append(time.perf_counter() - t0)
        h["tokens"].append(int(xb.numel()))
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            h["eval_step"].append(step)  # every rank evaluates (FSDP needs all of them for each forward)
            h["eval_loss"].append(held_out_loss(self.model, self.job.task, cfg.seq_len, self.job.pad_id,
                                                max_tokens=cfg.eval_tokens))
            self.model.train()
        if self.rank == 0:
            write_atomic(self.job.path("progress.json"), json.dumps(h).encode())

    def finish(self, peak, interrupted: str | None) -> None:
        """Rank 0 writes the trained weights, history and measurements for the notebook's process."""
        from .train import optimizer_state_bytes

        weights, _ = gather_states(self)
        if self.rank != 0:
            return
        save_torch(self.job.path("result.pt"), {
            "weights": weights, "history": self.history, "interrupted": interrupted,
            "peak": {"peak_bytes": peak.peak_bytes, "method": f"{peak.method}, rank 0 of {self.world}"},
            "optimizer_state_bytes": optimizer_state_bytes(self.opt), "resumed_from_step": self.start,
            "param_groups": [{"lr": g.get("initial_lr", g["lr"]), "params": len(g["params"])}
                             for g in self.opt.param_groups]})


def _load_trained(model, weights: dict) -> None:
    """The trained weights from rank 0 into the notebook's copy (names without FSDP's or DDP's prefixes)."""
    params = dict(model.named_parameters())
    copy_weights(model, {n: w for n, w in weights.items() if n in params})


def _read_result(job: Job) -> dict:
    import torch

    path = job.path("result.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"finetune on {job.cfg.processes} processes ended without rank 0's result")
    return torch.load(path, map_location="cpu", weights_only=False)


def _show_progress(job: Job, plot, bar, seen: int) -> int:
    """Rank 0's history so far into the progress bar and the live view; returns the steps shown."""
    try:
        with open(job.path("progress.json")) as f:
            hist = json.load(f)
    except (OSError, ValueError):
        return seen
    done = len(hist["step"])
    if done > seen:
        bar.update(done - seen)
        bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}")
        plot.update(hist)
    return done
