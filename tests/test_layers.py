"""Imports go one way: the layer table in gpt_jax/__init__.py's docstring, checked on every import of the
package's modules, train.py and benchmarks/ (read with `ast`, so imports inside functions count too)."""

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "gpt_jax"
MODULES = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
FACADE = "__init__"  # `from gpt_jax import name`: the public names, for callers above the library


def layers() -> dict[str, int]:
    """{module: layer}, 0 = top, from the table in the package docstring (a row may go on on the next line)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    rows = []
    for line in doc.splitlines():
        if re.match(r"    \w+  ", line):
            rows.append(line.split(None, 1)[1])
        elif rows and re.match(r" {10,}\w", line):
            rows[-1] += ", " + line.strip()
    table = {}
    for depth, rest in enumerate(rows):
        names = re.split(r"\s{2,}", rest.strip())[0]  # the modules, before the row's description
        for name in re.findall(r"\b(\w+)\b", names.replace("(train.py)", "")):
            table[name] = depth
    return table


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for each gpt_jax import in `path`, and for each
    attribute read off an imported gpt_jax module (`zeroshot._x` counts as taking `_x`)."""
    tree, found, bound = ast.parse(path.read_text()), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "gpt_jax":
                    found.append((parts[1] if len(parts) > 1 else FACADE, None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt_jax":
            parts = node.module.split(".")
            for a in node.names:
                if len(parts) > 1:
                    found.append((parts[1], a.name, node.lineno))
                elif a.name in MODULES and a.name not in FACADE_NAMES:
                    found.append((a.name, None, node.lineno))
                    bound[a.asname or a.name] = a.name
                else:
                    found.append((FACADE, a.name, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


FACADE_NAMES = set(ast.literal_eval(next(
    n.value for n in ast.parse((PACKAGE / "__init__.py").read_text()).body
    if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")))
SOURCES = {**{p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"},
           "train.py": ROOT / "train.py", **{f"benchmarks/{p.name}": p for p in (ROOT / "benchmarks").glob("*.py")}}


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in imports(path) if m != name} for name, path in SOURCES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node, stack):
        if node in stack:
            found.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, stack + [node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    return found


def test_every_module_has_a_layer():
    table = layers()
    assert set(table) == MODULES, (f"modules without a layer in gpt_jax/__init__.py: {sorted(MODULES - set(table))}; "
                                   f"layers naming no module: {sorted(set(table) - MODULES)}")


def test_no_import_circle():
    assert cycles(graph()) == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles(graph()))


def test_imports_point_down():
    table = {**layers(), FACADE: -1}  # the facade and commands outside the package sit above everything
    upward = []
    for name, path in SOURCES.items():
        own = table.get(name, -1)
        for module, _, line in imports(path):
            if module != name and table[module] < own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} (a higher layer)")
    assert upward == [], "\n".join(upward)


def test_no_private_name_crosses_modules():
    crossing = [f"{path.relative_to(ROOT)}:{line} takes {module}.{taken}"
                for name, path in SOURCES.items() for module, taken, line in imports(path)
                if taken and taken.startswith("_") and not taken.startswith("__") and module != name]
    assert crossing == [], "\n".join(crossing)


@pytest.mark.parametrize("bad", [
    ("data", "from gpt_jax.trainer import train\n", "imports trainer"),
    ("config", "def f():\n    from gpt_jax import model\n", "imports model"),
    ("runs", "from gpt_jax.model import _causal\n", "takes model._causal"),
    ("loop", "from gpt_jax import pretrain\nx = pretrain._y\n", "imports pretrain"),
])
def test_the_checks_see_an_upward_import_a_private_name_and_a_circle(tmp_path, monkeypatch, bad):
    """Each check fails on a planted import (a copy of the package with one line added)."""
    module, line, expected = bad
    path = tmp_path / f"{module}.py"
    path.write_text(SOURCES[module].read_text() + "\n" + line)
    monkeypatch.setitem(SOURCES, module, path)
    monkeypatch.setattr(Path, "relative_to", lambda self, other: self)
    failures = []
    for check in (test_no_import_circle, test_imports_point_down, test_no_private_name_crosses_modules):
        try:
            check()
        except AssertionError as e:
            failures.append(str(e))
    assert any(expected in f for f in failures), failures
    if module == "data":
        assert any("import circles" in f and "trainer" in f for f in failures), failures
