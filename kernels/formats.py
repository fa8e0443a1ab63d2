"""The Format table: every fact about a storage format of quantized weights, in one place.

A format says which buffers a layer stores, their dtypes and shapes (what ``check_layer``
enforces before any pointer reaches compiled code), how to quantize and dequantize (the PyTorch
references of ``reference.py``), which ``torch.library`` ops run it (``ops.py``) and what its CPU
kernel needs. Code elsewhere looks a format up here instead of testing its name, so adding a
format means adding one entry.

Importing this module does not import torch: configs validate format names with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from effnb.options import did_you_mean

_FLOATS = ("float16", "bfloat16", "float32")
DQ_STATS = ("qabsmax", "absmax2", "code2", "offset")  # double quantization: all four or none
DQ_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantized absmax
_ITEMSIZE = {"uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def _dtypes(names: tuple[str, ...]) -> tuple:
    import torch

    return tuple(getattr(torch, n) for n in names)


@dataclass(frozen=True)
class Format:
    name: str                       # "int4", "int8", "nf4", "fp4", "fp8"
    bits: int                       # bits per stored code
    buffers: tuple[str, ...]        # every buffer a layer of this format may hold, in order
    grouping: str                   # "row": groups along each row; "flat": bitsandbytes blocks over the flat weight
    bnb: str | None                 # bitsandbytes equivalent, or None
    ops: tuple[str, ...]            # names of its torch.library ops (empty: the reference runs)
    code_dtype: str = "uint8"       # dtype of qweight
    scale_dtype: str = "float16"    # dtype the quantizers store scales (absmax) in
    cpu_kernel: bool = False        # kernels/cpu has a kernel for it
    cpu_fp16_scales: bool = False   # ...which reads the scales as fp16 (any other dtype: not eligible)
    table: tuple[float, ...] = ()   # the 16 values 4-bit indices stand for (bitsandbytes' formats)

    # ---------------------------------------------------------------------------- layout

    def expected(self, n: int, k: int, group_size: int) -> dict:
        """Per buffer: (allowed torch dtypes, shape tuple or element count) the kernels rely on."""
        raise NotImplementedError

    def required(self, present: set[str]) -> set[str]:
        """The buffers a layer must hold, given those it holds (optional ones may be absent)."""
        raise NotImplementedError

    def layout_error(self, k: int, group_size: int) -> str | None:
        """Why sizes (in_features, group) cannot hold this format, or None."""
        return None

    def storage_bytes(self, n: int, k: int, group_size: int, **opts) -> int:
        """Bytes of a quantized [n, k] weight with its statistics (``opts``: symmetric, double_quant)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------- arithmetic

    def quantize(self, w, group_size: int, **opts) -> dict:
        """Round-to-nearest reference: weight [N, K] -> this format's buffers."""
        raise NotImplementedError

    def dequantize(self, tensors: dict, group_size: int, shape: tuple[int, int]):
        """fp32 [N, K] from this format's buffers (the ground truth every kernel must match)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- kernels

    def op_args(self, tensors: dict, group_size: int, shape: tuple[int, int]) -> tuple[str, tuple]:
        """(op name, its arguments between x and bias) for ``torch.ops.effnb.<op>``."""
        raise NotImplementedError

    def cpu_error(self, k: int, group_size: int, fast: bool) -> str | None:
        """Why the CPU kernel cannot take these sizes (``fast``: the matmul, else the dequantize)."""
        if not self.cpu_kernel:
            return f"format {self.name} has no CPU kernel"
        return None


@dataclass(frozen=True)
class RowFormat(Format):
    """Integer or float codes with a scale (and for int4 an optional zero) per group along a row."""

    codes_per_byte: int = 1
    zeros: bool = False  # stores an optional zero point per group

    def expected(self, n, k, group_size):
        floats = _dtypes(_FLOATS)
        out = {"qweight": (_dtypes((self.code_dtype,)), (n, k // self.codes_per_byte)),
               "scales": (floats, (n, k // group_size))}
        if self.zeros:
            out["zeros"] = (floats, (n, k // group_size))
        return out

    def required(self, present):
        return {"qweight", "scales"}

    def layout_error(self, k, group_size):
        if k % group_size:
            return f"group_size {group_size} does not divide in_features {k} ({self.name} groups run along a row)"
        if k % self.codes_per_byte:
            return f"{self.name} packs two columns per byte: in_features {k} must be even"
        return None

    def storage_bytes(self, n, k, group_size, **opts):
        groups = n * (k // group_size) * _ITEMSIZE[self.scale_dtype]
        zeros = groups if self.zeros and not opts.get("symmetric", False) else 0
        return n * k // self.codes_per_byte + groups + zeros

    def cpu_error(self, k, group_size, fast):
        why = super().cpu_error(k, group_size, fast)
        if why is None and (k % 32 or group_size % 32):
            return f"in_features {k} or group size {group_size} not a multiple of 32"
        return why

    # reference.py names the arithmetic of each row format after it: quantize_<name>, dequantize_<name>
    def dequantize(self, tensors, group_size, shape):
        from . import reference as R

        return getattr(R, f"dequantize_{self.name}")(*(tensors.get(b) for b in self.buffers), group_size)

    def quantize(self, w, group_size, **opts):
        """Buffers of ``w``; ``symmetric=True`` stores no zeros (formats with zero points)."""
        from . import reference as R

        extra = {"symmetric": opts.get("symmetric", False)} if self.zeros else {}
        return getattr(R, f"quantize_{self.name}")(w, group_size, **extra)

    def op_args(self, tensors, group_size, shape):
        return self.ops[0], (*(tensors.get(b) for b in self.buffers), group_size)


@dataclass(frozen=True)
class TableFormat(Format):
    """bitsandbytes' 4-bit layout: indices into a 16-entry table, absmax per flat block."""

    def expected(self, n, k, group_size):
        blocks = -(-n * k // group_size)
        f32 = _dtypes(("float32",))  # the CPU kernels read these as fp32 arrays
        return {"qweight": (_dtypes(("uint8",)), -(-n * k // 2)), "absmax": (f32, blocks),
                "qabsmax": (_dtypes(("uint8",)), blocks), "absmax2": (f32, -(-blocks // DQ_BLOCKSIZE)),
                "code2": (f32, 256), "offset": (f32, 1)}

    def required(self, present):
        dq = present & set(DQ_STATS)
        if dq and dq != set(DQ_STATS):
            raise ValueError(f"double quantization needs all of {', '.join(DQ_STATS)}; missing "
                             f"{', '.join(sorted(set(DQ_STATS) - dq))}")
        return {"qweight", *(DQ_STATS if dq else ("absmax",))}

    def storage_bytes(self, n, k, group_size, **opts):
        blocks = -(-n * k // group_size)
        stats = blocks + 4 * (-(-blocks // DQ_BLOCKSIZE) + 256 + 1) if opts.get("double_quant") else 4 * blocks
        return -(-n * k // 2) + stats

    def cpu_error(self, k, group_size, fast):
        why = super().cpu_error(k, group_size, fast)
        if why is None and fast and (k % 32 or group_size % 32):
            return f"in_features {k} or group size {group_size} not a multiple of 32"
        if why is None and fast and k % group_size:
            return f"blocks of {group_size} cross rows of {k}"
        return why

    def absmax(self, tensors: dict):
        """Per-block absmax as fp32, undoing double quantization if the tensors use it."""
        from . import reference as R

        if tensors.get("qabsmax") is not None:
            return R.undo_double_quant(*(tensors[s] for s in DQ_STATS))
        return tensors["absmax"]

    def dequantize(self, tensors, group_size, shape):
        from . import reference as R

        return R.dequantize_4bit(tensors["qweight"], self.absmax(tensors), group_size, self.name, shape)

    def quantize(self, w, group_size, **opts):
        """Buffers of ``w``; ``double_quant=True`` compresses absmax as bitsandbytes does."""
        from . import reference as R

        qweight, absmax = R.quantize_4bit(w, group_size, self.name)
        return {"qweight": qweight, **(R.double_quant(absmax) if opts.get("double_quant") else {"absmax": absmax})}

    def op_args(self, tensors, group_size, shape):
        n, k = shape
        if tensors.get("qabsmax") is not None:  # the kernel reads the 8-bit codes: no fp32 absmax per call
            return self.ops[1], (tensors["qweight"], *(tensors[s] for s in DQ_STATS), self.name, group_size, n, k)
        return self.ops[0], (tensors["qweight"], tensors["absmax"], self.name, group_size, n, k)


_LUT = ("lut4_linear", "lut4_dq_linear")
_BNB_BUFFERS = ("qweight", "absmax", *DQ_STATS)

FORMATS: dict[str, Format] = {f.name: f for f in (
    RowFormat("int4", 4, ("qweight", "scales", "zeros"), "row", None, ("int4_linear",), cpu_kernel=True,
              cpu_fp16_scales=True, codes_per_byte=2, zeros=True),
    RowFormat("int8", 8, ("qweight", "scales"), "row", "int8", ("int8_linear",), code_dtype="int8",
              cpu_kernel=True, cpu_fp16_scales=True),
    TableFormat("nf4", 4, _BNB_BUFFERS, "flat", "nf4", _LUT, scale_dtype="float32", cpu_kernel=True, table=(
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)),
    TableFormat("fp4", 4, _BNB_BUFFERS, "flat", "fp4", _LUT, scale_dtype="float32", cpu_kernel=True, table=(
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
        0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
        -0.1666666716337204, -0.25)),
    RowFormat("fp8", 8, ("qweight", "scales"), "row", None, (), code_dtype="float8_e4m3fn", scale_dtype="float32"),
)}


def get_format(name: str) -> Format:
    """The Format called ``name``; ValueError naming the allowed ones (and the nearest) otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown format {name!r}{did_you_mean(name, FORMATS)}; supported: {', '.join(FORMATS)}")
    return fmt
