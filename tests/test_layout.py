"""The architecture, checked: data flows one way, kernels <- model <- decode, train <- eval, bench.

Every ``import s1fast.X`` / ``from s1fast.X import`` in every module of the package (module level or inside a
function) is read with ``ast``; a room may import only the rooms listed for it. Top-level modules (``files``,
``commands``, ``env``) are shared by every room but ``kernels``; the router ``cli`` imports the commands lazily.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = {"files", "commands", "env"}
ALLOWED = {
    "kernels": {"kernels"},
    "model": {"kernels", "model"} | SHARED,
    "decode": {"kernels", "model", "decode"} | SHARED,
    "train": {"kernels", "model", "decode", "train"} | SHARED,  # the CPU demo decodes what it trained
    "eval": {"kernels", "model", "decode", "train", "eval"} | SHARED,
    "bench": {"kernels", "model", "decode", "train", "eval", "bench"} | SHARED,
}


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
                bad = {r for r in _imports(path) if r in ALLOWED and r not in ALLOWED[room]}
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
