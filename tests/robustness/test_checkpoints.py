"""Hostile and damaged checkpoints, and saves killed part-way (issue 16).

Each damaged checkpoint is loaded, and run forward if it loads, in a separate Python process, so a
signal (the SIGSEGV / SIGFPE that unchecked sizes used to cause in the C kernels) fails the test
instead of taking pytest down. Cases are batched per process; each case prints a line before and
after it runs, so a crash names the case that caused it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import effnb  # noqa: E402
from effnb.quant import checkpoint, serialize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])

# The child: load each checkpoint, run it (16 tokens: the decode kernels; 64: dequantize + GEMM).
CHILD = r"""
import json, sys, warnings
import torch
import effnb
torch.set_num_threads(2)
for name, path in json.loads(sys.argv[1]):
    print(json.dumps({"start": name}), flush=True)
    res = {"name": name}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = effnb.load(path)
            for n in (16, 64):
                out = m(torch.arange(n).reshape(1, n) % 200).logits
            res.update(outcome="ok", finite=bool(torch.isfinite(out).all()))
        except BaseException as exc:
            res.update(outcome="error", type=type(exc).__name__, msg=str(exc))
    res["warnings"] = [str(w.message) for w in caught]
    print(json.dumps(res), flush=True)
"""


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama):
    """tiny-llama saved as int8 and as nf4 (double quantization), with their logits."""
    root = tmp_path_factory.mktemp("base")
    models = {"int8": effnb.quantize(tiny_llama, method="int8", measure=False).model,
              "nf4": effnb.quantize(tiny_llama, method="nf4", double_quant=True, measure=False).model}
    for name, m in models.items():
        effnb.save(m, root / name)
    return root, {name: _logits(m) for name, m in models.items()}


# ------------------------------------------------------------------------------------ mutations


def _meta(d: Path, fn) -> None:
    meta = json.loads((d / "effnb.json").read_text())
    fn(meta)
    (d / "effnb.json").write_text(json.dumps(meta))


def _layer(meta: dict, i: int = 0) -> dict:
    return meta["layers"][sorted(meta["layers"])[i]]


def _first(meta: dict, i: int = 0) -> str:
    return sorted(meta["layers"])[i]


def _scale(**factors):
    def fn(meta):
        for key, f in factors.items():
            _layer(meta)[key] = _layer(meta)[key] * f if not isinstance(f, str) else f
    return lambda d: _meta(d, fn)


def _set(key, value, i=0):
    return lambda d: _meta(d, lambda meta: _layer(meta, i).__setitem__(key, value))


def _top(key, value):
    return lambda d: _meta(d, lambda meta: meta.__setitem__(key, value))


def _tensors(fn):
    """Rewrite model.safetensors and re-record every checksum: only the structural checks can object."""
    def mutate(d: Path):
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "model.safetensors"))
        meta = json.loads((d / "effnb.json").read_text())
        fn(state, meta)
        save_file(state, str(d / "model.safetensors"))
        meta["checksums"] = {k: checkpoint.digest(t) for k, t in state.items()}
        (d / "effnb.json").write_text(json.dumps(meta))
    return mutate


def _flip_byte(at_from_end: int):
    def mutate(d: Path):
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) - at_from_end] ^= 0x5A
        f.write_bytes(bytes(data))
    return mutate


def _truncate(keep):
    def mutate(d: Path):
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: keep if keep >= 0 else len(data) // 2])
    return mutate


def _write(name: str, text: str | bytes):
    def mutate(d: Path):
        target = d / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def _json_add(name: str, key: str, value):
    def mutate(d: Path):
        data = json.loads((d / name).read_text())
        data[key] = value
        (d / name).write_text(json.dumps(data))
    return mutate


def _remove(name: str):
    return lambda d: (d / name).unlink()


def _pop_buffer(buffer: str):
    def fn(state, meta):
        del state[_first(meta) + "." + buffer]
    return _tensors(fn)


def _retype(buffer: str, dtype):
    def fn(state, meta):
        k = _first(meta) + "." + buffer
        state[k] = state[k].to(dtype)
    return _tensors(fn)


def _reshape(buffer: str):
    def fn(state, meta):
        k = _first(meta) + "." + buffer
        state[k] = state[k].reshape(-1)[: state[k].numel() // 2].clone()
    return _tensors(fn)


def _header_len(value: int):
    def mutate(d: Path):
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[:8] = value.to_bytes(8, "little")
        f.write_bytes(bytes(data))
    return mutate


def _mangle_header(d: Path):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{" * 32
    f.write_bytes(bytes(data))


def _as_version1(d: Path):
    _meta(d, lambda meta: (meta.__setitem__("version", 1), meta.pop("checksums")))


# (name, base checkpoint, mutation, expected exception, words the one-line message must hold)
CASES = [
    ("in_features and group_size x4096", "int8", _scale(in_features=4096, group_size=4096), "ValueError", ["qweight", "shape"]),
    ("in_features and group_size x2", "int8", _scale(in_features=2, group_size=2), "ValueError", ["qweight", "shape"]),
    ("out_features x2", "int8", _scale(out_features=2), "ValueError", ["shape"]),
    ("group_size 0", "int8", _set("group_size", 0), "ValueError", ["group_size", "0"]),
    ("group_size -64", "int8", _set("group_size", -64), "ValueError", ["group_size", "-64"]),
    ("group_size 48 (does not divide 64)", "int8", _set("group_size", 48), "ValueError", ["group_size 48"]),
    ("group_size a string", "int8", _set("group_size", "64"), "ValueError", ["group_size", "'64'"]),
    ("nf4 group_size x4096", "nf4", _set("group_size", 64 * 4096), "ValueError", ["shape"]),
    ("nf4 group_size 0", "nf4", _set("group_size", 0), "ValueError", ["group_size"]),
    ("unknown fmt", "int8", _set("fmt", "int3"), "ValueError", ["unknown format 'int3'"]),
    ("fmt int8 -> int4", "int8", _set("fmt", "int4"), "ValueError", ["qweight", "dtype"]),
    ("future format version", "int8", _top("version", 3), "ValueError", ["version 3", "upgrade effnb"]),
    ("other format name", "int8", _top("format", "evil"), "ValueError", ["'evil'"]),
    ("class not a model class", "int8", _top("class", "pipeline"), "ValueError", ["'pipeline'"]),
    ("layer is not a Linear", "int8", lambda d: _meta(d, lambda m: m["layers"].__setitem__(
        "model.norm", m["layers"].pop(_first(m)))), "ValueError", ["model.norm"]),
    ("unknown buffer name", "int8", _set("buffers", ["qweight", "scales", "__class__"]), "ValueError", ["__class__"]),
    ("flipped byte in a quantized weight", "int8", _flip_byte(100), "ValueError", ["SHA-256"]),
    ("flipped byte 4000 from the end", "int8", _flip_byte(4000), "ValueError", ["SHA-256"]),
    ("truncated safetensors (half)", "int8", _truncate(-1), "ValueError", ["safetensors"]),
    ("truncated safetensors (5 bytes)", "int8", _truncate(5), "ValueError", ["safetensors"]),
    ("safetensors header length 2**60", "int8", _header_len(1 << 60), "ValueError", ["safetensors"]),
    ("mangled safetensors header", "int8", _mangle_header, "ValueError", ["safetensors"]),
    ("mangled effnb.json", "int8", _write("effnb.json", '{"format": "effnb.quantized", "version": 2, "lay'),
     "ValueError", ["effnb.json", "JSON"]),
    ("effnb.json is a list", "int8", _write("effnb.json", "[1, 2]"), "ValueError", ["effnb.json", "object"]),
    ("effnb.json not UTF-8", "int8", _write("effnb.json", b"\xff\xfe\x00{"), "ValueError", ["effnb.json"]),
    ("effnb.json missing", "int8", _remove("effnb.json"), "FileNotFoundError", ["effnb.json"]),
    ("model.safetensors missing", "int8", _remove("model.safetensors"), "FileNotFoundError", ["model.safetensors"]),
    ("missing tensor (scales)", "int8", _pop_buffer("scales"), "ValueError", ["scales", "missing"]),
    ("missing tensor (qweight), checksums stale", "int8", lambda d: _pop_buffer("qweight")(d) or _top(
        "checksums", {})(d), "ValueError", ["checksum"]),
    ("wrong dtype (scales int8)", "int8", _retype("scales", torch.int8), "ValueError", ["scales", "dtype"]),
    ("wrong dtype (qweight uint8)", "int8", _retype("qweight", torch.uint8), "ValueError", ["qweight", "dtype"]),
    ("wrong shape (qweight halved)", "int8", _reshape("qweight"), "ValueError", ["qweight", "shape"]),
    ("nf4 qabsmax halved", "nf4", _reshape("qabsmax"), "ValueError", ["qabsmax"]),
    ("nf4 double quant without code2", "nf4", _pop_buffer("code2"), "ValueError", ["code2"]),
    ("extra tensor", "int8", _tensors(lambda s, m: s.__setitem__("evil.weight", torch.zeros(3))), "ValueError",
     ["evil.weight"]),
    ("bias claimed but absent", "int8", _set("bias", True), "ValueError", ["bias"]),
    ("config.json with auto_map", "int8", _json_add("config.json", "auto_map", {"AutoConfig": "evil.Config"}),
     "ValueError", ["custom code", "load(path, model=...)"]),
    ("tokenizer_config.json with auto_map", "int8", _json_add("tokenizer/tokenizer_config.json", "auto_map",
                                                              {"AutoTokenizer": ["evil.Tok", None]}),
     "ValueError", ["custom code"]),
    ("mangled config.json", "int8", _write("config.json", "{nope"), "ValueError", ["config.json", "JSON"]),
    ("tied to a missing tensor", "int8", _top("tied", {"lm_head.weight": "nowhere"}), "ValueError", ["nowhere"]),
]


def _prepare(base_root: Path, tmp: Path, cases) -> list:
    import shutil

    jobs = []
    for i, (name, fmt, mutate, *_rest) in enumerate(cases):
        d = tmp / f"case{i:02d}"
        shutil.copytree(base_root / fmt, d)
        mutate(d)
        jobs.append((name, str(d)))
    return jobs


def _run(jobs: list, timeout: float = 300) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    code = proc.returncode
    assert code == 0, (f"the loading process ended with {'signal ' + signal.Signals(-code).name if code < 0 else code}"
                       f" during case {started[-1] if started else None!r}: {proc.stderr[-2000:]}")
    return {x["name"]: x for x in lines if "name" in x}


def test_hostile_checkpoints_are_refused_with_one_line(base, tmp_path):
    root, _ = base
    jobs = _prepare(root, tmp_path, CASES) + [("unchanged copy", str(root / "int8"))]
    results = _run(jobs)
    assert results["unchanged copy"]["outcome"] == "ok" and results["unchanged copy"]["finite"]
    bad = []
    for (name, _fmt, _m, kind, words), (_, path) in zip(CASES, jobs):
        r = results[name]
        ok = (r["outcome"] == "error" and r["type"] == kind and "\n" not in r["msg"] and path in r["msg"]
              and all(w in r["msg"] for w in words))
        if not ok:
            bad.append(f"{name}: {r}")
    assert not bad, "\n".join(bad)
    assert len(CASES) >= 20


def test_version1_checkpoint_loads_with_a_warning(base, tmp_path):
    import shutil

    root, logits = base
    shutil.copytree(root / "nf4", tmp_path / "v1")
    _as_version1(tmp_path / "v1")
    with pytest.warns(UserWarning, match="version 1 has no checksums"):
        back = effnb.load(tmp_path / "v1")
    assert torch.equal(_logits(back), logits["nf4"])
    meta = json.loads((root / "nf4" / "effnb.json").read_text())
    assert meta["version"] == 2 and len(meta["checksums"]) == len(back.state_dict()) - len(meta["tied"])


def test_load_never_changes_a_model_passed_in(base, tmp_path, tiny_llama):
    import shutil

    root, _ = base
    shutil.copytree(root / "int8", tmp_path / "bad")
    _reshape("qweight")(tmp_path / "bad")
    skeleton = effnb.copy_model(tiny_llama)
    before = effnb.state_hash(skeleton)
    with pytest.raises(ValueError, match="qweight"):
        effnb.load(tmp_path / "bad", model=skeleton)
    assert effnb.state_hash(skeleton) == before
    assert not any(type(m).__name__ == "QuantLinear" for m in skeleton.modules())


def test_load_arguments_and_missing_folders_are_one_line(base, tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choices: auto, reference, cpu, cuda"):
        effnb.load(base[0] / "int8", backend="tpu")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        effnb.load(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a checkpoint folder"):
        effnb.load(tmp_path / "file.txt")


def test_save_refuses_to_replace_a_folder_it_did_not_write(base, tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    model = effnb.load(base[0] / "int8")
    with pytest.raises(ValueError, match="not an effnb checkpoint"):
        effnb.save(model, user)
    assert (user / "thesis.txt").read_text() == "years of work"
    effnb.save(model, tmp_path / "ck")
    (tmp_path / "ck" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="mine.txt"):
        effnb.save(model, tmp_path / "ck")


# --------------------------------------------------------------------------------- kill tests

STAGES = ("begin", "tmp-created", "tensors-written", "meta-written", "config-written", "tokenizer-written", "synced",
          "old-moved", "new-moved", "old-removed")


def _kill_save(model, target: Path, stage: str | None = None, delay: float | None = None) -> None:
    """effnb.save(model, target) in a forked child, SIGKILLed at ``stage`` or after ``delay`` seconds."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if stage is not None:
                serialize._save_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == stage else None
            effnb.save(model, target)
        finally:
            os._exit(3)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"effnb.save did not finish within 60 s (stage {stage}, delay {delay})")
        time.sleep(0.01)
    if stage is not None:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"stage {stage} never ran"


