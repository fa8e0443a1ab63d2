"""Every Triton kernel against its PyTorch reference, on the CPU under Triton's interpreter.

Small, awkward shapes: N and K not multiples of the tiles, M = 1 and odd M, groups 32/64/128,
per-row int8 scales with a K that is not a power of two, nf4/fp4 with and without double
quantization, fp16/bf16/fp32 activations, every path (GEMV, small GEMM, GEMM, dequantize +
matmul) and split-K. Outputs are poisoned with NaN before each launch.
"""

from __future__ import annotations

import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'effnb[test]' on Linux x86_64)")
if not triton.knobs.runtime.interpret:
    pytest.skip("this process compiles Triton for CUDA; run the interpreter tests on their own with "
                "TRITON_INTERPRET=1 pytest tests/kernels/test_interpreter.py", allow_module_level=True)

from effnb.kernels import reference  # noqa: E402
from effnb.kernels import triton as kt  # noqa: E402
from effnb.kernels.testing import TOLERANCE, make_case, rel_error, weight_args  # noqa: E402
from effnb.kernels.triton import qmm  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(qmm, "POISON", True)


def _check(case, x, y, bias=None, what=""):
    ref = reference.reference_linear(case["fmt"], x.float(), bias=bias.float() if bias is not None else None,
                                     **weight_args(case))
    err = rel_error(y, ref)
    tol = TOLERANCE[x.dtype]
    assert y.shape == ref.shape and y.dtype == x.dtype, f"{what}: got {y.shape} {y.dtype}, want {ref.shape} {x.dtype}"
    assert err <= tol, f"{what}: max |y - ref| / max |ref| = {err:.3g} > {tol:g} ({x.dtype})"


CASES = [  # fmt, group, options
    ("int4", 32, {}), ("int4", 64, {}), ("int4", 128, {}), ("int4", 64, {"symmetric": True}),
    ("int8", 32, {}), ("int8", 128, {}),
    ("nf4", 64, {}), ("nf4", 32, {"double_quant": True}), ("fp4", 64, {}), ("fp4", 128, {"double_quant": True}),
]
SHAPES = [(1, 37, 256), (3, 50, 384)]  # (M, N, K): N odd/not a tile multiple, K = 2-12 groups
PATHS = ["gemv", "gemm-small", "gemm", "dequant+cublas"]


@pytest.mark.parametrize("fmt,group,opts", CASES, ids=[f"{f}-g{g}{'-' + '-'.join(o) if o else ''}"
                                                       for f, g, o in CASES])
