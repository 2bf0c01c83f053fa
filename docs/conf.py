"""Sphinx configuration for the sw_hooks documentation (``sphinx-build -W docs docs/_build``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not
os.environ.setdefault("MPLBACKEND", "Agg")

project = "sw_hooks"
author = "sw_hooks contributors"
copyright = "the sw_hooks contributors"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# docs/report/ holds a report written by `sw-hooks report --out docs/report`: its figures are
# shown in the guides; its own report.md is that command's output, not a page of this site.
exclude_patterns = ["_build", "report/report.md"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Each name is documented once, in the module that defines it: a module's __all__ may list
# names it imports (the package's top level, the short entry paths), and those are not
# documented again there.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "sw_hooks"


# -- API reference: one page per room, generated from the package at build time ------------
# Every public module (no leading underscore) is documented from its docstrings, so a module
# added or moved shows up without editing this site.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ext.api_pages import write_api_pages  # noqa: E402

write_api_pages(ROOT / "sw_hooks", Path(__file__).resolve().parent / "api")
