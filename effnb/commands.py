"""One registry of subcommands, shared by ``%efficient`` and the ``effnb`` command line.

A command is a thin parser over one API call: its options are derived from a config dataclass
(field name -> ``--kebab-case``, type from the annotation, default from the field, ``help`` and
``choices`` from the field's metadata), so ``%efficient quantize --help`` and the API cannot drift.
No torch import here: the registry is read when ``%load_ext effnb`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Modules that register commands when imported (light: no torch at import time).
_COMMAND_MODULES = ("effnb.measure.command", "effnb.quant.command", "effnb.lora.command", "effnb.moe.command",
                    "effnb.widgets.command")


class CommandError(ValueError):
    """A user mistake in a command line: shown as one line, without a traceback."""


@dataclass
class Command:
    name: str
    summary: str
    api: str  # "module:function", called as function(model(s), **config_fields)
    config: type | None = None
    models: int | str = 1  # 1, 0, or "+" for one or more
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    examples: list[str] = field(default_factory=list)

    def function(self) -> Callable:
        module, attr = self.api.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Command] = {}
_loaded = False


def register_command(name: str, *, summary: str, api: str, config: type | None = None, models: int | str = 1,
                     extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                     examples: list[str] | None = None) -> Command:
    """Add a subcommand to ``%efficient`` and ``effnb``. See the module docstring for how options are derived."""
    if models not in (0, 1, "+"):
        raise ValueError(f"models must be 0, 1 or '+', got {models!r}")
    cmd = Command(name, summary, api, config, models, extra_args, list(examples or []))
    _REGISTRY[name] = cmd
    return cmd


def commands() -> dict[str, Command]:
    """All registered commands, by name (imports the command modules once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _COMMAND_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name is None or not module.startswith(exc.name):  # a missing dependency inside it: say so
                    raise
    return _REGISTRY


def get_command(name: str) -> Command:
    table = commands()
    if name not in table:
        close = difflib.get_close_matches(name, list(table) + ["help"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CommandError(f"unknown command {name!r}.{hint} Commands: {', '.join(sorted(table))}, help")
    return table[name]


# --------------------------------------------------------------------------- parsers


class _Parser(argparse.ArgumentParser):
    """argparse that raises CommandError instead of printing and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise CommandError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        raise _HelpShown(message or "")


class _HelpShown(Exception):
    """--help was asked for; the help text has been printed."""


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _list_type(inner):
    def parse(text: str):
        return [inner(t) for t in text.split(",") if t]

    parse.__name__ = f"comma-separated {inner.__name__}"
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """Add one ``--option`` per field of the dataclass ``config``."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("cli") is False or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        if tp is bool and not optional:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple) or (origin in (typing.Union, types.UnionType)):
            inner = next((a for a in typing.get_args(tp) if a in (int, float, str)), str)
            kwargs["type"] = _list_type(inner) if origin in (list, tuple) else str
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag, **kwargs)


def build_parser(cmd: Command, prog: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=cmd.summary, add_help=True,
                     epilog=("examples:\n  " + "\n  ".join(cmd.examples)) if cmd.examples else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if cmd.models == 1:
        parser.add_argument("model", help="a notebook variable holding a model, or an embedded name / path")
    elif cmd.models == "+":
        parser.add_argument("models", nargs="+", help="notebook variables or embedded names / paths")
    if cmd.config is not None:
        add_config_arguments(parser, cmd.config)
    if cmd.extra_args is not None:
        cmd.extra_args(parser)
    parser.add_argument("-o", "--output", metavar="NAME", help="store the result under this name")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not display the result")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    return parser


def parse(cmd: Command, argv: list[str], prog: str) -> argparse.Namespace | None:
    """Parse ``argv`` for ``cmd``; None when --help was shown."""
    try:
        return build_parser(cmd, prog).parse_args(argv)
    except _HelpShown:
        return None


_COMMON = {"model", "models", "output", "quiet", "json"}


def api_kwargs(ns: argparse.Namespace) -> dict:
    """The options given on the command line (config fields and extra arguments) as API keywords."""
    return {k: v for k, v in vars(ns).items() if k not in _COMMON}


def run(cmd: Command, ns: argparse.Namespace, resolve_model: Callable[[str], Any]) -> Any:
    """Resolve the models named in ``ns`` and make the one API call the command stands for.

    ValueError and TypeError from the API become CommandError: the front ends show them as one line.
    """
    tokens = [ns.model] if cmd.models == 1 else list(ns.models) if cmd.models == "+" else []
    try:
        models = [resolve_model(t) for t in tokens]
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc)) from exc
    fn = cmd.function()
    kwargs = api_kwargs(ns)
    params = inspect.signature(fn).parameters
    # variants are shown under the names the user typed (variable or model names)
    if cmd.models == "+" and "names" in params and "names" not in kwargs:
        kwargs["names"] = list(ns.models)
    elif cmd.models == 1 and "name" in params and "name" not in kwargs:
        kwargs["name"] = ns.model
    try:
        return fn(*models, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc


def help_text(name: str | None, prog: str) -> str:
    """Overview of the commands, or one command's full help."""
    if name:
        if name == "help":
            return f"{prog} help [COMMAND]: list the commands, or show one command's options"
        cmd = get_command(name)
        return build_parser(cmd, f"{prog} {name}").format_help()
    table = commands()
    width = max(len(n) for n in [*table, "help"])
    lines = [f"{prog} COMMAND [options]: efficiency in one line. Commands:"]
    for n in sorted(table):
        lines.append(f"  {n.ljust(width)}  {table[n].summary}")
    lines.append(f"  {'help'.ljust(width)}  this overview; '{prog} help COMMAND' for a command's options")
    return "\n".join(lines)
