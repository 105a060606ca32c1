"""Sphinx configuration of the goodfellow site.

The build needs no network: MathJax is bundled (sphinx-mathjax-offline), pandoc comes from
pypandoc-binary, there is no intersphinx, and no page loads anything from a CDN. It is run as
``python -m sphinx -W --keep-going -n -b html docs docs/_build/html`` (``make docs``), so every
warning, including an unresolved cross-reference, fails the build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import goodfellow  # noqa: E402

# -- Project -------------------------------------------------------------------------------------

project = "goodfellow"
author = "The goodfellow developers"
copyright = "2026, The goodfellow developers"
release = goodfellow.__version__
version = ".".join(release.split(".")[:2])

# Placeholder: the public repository the Colab and Binder links point to. Change it (and the
# Documentation URL in pyproject.toml) when the project is published under another name.
REPOSITORY_URL = "https://github.com/goodfellow-dev/goodfellow"
REPOSITORY_BRANCH = "main"

# -- pandoc (nbsphinx converts notebook markdown with it) ------------------------------------------

# pypandoc-binary ships a pandoc executable; putting its folder first on PATH means the build
# needs no system pandoc.
try:
    import pypandoc
except ImportError:  # a system pandoc on PATH still works
    pass
else:
    try:
        _pandoc_dir = os.path.dirname(pypandoc.get_pandoc_path())
    except OSError:
        pass
    else:
        os.environ["PATH"] = _pandoc_dir + os.pathsep + os.environ.get("PATH", "")

# -- Tutorials: tutorials/*.ipynb are the sources, docs/tutorials/ a build-time copy --------

TUTORIALS_SOURCE = ROOT / "tutorials"
TUTORIALS_COPY = DOCS / "tutorials"  # gitignored
_SKIP = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", ".*")


def _copy_tutorials() -> None:
    """Mirror tutorials/ into docs/tutorials/ so the notebooks live inside the Sphinx source tree.

    Notebooks deleted or renamed in tutorials/ disappear from the copy too, so a stale page can't
    linger in the site.
    """
    if TUTORIALS_COPY.exists():
        shutil.rmtree(TUTORIALS_COPY)
    if TUTORIALS_SOURCE.is_dir():
        shutil.copytree(TUTORIALS_SOURCE, TUTORIALS_COPY, ignore=_SKIP)
    else:
        TUTORIALS_COPY.mkdir()


_copy_tutorials()

# -- Benchmarks: the GPU section shows committed GPU results, if there are any ---------------

# Beside benchmarks.rst, so that the paths inside it mean the same to Sphinx and to docutils.
GPU_SECTION = DOCS / "gpu_results.generated.txt"  # gitignored


def _write_gpu_section() -> None:
    """Write the Benchmarks page's GPU section from ``benchmarks/results_cuda.json``."""
    import json

    from benchmarks.report import gpu_section

    results_file = ROOT / "benchmarks" / "results_cuda.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    GPU_SECTION.write_text(gpu_section(results))


_write_gpu_section()

# -- General -------------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "nbsphinx",
]

exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "tutorials/**/*.rst",
    "tutorials/**/*.md",
]
nitpicky = True
# Types that appear in signatures and have no page in this offline build (there is no
# intersphinx): they are shown as plain text instead of failing the nitpicky build.
nitpick_ignore_regex = [
    ("py:class", r"torch(\..*)?"),
    ("py:class", r"Tensor"),
    ("py:class", r"nn\..*"),
    ("py:class", r"numpy(\..*)?"),
    ("py:class", r"np\..*"),
    ("py:class", r"collections\.abc\..*"),
    ("py:class", r"typing\..*"),
    ("py:class", r"Sequence|Callable|Iterable|Iterator|Mapping|Any"),
    ("py:class", r"LossFunction"),
]

# -- autodoc / napoleon: Google-style docstrings --------------------------------------------------

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True


