"""Storage formats: the CPU kernels against the reference, and byte compatibility with bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from effnb.kernels import cpu as cpu_ext
from effnb.kernels import reference as F
from effnb.kernels.linear import QuantLinear

bnb = pytest.importorskip("bitsandbytes")


def _layer(fmt: str, n: int = 96, k: int = 192, g: int = 64, bias: bool = True, **kw) -> tuple[QuantLinear, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    if fmt == "int4":
        t = F.quantize_int4(w, g, kw.get("symmetric", False))
    elif fmt == "int8":
        t = F.quantize_int8(w, g)
    else:
        packed, absmax = F.quantize_4bit(w, g, fmt)
        t = {"qweight": packed, **(F.double_quant(absmax) if kw.get("dq") else {"absmax": absmax})}
    return QuantLinear(k, n, fmt, g, t, torch.randn(n) if bias else None), w


CASES = [("int4", {}), ("int4", {"symmetric": True}), ("int8", {}), ("nf4", {}), ("fp4", {}), ("nf4", {"dq": True})]


@pytest.mark.parametrize("fmt,kw", CASES)
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
def test_cpu_kernel_matches_reference(fmt, kw, rows):
    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    layer, _ = _layer(fmt, **kw)
    x = torch.randn(rows, layer.in_features)
    layer.backend = "reference"
    ref = layer(x)
    layer.backend = "cpu"
    fast = layer(x)
    err = (ref - fast).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"{fmt} {kw} rows={rows}: max abs error {err:.3g}, shape {tuple(ref.shape)}"
    assert layer.backend_calls["cpu-fast"] == 1


def _forked_child_result(layer, x, ref, mode, conn):
    torch.set_num_threads(2)
    cpu_ext.set_decode_threading(mode)
    conn.send(bool(torch.equal(layer(x), ref)))


@pytest.mark.parametrize("mode", ["auto", "openmp", "pool"])
def test_decode_threading_is_exact_with_any_threads_callers_or_fork(mode):
    """The decode kernels' threads (OpenMP, effnb's pool, or auto: OpenMP until calls keep stalling):
    each output row is computed by one thread in a fixed order, so any thread count and either way
    of threading give bit-identical results; concurrent callers and forked children work."""
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    layer, _ = _layer("int4", n=1001, k=256)  # 62 chunks of 16 rows and one of 9
    layer.backend = "cpu"
    x = torch.randn(2, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = layer(x)
        cpu_ext.set_decode_threading(mode)
        for threads in (2, 3, 2, 1, 4):
            torch.set_num_threads(threads)
            assert all(torch.equal(layer(x), ref) for _ in range(30)), f"{mode}, {threads} threads"
        torch.set_num_threads(2)
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda _: layer(x), range(64)))
        assert all(torch.equal(o, ref) for o in outs)
        parent, child = mp.get_context("fork").Pipe()
        proc = mp.get_context("fork").Process(target=_forked_child_result, args=(layer, x, ref, mode, child))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0 and parent.poll(1) and parent.recv() is True
    finally:
        torch.set_num_threads(old)
        cpu_ext.set_decode_threading("auto")


def test_decode_threading_modes_are_named():
    with pytest.raises(ValueError, match=r"unknown decode threading 'omp' \(choices: auto, openmp, pool\)"):
        cpu_ext.set_decode_threading("omp")
    stats = cpu_ext.decode_threading_stats()
    assert set(stats) == {"stalls", "switches", "on_pool"}


@pytest.mark.parametrize("fmt,g,symmetric", [("int4", 64, False), ("int4", 32, True), ("int8", 64, False),
                                             ("int8", 192, False)])
def test_compiled_rtn_equals_reference(fmt, g, symmetric):
    from effnb.quant import rounding

    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    torch.manual_seed(0)
    w = torch.randn(40, 192) * 0.05
    w[0, :64] = 0.0  # an all-zero group
    w[1, :64] = 0.3  # a constant group
    w[2] *= 1e-6     # tiny values
    fast = rounding.rtn_compiled(w, fmt, g, symmetric)
    ref = F.quantize_int4(w, g, symmetric) if fmt == "int4" else F.quantize_int8(w, g)
    for name, t in ref.items():
        if t is None:
            assert fast[name] is None
        else:
            assert fast[name].dtype == t.dtype and torch.equal(fast[name], t), name
    deq = F.dequantize_int4(ref["qweight"], ref["scales"], ref.get("zeros"), g) if fmt == "int4" else \
        F.dequantize_int8(ref["qweight"], ref["scales"], g)
    assert fast["_sq_err"] == pytest.approx((w.double() - deq.double()).pow(2).sum().item(), rel=1e-6)


def test_auto_backend_names_the_path_that_ran():
    layer, _ = _layer("int4")
    layer(torch.randn(1, layer.in_features))  # decode-sized
    layer(torch.randn(64, layer.in_features))  # prefill-sized: dequantize + GEMM
    calls = layer.backend_calls
    compiled = cpu_ext.library() is not None
    assert calls["cpu-fast"] == (1 if compiled else 0)
    assert calls["cpu-dequant"] == (1 if compiled else 0)  # compiled dequantize, not the PyTorch one
    assert calls["reference"] == (0 if compiled else 2)


@pytest.mark.parametrize("fmt,kw", CASES)
def test_prefill_and_training_take_the_compiled_path_and_equal_the_reference(fmt, kw):
    """Inputs too large for the decode kernels (prefill) and inputs that need gradients (QLoRA)
    run the compiled dequantize + GEMM: weights identical to ``dequantize()``, so outputs and
    input gradients equal the reference path exactly."""
    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    from effnb.kernels.ops import cpu_dequantize

    layer, _ = _layer(fmt, **kw)
    assert torch.equal(cpu_dequantize(layer), layer.dequantize())
    x = torch.randn(2, 40, layer.in_features)
    layer.backend = "reference"
    ref = layer(x)
    xr = x[:1, :3].clone().requires_grad_(True)
    layer(xr).pow(2).sum().backward()
    layer.backend = "auto"
    layer.reset_backend_calls()
    assert torch.equal(layer(x), ref)
    xf = x[:1, :3].clone().requires_grad_(True)
    layer(xf).pow(2).sum().backward()
    assert torch.equal(xf.grad, xr.grad)
    assert dict(layer.backend_calls) == {"cpu-dequant": 2}


def test_int4_packing_layout():
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    packed = F.pack_int4(q)
    assert packed.tolist() == [[1 | (2 << 4), 3 | (4 << 4)]]  # column 2j low nibble, 2j+1 high
    assert torch.equal(F.unpack_int4(packed), q)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_4bit_bytes_equal_bitsandbytes(quant_type, blocksize):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    ours, absmax = F.quantize_4bit(w, blocksize, quant_type)
    theirs, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(ours, theirs.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(torch.tensor(F.NF4_TABLE if quant_type == "nf4" else F.FP4_TABLE), state.code.cpu())
    # either side reads the other's weights
    assert torch.equal(F.dequantize_4bit(theirs, state.absmax, blocksize, quant_type, w.shape),
                       bnb.functional.dequantize_4bit(theirs, state).float())


def test_double_quant_equals_bitsandbytes_compress_statistics():
    torch.manual_seed(2)
    w = torch.randn(128, 512)
    packed, absmax = F.quantize_4bit(w, 64, "nf4")
    _, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = F.double_quant(absmax)
    assert torch.equal(ours["code2"], state.state2.code)
    assert torch.allclose(ours["offset"], state.offset.reshape(1))
    assert torch.equal(ours["absmax2"], state.state2.absmax)
    # bitsandbytes' CPU library picks a neighbouring code for a few blocks (its search is not exact
    # nearest); the format is the same, so each side still reads the other's bytes exactly (below)
    diff = (ours["qabsmax"].int() - state.absmax.int()).abs()
    assert diff.max().item() <= 1 and (diff == 0).float().mean().item() > 0.99
    # our reading of bitsandbytes' state equals bitsandbytes' own dequantization
    mine = F.dequantize_4bit(packed, F.undo_double_quant(state.absmax, state.state2.absmax, state.state2.code,
                                                          state.offset.reshape(1)), 64, "nf4", w.shape)
    assert torch.allclose(mine, bnb.functional.dequantize_4bit(packed.reshape(-1, 1), state).float(), atol=1e-6)


def test_bitsandbytes_layer_reads_effnb_weights_and_back():
    from effnb.kernels.bnb import dequantize_bnb, from_bnb_module, quant_state

    layer, _ = _layer("nf4", bias=False)
    m = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.float32,
                          quant_type="nf4", device="meta")
    qs = quant_state({"absmax": layer.absmax}, "nf4", 64, (layer.out_features, layer.in_features), torch.float32)
    m.weight = bnb.nn.Params4bit(layer.qweight.reshape(-1, 1), requires_grad=False, quant_state=qs, blocksize=64,
                                 quant_type="nf4", bnb_quantized=True, module=m)
    x = torch.randn(3, layer.in_features)
    assert torch.equal(dequantize_bnb(m), layer.dequantize())
    from effnb.kernels.bnb import forward_dtype

    m.eval()  # as a user runs it: on AVX512-BF16 CPUs bitsandbytes then computes in bf16, whatever compute_dtype says
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[forward_dtype(m)]
    with torch.no_grad():
        ref = layer(x)
        assert (m(x) - ref).abs().max().item() <= tol * ref.abs().max().item()
    back = from_bnb_module(m)
    assert torch.equal(back.dequantize(), layer.dequantize())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_compiled_4bit_quantizer_equals_reference(quant_type, blocksize):
    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    torch.manual_seed(3)
    w = torch.randn(96, 320) * 0.03
    w[0, :64] = 0.0  # an all-zero block
    w[5, 7] = 1.0  # an outlier
    fast, fast_absmax, sq_err = F.quantize_4bit_with_error(w, blocksize, quant_type)
    ref, ref_absmax = F.quantize_4bit_reference(w, blocksize, quant_type)
    assert torch.equal(fast, ref) and torch.equal(fast_absmax, ref_absmax)
    deq = F.dequantize_4bit(ref, ref_absmax, blocksize, quant_type, w.shape)
    assert sq_err == pytest.approx((w.double() - deq.double()).pow(2).sum().item(), rel=1e-6)


def test_compiled_hqq_matches_reference():
    from effnb.quant import hqq as H
    from effnb.quant import rounding

    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    torch.manual_seed(4)
    w = torch.randn(64, 256) * 0.02
    w[3, 5] = 0.3  # an outlier, as real layers have

    def snr(t):
        deq = F.dequantize_int4(t["qweight"], t["scales"], t["zeros"], 64)
        return 10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum()).item()

    fast, ref, rtn = H.hqq(w, 4, 64), H.hqq_reference(w, 4, 64), rounding.rtn(w, "int4", 64)
    assert abs(snr(fast) - snr(ref)) < 0.05, (snr(fast), snr(ref))
    assert snr(fast) > snr(rtn) + 0.3
    deq = F.dequantize_int4(fast["qweight"], fast["scales"], fast["zeros"], 64)
    assert fast["_sq_err"] == pytest.approx((w.double() - deq.double()).pow(2).sum().item(), rel=1e-4)


def test_hqq_nf4_grid_compiled_equals_reference_and_beats_plain_nf4():
    """Default ``hqq``: NF4 codes with a searched block scale. The compiled search picks the same
    scales and codes as the PyTorch reference, the scale is never above the block's absmax, and the
    magnitude-weighted error it minimises is never above plain NF4's (absmax is one candidate)."""
    from effnb.quant import hqq as H

    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")
    torch.manual_seed(5)
    w = torch.randn(96, 256) * 0.02
    w[3, 5] = 0.3  # an outlier
    w[7, :64] = 0.0  # an all-zero block
    fast, ref = H.hqq_nf4(w, 64), H.hqq_nf4_reference(w, 64)
    assert (fast["qweight"] == ref["qweight"]).float().mean().item() > 0.995
    assert (fast["absmax"] == ref["absmax"]).float().mean().item() > 0.99
    am = w.reshape(-1, 64).abs().amax(-1)
    assert torch.all(fast["absmax"] <= am) and torch.all(fast["absmax"] >= 0.8 * am - 1e-9)
    deq = F.dequantize_4bit(fast["qweight"], fast["absmax"], 64, "nf4", w.shape)
    assert fast["_sq_err"] == pytest.approx((w.double() - deq.double()).pow(2).sum().item(), rel=1e-5)
    packed, absmax = F.quantize_4bit(w, 64, "nf4")
    plain = F.dequantize_4bit(packed, absmax, 64, "nf4", w.shape)
    wt = 1 + H.NF4_SEARCH_ALPHA * (w.reshape(-1, 64) / am.clamp(min=1e-38).unsqueeze(1)).pow(2)

    def werr(d):
        return (wt * (w - d).reshape(-1, 64).pow(2)).sum(-1)

    assert torch.all(werr(deq) <= werr(plain) * (1 + 1e-5))
    assert werr(deq).sum() < 0.95 * werr(plain).sum()


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_casting_a_quantized_model_keeps_its_stored_tensors(method):
    import effnb

    model = effnb.load_model("tiny-llama")
    q = effnb.quantize(model, method=method, measure=False).model
    before = {n: b.clone() for n, b in q.named_buffers() if ".mlp." in n}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = q(ids).logits
        out = q.to(torch.bfloat16)(ids).logits.float()
    for n, b in q.named_buffers():
        if n in before:  # codes, scales, statistics: same dtype, same bytes
            assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"{method}: bf16 model differs from fp32 by {rel:.3g}"
