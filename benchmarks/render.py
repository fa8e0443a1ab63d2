"""Render docs/benchmarks.md's result tables from the JSON files in benchmarks/results/.

    python benchmarks/render.py            # rewrite the tables between the page's result markers
    python benchmarks/render.py --check    # exit 1 if the page differs from what the JSON renders

The page holds one marker pair per section::

    <!-- results:cpu_decode -->
    ... generated, do not edit ...
    <!-- /results -->

and everything between a pair is replaced by the results files whose ``section`` is that name, in
``order`` (then file name) order. Prose outside the markers is left alone. A results file is one
benchmark run (one command on one device on one date) and holds, besides its figures:

- ``section``, ``order``, ``title``;
- ``status``: ``measured`` (written by the benchmark's ``--json``), ``transcribed`` (a figure measured
  earlier that existed only in the page; ``provenance`` says from which commit and how it was
  measured) or ``not measured``;
- ``device``, ``date``, ``command`` (a string, or a list for a run of several commands; with
  ``commands_per_row`` a sentence saying where the table gives them), ``versions`` (a dict),
  ``load_average``, optional ``method`` and ``notes`` (list of strings, rendered under the table);
- the figures: either ``table`` (``{"columns": [...], "rows": [[...], ...]}``, rendered as is) or the
  benchmark script's own JSON schema with ``format`` naming its formatter in ``FORMATTERS``.

Standard library only: the check runs in tests without torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
SCHEMA = "effnb.bench-result/1"
BEGIN = re.compile(r"^<!-- results:([a-z0-9_]+) -->$")
END = "<!-- /results -->"
REQUIRED = ("section", "title", "status", "device", "date", "command")
STATUSES = ("measured", "transcribed", "not measured")


class RenderError(ValueError):
    pass


# ---------------------------------------------------------------- formatters of the scripts' own JSON

def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _cpu_decode(doc: dict) -> tuple[list, list]:
    """benchmarks/cpu_decode.py --json: rows of variant, tokens_per_s, vs_fp32 (spread_s, bytes_per_token,
    bandwidth_fraction, backend_calls; columns a run did not record are left out)."""
    tokens = doc.get("tokens")
    cols = ["variant", "tok/s", "vs fp32", "fastest / slowest round (tok/s)", "MB read / token",
            "% of bandwidth limit", "kernel path"]
    rows = []
    for r in doc["rows"]:
        spread = ""  # spread_s: [fastest, slowest] seconds; a transcribed run may give tok/s per round instead
        if r.get("spread_s") and tokens:
            spread = f"{tokens / r['spread_s'][0]:.1f} / {tokens / r['spread_s'][1]:.1f}"
        elif r.get("rounds_tokens_per_s"):
            spread = f"{max(r['rounds_tokens_per_s']):.1f} / {min(r['rounds_tokens_per_s']):.1f}"
        calls = r.get("backend_calls") or ""
        if isinstance(calls, dict):
            calls = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        per_token = r.get("bytes_per_token")
        rows.append([r["variant"], _num(r["tokens_per_s"], ".1f"), _num(r["vs_fp32"], ".2f"), spread,
                     _num(per_token / 1e6 if per_token else None, ".1f"), _num(r.get("bandwidth_fraction"), ".0%"),
                     calls])
    return cols, rows


def _quantize_quality(doc: dict) -> tuple[list, list]:
    """benchmarks/quantize_quality.py --json: rows of model, variant, perplexity or cosine/top5, quantize_s."""
    cols = ["model", "variant", "perplexity", "vs fp32", "cosine", "top-5 agreement", "quantize s"]
    base = {r["model"]: r for r in doc["rows"] if r["variant"] == "fp32"}
    rows = []
    for r in doc["rows"]:
        ppl = r.get("perplexity")
        ref = base.get(r["model"], {}).get("perplexity")
        vs = "" if ppl is None or not ref or r["variant"] == "fp32" else f"{(ppl / ref - 1) * 100:+.1f}%"
        rows.append([r["model"], r["variant"], _num(ppl, ".3f"), vs, _num(r.get("cosine"), ".5f"),
                     _num(r.get("top5"), ".4f"), "" if r["variant"] == "fp32" else _num(r.get("quantize_s"), ".1f")])
    return cols, rows


def _quantize_time(doc: dict) -> tuple[list, list]:
    """benchmarks/quantize_time.py --json: rows of method and the seconds of every repeat."""
    cols = ["method", "median s", "repeats (s)"]
    rows = []
    for r in doc["rows"]:
        ts = sorted(r["seconds"])
        rows.append([r["method"], f"{ts[len(ts) // 2]:.2f}", ", ".join(f"{t:.2f}" for t in ts)])
    return cols, rows


def _import_time(doc: dict) -> tuple[list, list]:
    """benchmarks/import_time.py --json: rows of case, wall_s (median), inner_s (in-process, or null)."""
    cols = ["case", "wall s (fresh interpreter, median)", "in-process s"]
    rows = [[r["case"], f"{r['wall_s']:.3f}", _num(r.get("inner_s"), ".3f")] for r in doc["rows"]]
    rows.append(["heavy libraries loaded by `import effnb` + magics", ", ".join(doc.get("heavy", [])) or "none", ""])
    return cols, rows


FORMATTERS = {"cpu_decode": _cpu_decode, "quantize_quality": _quantize_quality, "quantize_time": _quantize_time,
              "import_time": _import_time}


# ---------------------------------------------------------------- rendering

def _cell(x) -> str:
    s = "" if x is None else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def table(columns: list, rows: list) -> list[str]:
    out = ["| " + " | ".join(_cell(c) for c in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        if len(r) != len(columns):
            raise RenderError(f"row {r!r} has {len(r)} cells for {len(columns)} columns")
        out.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return out


def drop_empty_columns(columns: list, rows: list) -> tuple[list, list]:
    """A formatter's table without the columns no row fills (e.g. the kernel path of a transcribed run)."""
    keep = [i for i in range(len(columns)) if any(r[i] not in ("", None) for r in rows)]
    return [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]


