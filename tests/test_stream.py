"""Checkpoints as stored: streaming quantization of a sharded fp16 folder, block-by-block GPTQ,
concurrent GPTQ calls, and the quantize config checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import effnb

GPTQ = {"calibration_samples": 8, "calibration_tokens": 32}


def write_checkpoint(folder, *, layers=3, hidden=64, inter=128, vocab=256, tie=True, shard="40KB"):
    """A Llama-shaped fp16 checkpoint with random weights (fixed seed), saved by transformers in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, attention_bias=True, dtype="float16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values, fast: normal weights, norms near 1
        for name, p in model.named_parameters():
            t = torch.randn(p.shape, generator=gen) * (0.05 if "norm" not in name else 0.1)
            if "norm" in name:
                t += 1
            setattr(*_owner(model, name), torch.nn.Parameter(t.to(torch.float16), requires_grad=False))
    model.tie_weights()
    model.save_pretrained(str(folder), max_shard_size=shard)
    return folder


def _owner(model, name):
    parent, _, attr = name.rpartition(".")
    return model.get_submodule(parent), attr


def hashes(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def tensors(model) -> dict:
    """Every tensor a user relies on: the state dict and all buffers (non-persistent ones included)."""
    out = dict(model.state_dict())
    out.update(dict(model.named_buffers()))
    return out


def assert_identical(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, (k, ta[k].dtype, tb[k].dtype)
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama-fp16")
    assert len(list(folder.glob("*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.mark.parametrize("method", ["int8", "nf4", "hqq", "gptq"])
def test_streamed_equals_in_memory(ckpt, tmp_path, method):
    """Tolerance for gptq: none. The streamed blocks see the very same inputs as in memory, so every
    tensor is identical (docs/quantization.md)."""
    before = hashes(ckpt)
    opts = GPTQ if method == "gptq" else {}
    streamed = effnb.quantize(str(ckpt), method=method, save_to=str(tmp_path / "q"), measure=False, **opts)
    loaded = effnb.load_model(str(ckpt))
    assert loaded.model.embed_tokens.weight.dtype == torch.float16  # as stored
    in_memory = effnb.quantize(loaded, method=method, measure=False, **opts)
    assert_identical(streamed.model, in_memory.model)
    assert_identical(effnb.load(tmp_path / "q"), in_memory.model)
    assert hashes(ckpt) == before
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight  # tie kept
    s_row, m_row = streamed.report.rows[0], in_memory.report.rows[0]
    assert (s_row["parameters"], s_row["weight_bytes"]) == (m_row["parameters"], m_row["weight_bytes"])
    if method == "gptq":
        note = "8 x 32 fixed token ids (no tokenizer), block by block"
        assert streamed.details["calibration"] == note + ", streamed"
        assert in_memory.details["calibration"] == note
        assert in_memory.report.rows[1]["extra"]["calibration"] == note


def test_a_technique_takes_a_folder(ckpt):
    res = effnb.quantize(str(ckpt), method="int8", measure=False)
    assert type(res.model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    assert res.report.rows[1]["extra"]["layers_quantized"] == 21


def test_a_folder_with_auto_map_is_refused(ckpt, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    before = hashes(folder)
    with pytest.raises(ValueError) as err:
        effnb.quantize(str(folder), method="nf4", save_to=str(tmp_path / "out"), measure=False)
    assert "auto_map" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and hashes(folder) == before


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "llm.int8"}, "cannot stream a checkpoint"),
    ({"method": "nf4", "backend": "bitsandbytes"}, "cannot stream a checkpoint"),
    ({"method": "nf4", "save_to": "INSIDE"}, "inside the checkpoint being read"),
    ({"method": "gptq", "quantize_lm_head": True, "calibration_samples": 2}, "block by block"),
])
def test_streaming_refusals_are_one_line_and_write_nothing(ckpt, tmp_path, kwargs, needle):
    before = hashes(ckpt)
    kwargs = dict(kwargs)
    save_to = str(ckpt / "q") if kwargs.pop("save_to", None) == "INSIDE" else str(tmp_path / "q")
    with pytest.raises(ValueError, match=needle) as err:
        effnb.quantize(str(ckpt), save_to=save_to, measure=False, **kwargs)
    assert "\n" not in str(err.value)
    assert hashes(ckpt) == before and not (tmp_path / "q").exists()


def test_concurrent_gptq_calls_equal_sequential_ones(ckpt):
    model = effnb.load_model(str(ckpt))
    state = effnb.state_hash(model)
    first = effnb.quantize(model, method="gptq", measure=False, **GPTQ).model
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = effnb.quantize(model, method="gptq", measure=False, **GPTQ).model
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_identical(results[0], first)
    assert_identical(results[1], first)
    assert effnb.state_hash(model) == state
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind


def test_gptq_without_decoder_blocks_calibrates_the_whole_model():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    x = torch.randn(32, 64)
    effnb.attach_example_inputs(seq, x)
    res = effnb.quantize(seq, method="gptq", measure=False)
    assert res.details["calibration"] == "the model's example inputs (not a language model), whole model"
    with torch.no_grad():
        rel = (res.model(x) - seq(x)).norm() / seq(x).norm()
    assert rel < 0.1, rel
    assert not seq[0]._forward_pre_hooks


@pytest.mark.parametrize("kwargs,exc,needle", [
    ({"group_size": 64.0}, TypeError, "group_size must be an integer, got 64.0"),
    ({"method": "int4", "bits": 4.0}, TypeError, "bits must be an integer, got 4.0"),
    ({"method": "llm.int8", "llm_int8_threshold": -1}, ValueError, "llm_int8_threshold must be >= 0"),
    ({"save_to": "out", "inplace": True}, ValueError, "cannot be combined with inplace=True"),
])
def test_config_checks(kwargs, exc, needle):
    from effnb.quant.config import QuantConfig

    with pytest.raises(exc, match=needle):
        QuantConfig(**kwargs)


CHILD = textwrap.dedent("""
    import json, re, sys
    import effnb

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    warm, big, out = sys.argv[1:4]
    effnb.quantize(warm, method="nf4", save_to=out + "-warm", measure=False)  # imports, compiled kernels
    from effnb.torch_utils import trim_heap
    trim_heap()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    effnb.quantize(big, method="nf4", save_to=out, measure=False)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


def test_streaming_peak_memory_stays_near_the_quantized_size(ckpt, tmp_path):
    """Peak resident memory of a streamed nf4 quantize above the process's resting size: at most the
    quantized model plus two fp32 copies of the largest layer plus 48 MB of slack, and well below the
    checkpoint's own fp16 size (it is never resident as a whole)."""
    big = write_checkpoint(tmp_path / "big", layers=12, hidden=512, inter=2048, vocab=1024, tie=False, shard="40MB")
    fp16 = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    out = tmp_path / "q"
    run = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(big), str(out)], capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    quantized = (out / "model.safetensors").stat().st_size
    largest_fp32 = 512 * 2048 * 4
    grew = m["peak"] - m["base"]
    print(f"grew {grew / 2**20:.1f} MB, quantized {quantized / 2**20:.1f} MB, fp16 {fp16 / 2**20:.1f} MB")
    assert grew <= quantized + 2 * largest_fp32 + 48 * 2**20, (grew, quantized)
    assert grew < 0.6 * fp16, (grew, fp16)


def test_magic_and_cli_stream_a_folder(ip, tmp_path, monkeypatch):
    """`--save-to` with a folder name streams it: the model is never loaded whole (load_model never runs)."""
    import effnb.models
    from effnb import cli

    src = tmp_path / "src"
    effnb.load_model("tiny-llama").save_pretrained(src)
    calls = []
    real = effnb.models.load_model
    monkeypatch.setattr(effnb.models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    ip.run_line_magic("efficient", f"quantize {src} --method int8 --save-to {tmp_path / 'q1'} --no-measure -q")
    assert cli.main(["quantize", str(src), "--method", "int8", "--save-to", str(tmp_path / "q2"), "--no-measure",
                     "-q"]) == 0
    assert not calls, f"the folder was loaded whole: {calls}"
    a, b = effnb.load(tmp_path / "q1"), effnb.load(tmp_path / "q2")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
