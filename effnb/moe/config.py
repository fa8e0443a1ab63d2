"""Options of ``effnb.moe`` and ``effnb.moe_stats``: one dataclass each, the source of the command options.

No torch import here: the command registry reads these when ``%load_ext effnb`` runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

METHODS = ("split", "upcycle")
ROUTERS = ("auto", "calibration", "weights", "random")
CLUSTERINGS = ("activations", "weights")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")


def _int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _float(name: str, value, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


@dataclass
class MoEConfig:
    """How a dense model becomes a Mixture-of-Experts. Defaults fit a 2-core CPU in about a minute on SmolLM2."""

    experts: int = field(default=8, metadata={"help": "experts per FFN block; for split it must divide the FFN size"})
    top_k: int = field(default=2, metadata={"help": "experts each token is routed to (1..experts)"})
    method: str = field(default="split", metadata={
        "help": "split: partition each FFN's neurons into experts (MoEfication); "
                "upcycle: copy each FFN into experts with a new router (sparse upcycling)",
        "choices": list(METHODS)})
    router: str = field(default="auto", metadata={
        "help": "split: 'calibration' fits a linear router on calibration activations, 'weights' builds it from "
                "the FFN weights alone; upcycle: 'random' (new router, std --router-std). auto: calibration / random",
        "choices": list(ROUTERS)})
    clustering: str = field(default="activations", metadata={
        "help": "split: group neurons by co-activation on calibration text, or by their weight vectors",
        "choices": list(CLUSTERINGS)})
    calibration_tokens: int = field(default=2048, metadata={"help": "tokens of calibration text (split)"})
    calibration: str | None = field(default=None, metadata={
        "help": "calibration text, a file path, or None for the built-in calibration text (disjoint from the eval text)"})
    router_std: float = field(default=0.02, metadata={"help": "upcycle: std of the new router's weights"})
    expert_noise: float = field(default=0.0, metadata={
        "help": "upcycle: relative noise added to each expert copy (0 keeps the model identical to the dense one)"})
    aux_loss_coef: float = field(default=0.01, metadata={
        "help": "weight of the load-balancing loss that effnb.moe.aux_loss(model) returns"})
    sweep: list[int] | None = field(default=None, metadata={
        "help": "top_k values for the quality/compute sweep in the report (default: 1,2,4,.. up to experts; "
                "empty string: no sweep)"})
    quality_tokens: int = field(default=2048, metadata={"help": "tokens of evaluation text for perplexity"})
    ffn_tokens: int = field(default=512, metadata={"help": "tokens for timing the FFN blocks dense vs MoE"})
    timing_repeats: int = field(default=5, metadata={"help": "timed repeats of the FFN blocks (median reported)"})
    measure: bool = field(default=True, metadata={"help": "measure the before/after report (off: structure only)"})
    share_unchanged: bool = field(default=False, metadata={
        "help": "the new model reuses the input model's tensors that the conversion leaves as they are "
                "(embeddings, attention, norms) instead of copying them: saves their memory (SmolLM2: "
                "220 MB); an in-place change to one of those tensors then shows in both models"})
    seed: int = field(default=0, metadata={"help": "seed for clustering and router initialisation"})

    def __post_init__(self) -> None:
        _int("experts", self.experts, 1)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be an integer from 1 to experts={self.experts}, got {self.top_k!r}")
        _choice("method", self.method, METHODS)
        _choice("router", self.router, ROUTERS)
        _choice("clustering", self.clustering, CLUSTERINGS)
        if self.router == "auto":
            self.router = "calibration" if self.method == "split" else "random"
        allowed = {"split": ("calibration", "weights"), "upcycle": ("random",)}[self.method]
        if self.router not in allowed:
            raise ValueError(f"router {self.router!r} does not apply to method {self.method!r}; "
                             f"allowed: {', '.join(map(repr, allowed))}")
        _int("calibration_tokens", self.calibration_tokens, 16)
        _int("quality_tokens", self.quality_tokens, 2)
        _int("ffn_tokens", self.ffn_tokens, 1)
        _int("timing_repeats", self.timing_repeats, 1)
        _int("seed", self.seed, 0)
        _float("router_std", self.router_std)
        _float("expert_noise", self.expert_noise)
        _float("aux_loss_coef", self.aux_loss_coef)
        if not isinstance(self.measure, bool):
            raise TypeError(f"measure must be True or False, got {self.measure!r}")
        if self.sweep is not None:
            if isinstance(self.sweep, (int, str)):
                raise TypeError(f"sweep must be a list of top_k values, got {self.sweep!r}")
            self.sweep = [int(k) for k in self.sweep]
            bad = [k for k in self.sweep if not 1 <= k <= self.experts]
            if bad:
                raise ValueError(f"sweep values must lie in 1..experts={self.experts}, got {bad}")

    def sweep_values(self) -> list[int]:
        """The top_k values the report measures: the sweep, or powers of two up to ``experts``, plus ``top_k``."""
        if self.sweep is not None:
            values = list(self.sweep)
        else:
            values, k = [], 1
            while k < self.experts:
                values.append(k)
                k *= 2
            values.append(self.experts)
            values.append(self.top_k)
        return sorted(set(values))

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["calibration"] = "built-in" if self.calibration is None else "user"
        return out


@dataclass
class MoEStatsConfig:
    """Routing statistics of an MoE model over a text."""

    text: str | None = field(default=None, metadata={
        "help": "text to route, a file path, or None for the built-in evaluation text"})
    max_tokens: int = field(default=512, metadata={"help": "tokens of the text that are routed"})
    window: int = field(default=512, metadata={"help": "tokens per forward pass"})
    show_tokens: int = field(default=48, metadata={"help": "tokens shown in the token -> expert table"})

    def __post_init__(self) -> None:
        _int("max_tokens", self.max_tokens, 1)
        _int("window", self.window, 1)
        _int("show_tokens", self.show_tokens, 0)
