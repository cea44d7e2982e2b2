"""Sphinx configuration of nmfjax's guide: the pages by task, the tutorial notebook and the API reference.

Built offline, the notebook executed, warnings as errors: sphinx-build -W -b html docs DIR.
"""

import nmfjax

project = "nmfjax"
author = "the nmfjax authors"
release = version = nmfjax.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Every reference must resolve (a broken one fails the -W build), except names of other projects:
# the build runs offline, without intersphinx.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|flax|nnx|optax|orbax|ml_collections|numpy)(\..*)?"),
    ("py:.*", r"(collections|contextvars|pathlib|types|typing)(\..*)?"),
]
default_role = "code"

# Markdown pages (MyST) and the tutorial, a MyST notebook paired with tutorial.ipynb by jupytext:
# the .md is the source, executed at every build; a cell's error fails the build.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True

html_theme = "sphinx_book_theme"
html_title = f"nmfjax {release}"
html_theme_options = {"show_toc_level": 2}
# Records, not pages: the benchmark's and the runs' own notes stay files of the repository; the
# paired notebook is the tutorial's copy.
exclude_patterns = ["_build", "gpu/*/README.md", "reproduction/compare.md", "tutorial.ipynb", "runs/README.md"]
