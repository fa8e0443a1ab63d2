"""Routing statistics: transformers' MoE models (Mixtral, Qwen2-MoE, OLMoE) and effnb's, against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

import effnb
from effnb.models import attach_tokenizer, byte_tokenizer

TEXT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 3


@pytest.fixture(scope="module")
def tiny_mixtral():
    return effnb.load_model("tiny-mixtral")


def test_mixtral_stats_agree_with_direct_computation(tiny_mixtral):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    stats = effnb.moe_stats(tiny_mixtral, TEXT)
    ids = effnb.tokenizer_for(tiny_mixtral)(TEXT, return_tensors="pt").input_ids
    T = ids.shape[1]
    with torch.inference_mode():
        out = tiny_mixtral(input_ids=ids, output_router_logits=True, use_cache=False)
    assert len(stats.layers) == len(out.router_logits) == 2
    for layer, logits in zip(stats.layers, out.router_logits):
        probs = torch.softmax(logits.double(), -1)
        index = probs.topk(2, -1).indices
        counts = torch.bincount(index.reshape(-1), minlength=4).double()
        # tokens per expert sum to tokens x top_k in every layer
        assert sum(layer["tokens_per_expert"]) == T * 2 == layer["tokens"] * layer["top_k"]
        assert layer["tokens_per_expert"] == counts.long().tolist()
        assert layer["max_over_mean"] == pytest.approx((counts.max() / counts.mean()).item())
        assert layer["coefficient_of_variation"] == pytest.approx((counts.std(unbiased=False) / counts.mean()).item())
        f = counts / T
        assert layer["aux_loss"] == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-5)
        ent = -(probs * probs.log()).sum(-1).mean().item()
        assert layer["router_entropy_nats"] == pytest.approx(ent, rel=1e-6)
        assert layer["router_entropy_share"] == pytest.approx(ent / math.log(4), rel=1e-6)
    # the aux loss over all layers is what transformers itself computes
    hf_aux = load_balancing_loss_func(out.router_logits, 4, 2).item()
    assert stats.aux_loss_all_layers == pytest.approx(hf_aux, rel=1e-5)
    # which tokens go where: the first tokens' experts in layer 0
    probs0 = torch.softmax(out.router_logits[0].float(), -1)
    assert [sorted(e) for e in stats.token_experts[0][:10]] == [sorted(r) for r in probs0.topk(2, -1).indices[:10].tolist()]
    assert len(stats.tokens) == min(48, T)


def test_stats_display_forms(tiny_mixtral):
    stats = effnb.moe_stats(tiny_mixtral, TEXT, show_tokens=8)
    html = stats._repr_html_()
    assert "MoE routing" in html and "max/mean" in html and "token &rarr; experts (8 tokens)" in html
    fig = stats.figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 2 and len(fig.data[0].z[0]) == 4
    assert abs(sum(fig.data[0].z[0]) - 1.0) < 1e-9  # shares of the assignments per layer
    assert stats.token_figure().data[0].type == "heatmap"
    d = stats.to_dict()
    assert d["schema"] == "effnb.moe_stats" and len(d["layers"]) == 2
    assert "aux loss" in stats.to_text()


def _tiny(config_cls, model_cls, **kw):
    tok = byte_tokenizer()
    cfg = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    model = model_cls(cfg)
    for n, p in model.named_parameters():  # some routers start at zero: give them something to route with
        if n.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return attach_tokenizer(model.eval(), tok)


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_other_transformers_moe_models(arch):
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        model = _tiny(Qwen2MoeConfig, Qwen2MoeForCausalLM, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:
        from transformers import OlmoeConfig, OlmoeForCausalLM

        model = _tiny(OlmoeConfig, OlmoeForCausalLM, num_experts=6, num_experts_per_tok=2)
    stats = effnb.moe_stats(model, TEXT, max_tokens=40)
    assert len(stats.layers) == 2
    for layer in stats.layers:
        assert layer["experts"] == 6 and sum(layer["tokens_per_expert"]) == 40 * 2


def test_effnb_moe_stats(tiny_llama):
    res = effnb.moe(tiny_llama, experts=4, top_k=2, measure=False, calibration_tokens=256)
    stats = effnb.moe_stats(res.model, TEXT, max_tokens=50)
    assert [r["router"] for r in stats.layers] == ["effnb", "effnb"]
    assert all(sum(r["tokens_per_expert"]) == 100 for r in stats.layers)


def test_no_router_names_what_was_looked_for(tiny_llama):
    with pytest.raises(ValueError, match="has no MoE routers; looked for effnb MoE blocks"):
        effnb.moe_stats(tiny_llama)
