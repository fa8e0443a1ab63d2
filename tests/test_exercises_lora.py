"""LoRA exercises: a correct answer passes; the usual mistakes get a helpful message."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from effnb import exercises  # noqa: E402


def _verdict(capsys, key, answer, **ctx):
    ok = exercises.check(key, answer, **ctx)
    return ok, capsys.readouterr().out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    import effnb

    return effnb.load_model("tiny-llama")


def test_lora_exercises_are_registered():
    assert exercises.list_exercises("lora") == ["lora.adapter_bytes", "lora.merge", "lora.trainable"]


def test_trainable(capsys, llama):
    import effnb

    rank = 4
    right = effnb.lora(llama, rank=rank, targets="attn").details["trainable_parameters"]
    ok, _ = _verdict(capsys, "lora.trainable", right, model=llama, rank=rank)
    assert ok
    layers = [m for n, m in llama.named_modules() if n.endswith(("q_proj", "v_proj"))]
    for wrong, text in [(sum(rank * m.in_features for m in layers), "only one of the two matrices"),
                        (sum(m.in_features * m.out_features for m in layers), "frozen weights"),
                        (right + 1, "is not the count"),
                        ("many", "should be a number")]:
        ok, out = _verdict(capsys, "lora.trainable", wrong, model=llama, rank=rank)
        assert not ok and text in out, (wrong, out)


def test_adapter_bytes(capsys):
    assert _verdict(capsys, "lora.adapter_bytes", 4000, trainable=1000)[0]
    for wrong, text in [(2000, "fp16"), (1000, "not bytes"), (32000, "bits"),
                        (5000, "count the bytes of one fp32 number and multiply")]:
        ok, out = _verdict(capsys, "lora.adapter_bytes", wrong, trainable=1000)
        assert not ok and text in out, (wrong, out)
    ok, out = _verdict(capsys, "lora.adapter_bytes", 4100, trainable=1000, file_bytes=4100)
    assert not ok and "file size measured on disk" in out


def test_merge(capsys, llama):
    import effnb

    model = effnb.lora(llama, rank=2, alpha=8, targets="attn").model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    w = layer.base_layer.weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    assert s == 4
    assert _verdict(capsys, "lora.merge", w + s * (b @ a), layer=layer)[0]
    for wrong, text in [(w + b @ a, "scaling is missing"), (w, "base weight unchanged"),
                        (s * (b @ a), "only the update"), (w[:, :-1], "differs from the weight's"),
                        (w - s * (b @ a), "the update is subtracted"),
                        (w + s * (b @ a) + 1, "largest difference 1"),
                        ([1, 2], "should be a tensor")]:
        ok, out = _verdict(capsys, "lora.merge", wrong, layer=layer)
        assert not ok and text in out, (out,)
    # the instructor's solutions, in notebook 03's names, pass the checks
    exercises.show_solutions(True)
    try:
        ns = {"W": w, "A": a, "B": b, "scaling": s}
        exec(exercises.solution("lora.merge"), ns)
        assert exercises.check("lora.merge", ns["answer"], layer=layer)
        ns = {"model": llama, "RANK": 4}
        exec(exercises.solution("lora.trainable"), ns)
        assert exercises.check("lora.trainable", ns["answer"], model=llama, rank=4)
        ns = {"trainable": 1000}
        exec(exercises.solution("lora.adapter_bytes"), ns)
        assert exercises.check("lora.adapter_bytes", ns["answer"], trainable=1000, file_bytes=4100)
    finally:
        exercises.show_solutions(False)
