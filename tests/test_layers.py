"""The package's layering holds: every import of an lsrfx module, at module level or inside a function, goes to a
module of the same layer or a lower one (so no function-local import can hide a cycle), modules of one layer do not
import each other in a cycle, every module belongs to a layer, and ``docs/architecture.md``'s layer table lists
the layers in this order.

Imports under ``if TYPE_CHECKING:`` are for annotations only and run nothing; ``lsrfx/__init__.py``'s lazy table
(``importlib``) is not an import statement and exposes the public names of the layers below it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lsrfx"

# Lowest first. A module is in the layer of the longest entry that is its name or a package prefix of it.
LAYERS: list[tuple[str, ...]] = [
    ("lsrfx.errors", "lsrfx.version", "lsrfx.settings", "lsrfx.utils", "lsrfx.atomic_files"),
    ("lsrfx.kernels", "lsrfx.quantized_base"),
    ("lsrfx.adapters",),
    ("lsrfx.parametrization",),
    ("lsrfx.targets", "lsrfx.factor_cache", "lsrfx.state_dict_hooks", "lsrfx.diagnostics", "lsrfx.recorder"),
    ("lsrfx.serving",),
    ("lsrfx.adapted_layer",),
    ("lsrfx.passes",),
    ("lsrfx.api",),
    ("lsrfx.explain", "lsrfx.regional"),
    ("lsrfx.export",),
    ("lsrfx",),  # the package's public surface
    ("lsrfx.finetune", "lsrfx.inspection"),
    ("lsrfx.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = max(((len(entry), i) for i, layer in enumerate(LAYERS) for entry in layer
                if module == entry or module.startswith(entry + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md's table")
    return best[1]


def resolve(name: str) -> str:
    """The lsrfx module an imported name lives in (``lsrfx.parametrization.adapted_layers`` -> the module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(path: Path) -> set[str]:
    """The lsrfx modules ``path`` imports (module level and inside functions, ``TYPE_CHECKING`` blocks aside)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lsrfx":
            found.update(resolve(f"{node.module}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == "lsrfx")
    return found - {module_name(path)}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    up = sorted(d for d in GRAPH[module] if layer_of(d) > layer_of(module))
    assert not up, f"{module} (layer {layer_of(module)}) imports a higher layer: {up}"


def test_no_cycle_within_a_layer() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in GRAPH.get(module, ()):
            if layer_of(dep) != layer_of(module) or dep == "lsrfx" or module == "lsrfx":
                continue  # across layers imports only go down; the package root re-exports, it is not imported
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, module, dep])}")
            if state.get(dep) is None:
                visit(dep, [*path, module])
        state[module] = 2

    for module in MODULES:
        if state.get(module) is None:
            visit(module, [])


def test_architecture_doc_lists_the_layers_in_this_order() -> None:
    """The first column of the layer table in docs/architecture.md names each layer's modules, lowest first."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## The layers"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("|") and not set(line) <= set("|- ")][1:]
    documented = [tuple(re.findall(r"`(lsrfx[\w./]*)`", row.split("|")[2])) for row in rows]
    as_modules = [tuple(p.removesuffix(".py").removesuffix("/").replace("/", ".") for p in row) for row in documented]
    assert as_modules == LAYERS
