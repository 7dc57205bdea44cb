"""The engine's shape: no Streamlit in it, no import cycles between its modules, and sibling modules
imported at the top of a module (never hidden inside a function)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lowrank_core"
STANDALONE = {"lowrank_core.modeling_lowrank"}  # copied into exports: torch and transformers only


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """{module: [(imported lowrank_core module, at top level?)]} from the source files' ASTs."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        found = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("lowrank_core"):
                    found.append((t if t in modules else t.rsplit(".", 1)[0], id(node) in top))
        graph[name] = found
    return modules, graph


def test_the_engine_never_imports_streamlit():
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] == "streamlit" for n in names), path


def test_no_import_cycles_and_no_function_level_sibling_imports():
    modules, graph = _imports()
    hidden = [(m, t) for m, deps in graph.items() for t, top in deps if not top]
    assert hidden == [], f"sibling imports inside functions: {hidden}"
    assert not any(t.startswith("lowrank_core") for m in STANDALONE for t, _ in graph[m])
    edges = {m: {t for t, _ in deps if t != m and t in modules} for m, deps in graph.items()}
    for m, path in modules.items():  # a package that discovers its plug-ins imports every module it holds
        if path.name == "__init__.py" and "import_module" in path.read_text():
            edges[m] |= {t for t in modules if t.startswith(m + ".") and t.count(".") == m.count(".") + 1}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for target in sorted(edges[m]):  # importing a package runs its __init__ (and what that imports)
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
