"""Options of ``effnb.moe`` and ``effnb.moe_stats``: one dataclass each, the source of the command options.

No torch import here: the command registry reads these when ``%load_ext effnb`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data import check_text
from ..options import MAX_TOKENS, check_bool, check_choice, check_int, check_number
from ..technique import TechniqueConfig
from .methods import METHODS, get_method

ROUTERS = ("auto", "calibration", "weights", "random")
CLUSTERINGS = ("activations", "weights")
MAX_EXPERTS = 1024


def _choice(name: str, value, allowed) -> None:
    check_choice(name, value, allowed)


def _int(name: str, value, minimum: int, maximum: int = MAX_TOKENS) -> int:
    return check_int(name, value, minimum, maximum)


def _float(name: str, value, minimum: float = 0.0) -> None:
    check_number(name, value, minimum)


@dataclass
class MoEConfig(TechniqueConfig):
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
        "help": "weight of the load-balancing loss that effnb.experts.aux_loss(model) returns"})
    sweep: list[int] | None = field(default=None, metadata={
        "help": "top_k values for the quality/compute sweep in the report (default: 1,2,4,.. up to experts; "
                "empty string: no sweep)"})
    quality_tokens: int = field(default=2048, metadata={"help": "tokens of evaluation text for perplexity"})
    ffn_tokens: int = field(default=512, metadata={"help": "tokens for timing the FFN blocks dense vs MoE"})
    timing_repeats: int = field(default=5, metadata={"help": "timed repeats of the FFN blocks (median reported)"})
    measure: bool = field(default=True, metadata={  # TechniqueConfig's, with moe's own help
        "help": "measure the before/after report (off: structure only)"})
    share_unchanged: bool = field(default=False, metadata={
        "help": "the new model reuses the input model's tensors that the conversion leaves as they are "
                "(embeddings, attention, norms) instead of copying them: saves their memory (SmolLM2: "
                "220 MB); an in-place change to one of those tensors then shows in both models"})
    seed: int = field(default=0, metadata={"help": "seed for clustering and router initialisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.experts = check_int("experts", self.experts, 2, MAX_EXPERTS,
                                 hint=" (one expert is the dense model: nothing to route)")
        self.top_k = check_int("top_k", self.top_k, 1, hint=" (experts each token uses)")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} is more than experts={self.experts}; "
                             f"choose top_k from 1 to {self.experts}")
        allowed = get_method(self.method).routers
        _choice("router", self.router, ROUTERS)
        _choice("clustering", self.clustering, CLUSTERINGS)
        if self.router == "auto":
            self.router = allowed[0]
        if self.router not in allowed:
            raise ValueError(f"router {self.router!r} does not apply to method {self.method!r}; "
                             f"allowed: {', '.join(map(repr, allowed))}")
        self.calibration_tokens = _int("calibration_tokens", self.calibration_tokens, 16)
        self.quality_tokens = _int("quality_tokens", self.quality_tokens, 2)
        self.ffn_tokens = _int("ffn_tokens", self.ffn_tokens, 1)
        self.timing_repeats = _int("timing_repeats", self.timing_repeats, 1, 10_000)
        self.seed = _int("seed", self.seed, 0, 2**63 - 1)
        _float("router_std", self.router_std)
        _float("expert_noise", self.expert_noise)
        _float("aux_loss_coef", self.aux_loss_coef)
        check_bool("share_unchanged", self.share_unchanged)
        if self.inplace and self.share_unchanged:
            raise ValueError("share_unchanged applies to a new model; with inplace=True there is nothing to share")
        if self.calibration is not None:
            check_text(self.calibration, "calibration")
        if self.sweep is not None:
            if not isinstance(self.sweep, (list, tuple)):
                raise TypeError(f"sweep must be a list of top_k values, got {self.sweep!r}")
            self.sweep = [check_int("sweep value", k, 1, self.experts, upper=f"experts={self.experts}")
                          for k in self.sweep]

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
        """The options as the report records them (how the model was handed over left out)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("inplace", "name")}
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
        self.max_tokens = _int("max_tokens", self.max_tokens, 1)
        self.window = _int("window", self.window, 1)
        self.show_tokens = _int("show_tokens", self.show_tokens, 0)
        if self.text is not None:
            check_text(self.text, "text")
