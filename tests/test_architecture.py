"""The house rules of ARCHITECTURE.md, read from the source: who may import whom, no circles, short functions.

Every import counts, function-local ones included (a lazy import may save start-up time, never hide a
circle). ``loopus`` is the CLI; the model files travel as remote code and import only each other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loopus", "loopus_core", "loopus_analyze", "loopus_convert", "loopus_train")
ALLOWED = {  # package -> the other first-party packages it may import
    "loopus": {"loopus_core", "loopus_analyze", "loopus_convert", "loopus_train"},
    "loopus_train": {"loopus_convert", "loopus_core"},
    "loopus_analyze": {"loopus_core"},
    "loopus_convert": {"loopus_core"},
    "loopus_core": set(),
}
REMOTE_CODE = {"loopus_convert.configuration_loopus", "loopus_convert.modeling_loopus"}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = file
    return found


def _imports(name: str, file: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; relative imports resolved), anywhere in the file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _first_party(imported: set[str], modules: dict[str, Path]) -> set[str]:
    """The imported names that are our modules (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    return {m for m in imported if m in modules and m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        targets = _first_party(_imports(name, file), modules)
        # importing a submodule runs its package's __init__: not an edge to the importer's own package
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def test_no_stage_imports_another_and_nothing_imports_the_cli():
    wrong = []
    for name, targets in _graph().items():
        own = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != own and other not in ALLOWED[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that break ARCHITECTURE.md's rules:\n" + "\n".join(sorted(wrong))


def test_remote_code_files_import_only_each_other():
    for name in REMOTE_CODE:
        file = _modules()[name]
        imported = _imports(name, file)
        ours = _first_party(imported, _modules())
        assert ours <= REMOTE_CODE | {"loopus_convert"}, f"{name} imports {sorted(ours - REMOTE_CODE)}"
        third_party = {m.split(".")[0] for m in imported} - set(PACKAGES) - {"__future__"}
        stdlib = {"math", "inspect", "dataclasses", "typing", "contextlib", "collections"}
        assert third_party <= {"torch", "transformers"} | stdlib, (
            third_party
        )


def test_no_import_circle_between_files():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle.extend(path[path.index(target) :] + [target] if target in path else [node, target])
                return True
            if target not in state and visit(target, [*path, target]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if node not in state and visit(node, [node]):
            break
    assert not cycle, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_library_function_is_longer_than_a_screen(package):
    long = []
    for file in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checker_sees_function_local_imports(tmp_path):
    """The rule holds for imports inside functions too (the way circles used to be hidden)."""
    file = tmp_path / "mod.py"
    file.write_text("def f():\n    from loopus_train.train import train\n    return train\n")
    assert "loopus_train.train" in _imports("loopus_convert.mod", file)


def test_every_gate_is_built_by_the_one_factory():
    """``SelectiveGate(...)`` is called in one place, ``make_gate`` in the model file; the model, the
    converter and the in-memory wrapper all go through it (a new gate type touches that factory only)."""
    root = Path(__file__).resolve().parents[1]
    calls = {}
    for path in sorted(root.glob("loopus*/**/*.py")):
        text = path.read_text()
        count = text.count("SelectiveGate(") - text.count("class SelectiveGate(")
        if count:
            calls[path.relative_to(root).as_posix()] = count
    assert calls == {"loopus_convert/modeling_loopus.py": 1}
    for name in ("loopus_convert/build.py", "loopus_convert/convert.py"):
        assert "make_gate(" in (root / name).read_text()
    model_file = (root / "loopus_convert/modeling_loopus.py").read_text()
    assert "self.gate = make_gate(config)" in model_file


def test_modules_are_imported_under_their_own_names():
    """No ``from pkg import module as module_mod``: a module is imported as itself, or its names are."""
    aliased = []
    for file in sorted(ROOT.glob("loopus*/**/*.py")) + sorted(ROOT.glob("benchmarks/**/*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                aliased += [
                    f"{file.relative_to(ROOT)}:{node.lineno} {alias.name} as {alias.asname}"
                    for alias in node.names
                    if alias.asname and alias.asname.endswith("_mod")
                ]
    assert not aliased, "module aliases:\n" + "\n".join(aliased)


def test_benchmarks_import_library_code_not_tests():
    """Issue 27 item 4: a benchmark measures the library; tests may import a benchmark, never the reverse."""
    pattern = re.compile(r"^\s*(from tests[. ]|import tests\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").rglob("*")
                 if p.suffix in (".py", ".sh") and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
