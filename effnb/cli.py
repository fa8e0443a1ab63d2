"""``effnb`` on the command line: the same subcommands as ``%efficient``, headless.

    effnb audit smollm2-135m --json audit.json
    effnb compare tiny-llama tiny-llama --repeats 5
    effnb help quantize
"""

from __future__ import annotations

import sys

from . import commands as _commands
from . import outputs

PROG = "effnb"


def _resolve(token: str):
    from .models import load_model

    return load_model(token)


def _fail(message: str, code: int = 2) -> int:
    print(f"effnb: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 with one line on stderr for any user error, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        try:
            print(_commands.help_text(argv[1] if len(argv) > 1 else None, PROG))
        except _commands.CommandError as exc:
            return _fail(str(exc))
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
        # the outputs are checked before the work: a bad path must not cost the result
        json_path = outputs.check_output_file(ns.json) if ns.json is not None else None
        if ns.output is not None and cmd.makes_model is False:
            raise _commands.CommandError(_no_model(cmd))
        out_dir = outputs.check_output_dir(ns.output) if ns.output is not None else None
        # a streaming call (quantize --save-to): the API gets the path, not a loaded model
        result = _commands.run(cmd, ns, (lambda token: token) if cmd.streams(ns) else _resolve)
    except _commands.CommandError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    report = getattr(result, "report", result)
    if not ns.quiet:
        print(report.to_text() if hasattr(report, "to_text") else report)
    try:
        if json_path:
            outputs.write_json(report, json_path)
            if not ns.quiet:
                print(f"report written to {ns.json}")
        if out_dir:
            _save(cmd, result, out_dir)
            if not ns.quiet:
                print(f"model saved to {ns.output}")
    except _commands.CommandError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted while writing the outputs", 130)
    return 0


def _no_model(cmd) -> str:
    return f"-o: the {cmd.name} command makes no model to save; use --json for its report"


def _save(cmd, result, path: str) -> None:
    from .report import Result

    if not isinstance(result, Result):
        raise _commands.CommandError(_no_model(cmd))
    from .quant.serialize import save

    with _commands.one_line_errors():
        save(result.model, path)


if __name__ == "__main__":
    sys.exit(main())
