"""How long a QuantExplorer slider change takes (Python side: recompute + redraw of the live view).

    python -m effnb.widgets._latency [--model minilm-l6] [--repeats 7]

Prints, per layer shape, the median and the worst of ``repeats`` bits-slider changes after one
warm-up, with the load average (the figure in docs/benchmarks.md comes from this command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    from ..models import load_model
    from .quant import QuantExplorer

    model = load_model(args.model)
    qx = QuantExplorer(model, method="int", bits=4, group_size=64)
    qx.widget  # noqa: B018 - time the live view's redraw too
    shapes = {}
    for name, m in qx.layers.items():
        shapes.setdefault(tuple(m.weight.shape), name)
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for shape, name in sorted(shapes.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        qx.set(layer=name)
        qx._w_bits.value = 3  # warm-up
        times = []
        for i in range(args.repeats):
            bits = (5, 4, 6, 3, 2, 7, 8)[i % 7]
            t0 = time.perf_counter()
            qx._w_bits.value = bits
            times.append(time.perf_counter() - t0)
        print(f"{name} {shape[0]}x{shape[1]}: median {statistics.median(times) * 1e3:.0f} ms, "
              f"worst {max(times) * 1e3:.0f} ms over {args.repeats} slider changes")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
