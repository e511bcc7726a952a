"""The package's layering: each module imports only the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

import qmp_sync

# Bottom first, as API.md lists them.
LAYERS = ["error", "util", "_linereader", "protocol", "message", "events",
          "qmp_client", "_loop", "_event_queue", "sync", "legacy", "machine",
          "fake_server", "testing", "compat", "shell"]
# The shell package's own modules, bottom first.
SHELL_LAYERS = ["syntax", "schema", "output", "completion", "console",
                "cli", "wrap"]
# The calls that cross into the loop from another thread: only the
# crossing module may make them.
CROSSING = ("call_soon_threadsafe", "run_coroutine_threadsafe",
            "register_at_fork")
# Starting a thread: the loop thread, the shell's event pump (a caller
# of the blocking client like any other), and the fake server's
# threads (a peer for tests, not part of any client).
STARTS_THREADS = {"_loop.py", "console.py", "fake_server.py"}

PACKAGE = Path(qmp_sync.__file__).parent
# The package's own private modules: internal layers, importable inside
# the package.
PRIVATE_MODULES = {path.stem for path in PACKAGE.glob("_*.py")} - {
    "__init__", "__main__"}


def imports_of(path: Path, in_shell: bool) -> tuple[set[str], set[str]]:
    """The qmp_sync modules, and the qmp_sync.shell modules, that the
    file at `path` imports."""
    library, shell = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [(node.level, node.module)]
        elif isinstance(node, ast.Import):
            names = [(0, alias.name) for alias in node.names]
        for level, name in names:
            parts = name.split(".")
            if (level == 1 and in_shell) or parts[:2] == ["qmp_sync",
                                                          "shell"]:
                shell.add(parts[-1] if level == 0 else parts[0])
            elif level == 1 or (level == 2 and in_shell):
                library.add(parts[0])
            elif parts[0] == "qmp_sync" and len(parts) > 1:
                library.add(parts[1])
    return library, shell


def imported_siblings(module: str) -> set[str]:
    """The qmp_sync modules that `module` imports (for the shell
    package: that any of its modules imports)."""
    if module == "shell":
        return set().union(*(imports_of(path, True)[0]
                             for path in (PACKAGE / "shell").glob("*.py")))
    return imports_of(PACKAGE / f"{module}.py", False)[0]


def test_imports_point_down() -> None:
    """No module imports a layer above itself (or an unknown one)."""
    for index, module in enumerate(LAYERS):
        below = set(LAYERS[:index])
        assert imported_siblings(module) <= below, module


def test_shell_imports_point_down() -> None:
    """Inside qmp_sync.shell too, each module imports only the ones
    below it (and any library layer)."""
    for index, module in enumerate(SHELL_LAYERS):
        path = PACKAGE / "shell" / f"{module}.py"
        shell = imports_of(path, True)[1]
        assert shell <= set(SHELL_LAYERS[:index]), module


def test_every_module_is_a_known_layer() -> None:
    """A new module must take its place in LAYERS (and in API.md)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules | {"shell"} == set(LAYERS)
    shell = {p.stem for p in (PACKAGE / "shell").glob("*.py")}
    assert shell - {"__init__", "__main__"} == set(SHELL_LAYERS)


def test_no_qemu_library_import() -> None:
    """qmp_sync stands alone: it never imports QEMU's qemu.qmp."""
    for path in PACKAGE.glob("**/*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names]
                     if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [])
            assert not any(n == "qemu" or n.startswith("qemu.")
                           for n in names), path


def test_one_module_crosses_threads() -> None:
    """Only qmp_sync/_loop.py schedules work into the loop from another
    thread; threads are started only there, by the shell's event pump
    and by the fake server for tests."""
    for path in PACKAGE.glob("**/*.py"):
        text = path.read_text()
        if path.name != "_loop.py":
            assert not [name for name in CROSSING if name in text], path
        if path.name not in STARTS_THREADS:
            assert "threading.Thread" not in text, path


def private_names_defined(tree: ast.AST) -> set[str]:
    """The `_private` names a module defines: functions, classes, class
    attributes, and attributes it assigns on ``self``/``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                             ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return {name for name in names if is_private(name)}


def is_private(name: str) -> bool:
    """A ``_name``, not a ``__dunder__``."""
    return name.startswith("_") and not name.endswith("__")


def foreign_private_accesses(path: Path) -> list[str]:
    """
    Where the module at `path` reads a `_private` attribute that it
    does not define itself, on anything but ``self``, ``cls`` or
    ``super()`` (a subclass's own inherited state and hooks are its
    own), and `_private` names it imports from elsewhere.
    """
    tree = ast.parse(path.read_text())
    own = private_names_defined(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno}: imports {alias.name}"
                      for alias in node.names
                      if is_private(alias.name)
                      and alias.name not in PRIVATE_MODULES]
            continue
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"):
            continue
        if node.attr in own:
            continue
        found.append(f"{path.name}:{node.lineno}: "
                     f"{ast.unparse(node)}")
    return found


def test_no_module_touches_another_modules_privates() -> None:
    """The layers talk through their documented names only: no module
    reaches into a `_private` attribute that another module defines
    (the blocking layer uses the async client's public interface)."""
    found = []
    for path in sorted(PACKAGE.glob("**/*.py")):
        found += foreign_private_accesses(path)
    assert found == []
