"""The shape of the house, checked: no import cycle between our modules, no function-local import of
our own modules (the usual way to hide a cycle), no function over 60 lines, and the layout that
CONTRIBUTING.md draws."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import tqcompressor

SRC = Path(tqcompressor.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(SRC.rglob("*.py"))}


def _imports(tree: ast.Module, known: set[str]) -> list[tuple[str, bool]]:
    """``(our module imported, at module level?)`` for every import of one of ours in ``tree``."""
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tqcompressor"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in known else node.module, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names if a.name.startswith("tqcompressor")]
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_no_import_cycle_between_our_modules():
    modules = _modules()
    graph = {
        name: {target for target, _ in _imports(tree, set(modules)) if target != name} for name, tree in modules.items()
    }
    # a package's __init__ re-exports its modules: importing one of them runs it first, by design
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_packages_are_layered():
    """Between the groups (planning, surgery, quant, ...) imports go one way only: each group can be
    read knowing only the groups below it."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        group = _group(name)
        graph.setdefault(group, set()).update(_group(t) for t, _ in _imports(tree, set(modules)) if _group(t) != group)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _group(module: str) -> str:
    """``tqcompressor.planning.auto`` -> ``planning``; a top-level module is a group of its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_our_modules_are_imported_at_the_top_of_each_file():
    modules = _modules()
    local = [
        (name, target) for name, tree in modules.items() for target, top in _imports(tree, set(modules)) if not top
    ]
    assert local == []


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_layout_contributing_draws():
    """Every module of the package has its line in CONTRIBUTING.md's picture, in its own folder."""
    groups = {"structures", "linalg", "planning", "surgery", "quant", "training", "evaluation", "modelio"}
    assert {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} == groups
    drawn = _drawn_paths((REPO / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    modules = {str(path.relative_to(SRC.parent)) for path in SRC.rglob("*.py") if path.name != "__init__.py"}
    assert modules - drawn == set()
    drawn_modules = {path for path in drawn if path.startswith("tqcompressor/")}
    assert drawn_modules - modules - {"tqcompressor/__init__.py"} == set()  # nothing drawn that is gone


def _drawn_paths(text: str) -> set[str]:
    """The file paths of the picture (the first code block after "The house in one picture"), read
    from its indentation: a name ending in ``/`` opens a folder, one ending in ``.py`` is a file."""
    block = text.split("## The house in one picture", 1)[1].split("```")[1]
    folders: list[tuple[int, str]] = []
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        if not name.endswith(("/", ".py")):
            continue  # a description carried over to the next line
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = "/".join([f.rstrip("/") for _, f in folders] + [name])
        if name.endswith("/"):
            folders.append((indent, name))
        else:
            paths.add(path.removeprefix("src/"))
    return paths


def test_the_version_is_the_one_pyproject_declares():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert tqcompressor.__version__ == declared
