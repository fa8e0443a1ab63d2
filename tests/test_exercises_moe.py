"""MoE exercises: right answers pass, typical wrong ones get the helpful message."""

from __future__ import annotations

import torch

from effnb import exercises

INDEX = torch.tensor([[0, 1], [1, 2], [1, 0], [2, 1], [0, 2]])  # 5 tokens, top-2 of 4 experts (expert 3 idle)


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


def test_moe_exercises_are_registered():
    assert exercises.list_exercises("moe") == ["moe.active_share", "moe.imbalance", "moe.tokens_per_expert"]


def test_active_share(capsys):
    ctx = {"experts": 8, "top_k": 2}
    assert _verdict(capsys, "moe.active_share", 0.25, **ctx)[0]
    for wrong, text in [(25, "percentage"), (4, "upside down"), (0.125, "one expert's share"), ("a", "a number"),
                        (0.5, "each of the 8 experts holds an equal part, and a token visits 2 of them")]:
        ok, out = _verdict(capsys, "moe.active_share", wrong, **ctx)
        assert not ok and text in out, (wrong, out)


def test_tokens_per_expert(capsys):
    ctx = {"expert_index": INDEX, "experts": 4}
    right = torch.bincount(INDEX.flatten(), minlength=4)
    assert right.tolist() == [3, 4, 3, 0]
    assert _verdict(capsys, "moe.tokens_per_expert", right, **ctx)[0]
    assert _verdict(capsys, "moe.tokens_per_expert", right.tolist(), **ctx)[0]
    for wrong, text in [([3, 4, 3], "experts with no token are missing"),
                        ([2, 2, 1, 0], "first choice"),
                        ([1, 1, 1, 1], "add up to 4"),
                        ([3, 3, 4, 0], "expert 1 got 4 assignment(s) in expert_index, your list says 3"),
                        ([3, 4, 3, 0, 0], "5 counts for 4 experts")]:
        ok, out = _verdict(capsys, "moe.tokens_per_expert", wrong, **ctx)
        assert not ok and text in out, (wrong, out)


def test_imbalance(capsys):
    counts = [3, 5, 2, 2]
    assert _verdict(capsys, "moe.imbalance", 5 / 3, counts=counts)[0]
    for wrong, text in [(5 / 2, "max / min"), (3 / 5, "upside down"), (5 / 12, "share of all assignments"),
                        (2.0, "the busiest expert has 5 assignments; the mean is sum(counts) / 4 experts")]:
        ok, out = _verdict(capsys, "moe.imbalance", wrong, counts=counts)
        assert not ok and text in out, (wrong, out)
    idle = [3, 4, 3, 0]
    assert _verdict(capsys, "moe.imbalance", 4 / 2.5, counts=idle)[0]
    ok, out = _verdict(capsys, "moe.imbalance", 4 / (10 / 3), counts=idle)
    assert not ok and "leaves out the idle experts" in out


def test_instructor_solutions_pass_their_own_checks(capsys):
    # names as in notebook 04's exercise cells -> the checks' keywords
    cases = {"moe.active_share": ({"TOP_K": 2, "EXPERTS": 8}, {"top_k": 2, "experts": 8}),
             "moe.tokens_per_expert": ({"expert_index": INDEX, "EXPERTS": 4}, {"expert_index": INDEX, "experts": 4}),
             "moe.imbalance": ({"counts": [3, 4, 3, 0]}, {"counts": [3, 4, 3, 0]})}
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("moe"):
            names, kw = cases[key]
            ns = {"torch": torch, **names}
            exec(exercises.solution(key), ns)
            assert exercises.check(key, ns["answer"], **kw), key
    finally:
        exercises.show_solutions(False)
