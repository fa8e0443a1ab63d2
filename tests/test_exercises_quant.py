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


def test_int4_bytes_matches_what_effnb_stores():
    from effnb.exercises.quant import int4_layer_bytes
    from effnb.quant import formats as F
    from effnb.quant.linear import QuantLinear

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


@pytest.mark.parametrize("key", ["quant.int4_bytes", "quant.snr", "quant.best_method"])
def test_hints_exist(key):
    assert exercises.hint(key)
