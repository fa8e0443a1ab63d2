"""``effnb`` on the command line: the same subcommands as ``%efficient``, headless.

    effnb audit smollm2-135m --json audit.json
    effnb compare tiny-llama tiny-llama --repeats 5
    effnb help quantize
"""

from __future__ import annotations

import sys

from . import commands as _commands

PROG = "effnb"


def _resolve(token: str):
    from .models import load_model

    return load_model(token)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        try:
            print(_commands.help_text(argv[1] if len(argv) > 1 else None, PROG))
        except _commands.CommandError as exc:
            print(f"effnb: {exc}", file=sys.stderr)
            return 2
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"effnb {__version__}")
        return 0
    try:
        cmd = _commands.get_command(argv[0])
        ns = _commands.parse(cmd, argv[1:], f"{PROG} {cmd.name}")
        if ns is None:
            return 0
        result = _commands.run(cmd, ns, _resolve)
        report = getattr(result, "report", result)
        if ns.json:
            report.to_json(ns.json)
        if ns.output:
            from .report import Result

            if not isinstance(result, Result):
                raise _commands.CommandError(f"-o: the {cmd.name} command makes no model to save; use --json for its report")
            import effnb

            effnb.save(result.model, ns.output)
    except _commands.CommandError as exc:
        print(f"effnb: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effnb: interrupted", file=sys.stderr)
        return 130
    if not ns.quiet:
        print(report.to_text() if hasattr(report, "to_text") else report)
        if ns.json:
            print(f"report written to {ns.json}")
        if ns.output:
            print(f"model saved to {ns.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
