"""Bandwidth accounting: bytes read per decode token (exact), the read bandwidth (measured once), the fraction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effnb
from effnb.measure import bandwidth
from effnb.measure.bandwidth import bytes_per_token, read_bandwidth
from effnb.report import validate
from effnb.testing import QUICK

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_MB = "8"  # the bandwidth tensor of these tests: cache-sized, fast; the figure is only checked for sense


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.ReLU(), nn.Linear(96, 32, bias=False))


def test_fp32_linear_stack_is_every_weight_bias_and_norm():
    expected = (64 * 96 + 96) * 4 + (96 + 96) * 4 + 96 * 32 * 4
    assert bytes_per_token(_stack()) == expected


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_layers_count_codes_scales_and_zeros(method):
    q = effnb.quantize(_stack(), method=method, group_size=32, measure=False).model
    layers = [m for m in q.modules() if hasattr(m, "storage_bytes")]
    assert len(layers) == 2
    expected = 96 * 4 * 2  # the LayerNorm stays fp32
    for m in layers:
        n, k = m.out_features, m.in_features
        codes = n * k // 2 if method == "int4" else n * k
        per_group = m.scales.element_size() + (m.zeros.element_size() if getattr(m, "zeros", None) is not None else 0)
        expected += codes + n * (k // 32) * per_group + (n * 4 if m.bias is not None else 0)
        assert m.storage_bytes() == codes + n * (k // 32) * per_group
    assert bytes_per_token(q) == expected
    assert bytes_per_token(q) < bytes_per_token(_stack()) / 2


def _llama_parts(m) -> tuple[int, int, int]:
    """(bytes of every Linear but the head, bytes of the norms, embedding table bytes) of tiny-llama."""
    linear = sum(x.weight.numel() * 4 for name, x in m.named_modules() if isinstance(x, nn.Linear) and name != "lm_head")
    norms = sum(p.numel() * 4 for name, p in m.named_parameters() if "norm" in name)
    return linear, norms, m.model.embed_tokens.weight.numel() * 4


def test_embedding_counts_one_row_and_a_tied_head_the_whole_table():
    m = effnb.load_model("tiny-llama")
    vocab, hidden = m.model.embed_tokens.weight.shape
    linear, norms, table = _llama_parts(m)
    head = m.lm_head.weight.numel() * 4
    assert bytes_per_token(m) == linear + norms + hidden * 4 + head
    m.lm_head.weight = m.model.embed_tokens.weight  # tie
    assert bytes_per_token(m) == linear + norms + hidden * 4 + table
    assert table == vocab * hidden * 4


def test_read_bandwidth_is_measured_once(monkeypatch):
    first = read_bandwidth("cpu", megabytes=int(SMALL_MB))
    assert first["bytes_per_s"] > 1e6 and "median of" in first["method"] and "threads" in first["method"]

    def measure_again(*a, **k):
        raise AssertionError("measured a second time")

    monkeypatch.setattr(bandwidth, "measure_read_bandwidth", measure_again)
    assert read_bandwidth("cpu", megabytes=int(SMALL_MB)) is first
    with pytest.raises(ValueError, match="at least 1 MB"):
        read_bandwidth("cpu", megabytes=0)


def test_audit_rows_carry_bytes_bandwidth_and_fraction(monkeypatch, tiny_llama):
    monkeypatch.setenv(bandwidth.ENV_MB, SMALL_MB)
    rep = effnb.audit(tiny_llama, **QUICK, quality=False, flops=False, energy=False)
    row = rep.rows[0]
    assert row["bytes_per_token"] == bytes_per_token(tiny_llama)
    assert row["read_bandwidth_bytes_per_s"] == read_bandwidth("cpu")["bytes_per_s"]
    assert rep.environment["read_bandwidth"] == read_bandwidth("cpu")
    assert row["bandwidth_fraction"] == pytest.approx(
        row["decode_tokens_per_s"] * row["bytes_per_token"] / row["read_bandwidth_bytes_per_s"])
    validate(rep.to_dict())
    assert "decode vs bandwidth limit" in rep.to_text() and "tokens/s limit" in rep._repr_html_()
    assert rep.to_dataframe()["bandwidth_fraction"].iloc[0] == pytest.approx(row["bandwidth_fraction"])


def test_without_decode_the_fields_are_none_and_nothing_is_shown(tiny_llama):
    rep = effnb.audit(tiny_llama, speed=False, quality=False, flops=False, energy=False)
    row = rep.rows[0]
    assert row["bytes_per_token"] is None and row["read_bandwidth_bytes_per_s"] is None
    assert row["bandwidth_fraction"] is None
    assert "bandwidth" not in rep.to_text() and "read_bandwidth" not in rep.environment
    validate(rep.to_dict())
