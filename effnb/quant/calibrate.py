"""GPTQ calibration, one decoder block at a time, without ever touching the caller's model.

As GPTQ's reference does: the calibration sequences run through the model once, up to the input
of the first decoder block (where a stand-in block records them and stops the run); then, block
by block, the recorded activations run through the block with hooks collecting the Hessians
H = X^T X of its target layers, the block's layers are quantized, and the block runs again, now
with its quantized layers, to give the next block its inputs. Peak memory: one block's
activations and Hessians, not the whole model's.

Hooks never sit on the caller's model: each block (and the model's front, up to block 0) runs as
a *module view*, a structural copy that shares the parameters and buffers (no weight is copied)
but has its own submodule tables, hook tables and training flags. Two concurrent calls on one
model therefore see nothing of each other. Models without a recognisable list of decoder blocks
(a plain ``nn.Sequential``, BERT encoders) are calibrated whole, on a view too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH = 4  # calibration sequences per forward pass
# where causal LMs keep their decoder blocks (relative to the model)
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks",
               "model.language_model.layers", "layers")


class _Stop(Exception):
    """Raised by the stand-in first block: the model's front has run."""


def module_view(root: nn.Module, replace: dict | None = None) -> nn.Module:
    """A structural copy of ``root``: parameters and buffers shared, everything else its own.

    Each module is a shallow copy with its own ``_modules``/``_parameters``/``_buffers`` tables
    and hook tables (copied, so the user's hooks still run; hooks registered on the view stay on
    the view), in eval mode. ``replace``: {dotted path: module} put in the view at that path.
    """
    replace = replace or {}

    def view(mod, path):
        if path in replace:
            return replace[path]
        new = copy.copy(mod)
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        for key, value in mod.__dict__.items():
            if "hooks" in key and isinstance(value, dict):
                new.__dict__[key] = type(value)(value)
        new._modules = {k: (view(c, f"{path}.{k}" if path else k) if c is not None else None)
                        for k, c in mod._modules.items()}
        new.training = False
        return new

    return view(root, "")


