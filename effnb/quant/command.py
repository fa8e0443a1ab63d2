"""The ``quantize`` command of ``%efficient`` and ``effnb``: data only (``effnb.commands`` registers it; no torch
import, and no import of the front end from this technique package)."""

from __future__ import annotations

from .config import QuantConfig

COMMANDS = [dict(
    name="quantize",
    summary="quantize a model's Linear layers (int8, int4, nf4, fp4, hqq, gptq, fp8, llm.int8) and report "
            "size, speed and quality before/after",
    api="effnb.quant.api:quantize",
    config=QuantConfig,
    stream_option="save_to",  # --save-to streams a checkpoint folder instead of loading it whole
    examples=[
        "%efficient quantize model --method nf4 --group-size 64 -o qmodel",
        "%efficient quantize smollm2-135m --method hqq -o hmodel",
        "%efficient quantize model --method int8 --backend cpu --no-measure",
    ],
)]
