"""Options of an audit: how much text, how many tokens, how many repeats. No torch import here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        need = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {need}, got {value!r}")


@dataclass
class AuditConfig:
    """What an audit measures and at what size. Defaults fit a 2-core CPU in seconds."""

    prompt_tokens: int = field(default=128, metadata={"help": "prompt length for prefill latency and FLOPs (tokens)"})
    decode_tokens: int = field(default=32, metadata={"help": "tokens generated greedily per decode timing"})
    repeats: int = field(default=3, metadata={"help": "timed repeats; the median is reported, the spread kept"})
    warmup: int = field(default=1, metadata={"help": "untimed warm-up runs before timing"})
    quality_tokens: int = field(default=2048, metadata={"help": "tokens of evaluation text for perplexity"})
    window: int = field(default=512, metadata={"help": "perplexity window (tokens), non-overlapping"})
    speed: bool = field(default=True, metadata={"help": "measure prefill latency and decode speed"})
    quality: bool = field(default=True, metadata={"help": "measure quality (perplexity or retrieval)"})
    flops: bool = field(default=True, metadata={"help": "count FLOPs per token (torch.utils.flop_counter)"})
    energy: bool = field(default=True, metadata={"help": "read an energy counter where one exists"})
    text: str | None = field(default=None, metadata={"help": "evaluation text, a file path, or None for the built-in text"})

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "decode_tokens", "repeats", "quality_tokens", "window"):
            _positive(name, getattr(self, name))
        _positive("warmup", self.warmup, allow_zero=True)
        for name in ("speed", "quality", "flops", "energy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> AuditConfig:
        """Build from keyword arguments, rejecting unknown ones with the list of known ones."""
        from ..options import reject_unknown

        reject_unknown(cls, "audit", kwargs)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "text"} | {
            "text": "built-in" if self.text is None else "user"
        }
