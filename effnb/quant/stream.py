"""Quantize a checkpoint larger than memory: stream its safetensors shards tensor by tensor.

    effnb.quantize("path/to/folder", method="nf4", save_to="out/", measure=False)

The model is built on the meta device from the folder's ``config.json`` (no memory, no code from
the folder: ``trust_remote_code=False``, a config with ``auto_map`` is refused). Then each stored
tensor is read on its own (``safe_open`` with ``pread``, so no file is memory-mapped): a Linear
weight chosen by ``select_layers`` is converted to fp32, quantized by the very same per-layer
function as the in-memory path, swapped in as a ``QuantLinear`` and freed; every other tensor is
assigned in its stored dtype. GPTQ materialises one decoder block at a time
(``calibrate.gptq_by_block``). The result is written with ``effnb.save``.

Peak resident memory: the quantized model plus a few layers in fp32, plus the interpreter and its
libraries (measured in docs/benchmarks.md#scale). Measuring (``measure=True``) loads the original
model to compare it: pass ``measure=False`` when it does not fit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_folder(source) -> Path | None:
    """The folder to stream for ``source`` (a local checkpoint folder, or a hub id in the local cache), else None."""
    path = Path(source).expanduser()
    if path.is_dir():  # other folders (.bin weights, GGUF) load in memory
        ok = (path / "config.json").exists() and ((path / SINGLE).exists() or (path / INDEX).exists())
        return path if ok else None
    from ..models import looks_like_hub_id

    if path.exists() or not looks_like_hub_id(str(source)):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (OSError, ValueError) as exc:  # not in the cache: the in-memory path says why, in one line
        log.info("%s: not in the local cache (%s)", source, type(exc).__name__)
        return None


class Shards:
    """The tensors of a safetensors checkpoint (one file or an index of several), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX).exists():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            self.files = list(dict.fromkeys(weight_map.values()))
        elif (folder / SINGLE).exists():
            self.files = [SINGLE]
        else:
            raise ValueError(f"{str(folder)!r} has no {SINGLE} or {INDEX}: streaming reads safetensors checkpoints "
                             "(transformers' save_pretrained writes them); load the model and pass it instead")
        self._open: dict = {}
        self.key_file: dict[str, str] = {}
        self.order: list[str] = []  # every key, file by file in stored order
        for f in self.files:
            handle = self._handle(f)
            for k in handle.offset_keys():
                self.key_file[k] = f
                self.order.append(k)

    def _handle(self, f: str):
        from safetensors import safe_open

        if f not in self._open:
            try:
                self._open[f] = safe_open(str(self.folder / f), framework="pt", backend="pread")
            except TypeError:  # safetensors < 0.7: no pread backend (the file is memory-mapped)
                self._open[f] = safe_open(str(self.folder / f), framework="pt")
        return self._open[f]

    def get(self, key: str):
        return self._handle(self.key_file[key]).get_tensor(key)

    def dtype_of(self, key: str):
        import torch

        name = self._handle(self.key_file[key]).get_slice(key).get_dtype()
        return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(name)

    def close(self) -> None:
        self._open.clear()


# -------------------------------------------------------------------------------- the skeleton


def build_skeleton(folder: Path, shards: Shards):
    """The model on the meta device (buffers computed by the constructor), in the checkpoint's dtype, ties made."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..models import quiet_transformers, refuse_remote_code

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {str(folder)!r}'s config.json: {str(exc).splitlines()[0]}") from None
    refuse_remote_code(config, str(folder))
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    dtype = getattr(config, "dtype", None)  # as from_pretrained(dtype="auto"): the config's, else the first float tensor's
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((d for d in map(shards.dtype_of, shards.order) if d is not None), torch.float32)
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=dtype, trust_remote_code=False)
    except ValueError as exc:
        raise ValueError(f"{str(folder)!r}: {str(exc).splitlines()[0]}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config._name_or_path = str(folder)  # where find_tokenizer looks
    return model.eval()


def _slots(model) -> dict:
    """{stored name: [(module, attribute, is parameter)]}: tied parameters have several slots."""
    slots: dict = {}
    by_id: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    for names in by_id.values():
        entry = [(*_owner(model, n), True) for n in names]
        for n in names:
            slots[n] = entry
    for mname, mod in model.named_modules():
        for b in mod._buffers:
            if b not in mod._non_persistent_buffers_set:
                slots[f"{mname}.{b}" if mname else b] = [(mod, b, False)]
    return slots


def _owner(model, name: str):
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _drop_parameters(mod) -> None:
    """Free a quantized layer's float weights now (a tied one stays with its other owner)."""
    for attr in list(mod._parameters):
        mod._parameters[attr] = None


