"""Exercises of notebook 05 (GPU kernels): bytes per weight, the ideal speed-up, unpacking 4-bit codes."""

from __future__ import annotations

from . import ExerciseError, as_number, as_tensor, exercise


def _bytes_per_weight(bits: int, group: int, scale_bytes: float) -> float:
    return bits / 8 + scale_bytes / group


@exercise("kernels.bytes_per_weight", solution="answer = bits / 8 + scale_bytes / group")
def _bytes(answer, *, bits=4, group=64, scale_bytes=4):
    """A 4-bit format stores one scale of `scale_bytes` bytes per `group` weights. How many bytes must a
    batch-1 matmul read from memory per weight (codes plus scales)?

    Hint: 4 bits is half a byte; each weight also carries its share of the group's scale: scale_bytes / group.

    Why: A 4-bit code is half a byte, and every weight carries its share of its group's scale (scale_bytes /
    group): 0.5 + 4/64 = 0.5625 bytes. At batch 1 the kernel must read all of it.
    """
    value = as_number(answer, "the bytes per weight")
    expected = _bytes_per_weight(bits, group, scale_bytes)
    if abs(value - expected) <= 1e-3 * expected:
        return
    if abs(value - bits / 8) < 1e-9:
        raise ExerciseError(f"{value} counts the codes only: every weight also carries {scale_bytes}/{group} bytes "
                            "of its group's scale, which the kernel has to read too")
    if abs(value - expected * 8) <= 1e-3 * expected * 8:
        raise ExerciseError(f"{value} is in bits; the question asks for bytes (divide by 8)")
    if abs(value - scale_bytes / group) < 1e-9:
        raise ExerciseError(f"{value} is only the scale's share; add the {bits}-bit code itself ({bits / 8} byte)")
    raise ExerciseError(f"{value} is not it: codes ({bits} bits) plus one {scale_bytes}-byte scale per {group} weights")


@exercise("kernels.ideal_speedup", solution="answer = 2 / bytes_per_weight")
def _speedup(answer, *, bytes_per_weight):
    """At batch 1 a matmul is bound by memory traffic: its time is about bytes / bandwidth. Using your
    `bytes_per_weight`, what is the ideal speed-up of the 4-bit kernel over an fp16 matmul (2 bytes per
    weight)? Ignore the activations, which are tiny next to the weights.

    Hint: Same bandwidth, fewer bytes: speed-up = fp16 bytes per weight / 4-bit bytes per weight.

    Why: At batch 1 the time is bytes moved / memory bandwidth; the bandwidth is the same, so the ideal
    speed-up is the ratio of bytes per weight: 2 / 0.5625 = 3.56x for fp16 against 4-bit with fp32 scales per
    64 weights. Real kernels get less (unpacking, partial tiles).
    """
    value = as_number(answer, "the speed-up")
    expected = 2 / float(bytes_per_weight)
    if abs(value - expected) <= 0.01 * expected:
        return
    if abs(value - 1 / expected) <= 0.01 / expected:
        raise ExerciseError(f"{value:.3g} is the inverse: the 4-bit kernel moves fewer bytes, so it is faster "
                            "(speed-up > 1)")
    if abs(value - 4) < 1e-6:
        raise ExerciseError("4x would hold without scales: they cost bytes too, so the ideal is a bit under 4x")
    raise ExerciseError(f"{value:.3g} is not it: divide the 2 bytes of an fp16 weight by {float(bytes_per_weight):.4g}")


@exercise(
    "kernels.unpack",
    solution="answer = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)",
)
def _unpack(answer, *, packed):
    """effnb's int4 layout packs two codes per byte: column 2j in the LOW nibble and 2j+1 in the HIGH nibble.
    Unpack `packed` (uint8 [N, K/2]) into the codes (uint8 [N, K]) in column order.

    Hint: low = packed & 0x0F, high = packed >> 4; then interleave: out[:, 0::2] = low, out[:, 1::2] = high.

    Why: & 0x0F keeps the low nibble (even columns) and >> 4 the high one (odd columns); stacking them on a
    last axis and flattening it interleaves the two, column 2j then 2j+1.
    """
    import torch

    as_tensor(answer, "the answer should be a torch.Tensor of codes")
    n, half = packed.shape
    if tuple(answer.shape) != (n, 2 * half):
        raise ExerciseError(f"shape {tuple(answer.shape)}: expected [N, K] = {(n, 2 * half)}, two codes per byte")
    low, high = packed & 0x0F, packed >> 4
    want = torch.stack([low, high], dim=-1).reshape(n, -1)
    got = answer.to(torch.int64)
    if torch.equal(got, want.to(torch.int64)):
        return
    if torch.equal(got, torch.stack([high, low], dim=-1).reshape(n, -1).to(torch.int64)):
        raise ExerciseError("the nibbles are swapped: effnb's int4 puts the even column in the LOW nibble "
                            "(bitsandbytes' NF4 does the opposite: even element in the HIGH nibble)")
    if torch.equal(got, torch.cat([low, high], dim=1).to(torch.int64)):
        raise ExerciseError("all low nibbles first, then all high ones: interleave them (columns 2j and 2j+1)")
    if int(got.max()) > 15 or int(got.min()) < 0:
        raise ExerciseError("codes must lie in 0..15: mask the low nibble with & 0x0F and shift the high one by 4")
    raise ExerciseError("some codes differ from the packed bytes: low nibble = column 2j, high nibble = 2j+1")
