"""The interactive widgets' shared controls, on top of ``effnb.display`` (the live/static display every
effnb display shares): bound controls that mirror the widget's state, and the "apply" button."""

from __future__ import annotations

import contextlib
import html
import time

from ..display import (
    DisplayWidget,
    PlotOutput,
    figure_bundle,
    html_table,
    html_to_text,
    in_kernel,
    require_widget_libraries,
)

__all__ = ["EffnbWidget", "PlotOutput", "error_html", "figure_bundle", "html_table", "html_to_text", "in_kernel", "mb",
           "require_widget_libraries"]


def error_html(message) -> str:
    """A status line in red: the text of an exception or message, escaped."""
    return f"<span style='color:#c00'>{html.escape(str(message))}</span>"


def mb(n: float | None) -> str:
    """Bytes for people: kB below 1 MB, MB above (decimal units, as the reports use)."""
    if n is None:
        return "—"
    return f"{n / 1e3:,.1f} kB" if abs(n) < 1e6 else f"{n / 1e6:,.2f} MB"



class EffnbWidget(DisplayWidget):
    """A widget with live controls: ``_bind`` / ``_setting_controls`` / ``_sync_controls`` and ``_run_apply``."""

    _syncing = False

    def _bind(self, controls: dict, on_change) -> None:
        """``on_change(key, new value)`` when the control under ``key`` changes by hand; changes that
        ``_setting_controls`` makes (the widget mirroring its own state) call nothing."""
        for key, control in controls.items():
            control.observe(lambda change, key=key: None if self._syncing else on_change(key, change["new"]),
                            names="value")

    @contextlib.contextmanager
    def _setting_controls(self):
        """Inside, the widget sets its own controls without their handlers running."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _sync_controls(self) -> None:
        """Show the widget's state in its live controls (when built) through ``_set_controls``."""
        if self._box is not None:
            with self._setting_controls():
                self._set_controls()

    def _set_controls(self) -> None:  # pragma: no cover - for widgets that call _sync_controls
        raise NotImplementedError

    def _run_apply(self, call, busy: str, done: str, enabled_after) -> None:
        """What an "apply" button does: ``call()`` (the widget's ``apply``) with ``busy`` in the status line, a user error
        (ValueError, TypeError) as one red line, an interrupt as a note; when it worked, ``done`` (with
        ``{seconds}``) and the result's report below. The button is enabled again as
        ``enabled_after()`` says. Needs ``_w_apply``, ``_w_status`` and ``_w_out`` in the live view."""
        from IPython.display import display

        self._w_apply.disabled = True
        self._w_status.value = busy
        t0 = time.perf_counter()
        try:
            res = call()
        except KeyboardInterrupt:
            self._w_status.value = "interrupted; the model is unchanged"
            return
        except (ValueError, TypeError) as exc:
            self._w_status.value = error_html(exc)
            return
        finally:
            self._w_apply.disabled = not enabled_after()
        self._w_status.value = done.format(seconds=time.perf_counter() - t0)
        self._w_out.clear_output()
        with self._w_out:
            display(res.report)
