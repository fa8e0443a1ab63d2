"""%efficient in a real IPython shell, and the effnb command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from IPython.core.error import UsageError

import effnb
from effnb import cli
from effnb.testing import QUICK

Q = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())


def usage_error(ip, line: str) -> str:
    with pytest.raises(UsageError) as err:
        ip.run_line_magic("efficient", line)
    return str(err.value)


def test_audit_variable_stores_report(ip, tiny_llama):
    ip.user_ns["model"] = tiny_llama
    ip.run_line_magic("efficient", f"audit model {Q} -o rep -q")
    rep = ip.user_ns["rep"]
    assert isinstance(rep, effnb.Report)
    assert rep.rows[0]["name"] == "model"
    assert rep.rows[0]["parameters"] == sum(p.numel() for p in tiny_llama.parameters())


def test_audit_embedded_name_and_json(ip, tmp_path):
    out = tmp_path / "r.json"
    ip.run_line_magic("efficient", f"audit tiny-llama {Q} --json {out} -q")
    d = json.loads(out.read_text())
    effnb.report.validate(d)


def test_compare_names_default_to_variables(ip, tiny_llama):
    ip.user_ns["a"] = tiny_llama
    ip.user_ns["b"] = effnb.copy_model(tiny_llama)
    ip.run_line_magic("efficient", f"compare a b {Q} -o cmp -q")
    assert ip.user_ns["cmp"].names == ["a", "b"]


def test_bad_input_gives_one_clear_line(ip, tiny_llama):
    ip.user_ns["not_a_model"] = [1, 2, 3]
    ip.user_ns["model"] = tiny_llama
    assert usage_error(ip, "audit undefined_thing") == (
        "name 'undefined_thing' is not defined in the notebook, and it is not an embedded model "
        "(smollm2-135m, minilm-l6, tiny-llama, tiny-mixtral, tiny-bert)")
    assert usage_error(ip, "audit not_a_model") == "'not_a_model' is a list, not a model (a torch.nn.Module)"
    assert usage_error(ip, "audti model").startswith("unknown command 'audti'. Did you mean 'audit'?")
    assert "unrecognized arguments: --bogus" in usage_error(ip, "audit model --bogus 3")
    assert "decode_tokens must be a positive integer, got 0" in usage_error(ip, "audit model --decode-tokens 0")
    assert "decode_tokens must be a positive integer, got -4" in usage_error(ip, "audit model --decode-tokens -4")
    assert "invalid int value: 'many'" in usage_error(ip, "audit model --repeats many")
    assert "Did you mean 'smollm2-135m'?" in usage_error(ip, "audit smollm-135m")
    assert "-o needs a Python variable name" in usage_error(ip, f"audit model {Q} -o 1x")


def test_errors_show_no_traceback(ip, capsys):
    result = ip.run_cell("%efficient audit nowhere_defined")
    captured = capsys.readouterr()
    assert not result.success
    assert "Traceback" not in captured.out + captured.err
    assert "UsageError: name 'nowhere_defined' is not defined" in captured.out + captured.err


def test_help_lists_commands_and_options(ip, capsys):
    ip.run_line_magic("efficient", "help")
    text = capsys.readouterr().out
    for name in ("audit", "compare", "help"):
        assert f"  {name}" in text
    ip.run_line_magic("efficient", "help audit")
    text = capsys.readouterr().out
    assert "--decode-tokens DECODE_TOKENS" in text and "-o NAME" in text
    ip.run_line_magic("efficient", "audit --help")
    assert "--quality-tokens" in capsys.readouterr().out


def test_cell_magic_measures_the_cell(ip):
    ip.run_cell_magic("efficient", "-o m -q", "x = bytearray(50_000_000)\ny = sum(range(1000))")
    m = ip.user_ns["m"]
    assert ip.user_ns["y"] == 499500
    assert m["wall_s"] > 0 and m["cell_succeeded"]
    assert m["cpu_peak_bytes"] >= 40_000_000
    assert m["energy_joules"] is None or m["energy_joules"] >= 0
    with pytest.raises(UsageError, match="unknown option '--fast'"):
        ip.run_cell_magic("efficient", "--fast", "pass")


def test_cli_audit_json_and_errors(tmp_path, capsys):
    out = tmp_path / "a.json"
    assert cli.main(["audit", "tiny-llama", *Q.split(), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "report written to" in text
    effnb.report.validate(json.loads(out.read_text()))
    assert cli.main(["audit", "tiny-lama"]) == 2
    assert "Did you mean 'tiny-llama'?" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["help"]) == 0
    assert "audit" in capsys.readouterr().out


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "effnb.cli", "help", "audit"], capture_output=True, text=True)
    assert out.returncode == 0 and "--prompt-tokens" in out.stdout
