"""The package layout shows the architecture: a numpy-only core, adapters that build on it only.

The import graph of src/stopwise is read with ``ast`` (module-level and function-level imports).
Old import paths kept as shims (``alias(__name__, "stopwise.core....")``, see stopwise/_shim.py)
are not nodes of their own: an import of a shim counts as an import of the module it aliases.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "stopwise"
ADAPTERS = ("encoder", "decoder", "sampling", "training", "stream", "serve")
#: What the core may import besides itself: the standard library and its declared dependencies.
CORE_THIRD_PARTY = {"numpy", "scipy", "tqdm", "matplotlib"}
#: Outside stopwise.core, only the version string (packaging reads it there; it imports nothing).
CORE_MAY_IMPORT = {"stopwise._version"}
MAX_LINES = 400


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    shim_of: str | None = None
    #: (line, imported module or ``module:name`` for a from-import of a non-module name)
    imports: list[tuple[int, str, str | None]] = field(default_factory=list)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _shim_target(tree: ast.Module) -> str | None:
    """The module a shim aliases: a module-level ``alias(__name__, "stopwise....")`` call."""
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "alias"
                and len(call.args) == 2 and isinstance(call.args[1], ast.Constant)):
            return str(call.args[1].value)
    return None


def _read_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = _module_name(path)
        modules[name] = Module(name, path, tree, _shim_target(tree))
    for mod in modules.values():
        package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                mod.imports.extend((node.lineno, a.name, None) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    # `from pkg import sub` imports the module pkg.sub when there is one.
                    mod.imports.append((node.lineno, sub, None) if sub in modules else (node.lineno, base, a.name))
    return modules


MODULES = _read_modules()


def _resolve(name: str) -> str:
    """A stopwise module's real name: through a shim to the module it aliases."""
    mod = MODULES.get(name)
    return mod.shim_of if mod is not None and mod.shim_of else name


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for mod in MODULES.values():
        if mod.shim_of:
            continue
        targets = {_resolve(target) for _, target, _ in mod.imports if target in MODULES}
        edges[mod.name] = targets - {mod.name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _where(mod: Module, line: int, what: str) -> str:
    return f"{mod.path.relative_to(SRC.parent)}:{line}: {mod.name} imports {what}"


def test_the_graph_reader_sees_the_layout() -> None:
    # Guards the other tests against passing on an empty or misread graph.
    assert {"stopwise.core.calibrate", "stopwise.core.rules.base", "stopwise.encoder.model"} <= MODULES.keys()
    assert MODULES["stopwise.trace"].shim_of == "stopwise.core.trace"
    assert "stopwise.core.issue" in _internal_edges()["stopwise.core.calibrate"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_internal_edges())
    assert not cycles, "Import cycles among stopwise modules (break each so imports run one way):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_core_imports_only_itself_the_stdlib_and_its_dependencies() -> None:
    bad = []
    for mod in MODULES.values():
        if not mod.name.startswith("stopwise.core") or mod.shim_of:
            continue
        for line, target, _ in mod.imports:
            top = target.partition(".")[0]
            if top == "stopwise":
                ok = target == "stopwise.core" or target.startswith("stopwise.core.") or target in CORE_MAY_IMPORT
            else:
                ok = top in sys.stdlib_module_names or top in CORE_THIRD_PARTY
            if not ok:
                bad.append(_where(mod, line, target))
    assert not bad, "stopwise.core must import only stopwise.core, the stdlib and numpy/scipy/tqdm/matplotlib:\n" + "\n".join(bad)


def _adapter(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stopwise" and parts[1] in ADAPTERS else None


def test_adapters_do_not_import_each_other() -> None:
    bad = []
    for mod in MODULES.values():
        mine = _adapter(mod.name)
        if mine is None or mod.shim_of:
            continue
        for line, target, _ in mod.imports:
            resolved = _resolve(target)
            theirs = _adapter(resolved) or _adapter(target)
            # Another adapter's package root is its public API (the server serves the encoder's
            # EarlyExitClassifier); its modules are internals.
            public = resolved == f"stopwise.{theirs}" or target == f"stopwise.{theirs}"
            if theirs is not None and theirs != mine and not public:
                bad.append(_where(mod, line, target))
    assert not bad, ("Adapters may use stopwise.core, stopwise.hf, stopwise.http and other adapters' package roots, "
                     "never another adapter's modules (move what they share there):\n" + "\n".join(bad))


def test_no_private_names_are_imported_across_modules() -> None:
    bad = []
    for mod in MODULES.values():
        for line, target, name in mod.imports:
            if name is None or not target.startswith("stopwise"):
                continue
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                bad.append(_where(mod, line, f"{target}.{name}"))
    assert not bad, "Private names imported from another module (make them public where they are shared):\n" + "\n".join(bad)


def test_every_source_file_is_under_400_lines() -> None:
    long = {str(p.relative_to(SRC.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_LINES}
    assert not long, f"Files of {MAX_LINES} lines or more (split them along their responsibilities): {long}"


@pytest.mark.parametrize("old", sorted(n for n, m in MODULES.items() if m.shim_of))
def test_old_import_paths_are_the_new_modules(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MODULES[old].shim_of or "")


def test_the_public_names_stay_where_they_were() -> None:
    import stopwise as sw
    from stopwise import rules, trace

    assert callable(sw.calibrate) and sw.calibrate is sys.modules["stopwise.core.calibrate"].calibrate
    importlib.import_module("stopwise.calibrate")  # a late import of the old path must not rebind sw.calibrate
    assert callable(sw.calibrate)
    assert sw.Trace is trace.Trace and sw.MaxProb is rules.MaxProb and sw.rules.base.Stopper is sw.Stopper


def test_importing_stopwise_and_the_lazy_adapters_loads_no_torch() -> None:
    code = ("import sys, stopwise, stopwise.encoder, stopwise.decoder; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent)
    assert run.returncode == 0, run.stderr


def test_optional_adapter_modules_are_skipped_when_absent_and_raise_when_broken(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from stopwise.cli import ADAPTER_CLIS
    from stopwise.core.plugins import import_if_present
    from stopwise.core.rules import RULE_PLUGINS

    assert {"stopwise.training.rules", "stopwise.stream.rules"} <= set(RULE_PLUGINS)
    assert {"stopwise.training.cli", "stopwise.stream.cli", "stopwise.serve.cli"} <= set(ADAPTER_CLIS)
    assert import_if_present("stopwise.no_such_adapter.rules") is None
    assert import_if_present("stopwise.sampling.no_such_module") is None
    assert import_if_present("stopwise.sampling.rules") is sys.modules["stopwise.sampling.rules"]
    (tmp_path / "sw_broken_plugin.py").write_text("import sw_dependency_that_is_not_installed\n")
    (tmp_path / "sw_buggy_plugin.py").write_text("from stopwise.core.rules import NoSuchRule\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="sw_dependency_that_is_not_installed"):
        import_if_present("sw_broken_plugin")
    with pytest.raises(ImportError, match="NoSuchRule"):
        import_if_present("sw_buggy_plugin")
