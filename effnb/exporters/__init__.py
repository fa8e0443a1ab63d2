"""``effnb.export``: write an effnb model in the formats serving engines read.

    effnb.export(q, "gguf", "out.gguf")          # llama.cpp (and transformers' GGUF loader)
    effnb.export(q, "vllm", "out_dir")           # compressed-tensors: vLLM and transformers
    effnb.export(q, "bitsandbytes", "out_dir")   # transformers + bitsandbytes

No torch import here: the modules below import torch, gguf and safetensors inside their functions.
"""
