"""The quantization exercises: a right answer passes, the usual wrong ones get a helpful message."""

from __future__ import annotations

import math

import pytest
import torch

from effnb import exercises


def _msg(capsys) -> str:
    return capsys.readouterr().out


def test_int4_bytes(capsys):
    ctx = {"out_features": 576, "in_features": 1536, "group_size": 64}
    right = 576 * 1536 // 2 + 576 * 24 * 4
    assert exercises.check("quant.int4_bytes", right, **ctx)
    assert not exercises.check("quant.int4_bytes", 576 * 1536 // 2, **ctx)
    assert "packed codes only" in _msg(capsys)
    assert not exercises.check("quant.int4_bytes", 576 * 1536, **ctx)
    assert "half a byte" in _msg(capsys)
    assert exercises.check("quant.int4_bytes", torch.tensor(right), **ctx)  # a computed tensor or float is fine
    assert exercises.check("quant.int4_bytes", float(right), **ctx)
    capsys.readouterr()
    for wrong, text in [(576 * 1536 // 2 + 24 * 4, "counts the groups of one row only"),
                        (576 * 1536 // 2 + 576 * 24 * 8, "as fp32 (4 bytes each)"),
                        (8 * right, "counts bits"),
                        (576 * 1536 // 2 + 576 * 24 * 2, "scales but not the zeros"),
                        (123, "expected about 498 kB"),
                        ("big", "should be a number")]:
        assert not exercises.check("quant.int4_bytes", wrong, **ctx)
        assert text in _msg(capsys), wrong


def test_int4_bytes_matches_what_effnb_stores():
    from effnb.kernels import reference as F
    from effnb.kernels.linear import QuantLinear

    from effnb.exercises.quant import int4_layer_bytes

    w = torch.randn(96, 256)
    layer = QuantLinear(256, 96, "int4", 64, F.quantize_int4(w, 64))
    assert layer.storage_bytes() == int4_layer_bytes(96, 256, 64)


def test_snr(capsys):
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w_q = w + 0.01 * torch.randn(64, 64)
    right = 10 * math.log10(w.pow(2).sum().item() / (w - w_q).pow(2).sum().item())
    assert exercises.check("quant.snr", right, w=w, w_q=w_q)
    assert not exercises.check("quant.snr", 2 * right, w=w, w_q=w_q)
    assert "use 10 * log10, not 20" in _msg(capsys)
    assert not exercises.check("quant.snr", -right, w=w, w_q=w_q)
    assert "wrong sign" in _msg(capsys)


def test_best_method(capsys):
    results = {"int4": 14.3, "nf4": 13.8, "hqq": 13.1}
    assert exercises.check("quant.best_method", "hqq", results=results)
    assert not exercises.check("quant.best_method", "int4", results=results)
    assert "lower perplexity" in _msg(capsys)
    assert not exercises.check("quant.best_method", "gptq", results=results)
    assert "not one of the methods" in _msg(capsys)
    assert not exercises.check("quant.best_method", 13.1, results=results)
    assert "answer the method's name" in _msg(capsys)
    assert not exercises.check("quant.best_method", "nf4", results=results)
    assert "'nf4' (13.800) is beaten by another method" in _msg(capsys)


@pytest.mark.parametrize("key", ["quant.int4_bytes", "quant.snr", "quant.best_method"])
def test_hints_exist(key):
    assert exercises.hint(key)


def test_quant_exercises_are_registered():
    assert exercises.list_exercises("quant") == ["quant.best_method", "quant.int4_bytes", "quant.snr"]


def test_instructor_solutions_pass_their_own_checks(capsys):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w_q = w + 0.05 * torch.randn(32, 64)
    ppl = {"int4": 14.3, "nf4": 13.8, "hqq": 13.1}
    # names as in notebook 02's exercise cells -> the checks' keywords
    cases = {"quant.int4_bytes": ({"out_features": 576, "in_features": 1536, "GROUP_SIZE": 64},
                                  {"out_features": 576, "in_features": 1536, "group_size": 64}),
             "quant.snr": ({"w": w, "w_q": w_q, "math": math}, {"w": w, "w_q": w_q}),
             "quant.best_method": ({"ppl": ppl}, {"results": ppl})}
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("quant"):
            names, kw = cases[key]
            ns = dict(names)
            exec(exercises.solution(key), ns)
            assert exercises.check(key, ns["answer"], **kw), key
    finally:
        exercises.show_solutions(False)
