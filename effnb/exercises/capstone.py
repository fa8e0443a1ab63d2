"""Exercises of notebook 06 (capstone): read the report card and choose a variant under constraints."""

from __future__ import annotations

import json

from . import ExerciseError, as_number, close_to, exercise, report_row


def _rows(report) -> list[dict]:
    rows, i = [], 0
    while True:
        try:
            rows.append(report_row(report, i))
        except ExerciseError:
            return rows
        i += 1


def _quality(row) -> float | None:
    q = row.get("quality") or {}
    return q.get("value")


def _pct_change(row, base) -> float | None:
    v, b = _quality(row), _quality(base)
    if v is None or b is None or b == 0:
        return None
    return (v - b) / abs(b) * 100


@exercise(
    "capstone.quality_change",
    solution="answer = (card[variant]['quality']['value'] / card.rows[0]['quality']['value'] - 1) * 100",
)
def _quality_change(answer, *, report, variant):
    """By how many percent did perplexity change from the baseline to the variant named `variant`? (positive =
    worse for perplexity; e.g. 3.5 for +3.5 %)

    Hint: Relative change in percent = (variant - baseline) / baseline * 100, using the rows' quality values.

    Why: A relative change is (new - old) / old, x 100 for percent. For perplexity, positive means the variant
    is worse; a relative figure compares across models where an absolute one cannot.
    """
    rows = _rows(report)
    base = rows[0]
    row = next((r for r in rows if r["name"] == variant), None)
    if row is None:
        raise ExerciseError(f"no variant named {variant!r}; variants: {', '.join(r['name'] for r in rows)}")
    expected = _pct_change(row, base)
    if expected is None:
        raise ExerciseError(f"{variant!r} or the baseline has no quality value (quality was not measured)")
    value = as_number(answer, "the change in percent")
    if close_to(value, expected, rel=0.005, abs_tol=0.01):
        return
    if close_to(value, expected / 100, rel=0.005, abs_tol=1e-4):
        raise ExerciseError(f"{value:.4g} is a fraction; multiply by 100 for percent")
    if close_to(value, -expected, rel=0.005, abs_tol=0.01):
        raise ExerciseError("the sign is flipped: compute (variant - baseline), so a worse (higher) perplexity is positive")
    if close_to(value, _quality(row) - _quality(base), rel=0.005, abs_tol=1e-4):
        raise ExerciseError(f"{value:.4g} is the absolute difference in perplexity; divide by the baseline's value "
                            "and multiply by 100")
    raise ExerciseError(f"{value:.4g} % is not the relative change from {_quality(base):.4g} to {_quality(row):.4g}")


def _best(rows, budget_mb, max_loss_pct):
    base = rows[0]
    ok = []
    for r in rows:
        change = _pct_change(r, base)
        if r["weight_bytes"] / 1e6 <= budget_mb and change is not None and change <= max_loss_pct:
            ok.append(r)
    if not ok:
        return None, []
    speed = [(r.get("decode_tokens_per_s") or 0.0) for r in ok]
    return ok[speed.index(max(speed))]["name"], ok


@exercise(
    "capstone.pick",
    solution="base = card.rows[0]['quality']['value']\nok = [r for r in card.rows if r['weight_bytes'] / 1e6 <= BUDGET_MB\n      and (r['quality']['value'] / base - 1) * 100 <= MAX_LOSS_PCT]\nanswer = max(ok, key=lambda r: r['decode_tokens_per_s'])['name'] if ok else None",
)
def _pick(answer, *, report, budget_mb, max_loss_pct):
    """Deployment constraints: weight memory at most `budget_mb` MB and perplexity at most `max_loss_pct` %
    worse than the baseline. Among the variants of the report card that meet both, which decodes fastest?
    Answer its name (a string), or None if no variant qualifies.

    Hint: Filter the rows by weight_bytes / 1e6 <= budget_mb and by the perplexity change in percent, then
    take the row with the highest decode_tokens_per_s.

    Why: Constraints first, objective second: keep the variants within the memory budget and the allowed
    quality loss, then take the fastest of those. The smallest or the fastest overall may break a constraint;
    with none left, the honest answer is None.
    """
    rows = _rows(report)
    names = [r["name"] for r in rows]
    expected, ok = _best(rows, budget_mb, max_loss_pct)
    if answer is not None and not isinstance(answer, str):
        raise ExerciseError(f"answer a variant name (a string) or None, got {type(answer).__name__}")
    if answer == expected:
        return
    if expected is None:
        raise ExerciseError(f"{answer!r} does not meet the constraints; no variant does (with {budget_mb} MB and "
                            f"{max_loss_pct} %), so the answer is None")
    if answer is None:
        raise ExerciseError(f"{len(ok)} variant(s) meet both constraints: {', '.join(r['name'] for r in ok)}")
    if answer not in names:
        raise ExerciseError(f"no variant is named {answer!r}; names: {', '.join(names)}")
    row = rows[names.index(answer)]
    if row["weight_bytes"] / 1e6 > budget_mb:
        raise ExerciseError(f"{answer!r} holds {row['weight_bytes'] / 1e6:,.1f} MB of weights, over the "
                            f"{budget_mb} MB budget")
    change = _pct_change(row, rows[0])
    if change is None or change > max_loss_pct:
        shown = "unknown" if change is None else f"{change:+.2f} %"
        raise ExerciseError(f"{answer!r} changes perplexity by {shown}, more than the {max_loss_pct} % allowed")
    raise ExerciseError(f"{answer!r} meets both constraints, but another one that does decodes faster "
                        "(compare decode_tokens_per_s)")


@exercise("capstone.card", solution="answer = card.to_dict()")
def _card(answer, *, report):
    """Build the report card as a Python dict (the JSON-ready form of the Report) and check that it follows
    the effnb.report schema.

    Hint: A Report has a method that returns its JSON-ready dict; a JSON string or the Report object itself is
    not a dict.

    Why: Report.to_dict() gives the versioned, JSON-ready form (schema effnb.report, version 1) that to_json()
    serialises and Report.from_dict() reads back, so cards can be compared across groups.
    """
    from ..report import validate

    if isinstance(answer, str):
        try:
            json.loads(answer)
        except ValueError:
            raise ExerciseError("that is a string but not JSON; use the Report's to_dict()") from None
        raise ExerciseError("that is the JSON text (to_json()); the exercise asks for the dict: use to_dict()")
    if hasattr(answer, "to_dict") and not isinstance(answer, dict):
        raise ExerciseError(f"that is the {type(answer).__name__} object itself; call its to_dict() method")
    if isinstance(answer, list):
        raise ExerciseError("that is a list (the rows or the ratios?); the card is the whole report's to_dict()")
    if not isinstance(answer, dict):
        raise ExerciseError(f"the card should be a dict, got {type(answer).__name__}")
    try:
        validate(answer)
    except ValueError as exc:
        raise ExerciseError(str(exc)) from None
    want = [r["name"] for r in _rows(report)]
    got = [v.get("name") for v in answer["variants"]]
    if got != want:
        raise ExerciseError(f"the card's variants {got} are not the report's {want}: build it from the same report")
