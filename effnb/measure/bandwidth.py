"""Bandwidth accounting for decode: bytes read per token, the machine's read bandwidth, and the share used.

Decoding one token at batch 1 reads every weight once, so its speed limit is the memory read
bandwidth divided by the bytes read per token. ``bandwidth_fraction`` = tokens/s x bytes per token /
bandwidth says how close a decode came to that limit (1.0 = every byte at the measured bandwidth; a
model that fits in the CPU's caches can pass 1, as the bandwidth is measured on a tensor larger than them).

``read_bandwidth`` measures once per process (per device, tensor size and torch thread count) and
keeps the figure; ``bytes_per_token`` counts from the model's stored tensors, no run needed.
"""

from __future__ import annotations

import os
import statistics
import time

#: the largest tensor ``read_bandwidth`` sums, in MB (10^6 bytes); ``EFFNB_BANDWIDTH_MB`` sets the size
DEFAULT_MB = 256
ENV_MB = "EFFNB_BANDWIDTH_MB"

_MEASURED: dict[tuple, dict] = {}  # (device, bytes, threads) -> {"bytes_per_s", "method"}


def _tensor_mb(megabytes: int | None) -> int:
    """The size to sum: given, else ``EFFNB_BANDWIDTH_MB``, else 4x the last-level cache (so caches cannot
    serve the reads) between 64 and ``DEFAULT_MB``: on a 2 GB Binder pod the transient tensor stays small."""
    if megabytes is None and ENV_MB not in os.environ:
        llc = _last_level_cache_bytes()
        return DEFAULT_MB if llc is None else min(DEFAULT_MB, max(64, -(-4 * llc // 10 ** 6)))
    mb = megabytes if megabytes is not None else int(os.environ.get(ENV_MB, DEFAULT_MB))
    if mb < 1:
        raise ValueError(f"the bandwidth tensor must be at least 1 MB, got {mb} (from {ENV_MB} or megabytes=)")
    return mb


def _last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports for cpu0 (bytes), or None where it reports none."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def measure_read_bandwidth(device: str = "cpu", megabytes: int | None = None, repeats: int = 5) -> dict:
    """Measure now (no cache): bytes/s of summing an fp32 tensor of ``megabytes`` MB on ``device``.

    One untimed warm-up sum, then the median of ``repeats`` timed sums with the current torch thread
    count, so the figure is what these threads can read (the limit a decode on them faces), not the
    socket's peak. The tensor is freed (and the heap trimmed) before returning. Returns
    {"bytes_per_s": float, "method": str}.
    """
    import torch

    from ..torch_utils import trim_heap
    from .speed import sync

    mb = _tensor_mb(megabytes)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        x = torch.ones(mb * 10 ** 6 // 4, dtype=torch.float32, device=device)
        nbytes = x.nbytes
        x.sum()  # warm-up
        samples = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            x.sum()
            sync(device)
            samples.append(time.perf_counter() - t0)
        del x
    trim_heap()
    where = f"{threads} torch threads" if not str(device).startswith("cuda") else str(device)
    method = f"median of {repeats} sums of a {mb} MB fp32 tensor after 1 warm-up, {where}"
    llc = _last_level_cache_bytes() if not str(device).startswith("cuda") else None
    if llc is not None and nbytes < 4 * llc:
        method += f" (the tensor is under 4x the {llc / 1e6:.0f} MB last-level cache: the figure may exceed DRAM's)"
    return {"bytes_per_s": nbytes / statistics.median(samples), "method": method}


def read_bandwidth(device: str = "cpu", megabytes: int | None = None) -> dict:
    """The machine's memory read bandwidth: {"bytes_per_s", "method"}, measured once and kept.

    Measured by ``measure_read_bandwidth`` (a tensor 4x the last-level cache, 64-256 MB, unless ``megabytes`` or the
    ``EFFNB_BANDWIDTH_MB`` environment variable say otherwise; well under a second) the first time
    it is asked for a device, size and torch thread count; later calls return the same figure.
    """
    import torch

    key = (str(device), _tensor_mb(megabytes), torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = measure_read_bandwidth(str(device), key[1])
    return _MEASURED[key]


def _storage_key(t) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.nbytes)


def _packed_bytes(module) -> int:
    """Bytes of weights a leaf module packs out of sight of ``parameters()`` (torch's dynamically
    quantized Linear keeps (int8 weight, bias) as a tuple in its state dict)."""
    import torch

    if next(module.children(), None) is not None:
        return 0
    return sum(t.nbytes for v in module.state_dict().values() if isinstance(v, tuple)
               for t in v if isinstance(t, torch.Tensor))


def bytes_per_token(model) -> int:
    """Bytes one batch-1 decode step reads from the model's weights.

    Counted:
    - every Linear-like layer (``effnb.torch_utils.linear_layers``: nn.Linear and its bitsandbytes
      subclasses, transformers' Conv1D, effnb's QuantLinear) by its stored tensors, as
      ``effnb.measure.memory.weight_bytes`` counts them: the weight (QuantLinear: codes with their
      scales/zeros/statistics, i.e. ``storage_bytes()``; bitsandbytes: packed weight and quant
      state) and the bias;
    - the output head whole, whatever its type; when it is tied to the input embedding, the full
      table is read by the head (and one row by the lookup, so that row counts twice);
    - one row of each other embedding table (token, position, ...), not the whole table;
    - every other parameter (norms, MoE routers' and experts' parameters held outside Linear
      layers) and the weights torch's dynamic quantization packs into its Linear;
    - each storage once outside the Linear-like layers and the head.

    Not counted: the KV cache (it grows with the context: 2 x layers x KV heads x head size x
    context x element size per step, small next to the weights at the audit's short prompts, so at
    long contexts the fraction understates the traffic), activations, non-persistent buffers (rotary
    frequencies, masks). A layer called several times per token (shared across depth) is counted
    once, and a mixture of experts counts every expert although a token reads only the routed ones
    (an upper bound: its fraction reads high).
    """
    import torch

    from ..torch_utils import linear_layers, output_head
    from .memory import weight_bytes

    head = output_head(model)
    whole = {name: m for name, m in linear_layers(model)}
    whole.update({name: m for name, m in model.named_modules() if m is head and head is not None})
    total, seen = 0, set()
    for name, m in model.named_modules():
        if name in whole or any(name.startswith(w + ".") for w in whole if w):
            # a head's or Linear's submodules are in its state dict, but for weights packed out of it
            total += weight_bytes(m)[0] if name in whole else _packed_bytes(m)
            continue
        if isinstance(m, torch.nn.Embedding):
            total += m.weight.nbytes // max(1, m.num_embeddings)
            seen.add(_storage_key(m.weight))
            continue
        for p in m.parameters(recurse=False):
            if _storage_key(p) not in seen:
                seen.add(_storage_key(p))
                total += p.nbytes
        total += _packed_bytes(m)
    return total


def decode_bandwidth(model, decode_tokens_per_s: float | None, device: str = "cpu") -> dict:
    """The report row's bandwidth fields for a decode of ``decode_tokens_per_s``: ``bytes_per_token``,
    ``read_bandwidth_bytes_per_s`` (measured once per process) and ``bandwidth_fraction``; all None
    when decode was not measured."""
    if decode_tokens_per_s is None:
        return {"bytes_per_token": None, "read_bandwidth_bytes_per_s": None, "bandwidth_fraction": None}
    per_token = bytes_per_token(model)
    bandwidth = read_bandwidth(device)["bytes_per_s"]
    return {"bytes_per_token": per_token, "read_bandwidth_bytes_per_s": bandwidth,
            "bandwidth_fraction": decode_tokens_per_s * per_token / bandwidth}
