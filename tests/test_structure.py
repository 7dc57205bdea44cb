"""The engine's shape: no Streamlit in it, no import cycles between its modules, sibling modules
imported at the top of a module (never hidden inside a function), and no module using another's private
(``_underscore``) names."""
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


def _private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _members(tree: ast.Module) -> set[str]:
    """Private names a module gives its classes and objects: methods and class attributes defined in a class
    body, and attributes assigned on an object (``self._x = ...``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
                found.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
    return {n for n in found if _private(n)}


def _defined(tree: ast.Module) -> set[str]:
    """Every private name a module defines, binds or assigns (functions, classes, variables, attributes)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return {n for n in found if _private(n)}


def private_uses(trees: dict[str, ast.Module]) -> list[str]:
    """``"module:line what"`` for every use of another engine module's private name in ``trees``
    ({module name: parsed source}): ``from .x import _y``, ``x._y`` on an imported engine module, and
    ``obj._y`` where ``_y`` is a private member of a class of another module that this module does not
    define itself (a subclass assigning or overriding it defines it)."""
    packages = {_module_name(p) for p in ROOT.rglob("__init__.py")}
    members = {m: _members(t) for m, t in trees.items()}
    found = []
    for name, tree in trees.items():
        is_package = name in packages
        own = _defined(tree)
        aliases = {}     # local name -> the engine module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, is_package)
                if not base.startswith("lowrank_core"):
                    continue
                for a in node.names:
                    if _private(a.name) and base != name:
                        found.append(f"{name}:{node.lineno} imports {base}.{a.name}")
                    if f"{base}.{a.name}" in trees:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in trees and a.asname:
                        aliases[a.asname] = a.name
        others = set().union(*(v for m, v in members.items() if m != name))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            target = aliases.get(node.value.id) if isinstance(node.value, ast.Name) else None
            if target is not None and target != name:
                found.append(f"{name}:{node.lineno} uses {target}.{node.attr}")
            elif node.attr in others and node.attr not in own:
                owners = sorted(m for m, v in members.items() if m != name and node.attr in v)
                found.append(f"{name}:{node.lineno} uses {ast.unparse(node)} (private to {', '.join(owners)})")
    return found


def test_no_module_uses_another_modules_private_names():
    sources = {_module_name(p): p.read_text() for p in ROOT.rglob("*.py")}
    trees = {m: ast.parse(src) for m, src in sources.items()}
    assert private_uses(trees) == []
    # the check can fail: each of the three ways of reaching into a sibling is found
    name = "lowrank_core.methods.anchored"
    planted = dict(trees)
    planted[name] = ast.parse(sources[name] + ("\nfrom ..calibrate import _real_rows\n"
                                                 "from .. import calibrate\n"
                                                 "calibrate._product\n"
                                                 "def peek(wh):\n    return wh._compute\n"))
    found = private_uses(planted)
    assert [f.split(" ", 1)[1] for f in found] == ["imports lowrank_core.calibrate._real_rows",
                                                   "uses lowrank_core.calibrate._product",
                                                   "uses wh._compute (private to lowrank_core.allocate.bases, "
                                                   "lowrank_core.decompose)"], found