def _key_to_slot_name(key: str, slots: dict, prefix: str) -> str | None:
    if key in slots:
        return key
    if prefix and f"{prefix}.{key}" in slots:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in slots:
        return key[len(prefix) + 1:]
    return None


# ---------------------------------------------------------------------------------- streaming


class _Loader:
    """Assigns stored tensors into the skeleton; quantizes each target layer once its tensors are in."""

    def __init__(self, model, shards: Shards, targets: dict, quantize_one):
        self.model, self.shards, self.targets, self.quantize_one = model, shards, dict(targets), quantize_one
        self.slots = _slots(model)
        self.prefix = getattr(model, "base_model_prefix", "")
        self.stats: list = []
        self.skipped: list = []
        self._target_of = {id(m): n for n, m in self.targets.items()}

    def load(self, keys) -> None:
        import torch

        for key in keys:
            name = _key_to_slot_name(key, self.slots, self.prefix)
            if name is None:
                self.skipped.append(key)
                continue
            t = self.shards.get(key)
            param = torch.nn.Parameter(t, requires_grad=t.is_floating_point())  # one object for all tied slots
            for mod, attr, is_param in self.slots[name]:
                if is_param:
                    mod._parameters[attr] = param
                else:
                    mod._buffers[attr] = t
            del t, param
            for mod, _attr, _ in self.slots[name]:
                self._maybe_quantize(mod)

    def _maybe_quantize(self, mod) -> None:
        lname = self._target_of.get(id(mod))
        if lname is None or self.quantize_one is None or lname not in self.targets:
            return
        if any(p is not None and p.is_meta for p in mod._parameters.values()):
            return  # its bias (or weight) is still to come
        new, st = self.quantize_one(lname, mod, None)
        self.stats.append(st)
        if len(self.stats) % 8 == 0:
            from ..torch_utils import trim_heap

            trim_heap()  # the freed fp16/fp32 copies: keep the resident set near what is live
        parent, child = _owner(self.model, lname)
        setattr(parent, child, new)
        del self.targets[lname]
        _drop_parameters(mod)

    def check_complete(self, folder: Path) -> None:
        missing = [n for n, p in self.model.named_parameters() if p.is_meta]
        if missing or self.targets:
            gone = missing or list(self.targets)
            raise ValueError(f"{str(folder)!r} does not match its config.json: no stored tensor for "
                             f"{', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}")
        if self.skipped:
            log.warning("%s: %d stored tensors the model does not use were skipped (e.g. %s)", folder,
                        len(self.skipped), self.skipped[0])


def quantize_checkpoint(folder: Path, cfg, name: str | None = None):
    """Stream ``folder`` into a quantized model, write it to ``cfg.save_to``; returns the Result."""
    from ..torch_utils import trim_heap
    from .api import quantize_layer, select_layers
    from .methods import get_method
    from .report import build_result
    from .serialize import save

    _check_streamable(folder, cfg)
    t0 = time.perf_counter()
    shards = Shards(folder)
    try:
        model = build_skeleton(folder, shards)
        targets = select_layers(model, cfg)
        cache: dict = {}

        def quantize_one(lname, module, hessian):
            return quantize_layer(lname, module, cfg, hessian, cache)

        if get_method(cfg.method).calibrated:
            loader = _Loader(model, shards, targets, None)
            stats, note = _stream_gptq(model, loader, targets, cfg, quantize_one, folder)
        else:
            loader = _Loader(model, shards, targets, quantize_one)
            loader.load(shards.order)
            stats, note = loader.stats, None
        loader.check_complete(folder)
        cache.clear()
    finally:
        shards.close()
        trim_heap()
    quant_s = time.perf_counter() - t0
    from ..models import find_tokenizer

    find_tokenizer(model)  # found beside the checkpoint: attached, so save writes it
    save(model, cfg.save_to)
    original = _original(folder, model, cfg)
    return build_result(original, model, cfg, stats, quant_s, name=name or folder.name, calibration=note)