def _loads_old_or_new(target: Path, old, new, want: str | None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "restored the previous checkpoint" after a kill between the renames
        got = _logits(effnb.load(target))
    which = "old" if torch.equal(got, old) else "new" if torch.equal(got, new) else "neither"
    assert which != "neither" and (want is None or which == want), f"loaded {which}, expected {want}"
    assert sorted(os.listdir(target)) == sorted(["config.json", "effnb.json", "model.safetensors", "tokenizer"])
    assert os.listdir(target.parent) == [target.name], "a temporary or backup folder was left beside the checkpoint"
    return which


def test_save_killed_at_ten_points_keeps_a_loadable_checkpoint(base, tmp_path):
    root, logits = base
    old_model, new_model = effnb.load(root / "int8"), effnb.load(root / "nf4")
    target = tmp_path / "ck" / "model"
    seen = []
    for stage in STAGES:
        effnb.save(old_model, target)
        _kill_save(new_model, target, stage=stage)
        want = "old" if STAGES.index(stage) < STAGES.index("new-moved") else "new"
        seen.append(_loads_old_or_new(target, logits["int8"], logits["nf4"], want))
    assert seen.count("old") == 8 and seen.count("new") == 2


def test_save_killed_at_random_moments_keeps_a_loadable_checkpoint(base, tmp_path):
    root, logits = base
    old_model, new_model = effnb.load(root / "int8"), effnb.load(root / "nf4")
    target = tmp_path / "ck" / "model"
    t0 = time.perf_counter()
    effnb.save(new_model, tmp_path / "timing")
    took = time.perf_counter() - t0
    for i in range(8):
        effnb.save(old_model, target)
        _kill_save(new_model, target, delay=took * i / 6)
        _loads_old_or_new(target, logits["int8"], logits["nf4"], None)
