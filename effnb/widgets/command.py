"""``%efficient explore KIND OBJECT...``: open a widget from the magic (as data the front end registers;
no torch import)."""

from __future__ import annotations

import argparse

KINDS = ("quant", "lora", "router", "compare")


def _explore_args(parser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which widget: quant, lora, router (MoE model), compare (reports)")
    parser.add_argument("objects", nargs="+", metavar="OBJECT",
                        help="a notebook variable or embedded model name; for compare: reports, results or JSON paths")
    parser.add_argument("--text", default=argparse.SUPPRESS, help="router: the text to route (default: built-in text)")
    parser.add_argument("--layer", default=argparse.SUPPRESS, help="quant: the layer shown first")
    parser.add_argument("--method", default=argparse.SUPPRESS, help="quant: the method shown first")
    parser.add_argument("--rank", type=int, default=argparse.SUPPRESS, help="lora: the rank shown first")


COMMANDS = [dict(
    name="explore",
    summary="open an interactive widget: quant (layer, bits, group size), lora (rank, targets), "
            "router (MoE routing), compare (reports on a memory/quality chart)",
    api="effnb.widgets.api:explore",
    models=0,
    extra_args=_explore_args,
    examples=["%efficient explore quant model", "%efficient explore lora model --rank 16",
              "%efficient explore router moe_model --text 'def f(x): return x'",
              "%efficient explore compare report_a res_b"],
)]
