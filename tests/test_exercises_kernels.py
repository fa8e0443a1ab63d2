"""Kernel exercises: a correct answer passes; the usual mistakes get a helpful message."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from effnb import exercises  # noqa: E402


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


def test_kernel_exercises_are_registered():
    assert exercises.list_exercises("kernels") == ["kernels.bytes_per_weight", "kernels.ideal_speedup",
                                                   "kernels.unpack"]


def test_bytes_per_weight(capsys):
    ctx = {"bits": 4, "group": 64, "scale_bytes": 4}
    assert _verdict(capsys, "kernels.bytes_per_weight", 0.5625, **ctx)[0]
    for wrong, text in [(0.5, "counts the codes only"), (4.5, "is in bits"), (0.0625, "only the scale's share"),
                        (1.0, "is not it"), (None, "should be a number")]:
        ok, out = _verdict(capsys, "kernels.bytes_per_weight", wrong, **ctx)
        assert not ok and text in out, (wrong, out)


def test_ideal_speedup(capsys):
    assert _verdict(capsys, "kernels.ideal_speedup", 2 / 0.5625, bytes_per_weight=0.5625)[0]
    assert _verdict(capsys, "kernels.ideal_speedup", 3.55, bytes_per_weight=0.5625)[0]  # within 1 %
    for wrong, text in [(0.5625 / 2, "is the inverse"), (4, "would hold without scales"), (2.0, "is not it")]:
        ok, out = _verdict(capsys, "kernels.ideal_speedup", wrong, bytes_per_weight=0.5625)
        assert not ok and text in out, (wrong, out)


def test_unpack(capsys):
    packed = torch.tensor([[0x21, 0xF0], [0x7A, 0x05]], dtype=torch.uint8)
    right = torch.tensor([[1, 2, 0, 15], [10, 7, 5, 0]], dtype=torch.uint8)
    assert _verdict(capsys, "kernels.unpack", right, packed=packed)[0]
    swapped = torch.tensor([[2, 1, 15, 0], [7, 10, 0, 5]])
    blocked = torch.tensor([[1, 0, 2, 15], [10, 5, 7, 0]])
    for wrong, text in [(swapped, "nibbles are swapped"), (blocked, "interleave them"),
                        (packed, "expected [N, K]"), ([1, 2], "should be a torch.Tensor"),
                        (right + 16, "must lie in 0..15"), (right.flip(0), "some codes differ")]:
        ok, out = _verdict(capsys, "kernels.unpack", wrong, packed=packed)
        assert not ok and text in out, (wrong, out)


def test_instructor_solutions_pass_their_own_checks(capsys):
    packed = torch.tensor([[0x21, 0xF0, 0x93], [0x7A, 0x05, 0x4C]], dtype=torch.uint8)  # notebook 05's
    ns = {"torch": torch, "bits": 4, "group": 64, "scale_bytes": 4, "bytes_per_weight": 0.5625, "packed": packed}
    kws = {"kernels.bytes_per_weight": {"bits": 4, "group": 64, "scale_bytes": 4},
           "kernels.ideal_speedup": {"bytes_per_weight": 0.5625}, "kernels.unpack": {"packed": packed}}
    exercises.show_solutions(True)
    try:
        for key in exercises.list_exercises("kernels"):
            scope = dict(ns)
            exec(exercises.solution(key), scope)
            assert exercises.check(key, scope["answer"], **kws[key]), key
    finally:
        exercises.show_solutions(False)
