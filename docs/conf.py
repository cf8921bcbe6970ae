"""Sphinx configuration: the guides (Markdown, through MyST) and the API reference.

Built by `make test` (tests/smoke/test_docs.py) with warnings as errors, so a
docstring that stops rendering fails the suite. Offline: math is rendered by
MathJax in the reader's browser; nothing is fetched at build time.
"""

project = "optax_prune"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"  # The signatures say enough; the Args say the rest.
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