def _resolve_reexports(app, env, node, contnode):
    """Resolve ``goodfellow.NAME`` to the module that defines NAME.

    The package re-exports every public name (``goodfellow.goodfellow_backprop``), while the API
    page documents each name in its module (``goodfellow.backprop.goodfellow_backprop``).
    Docstrings and pages may use either spelling.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    prefix = "goodfellow."
    if not target.startswith(prefix):
        return None
    name, _, rest = target[len(prefix) :].partition(".")
    obj = getattr(goodfellow, name, None)
    module = getattr(obj, "__module__", None)
    if name not in goodfellow.__all__ or not module or module == "goodfellow":
        return None
    new_target = f"{module}.{name}" + (f".{rest}" if rest else "")
    domain = env.get_domain("py")
    new_node = node.deepcopy()
    new_node["reftarget"] = new_target
    return domain.resolve_xref(
        env, node.get("refdoc", ""), app.builder, node["reftype"], new_target, new_node, contnode
    )


# -- Bibliography --------------------------------------------------------------------------------

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# -- nbsphinx: notebooks are executed at every build ----------------------------------------------

nbsphinx_execute = "always"
nbsphinx_allow_errors = False
nbsphinx_timeout = 600
nbsphinx_kernel_name = "python3"
nbsphinx_execute_arguments = [
    "--InlineBackend.figure_formats={'retina'}",
    "--InlineBackend.rc=figure.dpi=96",
    # ipykernel warns on every start that its local TCP channel is unencrypted; nothing to act on.
    "--IPKernelApp.log_level=ERROR",
]
# nbsphinx would otherwise load require.js (and, with widgets, more) from a CDN on every page.
nbsphinx_requirejs_path = ""
nbsphinx_widgets_path = ""
html_sourcelink_suffix = ""

# Every tutorial page starts with links to run it: the notebook itself (copied next to the page
# by nbsphinx, with its outputs), Colab and Binder (both read the notebook from the repository).
_GITHUB_PATH = REPOSITORY_URL.removeprefix("https://github.com/")
_COLAB = f"https://colab.research.google.com/github/{_GITHUB_PATH}/blob/{REPOSITORY_BRANCH}/"
_BINDER = f"https://mybinder.org/v2/gh/{_GITHUB_PATH}/{REPOSITORY_BRANCH}?labpath="
nbsphinx_prolog = r"""
{%- set notebook = env.docname.split('/')[-1] ~ '.ipynb' %}
{%- set repo_path = 'tutorials/' ~ notebook %}
.. raw:: html

    <div class="admonition note run-this-notebook">
      <p class="admonition-title">Run this tutorial yourself</p>
      <p>This page is a Jupyter notebook, executed when the site was built.
      <a class="reference internal" href="{{ notebook }}" download>Download the notebook</a>,
      or open it in <a class="reference external" href="COLAB{{ repo_path }}">Google Colab</a>
      or on <a class="reference external" href="BINDER{{ repo_path }}">Binder</a> (see
      <a class="reference internal" href="../installation.html#colab-and-binder">Installation</a>
      for the one line Colab needs first).</p>
    </div>
""".replace("COLAB", _COLAB).replace("BINDER", _BINDER)

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "furo"
html_title = "goodfellow"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_css_files = ["custom.css"]
html_show_sourcelink = True
html_theme_options = {"navigation_with_keys": True}
pygments_style = "friendly"
pygments_dark_style = "monokai"

# sphinx-copybutton: copy the code of input cells and code blocks, never outputs or prompts.
copybutton_selector = "div:not(.output_area) > div.highlight > pre"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_exclude = ".linenos, .gp, .go"


def _documented_namedtuple_fields() -> set[int]:
    """The ids of NamedTuple field accessors in goodfellow that have a docstring in the source."""
    import inspect

    from sphinx.pycode import ModuleAnalyzer

    documented = set()
    for name in goodfellow.__all__:
        cls = getattr(goodfellow, name)
        if not (inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
            continue
        attribute_docs = ModuleAnalyzer.for_module(cls.__module__).find_attr_docs()
        for field in cls._fields:
            if (cls.__qualname__, field) in attribute_docs:
                documented.add(id(cls.__dict__[field]))
    return documented


_DOCUMENTED_FIELDS = _documented_namedtuple_fields()


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
    """Leave out a NamedTuple field that has no docstring of its own.

    Autodoc would show it as "Alias for field number N", listing the field a second time after
    the class docstring's own list of fields. Fields with a docstring in the source stay.
    """
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number") and id(obj) not in _DOCUMENTED_FIELDS:
        return True
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexports)
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
