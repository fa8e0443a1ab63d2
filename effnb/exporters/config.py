"""``ExportConfig``: the one source of ``effnb.export``'s options (no torch import here).

Formats:
  gguf           one ``.gguf`` file for llama.cpp (and transformers' ``gguf_file=`` loader): effnb's int8
                 group 32 -> Q8_0, symmetric int4 group 32 -> Q4_0, asymmetric int4 group 32 -> Q4_1 (also
                 from GPTQ/HQQ on those grids), bytes re-packed without requantization; float tensors as stored.
  vllm           a folder in compressed-tensors' ``pack-quantized`` format (int4 symmetric / int8, any group
                 size effnb has, or per channel), with ``quantization_config`` in config.json: what vLLM and
                 transformers load for GPTQ-style weight-only models. ``compressed-tensors`` is an alias.
  bitsandbytes   a transformers folder with bitsandbytes nf4/fp4 or per-channel int8 layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..options import did_you_mean

FORMATS = ("gguf", "vllm", "compressed-tensors", "bitsandbytes")


@dataclass
class ExportConfig:
    """Options of ``effnb.export``. Every field is also ``--kebab-case`` on the magic and CLI."""

    format: str = field(default="gguf", metadata={
        "help": "gguf (llama.cpp), vllm (compressed-tensors, also read by transformers) or bitsandbytes",
        "choices": list(FORMATS)})
    path: str = field(default="", metadata={
        "help": "where to write: a file ending in .gguf for gguf, a folder for vllm and bitsandbytes"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing file or folder at path"})
    tokenizer: bool = field(default=True, metadata={
        "help": "include the model's tokenizer (gguf: its vocabulary, merges and special tokens as metadata)"})

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format.lower() not in FORMATS:
            raise ValueError(f"unknown export format {self.format!r}{did_you_mean(self.format, FORMATS)} "
                             f"(formats: {', '.join(FORMATS)})")
        self.format = self.format.lower()
        if self.format == "compressed-tensors":
            self.format = "vllm"
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise TypeError(f"path must be a file or folder path, got {self.path!r}")
        self.path = os.path.expanduser(os.fspath(self.path))
        for name in ("overwrite", "tokenizer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.format == "gguf" and not self.path.endswith(".gguf"):
            raise ValueError(f"gguf export writes one file: path must end in .gguf (e.g. 'out.gguf'), got {self.path!r}")
        if self.format != "gguf" and self.path.endswith(".gguf"):
            raise ValueError(f"{self.format} export writes a folder, not a .gguf file: got path {self.path!r} "
                             "(use format='gguf' for a .gguf file)")
        if os.path.lexists(self.path) and not self.overwrite:
            raise ValueError(f"{self.path!r} already exists; pass overwrite=True (--overwrite) to replace it")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ValueError(f"the folder {parent!r} for {self.path!r} does not exist")

    @classmethod
    def from_kwargs(cls, **kwargs) -> ExportConfig:
        from ..options import reject_unknown

        reject_unknown(cls, "export", kwargs)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
