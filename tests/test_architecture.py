"""The code's shape (issue 17): small modules and functions, no import cycles, format and method
choices made in the Format table and the method registries only, the layer contracts kept."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# effnb's package folders: effnb.kernels lives in kernels/ (pyproject's package-dir)
SOURCES = {"effnb": ROOT / "effnb", "effnb.kernels": ROOT / "kernels"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_NAME_BRANCHES = 10


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of effnb (effnb.kernels from kernels/)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "effnb" and rel[0] == "kernels":  # not effnb's: kernels/ is mapped separately
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_module_over_the_line_limit():
    long = {_rel(p): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def test_no_function_over_the_line_limit():
    long = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (decorators included): {long}"


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _load_time_imports(tree: ast.Module):
    """The import statements a module runs when it is imported: module level, outside functions,
    classes' method bodies and ``if TYPE_CHECKING:`` blocks (try/if/with bodies included)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _type_checking_block(node):
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, path: Path, node) -> set[str]:
    """The effnb modules an import statement loads (a ``from pkg import sub`` loads pkg.sub when it is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names = [base, *(f"{base}.{a.name}" for a in node.names)]
    return {n for n in names if n in MODULES and n != module}


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[module] = set().union(*(_targets(module, path, n) for n in _load_time_imports(tree)))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """No two modules import each other, directly or through others, while being imported (a
    package's ``__init__`` importing its submodules counts; imports inside functions do not run then)."""
    cycles = _cycles(_import_graph())
    assert not cycles, f"import cycles: {cycles}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(module: str, path: Path):
    """(line, what) for each private name this module takes from another effnb module: ``from m import _x``
    or ``m._x`` on an imported effnb module (its own package's private modules are its business)."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, path, node):
                for alias in node.names:
                    if alias.name == target.rpartition(".")[2] or alias.name == target:
                        aliases[alias.asname or alias.name.split(".")[0]] = target
            if isinstance(node, ast.ImportFrom):
                own = module.rpartition(".")[0] if path.name != "__init__.py" else module
                loaded = _targets(module, path, node)
                for alias in node.names:
                    # a private submodule of the module's own package is fine; any other private name is not
                    sibling = any(t.rpartition(".") == (own, ".", alias.name) for t in loaded)
                    if _private(alias.name) and not sibling:
                        yield node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            if node.value.id in aliases and f"{aliases[node.value.id]}.{node.attr}" not in MODULES:
                yield node.lineno, f"{node.value.id}.{node.attr}"


def test_no_private_name_from_another_module():
    found = [f"{_rel(path)}:{line} {what}" for module, path in MODULES.items()
             for line, what in _private_uses(module, path)]
    assert not found, "private names used from another module (make them public or move the code):\n" + \
        "\n".join(found)


def test_format_and_method_choices_live_in_the_tables():
    """Branches on a format or method name belong in the Format table and the method registries."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git is not available to search the tracked sources")
    out = subprocess.run(["git", "grep", "--untracked", "-nE", r"fmt ?[!=]= ?\"|method ?[!=]= ?\"", "--", "effnb", "kernels"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1: no match
        pytest.skip(f"git grep failed: {out.stderr.strip()}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) <= MAX_NAME_BRANCHES, (f"{len(lines)} format/method name tests (at most {MAX_NAME_BRANCHES}, "
                                             "in the tables):\n" + "\n".join(lines))


def test_every_module_sits_in_a_layer():
    """A module the layers contract does not name would escape it: every part of effnb has a layer."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in config["contracts"] if c["type"] == "layers")
    named = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    parts = {".".join(m.split(".")[:2]) for m in MODULES if m != "effnb"}
    assert not parts - named, f"not in any layer of pyproject's layers contract: {sorted(parts - named)}"


def test_layer_contracts():
    """pyproject's import-linter contracts, through .ci/lint_imports.py (which makes effnb.kernels visible)."""
    if shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "lint_imports.py"), "--no-logo"], cwd=ROOT,
                         capture_output=True, text=True)
    broken = re.sub(r"(?s).*?(Broken contracts)", r"\1", out.stdout)
    assert out.returncode == 0, f"import-linter:\n{broken}\n{out.stderr[-2000:]}"
