"""``%efficient`` and ``%%efficient``: thin parsers over the API, one registry of subcommands.

User mistakes (an undefined variable, an object that is not a model, an unknown command or option,
a bad value) reach the notebook as one ``UsageError`` line with no traceback. No torch import here.
"""

from __future__ import annotations

import html
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import HTML, display

from . import commands as _commands
from . import outputs

PROG = "%efficient"


def _store_value(result):
    """What ``-o NAME`` stores: the new model of a technique's Result, else the object itself."""
    from .report import Result

    return result.model if isinstance(result, Result) else result


def _check_variable(name):
    """``name`` when ``-o`` can store into it (a Python identifier), else the one-line error."""
    if name is None or not name.isidentifier():
        raise UsageError(f"-o needs a Python variable name, got {name!r}")
    return name


@magics_class
class EfficientMagics(Magics):
    """Magics for effnb: ``%efficient COMMAND ...`` and the cell magic ``%%efficient``."""

    def _resolve_model(self, token: str):
        ns = self.shell.user_ns
        if token in ns:
            obj = ns[token]
            import torch

            if not isinstance(obj, torch.nn.Module):
                raise _commands.CommandError(f"{token!r} is a {type(obj).__name__}, not a model (a torch.nn.Module)")
            return obj
        from .models import unknown_model_message

        model = _commands.load_named_model(token)
        if model is not None:
            return model
        raise _commands.CommandError(_commands.undefined_name(token) if token.isidentifier()
                                     else unknown_model_message(token))

    def _variable_or_name(self, token: str):
        return self._resolve_model(token) if token in self.shell.user_ns else token

    @line_magic
    def efficient(self, line: str):
        """Efficiency in one line. ``%efficient help`` lists the commands."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot parse the line: {exc}") from None
        if not argv or argv[0] in ("help", "-h", "--help"):
            try:
                print(_commands.help_text(argv[1] if len(argv) > 1 else None, PROG))
            except _commands.CommandError as exc:
                raise UsageError(str(exc)) from None
            return None
        try:
            cmd = _commands.get_command(argv[0])
            ns = _commands.parse(cmd, argv[1:], f"{PROG} {cmd.name}")
            if ns is None:  # --help was printed
                return None
            if ns.output is not None:  # checked before the work, not after
                _check_variable(ns.output)
            json_path = outputs.check_output_file(ns.json) if ns.json is not None else None
            # a streaming call (quantize --save-to): a name that is not a notebook variable is passed
            # to the API as it is (a folder is then never loaded whole)
            resolve = self._variable_or_name if cmd.streams(ns) else self._resolve_model
            result = _commands.run(cmd, ns, resolve)
        except _commands.CommandError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            raise UsageError(f"{argv[0]} interrupted: nothing was stored") from None
        self.shell.user_ns["_efficient"] = result
        if ns.output:
            self.shell.user_ns[ns.output] = _store_value(result)
        if json_path:
            try:
                outputs.write_json(getattr(result, "report", result), json_path)
            except _commands.CommandError as exc:
                raise UsageError(f"{exc} (the result is stored in {ns.output or '_efficient'})") from None
        if not ns.quiet:
            display(result)
        return None

    @cell_magic("efficient")
    def efficient_cell(self, line: str, cell: str):
        """Measure the cell: wall time, peak memory (CPU, and CUDA when in use), energy where measurable.

        Options: ``-o NAME`` stores the measurements (a dict), ``-q`` shows nothing.
        """
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot parse the line: {exc}") from None
        output, quiet = None, False
        it = iter(argv)
        for tok in it:
            if tok in ("-q", "--quiet"):
                quiet = True
            elif tok in ("-o", "--output"):
                output = _check_variable(next(it, None))
            else:
                raise UsageError(f"%%efficient: unknown option {tok!r}; options: -o NAME, -q")
        from .measure.core import measure_region

        with measure_region() as m:
            outcome = self.shell.run_cell(cell)
        m["cell_succeeded"] = bool(outcome.success)
        if output:
            self.shell.user_ns[output] = m
        if not quiet:
            display(HTML(_region_html(m)))
        return None


def _region_html(m: dict) -> str:
    def mb(b):
        return "—" if b is None else f"{b / 1e6:,.1f} MB"

    energy = (f"{m['energy_joules']:.3g} J ({m['energy_method']})" if m.get("energy_joules") is not None
              else f"not measured ({m.get('energy_reason')})")
    rows = [("wall time", f"{m['wall_s'] * 1e3:,.1f} ms"),
            ("peak memory (CPU, rise during the cell)", mb(m["cpu_peak_bytes"]))]
    if m.get("gpu_peak_bytes") is not None:
        rows.append(("peak memory (CUDA, rise during the cell)", mb(m["gpu_peak_bytes"])))
    rows.append(("energy", energy))
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    note = "one run; peak memory method: " + m["cpu_peak_method"] + ("" if m.get("cell_succeeded", True) else "; the cell raised")
    return f"<table class='effnb-cell'>{body}</table><p style='font-size:smaller;color:#666'>{html.escape(note)}</p>"


def load_ipython_extension(ipython) -> None:  # ``%load_ext effnb.magics`` works too
    ipython.register_magics(EfficientMagics)

