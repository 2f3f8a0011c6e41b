"""Sphinx configuration of the mxnet-mirror-hook manual (``make docs``)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

from mxnet_mirror_hook import __version__  # noqa: E402

project = "mxnet-mirror-hook"
author = "the mxnet-mirror-hook authors"
copyright = "the mxnet-mirror-hook authors, Apache-2.0"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
    "myst_parser",
    "mirror_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style anchors for the pages' headings (``page.md#heading``), ``$`` left alone.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# autodoc + numpydoc: the docstrings are numpydoc; the signatures' annotations repeat what
# the Parameters sections say, so signatures show names and defaults only.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"mxnet-mirror-hook {release}"
html_static_path = ["_static"]
html_theme_options = {"description": "Memory mirroring for Apache MXNet 1.9", "fixed_sidebar": True,
                      "page_width": "1240px", "sidebar_width": "260px"}
