"""Loading models: embedded offline defaults, tiny random models for tests, local paths, hub ids.

Every model effnb hands out carries its tokenizer (``tokenizer_for(model)``), so each
API call takes one object. Models the user built themselves get one with
``attach_tokenizer(model, tok)``.

Core layer: imports only ``effnb.options`` and ``effnb.torch_utils`` (and those inside functions),
never measurements or techniques. ``base`` holds what effnb records on a model, ``tokenizers``
the tokenizer search, ``embedded`` the embedded models, ``loading`` ``load_model`` itself.
"""

from __future__ import annotations

from .base import (
    INPUTS_ATTR,
    NAME_ATTR,
    NO_TOKENIZER_ATTR,
    TOKENIZER_ATTR,
    attach_example_inputs,
    check_model,
    copy_model,
    example_inputs_for,
    find_attr,
    looks_like_hub_id,
    meta_tensors,
    model_kind,
    model_name,
    quiet_transformers,
    state_hash,
)
from .embedded import (
    EMBEDDED_LOADERS,
    EMBEDDED_MODELS,
    EmbeddedModel,
    byte_tokenizer,
    cache_dir,
    from_pretrained_in_memory,
)
from .loading import load_model, probe_hub, refuse_remote_code, resolve_model, unknown_model_message
from .tokenizers import attach_tokenizer, attached_tokenizer, find_tokenizer, tokenizer_for

__all__ = [
    "EMBEDDED_LOADERS", "EMBEDDED_MODELS", "INPUTS_ATTR", "NAME_ATTR", "NO_TOKENIZER_ATTR", "TOKENIZER_ATTR",
    "EmbeddedModel", "attach_example_inputs", "attach_tokenizer", "attached_tokenizer", "byte_tokenizer",
    "cache_dir", "check_model", "copy_model", "example_inputs_for", "find_attr", "find_tokenizer",
    "from_pretrained_in_memory", "load_model", "looks_like_hub_id", "meta_tensors", "model_kind", "model_name", "probe_hub",
    "quiet_transformers", "refuse_remote_code", "resolve_model", "state_hash", "tokenizer_for",
    "unknown_model_message",
]
