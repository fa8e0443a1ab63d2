"""One registry of subcommands, shared by ``%efficient`` and the ``effnb`` command line.

A command is a thin parser over one API call: its options are derived from a config dataclass
(field name -> ``--kebab-case``, type from the annotation, default from the field, ``help`` and
``choices`` from the field's metadata), so ``%efficient quantize --help`` and the API cannot drift.
No torch import here: the registry is read when ``%load_ext effnb`` runs.

Both front ends share the rules for failures: the options are checked (config ``__post_init__``)
and the output paths probed before any model is loaded; a model whose weights are on the meta
device is refused; any exception from the work becomes one line (``CommandError``; ``EFFNB_DEBUG=1``
shows the traceback instead); a report is written whole or not at all (``write_json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import itertools
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Modules that register commands when imported (light: no torch at import time).
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

    def function(self) -> Callable:
        module, attr = self.api.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Command] = {}
_loaded = False


def register_command(name: str, *, summary: str, api: str, config: type | None = None, models: int | str = 1,
                     extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                     examples: list[str] | None = None, makes_model: bool | None = None) -> Command:
    """Add a subcommand to ``%efficient`` and ``effnb``. See the module docstring for how options are derived.

    ``makes_model``: whether the call returns a ``Result`` holding a new model (so ``effnb CMD -o DIR`` can
    refuse a command that makes none before the work); default: False unless the command takes one model.
    """
    if models not in (0, 1, "+"):
        raise ValueError(f"models must be 0, 1 or '+', got {models!r}")
    if makes_model is None and models != 1:
        makes_model = False
    cmd = Command(name, summary, api, config, models, extra_args, list(examples or []), makes_model)
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


# --------------------------------------------------------------------------- errors and outputs


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
    named = getattr(model, "named_parameters", None)
    if not callable(named):
        return
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = [name for name, t in tensors if getattr(t, "is_meta", False)]
    if meta:
        raise ValueError(f"the model's weights are on the meta device (not loaded): {label!r} has {len(meta)} "
                         f"tensors without data, e.g. {meta[0]!r}; load its weights first (e.g. "
                         "model.to_empty(device='cpu') then load_state_dict, or effnb.load_model)")


def _probe_file(path: str) -> None:
    """Open ``path`` for writing without changing it (an existing file keeps its bytes, a new one is removed)."""
    if os.path.lexists(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        try:
            os.write(fd, b"")  # /dev/full refuses even this
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(path)


def check_output_file(path: str, option: str = "--json") -> str:
    """Check before any work that ``path`` can be written; returns it with ``~`` expanded."""
    full = os.path.expanduser(path)
    if not full.strip():
        raise CommandError(f"{option} needs a file path, got {path!r}")
    if os.path.isdir(full):
        raise CommandError(f"{option} {path}: is a directory; give a file path such as {os.path.join(path, 'report.json')}")
    parent = os.path.dirname(os.path.abspath(full))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise CommandError(f"{option} {path}: the folder {parent} {what}")
    try:
        _probe_file(full)
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    return full


def check_output_dir(path: str, option: str = "-o") -> str:
    """Check before any work that the directory ``path`` can be created or written into."""
    full = os.path.expanduser(path)
    if not full.strip():
        raise CommandError(f"{option} needs a directory path, got {path!r}")
    existing = os.path.abspath(full)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(full) else f" ({existing})"
        raise CommandError(f"{option} {path}: not a directory{where}; give a directory path for the checkpoint")
    try:
        fd, probe = tempfile.mkstemp(prefix=".effnb-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot write into {existing} ({exc.strerror or exc})") from None
    return full


def write_json(report, path: str, option: str = "--json") -> None:
    """Write ``report.to_json()`` to ``path``: a regular file is replaced whole (never left half-written)."""
    if not hasattr(report, "to_json"):
        raise CommandError(f"{option}: this command gives no report to write")
    text = report.to_json() + "\n"
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a device or pipe: written as it is
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        fd, tmp = tempfile.mkstemp(prefix=".effnb-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CommandError(f"{option} {path}: could not write the report ({exc.strerror or exc})") from None


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
