"""Exercises of notebook 02 (quantization): bytes of a 4-bit layer, SNR in dB, reading a comparison."""

from __future__ import annotations

import math

from . import ExerciseError, as_number, exercise


def int4_layer_bytes(out_features: int, in_features: int, group_size: int) -> int:
    """Bytes effnb stores for an asymmetric int4 layer: packed codes + one fp16 scale and zero per group."""
    groups = out_features * (in_features // group_size)
    return out_features * in_features // 2 + groups * 2 * 2


@exercise(
    "quant.int4_bytes",
    solution="answer = out_features * in_features // 2 + out_features * (in_features // GROUP_SIZE) * 2 * 2",
)
def _int4_bytes(answer, *, out_features: int, in_features: int, group_size: int):
    """How many bytes does effnb store for the weight of an asymmetric int4 Linear layer with out_features x
    in_features weights and one fp16 scale and one fp16 zero per group of group_size weights (bias not
    counted)?

    Hint: Two 4-bit codes share a byte. Every group of group_size weights along a row also stores a scale and
    a zero, each in fp16 (2 bytes).

    Why: Two 4-bit codes fit in a byte: out x in / 2 bytes of codes. Each row has in / group_size groups, and
    each group stores an fp16 scale and an fp16 zero (2 + 2 bytes). At group 64 that is 0.5625 bytes per
    weight, about 3.6x smaller than fp16.
    """
    expected = int4_layer_bytes(out_features, in_features, group_size)
    answer = as_number(answer, "the number of bytes")
    if answer.is_integer():
        answer = int(answer)
    if answer == expected:
        return
    codes = out_features * in_features // 2
    groups = out_features * (in_features // group_size)
    if answer == codes:
        raise ExerciseError(f"{answer:,} counts the packed codes only; each group of {group_size} weights also "
                            "stores an fp16 scale and an fp16 zero (4 bytes per group)")
    if answer == out_features * in_features:
        raise ExerciseError(f"{answer:,} is one byte per weight; a 4-bit code is half a byte")
    if answer == codes + groups * 2:
        raise ExerciseError(f"{answer:,} counts the scales but not the zeros: asymmetric int4 stores both")
    if answer == codes + (in_features // group_size) * 4:
        raise ExerciseError(f"{answer:,} counts the groups of one row only: every one of the {out_features} rows "
                            f"has its own {in_features // group_size} groups")
    if answer == codes + groups * 2 * 4:
        raise ExerciseError(f"{answer:,} stores the scale and zero as fp32 (4 bytes each); effnb keeps them in "
                            "fp16, 2 bytes each")
    if answer == 8 * expected:
        raise ExerciseError(f"{answer:,} counts bits; divide by 8 for bytes")
    raise ExerciseError(f"{answer:,} is not it (expected about {expected / 1e3:,.0f} kB); count half a byte per "
                        "weight plus 4 bytes per group")


@exercise(
    "quant.snr",
    solution="answer = 10 * math.log10(w.pow(2).sum().item() / (w - w_q).pow(2).sum().item())",
)
def _snr(answer, *, w, w_q):
    """Compute the signal-to-noise ratio in dB of a quantized weight w_q against the original w: 10 *
    log10(sum(w**2) / sum((w - w_q)**2)).

    Hint: Use w.pow(2).sum() for the signal and (w - w_q).pow(2).sum() for the noise; powers, not amplitudes,
    so the factor is 10, not 20.

    Why: Signal power over noise power (the quantization error), in decibels: 10 x log10 because both are sums
    of squares (powers). Each extra bit of a uniform quantizer buys about 6 dB.
    """
    from ..torch_utils import snr_db

    expected = snr_db(w, w_q)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        raise ExerciseError(f"give the SNR as a number of dB, got {type(answer).__name__}") from None
    if math.isclose(value, expected, rel_tol=1e-3, abs_tol=1e-3):
        return
    if math.isclose(value, 2 * expected, rel_tol=1e-3):
        raise ExerciseError(f"{value:.2f} dB is twice the answer: sums of squares are powers, use 10 * log10, not 20")
    if expected and math.isclose(value, 10 ** (expected / 10), rel_tol=1e-3):
        raise ExerciseError(f"{value:.4g} is the plain ratio; convert it to decibels with 10 * log10(ratio)")
    if math.isclose(value, -expected, rel_tol=1e-3):
        raise ExerciseError(f"{value:.2f} dB has the wrong sign: signal over noise, not noise over signal")
    raise ExerciseError(f"{value:.2f} dB is not it; expected a value near {expected:.0f} dB (4-bit weights "
                        "usually land between 15 and 25 dB)")


@exercise("quant.best_method", solution="answer = min(ppl, key=ppl.get)")
def _best_method(answer, *, results: dict):
    """From a dict {method: perplexity} of 4-bit variants of one model, which method keeps the model best?

    Hint: Perplexity is how surprised the model is by the text: lower is better.

    Why: Perplexity measures how surprised the model is by held-out text: lower is better, so the best 4-bit
    method is the one with the smallest perplexity (at the same bits per weight).
    """
    best = min(results, key=results.get)
    if answer == best:
        return
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        raise ExerciseError(f"{answer!r} is a number; answer the method's name (a key of the dict, e.g. "
                            f"{next(iter(results))!r})")
    if answer not in results:
        raise ExerciseError(f"{answer!r} is not one of the methods compared: {', '.join(results)}")
    if answer == max(results, key=results.get):
        raise ExerciseError(f"{answer!r} has the highest perplexity ({results[answer]:.3f}); lower perplexity "
                            "means better quality")
    raise ExerciseError(f"{answer!r} ({results[answer]:.3f}) is beaten by another method; look for the lowest value")
