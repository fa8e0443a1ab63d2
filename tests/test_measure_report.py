"""Measurements and reports: exact quantities, repeatability, schema, ratios."""

from __future__ import annotations

import json
import math

import pytest

import effnb
from effnb.report import REPORT_SCHEMA, Report, validate
from effnb.testing import QUICK


def test_parameters_and_weight_bytes_are_exact(tiny_llama):
    rep = effnb.audit(tiny_llama, speed=False, quality=False, flops=False, energy=False)
    row = rep.rows[0]
    expected = sum(p.numel() for p in tiny_llama.parameters())
    assert row["parameters"] == expected
    assert row["weight_bytes"] == expected * 4  # fp32, no tied weights in tiny-llama
    assert row["weight_bytes_by_dtype"] == {"float32": expected * 4}
    assert sum(row["weight_bytes_by_module"].values()) == row["weight_bytes"]


def test_tied_weights_counted_once():
    import torch

    m = effnb.load_model("tiny-llama")
    m.lm_head.weight = m.model.embed_tokens.weight  # tie
    rep = effnb.audit(m, speed=False, quality=False, flops=False, energy=False)
    assert rep.rows[0]["parameters"] == sum(p.numel() for p in m.parameters())
    assert rep.rows[0]["weight_bytes"] == sum(p.numel() for p in m.parameters()) * 4
    del torch


def test_two_audits_agree_on_exact_quantities_and_keep_spread(tiny_llama):
    opts = dict(QUICK, repeats=3)
    a = effnb.audit(tiny_llama, **opts).rows[0]
    b = effnb.audit(tiny_llama, **opts).rows[0]
    for key in ("parameters", "trainable_parameters", "weight_bytes", "weight_bytes_by_dtype", "flops_per_token"):
        assert a[key] == b[key], key
    assert a["quality"]["value"] == b["quality"]["value"]
    assert len(a["decode_spread"]["samples"]) == 3 and len(a["prefill_ms_spread"]["samples"]) == 3
    assert a["decode_spread"]["min"] <= a["decode_tokens_per_s"] <= a["decode_spread"]["max"]


def test_flops_per_token_matches_linear_layers(tiny_llama):
    row = effnb.audit(tiny_llama, speed=False, quality=False, energy=False, prompt_tokens=16).rows[0]
    # every Linear does 2*in*out FLOPs per token; attention adds a little on top
    linear = sum(2 * m.in_features * m.out_features for m in tiny_llama.modules() if isinstance(m, __import__("torch").nn.Linear))
    assert linear <= row["flops_per_token"] <= linear * 1.5


def test_energy_is_null_with_reason_when_no_counter(tiny_llama):
    from effnb.measure import EnergyMeter

    row = effnb.audit(tiny_llama, **QUICK).rows[0]
    meter = EnergyMeter("cpu")
    if meter.available:
        assert row["energy"]["joules_per_token"] > 0 and row["energy"]["method"].startswith("measured")
    else:
        assert row["energy"]["joules_per_token"] is None
        assert row["energy"]["method"] == "not measured" and row["energy"]["reason"]


def test_report_schema_ratios_and_formats(tiny_llama):
    import torch

    half = effnb.copy_model(tiny_llama).to(torch.bfloat16)
    rep = effnb.compare(tiny_llama, half, names=["fp32", "bf16"], **QUICK)
    d = rep.to_dict()
    validate(d)
    json.loads(rep.to_json())
    assert d["schema"] == "effnb.report" and d["schema_version"] == 1
    (ratio,) = d["ratios"]
    assert ratio["weight_bytes_smaller_x"] == pytest.approx(2.0)
    assert ratio["decode_speedup_x"] == pytest.approx(d["variants"][1]["decode_tokens_per_s"] / d["variants"][0]["decode_tokens_per_s"])
    for key in ("device", "date", "versions", "threads", "cpu"):
        assert key in d["environment"]
    df = rep.to_dataframe()
    assert list(df.index) == ["fp32", "bf16"]
    html = rep._repr_html_()
    assert "2.00x smaller" in html and "fp32" in html
    fig = rep.figure()
    assert len(fig.data) == 4
    assert Report.from_dict(d).names == ["fp32", "bf16"]


def test_schema_rejects_bad_report():
    with pytest.raises(ValueError, match="schema"):
        validate({"schema": "effnb.report", "schema_version": 1, "environment": {}, "variants": [], "ratios": []})
    assert REPORT_SCHEMA["properties"]["schema_version"]["const"] == 1


def test_audit_options_are_validated(tiny_llama):
    with pytest.raises(ValueError, match="decode_tokens must be a positive integer, got 0"):
        effnb.audit(tiny_llama, decode_tokens=0)
    with pytest.raises(ValueError, match="repeats must be a positive integer, got -2"):
        effnb.audit(tiny_llama, repeats=-2)
    with pytest.raises(TypeError, match="unknown audit option 'repeat'; did you mean 'repeats'"):
        effnb.audit(tiny_llama, repeat=3)
    with pytest.raises(TypeError, match="expected a torch.nn.Module model, got list"):
        effnb.audit([1, 2])


def test_audit_does_not_change_model(tiny_llama):
    before = effnb.state_hash(tiny_llama)
    tiny_llama.train()
    effnb.audit(tiny_llama, **QUICK)
    assert effnb.state_hash(tiny_llama) == before
    assert tiny_llama.training  # mode restored
    tiny_llama.eval()


def test_encoder_quality_is_retrieval_and_agreement(tiny_bert):
    import torch

    noisy = effnb.copy_model(tiny_bert)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rep = effnb.compare(tiny_bert, noisy, names=["base", "noisy"], **QUICK)
    base, other = rep.rows
    assert base["quality"]["metric"] == "recall@1" and 0 <= base["quality"]["value"] <= 1
    assert base["decode_tokens_per_s"] is None
    agree = other["quality"]["agreement"]
    assert 0 < agree["cosine"] < 1 and 0 <= agree["top5_agreement"] <= 1
    same = effnb.compare(tiny_bert, tiny_bert, **QUICK).rows[1]["quality"]["agreement"]
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5) and same["top5_agreement"] == 1.0


def test_perplexity_of_uniform_model_is_vocab_size():
    import torch

    m = effnb.load_model("tiny-llama")
    with torch.no_grad():
        m.lm_head.weight.zero_()
    ppl = effnb.measure.perplexity(m, "some text to score " * 20, max_tokens=128, window=64)
    assert ppl == pytest.approx(m.config.vocab_size, rel=1e-4)
    assert math.isfinite(ppl)


def test_snr_db():
    import torch

    from effnb.measure import snr_db

    x = torch.ones(100)
    assert snr_db(x, x) == math.inf
    assert snr_db(x, x * 1.1) == pytest.approx(20.0)
