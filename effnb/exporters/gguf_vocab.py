"""The tokenizer as GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys), from the model's own tokenizer.

Supported: byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style: llama.cpp's ``gpt2`` model), the
kind effnb's models carry. ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer (how text is split
before the merges); it is recognised from the tokenizer's own pre-tokenizer for the common shapes.
"""

from __future__ import annotations

import json
import warnings

# token types (gguf.TokenType): normal, control (special), user-defined (added, not special), unused (padding)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _pre_name(pre: dict | None, has_merges: bool) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizers pre_tokenizer (JSON), None when not recognised."""
    if not has_merges:
        return "default"  # bytes only: however the text is split, the same tokens come out
    if pre is None:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1] == "ByteLevel":
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if regex.startswith(_LLAMA3_REGEX_START):
            return "llama-bpe"
    return None


def _vocab(tok, size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order (padded to the model's vocabulary with unused ``[PADn]``) and their types."""
    vocab = tok.get_vocab()
    if len(vocab) > size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model's vocabulary is {size}; "
                         "GGUF needs one token per embedding row")
    by_id = {i: t for t, i in vocab.items()}
    special = set(getattr(tok, "all_special_ids", []) or [])
    added = {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(CONTROL if i in special else USER_DEFINED if i in added else NORMAL)
    return tokens, types


def _merges(model_json: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]


def _adds_bos(tok) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def add_tokenizer(writer, model) -> None:
    """Write the model's tokenizer into ``writer``; ValueError when there is none or it is not byte-level BPE."""
    from ..models import find_tokenizer

    tok = find_tokenizer(model)
    if tok is None:
        raise ValueError("GGUF export: the model has no tokenizer, and llama.cpp needs one; attach it with "
                         "effnb.attach_tokenizer(model, tokenizer), or pass tokenizer=False to write the weights only")
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_json = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model_json.get("type") != "BPE" or not byte_level:
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style); this one is "
                         f"{model_json.get('type', type(tok).__name__)!r}; pass tokenizer=False to write the weights only")
    tokens, types = _vocab(tok, model.config.vocab_size)
    merges = _merges(model_json)
    pre = _pre_name(spec.get("pre_tokenizer"), bool(merges))
    if pre is None:
        warnings.warn("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp names; wrote 'default', "
                      "so llama.cpp may split text differently from transformers", stacklevel=3)
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # GGUF cannot hold an empty array; readers derive merges from scores (none for a bytes-only vocabulary)
        writer.add_token_scores([0.0] * len(tokens))
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                      ("pad", "pad_token_id")):
        value = getattr(tok, attr, None)
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(_adds_bos(tok))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
