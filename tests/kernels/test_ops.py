"""The torch.library ops: opcheck, reference semantics, argument errors, import cost, dispatch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from effnb.kernels import interface, reference
from effnb.kernels.testing import make_case, weight_args


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


@pytest.mark.parametrize("fmt,opts", OPS)
def test_opcheck(fmt, opts):
    case = make_case(fmt, 24, 128, 64, seed=2, **opts)
    for x, bias in ((torch.randn(3, 128), torch.randn(24)), (torch.randn(2, 1, 128, dtype=torch.float16), None)):
        op, args = _op_args(case, x, bias)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt,opts", OPS)
def test_public_functions_equal_dequantize_then_linear(fmt, opts):
    case = make_case(fmt, 24, 128, 32, seed=4, **opts)
    x, bias = torch.randn(2, 5, 128), torch.randn(24)
    w = reference.dequantize(fmt, **weight_args(case))
    want = torch.nn.functional.linear(x, w, bias)
    if fmt == "int4":
        got = interface.int4_linear(x, case["qweight"], case["scales"], case["zeros"], 32, bias=bias)
    elif fmt == "int8":
        got = interface.int8_linear(x, case["qweight"], case["scales"], 32, bias=bias)
    else:
        absmax = interface.DoubleQuant(*case["dq"]) if "dq" in case else case["absmax"]
        got = getattr(interface, f"{fmt}_linear")(x, case["qweight"], absmax, 32, (24, 128), bias=bias)
    assert got.shape == (2, 5, 24)
    assert torch.equal(got, want)


def test_argument_errors_name_the_bad_value():
    case = make_case("int4", 8, 64, 32)
    with pytest.raises(ValueError, match="x has 60 features in its last dimension, the weight expects 64"):
        interface.int4_linear(torch.randn(1, 60), case["qweight"], case["scales"], case["zeros"], 32)
    with pytest.raises(TypeError, match="dtype torch.float64 are not supported; use float16, bfloat16 or float32"):
        interface.int4_linear(torch.randn(1, 64, dtype=torch.float64), case["qweight"], case["scales"],
                              case["zeros"], 32)


def test_compiles_with_torch_compile_fullgraph():
    case = make_case("int8", 16, 64, 64)
    f = torch.compile(lambda x: interface.int8_linear(x, case["qweight"], case["scales"], 64) * 2,
                      fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64)
    assert torch.equal(f(x), interface.int8_linear(x, case["qweight"], case["scales"], 64) * 2)


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


def test_quantlinear_reports_why_the_cuda_kernel_did_not_run():
    from effnb.quant import backends

    case = make_case("nf4", 8, 64, 64)

    class Layer:  # the attributes _cuda_supports reads
        fmt = "nf4"

    why = backends._cuda_supports(Layer(), torch.randn(1, 64))
    assert why == "input not on CUDA"
    if not torch.cuda.is_available():
        assert backends.availability("cuda", "nf4") == "no CUDA device"
    fn, reason = backends._cuda_kernel_fn("nf4")
    assert reason is None and fn is interface.nf4_linear
    assert case["qweight"].dtype == torch.uint8


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
