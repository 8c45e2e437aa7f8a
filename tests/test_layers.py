"""The import contract: who may import whom, read from the source (imports inside functions and
under TYPE_CHECKING included), and no import cycles. README "How the code is laid out" says why.

Floors, bottom to top:
  core (bottom)  veil.{errors, exits, env, files, config, logs, names, processes, reaper}:
                 no Flower, no project code above
  privacy/       the core's bottom only; never Flower
  core (top)     veil.{spec, protocol, models}: may use privacy/
  client/ server/  the core and privacy/; never each other, simulations/ or the shell
  simulations/   may use client/ and server/
  veil.apps      the module-level apps `flwr run` loads; may use everything below
  veil.cli       the shell; nothing imports it (nor veil.apps)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("veil", "privacy", "server", "client", "simulations")
BOTTOM = {"veil", "veil.errors", "veil.exits", "veil.env", "veil.files", "veil.config", "veil.logs",
          "veil.names", "veil.processes", "veil.reaper", "veil.server_opt"}
CORE_TOP = {"veil.spec", "veil.protocol", "veil.models"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "migrations" in rel.parts:
                continue
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file, resolved to a project module or a top name."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            resolved = target
            while resolved and resolved not in MODULES:
                resolved = resolved.rpartition(".")[0]
            found.add(resolved or target.split(".")[0])
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(module: str) -> str:
    if module in BOTTOM:
        return "bottom"
    if module in CORE_TOP:
        return "core"
    for prefix in ("veil.cli", "veil.apps"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return module.split(".")[0]


ALLOWED = {  # floor -> the floors it may import (besides third-party packages)
    "bottom": {"bottom"},
    "privacy": {"bottom", "privacy"},
    "core": {"bottom", "privacy", "core"},
    "client": {"bottom", "privacy", "core", "client"},
    "server": {"bottom", "privacy", "core", "server"},
    "simulations": {"bottom", "privacy", "core", "client", "server", "simulations"},
    "veil.apps": {"bottom", "privacy", "core", "client", "server", "simulations", "veil.apps"},
    "veil.cli": {"bottom", "privacy", "core", "client", "server", "simulations", "veil.cli"},
}
NO_FLOWER = {"bottom", "privacy"}


def test_every_module_is_on_a_known_floor() -> None:
    unknown = sorted(m for m in MODULES if _floor(m) not in ALLOWED)
    assert unknown == [], f"modules on no floor (add them to BOTTOM/CORE_TOP or a package): {unknown}"


def test_imports_follow_the_floors() -> None:
    broken = []
    for module, imported in GRAPH.items():
        floor = _floor(module)
        for target in imported:
            if target in MODULES and _floor(target) not in ALLOWED[floor]:
                broken.append(f"{module} ({floor}) imports {target} ({_floor(target)})")
            if floor in NO_FLOWER and target == "flwr":
                broken.append(f"{module} ({floor}) imports Flower")
    assert broken == []


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over module imports (a package's own
    ``__init__`` importing its children is not a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES or v.startswith(w + "."):
                continue
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
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert cycles == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The contract must not be dodged by a function-level import (how the old cycles hid)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from simulations.simulate import simulate\n    import flwr.app\n")
    assert {"simulations.simulate", "flwr"} <= _imports("server.m", source)


def test_privacy_imports_without_flower() -> None:
    """With Flower made unimportable, every privacy module (and the core's bottom) still imports."""
    modules = sorted(m for m in MODULES if _floor(m) in NO_FLOWER)
    code = ("import sys; sys.modules['flwr'] = None\n"
            + "".join(f"import {m}\n" for m in modules)
            + "assert not any(k == 'flwr' or k.startswith('flwr.') for k in sys.modules if sys.modules[k])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
