"""effnb.export: GGUF (llama.cpp) and compressed-tensors (vLLM, transformers) read back by their own readers.

GGUF: the `gguf` package's reader and transformers' GGUF loader. compressed-tensors: transformers'
CompressedTensors integration (compressed-tensors installed), plus a decode of the packed words by hand.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import effnb
from effnb.exporters.api import export as effnb_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[5, 17, 99, 3, 200, 44, 12, 7, 256, 120, 33, 64]])
GGUF_GRIDS = {"Q8_0": dict(method="int8", group_size=32), "Q4_0": dict(method="int4", group_size=32, symmetric=True),
              "Q4_1": dict(method="int4", group_size=32)}
# llama.cpp's names for a Llama layer's Linear modules
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def quantized(tiny_llama):
    """GGUF type -> tiny-llama quantized on that grid (all Linear layers but lm_head)."""
    return {t: effnb.quantize(tiny_llama, measure=False, **kw).model for t, kw in GGUF_GRIDS.items()}


def _layers(model):
    from effnb.kernels.linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _gguf_name(layer_name: str) -> str:
    parts = layer_name.split(".")  # model.layers.N.self_attn.q_proj
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:])]}.weight"


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row order (per head, the two rotary halves interleaved)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("qtype", list(GGUF_GRIDS))
def test_gguf_blocks_read_back_by_gguf_reader(quantized, tmp_path, qtype):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    q = quantized[qtype]
    before = effnb.state_hash(q)
    res = effnb_export(q, "gguf", tmp_path / "m.gguf")
    assert effnb.state_hash(q) == before  # the export only reads the model
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary file left beside it
    reader = GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    cfg = q.config
    for name, layer in _layers(q).items():
        t = tensors[_gguf_name(name)]
        assert t.tensor_type.name == qtype
        assert list(t.shape) == [layer.in_features, layer.out_features]  # ggml order: row length first
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        if "q_proj" in name or "k_proj" in name:
            w = _unpermute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        ref = layer.dequantize()
        if qtype == "Q4_1":  # each group's minimum is rounded to fp16: a bounded, reported shift
            assert (w - ref).abs().max().item() <= res.details["q4_1_max_shift"] + 2 ** -22 * ref.abs().max().item()
        else:
            assert torch.equal(w, ref), name  # the same grid, the same numbers
    assert tensors["token_embd.weight"].tensor_type.name == "F32"
    assert tensors["output.weight"].tensor_type.name == "F32"  # tiny-llama's head is not tied, kept in fp32
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == cfg.num_key_value_heads
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == cfg.vocab_size
    assert res.tensor_types[qtype] == len(_layers(q)) and res.exact == (qtype != "Q4_1")


@pytest.mark.parametrize("qtype", list(GGUF_GRIDS))
def test_gguf_loads_in_transformers_with_effnb_logits(quantized, tmp_path, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q = quantized[qtype]
    effnb_export(q, "gguf", tmp_path / "m.gguf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    diff = (_logits(back) - _logits(q)).abs().max().item()
    # Q8_0/Q4_0 hold effnb's numbers; Q4_1's fp16 minimum moves weights by up to ~3e-5 here (measured logits
    # difference 5.3e-4 on 2026-11-30), so it gets a looser bound
    assert diff < (1e-4 if qtype != "Q4_1" else 3e-3), diff
    if qtype != "Q4_1":  # on effnb's reference backend (dequantize + F.linear, as transformers runs) no
        ref = effnb.copy_model(q)  # summation-order difference is left either (0.0 measured)
        for layer in _layers(ref).values():
            layer.backend = "reference"
        assert (_logits(back) - _logits(ref)).abs().max().item() < 1e-6
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "def f(x):\n    return x + 1  # é"
    assert tok(text)["input_ids"] == effnb.tokenizer_for(q)(text)["input_ids"]


@pytest.mark.parametrize("kw, qtype", [
    (dict(method="gptq", symmetric=True, calibration_samples=2, calibration_tokens=32), "Q4_0"),
    (dict(method="gptq", bits=8, calibration_samples=2, calibration_tokens=32), "Q8_0"),
    (dict(method="hqq", hqq_grid="int4", hqq_iters=2), "Q4_1"),
])
def test_gguf_takes_gptq_and_hqq_on_its_grids(tiny_llama, tmp_path, kw, qtype):
    from gguf import GGUFReader

    g = effnb.quantize(tiny_llama, group_size=32, measure=False, **kw).model
    effnb_export(g, "gguf", tmp_path / "g.gguf")
    types = {t.tensor_type.name for t in GGUFReader(tmp_path / "g.gguf").tensors if t.name.startswith("blk.")
             and "norm" not in t.name}
    assert types == {qtype}


def test_gguf_check_catches_a_changed_byte(quantized, tmp_path):
    from effnb.exporters.gguf import plan
    from effnb.exporters.gguf_check import check_file

    q = quantized["Q4_0"]
    effnb_export(q, "gguf", tmp_path / "m.gguf")
    tensors, _ = plan(q)
    check_file(str(tmp_path / "m.gguf"), tensors)  # what the export checked before renaming
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[-3] ^= 0x10  # one nibble of the last tensor
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="differs from what was written"):
        check_file(str(tmp_path / "bad.gguf"), tensors)


def test_float_model_exports_as_f32_and_reloads_exactly(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    effnb_export(tiny_llama, "gguf", tmp_path / "f.gguf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f.gguf", dtype=torch.float32)
    assert torch.equal(back.model.layers[1].self_attn.k_proj.weight, tiny_llama.model.layers[1].self_attn.k_proj.weight)


@pytest.mark.parametrize("kw, match", [
    (dict(method="int8", group_size=64), r"GGUF has no type for int8 group 64 .*method='int8', group_size=32"),
    (dict(method="int4", group_size=64, symmetric=True), r"int4 group 64 = per channel symmetric .*symmetric=True\) -> Q4_0"),
    (dict(method="nf4", group_size=64), r"GGUF has no type for nf4 .*Q4_1"),
    (dict(method="int8", group_size=0), r"int8 group 64 = per channel"),
])
def test_gguf_refuses_other_grids_in_one_line(tiny_llama, tmp_path, kw, match):
    q = effnb.quantize(tiny_llama, measure=False, **kw).model
    with pytest.raises(ValueError, match=match) as info:
        effnb_export(q, "gguf", tmp_path / "x.gguf")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []  # refused before anything was written


@pytest.mark.parametrize("fmt, path, exc, match", [
    ("ggfu", "x.gguf", ValueError, r"unknown export format 'ggfu'; did you mean 'gguf'\? \(formats: gguf, vllm"),
    ("gguf", "x.bin", ValueError, r"path must end in \.gguf"),
    ("vllm", "x.gguf", ValueError, r"writes a folder"),
    ("gguf", "", TypeError, r"path must be a file or folder path"),
])
def test_bad_format_or_path_one_line(tiny_llama, tmp_path, fmt, path, exc, match):
    with pytest.raises(exc, match=match):
        effnb_export(tiny_llama, fmt, tmp_path / path if path else "")


def test_unknown_option_and_existing_target(quantized, tmp_path):
    q = quantized["Q8_0"]
    with pytest.raises(TypeError, match=r"unknown export option 'overwite'; did you mean 'overwrite'"):
        effnb_export(q, "gguf", tmp_path / "a.gguf", overwite=True)
    effnb_export(q, "gguf", tmp_path / "a.gguf")
    with pytest.raises(ValueError, match=r"already exists; pass overwrite=True"):
        effnb_export(q, "gguf", tmp_path / "a.gguf")
    effnb_export(quantized["Q4_0"], "gguf", tmp_path / "a.gguf", overwrite=True)
    from gguf import GGUFReader

    assert "Q4_0" in {t.tensor_type.name for t in GGUFReader(tmp_path / "a.gguf").tensors}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="does not look like a model export"):
        effnb_export(quantized["Q4_0"], "vllm", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(ValueError, match=r"is a folder; give a file path ending in \.gguf"):
        effnb_export(q, "gguf", tmp_path / "d.gguf", overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a folder"):
        effnb_export(quantized["Q4_0"], "vllm", tmp_path / "f", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "d.gguf", "f", "notes"]


# ------------------------------------------------------------------------------ compressed-tensors (vLLM)


@pytest.fixture(scope="module")
def ct_models(tiny_llama):
    return {"int4 g32": effnb.quantize(tiny_llama, method="int4", group_size=32, symmetric=True, measure=False).model,
            "int8 channel": effnb.quantize(tiny_llama, method="int8", group_size=0, measure=False).model}


@pytest.mark.parametrize("kind", ["int4 g32", "int8 channel"])
def test_compressed_tensors_structure_and_decode(ct_models, tmp_path, kind):
    from safetensors.torch import load_file

    q = ct_models[kind]
    before = effnb.state_hash(q)
    effnb_export(q, "vllm", tmp_path / "out")
    assert effnb.state_hash(q) == before
    bits = 4 if kind.startswith("int4") else 8
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    (group,) = cfg["config_groups"].values()
    assert group["targets"] == ["Linear"] and cfg["ignore"] == ["lm_head"]
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] is True
    assert group["weights"]["strategy"] == ("group" if bits == 4 else "channel")
    state = load_file(tmp_path / "out" / "model.safetensors")
    layers = _layers(q)
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        packed, scale = state[f"{name}.weight_packed"], state[f"{name}.weight_scale"]
        assert packed.dtype == torch.int32 and list(packed.shape) == [n, k * bits // 32]
        assert list(scale.shape) == [n, k // 32 if bits == 4 else 1] and scale.dtype == torch.float32
        assert state[f"{name}.weight_shape"].tolist() == [n, k]
        # the spec's decoding, written out: element i of a row at bits (i % per) * bits of word i // per
        words = packed.to(torch.int64) & 0xFFFFFFFF
        per = 32 // bits
        codes = torch.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1).reshape(n, k)
        w = ((codes - (1 << (bits - 1))).float().reshape(n, scale.shape[1], -1) * scale.unsqueeze(-1)).reshape(n, k)
        assert torch.equal(w, layer.dequantize()), name
    expected_float = {k for k in q.state_dict() if not any(k.startswith(n + ".") for n in layers)}
    quant = {f"{n}.{s}" for n in layers for s in ("weight_packed", "weight_scale", "weight_shape")}
    assert set(state) == expected_float | quant


@pytest.mark.parametrize("kind", ["int4 g32", "int8 channel"])
def test_compressed_tensors_loads_in_transformers(ct_models, tmp_path, kind):
    pytest.importorskip("compressed_tensors", reason="transformers reads this format through compressed-tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    q = ct_models[kind]
    effnb_export(q, "vllm", tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(raw)  # the format's own schema accepts it
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert (_logits(back) - _logits(q)).abs().max().item() < 1e-4
    modules = dict(back.named_modules())  # compressed-tensors decompressed the layers on the first forward
    for name, layer in _layers(q).items():
        assert torch.equal(modules[name].weight, layer.dequantize()), name


def test_compressed_tensors_refuses_asymmetric_int4(quantized, tmp_path):
    with pytest.raises(ValueError, match=r"no pack-quantized layout for asymmetric int4 .*symmetric=True"):
        effnb_export(quantized["Q4_1"], "vllm", tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_export_command(quantized, tmp_path):
    from effnb import commands

    cmd = commands.get_command("export")
    target = str(tmp_path / "c.gguf")
    ns = commands.parse(cmd, ["q", "gguf", target], "effnb export")
    res = commands.run(cmd, ns, lambda token: quantized["Q8_0"])
    assert res.path == target and "Q8_0" in str(res)
    ns = commands.parse(cmd, ["q", "--format", "gguf", "--path", str(tmp_path / "d.gguf")], "effnb export")
    assert commands.run(cmd, ns, lambda token: quantized["Q8_0"]).tensor_types["Q8_0"] == 14
    bad = commands.parse(cmd, ["q", "gguf", str(tmp_path / "e.bin")], "effnb export")
    with pytest.raises(commands.CommandError, match=r"must end in \.gguf"):
        commands.run(cmd, bad, lambda token: quantized["Q8_0"])


def test_bitsandbytes_export_loads_in_transformers(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q = effnb.quantize(tiny_llama, method="nf4", group_size=64, measure=False).model
    res = effnb_export(q, "bitsandbytes", tmp_path / "bnb")
    assert res.tensor_types == {"nf4": 14} and sorted(os.listdir(tmp_path)) == ["bnb"]
    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert AutoTokenizer.from_pretrained(tmp_path / "bnb")("ab")["input_ids"] == [64, 65]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", dtype=torch.float32)
    assert (_logits(back) - _logits(q)).abs().max().item() < 1e-4


class _Recorder:
    """Stands in for gguf's writer: records the add_* calls (reading 100k strings back costs ~10 s)."""

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        return lambda *args: self.calls.__setitem__(name, args[0] if args else None)


@pytest.mark.slow
def test_smollm2_q8_0_reads_back_in_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from effnb.exporters.gguf_vocab import add_tokenizer

    vocab = _Recorder()
    add_tokenizer(vocab, smollm2)  # SmolLM2's tokenizer as GGUF metadata, without the slow file round trip
    assert vocab.calls["add_tokenizer_pre"] == "gpt-2" and len(vocab.calls["add_token_merges"]) == 48900
    assert len(vocab.calls["add_token_list"]) == 49152 and vocab.calls["add_eos_token_id"] == 2
    q = effnb.quantize(smollm2, method="int8", group_size=32, measure=False, share_unquantized=True).model
    res = effnb_export(q, "gguf", tmp_path / "smol.gguf", tokenizer=False)
    assert res.tensor_types == {"Q8_0": 7 * 30, "F32": 2 * 30 + 2}  # tied head: token_embd only, no output
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol.gguf", dtype=torch.float32)
    ids = IDS[:, :8]
    with torch.no_grad():
        diff = (back(ids).logits - q(ids).logits).abs().max().item()
    assert diff < 1e-4, diff  # 5.3e-5 measured (2026-11-30, 1 thread): summation order, not the weights
