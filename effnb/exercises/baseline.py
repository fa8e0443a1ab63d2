"""Exercises of notebook 01 (measuring a baseline): warm-up, medians, spread, ratios in one run.

The checkers take the raw timing samples the notebook measured, so they hold on any machine.
"""

from __future__ import annotations

import statistics

from . import ExerciseError, as_number, close_to, exercise


def _samples(samples, what: str) -> list[float]:
    try:
        vals = [float(s) for s in samples]
    except TypeError:
        raise TypeError(f"{what} must be a list of timings in seconds, got {type(samples).__name__}") from None
    if not vals:
        raise ExerciseError(f"{what} is empty: run the timing cell above first")
    return vals


@exercise("baseline.median", solution="answer = statistics.median(samples[WARMUP:])")
def _median(answer, *, samples, warmup):
    """`samples` holds the wall times (s) of repeated runs, the first `warmup` of them warm-up runs. Compute
    the figure you would report: the median of the timed runs, warm-up left out.

    Hint: Slice the warm-up runs off the front of the list, then use statistics.median.

    Why: The first run pays one-time costs (allocation, caches, lazy initialisation), so it is left out; the
    median of the rest is the typical run, and one disturbed run cannot move it the way it moves the mean.
    """
    vals = _samples(samples, "samples")
    timed = vals[warmup:]
    if not timed:
        raise ExerciseError(f"there are only {len(vals)} samples and {warmup} are warm-up: time more repeats")
    value = as_number(answer, "the median time")
    expected = statistics.median(timed)
    tol = 1e-9 + 1e-6 * abs(expected)
    if abs(value - expected) <= tol:
        return
    if abs(value - statistics.median(vals)) <= tol:
        raise ExerciseError("that median still includes the warm-up run(s): leave out the first "
                            f"{warmup} sample(s), which pay for one-time costs (caches, allocation, lazy init)")
    if abs(value - statistics.fmean(timed)) <= tol or abs(value - statistics.fmean(vals)) <= tol:
        raise ExerciseError("that is the mean: one slow outlier (another process, a page fault) drags it; "
                            "report the median, which a single outlier cannot move")
    if abs(value - min(timed)) <= tol:
        raise ExerciseError("that is the fastest run (the minimum): a fair best case, but the exercise asks "
                            "for the typical run, the median")
    if close_to(value, expected * 1e3, rel=1e-6):
        raise ExerciseError("right value but in milliseconds: keep the unit of `samples` (seconds)")
    raise ExerciseError(f"{value:.6g} s is not the median of the {len(timed)} timed runs samples[{warmup}:]: sort "
                        "them and take the middle one (the mean of the two middle ones for an even count), "
                        "or use statistics.median")


@exercise("baseline.speedup", solution="answer = statistics.median(base) / statistics.median(cand)")
def _speedup(answer, *, base, cand):
    """`base` and `cand` hold interleaved timings (s per run, warm-up already dropped) of the baseline and the
    candidate. How many times faster is the candidate? Use medians.

    Hint: Speed-up = baseline time / candidate time (above 1 means the candidate is faster). Medians, not
    means.

    Why: A speed-up is old time / new time, so above 1 means the candidate is faster. Medians of runs
    interleaved in the same session: both variants saw the same machine state.
    """
    b, c = _samples(base, "base"), _samples(cand, "cand")
    value = as_number(answer, "the speed-up")
    expected = statistics.median(b) / statistics.median(c)
    if close_to(value, expected, rel=1e-6):
        return
    if close_to(value, 1 / expected, rel=1e-6):
        raise ExerciseError(f"{value:.3f} is candidate time / baseline time, the inverse: a speed-up is "
                            "baseline time / candidate time (above 1 when the candidate is faster)")
    if close_to(value, statistics.fmean(b) / statistics.fmean(c), rel=1e-6):
        raise ExerciseError("that ratio uses means; use the medians of the two lists")
    if close_to(value, min(b) / min(c), rel=1e-6):
        raise ExerciseError("that ratio uses the minimum runs; use the medians of the two lists")
    if close_to(value, statistics.median(b) - statistics.median(c), rel=1e-6):
        raise ExerciseError("that is a difference in seconds; a speed-up is a ratio of medians")
    raise ExerciseError(f"{value:.4g} is not median(base) / median(cand) = ratio of the two median times")


@exercise("baseline.within_noise", solution="answer = min(base) <= max(cand) and min(cand) <= max(base)")
def _within_noise(answer, *, base, cand):
    """Is the difference between `base` and `cand` within the noise? Answer True when the ranges [min, max] of
    the two lists overlap (then do not claim a speed-up), else False.

    Hint: Two ranges [a1, a2] and [b1, b2] overlap when a1 <= b2 and b1 <= a2.

    Why: If the [min, max] ranges overlap, some baseline run was as fast as some candidate run: the difference
    may be noise. Claim a speed-up only when the ranges separate (or after more repeats on a quieter machine).
    """
    b, c = _samples(base, "base"), _samples(cand, "cand")
    if not isinstance(answer, bool):
        raise ExerciseError(f"answer True or False, got {type(answer).__name__} {answer!r}")
    overlap = min(b) <= max(c) and min(c) <= max(b)
    if answer == overlap:
        return
    if overlap:
        raise ExerciseError(f"the ranges overlap (base {min(b):.4g}-{max(b):.4g} s, cand {min(c):.4g}-{max(c):.4g} s): "
                            "some baseline runs were as fast as some candidate runs, so the difference is within "
                            "the noise; time more repeats or on a quieter machine before claiming anything")
    raise ExerciseError(f"the ranges do not overlap (base {min(b):.4g}-{max(b):.4g} s, cand "
                        f"{min(c):.4g}-{max(c):.4g} s): every run of one was faster than every run of the other")
