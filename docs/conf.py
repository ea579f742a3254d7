"""Sphinx configuration: furo, MyST Markdown pages, autodoc from the installed package.

Build: ``scripts/docs`` (warnings are errors), or
``python -m sphinx -W --keep-going -b html docs build/docs``.
"""

from __future__ import annotations

import aiocuda

project = "aiocuda"
author = "the aiocuda authors"
copyright = "the aiocuda authors"
release = version = aiocuda.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx_copybutton",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"aiocuda {release}"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"  # no parameter list of internals
autodoc_default_options = {"members": True, "undoc-members": False}
# Names in signatures that are not documented objects of their own.
nitpick_ignore_regex = [(r"py:.*", r"(T|StreamLike|_core\..*|asyncio\..*|torch\..*|tf\..*)")]

# Offline builds: no inventory is fetched. Cross-references to the standard library are plain text.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

copybutton_prompt_text = r"\$ "
copybutton_prompt_is_regexp = True
