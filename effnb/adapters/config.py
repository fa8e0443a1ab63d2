"""Options of ``effnb.lora``, ``effnb.finetune`` and ``effnb.merge`` (no torch import here).

Each derives from ``effnb.technique.TechniqueConfig`` (``inplace``, ``measure``, ``name``); here
``measure`` is off by default: adapters and training are judged by their own numbers (trainable
share, held-out loss, merge error), and a speed and perplexity run would double their time.
The magic and the CLI derive their ``--options`` from these fields, so ``%efficient lora --help``
and these docstrings cannot drift apart. Values are checked in ``__post_init__``; a bad one raises
``ValueError`` naming it and what is allowed.

Target presets (``targets``), resolved per architecture in ``targets.py``:
  attn      the attention query and value projections (the LoRA paper's choice and PEFT's default)
  attn-all  every attention projection (query, key, value, output)
  mlp       the feed-forward projections (for Mixtral-style experts: the expert weights)
  all       attention and feed-forward (never the output head or the embeddings)
or a list of module names / suffixes / fnmatch patterns, e.g. ``["q_proj", "*.mlp.down_proj"]``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields

from ..data import check_text
from ..options import (
    MAX_TOKENS,
    check_bool,
    check_choice,
    check_int,
    check_number,
    did_you_mean,
    reject_unknown,
)
from ..technique import TechniqueConfig

PRESETS = ("attn", "attn-all", "mlp", "all")
TASKS = ("python-api",)
STRATEGIES = ("auto", "ddp", "fsdp")
MAX_PROCESSES = 256


def _did_you_mean(value, allowed) -> str:
    return did_you_mean(value, allowed, cutoff=0.5)


MAX_RANK = 4096  # above any practical adapter; the layer dimensions are checked when the adapters are made
MAX_COUNT = 10_000_000  # steps, evaluations, generations: a bound that catches a typo, not a real limit


def _positive_int(name: str, value, allow_zero: bool = False, maximum: int = MAX_COUNT) -> int:
    return check_int(name, value, 0 if allow_zero else 1, maximum)


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    return check_number(name, value, 0.0, allow_minimum=allow_zero)


def _from_kwargs(cls, what: str, kwargs: dict):
    reject_unknown(cls, what, kwargs, cutoff=0.5)
    return cls(**kwargs)


@dataclass
class LoraConfig(TechniqueConfig):
    """Options of ``effnb.lora``: which layers get adapters, their rank and scaling, the variant."""

    rank: int = field(default=8, metadata={"help": "rank r of each adapter (B @ A with A: r x in, B: out x r)"})
    alpha: float = field(default=16, metadata={"help": "scaling numerator: the update is (alpha / rank) * B @ A"})
    targets: str | list[str] = field(default="attn", metadata={
        "help": "attn | attn-all | mlp | all, or comma-separated module names / suffixes / patterns"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input while training (0 to <1)"})
    dora: bool = field(default=False, metadata={
        "help": "DoRA: weight-decomposed LoRA (magnitude vector + low-rank direction), via PEFT's use_dora"})
    plus_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+: learning rate of B = ratio x that of A (16 is the paper's choice); used by finetune"})
    adapter_name: str = field(default="default", metadata={"help": "name of the adapter (a model may hold several)"})
    init: str = field(default="default", metadata={
        "help": "initialisation of A (B starts at zero, so the model is unchanged)", "choices": ["default", "gaussian"]})
    seed: int = field(default=0, metadata={"help": "seed for the adapter initialisation"})
    measure: bool = field(default=False, metadata={
        "help": "also measure speed and perplexity of the base and adapted model (slower)"})
    share_base: bool = field(default=False, metadata={
        "help": "the adapted copy's frozen weights share the input model's memory instead of duplicating it "
                "(SmolLM2: 538 MB saved); merge still leaves the input model as it was, but an in-place change "
                "to a base weight of either model shows in both"})
    inplace: bool = field(default=False, metadata={
        "help": "attach the adapters to the given model instead of a copy", "cli": False})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dora", "share_base"):
            check_bool(name, getattr(self, name))
        if self.share_base and self.inplace:
            raise ValueError("share_base applies to the adapted copy; with inplace=True there is no copy")
        self.rank = check_int("rank", self.rank, 1, MAX_RANK, hint=" (typically 4 to 64)")
        _positive_float("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.plus_ratio is not None:
            _positive_float("plus_ratio", self.plus_ratio)
        if isinstance(self.targets, str):
            if "," in self.targets:  # "q_proj,v_proj" from a command line
                self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
            elif self.targets not in PRESETS and not _looks_like_module_name(self.targets):
                raise ValueError(f"unknown targets {self.targets!r}{_did_you_mean(self.targets, PRESETS)} "
                                 f"(presets: {', '.join(PRESETS)}; or a list of module names)")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be a preset ({', '.join(PRESETS)}) or a non-empty list of "
                                 f"module names, got {self.targets!r}")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str):
            raise ValueError(f"targets must be a preset ({', '.join(PRESETS)}) or a list of module names, "
                             f"got {type(self.targets).__name__}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name.isidentifier():
            raise ValueError(f"adapter_name must be a Python identifier such as 'default' or 'task1', "
                             f"got {self.adapter_name!r}")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"init must be 'default' or 'gaussian', got {self.init!r}")
        self.seed = _positive_int("seed", self.seed, allow_zero=True, maximum=2**63 - 1)

    @classmethod
    def from_kwargs(cls, **kwargs) -> LoraConfig:
        return _from_kwargs(cls, "lora", kwargs)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _looks_like_module_name(text: str) -> bool:
    # a single name such as "q_proj" or "*.mlp.*" is a one-element list; a near-miss of a preset is a typo
    if difflib.get_close_matches(text, PRESETS, n=1, cutoff=0.6):
        return False
    return all(c.isalnum() or c in "._*?[]-" for c in text)


@dataclass
class FinetuneConfig(TechniqueConfig):
    """Options of ``effnb.finetune``: data, schedule, evaluation. Defaults fit a 2-core CPU in about a minute."""

    data: str | list[str] = field(default="python-api", metadata={
        "help": "'python-api' (built-in Q/A task from the standard library's docs), a text, a file path, "
                "or a list of texts"})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW; linear warm-up, cosine decay)"})
    batch_size: int = field(default=2, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence (examples are packed)"})
    eval_every: int = field(default=20, metadata={"help": "held-out loss every N steps (0: only before and after)"})
    eval_tokens: int = field(default=4096, metadata={
        "help": "held-out tokens scored per evaluation (the first ones, so every evaluation scores the same)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear learning-rate warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    plus_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+ ratio lr(B)/lr(A); default: the one given to effnb.lora, else plain LoRA"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    aux_loss_coef: float = field(default=1.0, metadata={
        "help": "multiplier on an auxiliary loss the model exposes (effnb MoE load balancing); 0: off"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward: less memory, about a third slower"})
    generations: int = field(default=3, metadata={"help": "held-out questions answered before and after (0: none)"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens generated per held-out answer"})
    live: bool = field(default=True, metadata={"help": "live loss plot in a notebook (a static figure otherwise)"})
    seed: int = field(default=0, metadata={"help": "seed for data order and dropout"})
    measure: bool = field(default=False, metadata={
        "help": "also measure speed and perplexity of the model before and after training (slower)"})
    processes: int = field(default=1, metadata={
        "help": "data-parallel processes (accelerate; gloo on CPUs, NCCL on GPUs); batch_size is the global batch"})
    strategy: str = field(default="auto", metadata={
        "help": "with processes > 1: ddp (adapters synchronised), fsdp (sharded weights and optimizer); "
                "auto: ddp when only adapters train, fsdp for full fine-tuning", "choices": list(STRATEGIES)})
    resume_from: str | None = field(default=None, metadata={
        "help": "checkpoint folder: written every checkpoint_every steps, and resumed from when it holds one"})
    checkpoint_every: int = field(default=10, metadata={
        "help": "steps between checkpoints in resume_from (0: only at the end)"})
    inplace: bool = field(default=False, metadata={"help": "train the given model instead of a copy", "cli": False})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_scale_out()
        for name in ("gradient_checkpointing", "live"):
            check_bool(name, getattr(self, name))
        for name in ("steps", "batch_size"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        for name in ("seq_len", "max_new_tokens", "eval_tokens"):
            setattr(self, name, _positive_int(name, getattr(self, name), maximum=MAX_TOKENS))
        for name in ("eval_every", "warmup_steps", "generations"):
            setattr(self, name, _positive_int(name, getattr(self, name), allow_zero=True))
        self.seed = _positive_int("seed", self.seed, allow_zero=True, maximum=2**63 - 1)
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 tokens, got {self.seq_len}")
        _positive_float("lr", self.lr)
        if self.lr > 1:
            raise ValueError(f"lr={self.lr} is far too large for fine-tuning (typical: 1e-4 to 5e-3)")
        for name in ("weight_decay", "max_grad_norm", "aux_loss_coef"):
            _positive_float(name, getattr(self, name), allow_zero=True)
        if self.plus_ratio is not None:
            _positive_float("plus_ratio", self.plus_ratio)
        if isinstance(self.data, str):
            if not self.data.strip():
                raise ValueError(f"data is empty: give {', '.join(TASKS)}, a text, a file path or a list of texts")
            if self.data not in TASKS:
                check_text(self.data, "data")  # a path-like string must name an existing file
        elif isinstance(self.data, (list, tuple)):
            if not all(isinstance(t, str) for t in self.data):
                raise ValueError("data as a list must hold strings (texts to train on)")
            self.data = list(self.data)
        else:
            raise ValueError(f"data must be {', '.join(TASKS)}, a text, a file path or a list of texts, "
                             f"got {type(self.data).__name__}")

    def _check_scale_out(self) -> None:
        self.processes = check_int("processes", self.processes, 1, MAX_PROCESSES)
        check_choice("strategy", self.strategy, STRATEGIES)
        self.checkpoint_every = _positive_int("checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.resume_from is not None and (not isinstance(self.resume_from, str) or not self.resume_from.strip()):
            raise ValueError(f"resume_from must be a folder path, got {self.resume_from!r}")
        if not isinstance(self.batch_size, bool) and isinstance(self.batch_size, int) \
                and self.batch_size % self.processes:
            raise ValueError(f"batch_size is the global batch and must be a multiple of processes={self.processes}, "
                             f"got {self.batch_size}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> FinetuneConfig:
        return _from_kwargs(cls, "finetune", kwargs)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not (isinstance(self.data, str) and self.data in TASKS):
            out["data"] = "user text"
        return out


@dataclass
class MergeConfig(TechniqueConfig):
    """Options of ``effnb.merge``: fold the adapters into the base weights."""

    adapter_name: str | None = field(default=None, metadata={"help": "adapter to merge (default: the active one)"})
    check_tokens: int = field(default=64, metadata={
        "help": "held-out tokens on which merged and adapted logits are compared"})
    measure: bool = field(default=False, metadata={
        "help": "also measure speed and perplexity of the adapted and merged models (slower)"})
    inplace: bool = field(default=False, metadata={"help": "merge into the given model instead of a copy", "cli": False})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_tokens = _positive_int("check_tokens", self.check_tokens, maximum=MAX_TOKENS)
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise ValueError(f"adapter_name must be a string, got {self.adapter_name!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> MergeConfig:
        return _from_kwargs(cls, "merge", kwargs)
