"""effnb's Triton grouped GEMM for the MoE block against per-expert PyTorch matmuls, on the CPU under
Triton's interpreter (tests/kernels/conftest.py turns it on when there is no GPU).

Awkward on purpose: an empty expert, experts with fewer rows than a tile and with several tiles,
K not a multiple of BLOCK_K, M not a multiple of BLOCK_N; fp32, fp16 and bf16 inputs.
"""

from __future__ import annotations

import pathlib
import runpy
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'effnb[test]' on Linux x86_64)")
if not triton.knobs.runtime.interpret:
    pytest.skip("this process compiles Triton for CUDA; run the interpreter tests on their own with "
                "TRITON_INTERPRET=1 pytest tests/kernels/test_moe_grouped.py", allow_module_level=True)

from effnb.kernels.triton import grouped as moe_grouped  # noqa: E402

from effnb.experts import block as B  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |ref|


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_mm_matches_per_expert_matmuls(dtype):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 19, 1])  # empty expert, partial tiles, one expert over two 16-row tiles
    n, k, m = int(counts.sum()), 40, 48  # K = 32 + 8 (ragged K tile), M = 32 + 16 (ragged N tile)
    xs = torch.randn(n, k, generator=gen).to(dtype)
    w = torch.randn(4, k, m, generator=gen).to(dtype)
    offs = counts.cumsum(0).to(torch.int32)
    y = moe_grouped.grouped_mm(xs, w, offs, blocks=(16, 32, 32))
    ref = moe_grouped.grouped_mm_reference(xs, w, offs)
    assert y.shape == (n, m) and y.dtype == dtype
    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL[dtype], f"{dtype}: max |y - ref| / max |ref| = {err:.3g}"


def test_grouped_mm_rejects_bad_operands():
    xs, w = torch.zeros(4, 8), torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match=r"grouped_mm needs xs \[N, K\] and w \[E, K, M\]; got \(4, 9\) and"):
        moe_grouped.grouped_mm(torch.zeros(4, 9), w, torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="grouped_mm needs offs of shape"):
        moe_grouped.grouped_mm(xs, w, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="one dtype"):
        moe_grouped.grouped_mm(xs.half(), w, torch.tensor([2, 4], dtype=torch.int32))


def test_moe_block_on_the_triton_backend_matches_reference():
    """The MoE block's dispatch with the Triton backend forced (the path CUDA inference takes)."""
    torch.manual_seed(0)
    block = B.MoEFFN(32, 16, 4, 2, torch.nn.SiLU(), gated=True, combine="softmax")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 11, 32)
    old = B.set_grouped_backend("triton")
    try:
        with torch.inference_mode():
            y = block(x)
        with pytest.raises(ValueError, match="backend 'triton' cannot run cpu torch.float32 with gradients"):
            block(x.requires_grad_())
    finally:
        B.set_grouped_backend(old)
    block.reference = True
    with torch.inference_mode():
        ref = block(x.detach())
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(ValueError, match="unknown grouped matmul backend 'cutlass'; choose one of auto"):
        B.set_grouped_backend("cutlass")


def test_benchmark_dry_run_runs_the_triton_column(capsys, monkeypatch):
    """benchmarks/moe.py --dry-run: every variant, the Triton kernel included, agrees on a tiny shape."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "moe.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--dry-run"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(path), run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "triton" in out and "transformers" in out and out.count("T=") == 2
