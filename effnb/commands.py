"""One registry of subcommands, shared by ``%efficient`` and the ``effnb`` command line.

A command is a thin parser over one API call: its options are derived from a config dataclass
(field name -> ``--kebab-case``, type from the annotation, default from the field, ``help`` and
``choices`` from the field's metadata), so ``%efficient quantize --help`` and the API cannot drift.
No torch import here: the registry is read when ``%load_ext effnb`` runs.

Both front ends share the rules for failures: the options are checked (config ``__post_init__``)
and the output paths probed before any model is loaded (``effnb.outputs``); a model whose weights are
on the meta device is refused; any exception from the work becomes one line (``CommandError``;
``EFFNB_DEBUG=1`` shows the traceback instead); a report is written whole or not at all
(``outputs.write_json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .options import closest_match

# The packages' command modules (light: no torch at import time). Each lists its commands as data,
# ``COMMANDS = [dict(name=..., summary=..., api="module:function", ...)]`` (register_command's
# keywords), so no package below the front ends imports this module.
_COMMAND_MODULES = ("effnb.measure.command", "effnb.quant.command", "effnb.adapters.command", "effnb.experts.command",
                    "effnb.exporters.command", "effnb.widgets.command")


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
    # whether the call returns a Result with a new model (what the CLI's -o saves); None: unknown until it ran.
    # Default: False for commands over several models or none (compare, explore)
    makes_model: bool | None = None
    # an option that, when given, makes the API take the model's name or path as it is (quantize's
    # --save-to streams a checkpoint folder without ever loading it whole)
    stream_option: str | None = None

    def streams(self, ns: argparse.Namespace) -> bool:
        """Whether this call passes names through to the API instead of loaded models."""
        return bool(self.stream_option and getattr(ns, self.stream_option, None))

    def function(self) -> Callable:
        module, attr = self.api.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Command] = {}
_loaded = False


def register_command(name: str, *, summary: str, api: str, config: type | None = None, models: int | str = 1,
                     extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                     examples: list[str] | None = None, makes_model: bool | None = None,
                     stream_option: str | None = None) -> Command:
    """Add a subcommand to ``%efficient`` and ``effnb``. See the module docstring for how options are derived.

    ``makes_model``: whether the call returns a ``Result`` holding a new model (so ``effnb CMD -o DIR`` can
    refuse a command that makes none before the work); default: False unless the command takes one model.
    """
    if models not in (0, 1, "+"):
        raise ValueError(f"models must be 0, 1 or '+', got {models!r}")
    if makes_model is None and models != 1:
        makes_model = False
    cmd = Command(name, summary, api, config, models, extra_args, list(examples or []), makes_model, stream_option)
    _REGISTRY[name] = cmd
    return cmd


def commands() -> dict[str, Command]:
    """All registered commands, by name (imports the command modules once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _COMMAND_MODULES:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name is None or not module.startswith(exc.name):  # a missing dependency inside it: say so
                    raise
                continue
            for spec in getattr(mod, "COMMANDS", ()):
                spec = dict(spec)
                register_command(spec.pop("name"), **spec)
    return _REGISTRY


def get_command(name: str) -> Command:
    table = commands()
    if name not in table:
        close = closest_match(name, [*table, "help"])
        hint = f" Did you mean {close!r}?" if close else ""
        raise CommandError(f"unknown command {name!r}.{hint} Commands: {', '.join(sorted(table))}, help")
    return table[name]


def load_named_model(token: str):
    """The model a command line names when it is no variable: an embedded name, a path, a ``.gguf`` file
    or a hub id (``owner/name``) is loaded; None for any other word (the front end says why)."""
    from .models import EMBEDDED_MODELS, load_model

    if token in EMBEDDED_MODELS or "/" in token or token.endswith(".gguf"):
        return load_model(token)  # its errors become one line in run()
    return None


def undefined_name(token: str) -> str:
    """The message for a word that is neither a notebook variable nor an embedded model."""
    from .models import EMBEDDED_MODELS

    return f"name {token!r} is not defined in the notebook, and it is not an embedded model ({', '.join(EMBEDDED_MODELS)})"


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

    Every exception a user can meet (bad values, missing files, out of memory, a model whose weights
    were never loaded, a damaged file) becomes a one-line CommandError; ``EFFNB_DEBUG=1`` re-raises it.
    """
    tokens = [ns.model] if cmd.models == 1 else list(ns.models) if cmd.models == "+" else []
    if any(not t.strip() for t in tokens):
        raise CommandError("a model name is empty: give a notebook variable, an embedded name or a path")
    with one_line_errors():
        check_options(cmd, ns)  # a bad option is refused before any model is loaded
        models = [resolve_model(t) for t in tokens]
        for token, model in zip(tokens, models):
            if not isinstance(model, str):  # a name passed through: the API resolves (or streams) it
                check_loaded(model, token)
    fn = cmd.function()
    kwargs = api_kwargs(ns)
    params = inspect.signature(fn).parameters
    # variants are shown under the names the user typed (variable or model names)
    if cmd.models == "+" and "names" in params and "names" not in kwargs:
        kwargs["names"] = list(ns.models)
    elif cmd.models == 1 and "name" in params and "name" not in kwargs:
        kwargs["name"] = ns.model
    with one_line_errors():
        return fn(*models, **kwargs)


def check_options(cmd: Command, ns: argparse.Namespace) -> None:
    """Build the command's config from the options given, so that its checks run before any work."""
    if cmd.config is None or not dataclasses.is_dataclass(cmd.config):
        return
    names = {f.name for f in dataclasses.fields(cmd.config)}
    cmd.config(**{k: v for k, v in api_kwargs(ns).items() if k in names})


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def one_line_errors():
    """Turn any Exception raised inside into a one-line CommandError (KeyboardInterrupt passes through)."""
    try:
        yield
    except CommandError:
        raise
    except Exception as exc:
        if os.environ.get("EFFNB_DEBUG") == "1":
            raise  # the full traceback, for reporting a bug
        raise CommandError(user_message(exc)) from exc


_EXPECTED = (ValueError, TypeError, OSError, MemoryError)


def user_message(exc: BaseException) -> str:
    """One line for ``exc``: its message for the errors users meet, its class too for anything else."""
    text = " ".join(str(exc).split()) if str(exc).strip() else ""
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''}; free memory (del unused models) or use smaller sizes"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {os.fspath(exc.filename)!r}"
    if len(text) > 500:
        text = text[:497] + "..."
    if isinstance(exc, _EXPECTED) and text:
        return text
    return f"{type(exc).__name__}: {text or 'no message'} (EFFNB_DEBUG=1 shows the traceback)"


def check_loaded(model, label: str) -> None:
    """ValueError when ``model``'s weights are on the meta device (a skeleton whose weights were never loaded)."""
    from .models import meta_tensors

    meta = meta_tensors(model)
    if meta:
        raise ValueError(f"the model's weights are on the meta device (not loaded): {label!r} has {len(meta)} "
                         f"tensors without data, e.g. {meta[0]!r}; load its weights first (e.g. "
                         "model.to_empty(device='cpu') then load_state_dict, or effnb.load_model)")


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
