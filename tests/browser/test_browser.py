"""Real-browser test: JupyterLab on localhost, headless Chromium (Debian's), every widget drawn.

JupyterLab starts on 127.0.0.1 with a random free port, a random token and throw-away settings,
config and runtime folders. Playwright drives ``/usr/bin/chromium`` (never a browser of its own),
opens ``widgets.ipynb``, runs all cells and checks in the DOM that each effnb widget rendered
(its box is there, its plotly figure has traces, no "Error displaying widget"), moves the
QuantExplorer's bits slider and checks that the SNR shown changes, and saves screenshots into the
folder it prints (``EFFNB_SCREENSHOTS``, default ``build/browser-screenshots``). Everything is
shut down in bounded time, also on failure. Skipped only when Chromium or the ``playwright``
package is missing (``tests/browser/setup.sh`` installs both).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
CHROMIUM = os.environ.get("EFFNB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
# widget box class -> what its view must show
WIDGETS = {"effnb-quant": "QuantExplorer", "effnb-lora": "LoraExplorer", "effnb-router": "RouterExplorer",
           "effnb-compare": "CompareDashboard", "effnb-training": "TrainingMonitor"}
RUN_TIMEOUT_S = 150  # all cells, on a loaded 2-core machine


def _requirements() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM} (Debian: apt-get install -y chromium; or set EFFNB_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; its browser download is not needed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server in its own process group, with a clean, private configuration."""

    def __init__(self, notebook_dir: Path, home: Path):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        settings = home / "lab-settings"
        (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
        # render every cell (no virtual scrolling), so all widgets are in the DOM
        (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
            json.dumps({"windowingMode": "none"}))
        (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = os.environ | {
            "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "IPYTHONDIR": str(home / "ipython"), "TOKENIZERS_PARALLELISM": "false",
        }
        env.pop("EFFNB_STATIC_WIDGETS", None)
        self.log = open(home / "jupyterlab.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={notebook_dir}",
             "--ServerApp.port_retries=0", "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
             "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=notebook_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer within {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        """Ask the server to shut down (kernels included); after 10 s end its process group."""
        if self.proc.poll() is None:
            try:
                req = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
                urllib.request.urlopen(req, timeout=5).close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started (server + kernel)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
        self.log.close()


def _screenshot_dir() -> Path:
    path = Path(os.environ.get("EFFNB_SCREENSHOTS", ROOT / "build" / "browser-screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


WIDGET_STATE_JS = """(cls) => {
    const box = document.querySelector('.' + cls);
    if (!box) return null;
    const plots = [...box.querySelectorAll('.js-plotly-plot')];
    return {
        plots: plots.length,
        traces: plots.reduce((n, p) => n + ((p._fullData || []).length), 0),
        drawn: box.querySelectorAll('g.trace, g.hm, .heatmaplayer image').length,
        text: box.innerText.slice(0, 400),
    };
}"""


def test_widgets_render_in_jupyterlab(tmp_path):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    shots = _screenshot_dir()
    print(f"\nscreenshots: {shots}")
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(HERE / "widgets.ipynb", work / "widgets.ipynb")
    lab = JupyterLab(work, tmp_path)
    browser = None
    try:
        lab.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{lab.url}/lab/tree/widgets.ipynb?token={lab.token}", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_function(
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                " return k && k.status === 'idle'; }", timeout=90_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                    ".some(e => e.innerText.includes('EFFNB-WIDGETS-DONE'))",
                    timeout=RUN_TIMEOUT_S * 1000, polling=1000)
            except Exception:
                page.screenshot(path=str(shots / "notebook-timeout.png"))
                raise
            errors = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts()
                      if "Error displaying widget" in t or "Traceback" in t]
            assert not errors, f"outputs with errors: {errors[:3]}"

            all_drawn = (f"() => {json.dumps(list(WIDGETS))}.every(c => {{ const s = ({WIDGET_STATE_JS})(c);"
                         " return s && s.drawn > 0; }})")
            try:
                page.wait_for_function(all_drawn, timeout=90_000, polling=500)
            except Exception:  # noqa: BLE001 - report what each widget shows, not only "timeout"
                pass
            # a viewport screenshot only: a full-page one resizes the viewport, and plotly figures
            # still drawing on a loaded machine were left empty by that resize
            page.screenshot(path=str(shots / "notebook-after-run.png"))
            states = {}
            for cls, name in WIDGETS.items():
                states[name] = page.evaluate(WIDGET_STATE_JS, cls)
                box = page.locator(f".{cls}").first
                if states[name] is not None:
                    box.scroll_into_view_if_needed()
                    box.screenshot(path=str(shots / f"{name}.png"))
            for name, st in states.items():
                assert st is not None, f"{name}: its widget box is not in the page"
                assert st["plots"] >= 1 and st["traces"] >= 1 and st["drawn"] >= 1, f"{name}: no plotly traces drawn: {st}"

            # move the QuantExplorer's bits slider one step (4 -> 5) and see the SNR change
            snr = page.locator(".effnb-quant .effnb-q-snr").first
            before = snr.inner_text()
            handle = page.locator(".effnb-quant .widget-slider .noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.focus()
            page.keyboard.press("ArrowRight")
            t0 = time.monotonic()
            page.wait_for_function(
                "(b) => { const e = document.querySelector('.effnb-quant .effnb-q-snr'); return e && e.innerText !== b; }",
                arg=before, timeout=20_000, polling=100)
            after, waited = snr.inner_text(), time.monotonic() - t0
            page.locator(".effnb-quant").first.screenshot(path=str(shots / "QuantExplorer-after-slider.png"))
            assert "5-bit" in page.locator(".effnb-quant .effnb-quant-summary").first.inner_text()
            print(f"slider moved: SNR {before} -> {after} in {waited:.2f} s (browser round trip)")
            bad = [e for e in console_errors if "widget" in e.lower() and "error" in e.lower()]
            assert not bad, f"widget errors in the browser console: {bad[:3]}"
            browser.close()
            browser = None
    finally:
        if browser is not None:
            try:
                browser.close()
            except Exception:  # noqa: BLE001 - shutting down after a failure; the server stop below matters more
                pass
        lab.stop()
    print(f"browser test took {time.monotonic() - started:.1f} s; screenshots in {shots}")
