"""The import graph of ``contentv_jax/``, ``converters/`` and ``torch_npu_backend/``, built from the source.

Nodes are modules (a package's ``__init__.py`` is the package itself). Every ``import`` statement
counts, at module level or inside a function (a lazy import is still a dependency); relative imports
are resolved; ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``; those edges are counted too,
except from a module to its own enclosing packages (they were initialised before it ran).

The layering it enforces (docs/design.md): ``models`` imports no checkpoint, data, training or
converter code; data flows data -> train -> checkpoints -> pipeline with no import back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contentv_jax", "converters", "torch_npu_backend")

# (importer prefix, forbidden imported prefixes)
FORBIDDEN = [
    ("contentv_jax.models", ("contentv_jax.checkpoints", "contentv_jax.data", "contentv_jax.train", "converters",
                             "contentv_jax.pipeline", "contentv_jax.sample", "contentv_jax.encode")),
    ("contentv_jax.sharding", ("contentv_jax.models", "contentv_jax.checkpoints", "contentv_jax.data",
                               "contentv_jax.train", "converters", "contentv_jax.pipeline")),
    ("contentv_jax.data", ("contentv_jax.train", "contentv_jax.pipeline", "contentv_jax.sample")),
    ("contentv_jax.checkpoints", ("contentv_jax.data", "contentv_jax.train", "contentv_jax.pipeline", "contentv_jax.sample")),
    ("contentv_jax.train", ("contentv_jax.pipeline", "contentv_jax.sample")),
    ("converters.common", ("contentv_jax.checkpoints",)),
    ("converters.transformer", ("contentv_jax.checkpoints",)),
    ("converters.vae", ("contentv_jax.checkpoints",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(f)] = f
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the three packages it imports (and whose package __init__ it runs)}."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def add(src: str, dst: str) -> None:
        parts = dst.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:i])
            # src's own enclosing packages were initialised before src ran: no edge to them
            if name in mods and name != src and not src.startswith(name + "."):
                graph[src].add(name)

    for m, f in mods.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(m, a.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(m, is_pkg, node.level, node.module)
                for a in node.names:
                    full = f"{base}.{a.name}" if base else a.name
                    add(m, full if full in mods else base)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        color[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_known_edges():
    """The graph is real: edges this test relies on exist (so an empty graph cannot pass)."""
    g = import_graph()
    assert "contentv_jax.sharding.ulysses" in g["contentv_jax.models.attention"]
    assert "contentv_jax.checkpoints" in g["converters.convert"]
    assert "converters.transformer" in g["contentv_jax.checkpoints"]  # a function-level import
    assert "contentv_jax.models" in g["contentv_jax.data.prepare"]  # the package __init__ of models.vae runs first
    assert len(g) > 40


def test_cycle_detector_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layering():
    g = import_graph()
    bad = []
    for src, deps in g.items():
        for prefix, forbidden in FORBIDDEN:
            if src == prefix or src.startswith(prefix + "."):
                bad += [f"{src} imports {d}" for d in sorted(deps) if any(d == f or d.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)
