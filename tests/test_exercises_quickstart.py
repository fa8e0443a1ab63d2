"""Quickstart exercises: a correct answer passes, typical mistakes get a message that helps."""

from __future__ import annotations

import pytest

from effnb import exercises
from effnb.report import Report

PARAMS = 134_515_008


def _row(name, weight_bytes, tps=13.0, params=PARAMS, ppl=8.8):
    return {"name": name, "parameters": params, "weight_bytes": weight_bytes, "peak_memory_bytes": None,
            "prefill_ms": 10.0, "decode_tokens_per_s": tps, "quality": {"metric": "perplexity", "value": ppl},
            "energy": {"joules_per_token": None, "method": "not measured"}, "flops_per_token": None, "extra": {},
            "weight_bytes_by_dtype": {"float32": weight_bytes}}


@pytest.fixture()
def report():
    env = {"device": "cpu", "date": "2026-11-23", "versions": {}, "threads": 2}
    return Report([_row("fp32", PARAMS * 4), _row("bf16", PARAMS * 2, tps=15.0)], env)


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


def test_quickstart_exercises_are_registered():
    assert exercises.list_exercises("quickstart") == [
        "quickstart.bf16_smaller", "quickstart.ms_per_token", "quickstart.weight_mb"]


def test_weight_mb(report, capsys):
    ok, out = _verdict(capsys, "quickstart.weight_mb", PARAMS * 4 / 1e6, report=report)
    assert ok and "correct" in out
    for wrong, text in [(PARAMS / 1e6, "parameters in millions"), (PARAMS * 32 / 1e6, "counts bits"),
                        (PARAMS * 4 / 2**20, "MiB"), (PARAMS * 4, "in bytes"), (PARAMS * 2 / 1e6, "2 bytes"),
                        (123.0, "multiply the parameter count")]:
        ok, out = _verdict(capsys, "quickstart.weight_mb", wrong, report=report)
        assert not ok and text in out, (wrong, out)
        assert "hint: exercises.hint('quickstart.weight_mb')" in out


def test_weight_mb_rejects_non_numbers(report, capsys):
    ok, out = _verdict(capsys, "quickstart.weight_mb", None, report=report)
    assert not ok and "should be a number" in out


def test_bf16_smaller(report, capsys):
    assert _verdict(capsys, "quickstart.bf16_smaller", 2.0, report=report)[0]
    ok, out = _verdict(capsys, "quickstart.bf16_smaller", 0.5, report=report)
    assert not ok and "baseline / variant" in out
    ok, out = _verdict(capsys, "quickstart.bf16_smaller", float(PARAMS * 2), report=report)
    assert not ok and "difference in bytes" in out
    ok, out = _verdict(capsys, "quickstart.bf16_smaller", 4.0, report=report)
    assert not ok and f"'fp32' holds {PARAMS * 4:,} bytes and 'bf16' {PARAMS * 2:,}" in out


def test_bf16_smaller_needs_two_variants(capsys):
    env = {"device": "cpu", "date": "2026-11-23", "versions": {}, "threads": 2}
    one = Report([_row("fp32", PARAMS * 4)], env)
    ok, out = _verdict(capsys, "quickstart.bf16_smaller", 2.0, report=one)
    assert not ok and "1 variant(s)" in out


def test_ms_per_token(report, capsys):
    assert _verdict(capsys, "quickstart.ms_per_token", 1000 / 13.0, report=report)[0]
    ok, out = _verdict(capsys, "quickstart.ms_per_token", 1 / 13.0, report=report)
    assert not ok and "seconds per token" in out
    ok, out = _verdict(capsys, "quickstart.ms_per_token", 13.0, report=report)
    assert not ok and "reciprocal" in out
    ok, out = _verdict(capsys, "quickstart.ms_per_token", 50.0, report=report)
    assert not ok and "is not what a decode speed of 13.00 tokens/s implies" in out


def test_report_dict_is_accepted_too(report, capsys):
    assert _verdict(capsys, "quickstart.weight_mb", PARAMS * 4 / 1e6, report=report.to_dict())[0]


def test_solution_hidden_unless_instructor(monkeypatch, capsys):
    monkeypatch.delenv("EFFNB_SOLUTIONS", raising=False)
    exercises.show_solutions(False)
    assert exercises.solution("quickstart.weight_mb") is None
    assert "instructors" in capsys.readouterr().out
    monkeypatch.setenv("EFFNB_SOLUTIONS", "1")
    assert "* 4 / 1e6" in exercises.solution("quickstart.weight_mb")


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'quickstart.weight_mb'"):
        exercises.check("quickstart.weight_mbs", 1.0)


def test_instructor_solutions_pass_their_own_checks(report, capsys):
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("quickstart"):
            ns = {"baseline": report, "cmp": report}
            exec(exercises.solution(key), ns)
            assert exercises.check(key, ns["answer"], report=report), key
    finally:
        exercises.show_solutions(False)
