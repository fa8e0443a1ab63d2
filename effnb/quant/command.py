"""The ``quantize`` command of ``%efficient`` and ``effnb`` (registry entry only; no torch import)."""

from __future__ import annotations

from ..commands import register_command
from .config import QuantConfig

register_command(
    "quantize",
    summary="quantize a model's Linear layers (int8, int4, nf4, fp4, hqq, gptq, fp8, llm.int8) and report "
            "size, speed and quality before/after",
    api="effnb.quant.api:quantize",
    config=QuantConfig,
    examples=[
        "%efficient quantize model --method nf4 --group-size 64 -o qmodel",
        "%efficient quantize smollm2-135m --method hqq -o hmodel",
        "%efficient quantize model --method int8 --backend cpu --no-measure",
    ],
)