def find_blocks(model, targets: dict) -> str | None:
    """The dotted path of the model's decoder blocks when block-by-block calibration applies, else None.

    Applies to causal LMs whose every target layer lies in one ``nn.ModuleList`` of blocks at a known
    path, with the same kind of attention in every block (per-layer masks would differ)."""
    from ..models import model_kind

    if model_kind(model) != "causal-lm":
        return None
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        if not all(n.startswith(path + ".") for n in targets):
            return None
        layer_types = getattr(getattr(model, "config", None), "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            return None
        return path
    return None


def calibration_batches(model, cfg) -> tuple[torch.Tensor, str]:
    """([n_seq, calibration_tokens] token ids, how they were made) for ``model``."""
    from .. import data
    from ..measure.inputs import fixed_token_ids
    from ..models import find_tokenizer

    tok = find_tokenizer(model)
    T = cfg.calibration_tokens
    if tok is None:
        if cfg.calibration is not None:
            raise ValueError("calibration text needs a tokenizer and this model has none; attach one with "
                             "effnb.attach_tokenizer(model, tokenizer), or leave calibration unset (fixed token ids)")
        n_seq = cfg.calibration_samples
        ids = fixed_token_ids(model, n_seq * T)
        return ids.reshape(n_seq, T), f"{n_seq} x {T} fixed token ids (no tokenizer)"
    texts = data.calibration_texts(100_000) if cfg.calibration is None else [data.resolve_text(cfg.calibration)]
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < T:
        raise ValueError(f"calibration text has only {ids.numel()} tokens; gptq needs at least "
                         f"calibration_tokens={T}")
    n_seq = min(cfg.calibration_samples, ids.numel() // T)
    what = "effnb's built-in calibration text" if cfg.calibration is None else "the given calibration text"
    return ids[: n_seq * T].reshape(n_seq, T), f"{n_seq} x {T} tokens of {what}"


class Hessians:
    """H = X^T X (fp32) of each named module's input, accumulated call by call (never stored whole).

    Layers fed the very same input tensor (q/k/v, gate/up) share one Hessian: computed once,
    stored once, factorised once."""

    def __init__(self):
        self.hess: dict = {}
        self.alias: dict[str, str] = {}
        self._last: dict = {"x": None, "name": None}

    def add(self, lname: str, x_in: torch.Tensor) -> None:
        if lname in self.alias:
            return
        last = self._last
        if last["x"] is x_in and last["name"] != lname and lname not in self.hess:
            self.alias[lname] = last["name"]
            return
        last["x"], last["name"] = x_in, lname
        x = x_in.detach().reshape(-1, x_in.shape[-1]).float()
        if lname not in self.hess:
            self.hess[lname] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
        self.hess[lname].addmm_(x.t(), x)

    def forget_last(self) -> None:
        self._last["x"] = None  # the last input is compared by identity only: do not keep it alive

    def result(self, names) -> dict:
        """{name: Hessian} for ``names`` (ValueError naming a layer that never ran)."""
        for lname, src in self.alias.items():
            self.hess[lname] = self.hess[src]
        missing = [n for n in names if n not in self.hess]
        if missing:
            raise ValueError(f"gptq: layer {missing[0]!r} never ran on the calibration inputs, so it has no Hessian; "
                             "exclude it or use a calibration-free method (hqq)")
        return self.hess


@contextlib.contextmanager
def collect_hessians(modules: dict):
    """``Hessians`` of ``modules`` ({name: module}) over the forward passes inside the block; hooks removed
    on exit. Each input is added as it comes (``capture_inputs`` keeps only the None ``add`` returns)."""
    from ..torch_utils import capture_inputs

    acc = Hessians()
    with contextlib.ExitStack() as stack:
        for name, mod in modules.items():
            stack.enter_context(capture_inputs({name: mod}, transform=functools.partial(acc.add, name)))
        try:
            yield acc
        finally:
            acc.forget_last()


# ------------------------------------------------------------------------------ block by block


class _FirstBlock(nn.Module):
    """Stands in for block 0 in a view: records the block's inputs, then stops the run."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_wrapped", block)  # attributes the model reads from a block (attention_type...)
        self.calls: list = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Stop

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)


def capture_block_inputs(model, path: str, batches: torch.Tensor) -> list:
    """[(hidden states, other args, kwargs)] at the input of the first block, one per batch of sequences."""
    blocks = model.get_submodule(path)
    first = _FirstBlock(blocks[0])
    view = module_view(model, {path: nn.ModuleList([first, *blocks[1:]])})
    device = _device(model)
    with torch.inference_mode():
        for i in range(0, batches.shape[0], BATCH):
            try:
                view(input_ids=batches[i:i + BATCH].to(device), use_cache=False)
            except _Stop:
                continue
            raise ValueError(f"gptq: the model's first block ({path}.0) never ran")
    out = []
    for args, kwargs in first.calls:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.append((hidden, args[1:], kwargs))
    return out


def compute_dtype(model):
    """The dtype calibration runs in: fp32 on a CPU (fp16/bf16 matmuls are emulated there, ~5x slower on
    AVX2 CPUs), else the model's own floating dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None or p.device.type in ("cpu", "meta"):
        return torch.float32
    return p.dtype


def cast_inputs(inputs: list, dtype) -> list:
    """The captured block inputs with every floating tensor (hidden states, rotary tables, masks) in ``dtype``."""
    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        if isinstance(v, list):
            return [cast(x) for x in v]
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v

    return [(cast(h), cast(args), cast(kwargs)) for h, args, kwargs in inputs]


def _compute_view(block: nn.Module, dtype) -> nn.Module:
    """A view of ``block`` whose floating parameters and buffers are ``dtype`` copies (the block is untouched)."""
    view = module_view(block)
    for mod in view.modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    table[k] = t.detach().to(dtype)
    return view


def _run_block(block, inputs: list) -> list:
    outs = []
    with torch.inference_mode():
        for hidden, args, kwargs in inputs:
            out = block(hidden, *args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def gptq_by_block(model, path: str, targets: dict, inputs: list, quantize_one, load_block=None):
    """Quantize ``targets`` block by block. Returns ({name: new layer}, [per-layer stats]).

    ``quantize_one(name, module, hessian) -> (new, stats)`` quantizes from the stored weights;
    the block runs as a view in ``compute_dtype`` (its own fp32 copy on a CPU), so the caller's
    block is never changed. ``load_block(i)`` gives block i (streaming: materialised from the
    shards; the quantized layers are put into it); by default the model's own block."""
    from ..torch_utils import trim_heap

    blocks = model.get_submodule(path)
    dtype = compute_dtype(model)
    inputs = cast_inputs(inputs, dtype)
    new_layers, stats = {}, []
    for i in range(len(blocks)):
        stored = load_block(i) if load_block is not None else blocks[i]
        block = _compute_view(stored, dtype)
        prefix = f"{path}.{i}."
        names = [n for n in targets if n.startswith(prefix)]
        if names:
            with collect_hessians({n: block.get_submodule(n[len(prefix):]) for n in names}) as acc:
                _run_block(block, inputs)
            hess = acc.result(names)
            for n in names:
                new, st = quantize_one(n, stored.get_submodule(n[len(prefix):]), hess.pop(n))
                new_layers[n] = new
                stats.append(st)
                _put(block, n[len(prefix):], new)
                if load_block is not None:
                    _put(stored, n[len(prefix):], new)
            hess.clear()
        if i + 1 < len(blocks):
            outs = _run_block(block, inputs)
            inputs = [(o, args, kwargs) for o, (_, args, kwargs) in zip(outs, inputs)]
        del block, stored
        trim_heap()  # the block's fp32 copy, Hessians and factorisations: give their pages back
    return new_layers, stats


def _put(root, rel: str, new) -> None:
    parent, _, child = rel.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --------------------------------------------------------------------------------- whole model


def _runner(model, view, targets: dict):
    """What to run for the Hessians: the output head of a causal LM is ~20% of SmolLM2's forward FLOPs, so
    when it is not a target the base model runs alone (the same inputs reach every target layer)."""
    from ..torch_utils import output_head

    head = output_head(model)
    prefix = getattr(model, "base_model_prefix", "")
    if head is not None and prefix and hasattr(view, prefix) and not any(m is head for m in targets.values()):
        return getattr(view, prefix)
    return view


def whole_model_hessians(model, targets: dict, batches: torch.Tensor | None) -> dict:
    """Hessians of every target over the calibration inputs, the model run whole (on a view)."""
    from ..measure.agreement import call_model, to_device
    from ..models import example_inputs_for, model_kind

    view = module_view(model)
    device = _device(model)
    runner = _runner(model, view, targets)
    with collect_hessians({n: view.get_submodule(n) for n in targets}) as acc:
        with torch.inference_mode():
            if model_kind(model) == "module":
                inputs, why = example_inputs_for(model)
                if inputs is None:
                    raise ValueError(f"gptq needs calibration inputs for this {type(model).__name__} ({why}); "
                                     "attach them with effnb.attach_example_inputs(model, inputs)")
                call_model(runner, to_device(inputs, device))
            else:
                for i in range(0, batches.shape[0], BATCH):
                    runner(input_ids=batches[i:i + BATCH].to(device))
    return acc.result(targets)


def _device(model):
    """Where the model runs: the device of its first parameter not on the meta device (a streamed model's
    blocks stay there until loaded, so ``torch_utils.device_of``, which takes the first parameter, could say "meta")."""
    p = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")
