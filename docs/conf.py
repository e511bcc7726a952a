"""Sphinx configuration of qmp_sync's reference manual.

Build it with ``sphinx-build -W --keep-going -n -b html docs
docs/_build/html``. Only Sphinx's own extensions and theme are used, and
nothing is fetched from the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The manual documents the package of this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qmp_sync

project = "qmp_sync"
author = "The qmp_sync developers"
copyright = "the qmp_sync developers (MIT licence)"
version = release = qmp_sync.__version__

extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Without intersphinx (the build must work offline), references to the
# standard library and to pytest's classes in type hints cannot resolve;
# they are the only ones ignored.
nitpick_ignore_regex = [
    (r"py:(class|exc|obj|data)",
     r"(collections|socket|ssl|os|asyncio|subprocess|typing|types"
     r"|_pytest|pytest)(\..+)?"),
    (r"py:class", r"SSLContext"),
]
