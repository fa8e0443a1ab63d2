"""GGUF export for llama.cpp: effnb's int8 / int4 group-32 layers re-packed into Q8_0 / Q4_0 / Q4_1 blocks.

Block layouts (ggml's ``block_q8_0``, ``block_q4_0``, ``block_q4_1``; 32 weights along a row each):

  Q8_0  fp16 d, 32 x int8 q                     w = d * q                 effnb int8 g32: d = scale, q = code
  Q4_0  fp16 d, 16 bytes                        w = d * (q - 8)           effnb int4 g32 symmetric: q = code
  Q4_1  fp16 d, fp16 m, 16 bytes                w = d * q + m             effnb int4 g32: d = scale, m = -zero * scale
  In the 16 bytes, byte j holds weight j in its low nibble and weight j + 16 in its high nibble (effnb packs
  columns 2j, 2j+1 into one byte: the nibbles are re-ordered, the codes are not changed).

effnb stores scales and zeros in fp16 before choosing codes, so Q8_0 and Q4_0 are bit-exact. Q4_1 stores the
minimum m = -zero * scale, which llama.cpp keeps in fp16: rounding it moves each weight of a group by the same
amount, at most half an fp16 ulp of m (a relative 2^-11); the largest such move is reported in the result.

Llama attention: llama.cpp's converter permutes the rows of q_proj and k_proj (it pairs rotary halves
differently); readers undo it. Rows are permuted whole, so a quantized row's blocks move unchanged.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from ..quant.serialize import quant_layers
from .api import ExportResult, float_state, size_of, write_then_rename

BLOCK = 32
CHOICES = ("quantize(method='int8', group_size=32) -> Q8_0; quantize(method='int4', group_size=32, symmetric=True) "
           "-> Q4_0; quantize(method='int4', group_size=32) -> Q4_1; gptq/hqq with bits=4 (hqq_grid='int4') or "
           "bits=8 on those grids; float layers are written as stored")


# (effnb format, stores zero points) of a group-32 layer -> the ggml block type holding its bytes
_GGML_TYPES = {("int8", False): "Q8_0", ("int4", False): "Q4_0", ("int4", True): "Q4_1"}


def _has_zeros(layer) -> bool:
    return getattr(layer, "zeros", None) is not None


def ggml_type(layer) -> str:
    """Q8_0 / Q4_0 / Q4_1 for a QuantLinear on a GGUF grid; ValueError naming the choices otherwise."""
    qtype = _GGML_TYPES.get((layer.fmt, _has_zeros(layer)))
    if qtype is not None and layer.group_size == BLOCK:
        return qtype
    grid = layer.fmt
    if qtype is not None:  # a GGUF format on another grid: say which
        from ..kernels.formats import get_format

        per_row = " = per channel" if layer.group_size == layer.in_features else ""
        symmetric = "zeros" in get_format(layer.fmt).buffers and not _has_zeros(layer)
        grid += f" group {layer.group_size}{per_row}" + (" symmetric" if symmetric else "")
    raise ValueError(f"GGUF has no type for {grid} (method {layer.method}); GGUF-compatible choices: {CHOICES}")


# ------------------------------------------------------------------------------------- blocks


def _scale_bytes(t):
    """fp16 [N, G] -> uint8 [N, G, 2] (little-endian, as ggml stores it)."""
    import torch

    return t.detach().cpu().to(torch.float16).contiguous().numpy().view("uint8").reshape(t.shape[0], t.shape[1], 2)


def _nibbles(layer):
    """effnb's codes -> ggml's 16 bytes per block: weight j low nibble, weight j + 16 high nibble."""
    from ..kernels.reference import unpack_int4

    q = unpack_int4(layer.qweight.detach().cpu()).numpy().reshape(layer.out_features, -1, BLOCK)
    return q[..., :16] | (q[..., 16:] << 4)


def _int8_codes(layer):
    """int8 codes as they are: 32 bytes per block."""
    return layer.qweight.detach().cpu().contiguous().numpy().view("uint8").reshape(layer.out_features, -1, BLOCK)


def _scales(layer):
    return _scale_bytes(layer.scales)


def _minimums(layer):
    return _scale_bytes(q4_1_min(layer))


# ggml block type -> its fields in order, each uint8 [N, blocks, bytes]
_BLOCK_FIELDS = {"Q8_0": (_scales, _int8_codes), "Q4_0": (_scales, _nibbles), "Q4_1": (_scales, _minimums, _nibbles)}


def blocks(layer, qtype: str):
    """uint8 [out_features, in_features / 32 * block bytes]: the layer's weight in ggml's blocks."""
    import numpy as np

    parts = [field(layer) for field in _BLOCK_FIELDS[qtype]]
    return np.concatenate(parts, axis=-1).reshape(layer.out_features, -1)


def q4_1_min(layer):
    """Q4_1's per-block minimum: -zero * scale, computed in fp32 and rounded to fp16."""
    import torch

    return (-(layer.zeros.detach().cpu().float() * layer.scales.detach().cpu().float())).to(torch.float16)


