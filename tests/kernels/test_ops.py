"""The torch.library ops: opcheck, the CPU kernels behind them, reference semantics, argument errors,
import cost, and the one ``supports`` that picks the path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from effnb.kernels import cpu, functions, ops, reference
from effnb.kernels.testing import make_case, rel_error, weight_args


def _op_args(case, x, bias):
    fmt, n, k, g = case["fmt"], case["n"], case["k"], case["group"]
    if fmt == "int4":
        return torch.ops.effnb.int4_linear.default, (x, case["qweight"], case["scales"], case["zeros"], g, bias)
    if fmt == "int8":
        return torch.ops.effnb.int8_linear.default, (x, case["qweight"], case["scales"], g, bias)
    if "dq" in case:
        return torch.ops.effnb.lut4_dq_linear.default, (x, case["qweight"], *case["dq"], fmt, g, n, k, bias)
    return torch.ops.effnb.lut4_linear.default, (x, case["qweight"], case["absmax"], fmt, g, n, k, bias)


OPS = [("int4", {}), ("int4", {"symmetric": True}), ("int8", {}), ("nf4", {}), ("fp4", {"double_quant": True})]
needs_cpu_kernels = pytest.mark.skipif(cpu.library(quiet=True) is None, reason="effnb's CPU kernels unavailable")


@pytest.mark.parametrize("fmt,opts", OPS)
@pytest.mark.parametrize("n,k,g", [(24, 128, 64), (8, 96, 32), (16, 96, 48)])  # the last: the reference path
def test_opcheck(fmt, opts, n, k, g):
    if fmt in ("nf4", "fp4") and k % g:
        g = 32
    case = make_case(fmt, n, k, g, seed=2, **opts)
    for x, bias in ((torch.randn(3, k), torch.randn(n)), (torch.randn(2, 1, k, dtype=torch.float16), None),
                    (torch.randn(40, k, dtype=torch.bfloat16), torch.randn(n))):  # 40 rows: dequantize + GEMM
        op, args = _op_args(case, x, bias)
        torch.library.opcheck(op, args)


@needs_cpu_kernels
@pytest.mark.parametrize("fmt,opts", OPS)
@pytest.mark.parametrize("rows,path", [(1, "cpu-fast"), (16, "cpu-fast"), (17, "cpu-dequant")])
def test_op_on_cpu_runs_the_cpp_kernel(fmt, opts, rows, path):
    case = make_case(fmt, 24, 128, 64, seed=3, **opts)
    x, bias = torch.randn(rows, 128), torch.randn(24)
    op, args = _op_args(case, x, bias)
    before = ops.path_counts[path]
    y = op(*args)
    assert ops.path_counts[path] == before + 1, dict(ops.path_counts)
    want = reference.reference_linear(fmt, x, bias=bias, **weight_args(case))
    assert rel_error(y, want) <= 1e-5


def test_op_on_cpu_falls_back_to_the_reference_where_the_kernel_cannot_run():
    case = make_case("int4", 16, 96, 48, seed=5)  # group 48: not a multiple of 32
    x = torch.randn(2, 96)
    before = ops.path_counts["reference"]
    y = torch.ops.effnb.int4_linear(x, case["qweight"], case["scales"], case["zeros"], 48, None)
    assert ops.path_counts["reference"] == before + 1
    assert torch.equal(y, reference.reference_linear("int4", x, **weight_args(case)))


@pytest.mark.parametrize("fmt,opts", OPS)
def test_public_functions_equal_dequantize_then_linear(fmt, opts):
    case = make_case(fmt, 24, 128, 32, seed=4, **opts)
    x, bias = torch.randn(2, 5, 128), torch.randn(24)
    w = reference.dequantize(fmt, **weight_args(case))
    want = torch.nn.functional.linear(x, w, bias)
    if fmt == "int4":
        got = functions.int4_linear(x, case["qweight"], case["scales"], case["zeros"], 32, bias=bias)
    elif fmt == "int8":
        got = functions.int8_linear(x, case["qweight"], case["scales"], 32, bias=bias)
    else:
        absmax = functions.DoubleQuant(*case["dq"]) if "dq" in case else case["absmax"]
        got = getattr(functions, f"{fmt}_linear")(x, case["qweight"], absmax, 32, (24, 128), bias=bias)
    assert got.shape == (2, 5, 24)
    assert rel_error(got, want) <= 1e-5  # the CPU kernels: fp32 sums in another order


def test_argument_errors_name_the_bad_value():
    case = make_case("int4", 8, 64, 32)
    with pytest.raises(ValueError, match="x has 60 features in its last dimension, the weight expects 64"):
        functions.int4_linear(torch.randn(1, 60), case["qweight"], case["scales"], case["zeros"], 32)
    with pytest.raises(TypeError, match="dtype torch.float64 are not supported; use float16, bfloat16 or float32"):
        functions.int4_linear(torch.randn(1, 64, dtype=torch.float64), case["qweight"], case["scales"],
                              case["zeros"], 32)


def test_compiles_with_torch_compile_fullgraph():
    case = make_case("int8", 16, 64, 64)
    f = torch.compile(lambda x: functions.int8_linear(x, case["qweight"], case["scales"], 64) * 2,
                      fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64)
    assert torch.equal(f(x), functions.int8_linear(x, case["qweight"], case["scales"], 64) * 2)


def test_import_is_light():
    code = textwrap.dedent("""
        import importlib.util, pathlib, sys
        import effnb
        if importlib.util.find_spec("effnb.kernels") is None:  # editable install older than kernels/
            root = pathlib.Path(effnb.__file__).resolve().parents[1] / "kernels"
            spec = importlib.util.spec_from_file_location("effnb.kernels", root / "__init__.py",
                                                          submodule_search_locations=[str(root)])
            mod = importlib.util.module_from_spec(spec); sys.modules["effnb.kernels"] = mod
            spec.loader.exec_module(mod)
        import effnb.kernels
        heavy = [m for m in ("torch", "triton") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_supports_is_the_one_place_that_says_why():
    case = make_case("nf4", 8, 64, 64)
    x = torch.randn(1, 64)
    assert ops.supports("cuda-kernel", "nf4", x) == "input not on CUDA"
    assert ops.supports("cpu-fast", "fp8", x) == "format fp8 has no CPU kernel"
    assert ops.supports("reference", "fp8", x) is None
    tensors = {"qweight": case["qweight"], "absmax": case["absmax"]}
    why = ops.supports("cpu-fast", "nf4", torch.randn(17, 64), tensors=tensors, group_size=64, shape=(8, 64))
    assert why == "more than 16 rows (prefill): dequantize + GEMM is faster"
    if not torch.cuda.is_available():
        assert ops.availability("cuda", "nf4") == "no CUDA device"
    assert ops.availability("reference", "fp8") is None and ops.availability("auto", "fp8") is None
    with pytest.raises(ValueError, match="unknown path 'gpu'"):
        ops.supports("gpu", "nf4", x)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter tests cannot see compile errors: compile two configurations for sm_90 (ptxas in triton)."""
    import os
    import pathlib

    pytest.importorskip("triton")
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_kernels.py"), "--compile-only",
                          "--batches", "1,64", "--formats", "effnb int4 g64,effnb nf4 b64 dq"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("int4", "nf4"))]
    assert len(lines) == 4 and all("gemv" in ln or "gemm" in ln for ln in lines), out.stdout
    gemv = [ln.split() for ln in lines if " gemv " in ln]
    assert all(int(cols[-6]) >= 1 for cols in gemv), f"no 16-byte weight loads in the GEMV:\n{out.stdout}"