@pytest.mark.parametrize("path", PATHS)
def test_paths_match_reference(fmt, group, opts, path):
    for i, (m, n, k) in enumerate(SHAPES):
        case = make_case(fmt, n, k, group, seed=zlib.crc32(f'{fmt}{group}{path}{i}'.encode()), **opts)
        dtype = (torch.float16, torch.bfloat16, torch.float32)[(i + PATHS.index(path)) % 3]
        x = torch.randn(m, k, dtype=dtype)
        bias = torch.randn(n, dtype=dtype) if i == 1 else None
        y, used = kt.run_kernel(fmt, x, path=path, bias=bias, return_path=True, **weight_args(case))
        assert used == path
        _check(case, x, y, bias, f"{fmt} g{group} {opts} {path} M={m} N={n} K={k} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_split_k_and_odd_batch(fmt, dtype):
    case = make_case(fmt, 45, 512, 64, seed=7, double_quant=fmt == "nf4")
    x = torch.randn(5, 512, dtype=dtype)
    for cfg in ({"block_m": 8, "block_n": 16, "block_k": 128, "use_dot": False, "split_k": 3},
                {"block_m": 16, "block_n": 32, "block_k": 64, "use_dot": True, "split_k": 4}):
        y = kt.run_kernel(fmt, x, config=cfg, **weight_args(case))
        _check(case, x, y, None, f"{fmt} {cfg} {dtype}")


def test_per_row_int8_scale_with_k_not_a_power_of_two():
    case = make_case("int8", 24, 200, 200, seed=3)
    for m in (1, 7):
        x = torch.randn(m, 200, dtype=torch.float16)
        _check(case, x, kt.run_kernel("int8", x, **weight_args(case)), None, f"int8 per-row M={m}")


def test_leading_dimensions_and_non_contiguous_input():
    case = make_case("int4", 33, 128, 32, seed=5)
    x = torch.randn(2, 3, 256, dtype=torch.float16)[..., ::2]  # [2, 3, 128], stride 2
    y = kt.run_kernel("int4", x, **weight_args(case))
    assert y.shape == (2, 3, 33)
    _check(case, x.reshape(-1, 128), y.reshape(-1, 33), None, "int4 3-d non-contiguous x")


def test_unsupported_shapes_fall_back_to_the_reference():
    case = make_case("nf4", 6, 100, 64, seed=1)  # blocks of 64 cross rows of 100
    x = torch.randn(2, 100, dtype=torch.float32)
    y, used = kt.run_kernel("nf4", x, return_path=True, **weight_args(case))
    assert used == "reference"
    assert "not a multiple" in kt.kernel_support("nf4", 6, 100, 64)
    _check(case, x, y, None, "nf4 fallback")


def test_dequantize_kernel_matches_reference_exactly_in_fp32():
    for fmt, g, opts in CASES:
        case = make_case(fmt, 19, 256, g, seed=11, **opts)
        gk, kg = kt.kernel_group(256, g)
        common = dict(scales=case.get("scales", case.get("absmax")), zeros=case.get("zeros"), dq=case.get("dq"),
                      table=kt.table_on(fmt, "cpu") if fmt in ("nf4", "fp4") else None)
        w = qmm.launch_dequant(kt.FMT_CODE[fmt], case["qweight"], 19, 256, gk, kg, torch.float32,
                                   **common)
        ref = reference.dequantize(fmt, **weight_args(case))
        err = rel_error(w, ref)
        assert err <= 1e-6, f"{fmt} g{g} {opts}: dequantized W off by {err:.3g} (relative)"


def test_plan_picks_the_path_by_rows():
    ms = (1, 4, 5, 16, 17, 127, 256, 1023, 1024, 4096)
    assert [kt.plan("nf4", m, 4096, 4096, 64, "cpu")["path"] for m in ms] == [
        "gemv", "gemv", "gemm-small", "gemm-small", "gemm", "gemm", "gemm", "gemm", "dequant+cublas", "dequant+cublas"]
    assert kt.plan("nf4", 256, 4096, 4096, 64, "cpu")["block_m"] == 128
    with pytest.raises(ValueError, match="unknown kernel path 'fast'; expected one of gemv"):
        kt.plan("nf4", 1, 64, 64, 64, "cpu", path="fast")


@pytest.mark.parametrize("fmt,k,group", [("int4", 160, 32), ("nf4", 224, 32), ("int8", 200, 200)])
@pytest.mark.parametrize("path", PATHS)
def test_k_not_a_multiple_of_the_tile(fmt, k, group, path):
    case = make_case(fmt, 21, k, group, seed=k)
    x = torch.randn(3, k, dtype=torch.float16)
    y, used = kt.run_kernel(fmt, x, path=path, return_path=True, **weight_args(case))
    assert used == path
    _check(case, x, y, None, f"{fmt} K={k} g{group} {path}")


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_gemv_sweep_configurations(fmt):
    """The shapes benchmarks/gpu_kernels.py --sweep-gemv tries: narrow and wide tiles, split-K."""
    case = make_case(fmt, 19, 1024, 128, seed=9)
    x = torch.randn(1, 1024, dtype=torch.float16)
    for bn, bk, sk in ((8, 512, 2), (32, 256, 4), (8, 128, 1)):
        cfg = {"block_m": 1, "block_n": bn, "block_k": bk, "use_dot": False, "split_k": sk, "num_warps": 2}
        _check(case, x, kt.run_kernel(fmt, x, config=cfg, **weight_args(case)), None, f"{fmt} {cfg}")
