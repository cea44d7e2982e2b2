"""Sphinx configuration of the nmfjax API reference (built offline: sphinx-build -W -b html docs/api DIR)."""

import nmfjax

project = "nmfjax"
author = "the nmfjax authors"
release = version = nmfjax.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Every reference must resolve (a broken one fails the -W build), except names of other projects:
# the build runs offline, without intersphinx.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|flax|nnx|optax|orbax|ml_collections|numpy|collections|pathlib|types|typing)(\..*)?"),
]
default_role = "code"
html_theme = "alabaster"
exclude_patterns = ["_build"]
