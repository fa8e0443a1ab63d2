"""What effnb records on a model and reads back: its name, tokenizer and example inputs (plain
attributes, found through PEFT wrappers), its kind, checks, copies and a hash of its state.

The bottom of ``effnb.models``: imports no other part of it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from typing import Any

# attribute names effnb sets on a model with object.__setattr__ (neither submodules nor state)
TOKENIZER_ATTR = "_effnb_tokenizer"
NAME_ATTR = "_effnb_name"
NO_TOKENIZER_ATTR = "_effnb_no_tokenizer"
INPUTS_ATTR = "_effnb_example_inputs"


def find_attr(model, attr: str):
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


def meta_tensors(model) -> list[str]:
    """Names of the model's parameters and buffers on the meta device (shapes without data); torch-free,
    so the front ends can refuse such a model before anything imports torch. [] for a non-module."""
    if not callable(getattr(model, "named_parameters", None)):
        return []
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return [name for name, t in tensors if getattr(t, "is_meta", False)]


def check_model(model, *, loaded: bool = True) -> None:
    """Raise TypeError unless ``model`` is a torch ``nn.Module``; with ``loaded``, ValueError when any of
    its tensors is on the meta device (a skeleton without weights: nothing can run on it)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module model, got {type(model).__name__}")
    if not loaded:
        return
    meta = meta_tensors(model)
    if meta:
        raise ValueError(f"the model's weights are on the meta device (not loaded), e.g. {meta[0]!r}; load them first "
                         "(effnb.load_model, or model.to_empty(device='cpu') then load_state_dict)")


def model_name(model) -> str:
    """A short display name: the embedded name or path it was loaded from, else the class name."""
    return find_attr(model, NAME_ATTR) or type(model).__name__


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
    tok = find_attr(model, TOKENIZER_ATTR)
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
    object.__setattr__(model, INPUTS_ATTR, inputs)
    return model


def example_inputs_for(model) -> tuple[Any, str]:
    """(inputs, how they were made) for a plain module: attached ones, else inferred from its first layer.

    A first layer ``Linear(in_features=K)`` gets 8 rows of K values drawn with a fixed seed (in the
    model's dtype); an ``Embedding(V, ...)`` 128 fixed ids below V. (None, reason) when effnb cannot tell.
    """
    import torch

    attached = find_attr(model, INPUTS_ATTR)
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


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
