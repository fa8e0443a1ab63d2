"""Widget state and callbacks in pure Python (no browser): what each view shows, bad input, speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from effnb.testing import QUICK


@pytest.fixture(scope="module")
def tiny_mixtral():
    import effnb

    return effnb.load_model("tiny-mixtral")


def _plotly_data(bundle: dict) -> list:
    return bundle["application/vnd.plotly.v1+json"]["data"]


# --------------------------------------------------------------------------- import cost


def test_widget_modules_import_no_heavy_libraries():
    code = ("import sys, effnb.widgets, effnb.widgets.command, effnb.commands as c; c.commands();"
            "print([m for m in ('torch', 'plotly', 'ipywidgets', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- QuantExplorer


def test_quant_explorer_numbers_follow_the_settings(tiny_llama):
    import effnb
    from effnb.widgets import QuantExplorer

    before = effnb.state_hash(tiny_llama)
    qx = QuantExplorer(tiny_llama, method="int", bits=4, group_size=32)
    layer = qx.layer
    k = qx.stats["shape"][1]
    assert qx.stats["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # codes + fp16 scale and zero per 32
    snrs = [qx.set(bits=b)["snr_db"] for b in range(2, 9)]
    assert all(b > a + 3 for a, b in zip(snrs, snrs[1:])), snrs  # each extra bit buys about 6 dB
    assert qx.set(method="nf4", group_size=64)["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    assert qx.stats["bits"] == 4
    assert qx.set(method="int8", group_size=0)["bits_per_weight"] == pytest.approx(8 + 16 / k)
    assert qx.stats["layer_bytes"] / qx.stats["layer_bytes_after"] == pytest.approx(32 / (8 + 16 / k))
    # the preview is what effnb.quantize does to that layer
    qx.set(method="int4", group_size=32)
    res = qx.apply(measure=False)
    applied = next(s for s in res.details["layers"] if s["name"] == layer)
    assert qx.stats["snr_db"] == pytest.approx(applied["snr_db"], abs=1e-6)
    assert effnb.state_hash(tiny_llama) == before  # never changes the user's model


def test_quant_explorer_bad_settings(tiny_llama):
    import torch

    from effnb.widgets import QuantExplorer

    qx = QuantExplorer(tiny_llama, group_size=32)
    with pytest.raises(ValueError, match="unknown method 'nf5' \\(methods: int, int4"):
        qx.set(method="nf5")
    with pytest.raises(ValueError, match="method 'nf4' has 4 bits, not 3"):
        qx.set(method="nf4", bits=3)
    with pytest.raises(ValueError, match="no Linear layer named 'nope'"):
        qx.set(layer="nope")
    with pytest.raises(ValueError, match="preview only"):
        qx.set(method="int", bits=3)
        qx.apply()
    with pytest.raises(ValueError, match="^QuantExplorer: Sequential has no nn.Linear or Conv1D layers to quantize$"):
        QuantExplorer(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Embedding(4, 4)))
    with pytest.raises(TypeError, match="expected a torch.nn.Module model, got str"):
        QuantExplorer("smollm2")


def test_quant_explorer_group_size_that_does_not_divide_is_shown_not_raised():
    import torch

    from effnb.widgets import QuantExplorer

    model = torch.nn.Sequential(torch.nn.Linear(96, 8))
    qx = QuantExplorer(model, group_size=32)
    stats = qx.set(group_size=64)
    assert stats["snr_db"] is None and "group size 64 does not divide this layer's 96 input features" in stats["error"]
    assert "does not divide" in qx.static_bundle()["text/html"]


def test_quant_explorer_slider_callback_updates_the_view(tiny_llama):
    from effnb.widgets import QuantExplorer

    qx = QuantExplorer(tiny_llama, method="int", bits=4, group_size=32)
    box = qx.widget
    assert "effnb-quant" in box._dom_classes
    snr4 = qx.stats["snr_db"]
    qx._w_bits.value = 6  # what the browser's slider sends
    assert qx.stats["bits"] == 6 and qx.stats["snr_db"] > snr4 + 6
    assert "6-bit" in qx._w_summary.value and f"{qx.stats['snr_db']:.2f} dB" in qx._w_summary.value
    assert f"SNR {qx.stats['snr_db']:.1f} dB" in qx._fig.layout.title.text
    assert qx._w_apply.disabled and qx.quantize_config() is None  # 6-bit: a preview only
    qx._w_method.value = "nf4"
    assert qx._w_bits.disabled and qx._w_bits.value == 4 and not qx._w_apply.disabled
    qx._w_group.value = 128
    assert qx.stats["group_size"] == 128
    grid = [x for x in qx._fig.data[1].x if x is not None]
    assert 15 <= len(set(grid)) <= 16  # NF4: 16 levels (those within the weights' range are drawn)


def test_quant_explorer_slider_within_one_second_on_minilm(minilm):
    from effnb.widgets import QuantExplorer

    qx = QuantExplorer(minilm, method="int", bits=4, group_size=64)
    qx.widget  # noqa: B018 - the live view is updated too
    qx.set(layer="encoder.layer.0.intermediate.dense")  # the largest layers: 1536 x 384
    times = []
    for bits in (3, 5, 4, 6, 2):
        t0 = time.perf_counter()
        qx._w_bits.value = bits
        times.append(time.perf_counter() - t0)
        assert qx.stats["bits"] == bits and qx.stats["snr_db"] is not None
    times.sort()
    assert times[len(times) // 2] < 1.0, f"slider update took {times} s (median must be < 1 s)"
    assert times[-1] < 2.0, times


# --------------------------------------------------------------------------- LoraExplorer


def test_lora_explorer_counts_match_effnb_lora(tiny_llama):
    import effnb
    from effnb.adapters.api import lora
    from effnb.widgets import LoraExplorer

    before = effnb.state_hash(tiny_llama)
    lx = LoraExplorer(tiny_llama, rank=8, targets="attn")
    opts = {"rank": 4, "targets": "all", "dora": True}
    stats = lx.set(**opts)
    assert stats["trainable_parameters"] == lora(tiny_llama, **opts).details["trainable_parameters"]
    # rank 8 on q (64 in, 64 out) and v (64 in, 32 out: grouped-query attention) of 2 layers
    assert lx.set(rank=8, targets="attn", dora=False)["trainable_parameters"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert effnb.state_hash(tiny_llama) == before
    mem = {b["variant"]: b["total_bytes"] for b in lx.stats["memory"]}
    assert mem["QLoRA (nf4 base, blocksize 64)"] < mem["LoRA (fp32 base)"] < mem["full fine-tuning (fp32)"]
    lx.widget  # noqa: B018
    lx._w_rank.value = 16
    assert lx.stats["rank"] == 16 and f"{lx.stats['trainable_parameters']:,}" in lx._w_summary.value
    lx._w_plus.value = True
    assert lx.lora_options()["plus_ratio"] == 16.0


def test_lora_explorer_bad_input():
    import torch

    from effnb.widgets import LoraExplorer

    with pytest.raises(ValueError, match="^LoraExplorer: Sequential has no nn.Linear layers an adapter can sit on$"):
        LoraExplorer(torch.nn.Sequential(torch.nn.ReLU()))


# --------------------------------------------------------------------------- RouterExplorer


def test_router_explorer_on_a_mixtral_style_model(tiny_mixtral):
    from effnb.widgets import RouterExplorer

    rx = RouterExplorer(tiny_mixtral, "def add(a, b):\n    return a + b\n")
    z = _plotly_data(rx.static_bundle())[0]["z"]
    assert len(z) == len(rx.stats.layers) == 2 and all(sum(row) == pytest.approx(1.0) for row in z)
    spans = rx.coloured_text_html().count("class='effnb-token'")
    assert spans == len(rx.stats.tokens) > 0
    rx.widget  # noqa: B018
    rx._w_layer.value = 1
    assert rx.layer == 1 and rx.stats.layers[1]["layer"] in rx._w_tokens.value
    rx.set(text="hello world")
    assert rx.text == "hello world" and "the given text" in rx.stats.text_note
    assert "".join(rx.stats.tokens).strip().endswith("hello world")
    with pytest.raises(ValueError, match="layer must be 0..1"):
        rx.set(layer=5)


def test_router_explorer_refuses_a_dense_model_in_one_line(tiny_llama):
    from effnb.widgets import RouterExplorer

    with pytest.raises(ValueError) as err:
        RouterExplorer(tiny_llama)
    msg = str(err.value)
    assert msg.startswith("RouterExplorer needs a Mixture-of-Experts model: LlamaForCausalLM has no MoE routers")
    assert "\n" not in msg


# --------------------------------------------------------------------------- CompareDashboard


def _report(rows):
    from effnb.report import Report

    full = []
    for name, wbytes, ppl, speed in rows:
        full.append({"name": name, "parameters": 100, "trainable_parameters": 0, "weight_bytes": wbytes,
                     "weight_bytes_by_dtype": {}, "peak_memory_bytes": wbytes * 2, "prefill_ms": 1.0,
                     "decode_tokens_per_s": speed, "flops_per_token": None,
                     "quality": {"metric": "perplexity", "value": ppl, "higher_is_better": False},
                     "energy": {"joules_per_token": None, "method": "not measured"}, "extra": {}})
    return Report(full, {"device": "cpu"})


def test_compare_dashboard_pareto_sort_export(tmp_path):
    from effnb.widgets import CompareDashboard

    rep1 = _report([("fp32", 400e6, 10.7, 30.0), ("int8", 200e6, 10.8, 45.0)])
    rep2 = _report([("nf4", 120e6, 13.8, 16.0), ("int4-bad", 130e6, 14.3, 20.0), ("int3", 90e6, 113.7, 25.0)])
    dash = CompareDashboard([rep1, rep2])
    assert dash.pareto() == ["fp32", "int8", "nf4", "int3"]  # int4-bad: more memory and worse than nf4
    assert [r[0] for r in dash.sort("weight MB").table_rows()] == ["int3", "nf4", "int4-bad", "int8", "fp32"]
    assert [r[0] for r in dash.sort("speed", ascending=False).table_rows()][0] == "int8"
    with pytest.raises(ValueError, match="cannot sort by 'colour'"):
        dash.sort("colour")
    bundle = dash.static_bundle()
    front, points = _plotly_data(bundle)
    assert front["x"] == [90.0, 120.0, 200.0, 400.0] and len(points["x"]) == 5
    d = json.loads(dash.to_json(str(tmp_path / "c.json")))
    assert d["pareto_front"] == dash.pareto() and len(d["reports"]) == 2
    assert json.loads((tmp_path / "c.json").read_text()) == d
    # the export buttons of the live view
    dash.widget  # noqa: B018
    dash._path.value = str(tmp_path / "out")
    dash._export_html.click()
    page = (tmp_path / "out.html").read_text()
    assert "effnb-compare-table" in page and "int4-bad" in page and "written to" in dash._status.value
    dash._order.value = False  # ascending
    dash._sort.value = "quality"
    assert dash._table.value.index("fp32") < dash._table.value.index("int3")
    dash._axis.value = "peak memory (MB)"
    assert dash._fig.layout.xaxis.title.text == "peak memory (MB)"


def test_compare_dashboard_bad_input(tiny_llama):
    from effnb.widgets import CompareDashboard

    with pytest.raises(ValueError, match="^CompareDashboard needs at least one report; got an empty list"):
        CompareDashboard([])
    with pytest.raises(TypeError, match="item 0 is a LlamaForCausalLM, not a Report"):
        CompareDashboard([tiny_llama])


def test_compare_dashboard_takes_results_and_report_dicts(tiny_llama):
    import effnb
    from effnb.report import Result
    from effnb.widgets import CompareDashboard

    qmodel = effnb.quantize(tiny_llama, method="int8", group_size=32, measure=False).model
    rep = effnb.compare(tiny_llama, qmodel, names=["fp32", "int8"], **QUICK)
    dash = CompareDashboard([Result(qmodel, rep), rep.to_dict()])
    assert [r["name"] for r in dash.rows] == ["fp32", "int8", "fp32 (2)", "int8 (2)"]
    assert dash.metric == "perplexity" and not dash.higher_is_better
    assert dash.rows[1]["weight_bytes"] < dash.rows[0]["weight_bytes"]


# --------------------------------------------------------------------------- TrainingMonitor


def test_training_monitor_headless():
    from effnb.widgets import TrainingMonitor

    with TrainingMonitor("run", total_steps=10) as mon:
        for step in range(10):
            mon.update(step, loss=2.0 - 0.1 * step, lr=1e-3)
            if step % 5 == 4:
                mon.update(step, eval_loss=2.5 - 0.1 * step)
    assert mon.closed and mon.history["step"] == list(range(10)) and mon.history["eval_step"] == [4, 9]
    assert mon.summary()["loss"] == {"first": 2.0, "last": pytest.approx(1.1), "lowest": pytest.approx(1.1)}
    mon.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        mon.update(11, loss=1.0)
    data = _plotly_data(mon.static_bundle())
    assert data[0]["y"][-1] == pytest.approx(1.1) and len(data[1]["x"]) == 2
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        TrainingMonitor(total_steps=0)


def test_training_monitor_live_view(monkeypatch):
    import effnb.adapters.monitor as training
    import effnb.display as base
    from effnb.widgets import TrainingMonitor

    shown = []
    monkeypatch.setattr(training, "in_kernel", lambda: True)
    monkeypatch.setattr(base, "in_kernel", lambda: True)

    class Handle:
        def update(self, bundle, raw=False):
            shown.append(("update", bundle))

    def fake_display(bundle, raw=False, display_id=False):
        shown.append(("display", bundle))
        return Handle()

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", fake_display)
    mon = TrainingMonitor("live", total_steps=5, min_interval_s=0.0)
    for step in range(5):
        mon.update(step, loss=1.0 / (step + 1))
    mon.close()
    assert shown[0][0] == "display" and "application/vnd.jupyter.widget-view+json" in shown[0][1]
    assert list(mon._fig.data[0].y) == [1.0, 0.5, 1 / 3, 0.25, 0.2] and mon._bar.value == 5
    final = shown[-1]
    assert final[0] == "update" and _plotly_data(final[1])[0]["y"][-1] == pytest.approx(0.2)


# --------------------------------------------------------------------------- static views, magic


def test_every_widget_has_a_static_view(tiny_llama, tiny_mixtral):
    from effnb.widgets import LoraExplorer, QuantExplorer, RouterExplorer

    for w in (QuantExplorer(tiny_llama, group_size=32), LoraExplorer(tiny_llama), RouterExplorer(tiny_mixtral)):
        bundle = w._repr_mimebundle_()
        assert "effnb-widget-static" in bundle["text/html"] and _plotly_data(bundle), type(w).__name__
        assert "application/vnd.jupyter.widget-view+json" not in bundle  # headless: nothing to break
        live = w.live_bundle()
        assert live["application/vnd.jupyter.widget-view+json"]["model_id"] == w.widget.model_id
        assert live["text/html"] == bundle["text/html"]  # the fallback travels with the live view


def test_explore_magic(ip, tiny_llama):
    from IPython.core.error import UsageError

    from effnb.widgets import QuantExplorer

    ip.user_ns["model"] = tiny_llama
    ip.run_line_magic("efficient", "explore quant model --method nf4 -q -o qx")
    assert isinstance(ip.user_ns["qx"], QuantExplorer) and ip.user_ns["qx"].method == "nf4"
    ip.run_line_magic("efficient", "explore lora model --rank 4 -q -o lx")
    assert ip.user_ns["lx"].rank == 4
    ip.user_ns["rep"] = _report([("fp32", 400e6, 10.7, 30.0), ("int8", 200e6, 10.8, 45.0)])
    ip.run_line_magic("efficient", "explore compare rep rep -q -o dash")
    assert len(ip.user_ns["dash"].rows) == 4 and ip.user_ns["dash"].pareto()[:2] == ["fp32", "int8"]
    with pytest.raises(UsageError, match="RouterExplorer needs a Mixture-of-Experts model"):
        ip.run_line_magic("efficient", "explore router model -q")
    with pytest.raises(UsageError, match="invalid choice: 'quantum'"):
        ip.run_line_magic("efficient", "explore quantum model")
    with pytest.raises(UsageError, match="'nomodel' is not defined in the notebook"):
        ip.run_line_magic("efficient", "explore quant nomodel")
