"""Bring your own model: every technique on models effnb did not load, with or without a tokenizer.

Models are built from transformers configs (random weights, fixed seed, no tokenizer attached) or
are plain ``nn.Module``s. Each technique that applies must return a Result whose report has memory
rows and a quality row, and must leave the input exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import transformers as T

import effnb

T.logging.set_verbosity_error()

FAST = {"repeats": 1, "warmup": 0, "decode_tokens": 4, "prompt_tokens": 32, "quality_tokens": 256, "window": 128,
        "energy": False}


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers, GELU FFN
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256, bos_token_id=0,
                           eos_token_id=1)
        return T.GPT2LMHeadModel(cfg)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=512))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=512))
    if kind == "opt":  # ReLU FFN inside the decoder layer
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512,
                                            word_embed_proj_dim=64))
    if kind == "bert":
        return T.BertModel(T.BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=512))
    assert kind == "sequential"
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


KINDS = ["gpt2", "llama", "qwen2", "opt", "bert", "sequential"]
CAUSAL = {"gpt2", "llama", "qwen2", "opt"}
QUALITY = {"gpt2": "top-1 agreement", "llama": "top-1 agreement", "qwen2": "top-1 agreement",
           "opt": "top-1 agreement", "bert": "cosine to original", "sequential": "relative output error"}


def _check_report(report, kind: str) -> None:
    for row in report.rows:
        assert row["weight_bytes"] > 0 and row["peak_memory_bytes"] >= row["weight_bytes"], row["name"]
        q = row["quality"]
        assert q["metric"] == QUALITY[kind], q
        assert q["value"] is not None and q["method"].startswith(("no tokenizer", "not a transformers model")), q
    base, new = report.rows[0]["quality"], report.rows[-1]["quality"]
    assert base["reference"] == "itself (the baseline)"
    if kind in CAUSAL:
        assert 0.0 <= new["top1_agreement"] <= 1.0 and new["kl_divergence"] >= 0.0
        assert f"{new['tokens']:,} fixed token ids" in new["method"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_technique_on_a_model_effnb_did_not_load(kind):
    model = _build(kind).eval()
    before = effnb.state_hash(model)
    assert effnb.find_tokenizer(model) is None

    audit = effnb.audit(model, **FAST)
    q = audit.rows[0]["quality"]
    assert q["metric"] == QUALITY[kind] and q["value"] is None and "single audit" in q["reason"]
    assert audit.rows[0]["peak_memory_bytes"] >= audit.rows[0]["weight_bytes"]
    if kind in CAUSAL:
        assert audit.rows[0]["decode_tokens_per_s"] > 0 and "fixed token ids" in audit.rows[0]["inputs"]

    q8 = effnb.quantize(model, method="int8")
    _check_report(q8.report, kind)
    assert q8.report.rows[1]["weight_bytes"] < q8.report.rows[0]["weight_bytes"]
    # int8 keeps the outputs close: the measure must see that
    new_q = q8.report.rows[1]["quality"]
    if kind in CAUSAL:
        assert new_q["top1_agreement"] > 0.9 and new_q["kl_divergence"] < 0.05
    elif kind == "bert":
        assert new_q["value"] > 0.99
    else:
        assert new_q["value"] < 0.05

    nf4 = effnb.quantize(model, method="nf4", measure=False)
    assert nf4.report.rows[1]["weight_bytes"] < q8.report.rows[1]["weight_bytes"]

    targets = "all"
    lo = effnb.lora(model, rank=4, targets=targets, measure=True)
    _check_report(lo.report, kind)
    assert lo.report.rows[1]["quality"]["value"] == pytest.approx(
        1.0 if kind != "sequential" else 0.0, abs=1e-6)  # B = 0 at initialisation: same outputs

    if kind in CAUSAL:  # fine-tuning a model without a tokenizer: on the user's token ids
        ids = torch.randint(8, 512, (400,), generator=torch.Generator().manual_seed(1))
        ft = effnb.finetune(lo.model, data=ids, steps=3, batch_size=1, seq_len=32, eval_every=0, eval_tokens=64,
                            generations=0, live=False)
        assert [r["quality"]["metric"] for r in ft.report.rows] == ["held-out loss (user token ids)"] * 2
        assert ft.report.rows[1]["peak_memory_bytes"] >= ft.report.rows[1]["weight_bytes"]
        assert ft.details["steps"] == 3
        with pytest.raises(ValueError, match="has no tokenizer, so effnb cannot turn data='python-api' into tokens"):
            effnb.finetune(lo.model, steps=1)
        adapted = ft.model
    else:
        adapted = lo.model
    merged = effnb.merge(adapted)
    err = merged.details["merge_error"]
    assert err["max_abs_diff"] < 1e-4, err  # a float base: merging changes nothing
    assert err["compared"] == {"bert": "hidden states", "sequential": "outputs"}.get(kind, "logits")
    assert effnb.state_hash(lo.model.get_base_model()) is not None

    if kind != "sequential":  # a plain Sequential has no recognisable FFN block
        moe = effnb.moe(model, experts=4, top_k=2, audit=FAST, timing_repeats=1, ffn_tokens=32)
        _check_report(moe.report, kind)
    assert effnb.state_hash(model) == before, f"{kind}: the input model changed"


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bert"])
def test_moe_split_is_exact_at_top_k_equal_experts_on_plain_ffns(kind):
    model = _build(kind).eval()
    res = effnb.moe(model, experts=4, top_k=4, measure=False)
    ids = torch.randint(8, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model(input_ids=ids), res.model(input_ids=ids)
    key = "last_hidden_state" if kind == "bert" else "logits"
    diff = (getattr(a, key) - getattr(b, key)).abs().max().item()
    assert diff < 1e-4, f"{kind}: split at top_k == experts differs from dense by {diff}"


def test_measure_false_needs_no_tokenizer_and_runs_nothing():
    model = _build("llama").eval()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    res = effnb.quantize(model, method="int8", measure=False)
    assert not calls, "measure=False must not run the model"
    row = res.report.rows[1]
    assert row["quality"]["value"] is None and row["prefill_ms"] is None
    assert row["peak_memory"]["method"].startswith("weight bytes only")


def test_custom_module_needs_example_inputs_or_says_so():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x, scale):
            return self.proj(self.norm(x)) * scale

    model = TwoInputs().eval()
    with pytest.raises(ValueError, match=r"cannot tell what this TwoInputs takes as input.*example_inputs="):
        effnb.audit(model, **FAST)
    x = (torch.randn(4, 16), torch.tensor(2.0))
    rep = effnb.audit(model, example_inputs=x, **FAST)
    assert rep.rows[0]["prefill_ms"] > 0 and rep.rows[0]["inputs"] == "example inputs given"
    effnb.attach_example_inputs(model, x)
    res = effnb.quantize(model, method="int8", group_size=0)  # per output channel: 16 inputs hold no group of 64
    assert res.report.rows[1]["quality"]["metric"] == "relative output error"
    assert 0 < res.report.rows[1]["quality"]["value"] < 0.05
    with pytest.raises(TypeError, match="example inputs must be a tensor"):
        effnb.attach_example_inputs(model, "not a tensor")


def test_tokenizer_found_in_the_folder_a_model_was_loaded_from(tmp_path):
    tiny = effnb.load_model("tiny-llama")
    tiny.save_pretrained(tmp_path)
    effnb.tokenizer_for(tiny).save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path)  # the user's own loading: no attach_tokenizer
    rep = effnb.audit(model, **FAST)
    assert rep.rows[0]["quality"]["metric"] == "perplexity" and rep.rows[0]["quality"]["value"] > 1
    assert rep.rows[0]["tokenizer"] == "attached or found"


def test_load_model_keeps_the_checkpoint_dtype(tmp_path):
    tiny = effnb.load_model("tiny-llama").to(torch.float16)
    tiny.save_pretrained(tmp_path)
    effnb.tokenizer_for(tiny).save_pretrained(tmp_path)
    model = effnb.load_model(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert effnb.load_model(str(tmp_path), dtype="fp32").model.embed_tokens.weight.dtype == torch.float32
    res = effnb.quantize(str(tmp_path), method="int8", measure=False)
    assert res.report.rows[0]["dtype"] == "float16"


def test_a_folder_that_needs_remote_code_is_refused(tmp_path):
    import json

    tiny = effnb.load_model("tiny-llama")
    tiny.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(ValueError, match="needs custom code.*never runs code from a model folder"):
        effnb.load_model(str(tmp_path))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_a_hub_id_not_in_the_cache_fails_fast_offline(env, tmp_path):
    code = ("import time, effnb, effnb.models\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
            "t = time.perf_counter()\ntry:\n    effnb.load_model('nobody-here/no-such-model')\n"
            "except ValueError as e:\n    print('ERR', e)\nprint('S', time.perf_counter() - t)\n")
    full = {**os.environ, "HF_HOME": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120).stdout
    err = next(line for line in out.splitlines() if line.startswith("ERR"))
    seconds = float(next(line for line in out.splitlines() if line.startswith("S ")).split()[1])
    assert "could not load 'nobody-here/no-such-model' (not in the local Hugging Face cache" in err
    # imports done before the clock starts: what is timed is the failing lookup (~23 s with DNS retries before)
    assert seconds < 1, f"took {seconds:.2f} s"


def test_offline_probe_is_quick():
    from effnb.models import probe_hub

    t = time.perf_counter()
    assert probe_hub("http://127.0.0.1:9") is False
    assert time.perf_counter() - t < 1.5


def test_magic_and_widget_on_a_model_without_tokenizer(ip):
    from effnb.testing import QUICK

    ip.user_ns["g"] = _build("gpt2").eval()
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    ip.run_line_magic("efficient", f"audit g {opts} -o rep -q")
    assert ip.user_ns["rep"].rows[0]["quality"]["metric"] == "top-1 agreement"
    ip.run_line_magic("efficient", "quantize g --method int8 --no-measure -o q -q")
    q = ip.user_ns["q"]
    model = getattr(q, "model", q)
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == 8  # 2 blocks x 4 Conv1D
    from effnb.widgets import QuantExplorer

    w = QuantExplorer(ip.user_ns["g"])
    assert len(w.layers) >= 8  # the Conv1D layers are found and explorable without a tokenizer
