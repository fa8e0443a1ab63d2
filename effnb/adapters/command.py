"""The ``lora``, ``finetune`` and ``merge`` commands of ``%efficient`` and ``effnb``, as data (no torch import).

``effnb.commands`` registers each entry of ``COMMANDS`` (the keyword arguments of its
``register_command``); this package does not import the front end.
"""

from __future__ import annotations

from .config import FinetuneConfig, LoraConfig, MergeConfig

COMMANDS = [
    dict(
        name="lora",
        summary="attach LoRA adapters (PEFT; QLoRA on a quantized model, --dora, --plus-ratio for LoRA+) and report "
                "trainable share, adapter size and training memory",
        api="effnb.adapters.api:lora",
        config=LoraConfig,
        examples=["%efficient lora model --rank 8 -o lmodel",
                  "%efficient lora qmodel --rank 16 --targets all -o qlmodel",
                  "%efficient lora model --targets q_proj,v_proj --plus-ratio 16 -o lmodel"],
    ),
    dict(
        name="finetune",
        summary="train a model's adapters (or all its weights) with a progress bar and a live loss plot; "
                "held-out loss and answers before/after, tokens/s, peak memory",
        api="effnb.adapters.api:finetune",
        config=FinetuneConfig,
        examples=["%efficient finetune lmodel --steps 60 -o tuned",
                  "%efficient finetune lmodel --data notes.txt --steps 100 --lr 1e-3 -o tuned"],
    ),
    dict(
        name="merge",
        summary="fold LoRA adapters into the base weights (re-quantizing a quantized base) and report the error",
        api="effnb.adapters.api:merge",
        config=MergeConfig,
        examples=["%efficient merge tuned -o merged"],
    ),
]
