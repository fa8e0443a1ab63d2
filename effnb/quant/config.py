"""``QuantConfig``: the one source of ``effnb.quantize``'s options (no torch import here).

The magic and the CLI derive their ``--options`` from these fields, so ``%efficient quantize
--help`` and this docstring cannot drift apart.

Methods and what they cost (4 bits, group 64, measured in docs/benchmarks.md):
  int8      weight-only int8, per group (or per channel with group_size 0): ~2x smaller than bf16,
            quality within noise of fp32, fastest CPU decode.
  int4      round-to-nearest int4, asymmetric (float zero) or --symmetric; instant, lowest quality.
  nf4, fp4  bitsandbytes' NormalFloat4 / FP4, same bytes as bitsandbytes (either side reads the
            other's weights); optional double quantization of the block absmax (QLoRA).
  hqq       calibration-free grid optimisation, seconds. Default --hqq-grid nf4: NF4 codes with each
            block's scale searched (magnitude-weighted least squares), stored as nf4 (same bytes,
            kernels and bitsandbytes compatibility); --hqq-grid int4: the HQQ paper's half-quadratic
            optimisation of asymmetric int4 zeros.
  gptq      int4 with second-order error compensation from calibration text, ~a minute on CPU.
  fp8       float8 e4m3 weight-only with a per-group scale.
  llm.int8  bitsandbytes' LLM.int8() (int8 with fp16 outlier columns); runs through bitsandbytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..options import did_you_mean
from ..technique import TechniqueConfig
from .methods import METHODS, get_method

BACKENDS = ("auto", "reference", "cpu", "cuda", "bitsandbytes")
GROUP_SIZES = (32, 64, 128, 256)
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
HQQ_GRIDS = ("nf4", "int4")


def _hint(value, allowed) -> str:
    # quantize's option names are short and alike: a looser cutoff than the options' default
    return did_you_mean(value, allowed, cutoff=0.5)


def allowed_group_sizes(method, bits: int) -> tuple:
    """The group sizes ``method`` (a ``Method``) takes at ``bits``; 0 (one scale per output channel)
    only at 8 bits."""
    if method.group_rule == "blocksize":
        return BNB_BLOCKSIZES
    return (*GROUP_SIZES, 0) if bits == 8 else GROUP_SIZES


@dataclass
class QuantConfig(TechniqueConfig):
    """Options of ``effnb.quantize``. Every field is also ``--kebab-case`` on the magic and CLI."""

    method: str = field(default="nf4", metadata={"help": "quantization method", "choices": list(METHODS)})
    bits: int | None = field(default=None, metadata={
        "help": "bits per weight (None: the method's own; hqq/gptq take 4 or 8)"})
    group_size: int = field(default=64, metadata={
        "help": "weights per scale along the input dimension (nf4/fp4: bitsandbytes blocksize); "
                "0 = one scale per output channel (int8, fp8)"})
    symmetric: bool = field(default=False, metadata={"help": "int4/hqq/gptq: symmetric codes (zero fixed at 8)"})
    double_quant: bool = field(default=False, metadata={
        "help": "nf4/fp4: quantize the block absmax to 8 bits as QLoRA does (~0.37 bit/weight less)"})
    include: list[str] | None = field(default=None, metadata={
        "help": "module-name patterns to quantize (fnmatch, e.g. '*.mlp.*'); default: every Linear"})
    exclude: list[str] | None = field(default=None, metadata={"help": "module-name patterns to keep unquantized"})
    quantize_lm_head: bool = field(default=False, metadata={
        "help": "also quantize the output head (kept by default, as the peers do)"})
    backend: str = field(default="auto", metadata={
        "help": "how quantized layers run: auto picks the fastest correct path for the device",
        "choices": list(BACKENDS)})
    calibration: str | None = field(default=None, metadata={
        "help": "gptq: calibration text or file path (default: effnb's built-in calibration text)"})
    calibration_samples: int = field(default=32, metadata={"help": "gptq: number of calibration sequences"})
    calibration_tokens: int = field(default=256, metadata={"help": "gptq: tokens per calibration sequence"})
    hqq_iters: int = field(default=20, metadata={"help": "hqq --hqq-grid int4: optimisation iterations per layer"})
    hqq_grid: str = field(default="nf4", metadata={
        "help": "hqq: nf4 (NF4 codes, optimised block scales; best quality) or int4 (asymmetric int4, "
                "half-quadratic zero optimisation as in the HQQ paper)", "choices": list(HQQ_GRIDS)})
    gptq_damp: float = field(default=0.01, metadata={"help": "gptq: dampening, fraction of the mean Hessian diagonal"})
    llm_int8_threshold: float = field(default=6.0, metadata={"help": "llm.int8: outlier threshold"})
    inplace: bool = field(default=False, metadata={  # TechniqueConfig's, with quantize's own help
        "help": "replace the layers of the given model instead of returning a new one", "cli": False})
    share_unquantized: bool = field(default=False, metadata={
        "help": "the new model reuses the input model's tensors that are not quantized (embeddings, norms, "
                "a kept lm_head) instead of copying them: saves their memory when several variants are "
                "kept (SmolLM2: 113 MB each); an in-place change to one of those tensors then shows in "
                "both models"})
    measure: bool = field(default=True, metadata={  # TechniqueConfig's, with quantize's own help
        "help": "measure speed and quality before and after (off: sizes and per-layer SNR only)"})
    save_to: str | None = field(default=None, metadata={
        "help": "also write the quantized model to this folder (effnb.save); given a checkpoint folder or a cached "
                "hub id, quantize streams it tensor by tensor, for models larger than memory (measuring "
                "still loads the original: add --no-measure to keep memory at the quantized model's size)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        method = get_method(self.method)  # ValueError naming the methods, with a did-you-mean
        self.method = method.name
        self._check_bits_and_groups(method)
        self._check_method_options(method)
        self._check_backend(method)
        self._check_numbers()
        self._check_save_and_patterns()

    def _check_bits_and_groups(self, method) -> None:
        sizes = BNB_BLOCKSIZES if method.group_rule == "blocksize" else (*GROUP_SIZES, 0)
        for name, allowed in (("bits", method.bits), ("group_size", sizes)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__}); "
                                f"{self.method} takes {', '.join(map(str, allowed))}")
        if self.bits is None:
            self.bits = method.bits[0]
        if isinstance(self.bits, bool) or self.bits not in method.bits:
            raise ValueError(f"method {self.method!r} does not support bits={self.bits!r} "
                             f"(supported: {', '.join(map(str, method.bits))})")
        if method.group_rule == "unused":
            return
        allowed = allowed_group_sizes(method, self.bits)
        if self.group_size in allowed:
            return
        if method.group_rule == "blocksize":
            raise ValueError(f"method {self.method!r} does not support group_size={self.group_size!r} "
                             f"(bitsandbytes blocksizes: {', '.join(map(str, BNB_BLOCKSIZES))})")
        raise ValueError(f"method {self.method!r} does not support group_size={self.group_size!r} "
                         f"(supported: {', '.join(map(str, allowed))}"
                         f"{'; 0 = per output channel' if 0 in allowed else ''})")

    def _check_method_options(self, method) -> None:
        if self.share_unquantized and self.inplace:
            raise ValueError("share_unquantized applies to a new model; with inplace=True there is nothing to share")
        if self.double_quant and not method.double_quant:
            raise ValueError(f"double_quant applies to nf4 and fp4 only, not method {self.method!r}")
        if self.hqq_grid not in HQQ_GRIDS:
            raise ValueError(f"unknown hqq_grid {self.hqq_grid!r}{_hint(self.hqq_grid, HQQ_GRIDS)} "
                             "(grids: nf4, int4)")
        if self.symmetric and not method.symmetric:
            raise ValueError(f"symmetric applies to int4, hqq and gptq only, not method {self.method!r}")

    def _check_backend(self, method) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}{_hint(self.backend, BACKENDS)} "
                             f"(backends: {', '.join(BACKENDS)})")
        if method.bitsandbytes_only and self.backend not in ("auto", "bitsandbytes"):
            raise ValueError(f"{self.method} runs only through bitsandbytes, not backend={self.backend!r} "
                             "(use backend='auto' or 'bitsandbytes')")
        if self.backend == "bitsandbytes" and not method.bitsandbytes:
            raise ValueError(f"the bitsandbytes backend runs nf4, fp4, int8 and llm.int8, not {self.method!r}")

    def _check_numbers(self) -> None:
        for name in ("calibration_samples", "calibration_tokens", "hqq_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (0 <= float(self.gptq_damp) < 1):
            raise ValueError(f"gptq_damp must be in [0, 1), got {self.gptq_damp!r}")
        if isinstance(self.llm_int8_threshold, bool) or not isinstance(self.llm_int8_threshold, (int, float)):
            raise TypeError(f"llm_int8_threshold must be a number, got {self.llm_int8_threshold!r}")
        if not self.llm_int8_threshold >= 0:
            raise ValueError(f"llm_int8_threshold must be >= 0 (0 = no outlier columns), got {self.llm_int8_threshold!r}")

    def _check_save_and_patterns(self) -> None:
        if self.save_to is not None:
            if not isinstance(self.save_to, (str, os.PathLike)) or not str(self.save_to).strip():
                raise TypeError(f"save_to must be a folder path, got {self.save_to!r}")
            if self.inplace:
                raise ValueError("save_to writes a new model; it cannot be combined with inplace=True")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [p for p in v.split(",") if p])
            elif v is not None and not all(isinstance(p, str) for p in v):
                raise TypeError(f"{name} must be a list of name patterns, got {v!r}")

    @property
    def fmt(self) -> str:
        """Storage format of the quantized layers."""
        return get_method(self.method).format(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> QuantConfig:
        known = [f.name for f in fields(cls)]
        for k in kwargs:
            if k not in known:
                raise TypeError(f"unknown quantize option {k!r}{_hint(k, known)} (options: {', '.join(known)})")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
