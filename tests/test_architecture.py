"""The shape of the code, checked: no import cycles, small modules, one home for each private API and name.

The layer contract itself is checked by import-linter (`make lint`, configured in pyproject.toml); these are the
rules it cannot express. Each reads the source with `ast`, so a failure names the file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "chattune"
MAX_LINES = 600
# transformers documents these as the methods a slow tokenizer subclass implements
TOKENIZER_HOOKS = {"_tokenize", "_convert_token_to_id", "_convert_id_to_token"}


def modules() -> dict[str, Path]:
    """chattune's modules by dotted name."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that runs at import or call time (what sits under `if TYPE_CHECKING:` is left out)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in typing_only]


def import_graph() -> dict[str, set[str]]:
    """module -> the chattune modules it imports, at the top or inside functions."""
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join([*parts[: len(parts) - node.level + 1], base])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("chattune."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert graph["chattune.train.run"], "the import graph came out empty: the scan is broken"
    assert not cycles(graph)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_too_long() -> None:
    long = {n: c for n, p in modules().items() if (c := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: split them by job"


def private_uses(path: Path) -> list[str]:
    """Places in `path` that touch a private name of another library (attribute, getattr, import, override)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        where = f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where}: .{node.attr}")
            elif isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super":
                found.append(f"{where}: super().{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
        elif (
            isinstance(node, ast.ImportFrom)
            and not (node.module or "").startswith("chattune")
            and not node.level
        ):
            module = node.module or ""
            if any(private(part) for part in module.split(".")) or any(private(a.name) for a in node.names):
                found.append(f"{where}: from {module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.ClassDef):
            names = [i.name for i in node.body if isinstance(i, ast.FunctionDef) and private(i.name)]
            found += [
                f"{where}: {node.name}.{n} overrides a library's private method"
                for n in overrides(path, node.name, names)
            ]
    return found


def overrides(path: Path, class_name: str, names: list[str]) -> list[str]:
    """Those of `names` (private methods a chattune class defines) that a non-chattune base class also has."""
    if not names:
        return []
    import importlib

    dotted = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    cls = getattr(importlib.import_module(dotted), class_name, None)
    if cls is None:  # a class defined inside a function
        return []
    foreign = [b for b in cls.__mro__[1:] if not b.__module__.startswith("chattune")]
    return [n for n in names if n not in TOKENIZER_HOOKS and any(n in vars(b) for b in foreign)]


def test_private_apis_of_other_libraries_only_in_compat() -> None:
    outside = [use for p in SRC.rglob("*.py") if "compat" not in p.parts for use in private_uses(p)]
    assert not outside, "move these into src/chattune/compat/ (with the version and the reason)"
    inside = [use for p in (SRC / "compat").rglob("*.py") for use in private_uses(p)]
    assert inside, "the scan finds nothing even in compat/: it is broken"


def test_no_unittest_mock_in_the_package() -> None:
    users = [p for p in SRC.rglob("*.py") if "unittest" in p.read_text(encoding="utf-8")]
    assert not users


def test_names_with_one_home() -> None:
    """The run record's file name and torchrun's rank variables are spelled in one module each."""
    homes = {'"chattune.json"': {"rundir.py"}, '"RANK"': {"system.py"}, '"LOCAL_RANK"': {"system.py"}}
    for spelling, allowed in homes.items():
        users = {p.name for p in SRC.rglob("*.py") if spelling in p.read_text(encoding="utf-8")}
        assert users == allowed, spelling
