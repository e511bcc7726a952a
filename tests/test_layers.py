"""The package's layering: each module imports only the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

import qmp_sync

# Bottom first, as API.md lists them.
LAYERS = ["error", "util", "protocol", "message", "events", "qmp_client",
          "_loop", "sync", "legacy"]
# The calls that cross between threads: only the crossing module may
# make them.
CROSSING = ("call_soon_threadsafe", "run_coroutine_threadsafe",
            "threading.Thread", "register_at_fork")


def imported_siblings(module: str) -> set[str]:
    """The qmp_sync modules that `module` imports."""
    path = Path(qmp_sync.__file__).parent / f"{module}.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("qmp_sync."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qmp_sync."):
                    found.add(alias.name.split(".")[1])
    return found


def test_imports_point_down() -> None:
    """No module imports a layer above itself (or an unknown one)."""
    for index, module in enumerate(LAYERS):
        below = set(LAYERS[:index])
        assert imported_siblings(module) <= below, module


def test_every_module_is_a_known_layer() -> None:
    """A new module must take its place in LAYERS (and in API.md)."""
    package = Path(qmp_sync.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_no_qemu_library_import() -> None:
    """qmp_sync stands alone: it never imports QEMU's qemu.qmp."""
    package = Path(qmp_sync.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names]
                     if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [])
            assert not any(n == "qemu" or n.startswith("qemu.")
                           for n in names), path


def test_one_module_crosses_threads() -> None:
    """Only qmp_sync/_loop.py starts threads or schedules work into the
    loop from another thread."""
    package = Path(qmp_sync.__file__).parent
    for path in package.glob("*.py"):
        if path.stem == "_loop":
            continue
        text = path.read_text()
        assert not [name for name in CROSSING if name in text], path
