"""Run import-linter (the contracts in pyproject.toml) over effnb as Python imports it.

Why a wrapper and not a bare ``lint-imports``: grimp, the graph import-linter checks, finds a
package's modules by walking the one folder of its root package. ``effnb.kernels`` lives in the
top-level ``kernels/`` folder, mapped by ``[tool.setuptools.package-dir]``, so a bare run sees no
``effnb.kernels`` at all ("Missing layer 'effnb.kernels'") and silently drops every import of it
(checked with a deliberate violation in a scratch copy). No import-linter or grimp setting maps a
subpackage to another folder. So this builds, in a temporary folder, a view of ``effnb/`` in which
every entry is a symlink to the real one and each package-dir mapping (``effnb.kernels`` ->
``kernels/``) is one more symlink, then runs ``lint-imports`` from there (its working folder comes
first on ``sys.path``, so that view is the ``effnb`` grimp walks; it follows symlinked folders).
Nothing in the tree is moved or written.

    python .ci/lint_imports.py [lint-imports options...]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "effnb"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Subpackages of ``effnb`` that live outside ``effnb/`` (from pyproject's package-dir), by dotted name."""
    with open(root / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: root / folder for name, folder in mapping.items() if name.startswith(PACKAGE + ".")}


@contextlib.contextmanager
def package_view(root: Path = ROOT) -> Iterator[Path]:
    """A temporary folder holding ``effnb/`` as Python imports it (see the module docstring); removed on exit."""
    with tempfile.TemporaryDirectory(prefix="effnb-imports-") as tmp:
        view = Path(tmp) / PACKAGE
        view.mkdir()
        for entry in (root / PACKAGE).iterdir():
            if entry.name != "__pycache__":
                (view / entry.name).symlink_to(entry)
        for name, folder in package_dirs(root).items():
            parts = name.split(".")[1:]
            if len(parts) != 1:  # a deeper mapping would need a nested view; effnb has none
                raise SystemExit(f"package-dir {name!r}: only direct subpackages of {PACKAGE} are supported")
            (view / parts[0]).symlink_to(folder)
        yield Path(tmp)


def main(argv: list[str]) -> int:
    lint = Path(sys.executable).with_name("lint-imports")
    with package_view() as tmp:
        cmd = [str(lint) if lint.exists() else "lint-imports", "--no-cache", *argv, str(ROOT / "pyproject.toml")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
