"""The embedded real models: the audit a new user sees first."""

from __future__ import annotations

import math

import pytest

import effnb

pytestmark = pytest.mark.slow

FAST = {"repeats": 1, "warmup": 0, "decode_tokens": 8, "quality_tokens": 512}


def test_smollm2_audit(smollm2, ip):
    ip.user_ns["model"] = smollm2
    ip.run_line_magic("efficient", " ".join(["audit", "model", "-q", "-o", "rep",
                                             *[f"--{k.replace('_', '-')} {v}" for k, v in FAST.items()]]))
    row = ip.user_ns["rep"].rows[0]
    assert row["parameters"] == 134_515_008  # "about 134.5 M"
    assert row["weight_bytes"] == 134_515_008 * 4  # fp32, tied embeddings counted once
    assert row["decode_tokens_per_s"] > 0
    assert row["quality"]["metric"] == "perplexity" and math.isfinite(row["quality"]["value"])
    assert 2 < row["quality"]["value"] < 30
    assert 2.4e8 < row["flops_per_token"] < 3.2e8  # ~2 x 134.5 M, attention on top


def test_minilm_encoder_quality_needs_no_reference(minilm):
    rep = effnb.compare(minilm, minilm, names=["a", "b"], speed=False, flops=False, energy=False)
    q = rep.rows[0]["quality"]
    assert q["metric"] == "recall@1"
    assert q["value"] > 0.3  # the real encoder finds many functions from their names; random ones do not
    assert rep.rows[1]["quality"]["agreement"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rep.rows[0]["parameters"] == sum(p.numel() for p in minilm.parameters())
