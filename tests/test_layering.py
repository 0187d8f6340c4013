"""The package's layers, read from the source with ``ast`` (nothing is imported): every import goes
to the part's own layer or one below, and no parts import each other in a cycle.

A part is a sub-package (``engine``, ``methods``, ...) or a module at the package root (``model``,
``errors``, ...; ``__init__`` is the root's own ``__init__.py``). Every import counts: relative or
absolute, at the top of a module, inside a function or under ``TYPE_CHECKING``. A new part must be
given a layer in ``LAYERS`` before the tests pass.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grace_hooks"

# Lowest first; a part may import from its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "progress", "timing", "config", "requests", "tokens", "questions", "conflicts"),  # foundation
    ("bases",),    # base models: architectures, torch hooks, embedded models, loading
    ("engine",),   # effects, router, spans, runtime, forward context, loaded view, memo, health
    ("store",),    # packs on disk
    ("locate",),   # the locate-then-edit toolkit
    ("methods",),  # the method contract, the registry and every family
    ("model", "explain", "method_kit", "__init__"),  # the facade: EditableModel, the method author's kit, the public API
    ("eval",),     # the benchmark harness
    ("serve",),    # the server (uses eval's chat helpers)
    ("cli",),      # the command line (runs eval and serve)
    ("testing",),  # tiny random models and hostile packs for tests and benchmarks: nothing imports it
]


@dataclass(frozen=True)
class Import:
    path: Path     # the importing file
    line: int
    statement: str
    source: str    # the importing module, dotted
    target: str    # the imported module, dotted


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name of every module below ``root`` (a package named ``root.name``) -> its file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path) -> list[Import]:
    """Every import of a module of the package ``root`` by a module of it."""
    modules, name = _modules(root), root.name
    found = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == name or a.name.startswith(name + ".")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                if base_name != name and not base_name.startswith(name + "."):
                    continue
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules else base_name
                           for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                found.append(Import(path, node.lineno, ast.unparse(node), module, target))
    return found


def part(module: str) -> str:
    """``grace_hooks.engine.runtime`` -> ``engine``; ``grace_hooks.model`` -> ``model``; ``grace_hooks`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _where(imp: Import, root: Path) -> str:
    return f"{imp.path.relative_to(root.parent)}:{imp.line}: `{imp.statement}`"


def upward_imports(found: list[Import], layers: list[tuple[str, ...]], root: Path) -> list[str]:
    """One line per import from a part to a part of a higher layer."""
    level = {p: i for i, layer in enumerate(layers) for p in layer}
    return [f"{_where(imp, root)}: {part(imp.source)} (LAYERS[{level[part(imp.source)]}]) may not import "
            f"{imp.target}: {part(imp.target)} is in LAYERS[{level[part(imp.target)]}], above it"
            for imp in found
            if level.get(part(imp.source), -1) < level.get(part(imp.target), -1)]


def part_cycles(found: list[Import], root: Path) -> list[str]:
    """One message per set of parts that import each other (a strongly connected component), with an
    import for each edge inside it."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in found:
        a, b = part(imp.source), part(imp.target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [f"import cycle between {', '.join(c)}:\n" + "\n".join(
                f"  {a} -> {b}: {_where(edges[a][b], root)}" for a in c for b in c if b in edges.get(a, {}))
            for c in components]


def undeclared_parts(root: Path, layers: list[tuple[str, ...]]) -> tuple[set[str], set[str]]:
    """Parts of the package with no layer, and declared parts the package does not have."""
    found = {part(m) for m in _modules(root)}
    declared = {p for layer in layers for p in layer}
    return found - declared, declared - found


# ---------------------------------------------------------------------------- the package
def test_every_part_has_one_layer():
    missing, stale = undeclared_parts(PACKAGE, LAYERS)
    assert not missing, f"give these parts of grace_hooks a layer in LAYERS: {sorted(missing)}"
    assert not stale, f"LAYERS names parts grace_hooks does not have: {sorted(stale)}"
    named = [p for layer in LAYERS for p in layer]
    assert len(named) == len(set(named)), "a part is named in two layers"


def test_no_import_goes_to_a_higher_layer():
    found = imports(PACKAGE)
    assert len(found) > 200  # the scan sees the package's imports (about 330)
    bad = upward_imports(found, LAYERS, PACKAGE)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_parts():
    bad = part_cycles(imports(PACKAGE), PACKAGE)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------- the check itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """A planted violation of each kind is found, and named by its file, line and statement."""
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "from .top import run\n",
        "errors.py": "",
        "config.py": "from .errors import *\n",
        "low/__init__.py": "",
        "low/a.py": "from ..errors import E\n\n\ndef f():\n    from ..high.b import g  # upward, inside a function\n",
        "high/__init__.py": "",
        "high/b.py": "import pkg.low.a\nfrom pkg import config\n",
        "side/__init__.py": "from ..other import x\n",
        "other.py": "from pkg.side import y\n",
        "top.py": "from . import low, high\n",
    })
    layers = [("errors", "config"), ("low", "side", "other"), ("high",), ("top", "__init__")]
    found = imports(root)
    assert {(part(i.source), part(i.target)) for i in found} == {
        ("__init__", "top"), ("config", "errors"), ("low", "errors"), ("low", "high"), ("high", "low"),
        ("high", "config"), ("side", "other"), ("other", "side"), ("top", "low"), ("top", "high")}

    up = upward_imports(found, layers, root)
    assert up == ["pkg/low/a.py:5: `from ..high.b import g`: low (LAYERS[1]) may not import pkg.high.b: high is "
                  "in LAYERS[2], above it"]

    cycles = part_cycles(found, root)
    assert len(cycles) == 2
    low_high = next(c for c in cycles if "high" in c)
    assert low_high.startswith("import cycle between high, low:")
    assert "high -> low: pkg/high/b.py:1: `import pkg.low.a`" in low_high
    assert "low -> high: pkg/low/a.py:5: `from ..high.b import g`" in low_high
    assert any(c.startswith("import cycle between other, side:") for c in cycles)

    assert undeclared_parts(root, layers[:-1]) == ({"top", "__init__"}, set())
