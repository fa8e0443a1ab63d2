"""Bad input to the front ends: ``%efficient`` (a real IPython shell) and the ``effnb`` command line.

The magic answers with exactly one ``UsageError: ...`` line and no traceback; the CLI exits with 2
and exactly one ``effnb: ...`` line on stderr (in-process through ``cli.main``, and a few real
subprocesses). Output paths are checked before any work, and the user's model is never changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")

import effnb  # noqa: E402
from effnb import cli, outputs  # noqa: E402
from effnb.testing import QUICK  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Q = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
MISSING = "/nonexistent-effnb-dir"
META = "the model's weights are on the meta device (not loaded): 'meta' has"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontends")
    (root / "empty_model").mkdir()
    (root / "folder").mkdir()
    (root / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    (root / "afile").write_text("not a folder")
    return root


@pytest.fixture(scope="module")
def shell():
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "effnb")
    model = effnb.load_model("tiny-llama")
    ip.user_ns.update(m=model, meta=effnb.copy_model(model).to("meta"), not_a_model=[1, 2, 3])
    yield ip
    for name in ("m", "meta", "not_a_model", "_efficient"):
        ip.user_ns.pop(name, None)


# --------------------------------------------------------------------------- the magic


def magic_fails(ip, capsys, line: str, needle: str) -> str:
    """``%efficient line`` fails with one UsageError line containing ``needle``; ``m`` is unchanged."""
    before = effnb.state_hash(ip.user_ns["m"])
    capsys.readouterr()
    result = ip.run_cell(f"%efficient {line}")
    out = capsys.readouterr()
    text = out.out + out.err
    lines = [t for t in text.splitlines() if t.strip()]
    assert not result.success
    assert "Traceback" not in text
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), text
    assert needle in lines[0], lines[0]
    assert effnb.state_hash(ip.user_ns["m"]) == before
    return lines[0]


MAGIC_CASES = [
    ("quantize meta --method int8 --no-measure", META),
    ("audit meta", META),
    ("lora meta", META),
    ("finetune meta --steps 1", META),
    ("moe meta --experts 4", META),
    ("merge meta", META),
    ("compare m meta", META),
    ("explore quant meta", META),
    ("audit m --json /nonexistent-effnb-dir/r.json", "--json /nonexistent-effnb-dir/r.json: the folder"),
    ("audit m --json /dev/full", "--json /dev/full: cannot write there (No space left on device)"),
    ("audit m --json {tmp}/folder", "is a directory"),
    ("audit m --json {tmp}/afile/r.json", "is not a directory"),
    ("quantize m --method int8 --no-measure --json /dev/full", "--json /dev/full: cannot write there"),
    ("audit m -o 1x", "-o needs a Python variable name, got '1x'"),
    ("audit m -o ''", "-o needs a Python variable name, got ''"),
    ("audit m --json ''", "--json needs a file path, got ''"),
    ("audit m --prompt-tokens 10000000", "prompt_tokens must be at most 1,000,000, got 10000000"),
    ("audit m --decode-tokens 0", "decode_tokens must be a positive integer, got 0"),
    ("audit m --repeats many", "invalid int value: 'many'"),
    ("audit m --quality yes", "unrecognized arguments: yes"),
    ("audit m --text ~/effnb-missing-corpus.txt", "text file not found: '~/effnb-missing-corpus.txt'"),
    ("audit m --text /nonexistent-effnb-dir/x.txt", "text file not found"),
    ("audit m --text {tmp}/folder", "is a directory"),
    ("lora m --rank 100000", "rank must be at most 4,096"),
    ("lora m --rank 0", "rank must be a positive integer"),
    ("lora m --rank 2.5", "invalid int value: '2.5'"),
    ("lora m --targets atn", "did you mean 'attn'"),
    ("lora m --dropout 1.5", "dropout must be in [0, 1), got 1.5"),
    ("finetune m --data '/home/me/my data.txt'", "data file not found: '/home/me/my data.txt'"),
    ("finetune m --steps 0", "steps must be a positive integer, got 0"),
    ("finetune m --lr 50", "lr=50.0 is far too large"),
    ("moe m --experts 1 --top-k 1", "experts must be an integer >= 2"),
    ("moe m --experts 4 --top-k 5", "top_k=5 is more than experts=4; choose top_k from 1 to 4"),
    ("moe m --method spilt", "invalid choice: 'spilt'"),
    ("moe m --calibration ~/effnb-missing-calib.txt", "calibration file not found"),
    ("moe m --sweep 1,x", "invalid comma-separated int value: '1,x'"),
    ("quantize m --method nf5", "invalid choice: 'nf5'"),
    ("quantize m --group-size 64.0", "invalid int value: '64.0'"),
    ("audit nowhere_defined", "name 'nowhere_defined' is not defined in the notebook"),
    ("audit not_a_model", "'not_a_model' is a list, not a model"),
    ("audit ''", "a model name is empty"),
    ("audit m --bogus 3", "unrecognized arguments: --bogus 3"),
    ("audit 'unclosed", "cannot parse the line"),
    ("audit /nonexistent-effnb-dir/model", "unknown model '/nonexistent-effnb-dir/model'"),
    ("audit {tmp}/empty_model", ""),
    ("audit {tmp}/bad.gguf", ""),
    ("frobnicate m", "unknown command 'frobnicate'"),
    ("help frobnicate", "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize(("line", "needle"), MAGIC_CASES, ids=[c[0][:40] for c in MAGIC_CASES])
def test_magic_bad_input_is_one_line(shell, capsys, paths, line, needle):
    magic_fails(shell, capsys, line.format(tmp=paths), needle)


def test_magic_stores_nothing_when_the_output_is_refused(shell, capsys):
    shell.user_ns.pop("q", None)
    magic_fails(shell, capsys, "quantize m --method int8 --no-measure -o q --json /dev/full", "--json /dev/full")
    assert "q" not in shell.user_ns  # refused before the work: no half-done result either


def test_measured_cell_keeps_its_peak_across_an_audit_inside(shell):
    # the audit inside resets the process's peak counter; the cell's figure must still hold its 200 MB
    cell = ("block = b'x' * 200_000_000\ndel block\n"
            "inner = effnb.audit(m, repeats=1, warmup=0, prompt_tokens=8, decode_tokens=2, quality=False, "
            "flops=False, energy=False)")
    shell.user_ns["effnb"] = effnb
    shell.run_cell_magic("efficient", "-o cell -q", cell)
    assert shell.user_ns["cell"]["cell_succeeded"]
    assert shell.user_ns["cell"]["cpu_peak_bytes"] >= 190_000_000
    assert shell.user_ns["inner"].rows[0]["peak_memory"]["transient_bytes"] < 150_000_000
    for name in ("cell", "inner", "effnb"):
        shell.user_ns.pop(name)


# --------------------------------------------------------------------------- errors raised inside the API


class SafetensorError(Exception):
    """Stands in for a format error of a third-party reader (not a ValueError)."""


RAISED = [
    (MemoryError("could not allocate 12 GB"), "out of memory: could not allocate 12 GB"),
    (PermissionError(13, "Permission denied", "/root/secret.txt"), "Permission denied: '/root/secret.txt'"),
    (FileNotFoundError(2, "No such file or directory", "/x/model.safetensors"), "No such file or directory: '/x/model"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("Tensor on device meta is not on the expected device cpu!"),
     "RuntimeError: Tensor on device meta is not on the expected device cpu! (EFFNB_DEBUG=1 shows the traceback)"),
    (KeyError("model.layers.0.mlp.absmax"), "KeyError: 'model.layers.0.mlp.absmax'"),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), "SafetensorError: Error while deserializing"),
    (json.JSONDecodeError("Expecting value", "{", 1), "Expecting value: line 1 column 2"),
    (ValueError("first line\n  second line\n"), "first line second line"),
]


def _raiser(exc):
    def audit(*args, **kwargs):
        raise exc

    return audit


@pytest.mark.parametrize(("exc", "needle"), RAISED, ids=[type(e).__name__ for e, _ in RAISED])
def test_any_exception_inside_the_api_is_one_line(shell, capsys, monkeypatch, exc, needle):
    import effnb.measure.core as core

    monkeypatch.delenv("EFFNB_DEBUG", raising=False)
    monkeypatch.setattr(core, "audit", _raiser(exc))
    magic_fails(shell, capsys, "audit m", needle)
    cli_fails(capsys, ["audit", "tiny-llama"], needle)


def test_interrupt_is_one_line(shell, capsys, monkeypatch):
    import effnb.measure.core as core

    monkeypatch.setattr(core, "audit", _raiser(KeyboardInterrupt()))
    magic_fails(shell, capsys, "audit m -o r", "audit interrupted: nothing was stored")
    assert "r" not in shell.user_ns
    cli_fails(capsys, ["audit", "tiny-llama"], "effnb: interrupted", code=130)


def test_debug_setting_shows_the_real_traceback(monkeypatch):
    import effnb.measure.core as core

    monkeypatch.setenv("EFFNB_DEBUG", "1")
    monkeypatch.setattr(core, "audit", _raiser(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["audit", "tiny-llama"])


# --------------------------------------------------------------------------- the CLI, in process


def cli_fails(capsys, argv, needle: str, code: int = 2) -> str:
    capsys.readouterr()
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse or anything else that exits
        rc = exc.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == code, (rc, out.err)
    assert "Traceback" not in out.err + out.out
    assert len(lines) == 1 and lines[0].startswith("effnb: "), out.err
    assert needle in lines[0], lines[0]
    return lines[0]


CLI_CASES = [
    (["audit", "tiny-llama", "--json", "/dev/full"], "--json /dev/full: cannot write there"),
    (["audit", "tiny-llama", "--json", f"{MISSING}/r.json"], "the folder /nonexistent-effnb-dir does not exist"),
    (["audit", "tiny-llama", "--json", "{tmp}/folder"], "is a directory"),
    (["quantize", "tiny-llama", "--method", "int8", "--no-measure", "-o", "/dev/full/out"],
     "-o /dev/full/out: not a directory (/dev/full)"),
    (["quantize", "tiny-llama", "--method", "int8", "--no-measure", "-o", "{tmp}/afile/ckpt"], "not a directory"),
    (["quantize", "tiny-llama", "--method", "int8", "--no-measure", "-o", "{tmp}/afile"], "not a directory"),
    (["quantize", "tiny-llama", "--method", "int8", "--no-measure", "-o", "{tmp}/ok", "--json", "/dev/full"],
     "--json /dev/full"),
    (["audit", ""], "a model name is empty"),
    (["audit", "tiny-llama", "--json", ""], "--json needs a file path, got ''"),
    (["quantize", "tiny-llama", "-o", ""], "-o needs a directory path, got ''"),
    (["audit", "tiny-lama"], "Did you mean 'tiny-llama'?"),
    (["audit", f"{MISSING}/model"], "unknown model"),
    (["audit", "{tmp}/empty_model"], ""),
    (["audit", "{tmp}/bad.gguf"], ""),
    (["audit", "tiny-llama", "--prompt-tokens", "10000000"], "prompt_tokens must be at most 1,000,000"),
    (["audit", "tiny-llama", "--decode-tokens", "-4"], "decode_tokens must be a positive integer, got -4"),
    (["audit", "tiny-llama", "--text", "~/effnb-missing-corpus.txt"], "text file not found"),
    (["audit", "tiny-llama", "--bogus"], "unrecognized arguments: --bogus"),
    (["lora", "tiny-llama", "--rank", "100000"], "rank must be at most 4,096"),
    (["lora", "tiny-llama", "--rank", "0"], "rank must be a positive integer"),
    (["finetune", "tiny-llama", "--data", "/home/me/my data.txt"], "data file not found: '/home/me/my data.txt'"),
    (["finetune", "tiny-llama", "--steps", "0"], "steps must be a positive integer, got 0"),
    (["moe", "tiny-llama", "--experts", "1", "--top-k", "1"], "experts must be an integer >= 2"),
    (["moe", "tiny-llama", "--sweep", "1,99"], "sweep value must be at most experts=8, got 99"),
    (["moe-stats", "tiny-mixtral", "--text", "./effnb-missing.txt"], "text file not found"),
    (["quantize", "tiny-llama", "--method", "nf5"], "invalid choice: 'nf5'"),
    (["quantize", "tiny-llama", "--group-size", "64.0"], "invalid int value: '64.0'"),
    (["compare", "tiny-llama", "tiny-llama", "-o", "{tmp}/ckpt"], "-o: the compare command makes no model to save"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["help", "frobnicate"], "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "needle"), CLI_CASES, ids=[" ".join(c[0])[:40] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(capsys, paths, argv, needle):
    cli_fails(capsys, [a.format(tmp=paths) for a in argv], needle)
    assert not (paths / "ok").exists()  # a refused output means no work and no checkpoint


def test_cli_output_that_takes_no_model_still_prints_the_report(capsys, paths):
    line = cli_fails(capsys, ["audit", "tiny-llama", *Q, "-o", str(paths / "ckpt")],
                     "-o: the audit command makes no model to save")
    assert line.endswith("use --json for its report")


def test_json_is_replaced_whole_and_probing_changes_nothing(paths, capsys):
    target = paths / "report.json"
    target.write_text("previous report\n")
    os.chmod(target, 0o640)
    assert outputs.check_output_file(str(target)) == str(target)
    assert target.read_text() == "previous report\n"  # the probe neither truncates nor appends
    fresh = paths / "new.json"
    outputs.check_output_file(str(fresh))
    assert not fresh.exists()  # the probe file is removed
    assert cli.main(["audit", "tiny-llama", *Q, "--json", str(target), "-q"]) == 0
    effnb.report.validate(json.loads(target.read_text()))
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert not [p for p in os.listdir(paths) if p.startswith(".effnb-")]  # no temporary file left


# --------------------------------------------------------------------------- the CLI, real processes

SUBPROCESS_CASES = [
    (["audit", "tiny-llama", "--json", "/dev/full"], "--json /dev/full: cannot write there"),
    (["quantize", "tiny-llama", "--method", "int8", "--no-measure", "-o", "/dev/full/out"], "not a directory"),
    (["audit", "tiny-llama", "--prompt-tokens", "10000000"], "prompt_tokens must be at most 1,000,000"),
    (["finetune", "tiny-llama", "--data", "/home/me/my data.txt"], "data file not found"),
    (["audit", "{tmp}/empty_model"], ""),
    (["audit", "tiny-lama"], "Did you mean 'tiny-llama'?"),
    (["lora", "tiny-llama", "--rank", "100000"], "rank must be at most 4,096"),
    (["moe", "tiny-llama", "--experts", "1", "--top-k", "1"], "experts must be an integer >= 2"),
    (["audit", "tiny-llama", "--text", "~/effnb-missing-corpus.txt"], "text file not found"),
    (["audit", ""], "a model name is empty"),
    (["moe", "tiny-llama", "--experts", "3", "--top-k", "1", "--no-measure"], "experts=3"),  # fails after loading
]


def _run_cli(argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("EFFNB_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "effnb.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_processes_exit_2_with_one_line(paths):
    argvs = [[a.format(tmp=paths) for a in argv] for argv, _ in SUBPROCESS_CASES]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(_run_cli, argvs))
    for (argv, needle), proc in zip(SUBPROCESS_CASES, done):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr + proc.stdout, argv
        assert len(lines) == 1 and lines[0].startswith("effnb: ") and needle in lines[0], (argv, proc.stderr)
        assert proc.stdout == "", argv
