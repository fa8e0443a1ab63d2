"""effnb's compiled CPU kernels never crash or hang the process (issue 16).

* every native entry point works in a fork()ed child after the parent used it (GNU OpenMP's
  threads do not survive fork: a parallel region there used to wait forever);
* a failed allocation inside a kernel is a one-line MemoryError naming the buffer and its size;
* a QuantLinear whose sizes do not match its buffers is refused before a pointer reaches C;
* the library is built in a private directory, checked against its recorded SHA-256 before it is
  loaded, and built by a compiler from a fixed list (never an inherited $CXX);
* quantizing tiny-llama under address-space limits from 600 MB to 3 GB succeeds or fails with one
  line, never a signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from effnb.kernels import cpu as cpu_ext  # noqa: E402
from effnb.kernels import reference as F  # noqa: E402
from effnb.kernels.linear import QuantLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", **extra)


def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def _need_kernels():
    if cpu_ext.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_ext.status()['reason']}")


# ------------------------------------------------------------------------------------------ fork

# Every exported kernel, called with 2 threads in the parent (so OpenMP's and effnb's pools exist),
# then again in a forked child; the child compares its outputs with the parent's byte for byte
# (numpy: torch's own parallel ops would hang in the child, which is torch's limit, not effnb's).
FORK_CHILD = r"""
import ctypes, os, sys, time
import torch
from effnb.kernels import cpu as cpu_ext, reference as F
torch.manual_seed(0)
lib = cpu_ext.library()
T = 2
N, K, g, B, M = 256, 512, 64, 64, 4
G = K // g
w, x = torch.randn(N, K), torch.randn(M, K)
code, bounds, order = F.bucket_search("nf4")
o8, table = order.to(torch.uint8), F.table_4bit("nf4")
H = torch.eye(B) * 2.0
sc, zc = torch.full((N, G), 0.05), torch.full((N, G), 8.0)
z4 = torch.full((N, G), 8.0, dtype=torch.float16)
d = ctypes.c_double()
u8, f16, f32 = torch.uint8, torch.float16, torch.float32
# every output buffer is made here, before any fork: the child runs no torch op, only the kernels
out = {"rtn0": [torch.empty(N, K // 2, dtype=u8), torch.empty(N, G, dtype=f16), torch.empty(N, G, dtype=f16)],
       "rtn2": [torch.empty(N, K, dtype=u8), torch.empty(N, G, dtype=f16)],
       "nf4": [torch.empty(N * K // 2, dtype=u8), torch.empty(N * K // g)],
       "nf4_search": [torch.empty(N * K // 2, dtype=u8), torch.empty(N * K // g)],
       "hqq": [torch.empty(N * K, dtype=u8), torch.empty(N * G, dtype=f16), torch.empty(N * G, dtype=f16)],
       "gptq": [w[:, :B].contiguous(), torch.empty(N, B), torch.empty(N, B)],
       "int4_dequant": [torch.empty(N, K)], "int8_dequant": [torch.empty(N, K)], "lut4_dequant": [torch.empty(N, K)],
       "int4_linear": [torch.empty(M, N)], "int8_linear": [torch.empty(M, N)], "lut4_linear": [torch.empty(M, N)]}
W1 = out["gptq"][0].clone()

def run():
    q4, s4, zz = out["rtn0"]
    lib.effnb_quantize_rtn(w.data_ptr(), N, K, g, 0, q4.data_ptr(), s4.data_ptr(), zz.data_ptr(), ctypes.byref(d), T)
    q8, s8 = out["rtn2"]
    lib.effnb_quantize_rtn(w.data_ptr(), N, K, g, 2, q8.data_ptr(), s8.data_ptr(), None, ctypes.byref(d), T)
    p, a = out["nf4"]
    lib.effnb_quantize_4bit(w.data_ptr(), N * K, g, bounds.data_ptr(), o8.data_ptr(), code.data_ptr(), p.data_ptr(),
                            a.data_ptr(), ctypes.byref(d), T)
    p2, a2 = out["nf4_search"]
    lib.effnb_nf4_search(w.data_ptr(), N * K, g, bounds.data_ptr(), o8.data_ptr(), code.data_ptr(), 0.1, 0.8, 5,
                         p2.data_ptr(), a2.data_ptr(), ctypes.byref(d), T)
    c, s, z = out["hqq"]
    lib.effnb_hqq(w.data_ptr(), N * G, g, 15, 5, 0.7, 10.0, 1.01, 1, c.data_ptr(), s.data_ptr(), z.data_ptr(),
                  ctypes.byref(d), T)
    w1, q1, e1 = out["gptq"]
    w1.numpy()[:] = W1.numpy()
    lib.effnb_gptq_block(w1.data_ptr(), N, B, H.data_ptr(), sc.data_ptr(), zc.data_ptr(), 8.0, G, g, 0, 0.0, 15.0,
                         q1.data_ptr(), e1.data_ptr(), T)
    lib.effnb_int4_dequant(q4.data_ptr(), s4.data_ptr(), z4.data_ptr(), N, K, g, out["int4_dequant"][0].data_ptr(), T)
    lib.effnb_int8_dequant(q8.data_ptr(), s8.data_ptr(), N, K, g, out["int8_dequant"][0].data_ptr(), T)
    lib.effnb_lut4_dequant(p.data_ptr(), a.data_ptr(), N * K, g, table.data_ptr(), out["lut4_dequant"][0].data_ptr(), T)
    lib.effnb_int4_linear(x.data_ptr(), M, K, N, q4.data_ptr(), s4.data_ptr(), z4.data_ptr(), g, None,
                          out["int4_linear"][0].data_ptr(), T)
    lib.effnb_int8_linear(x.data_ptr(), M, K, N, q8.data_ptr(), s8.data_ptr(), g, None, out["int8_linear"][0].data_ptr(), T)
    lib.effnb_lut4_linear(x.data_ptr(), M, K, N, p.data_ptr(), a.data_ptr(), None, None, None, 0.0, g, 256,
                          table.data_ptr(), None, out["lut4_linear"][0].data_ptr(), T)
    return {k: [t.numpy().tobytes() for t in v] for k, v in out.items()}

parent = run()
pid = os.fork()
if pid == 0:
    for ts in out.values():
        for t in ts:
            t.numpy().view("uint8")[:] = 0  # the child must compute everything again
    child = run()
    bad = [k for k in parent if parent[k] != child[k]]
    print("child:", "differs " + ", ".join(bad) if bad else f"{len(child)} kernel calls identical", flush=True)
    os._exit(1 if bad else 0)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.02)
os.kill(pid, 9)
print("child: hung (killed after the timeout)", flush=True)
sys.exit(9)
"""


def test_every_native_entry_point_works_in_a_forked_child():
    _need_kernels()
    proc = subprocess.run([sys.executable, "-c", FORK_CHILD, "30"], capture_output=True, text=True, timeout=180,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, f"{_exit(proc.returncode)}: {proc.stdout} {proc.stderr[-1500:]}"
    assert "12 kernel calls identical" in proc.stdout


# A decode call in a forked child runs on effnb's own thread pool; with the address space nearly
# full, creating its worker thread fails (std::system_error, which used to abort the process). The
# call must fall back to the threads it has and give the same numbers.
NO_THREADS = r"""
import os, resource
import torch
from effnb.kernels import reference as F
from effnb.kernels.linear import QuantLinear
torch.set_num_threads(1)  # no OpenMP team in the parent: the child may make threads of its own
torch.manual_seed(0)
layer = QuantLinear(512, 4096, "int8", 64, F.quantize_int8(torch.randn(4096, 512), 64))
x = torch.randn(1, 512)
want = layer(x).numpy().copy()
pid = os.fork()
if pid == 0:
    code = 3
    try:
        torch.set_num_threads(16)  # 15 pool workers: more stacks than glibc has cached
        vsz = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vsz + (4 << 20), vsz + (4 << 20)))  # no room for an 8 MB stack
        y = layer(x).numpy()
        code = 0 if (y == want).all() else 1
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_thread_creation_failure_falls_back_to_fewer_threads():
    _need_kernels()
    proc = subprocess.run([sys.executable, "-c", NO_THREADS], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=ROOT)
    assert proc.returncode == 0 and "child 0" in proc.stdout, f"{proc.stdout} {proc.stderr[-1500:]}"


# ---------------------------------------------------------------------------- errors and checks


def test_failed_allocation_in_a_kernel_is_one_memory_error():
    _need_kernels()
    lib = cpu_ext.library()
    K = 1 << 44  # the kernel's reordered copy of x: 4 * K bytes (64 TiB), more than any machine maps
    y = torch.empty(1, 32)
    with pytest.raises(MemoryError) as info:
        lib.effnb_int4_linear(y.data_ptr(), 1, K, 32, None, None, None, K, None, y.data_ptr(), 1)
    msg = str(info.value)
    assert "\n" not in msg and "effnb_int4_linear" in msg and "reordered input" in msg and str(4 * (K + 1)) in msg
    fast = cpu_ext.unchecked("effnb_int4_linear")  # the decode closures' handle: they test the status
    status = fast(y.data_ptr(), 1, K, 32, None, None, None, K, None, y.data_ptr(), 1)
    with pytest.raises(MemoryError, match="effnb_int4_linear: out of memory allocating the reordered input"):
        cpu_ext.raise_status(status, "effnb_int4_linear")


def test_inconsistent_sizes_passed_to_a_kernel_are_a_value_error():
    """Cheap size checks in the C entry points themselves: a zero group size used to be a SIGFPE."""
    _need_kernels()
    lib = cpu_ext.library()
    w, q, s = torch.randn(4, 64), torch.empty(4, 64, dtype=torch.uint8), torch.empty(4, 2, dtype=torch.float16)
    err = F.ctypes_double()
    with pytest.raises(ValueError, match=r"effnb_quantize_rtn: invalid sizes \(needs .*g > 0"):
        lib.effnb_quantize_rtn(w.data_ptr(), 4, 64, 0, 2, q.data_ptr(), s.data_ptr(), None, F.ctypes_ref(err), 1)
    with pytest.raises(ValueError, match="effnb_quantize_4bit: invalid sizes"):
        lib.effnb_quantize_4bit(w.data_ptr(), 255, 64, None, None, None, q.data_ptr(), s.data_ptr(),
                                F.ctypes_ref(err), 1)
    with pytest.raises(ValueError, match="effnb_hqq: invalid sizes"):  # its group buffers hold 256 values
        lib.effnb_hqq(w.data_ptr(), 1, 512, 15, 1, 0.7, 10.0, 1.01, 1, q.data_ptr(), s.data_ptr(), s.data_ptr(),
                      F.ctypes_ref(err), 1)


def _layer(fmt="int8", k=128, n=64, g=64):
    w = torch.randn(n, k)
    tensors = F.quantize_int8(w, g) if fmt == "int8" else F.quantize_int4(w, g)
    return QuantLinear(k, n, fmt, g, tensors), tensors


@pytest.mark.parametrize("k, n, g, words", [
    (128 * 4096, 64, 64 * 4096, "qweight has shape"),
    (256, 64, 128, "qweight has shape"),
    (128, 64, 0, "group_size must be a positive integer"),
    (128, 64, 48, "group_size 48 does not divide in_features 128"),
    (128, 128, 64, "qweight has shape"),
    (128.0, 64, 64, "in_features must be a positive integer"),
])
def test_quantlinear_refuses_sizes_its_buffers_do_not_have(k, n, g, words):
    tensors = F.quantize_int8(torch.randn(64, 128), 64)
    with pytest.raises(ValueError, match=words):
        QuantLinear(k, n, "int8", g, tensors)


def test_replaced_buffers_and_bad_inputs_never_reach_the_kernels():
    _need_kernels()
    layer, tensors = _layer("int4")
    x = torch.randn(1, 128)
    want = layer(x)
    layer.scales = torch.ones(1, 1, dtype=torch.float16)  # smaller than the kernels would read
    with pytest.raises(ValueError, match="scales has shape"):
        layer(torch.randn(64, 128))  # prefill: the compiled dequantize checks first
    fresh, _ = _layer("int4")
    fresh.scales = torch.ones(1, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales has shape"):
        fresh(x)  # decode: the fast path is prepared only after the check
    layer.scales = tensors["scales"]
    assert torch.equal(layer(x), want)
    with pytest.raises(ValueError, match="last dimension must be 128"):
        layer(torch.randn(1, 3, 96))  # 288 values reshape to rows of 128, which would overflow the output


# ---------------------------------------------------------------------------- the built library


def test_build_directory_must_be_private(tmp_path, monkeypatch):
    d = tmp_path / "ext"
    assert cpu_ext._private_dir(d) is None and (d.stat().st_mode & 0o777) == 0o700
    d.chmod(0o777)
    assert "writable by its group or others" in cpu_ext._private_dir(d)
    d.chmod(0o755)
    assert cpu_ext._private_dir(d) is None and (d.stat().st_mode & 0o777) == 0o700  # tightened
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    assert "not to this user" in cpu_ext._private_dir(d)


def test_compiler_comes_from_the_fixed_list_or_effnb_cxx(tmp_path, monkeypatch):
    planted = tmp_path / "evil-cxx"
    planted.write_text("#!/bin/sh\ntouch " + str(tmp_path / "ran") + "\n")
    planted.chmod(0o755)
    monkeypatch.setenv("CXX", str(planted))
    monkeypatch.delenv("EFFNB_CXX", raising=False)
    assert Path(cpu_ext.compiler()).name in cpu_ext._COMPILERS
    monkeypatch.setenv("EFFNB_CXX", str(planted))
    assert cpu_ext.compiler() == str(planted)
    monkeypatch.setenv("EFFNB_CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="EFFNB_CXX"):
        cpu_ext.compiler()


def test_library_is_checked_against_its_recorded_sha256(tmp_path, monkeypatch, caplog):
    """A library that differs from the SHA-256 recorded at build time is never loaded: it is rebuilt
    (by g++/c++/clang++, not by a planted $CXX) and the rebuilt one is loaded."""
    import shutil

    _need_kernels()
    planted = tmp_path / "evil-cxx"
    planted.write_text("#!/bin/sh\ntouch " + str(tmp_path / "ran") + "\nexit 1\n")
    planted.chmod(0o755)
    monkeypatch.setenv("EFFNB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(planted))
    monkeypatch.delenv("EFFNB_CXX", raising=False)
    target = cpu_ext._build_dir(cpu_ext.compiler()) / cpu_ext._LIB_NAME
    assert (target.parent.stat().st_mode & 0o777) == 0o700 and target.parent.parent == tmp_path / "cache" / "ext"
    built = Path(cpu_ext.status()["path"])
    shutil.copy(built, target)
    shutil.copy(str(built) + ".sha256", str(target) + ".sha256")
    assert cpu_ext._verify(target) is None
    with open(target, "ab") as f:
        f.write(b"\0planted")
    assert "does not match the SHA-256" in cpu_ext._verify(target)
    with caplog.at_level("INFO", logger="effnb.kernels.cpu"):
        lib = cpu_ext._load()
    assert "rebuilding effnb CPU kernels" in caplog.text and lib.effnb_abi_version() == cpu_ext._ABI
    assert cpu_ext._verify(target) is None and not (tmp_path / "ran").exists(), "the inherited $CXX was run"


# ------------------------------------------------------------------------------ memory limits

# One process imports torch, transformers and effnb and loads tiny-llama once (on one torch thread,
# so no OpenMP team exists yet and forked children can make their own); then, per limit, a forked
# child lowers its own address-space limit (RLIMIT_AS, what `prlimit --as` sets), goes back to two
# threads and quantizes + runs the model. Each child prints one JSON line; the parent prints how
# each child ended. A fresh process per limit would cost ~10 s of imports each.
LIMITED = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
import effnb
from effnb.kernels import cpu as cpu_ext  # imported and loaded here: the children's limits meet real work
from effnb.quant import api
cpu_ext.library(quiet=True)
model = effnb.load_model("tiny-llama")
effnb.quantize  # noqa: B018 - resolves effnb's lazy name now

def child(mb, method):
    stage = "limit"
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))
        torch.set_num_threads(2)
        stage = "quantize"
        q = effnb.quantize(model, method=method, measure=False).model
        stage = "forward"
        q(torch.arange(16).reshape(1, 16))
        print(json.dumps({"limit": mb, "outcome": "ok"}), flush=True)
        return 0
    except BaseException as exc:
        print(json.dumps({"limit": mb, "outcome": "error", "stage": stage, "type": type(exc).__name__,
                          "msg": str(exc)}), flush=True)
        return 1

for i, mb in enumerate(map(int, sys.argv[1:])):
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = child(mb, "int4" if i % 2 else "nf4")
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    if not done[0]:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(json.dumps({"limit": mb, "exit": os.waitstatus_to_exitcode(done[1]) if done[0] else "hung"}), flush=True)
"""
LIMITS_MB = (600, 800, 900, 950, 975, 1000, 1050, 1200, 2000, 3000)


def test_quantize_under_address_space_limits_never_dies_of_a_signal():
    """10 limits from 600 MB to 3 GB: each child succeeds or reports one error line, never a signal."""
    proc = subprocess.run([sys.executable, "-c", LIMITED, *map(str, LIMITS_MB)], capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    exits = {x["limit"]: x["exit"] for x in lines if "exit" in x}
    reports = {x["limit"]: x for x in lines if "outcome" in x}
    bad = []
    for mb in LIMITS_MB:
        r, code = reports.get(mb), exits.get(mb)
        if code not in (0, 1) or r is None or (r["outcome"] == "error" and "\n" in r["msg"].strip()):
            bad.append(f"{mb} MB: ended with {code if not isinstance(code, int) else _exit(code)}, report {r}")
        elif r["outcome"] == "error" and r["type"] not in ("MemoryError", "RuntimeError") or (
                r["outcome"] == "error" and r["type"] == "RuntimeError" and "alloc" not in r["msg"]):
            bad.append(f"{mb} MB: {r}")
    assert not bad, "\n".join(bad) + "\n" + proc.stderr[-2000:]
    assert reports[3000]["outcome"] == "ok", reports[3000]
    for mb in LIMITS_MB:  # shown with -s (docs/reliability.md quotes it)
        print(mb, "MB:", reports[mb]["outcome"], reports[mb].get("stage", ""), reports[mb].get("type", ""),
              reports[mb].get("msg", "")[:120])
