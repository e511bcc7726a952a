"""
The ``qmp-shell`` and ``qmp-shell-wrap`` programs: an interactive QMP
shell with live events, tab completion and help from the server's own
schema, history, and a scripting mode.

Its modules, bottom first: `syntax` (a typed line as a command),
`schema` (what the server understands), `output` (JSON in colour,
columns, wrapping), `completion` (what may come next on a line),
`console` (the terminal: readline, history, live events), `cli`
(``qmp-shell``), `wrap` (``qmp-shell-wrap``).
"""

from __future__ import annotations

from .cli import main
from .wrap import wrap_main

__all__ = ("main", "wrap_main")