def check_doc(doc: dict, name: str) -> None:
    missing = [k for k in REQUIRED if not doc.get(k)]
    if missing:
        raise RenderError(f"{name}: missing {', '.join(missing)}")
    if doc.get("schema") != SCHEMA:
        raise RenderError(f"{name}: schema must be {SCHEMA!r}")
    if doc["status"] not in STATUSES:
        raise RenderError(f"{name}: status must be one of {', '.join(STATUSES)}")
    if doc["status"] == "transcribed" and not doc.get("provenance"):
        raise RenderError(f"{name}: a transcribed result needs its provenance")
    if "table" not in doc and doc.get("format") not in FORMATTERS and doc["status"] != "not measured":
        raise RenderError(f"{name}: needs a table or a format among {', '.join(FORMATTERS)}")


def render_doc(doc: dict, name: str) -> list[str]:
    """The page text of one results file: a heading line, where and how, the table, the notes."""
    check_doc(doc, name)
    versions = ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
    status = doc["status"]
    if status == "not measured":
        where = f"**Not measured** ({doc['date']}): {doc['device']}."
    else:
        where = f"Measured {doc['date']}; {doc['device']}"
        where += f"; {versions}" if versions else ""
        where += f"; load average {doc['load_average']}." if doc.get("load_average") else "."
        if status == "transcribed":
            where += f" Transcribed from an earlier page: provenance in `benchmarks/results/{name}`."
    commands = doc["command"] if isinstance(doc["command"], list) else [doc["command"]]
    if doc.get("commands_per_row"):
        command = f"Commands: {commands[0]}."
    else:
        command = ("Command: " if len(commands) == 1 else "Commands: ") + "; ".join(f"`{c}`" for c in commands) + "."
    lines = [f"**{doc['title']}**", where, command]
    if doc.get("method"):
        lines.append(doc["method"])
    lines.append("")
    if "table" in doc:
        lines += table(doc["table"]["columns"], doc["table"]["rows"])
        lines.append("")
    elif doc.get("format") in FORMATTERS:
        lines += table(*drop_empty_columns(*FORMATTERS[doc["format"]](doc)))
        lines.append("")
    for note in doc.get("notes", []):
        lines += [note, ""]
    return lines


def load_results(folder: Path = RESULTS) -> dict[str, list[tuple[str, dict]]]:
    by_section: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RenderError(f"{path.name}: not JSON ({e})") from None
        check_doc(doc, path.name)
        by_section.setdefault(doc["section"], []).append((path.name, doc))
    for docs in by_section.values():
        docs.sort(key=lambda nd: (nd[1].get("order", 0), nd[0]))
    return by_section


def render_page(text: str, by_section: dict[str, list[tuple[str, dict]]]) -> str:
    """``text`` with every marker pair's content replaced by its section's results."""
    out, lines, i, seen = [], text.split("\n"), 0, set()
    while i < len(lines):
        m = BEGIN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        section = m.group(1)
        if section in seen:
            raise RenderError(f"section {section!r} has two markers")
        seen.add(section)
        while i < len(lines) and lines[i] != END:
            if BEGIN.match(lines[i]):
                raise RenderError(f"section {section!r}: marker not closed with {END}")
            i += 1
        if i == len(lines):
            raise RenderError(f"section {section!r}: marker not closed with {END}")
        if section not in by_section:
            raise RenderError(f"section {section!r}: no results file names it")
        body = []
        for name, doc in by_section[section]:
            body += render_doc(doc, name)
        out += body[:-1] if body and body[-1] == "" else body
        out.append(END)
        i += 1
    orphans = sorted(set(by_section) - seen)
    if orphans:
        raise RenderError(f"results for sections with no marker in the page: {', '.join(orphans)}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from what the JSON renders")
    ap.add_argument("--page", default=str(PAGE))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    page = Path(args.page)
    try:
        old = page.read_text()
        new = render_page(old, load_results(Path(args.results)))
    except RenderError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       str(page), "rendered from " + args.results))
            print(f"render.py: {page} differs from benchmarks/results (run python benchmarks/render.py)",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        page.write_text(new)
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
