"""Checkpoints of a fine-tuning run (``resume_from``), written atomically, resuming; how its ranks failed.

``checkpoint.pt`` in the folder holds the step reached, the trained weights (the trainable ones; every
weight, gathered from the shards, under FSDP), the optimizer state (gathered under FSDP, keyed by
parameter name), the scheduler, the RNG state and the history. It is written to a temporary file,
flushed and renamed over the previous one, so a run killed while writing leaves the previous
checkpoint whole. Resuming checks that the run has the same steps, global batch, seed and strategy.
"""

from __future__ import annotations

import io
import os
import time

from ..files import write_atomic

CHECKPOINT = "checkpoint.pt"


def save_torch(path: str, obj) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def copy_weights(model, weights: dict) -> None:
    """Copy ``weights`` (parameter name -> tensor) into ``model``'s parameters of those names."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"the saved weights name {len(missing)} parameters this model lacks, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def check_settings(cfg, strategy: str, state: dict) -> None:
    """ValueError unless the checkpoint ``state`` comes from a run with ``cfg``'s steps, batch, seed, strategy."""
    for key in ("steps", "batch_size", "seed", "strategy"):
        mine = strategy if key == "strategy" else getattr(cfg, key)
        if state[key] != mine:
            raise ValueError(f"resume_from={cfg.resume_from!r} holds a run with {key}={state[key]!r}, "
                             f"this one has {key}={mine!r}; use the same settings or another folder")


def check_checkpoint(cfg, strategy: str) -> None:
    """Before launching: refuse a ``resume_from`` folder whose checkpoint another kind of run wrote."""
    import torch

    path = os.path.join(cfg.resume_from, CHECKPOINT) if cfg.resume_from else None
    if path is not None and os.path.exists(path):
        check_settings(cfg, strategy, torch.load(path, map_location="cpu", weights_only=False, mmap=True))


def _fsdp(run) -> bool:
    return run.world > 1 and run.job.strategy == "fsdp"


def gather_states(run) -> tuple[dict, dict]:
    """(weights, optimizer state) of a ``distributed.Rank`` to save: full and gathered on rank 0 under
    FSDP (every rank must call it then), the trainable parameters and AdamW's state otherwise."""
    if _fsdp(run):
        from torch.distributed.checkpoint import state_dict as dsd

        opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (dsd.get_model_state_dict(run.model, options=opts),
                dsd.get_optimizer_state_dict(run.model, run.opt, options=opts))
    weights = {n: p.detach().cpu().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return weights, run.opt.state_dict()


def save_checkpoint(run, step: int) -> None:
    """Rank 0 writes ``run``'s state after ``step`` to ``resume_from`` (every rank calls it)."""
    import torch

    weights, optim = gather_states(run)
    if run.rank != 0:
        return
    cfg = run.cfg
    os.makedirs(cfg.resume_from, exist_ok=True)
    save_torch(os.path.join(cfg.resume_from, CHECKPOINT), {
        "step": step, "weights": weights, "optimizer": optim, "scheduler": run.sched.state_dict(),
        "rng": torch.get_rng_state(), "history": run.history, "strategy": run.job.strategy, "world": run.world,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed})


def load_checkpoint(run) -> int:
    """Load ``resume_from``'s checkpoint into ``run`` when there is one; returns its step (0: none)."""
    import torch

    cfg = run.cfg
    path = os.path.join(cfg.resume_from, CHECKPOINT) if cfg.resume_from else None
    if path is None or not os.path.exists(path):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_settings(cfg, run.job.strategy, state)
    if _fsdp(run):
        from torch.distributed.checkpoint import state_dict as dsd

        opts = dsd.StateDictOptions(full_state_dict=True, strict=False)
        dsd.set_model_state_dict(run.model, state["weights"], options=opts)
        dsd.set_optimizer_state_dict(run.model, run.opt, state["optimizer"], options=opts)
    else:
        copy_weights(run.model, state["weights"])
        run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    run.history = state["history"]
    return int(state["step"])


START_TIMEOUT_S = 60.0  # ranks that have not joined their group by then are ended (a deadlock after fork)
START_ATTEMPTS = 3  # launches tried when the ranks never start (each hang seen was ~1 launch in 30)


def end_if_stuck(job, t0: float) -> None:
    """End this process's children when no rank group formed within ``START_TIMEOUT_S``: the launcher then fails."""
    if job.cfg.processes == 1 or os.path.exists(job.path("ready")) or time.monotonic() - t0 < START_TIMEOUT_S:
        return
    import psutil

    write_atomic(job.path("stuck.txt"), f"the ranks did not start within {START_TIMEOUT_S:.0f} s and were ended".encode())
    for child in psutil.Process().children(recursive=True):
        child.kill()


def clear_stuck(job) -> bool:
    """True (and the mark removed, for a fresh launch) when the last launch ended because its ranks never started."""
    try:
        os.remove(job.path("stuck.txt"))
    except FileNotFoundError:
        return False
    return True


def why_failed(job, exc: BaseException) -> str:
    """One line: a rank killed by a signal (the others then fail on its closed connection), else the first
    rank's own exception, else how the launch failed."""
    if os.path.exists(job.path("stuck.txt")):
        with open(job.path("stuck.txt")) as f:
            return f.read().strip()
    failures = getattr(exc, "failures", None) or {}  # torch's ChildFailedError: rank -> ProcessFailure
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0:
            return f"rank {rank} ended with signal {failure.signal_name()}"
    for name in ("error.txt", "lost.txt"):
        try:
            with open(job.path(name)) as f:
                return f.read().strip()
        except OSError:
            pass
    lines = [line for line in str(exc).splitlines() if line.strip(" =")]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"


def record_failure(job, rank: int, exc: Exception) -> None:
    """The first rank to fail says why; a rank that only lost its peers says so, in a second file."""
    text = str(exc)
    if any(m in text for m in ("Connection", "connection", "Broken pipe", "gloo/transport", "NCCL communicator")):
        name, line = "lost.txt", (f"rank {rank} lost its connection to another rank, whose process ended "
                                  "(killed, or out of memory)")
    else:
        name, line = "error.txt", f"rank {rank}: {type(exc).__name__}: {text.strip().splitlines()[0] if text else ''}"
    if not os.path.exists(job.path(name)):
        write_atomic(job.path(name), line.encode())
