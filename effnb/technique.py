"""The one pipeline every technique runs through, and the options they all share.

``effnb.quantize``, ``lora``, ``finetune``, ``merge`` and ``moe`` differ in what they do to a
model, not in how they are run. ``run_technique`` does the common part, in this order:

1. check the input model (``models.check_model``);
2. choose the model to change: a copy of the input (``copy``, by default ``models.copy_model``),
   or, with ``inplace=True``, the input itself. With ``inplace=True`` and ``measure=True`` a
   snapshot of the input is taken first (``copy_model(share_parameters=True)``: new module objects,
   the same tensors) so that the "before" row measures the model as it was, not the changed one
   (modules swapped or wrapped in ``work`` do not show in it; values written in place into shared
   tensors do, so a technique that trains in place measures its own "before" first);
3. call the technique's ``transform(work) -> Change``. An exception there propagates as is: a copy
   is dropped with it, so the input is untouched; with ``inplace=True`` undoing is the transform's
   business (quantize's swap puts every layer back);
4. measure before and after with ``measure.compare``: with the technique's ``AuditConfig`` when
   ``measure=True``, else with every measurement off (weights and sizes only, the model never
   runs). ``measure=False`` is the one way to say "no measurement";
5. build the rows once: the measured rows, updated with what the technique passes in
   (``Change.rows``: fields per row, ``"extra"`` merged rather than replaced), the environment
   updated with ``Change.environment``; ``Change.finish`` (optional) runs between 4 and 5 for
   techniques whose extras depend on the measurement (moe reuses the measured perplexities,
   quantize reports which backend served the calls);
6. return ``Result(change.model, report, change.details, change.figures)``.

Import-light (no torch): the configs derive from ``TechniqueConfig`` and are read when
``%load_ext effnb`` builds the command options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .options import check_bool


@dataclass
class TechniqueConfig:
    """Options every technique takes. Subclasses may re-declare a field to give it their own help text."""

    inplace: bool = field(default=False, metadata={
        "help": "change the given model instead of returning a changed copy", "cli": False})
    measure: bool = field(default=True, metadata={
        "help": "measure speed and quality before and after (off: sizes only; the model never runs)"})
    name: str | None = field(default=None, metadata={
        "help": "the input model's name in the report (default: its own name)", "cli": False})

    def __post_init__(self) -> None:
        check_bool("inplace", self.inplace)
        check_bool("measure", self.measure)
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {self.name!r} ({type(self.name).__name__})")


@dataclass
class Change:
    """What a technique's ``transform`` returns to ``run_technique``.

    ``model``: the changed model (``work`` itself, or a wrapper around it such as a PEFT model);
    ``label``: its row name; ``title``: the report title; ``audit``: the ``AuditConfig`` used when
    measuring (None: compare's defaults; ignored with ``measure=False``); ``rows``: two dicts of
    fields set on the baseline and the new row (a key ``"extra"`` is merged into the row's extra);
    ``environment``: entries added to the report environment; ``details`` and ``figures``: the
    Result's. ``finish(change, report, baseline)``: optional, called once the report is measured
    (with ``measure=False`` too, when nothing ran) to fill ``rows``/``environment``/``details``/
    ``figures`` from what was measured; it must not change ``report`` itself.
    """

    model: Any
    label: str
    title: str
    audit: Any = None
    rows: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    environment: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    figures: list[Callable[[], Any]] = field(default_factory=list)
    finish: Callable[[Change, Any, Any], None] | None = None


def run_technique(model, cfg: TechniqueConfig, transform: Callable[[Any], Change], *,
                  copy: Callable[[Any], Any] | None = None, base_name: str | None = None):
    """Run one technique on ``model`` (see the module docstring for the steps); returns a ``Result``.

    ``cfg``: the technique's config (its ``inplace``, ``measure`` and ``name`` are read);
    ``transform(work) -> Change`` changes ``work`` (the copy, or the input with ``inplace=True``);
    ``copy(model) -> work``: how to copy the input (default ``copy_model(model)``), e.g. to share
    the tensors left unchanged or skip the weights about to be replaced; ``base_name``: the
    baseline row's name when not ``cfg.name`` (default ``models.model_name(model)``).
    """
    from .models import check_model, copy_model, model_name

    check_model(model)
    baseline = model
    if cfg.inplace and cfg.measure:
        baseline = copy_model(model, share_parameters=True)  # the input as it was, for the "before" row
    work = model if cfg.inplace else (copy or copy_model)(model)
    change = transform(work)
    report = measure_change(baseline, change, cfg.measure, cfg.name or base_name or model_name(model))
    return build_result(change, report)


def measure_change(baseline, change: Change, measure: bool, base_name: str):
    """The before/after Report of ``change`` (rows not yet updated with the technique's fields)."""
    from .measure import compare

    audit = change.audit if measure else unmeasured_audit()
    report = compare(baseline, change.model, names=[base_name, change.label], config=audit, title=change.title)
    if change.finish is not None:
        change.finish(change, report, baseline)
    return report


def unmeasured_audit():
    """The ``AuditConfig`` of ``measure=False``: weights and sizes only, nothing runs."""
    from .measure import AuditConfig

    return AuditConfig(speed=False, quality=False, flops=False, energy=False)


def build_result(change: Change, report):
    """``Result`` of ``change`` over the measured ``report``: the technique's fields set on its rows."""
    from .report import Result

    for row, fields in zip(report.rows, change.rows):
        extra = fields.get("extra")
        row.update({k: v for k, v in fields.items() if k != "extra"})
        if extra:
            row.setdefault("extra", {}).update(extra)
    report.environment.update(change.environment)
    return Result(change.model, report, details=change.details, figures=change.figures)
