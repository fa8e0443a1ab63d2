"""The ``audit`` and ``compare`` commands, as data the front end registers (no torch import)."""

from __future__ import annotations

import argparse

from .config import AuditConfig


def _names_arg(parser) -> None:
    parser.add_argument("--names", type=lambda s: [n for n in s.split(",") if n], metavar="A,B,...", default=argparse.SUPPRESS,
                        help="display names of the variants, comma-separated (default: their variable names)")


COMMANDS = [
    dict(
        name="audit",
        summary="measure a model: parameters, weight and peak memory, prefill latency, decode speed, quality, FLOPs, "
                "energy",
        api="effnb.measure.core:audit",
        config=AuditConfig,
        makes_model=False,
        examples=["%efficient audit smollm2-135m", "%efficient audit model --decode-tokens 64 -o baseline_report"],
    ),
    dict(
        name="compare",
        summary="measure several variants side by side in one run; ratios against the first",
        api="effnb.measure.core:compare",
        config=AuditConfig,
        models="+",
        extra_args=_names_arg,
        makes_model=False,
        examples=["%efficient compare model qmodel", "%efficient compare model qmodel --names fp32,nf4 --json cmp.json"],
    ),
]
