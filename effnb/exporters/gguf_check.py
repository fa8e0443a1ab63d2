"""Read a GGUF file's header back, fast, to check an export before it is renamed into place.

The layout (GGUF version 3, ggml's docs/gguf.md): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; each metadata entry is a string key, a u32 value type and the value (arrays: u32
element type, u64 count, the elements; strings: u64 length, UTF-8 bytes); then per tensor a string name,
u32 dimension count, u64 dimensions (row length first), u32 ggml type, u64 offset into the data, which
starts at the next multiple of ``general.alignment`` (32 by default). Little-endian throughout.

The ``gguf`` package's reader does the same but builds an object per vocabulary string (100k for a
real tokenizer: ~10-50 s); this only steps over them. The tests read exports with the ``gguf`` reader.
"""

from __future__ import annotations

import struct

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, n = self.take("<I"), self.take("<Q")
        if etype in _SCALARS:  # fixed size: step over in one go
            self.pos += n * struct.calcsize(_SCALARS[etype])
        else:
            for _ in range(n):
                self.value(etype)
        return n


def read_header(buf) -> tuple[dict, dict, int]:
    """(metadata: scalars and strings, arrays as their length; tensors: name -> (dims, type, offset); data start)."""
    cur = _Cursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (magic)")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version != 3:
        raise ValueError(f"GGUF version {version}, expected 3")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        tensors[name] = (dims, cur.take("<I"), cur.take("<Q"))
    align = int(meta.get("general.alignment", 32))
    return meta, tensors, -(-cur.pos // align) * align


def check_file(path: str, expected) -> None:
    """ValueError unless ``path`` holds exactly ``expected`` [(name, numpy array, ggml type name)], byte for byte."""
    import mmap

    import gguf
    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        meta, tensors, start = read_header(buf)
        if meta.get("general.architecture") != "llama":
            raise ValueError(f"GGUF check failed for {path}: architecture {meta.get('general.architecture')!r}")
        if set(tensors) != {n for n, _, _ in expected}:
            raise ValueError(f"GGUF check failed for {path}: tensors {sorted(set(tensors) ^ {n for n, _, _ in expected})}")
        for name, arr, qtype in expected:
            dims, ttype, offset = tensors[name]
            want = gguf.GGMLQuantizationType[qtype]
            raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
            got = np.frombuffer(buf, dtype=np.uint8, count=raw.size, offset=start + offset)
            ok = ttype == want and dims == _ggml_dims(arr, want) and np.array_equal(got, raw)
            del got  # the mmap closes only when no view of it is left
            if not ok:
                raise ValueError(f"GGUF check failed for {path}: tensor {name!r} differs from what was written")


def _ggml_dims(arr, qtype) -> tuple[int, ...]:
    """ggml's dimensions (row length first) of the array gguf's writer was given."""
    import gguf

    shape = arr.shape
    if arr.dtype == "uint8" and qtype not in (gguf.GGMLQuantizationType.I8,):
        shape = gguf.quant_shape_from_byte_shape(shape, qtype)
    return tuple(int(d) for d in reversed(shape))
