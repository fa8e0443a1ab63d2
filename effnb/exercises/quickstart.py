"""Exercises of notebook 00 (quickstart): read an audit, and reason about its numbers.

Each checker recomputes the expected value from the objects the notebook passes in (a Report),
so the exercises hold for any model and any machine.
"""

from __future__ import annotations

import math

from . import ExerciseError, as_number, close_to, exercise, report_row


@exercise('quickstart.weight_mb', solution="answer = baseline.rows[0]['parameters'] * 4 / 1e6")
def _weight_mb(answer, *, report):
    """From the audit's parameter count alone, compute the weight memory of the fp32 model in MB (1 MB = 1e6
    bytes). Check it against the report.

    Hint: Every fp32 parameter takes 32 bits. How many bytes is that? Then divide by 1e6 for MB.

    Why: fp32 stores every parameter in 32 bits = 4 bytes, so the weights take parameters x 4 bytes; divide by
    1e6 for MB. It matches weight_bytes because the report counts each tensor once (SmolLM2's embedding is
    tied to its output head).
    """
    row = report_row(report, 0)
    value = as_number(answer, "the weight memory in MB")
    params = row["parameters"]
    expected = params * 4 / 1e6
    if close_to(value, expected, rel=0.01):
        if not close_to(expected * 1e6, row["weight_bytes"], rel=0.01):
            raise ExerciseError(f"{value:,.1f} MB is 4 bytes x parameters, but this model does not hold fp32 weights "
                                f"(the report says {row['weight_bytes'] / 1e6:,.1f} MB, dtypes "
                                f"{row.get('weight_bytes_by_dtype')}); use the bytes per parameter of its dtype")
        return
    if close_to(value, params / 1e6, rel=0.01):
        raise ExerciseError(f"{value:,.1f} is the number of parameters in millions, not megabytes: "
                            "each fp32 parameter takes 4 bytes")
    if close_to(value, params * 32 / 1e6, rel=0.01):
        raise ExerciseError(f"{value:,.1f} counts bits, not bytes: an fp32 parameter is 32 bits = 4 bytes")
    if close_to(value, params * 4 / 2**20, rel=0.01):
        raise ExerciseError(f"{value:,.1f} is in MiB (divided by 2**20); this course uses MB = 1e6 bytes")
    if close_to(value, params * 4, rel=0.01):
        raise ExerciseError(f"{value:,.0f} is in bytes; divide by 1e6 to get MB")
    if close_to(value, params * 2 / 1e6, rel=0.01):
        raise ExerciseError(f"{value:,.1f} MB would be 2 bytes per parameter (bf16/fp16); this model is fp32")
    raise ExerciseError(f"{value:,.1f} MB is not the fp32 weight memory of {params:,} parameters; "
                        "multiply the parameter count by the bytes per parameter, then divide by 1e6")


@exercise(
    "quickstart.bf16_smaller",
    solution="answer = cmp.rows[0]['weight_bytes'] / cmp.rows[1]['weight_bytes']",
)
def _bf16_smaller(answer, *, report):
    """From the comparison report, how many times smaller are the bfloat16 weights than the fp32 ones? Compute
    it from the two rows' weight_bytes.

    Hint: 'Times smaller' is the baseline's bytes divided by the variant's bytes (a number above 1).

    Why: 'Times smaller' is baseline bytes / variant bytes. bfloat16 takes 2 bytes a weight instead of 4, so
    expect about 2; read it off the rows rather than assume it, since a model may keep some tensors in another
    dtype.
    """
    base, var = report_row(report, 0), report_row(report, 1)
    value = as_number(answer, "the ratio")
    expected = base["weight_bytes"] / var["weight_bytes"]
    if close_to(value, expected, rel=0.01):
        return
    if close_to(value, 1 / expected, rel=0.01):
        raise ExerciseError(f"{value:.3f} is the variant's share of the baseline (variant / baseline); "
                            "'times smaller' is baseline / variant, a number above 1")
    if close_to(value, base["weight_bytes"] - var["weight_bytes"], rel=0.01) or value > 1e3:
        raise ExerciseError(f"{value:,.0f} looks like a difference in bytes; the question asks for a ratio")
    raise ExerciseError(f"{value:.3f} is not the ratio of the rows' weight_bytes: {base['name']!r} holds "
                        f"{base['weight_bytes']:,} bytes and {var['name']!r} {var['weight_bytes']:,}; divide the "
                        "first by the second (use the report, not a rule of thumb)")


@exercise('quickstart.ms_per_token', solution="answer = 1000 / baseline.rows[0]['decode_tokens_per_s']")
def _ms_per_token(answer, *, report):
    """The audit reports decode speed in tokens per second. How many milliseconds does one decoded token take
    on this machine?

    Hint: Tokens per second and seconds per token are reciprocals; then convert seconds to milliseconds.

    Why: A speed in tokens per second is a rate; its reciprocal is seconds per token, and x 1000 gives
    milliseconds. Per-token latency is what a user of a chat model feels.
    """
    row = report_row(report, 0)
    tps = row.get("decode_tokens_per_s")
    if tps is None:
        raise ExerciseError("this report has no decode speed (an encoder, or speed=False); audit a causal LM")
    value = as_number(answer, "milliseconds per token")
    expected = 1000 / tps
    if close_to(value, expected, rel=0.02):
        return
    if close_to(value, 1 / tps, rel=0.02):
        raise ExerciseError(f"{value:.4f} is in seconds per token; multiply by 1000 for milliseconds")
    if close_to(value, tps, rel=0.02) or close_to(value, tps / 1000, rel=0.02):
        raise ExerciseError(f"{value:.4g} is the speed itself (tokens per time); the question asks for "
                            "time per token, the reciprocal")
    if not math.isfinite(value) or value <= 0:
        raise ExerciseError(f"{value!r} cannot be a time per token: it must be a positive number of ms")
    raise ExerciseError(f"{value:.3f} ms is not what a decode speed of {tps:.2f} tokens/s implies: one token takes "
                        "1 / (tokens per second) seconds; convert that to ms")