def _check_streamable(folder: Path, cfg) -> None:
    from .methods import get_method

    if get_method(cfg.method).bitsandbytes_only or cfg.backend == "bitsandbytes":
        raise ValueError(f"method={cfg.method!r} backend={cfg.backend!r} cannot stream a checkpoint (bitsandbytes "
                         "layers are built from a loaded model); use method int8, int4, nf4, fp4, hqq or gptq with "
                         "backend 'auto', or load the model first and pass it")
    refuse_writing_into(folder, cfg.save_to)


def refuse_writing_into(source, save_to) -> None:
    """ValueError when ``save_to`` is the folder ``source`` or lies inside it: effnb never writes into its input."""
    src = Path(source).expanduser()
    if not src.is_dir():
        return
    out, src = Path(save_to).expanduser().resolve(), src.resolve()
    if out == src or src in out.parents:
        raise ValueError(f"save_to={str(save_to)!r} is inside the checkpoint being read ({str(source)!r}); "
                         "choose another folder: effnb never writes into its input")


def _stream_gptq(model, loader: _Loader, targets: dict, cfg, quantize_one, folder: Path):
    from . import calibrate

    path = calibrate.find_blocks(model, targets)
    if path is None:
        raise ValueError(f"streaming gptq calibrates block by block, and {type(model).__name__}'s quantized layers are "
                         "not all in one list of decoder blocks (quantize_lm_head?); load the model and pass it, "
                         "or use a calibration-free method (hqq)")
    inside = f"{path}."
    order = loader.shards.order
    block_keys: dict[int, list] = {}
    front = []
    for key in order:
        name = _key_to_slot_name(key, loader.slots, loader.prefix) or key
        if name.startswith(inside):
            block_keys.setdefault(int(name[len(inside):].split(".")[0]), []).append(key)
        else:
            front.append(key)
    loader.load(front)  # embeddings, final norm, head: the model's front and back
    batches, note = calibrate.calibration_batches(model, cfg)
    inputs = calibrate.capture_block_inputs(model, path, batches)
    blocks = model.get_submodule(path)

    def load_block(i):
        loader.load(block_keys.get(i, []))
        return blocks[i]

    def quantize_and_free(lname, module, hessian):
        out = quantize_one(lname, module, hessian)
        _drop_parameters(module)  # the loader's table still names the module: its weights must go explicitly
        return out

    _, stats = calibrate.gptq_by_block(model, path, targets, inputs, quantize_and_free, load_block)
    loader.targets.clear()
    return stats, note + ", block by block, streamed"


def _original(folder: Path, qmodel, cfg):
    """The model the report compares against: loaded for measuring; else a stand-in of its shapes and dtypes."""
    if cfg.measure:
        from ..models import load_model

        return load_model(str(folder))
    return _standin(folder)


def _standin(folder: Path):
    """The checkpoint's model with every tensor a broadcast of one element: the report counts its parameters
    and stored bytes (ties included) without holding its weights; nothing is run on it (``measure=False``)."""
    import torch

    shards = Shards(folder)
    try:
        model = build_skeleton(folder, shards)
    finally:
        shards.close()
    done: dict = {}
    for _n, mod in model.named_modules():
        for attr, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                t = torch.zeros(1, dtype=p.dtype).expand(p.shape)
                done[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            mod._parameters[attr] = done[id(p)]
    from ..models import NAME_ATTR

    object.__setattr__(model, NAME_ATTR, folder.name)
    return model


def folder_bytes(folder) -> int:
    """Bytes of a folder's files (for reports and benchmarks)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
