"""The ``export`` command of ``%efficient`` and ``effnb``: data only (``effnb.commands`` registers it; no torch
import, and no import of the front end from this package)."""

from __future__ import annotations

import argparse

from .config import ExportConfig


def _positionals(parser: argparse.ArgumentParser) -> None:
    # `%efficient export q gguf out.gguf`: format and path may also come right after the model
    parser.add_argument("format", nargs="?", default=argparse.SUPPRESS, help="gguf, vllm or bitsandbytes (same as --format)")
    parser.add_argument("path", nargs="?", default=argparse.SUPPRESS, help="file (.gguf) or folder to write (same as --path)")


COMMANDS = [dict(
    name="export",
    summary="write a quantized model for a serving engine: gguf (llama.cpp: Q8_0/Q4_0/Q4_1), vllm "
            "(compressed-tensors, also transformers) or bitsandbytes; validated before it returns",
    api="effnb.exporters.api:export",
    config=ExportConfig,
    extra_args=_positionals,
    examples=["%efficient export q gguf out.gguf",
              "%efficient export q vllm out_dir --overwrite",
              "effnb export smollm2-135m --format gguf --path smol-f32.gguf"],
)]
