"""Loading models and the offline corpora."""

from __future__ import annotations

import subprocess
import sys

import pytest

import effnb
from effnb import data


def test_import_effnb_does_not_load_heavy_libraries():
    code = ("import sys, effnb, effnb.magics, effnb.commands; effnb.commands.commands(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'plotly', 'ipywidgets') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import effnb loaded: {out.stdout.strip()}"


def test_unknown_model_name_lists_embedded_and_suggests():
    with pytest.raises(ValueError) as err:
        effnb.load_model("smollm2-135")
    msg = str(err.value)
    assert "unknown model 'smollm2-135'" in msg
    assert "Did you mean 'smollm2-135m'?" in msg
    for name in effnb.EMBEDDED_MODELS:
        assert name in msg


def test_load_model_rejects_non_string():
    with pytest.raises(TypeError, match="expects a model name or path"):
        effnb.load_model(42)


def test_tokenizer_travels_with_model_and_copies(tiny_llama):
    tok = effnb.tokenizer_for(tiny_llama)
    clone = effnb.copy_model(tiny_llama)
    assert effnb.tokenizer_for(clone) is tok
    assert effnb.state_hash(clone) == effnb.state_hash(tiny_llama)


def test_user_model_needs_tokenizer_once(tiny_llama):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="attach one once with effnb.attach_tokenizer"):
        effnb.tokenizer_for(model)
    effnb.attach_tokenizer(model, effnb.tokenizer_for(tiny_llama))
    assert effnb.tokenizer_for(model) is effnb.tokenizer_for(tiny_llama)


def test_tiny_models_are_deterministic_and_keep_user_rng():
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = effnb.load_model("tiny-llama")
    after = torch.rand(1)
    b = effnb.load_model("tiny-llama")
    assert torch.equal(before, after), "loading a tiny model changed the user's random stream"
    assert effnb.state_hash(a) == effnb.state_hash(b)


def test_tiny_mixtral_is_an_moe():
    m = effnb.load_model("tiny-mixtral")
    assert type(m).__name__ == "MixtralForCausalLM"
    assert m.config.num_local_experts == 4


def test_local_directory_round_trip(tmp_path, tiny_llama):
    import torch

    tiny_llama.save_pretrained(tmp_path)
    effnb.tokenizer_for(tiny_llama).save_pretrained(tmp_path)
    again = effnb.load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tiny_llama(ids).logits)
    assert effnb.tokenizer_for(again) is not None


def test_corpora_are_deterministic_and_disjoint():
    assert data.eval_text() == data.eval_text()
    assert len(data.eval_text()) > 20_000
    cal = data.calibration_texts(64)
    assert len(cal) == 64 and all(len(c) >= 200 for c in cal)
    assert not set(data.EVAL_MODULES) & set(data.CALIBRATION_MODULES)
    evaluation = data.eval_text()
    assert not any(c[:200] in evaluation for c in cal)
    pairs = data.doc_pairs()
    assert len(pairs) >= 150 and len({d for _, d in pairs}) == len(pairs)


def test_resolve_text_accepts_string_file_and_list(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello from a file")
    assert data.resolve_text(str(p)) == "hello from a file"
    assert data.resolve_text(["a", "b"]) == "a\n\nb"
    assert data.resolve_text("plain text") == "plain text"
    with pytest.raises(ValueError, match="text is empty"):
        data.resolve_text("   ")
    with pytest.raises(TypeError, match="text must be a string, a file path or a list of strings, got int"):
        data.resolve_text(3)


def test_function_and_subpackage_of_the_same_name_both_work():
    # `effnb.moe` / `effnb.lora` are functions and subpackages; importing the subpackage first
    # (as any `from effnb.experts import ...` does) must not hide the function.
    code = ("import effnb, effnb.experts.api, effnb.adapters.api\n"
            "from effnb.experts import moe_stats\n"
            "assert callable(effnb.moe) and callable(effnb.lora), (effnb.moe, effnb.lora)\n"
            "assert effnb.experts.api.moe is not None and moe_stats is effnb.moe_stats\n"
            "m = effnb.load_model('tiny-llama')\n"
            "try:\n"
            "    effnb.moe(m, experts=4, top_k=0)\n"
            "except ValueError as exc:\n"
            "    print('ValueError', 'top_k' in str(exc))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ValueError True"  # the call reached effnb.experts.api.moe
