"""Bad input to the Python API: one clear error naming the bad value, and the user's model unchanged.

Every case must fail in validation, before any work: a case that starts working is a bug (and slow).
Allowed errors are the ones a user can handle: ValueError, TypeError, MemoryError, FileNotFoundError.
"""

from __future__ import annotations

import logging
import math
import threading

import pytest

torch = pytest.importorskip("torch")

import effnb  # noqa: E402
from effnb import data, options  # noqa: E402
from effnb.measure.memory import PeakMemory  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALLOWED = (ValueError, TypeError, MemoryError, FileNotFoundError)
MISSING_DIR = "/nonexistent-effnb-dir"


@pytest.fixture(scope="module")
def llama():
    return effnb.load_model("tiny-llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "empty.txt").write_text("   \n")
    (root / "folder").mkdir()
    return root


def expect_clean_error(call, needle: str, model=None):
    """``call()`` raises an allowed error on one line that contains ``needle``; ``model`` stays as it was."""
    before = effnb.state_hash(model) if model is not None else None
    with pytest.raises(ALLOWED) as info:
        call()
    text = str(info.value)
    assert needle in text, f"{needle!r} not in {text!r}"
    assert "\n" not in text and "Traceback" not in text
    if model is not None:
        assert effnb.state_hash(model) == before
    return info.value


# --------------------------------------------------------------------------- audit (AuditConfig)

AUDIT_CASES = [
    ({"prompt_tokens": 0}, ValueError, "prompt_tokens must be a positive integer, got 0"),
    ({"prompt_tokens": 10**7}, ValueError, "prompt_tokens must be at most 1,000,000, got 10000000"),
    ({"decode_tokens": -1}, ValueError, "decode_tokens must be a positive integer, got -1"),
    ({"decode_tokens": 10**9}, ValueError, "decode_tokens must be at most 1,000,000, got 1000000000"),
    ({"quality_tokens": 2.5}, TypeError, "quality_tokens must be a positive integer, got 2.5 (float)"),
    ({"quality_tokens": "100"}, TypeError, "quality_tokens must be a positive integer, got '100' (str)"),
    ({"quality_tokens": 5_000_000}, ValueError, "quality_tokens must be at most 1,000,000, got 5000000"),
    ({"repeats": True}, TypeError, "repeats must be a positive integer, got True"),
    ({"repeats": 10**6}, ValueError, "repeats must be at most 10,000, got 1000000"),
    ({"warmup": -1}, ValueError, "warmup must be a non-negative integer, got -1"),
    ({"window": 1}, ValueError, "window must be at least 2 tokens, got 1"),
    ({"speed": "yes"}, TypeError, "speed must be True or False, got 'yes' (str)"),
    ({"flops": 1}, TypeError, "flops must be True or False, got 1 (int)"),
    ({"energy": None}, TypeError, "energy must be True or False, got None"),
    ({"text": "~/corpus.txt"}, FileNotFoundError, "text file not found: '~/corpus.txt'"),
    ({"text": f"{MISSING_DIR}/eval.txt"}, FileNotFoundError, f"'{MISSING_DIR}/eval.txt'"),
    ({"text": "notes-that-do-not-exist.md"}, FileNotFoundError, "'notes-that-do-not-exist.md'"),
    ({"text": "./missing"}, FileNotFoundError, "'./missing'"),
    ({"text": "/dev/null"}, ValueError, "text '/dev/null' is not a regular file"),
    ({"text": 42}, TypeError, "text must be a string, a file path or a list of strings, got int"),
    ({"text": ["a", 3]}, TypeError, "got list"),
    ({"text": b"bytes"}, TypeError, "got bytes"),
    ({"text": "   "}, ValueError, "text is empty"),
    ({"text": ["", " "]}, ValueError, "the list of texts given as text is empty"),
    ({"repeat": 3}, TypeError, "unknown audit option 'repeat'; did you mean 'repeats'"),
    ({"device": "tpu"}, TypeError, "unknown audit option 'device'"),
]


@pytest.mark.parametrize(("kwargs", "kind", "needle"), AUDIT_CASES, ids=lambda v: repr(v)[:40])
def test_audit_bad_options(llama, kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.audit(llama, **kwargs), needle, llama)
    assert isinstance(err, kind)


def test_audit_text_directory_and_undecodable_file(llama, files):
    expect_clean_error(lambda: effnb.audit(llama, text=str(files / "folder")), "is a directory", llama)
    for text, needle in ((files / "latin1.txt", "is not UTF-8 text"), (files / "empty.txt", "is empty")):
        err = expect_clean_error(lambda t=text: data.resolve_text(str(t)), needle)
        assert str(text) in str(err)


def test_audit_of_something_that_is_not_a_model():
    expect_clean_error(lambda: effnb.audit("tiny-llama"), "expected a torch.nn.Module model, got str")


# --------------------------------------------------------------------------- lora (LoraConfig)

LORA_CASES = [
    ({"rank": 0}, ValueError, "rank must be a positive integer (typically 4 to 64), got 0"),
    ({"rank": 100_000}, ValueError, "rank must be at most 4,096 (typically 4 to 64), got 100000"),
    ({"rank": 8.0}, TypeError, "rank must be a positive integer (typically 4 to 64), got 8.0 (float)"),
    ({"rank": "8"}, TypeError, "got '8' (str)"),
    ({"alpha": -1}, ValueError, "alpha must be a number > 0, got -1"),
    ({"alpha": math.nan}, ValueError, "alpha must be a number > 0, got nan"),
    ({"alpha": "16"}, TypeError, "alpha must be a number > 0, got '16' (str)"),
    ({"dropout": 1.0}, ValueError, "dropout must be in [0, 1), got 1.0"),
    ({"targets": "atn"}, ValueError, "did you mean 'attn'"),
    ({"targets": []}, ValueError, "got []"),
    ({"targets": 3}, ValueError, "got int"),
    ({"dora": "yes"}, TypeError, "dora must be True or False, got 'yes' (str)"),
    ({"measure": 1}, TypeError, "measure must be True or False, got 1 (int)"),
    ({"share_base": True, "inplace": True}, ValueError, "share_base applies to the adapted copy"),
    ({"init": "xavier"}, ValueError, "got 'xavier'"),
    ({"seed": -1}, ValueError, "seed must be a non-negative integer, got -1"),
    ({"adapter_name": "my adapter"}, ValueError, "got 'my adapter'"),
    ({"rnak": 8}, TypeError, "unknown lora option 'rnak'; did you mean 'rank'"),
    ({"plus_ratio": 0}, ValueError, "plus_ratio must be a number > 0, got 0"),
]


@pytest.mark.parametrize(("kwargs", "kind", "needle"), LORA_CASES, ids=lambda v: repr(v)[:40])
def test_lora_bad_options(llama, kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.lora(llama, **kwargs), needle, llama)
    assert isinstance(err, kind)


# --------------------------------------------------------------------------- finetune and merge

FINETUNE_CASES = [
    ({"data": "/home/me/my data.txt"}, FileNotFoundError, "data file not found: '/home/me/my data.txt'"),
    ({"data": "~/notes.txt"}, FileNotFoundError, "'~/notes.txt'"),
    ({"data": "train.jsonl"}, FileNotFoundError, "'train.jsonl'"),
    ({"data": "../corpus.csv"}, FileNotFoundError, "'../corpus.csv'"),
    ({"data": ""}, ValueError, "data is empty"),
    ({"data": 5}, ValueError, "got int"),
    ({"steps": 0}, ValueError, "steps must be a positive integer, got 0"),
    ({"steps": 2.5}, TypeError, "steps must be a positive integer, got 2.5 (float)"),
    ({"lr": 10}, ValueError, "lr=10 is far too large"),
    ({"lr": -1e-3}, ValueError, "lr must be a number > 0, got -0.001"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
    ({"seq_len": 4}, ValueError, "seq_len must be at least 8 tokens, got 4"),
    ({"seq_len": 10**7}, ValueError, "seq_len must be at most 1,000,000, got 10000000"),
    ({"live": "no"}, TypeError, "live must be True or False, got 'no' (str)"),
    ({"gradient_checkpointing": None}, TypeError, "gradient_checkpointing must be True or False, got None"),
    ({"eval_every": -1}, ValueError, "eval_every must be a non-negative integer, got -1"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive integer, got 0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be a number >= 0, got -0.1"),
]


@pytest.mark.parametrize(("kwargs", "kind", "needle"), FINETUNE_CASES, ids=lambda v: repr(v)[:40])
def test_finetune_bad_options(llama, kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.finetune(llama, **kwargs), needle, llama)
    assert isinstance(err, kind)


def test_finetune_data_directory(llama, files):
    expect_clean_error(lambda: effnb.finetune(llama, data=str(files / "folder")), "is a directory", llama)


def test_missing_data_file_never_becomes_training_text():
    from effnb.adapters.task import build_task
    from effnb.models import byte_tokenizer

    tok = byte_tokenizer()
    expect_clean_error(lambda: build_task(tok, "/home/me/my data.txt"), "data file not found")


@pytest.mark.parametrize(("kwargs", "kind", "needle"), [
    ({"check_tokens": 0}, ValueError, "check_tokens must be a positive integer, got 0"),
    ({"inplace": "yes"}, TypeError, "inplace must be True or False, got 'yes' (str)"),
    ({"adapter": "x"}, TypeError, "unknown merge option 'adapter'"),
], ids=lambda v: repr(v)[:40])
def test_merge_bad_options(llama, kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.merge(llama, **kwargs), needle, llama)
    assert isinstance(err, kind)


# --------------------------------------------------------------------------- moe (MoEConfig, MoEStatsConfig)

MOE_CASES = [
    ({"experts": 1, "top_k": 1}, ValueError, "experts must be an integer >= 2"),
    ({"experts": 10**6}, ValueError, "experts must be at most 1,024"),
    ({"experts": 4, "top_k": 5}, ValueError, "top_k=5"),
    ({"experts": 4, "top_k": 0}, ValueError, "top_k must be"),
    ({"experts": 2.0}, (ValueError, TypeError), "got 2.0"),
    ({"method": "spilt"}, ValueError, "did you mean 'split'"),
    ({"router": "random"}, ValueError, "router 'random' does not apply to method 'split'"),
    ({"calibration": "~/calib.txt"}, FileNotFoundError, "calibration file not found: '~/calib.txt'"),
    ({"measure": "no"}, TypeError, "measure must be True or False, got 'no' (str)"),
    ({"share_unchanged": "y"}, TypeError, "share_unchanged must be True or False, got 'y' (str)"),
    ({"sweep": [1, 99]}, ValueError, "sweep value must be at most experts=8, got 99"),
    ({"sweep": 3}, TypeError, "sweep must be a list of top_k values, got 3"),
    ({"quality_tokens": 1}, ValueError, "quality_tokens must be an integer >= 2, got 1"),
    ({"calibration_tokens": 10**8}, ValueError, "calibration_tokens must be at most 1,000,000, got 100000000"),
    ({"timing_repeats": 0}, ValueError, "timing_repeats must be a positive integer, got 0"),
    ({"router_std": -0.1}, ValueError, "router_std must be a number >= 0, got -0.1"),
]


@pytest.mark.parametrize(("kwargs", "kind", "needle"), MOE_CASES, ids=lambda v: repr(v)[:40])
def test_moe_bad_options(llama, kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.moe(llama, **kwargs), needle, llama)
    assert isinstance(err, kind)


@pytest.mark.parametrize(("kwargs", "kind", "needle"), [
    ({"text": "./routing-sample.txt"}, FileNotFoundError, "'./routing-sample.txt'"),
    ({"max_tokens": 0}, ValueError, "max_tokens must be a positive integer, got 0"),
    ({"window": 10**7}, ValueError, "window must be at most 1,000,000, got 10000000"),
    ({"show_tokens": -1}, ValueError, "show_tokens must be a non-negative integer, got -1"),
], ids=lambda v: repr(v)[:40])
def test_moe_stats_bad_options(kwargs, kind, needle):
    err = expect_clean_error(lambda: effnb.experts.MoEStatsConfig(**kwargs), needle)
    assert isinstance(err, kind)


# --------------------------------------------------------------------------- shared validators


def test_validators_name_the_value_and_what_is_allowed():
    cases = [
        (lambda: options.check_device("tpu"), ValueError, "unknown device 'tpu'; did you mean 'cpu'? (devices: auto, cpu, cuda, cuda:N, mps)"),
        (lambda: options.check_device("cuda:x"), ValueError, "unknown device 'cuda:x'"),
        (lambda: options.check_device(0), TypeError, "device must be a string"),
        (lambda: options.check_choice("method", "nf5", ("nf4", "int8")), ValueError,
         "method must be one of 'nf4', 'int8', got 'nf5'; did you mean 'nf4'?"),
        (lambda: options.check_int("n", 2**70, 1, 10), ValueError, "n must be at most 10, got"),
        (lambda: options.check_number("x", math.inf), ValueError, "x must be a number >= 0, got inf"),
        (lambda: options.check_bool("flag", "true"), TypeError, "flag must be True or False, got 'true' (str)"),
    ]
    for call, kind, needle in cases:
        assert isinstance(expect_clean_error(call, needle), kind)
    assert options.check_device("cuda:1") == "cuda:1" and options.check_int("n", 3) == 3


def test_text_that_is_text_is_still_text(tmp_path):
    # the path rule must not swallow real text: several lines, or no path markers
    assert data.resolve_text("def f(x):\n    return '/tmp/a.txt'").startswith("def f")
    assert data.resolve_text("a sentence that ends in notes.txt\nand goes on").endswith("goes on")
    assert data.resolve_text(["/home/me/my data.txt"]) == "/home/me/my data.txt"  # a list is always text
    f = tmp_path / "real.txt"
    f.write_text("file text")
    assert data.resolve_text(str(f)) == "file text"


# --------------------------------------------------------------------------- concurrent measurements


def _region(results, key, nbytes, started=None, hold=lambda: None):
    with PeakMemory() as peak:
        if started is not None:
            started.set()
        block = b"x" * nbytes  # written, so resident
        hold()
        del block
    results[key] = peak


class _Signal(logging.Handler):
    """Sets an event when effnb logs that a measurement waits for another thread's."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.event = threading.Event()

    def emit(self, record):
        if "another thread is measuring peak memory" in record.getMessage():
            self.event.set()


def test_concurrent_measurements_report_their_own_peaks():
    """Thread A measures a 10 MB region; thread B, started inside it, a 300 MB one. B waits for A."""
    results: dict = {}
    started = threading.Event()
    signal = _Signal()
    logger = logging.getLogger("effnb.measure.memory")
    logger.addHandler(signal)
    try:
        # A holds its region until B says it waits (at most 10 s: without the lock B never waits)
        a = threading.Thread(target=_region, args=(results, "a", 10_000_000, started, lambda: signal.event.wait(10)))
        b = threading.Thread(target=lambda: (started.wait(), _region(results, "b", 300_000_000)))
        a.start()
        b.start()
        a.join(60)
        b.join(60)
    finally:
        logger.removeHandler(signal)
    assert not a.is_alive() and not b.is_alive()
    small, big = results["a"], results["b"]
    assert signal.event.is_set() and big.waited_s > 0
    assert small.peak_bytes < 100_000_000, small.peak_bytes  # without the lock: >= 300 MB (B's memory)
    assert big.peak_bytes >= 290_000_000, big.peak_bytes
    assert not small.shared and not big.shared


def test_nested_measurement_keeps_the_outer_peak():
    with PeakMemory() as outer:
        block = b"x" * 200_000_000
        del block
        with PeakMemory() as inner:
            small = b"y" * 20_000_000
            del small
    assert outer.peak_bytes >= 190_000_000  # the inner region's reset did not erase it
    assert 15_000_000 <= inner.peak_bytes < 100_000_000


def test_overlap_after_the_longest_wait_is_marked_shared(monkeypatch):
    """A wait over MAX_WAIT_S goes ahead instead of hanging; both figures then say they are shared."""
    from effnb.measure import memory

    monkeypatch.setattr(memory, "MAX_WAIT_S", 0.0)
    results: dict = {}
    started, b_inside = threading.Event(), threading.Event()
    a = threading.Thread(target=_region, args=(results, "a", 1_000_000, started, lambda: b_inside.wait(10)))
    b = threading.Thread(target=lambda: (started.wait(), _region(results, "b", 1_000_000, b_inside)))
    a.start()
    b.start()
    a.join(60)
    b.join(60)
    assert b_inside.is_set()
    assert results["a"].shared and results["b"].shared
    assert all("shared: another measurement ran at the same time" in r.method for r in results.values())
