"""``python -m effnb.exercises [PATH] [--topic TOPIC ...]``: write the instructor's solutions notebook."""

from __future__ import annotations

import argparse
import sys

from . import TOPICS, write_solutions_notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnb.exercises",
                                     description="Write a notebook with every exercise's solution and "
                                                 "explanation (for instructors; outputs empty).")
    parser.add_argument("path", nargs="?", default="solutions.ipynb", help="notebook to write (default: %(default)s)")
    parser.add_argument("--topic", action="append", choices=TOPICS,
                        help="only this topic's exercises (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        path = write_solutions_notebook(args.path, topics=args.topic)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