def q4_1_shift(layer) -> float:
    """Largest change of a weight caused by rounding Q4_1's minimum to fp16 (0 when every minimum fits)."""
    exact = -(layer.zeros.detach().cpu().float() * layer.scales.detach().cpu().float())
    return float((q4_1_min(layer).float() - exact).abs().max())


def permute_rows(n_rows: int, n_head: int):
    """The row order llama.cpp's converter gives q_proj / k_proj: per head, rotary halves interleaved."""
    import numpy as np

    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


# ------------------------------------------------------------------------------------- model


def _check_llama(model):
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind != "llama":
        raise ValueError(f"GGUF export supports Llama-architecture models (model_type 'llama': SmolLM2, TinyLlama, "
                         f"Llama 2/3); this model is {kind or type(model).__name__!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("GGUF export supports Llama models without attention or MLP biases; this one has biases")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"GGUF export supports Llama models with plain rotary embeddings; this one has rope_type "
                         f"{kind!r} (supported: default)")
    if sys.byteorder != "little":
        raise ValueError("GGUF export runs on little-endian machines only (ggml's blocks are little-endian)")
    return cfg


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _hyperparameters(writer, cfg, file_type: int) -> None:
    import gguf

    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(os.path.basename(str(getattr(cfg, "_name_or_path", "") or "")) or "effnb-export")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _float_array(t, name: str):
    """(numpy array, ggml type name) for an unquantized tensor: F32/F16/BF16 as stored, 1-D tensors in F32."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dim() == 1 or t.dtype not in (torch.float16, torch.bfloat16):
        if not t.is_floating_point():
            raise ValueError(f"GGUF export: tensor {name!r} has dtype {t.dtype}; expected a float tensor")
        return t.float().numpy(), "F32"
    if t.dtype == torch.float16:
        return t.numpy(), "F16"
    return t.view(torch.int16).numpy().view("uint16"), "BF16"


def plan(model) -> tuple[list[tuple], dict]:
    """[(gguf name, numpy array, ggml type name)] in the model's order, plus facts for the result."""
    import gguf

    cfg = _check_llama(model)
    layers = quant_layers(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    items = [(f"{n}.weight", ("layer", m)) for n, m in layers.items()]
    for n, m in layers.items():
        if m.bias is not None:
            raise ValueError(f"GGUF export: layer {n!r} has a bias; Llama's GGUF layout has none")
    items += [(k, ("float", v)) for k, v in float_state(model, layers).items()]
    out, facts = [], {"q4_1_max_shift": 0.0}
    for hf_name, (kind, obj) in items:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor name for {hf_name!r} (a Llama model has embed_tokens, "
                             "layers.N.self_attn/mlp/norms, norm, lm_head)")
        if kind == "layer":
            qtype = ggml_type(obj)
            arr = blocks(obj, qtype)
            if qtype == "Q4_1":
                facts["q4_1_max_shift"] = max(facts["q4_1_max_shift"], q4_1_shift(obj))
        else:
            arr, qtype = _float_array(obj, hf_name)
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            arr = arr[permute_rows(arr.shape[0], heads if "attn_q" in gname else kv)]
        out.append((gname, arr, qtype))
    return out, facts


_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "F16": "MOSTLY_F16",
               "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}


def _file_type(tensors) -> int:
    import gguf

    counts = Counter(t for _, arr, t in tensors if arr.ndim == 2)
    main = counts.most_common(1)[0][0] if counts else "F32"
    return int(getattr(gguf.LlamaFileType, _FILE_TYPES[main]))


def write(path: str, model, tensors, with_tokenizer: bool) -> None:
    import gguf

    from .gguf_vocab import add_tokenizer

    writer = gguf.GGUFWriter(path, "llama")
    _hyperparameters(writer, model.config, _file_type(tensors))
    if with_tokenizer:
        add_tokenizer(writer, model)
    for name, arr, qtype in tensors:
        writer.add_tensor(name, arr, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model, cfg) -> ExportResult:
    from .gguf_check import check_file

    tensors, facts = plan(model)
    def write_checked(tmp: str) -> None:
        write(tmp, model, tensors, cfg.tokenizer)
        check_file(tmp, tensors)

    write_then_rename(cfg.path, False, write_checked)
    types = Counter(t for _, _, t in tensors)
    res = ExportResult("gguf", cfg.path, types, size_of(cfg.path), details=dict(facts))
    if types.get("Q4_1"):
        shift = facts["q4_1_max_shift"]
        res.exact = shift == 0.0
        res.notes.append(f"Q4_1 stores each group's minimum (-zero x scale) in fp16: weights moved by at most "
                         f"{shift:.3g} (codes and scales unchanged)")
    if not cfg.tokenizer:
        res.notes.append("no tokenizer written (tokenizer=False): llama.cpp needs one to run the file")
    return res
