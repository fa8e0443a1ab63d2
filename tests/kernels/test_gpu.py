"""The Triton kernels compiled for CUDA, at real sizes, against the reference (skipped without a GPU).

Run on a GPU machine with:  pytest tests/kernels/test_gpu.py -q
Outputs are poisoned (NaN) before every launch, inputs are fresh random draws for every check.
"""

from __future__ import annotations

import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU kernel tests need one (the interpreter tests cover the CPU)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed")
if triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=1 is set: run the GPU tests in a process without it", allow_module_level=True)

from effnb.kernels import functions, reference  # noqa: E402
from effnb.kernels import triton as kt  # noqa: E402
from effnb.kernels.testing import TOLERANCE, make_case, rel_error, weight_args  # noqa: E402
from effnb.kernels.triton import qmm  # noqa: E402

DEV = "cuda"


@functools.cache
def _case(fmt, n, k, group, opts=()):
    """Quantized weights, made once per (format, size) and shared across batches and dtypes (x is fresh)."""
    return make_case(fmt, n, k, group, seed=n + k + group, device=DEV, **dict(opts))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(qmm, "POISON", True)


def _check(case, x, y, bias, what):
    ref = reference.reference_linear(case["fmt"], x.float(), bias=bias.float() if bias is not None else None,
                                     **weight_args(case))
    torch.cuda.synchronize()
    err = rel_error(y, ref)
    assert err <= TOLERANCE[x.dtype], f"{what}: max |y - ref| / max |ref| = {err:.3g} > {TOLERANCE[x.dtype]:g}"


FORMATS = [("int4", 64, {}), ("int4", 128, {"symmetric": True}), ("int4", 32, {}), ("int8", 128, {}),
           ("nf4", 64, {}), ("nf4", 64, {"double_quant": True}), ("fp4", 64, {})]
SIZES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)


@pytest.mark.parametrize("fmt,group,opts", FORMATS, ids=[f"{f}-g{g}-{'-'.join(o)}" for f, g, o in FORMATS])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_sizes(fmt, group, opts, m, dtype):
    for i, (n, k) in enumerate(SIZES):
        case = _case(fmt, n, k, group, tuple(sorted(opts.items())))
        x = torch.randn(m, k, dtype=dtype, device=DEV)
        bias = torch.randn(n, dtype=dtype, device=DEV) if i == 0 else None
        y, path = kt.run_kernel(fmt, x, bias=bias, return_path=True, **weight_args(case))
        _check(case, x, y, bias, f"{fmt} g{group} {opts} {path} M={m} N={n} K={k} {dtype}")


@pytest.mark.parametrize("path", kt.PATHS)
@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_every_path_on_awkward_shapes(fmt, path):
    for m, n, k in ((1, 4099, 4160), (7, 1000, 2112), (33, 257, 512)):
        case = _case(fmt, n, k, 64, (("double_quant", True),) if fmt == "nf4" else ())
        x = torch.randn(m, k, dtype=torch.float16, device=DEV)
        y = kt.run_kernel(fmt, x, path=path, **weight_args(case))
        _check(case, x, y, None, f"{fmt} {path} M={m} N={n} K={k}")


def test_ops_dispatch_to_triton_on_cuda_and_pass_opcheck():
    case = make_case("int4", 512, 1024, 64, device=DEV)
    x = torch.randn(2, 1024, dtype=torch.float16, device=DEV)
    before = sum(kt.path_counts.values())
    y = functions.int4_linear(x, case["qweight"], case["scales"], case["zeros"], 64)
    assert sum(kt.path_counts.values()) == before + 1  # the Triton implementation ran
    _check(case, x, y, None, "int4_linear op")
    torch.library.opcheck(torch.ops.effnb.int4_linear.default,
                          (x, case["qweight"], case["scales"], case["zeros"], 64, None))


def test_quantlinear_uses_the_cuda_kernel():
    from effnb.kernels.linear import QuantLinear

    import effnb

    model = effnb.load_model("tiny-llama").to(DEV).half()
    q = effnb.quantize(model, "nf4", measure=False)
    qmodel = q.model if hasattr(q, "model") else q
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert layers
    ids = torch.randint(0, 100, (1, 8), device=DEV)
    with torch.no_grad():
        qmodel(ids)
    calls = sum((m.backend_calls for m in layers), start=__import__("collections").Counter())
    assert calls["cuda-kernel"] > 0, calls
