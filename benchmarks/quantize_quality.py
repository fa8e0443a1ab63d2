"""Quality and quantization time of effnb's methods beside bitsandbytes and torch dynamic int8, in one run.

    python benchmarks/quantize_quality.py [--models smollm2,minilm] [--methods ...] [--json out.json]

SmolLM2-135M: perplexity on effnb's evaluation text (4,096 tokens, 512-token windows), all Linear
layers but lm_head quantized. MiniLM-L6: cosine to the fp32 embeddings and share of each
sentence's 5 nearest neighbours kept, over effnb's docstring lines; all Linear layers quantized.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

EFFNB = {  # label -> effnb.quantize options
    "effnb int8 g64": {"method": "int8", "group_size": 64},
    "effnb int8 per-channel": {"method": "int8", "group_size": 0},
    "effnb int4 g64 (rtn)": {"method": "int4", "group_size": 64},
    "effnb nf4 g64": {"method": "nf4", "group_size": 64},
    "effnb fp4 g64": {"method": "fp4", "group_size": 64},
    "effnb hqq g64": {"method": "hqq", "group_size": 64},
    "effnb gptq g64": {"method": "gptq", "group_size": 64},
    "effnb fp8": {"method": "fp8", "group_size": 0},
}
PEERS = ("bnb nf4 b64", "bnb fp4 b64", "bnb int8", "torch dynamic int8")


def variants(model, keep_head: bool, only):
    from _peers import bnb_model, torch_dynamic_int8

    import effnb

    keep = ("lm_head",) if keep_head else ()
    for label, opts in EFFNB.items():
        if only and not any(o in label for o in only):
            continue
        t = time.perf_counter()
        res = effnb.quantize(model, **opts, measure=False, quantize_lm_head=not keep_head)
        yield label, res.model, time.perf_counter() - t
    for label in PEERS:
        if only and not any(o in label for o in only):
            continue
        t = time.perf_counter()
        if label.startswith("bnb"):
            q = bnb_model(model, label.split()[1], 64, keep)
        else:
            q = torch_dynamic_int8(model)
        yield label, q, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant labels")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-times", action="store_true", help="leave the quantize times out of the printed lines "
                    "and the JSON, so two trees' outputs can be compared with diff (the other figures are "
                    "deterministic)")
    args = ap.parse_args(argv)
    import torch
    from _results import envelope, finish

    import effnb
    from effnb.measure.quality import embed, embedding_agreement, perplexity

    torch.manual_seed(0)
    only = [o for o in args.only.split(",") if o]
    out = {**envelope("quantize_quality", "Quality after quantization", "quantize_quality"),
           "threads": torch.get_num_threads(), "rows": []}
    for mname in args.models.split(","):
        if mname == "smollm2":
            model = effnb.load_model("smollm2-135m")
            tok = effnb.tokenizer_for(model)

            def score(m):
                return {"perplexity": perplexity(m, None, max_tokens=args.tokens, window=512, tokenizer=tok)}  # noqa: B023 - used within the iteration
        else:
            model = effnb.load_model("minilm-l6")
            tok = effnb.tokenizer_for(model)
            sentences = [doc for _, doc in effnb.data.doc_pairs()]
            ref = embed(model, sentences, tokenizer=tok)

            def score(m):
                a = embedding_agreement(ref, embed(m, sentences, tokenizer=tok))  # noqa: B023
                return {"cosine": a["cosine"], "top5": a["top5_agreement"],
}
        base = score(model)
        print(f"\n## {mname}  ({'ppl' if mname == 'smollm2' else 'cosine / top-5'})", flush=True)
        print(f"{'fp32':28s} {base}", flush=True)
        out["rows"].append({"model": mname, "variant": "fp32", **base, **({} if args.no_times else {"quantize_s": 0.0})})
        for label, q, secs in variants(model, keep_head=(mname == "smollm2"), only=only):
            s = score(q)
            took = "" if args.no_times else f"  quantize {secs:.2f} s"
            print(f"{label:28s} {json.dumps({k: v for k, v in s.items() if k != 'raw'})}{took}", flush=True)
            out["rows"].append({"model": mname, "variant": label, **s, **({} if args.no_times else {"quantize_s": secs})})
            del q
    if args.json:
        out = {"rows": out["rows"]} if args.no_times else finish(out)  # --no-times: the same bytes from any tree
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
