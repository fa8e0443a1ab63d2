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


def test_embedded_weights_are_read_into_memory_with_the_files_values(smollm2, minilm):
    """Not memory-mapped: a mapped file's resident pages stay counted while any of its tensors lives
    (after ``del model`` with a shared embedding, all of SmolLM2 stayed resident). Same values as
    transformers' own (memory-mapping) loader."""
    import gc

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    for model, auto in ((smollm2, AutoModelForCausalLM), (minilm, AutoModel)):
        ref = auto.from_pretrained(model.name_or_path, dtype=torch.float32)
        ours, theirs = model.state_dict(), ref.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), model.name_or_path
        del ref, theirs
        gc.collect()
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "model.safetensors" not in maps
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight  # still tied
