"""The package's shape, read from its source: imports flow one way (no cycle anywhere), nothing
imports the CLI, the model never imports what runs it, imports sit at module level unless the
dependency is optional, and each module stays small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import havoc_core

PKG = Path(havoc_core.__file__).parent
MODULES = {p.stem: p for p in PKG.glob("*.py")}
MAX_LINES = 450
# third-party packages that are optional extras (or platform-dependent): imported where they are used
OPTIONAL = {"datasets", "transformers", "matplotlib", "readline", "lm_eval", "gguf", "llama_cpp", "xgrammar",
            "llguidance", "prometheus_client", "zstandard", "pyarrow", "xxhash"}
# the layers that build the model: none of them may import what trains, runs or serves it
CORE = {"errors", "atomic", "config", "attention", "mlp", "kv_cache", "model", "checkpoint"}
RUNNERS = {"engine", "inference", "chat", "train", "serve", "server_loop", "hf", "demo", "evaluate", "cli"}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import in ``path`` outside
    ``if TYPE_CHECKING:`` blocks; ``havoc_core.x`` is reported as ``x``, the package as ``__init__``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "havoc_core":
                    found.extend((a.name if a.name in MODULES else "havoc_core", child.lineno, top)
                                 for a in child.names)
                else:
                    found.append((child.module, child.lineno, top))
            visit(child, top and isinstance(child, (ast.If, ast.Try)))

    visit(ast.parse(path.read_text()), True)
    return [((m.removeprefix("havoc_core.") if m.startswith("havoc_core.") else "__init__" if m == "havoc_core"
              else m), line, top) for m, line, top in found]


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in imports(path) if m in MODULES} for name, path in MODULES.items()}


def test_no_import_cycle_anywhere():
    edges, state, stack = graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_layering():
    edges = graph()
    assert not [m for m, deps in edges.items() if "cli" in deps], "nothing imports the CLI"
    for core in CORE:
        assert not edges[core] & RUNNERS, f"{core} imports {edges[core] & RUNNERS}"


def test_imports_at_module_level_unless_optional():
    """A function-level import is an optional dependency, or says on its line why it waits."""
    lazy = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for module, line, top in imports(path):
            if not top and module.split(".")[0] not in OPTIONAL and "#" not in lines[line - 1]:
                lazy.append(f"{name}.py:{line}: {module}")
    assert not lazy, lazy


def test_modules_are_small_and_say_what_they_are():
    for name, path in MODULES.items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        assert doc, f"{name}.py has no module docstring"
        n = len(text.splitlines())
        assert n <= MAX_LINES or "long because" in doc.lower(), f"{name}.py: {n} lines, no reason at its top"


def test_this_test_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check can fail: two modules that import each other are reported."""
    (tmp_path / "a.py").write_text('"""a"""\nfrom havoc_core.b import x\n')
    (tmp_path / "b.py").write_text('"""b"""\ndef f():\n    from havoc_core.a import y\n')
    monkeypatch.setattr(__import__(__name__), "MODULES", {"a": tmp_path / "a.py", "b": tmp_path / "b.py"})
    try:
        test_no_import_cycle_anywhere()
    except AssertionError as e:
        assert "a -> b -> a" in str(e)
    else:
        raise AssertionError("the cycle a <-> b went unnoticed")
