"""The ``moe`` and ``moe-stats`` commands: data only (``effnb.commands`` registers them; no torch import, and no
import of the front end from this technique package)."""

from __future__ import annotations

import argparse

from .config import MoEConfig, MoEStatsConfig


def _text_arg(parser: argparse.ArgumentParser) -> None:
    # `%efficient moe-stats MODEL "some text"`: the text may also come as a positional after the model
    parser.add_argument("text", nargs="?", default=argparse.SUPPRESS,
                        help="text to route (same as --text; quote it), right after the model")


COMMANDS = [
    dict(
        name="moe",
        summary="turn a dense model into a Mixture-of-Experts (split its FFNs into experts, or upcycle); "
                "report active parameters, FLOPs, perplexity over top_k and FFN time",
        api="effnb.experts.api:moe",
        config=MoEConfig,
        examples=["%efficient moe smollm2-135m --experts 8 --top-k 2 -o moe_model",
                  "%efficient moe model --method upcycle --experts 4 --top-k 2 -o up_model",
                  "%efficient moe tiny-llama --sweep 1,2,8 --quality-tokens 512"],
    ),
    dict(
        name="moe-stats",
        summary="routing statistics of an MoE model (effnb's or transformers' Mixtral/Qwen-MoE/OLMoE): tokens per "
                "expert, imbalance, aux loss, router entropy, which tokens go where; with a heatmap",
        api="effnb.experts.api:moe_stats",
        config=MoEStatsConfig,
        extra_args=_text_arg,
        makes_model=False,
        examples=["%efficient moe-stats moe_model", "%efficient moe-stats tiny-mixtral 'def f(x): return x'",
                  "%efficient moe-stats moe_model --text notes.txt --max-tokens 256"],
    ),
]
