"""The architecture, checked: data flows one way, kernels <- model <- decode, train <- eval, bench, and no module
imports itself back through others.

Every ``import s1fast.X`` / ``from s1fast.X import`` in every module of the package (module level or inside a
function) is read with ``ast``; a room may import only the rooms listed for it. Top-level modules (``files``,
``commands``, ``env``) are shared by every room but ``kernels``; the router ``cli`` imports the commands lazily.
The same imports, module to module, must form no cycle, inside a room or across rooms (a lazy import inside a
function counts: it hides a cycle, it does not remove it). ``SHIMS``: deprecated re-exports, the one exception to
the rooms' direction, imported lazily and only when the old name is used.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = {"files", "commands", "env", "client"}
ALLOWED = {
    "kernels": {"kernels"},
    "model": {"kernels", "model"} | SHARED,
    "decode": {"kernels", "model", "decode"} | SHARED,
    "train": {"kernels", "model", "decode", "train"} | SHARED,  # the CPU demo decodes what it trained
    "eval": {"kernels", "model", "decode", "train", "eval"} | SHARED,
    "data": {"kernels", "model", "decode", "train", "eval", "data"} | SHARED,
    "bench": {"kernels", "model", "decode", "train", "eval", "data", "bench"} | SHARED,
}

SHIMS = {"model/__init__.py": {"decode"}}  # ``from s1fast.model import Decoder, BudgetForcing``: deprecated, lazy


def _imports(path: str) -> set[str]:
    """The s1fast rooms (first component after ``s1fast.``) that the module at ``path`` imports."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "s1fast"]
    return {n.split(".")[1] for n in names if n.startswith("s1fast.")}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_downstream(room):
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, room)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                allowed = ALLOWED[room] | SHIMS.get(os.path.relpath(path, ROOT), set())
                bad = {r for r in _imports(path) if r in ALLOWED and r not in allowed}
                bad |= {r for r in _imports(path) if r in SHARED and r not in ALLOWED[room]}
                if bad:
                    found[os.path.relpath(path, ROOT)] = sorted(bad)
    assert found == {}, f"{room}/ imports rooms it must not: {found}"


def test_shared_modules_import_no_room_above_model():
    for name in SHARED:
        rooms = _imports(os.path.join(ROOT, f"{name}.py")) - SHARED
        assert rooms <= {"kernels", "model", "decode"}, f"{name}.py imports {rooms}"


def test_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    from s1fast.bench.common import x\n    import s1fast.eval.scaling\nfrom s1fast import decode\n"
    )
    assert _imports(str(path)) == {"bench", "eval", "decode"}


def _modules(root: str) -> Iterator[tuple[str, str]]:
    """(dotted name under ``s1fast``, path) of every module of the package at ``root`` (tests excluded)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("tests", "__pycache__") and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[: -len(".py")].split(os.sep)
                yield ".".join(["s1fast", *rel[:-1]] + ([] if rel[-1] == "__init__" else [rel[-1]])), \
                    os.path.join(folder, name)


def _import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from s1fast.a import b``: ``s1fast.a.b`` when that is a
    module, else ``s1fast.a``), at module level or inside functions."""
    paths = dict(_modules(root))
    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names}
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _import_graph(ROOT)
    assert "s1fast.decode.decoder" in graph and "s1fast.decode.engine" in graph["s1fast.decode.decoder"]
    assert _cycles(graph) == [], "modules that import each other (directly or through others)"


def test_cycle_checker_finds_lazy_and_indirect_cycles(tmp_path):
    """decoder -> engine at module level, engine -> decoder inside a function (the cycle of issue 26); a -> b -> c
    -> a across rooms; d -> e one way only."""
    files = {
        "decode/__init__.py": "",
        "decode/decoder.py": "from s1fast.decode.engine import run\n",
        "decode/engine.py": "def run():\n    from s1fast.decode.decoder import _bucket\n",
        "model/__init__.py": "",
        "model/a.py": "import s1fast.model.b\n",
        "model/b.py": "from s1fast.eval import c\n",
        "eval/__init__.py": "",
        "eval/c.py": "from s1fast.model.a import x\n",
        "d.py": "from s1fast import e\n",
        "e.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cycles(_import_graph(str(tmp_path))) == [
        ["s1fast.decode.decoder", "s1fast.decode.engine"],
        ["s1fast.eval.c", "s1fast.model.a", "s1fast.model.b"],
    ]
