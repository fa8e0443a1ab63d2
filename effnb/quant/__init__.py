"""Quantization: ``effnb.quantize`` (api.py), formats, methods, QuantLinear, backends, save/load.

Nothing here imports torch at import time; see ``config.py`` for the options and methods.
"""
