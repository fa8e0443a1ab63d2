"""Quantization: ``effnb.quantize`` (api.py, through ``effnb.technique``'s runner), the options (config.py),
the method registry (methods.py), the report (report.py), calibration, save/load and streaming.

Nothing here imports torch at import time. The storage formats, ``QuantLinear`` and the kernels live in
``effnb.kernels``; MoE experts are quantized through a duck-typed protocol (see api.py), so this package
imports no other technique.
"""
