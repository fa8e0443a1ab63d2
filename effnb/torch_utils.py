"""Small torch helpers every layer shares (core: imports nothing else from effnb).

One copy each of what techniques, measurements and widgets used to write for themselves: the
device a model sits on, evaluation mode that puts every module back as it was, the SNR in dB,
the Linear-like layers of a model, the inputs a forward pass feeds some modules, and returning
freed heap memory to the system. ``import effnb`` does not import this module, so torch loads
only when code that needs it runs.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping

import torch

__all__ = ["capture_inputs", "device_of", "eval_mode", "is_quantized_linear", "linear_layers", "output_head",
           "snr_db", "trim_heap", "triton_interpreting"]


def device_of(model) -> torch.device:
    """The device of the model's first parameter (else first buffer); CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model) -> Iterator:
    """Evaluation mode inside the block; on exit each module gets back its own training flag.

    Restoring module by module (not ``model.train(was)``) keeps a frozen submodule that a trainer
    left in eval mode in eval mode."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def snr_db(reference, approx=None, *, squared_error: float | None = None) -> float:
    """Signal-to-noise ratio in dB, 10 log10(|ref|^2 / |ref - approx|^2); or, with ``squared_error``, the error a
    quantizer measured itself (no dequantized copy needed).

    Norms are accumulated by torch in fp32 with pairwise sums and read the weight in place (no fp64 copy:
    a layer-sized temporary per layer would show in a streamed quantization's peak memory).
    inf when the two are equal, -inf for a zero reference that differs."""
    ref = reference.detach()
    err = squared_error if approx is None else torch.linalg.vector_norm(ref - approx.detach()).item() ** 2
    if err == 0:
        return math.inf
    sig = torch.linalg.vector_norm(ref).item() ** 2
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


def is_quantized_linear(m) -> bool:
    """True for effnb's QuantLinear, recognised by what it holds (a storage format and packed codes),
    so core needs no import of the kernels layer above it."""
    return isinstance(getattr(m, "fmt", None), str) and hasattr(m, "qweight") and hasattr(m, "in_features")


def _dense_types() -> tuple:
    types = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # transformers is optional for plain torch models
        pass
    return tuple(types)


def output_head(model):
    """The model's output embedding (LM head) module, or None when it has none."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def linear_layers(model, include_quantized: bool = True, skip_head: bool = False) -> Iterator[tuple[str, object]]:
    """(name, module) of the Linear-like layers: nn.Linear, transformers' Conv1D (weight stored
    [in, out]) and, when ``include_quantized``, effnb's QuantLinear; ``skip_head`` leaves out the
    output head."""
    dense = _dense_types()
    head = output_head(model) if skip_head else None
    for name, m in model.named_modules():
        if m is head and head is not None:
            continue
        if isinstance(m, dense) or (include_quantized and is_quantized_linear(m)):
            yield name, m


@contextlib.contextmanager
def capture_inputs(modules, transform=None) -> Iterator[dict]:
    """Record the first positional input of each module on every forward inside the block.

    ``modules`` is a mapping {key: module} or a sequence of modules (keys are then 0, 1, ...); the
    block receives {key: [inputs, one per call]}. Each input is stored detached, or as
    ``transform(input)`` when given (e.g. to flatten or copy it). The hooks are removed on exit."""
    items = modules.items() if isinstance(modules, Mapping) else enumerate(modules)
    store: dict = {}
    handles = []
    try:
        for key, mod in items:
            store[key] = []

            def hook(_mod, args, _calls=store[key]):
                x = args[0]
                _calls.append(transform(x) if transform is not None else x.detach())

            handles.append(mod.register_forward_pre_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def triton_interpreting() -> bool:
    """True when Triton is imported and runs under its interpreter (TRITON_INTERPRET=1), so its
    kernels take CPU tensors. Never imports triton: an unimported triton interprets nothing."""
    triton = sys.modules.get("triton")
    return bool(triton is not None and triton.knobs.runtime.interpret)


_LIBC = None


def trim_heap() -> None:
    """Give the memory that freed tensors left in glibc's heap back to the operating system.

    Quantizing creates and frees many layer-sized temporaries; glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the heap, so the process's resident memory, what
    Binder's 2 GB limit counts, stays up to ~0.9 GB above what is live (measured on SmolLM2: 2.20 GB
    resident after a GPTQ run, 1.34 GB after this call). ``malloc_trim(0)`` returns those pages
    (milliseconds). No-op where the C library is not glibc.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError if this libc has none
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
