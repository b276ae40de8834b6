"""The house rules that keep the three floors visible, checked on the source (AST), not by convention:

* floor 1 (the contract, ``ppl_rnn/*.py``) imports neither models, inference nor the workbench;
* floor 2: ``models/`` never imports ``inference/`` or the workbench; ``inference/`` never imports the
  workbench (it may build models, e.g. the fitted AR reference, but learns what a model can do only through
  capabilities);
* no import cycles between modules (top-level and function-level imports alike);
* no private name (``_x``) imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ppl_rnn": ROOT / "ppl_rnn", "ppl_rnn.models": ROOT / "models", "ppl_rnn.inference": ROOT / "inference"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "ppl_rnn" and parts and parts[0] in ("models", "inference"):
                continue
            mods[name] = f
    return mods


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[mod].name == "__init__.py"
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``mod``'s file."""
    tree = ast.parse(MODULES[mod].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, node)
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (src, a.name, node.lineno))
    return out


def _floor(mod: str) -> str:
    if mod.startswith("ppl_rnn.workbench"):
        return "workbench"
    if mod.startswith("ppl_rnn.models"):
        return "models"
    if mod.startswith("ppl_rnn.inference"):
        return "inference"
    return "contract"


FORBIDDEN = {"contract": {"models", "inference", "workbench"}, "models": {"inference", "workbench"},
             "inference": {"workbench"}, "workbench": set()}


def test_floors_point_one_way():
    bad = []
    for mod in MODULES:
        if mod == "ppl_rnn":  # the package facade re-exports every floor
            continue
        for target, _, line in _imports(mod):
            if target.startswith("ppl_rnn") and _floor(target) in FORBIDDEN[_floor(mod)] and target != "ppl_rnn":
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} ({_floor(mod)}) imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = []
    for mod in MODULES:
        for target, name, line in _imports(mod):
            if name and name.startswith("_") and target.startswith("ppl_rnn") and target != mod:
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {target}.{name}")
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    g = {}
    for mod in MODULES:
        deps = set()
        for target, _, _ in _imports(mod):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + ".") and target != "ppl_rnn":
                deps.add(target)
        g[mod] = deps
    return g


def test_no_import_cycles():
    g = _graph()
    # package __init__ files aggregate their children; a child importing a sibling through the package is fine
    g = {m: {d for d in deps if MODULES[d].name != "__init__.py"} for m, deps in g.items()}
    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if color.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in color:
                visit(d)
        stack.pop()
        color[m] = 2

    for m in sorted(g):
        if m not in color:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_inference_reads_no_parameter_by_name():
    """No ``getattr/hasattr/setattr/delattr/set_param(model, "<literal>")`` in inference/: a method learns what a
    model can do through declared capabilities, never by a parameter's name."""
    bad = []
    for p in (ROOT / "inference").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr", "delattr", "set_param")
                    and len(node.args) >= 2 and "model" in ast.unparse(node.args[0])
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not bad, "\n".join(bad)
