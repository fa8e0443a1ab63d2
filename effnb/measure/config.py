"""Options of an audit: how much text, how many tokens, how many repeats. No torch import here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..data import check_text
from ..options import MAX_TOKENS, check_bool, check_int

#: bounds of the counts that are not token counts (token counts: ``effnb.options.MAX_TOKENS``)
MAX_REPEATS = 10_000
MAX_WARMUP = 1_000


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
        for name in ("prompt_tokens", "decode_tokens", "quality_tokens", "window"):
            setattr(self, name, check_int(name, getattr(self, name), 1, MAX_TOKENS))
        self.repeats = check_int("repeats", self.repeats, 1, MAX_REPEATS)
        self.warmup = check_int("warmup", self.warmup, 0, MAX_WARMUP)
        for name in ("speed", "quality", "flops", "energy"):
            check_bool(name, getattr(self, name))
        if self.window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {self.window}")
        if self.text is not None:
            check_text(self.text, "text")

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
