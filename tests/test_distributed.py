"""effnb.finetune(..., processes=2) on CPU with gloo: same losses as one process, FSDP, resume, the magic."""

from __future__ import annotations

import os
import signal

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
psutil = pytest.importorskip("psutil")

import effnb  # noqa: E402
from effnb.adapters import distributed, resume  # noqa: E402
from effnb.models import state_hash  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the global batch is 4 rows: 2 per process with processes=2
FAST = {"steps": 4, "batch_size": 4, "seq_len": 64, "eval_every": 0, "eval_tokens": 256, "generations": 0,
        "live": False, "lr": 5e-3}


@pytest.fixture(scope="module")
def llama():
    return effnb.load_model("tiny-llama")


@pytest.fixture(scope="module")
def lmodel(llama):
    return effnb.lora(llama, rank=4, targets="attn").model


def _adapters(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _no_children():
    kids = psutil.Process().children(recursive=True)
    assert not kids, f"processes left behind: {kids}"


def test_two_process_lora_matches_one_process(lmodel):
    before = state_hash(lmodel)
    one = effnb.finetune(lmodel, **FAST)
    two = effnb.finetune(lmodel, processes=2, **FAST)
    _no_children()
    assert state_hash(lmodel) == before  # the input model is never changed
    l1, l2 = one.details["history"]["train_loss"], two.details["history"]["train_loss"]
    assert len(l1) == len(l2) == FAST["steps"]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    assert l1[-1] < l1[0]
    a1, a2 = _adapters(one.model), _adapters(two.model)
    assert a1.keys() == a2.keys() and a1
    assert max((a1[n] - a2[n]).abs().max().item() for n in a1) < 1e-5  # the trained adapters came back
    assert two.details["scale_out"] == {"processes": 2, "strategy": "ddp", "resumed_from_step": 0}
    assert two.details["held_out_loss"]["after"] == pytest.approx(one.details["held_out_loss"]["after"], abs=1e-4)


def test_fsdp_full_finetuning_lowers_held_out_loss_like_one_process(llama):
    cfg = {**FAST, "lr": 2e-3, "eval_every": 2}
    one = effnb.finetune(llama, **cfg)
    two = effnb.finetune(llama, processes=2, **cfg)
    _no_children()
    assert two.details["scale_out"]["strategy"] == "fsdp"
    h1, h2 = one.details["held_out_loss"], two.details["held_out_loss"]
    assert h2["after"] < h2["before"]
    assert h2["after"] == pytest.approx(h1["after"], abs=1e-3)
    l1, l2 = one.details["history"]["train_loss"], two.details["history"]["train_loss"]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4


def _kill_rank1_at_step_3(rank, step):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_killed_run_resumes_to_the_same_weights(kind, llama, lmodel, tmp_path, monkeypatch):
    """DDP on the adapters and FSDP on every weight: rank 1 is killed at step 3, the rerun resumes from
    the checkpoint of step 2 and ends where an uninterrupted run ends."""
    model = lmodel if kind == "lora" else llama
    cfg = {**FAST, "steps": 5, "processes": 2, "checkpoint_every": 2, "lr": 5e-3 if kind == "lora" else 2e-3}
    whole = effnb.finetune(model, resume_from=str(tmp_path / "whole"), **cfg)
    monkeypatch.setattr(distributed, "STEP_HOOK", _kill_rank1_at_step_3)  # inherited by the forked ranks
    with pytest.raises(RuntimeError, match=r"(rank 1 ended with signal SIGKILL|lost its connection to another rank).*; run again with resume_from="):
        effnb.finetune(model, resume_from=str(tmp_path / "cut"), **cfg)
    _no_children()
    assert torch.load(tmp_path / "cut" / resume.CHECKPOINT, weights_only=False)["step"] == 2
    monkeypatch.setattr(distributed, "STEP_HOOK", None)
    resumed = effnb.finetune(model, resume_from=str(tmp_path / "cut"), **cfg)
    _no_children()
    assert resumed.details["scale_out"] == {"processes": 2, "strategy": "ddp" if kind == "lora" else "fsdp",
                                            "resumed_from_step": 2}
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    hw, hr = whole.details["history"]["train_loss"], resumed.details["history"]["train_loss"]
    assert len(hr) == 5 and max(abs(x - y) for x, y in zip(hw, hr)) < 1e-6
    with pytest.raises(ValueError, match="holds a run with steps=5, this one has steps=6"):
        effnb.finetune(model, resume_from=str(tmp_path / "cut"), **{**cfg, "steps": 6})


def test_one_process_keeps_its_path_and_can_checkpoint(lmodel, tmp_path):
    plain = effnb.finetune(lmodel, **FAST)
    assert plain.details["scale_out"] == {"processes": 1, "strategy": "none", "resumed_from_step": 0}
    saved = effnb.finetune(lmodel, resume_from=str(tmp_path), **FAST)
    assert (tmp_path / resume.CHECKPOINT).exists()
    l1, l2 = plain.details["history"]["train_loss"], saved.details["history"]["train_loss"]
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-5


def test_options_are_checked():
    with pytest.raises(ValueError, match="multiple of processes=2"):
        effnb.adapters.FinetuneConfig(batch_size=3, processes=2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        effnb.adapters.FinetuneConfig(strategy="zero3")
    with pytest.raises(ValueError, match="processes must be"):
        effnb.adapters.FinetuneConfig(processes=0)
    with pytest.raises(ValueError, match="resume_from must be a folder"):
        effnb.adapters.FinetuneConfig(resume_from=" ")


def test_magic_with_processes_in_a_papermill_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pm = pytest.importorskip("papermill")
    cells = [
        "import psutil, torch\ntorch.set_num_threads(1)\n%load_ext effnb\nimport effnb",
        "lm = effnb.lora(effnb.load_model('tiny-llama'), rank=4).model",
        "%efficient finetune lm --processes 2 --steps 3 --batch-size 2 --seq-len 64 --eval-every 0 "
        "--eval-tokens 256 --generations 0 -o tuned",
        "kids = psutil.Process().children(recursive=True)\nassert not kids, kids\n"
        "assert _efficient.details['scale_out']['processes'] == 2\nprint('children after:', len(kids))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = tmp_path / "ddp.ipynb", tmp_path / "ddp.out.ipynb"
    nbformat.write(nb, src)
    pm.execute_notebook(str(src), str(out), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                        execution_timeout=120)
    text = out.read_text()
    assert "children after: 0" in text
    _no_children()


def test_runs_when_bitsandbytes_is_imported(lmodel, monkeypatch):
    """accelerate's notebook_launcher refuses to fork once bitsandbytes is imported (earlier tests or cells do
    import it); on a CPU effnb then starts the same elastic launch itself."""
    import sys
    import types

    if "bitsandbytes" not in sys.modules:
        monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    res = effnb.finetune(lmodel, processes=2, **{**FAST, "steps": 2})
    _no_children()
    assert len(res.details["history"]["train_loss"]) == 2


def test_a_failing_rank_is_one_line(lmodel, monkeypatch):
    def fail(rank, step):
        if rank == 1:
            raise ArithmeticError("boom in rank 1")

    monkeypatch.setattr(distributed, "STEP_HOOK", fail)
    with pytest.raises(RuntimeError, match=r"^finetune on 2 processes failed: rank 1: ArithmeticError: boom in rank 1$"):
        effnb.finetune(lmodel, processes=2, **{**FAST, "steps": 2})
    _no_children()


def test_ctrl_c_stops_every_rank_and_keeps_the_training(lmodel, monkeypatch):
    """SIGINT (Ctrl-C, a kernel interrupt) reaches the calling process: the ranks stop after their step and the
    adapters trained so far come back."""
    def interrupt(rank, step):
        if rank == 0 and step == 2:
            os.kill(os.getppid(), signal.SIGINT)

    monkeypatch.setattr(distributed, "STEP_HOOK", interrupt)
    res = effnb.finetune(lmodel, processes=2, **{**FAST, "steps": 40})
    _no_children()
    done = len(res.details["history"]["train_loss"])
    assert 2 <= done < 40 and "Ctrl-C" in res.details["interrupted"]
    assert any(v.abs().max() > 0 for n, v in _adapters(res.model).items() if "lora_B" in n)


def _hang(job):
    import time

    time.sleep(600)


_REAL_WORKER = distributed.worker


def _hang_first_launch(job):
    """The first launch's ranks hang before joining their group; once relaunched they train normally."""
    import time

    if not os.path.exists(job.path("hung-once.relaunched")):
        time.sleep(600)
    return _REAL_WORKER(job)


def test_ranks_that_never_start_are_launched_again(lmodel, monkeypatch):
    """A launch whose ranks never form their group is ended and launched again; the run then completes."""
    monkeypatch.setattr(resume, "START_TIMEOUT_S", 3.0)
    calls = []
    real_clear = resume.clear_stuck

    def clear_and_mark(job):
        calls.append(1)
        open(job.path("hung-once.relaunched"), "w").close()
        return real_clear(job)

    monkeypatch.setattr(distributed, "clear_stuck", clear_and_mark)
    monkeypatch.setattr(distributed, "worker", _hang_first_launch)
    res = effnb.finetune(lmodel, processes=2, **{**FAST, "steps": 2})
    assert calls == [1]
    assert len(res.details["history"]["train_loss"]) == 2
    _no_children()


def test_ranks_that_never_start_are_ended(lmodel, monkeypatch):
    """A rank stuck before joining its group (a deadlock after fork) is ended by the caller's start watchdog."""
    monkeypatch.setattr(resume, "START_TIMEOUT_S", 2.0)
    monkeypatch.setattr(distributed, "worker", _hang)
    with pytest.raises(RuntimeError, match="did not start within 2 s"):
        effnb.finetune(lmodel, processes=2, **{**FAST, "steps": 2})
    _no_children()
