"""Capstone exercises: quality change, picking a variant under constraints, the report card dict."""

from __future__ import annotations

import pytest

from effnb import exercises
from effnb.report import Report


def _row(name, mb, tps, ppl):
    return {"name": name, "parameters": 1000, "weight_bytes": int(mb * 1e6), "peak_memory_bytes": None,
            "prefill_ms": 10.0, "decode_tokens_per_s": tps, "quality": {"metric": "perplexity", "value": ppl},
            "energy": {"joules_per_token": None, "method": "not measured"}, "flops_per_token": None, "extra": {}}


@pytest.fixture()
def card():
    env = {"device": "cpu", "date": "2026-11-23", "versions": {}, "threads": 2}
    return Report([_row("fp32", 538, 13.0, 8.80), _row("int8", 250, 20.0, 8.82),
                   _row("nf4", 200, 9.0, 9.50), _row("int4", 180, 14.0, 10.0)], env, title="card")


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


def test_capstone_exercises_are_registered():
    assert exercises.list_exercises("capstone") == ["capstone.card", "capstone.pick", "capstone.quality_change"]


def test_quality_change(card, capsys):
    right = (9.50 / 8.80 - 1) * 100
    assert _verdict(capsys, "capstone.quality_change", right, report=card, variant="nf4")[0]
    for wrong, text in [(right / 100, "fraction"), (-right, "sign is flipped"), (9.50 - 8.80, "absolute difference"),
                        (42.0, "not the relative change")]:
        ok, out = _verdict(capsys, "capstone.quality_change", wrong, report=card, variant="nf4")
        assert not ok and text in out, (wrong, out)
    ok, out = _verdict(capsys, "capstone.quality_change", 1.0, report=card, variant="nf5")
    assert not ok and "no variant named 'nf5'" in out


def test_pick(card, capsys):
    ctx = {"report": card, "budget_mb": 300, "max_loss_pct": 10}
    assert _verdict(capsys, "capstone.pick", "int8", **ctx)[0]  # int8 fastest within both limits
    ok, out = _verdict(capsys, "capstone.pick", "fp32", **ctx)
    assert not ok and "over the 300 MB budget" in out
    ok, out = _verdict(capsys, "capstone.pick", "int4", **{**ctx, "max_loss_pct": 5})
    assert not ok and "more than the 5 % allowed" in out
    ok, out = _verdict(capsys, "capstone.pick", "nf4", **ctx)
    assert not ok and "decodes faster" in out
    ok, out = _verdict(capsys, "capstone.pick", "int9", **ctx)
    assert not ok and "no variant is named 'int9'" in out
    # nothing fits: None is right, a name is wrong
    tight = {**ctx, "budget_mb": 100}
    assert _verdict(capsys, "capstone.pick", None, **tight)[0]
    ok, out = _verdict(capsys, "capstone.pick", "int4", **tight)
    assert not ok and "the answer is None" in out


def test_card(card, capsys):
    assert _verdict(capsys, "capstone.card", card.to_dict(), report=card)[0]
    for wrong, text in [(card.to_json(), "to_dict()"), (card, "the Report object itself"),
                        (card.ratios(), "is a list"), ({"schema": "effnb.report"}, "does not follow the effnb.report schema")]:
        ok, out = _verdict(capsys, "capstone.card", wrong, report=card)
        assert not ok and text in out, (type(wrong), out)
    other = card.to_dict()
    other["variants"] = other["variants"][:2]
    ok, out = _verdict(capsys, "capstone.card", other, report=card)
    assert not ok and "build it from the same report" in out


def test_instructor_solutions_pass_their_own_checks(card, capsys):
    ctx = {"quality_change": {"report": card, "variant": "nf4"},
           "pick": {"report": card, "budget_mb": 300, "max_loss_pct": 10},
           "card": {"report": card}}
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("capstone"):
            kw = ctx[key.split(".")[1]]
            ns = {"card": card, "variant": "nf4", "BUDGET_MB": 300, "MAX_LOSS_PCT": 10}  # the notebook's names
            exec(exercises.solution(key), ns)
            assert exercises.check(key, ns["answer"], **kw), key
    finally:
        exercises.show_solutions(False)
