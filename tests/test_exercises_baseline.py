"""Baseline exercises: medians without warm-up, speed-up ratios, noise."""

from __future__ import annotations

import statistics

from effnb import exercises

SAMPLES = [0.90, 0.21, 0.20, 0.35, 0.22]  # a slow warm-up run, then one outlier
BASE = [0.50, 0.52, 0.49, 0.70]  # one slow outlier
FAST = [0.25, 0.26, 0.24, 0.27]
NOISY = [0.45, 0.55, 0.47, 0.60]


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


def test_baseline_exercises_are_registered():
    assert exercises.list_exercises("baseline") == ["baseline.median", "baseline.speedup", "baseline.within_noise"]


def test_median(capsys):
    ctx = {"samples": SAMPLES, "warmup": 1}
    assert _verdict(capsys, "baseline.median", statistics.median(SAMPLES[1:]), **ctx)[0]
    for wrong, text in [(statistics.median(SAMPLES), "includes the warm-up"),
                        (statistics.fmean(SAMPLES[1:]), "that is the mean"),
                        (statistics.fmean(SAMPLES), "that is the mean"),
                        (min(SAMPLES[1:]), "fastest run"),
                        (statistics.median(SAMPLES[1:]) * 1e3, "milliseconds"),
                        (0.3, "is not the median of the 4 timed runs samples[1:]"),
                        ("fast", "should be a number")]:
        ok, out = _verdict(capsys, "baseline.median", wrong, **ctx)
        assert not ok and text in out, (wrong, out)


def test_speedup(capsys):
    ctx = {"base": BASE, "cand": FAST}
    right = statistics.median(BASE) / statistics.median(FAST)
    assert right > 1.9
    assert _verdict(capsys, "baseline.speedup", right, **ctx)[0]
    ok, out = _verdict(capsys, "baseline.speedup", 1 / right, **ctx)
    assert not ok and "the inverse" in out
    ok, out = _verdict(capsys, "baseline.speedup", statistics.fmean(BASE) / statistics.fmean(FAST), **ctx)
    assert not ok and "uses means" in out
    ok, out = _verdict(capsys, "baseline.speedup", statistics.median(BASE) - statistics.median(FAST), **ctx)
    assert not ok and "difference in seconds" in out


def test_within_noise(capsys):
    assert _verdict(capsys, "baseline.within_noise", False, base=BASE, cand=FAST)[0]
    assert _verdict(capsys, "baseline.within_noise", True, base=BASE, cand=NOISY)[0]
    ok, out = _verdict(capsys, "baseline.within_noise", False, base=BASE, cand=NOISY)
    assert not ok and "within the noise" in out
    ok, out = _verdict(capsys, "baseline.within_noise", True, base=BASE, cand=FAST)
    assert not ok and "do not overlap" in out
    ok, out = _verdict(capsys, "baseline.within_noise", "yes", base=BASE, cand=FAST)
    assert not ok and "True or False" in out


def test_instructor_solutions_pass_their_own_checks(capsys):
    # the solutions use the notebook's names (WARMUP), the checks their keywords (warmup)
    ctx = {"median": ({"samples": SAMPLES, "WARMUP": 1}, {"samples": SAMPLES, "warmup": 1}),
           "speedup": ({"base": BASE, "cand": FAST}, {"base": BASE, "cand": FAST}),
           "within_noise": ({"base": BASE, "cand": NOISY}, {"base": BASE, "cand": NOISY})}
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("baseline"):
            names, kw = ctx[key.split(".")[1]]
            ns = {"statistics": statistics, **names}
            exec(exercises.solution(key), ns)
            assert exercises.check(key, ns["answer"], **kw), key
    finally:
        exercises.show_solutions(False)
