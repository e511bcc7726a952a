"""
Run code written for QEMU's ``qemu.qmp`` package on qmp_sync, unchanged.

`install()` makes ``import qemu.qmp`` and its submodules (``legacy``,
``qmp_client``, ``protocol``, ``error``, ``message``, ``events``,
``util``) resolve to qmp_sync's modules of the same names, so that a
tree of code that imports ``qemu.qmp`` in many files (QEMU's iotests,
say) runs on qmp_sync without edits. It changes nothing else: the rest
of the ``qemu`` namespace (``qemu.machine``, ``qemu.utils``) is still
imported from wherever it lives, so QEMU's own machine layer runs on
our ``qemu.qmp``; only where no ``qemu.machine`` can be found at all
does ``qmp_sync.machine`` stand in for it (``QEMUMachine`` with the
same names).

As a command, ``python -m qmp_sync.compat SCRIPT [ARGS...]`` installs
the switch and runs ``SCRIPT`` as ``__main__`` with ``ARGS``.

Threads: `install` runs in the caller's thread; call it before anything
imports ``qemu.qmp``.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys
import types
from collections.abc import Sequence

from .error import QMPError

__all__ = ("ALIASES", "install", "main")

#: ``qemu.qmp`` module names and the qmp_sync modules they resolve to.
ALIASES = {
    "qemu.qmp": "qmp_sync",
    "qemu.qmp.error": "qmp_sync.error",
    "qemu.qmp.events": "qmp_sync.events",
    "qemu.qmp.legacy": "qmp_sync.legacy",
    "qemu.qmp.message": "qmp_sync.message",
    "qemu.qmp.protocol": "qmp_sync.protocol",
    "qemu.qmp.qmp_client": "qmp_sync.qmp_client",
    "qemu.qmp.util": "qmp_sync.util",
}


def install() -> None:
    """
    Make ``qemu.qmp`` and its submodules resolve to qmp_sync. Calling it
    again does nothing.

    :raise QMPError: When the real ``qemu.qmp`` (or one of its modules)
        is imported already: code holding it would mix the two
        libraries. Install the switch first thing, or run the program
        with ``python -m qmp_sync.compat``.
    """
    for alias, target in ALIASES.items():
        present = sys.modules.get(alias)
        if present is not None and present.__name__ != target:
            raise QMPError(
                f"{alias} is imported already (from "
                f"{getattr(present, '__file__', None) or 'somewhere'}): "
                "install qmp_sync.compat before anything imports qemu.qmp, "
                "or run the program with python -m qmp_sync.compat SCRIPT")
    qemu = sys.modules.get("qemu")
    if qemu is None:
        if importlib.util.find_spec("qemu") is not None:
            qemu = importlib.import_module("qemu")
        else:
            # No qemu namespace anywhere: an empty package to hold ours.
            qemu = types.ModuleType("qemu")
            qemu.__path__ = []
            sys.modules["qemu"] = qemu
    for alias, target in ALIASES.items():
        sys.modules[alias] = importlib.import_module(target)
    qemu.qmp = sys.modules["qemu.qmp"]  # type: ignore[attr-defined]
    if importlib.util.find_spec("qemu.machine") is None:
        # No QEMU tree to take its machine layer from: ours stands in.
        for alias in ("qemu.machine", "qemu.machine.machine"):
            sys.modules[alias] = importlib.import_module("qmp_sync.machine")
        qemu.machine = sys.modules[  # type: ignore[attr-defined]
            "qemu.machine"]


def main(argv: Sequence[str] | None = None) -> int:
    """
    ``python -m qmp_sync.compat SCRIPT [ARGS...]``: install the switch,
    then run SCRIPT as ``__main__`` with ``sys.argv`` set to
    ``[SCRIPT, *ARGS]``. Returns the exit status for usage errors; the
    script's own exit passes through as ``SystemExit``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m qmp_sync.compat SCRIPT [ARGS...]\n\n"
              "Run SCRIPT with 'import qemu.qmp' resolving to qmp_sync.",
              file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    install()
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
