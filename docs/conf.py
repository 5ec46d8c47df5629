"""Sphinx configuration of the sparse_dict documentation.

Build with warnings as errors, as CI does::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the source tree next to these files, installed or not.
sys.path.insert(0, str(ROOT))

import sparse_dict  # noqa: E402

project = "sparse_dict"
author = "sparse_dict developers"
copyright = "2026, sparse_dict developers"
release = sparse_dict.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

# Files whose names start with "_" are sections included in other pages.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "_*.rst"]
templates_path = []
# The theme of scikit-learn and most PyData projects, so the pages look like
# the ones these users already read.
html_theme = "pydata_sphinx_theme"
html_static_path = []
html_title = f"sparse_dict {release}"
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "navbar_align": "left",
    # Nothing is fetched from the network when the docs are built or read.
    "icon_links": [],
}

# --------------------------------------------------------------------------
# The example gallery
# --------------------------------------------------------------------------
# examples/plot_*.py run when the docs are built and their figures and output
# are rendered in docs/auto_examples/ (generated; not kept in git). Each
# example runs in seconds on a 2-core CPU. "-D plot_gallery=0" builds the
# pages without running them.

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": str(DOCS / "auto_examples"),
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "show_memory": False,
    "within_subsection_order": "FileNameSortKey",
    # No links to other projects' documentation: there is no network.
    "reference_url": {"sparse_dict": None},
}

# numpydoc renders the docstrings. Its member tables would need autosummary
# stub pages for every method; the API page lists members with autodoc instead.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# set_fit_request is scikit-learn's generated routing method: its docstring
# points into scikit-learn's own glossary, which these docs do not have.
autodoc_default_options = {"members": True, "member-order": "bysource",
                           "exclude-members": "set_fit_request"}
autodoc_typehints = "none"
autoclass_content = "class"

# Every cross-reference to this package must resolve (the build fails on a
# dead link, so a renamed or undocumented name is caught). Those into other
# projects cannot (there is no network for intersphinx) and are not warnings.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(sklearn|scipy|numpy|np|torch|pandas|joblib|matplotlib|safetensors"
               r"|transformers|tqdm)(\..*)?"),
]


# --------------------------------------------------------------------------
# Trailing underscores in docstrings
# --------------------------------------------------------------------------
# Docstrings name fitted attributes in plain text, as in
# "ndarray of shape (n_tokens, n_features_out_)". In reStructuredText a word
# ending in "_" is a link to a target of that name, which does not exist, so
# the name would render as a broken link. Escape the underscore of such words
# outside literals and roles, after numpydoc has turned the docstring into rst.

import re  # noqa: E402

_LITERAL = re.compile(r"(``.*?``|:[\w:+-]+:`[^`]*`|`[^`]*`_{0,2})")
_TRAILING = re.compile(r"(?<![\w\\])([A-Za-z]\w*[A-Za-z0-9])_(?![\w`])")


def _escape_trailing_underscores(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        parts = _LITERAL.split(line)
        # Even items are plain text, odd ones the literals and roles left alone.
        parts[::2] = [_TRAILING.sub(r"\1\\_", p) for p in parts[::2]]
        lines[i] = "".join(parts)


# --------------------------------------------------------------------------
# Benchmark results
# --------------------------------------------------------------------------
# benchmarks/ writes its reference tables and plots to benchmarks/results/,
# and ``python -m benchmarks.report`` a page of them, docs/benchmarks_results.rst.
# The benchmarks page shows whatever is there when the docs are built, so a
# new result needs no edit here; no results at all give a short note instead.

RESULTS = ROOT / "benchmarks" / "results"
_MARKER = ".. benchmark-results-here"


GENERATED = DOCS / "benchmarks_results.rst"
_GENERATED_START = ".. start-benchmark-results"


def _benchmark_results_rst():
    # ``python -m benchmarks.report`` writes a page of tables and plots; show
    # it when it is there, else list whatever the results folder holds.
    if GENERATED.is_file() and _GENERATED_START in GENERATED.read_text(encoding="utf-8"):
        return [".. include:: benchmarks_results.rst",
                f"   :start-after: {_GENERATED_START}"]
    if not RESULTS.is_dir():
        return [
            ".. note::",
            "",
            "   No benchmark results are in ``benchmarks/results/`` yet; run the",
            "   benchmarks (see above) and rebuild the documentation.",
        ]
    lines = []
    files = sorted(p for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith("."))
    # Relative to this page (docs/benchmarks.rst), which is how Sphinx reads
    # image and file paths of a directive.
    rel = os.path.relpath(RESULTS, DOCS).replace(os.sep, "/")
    for path in files:
        title = path.stem.replace("_", " ").replace("-", " ").capitalize()
        suffix = path.suffix.lower()
        if suffix in (".png", ".svg", ".jpg", ".jpeg"):
            lines += [f".. figure:: {rel}/{path.name}", "   :width: 90%", "",
                      f"   {title} (``{path.name}``)", ""]
        elif suffix == ".csv":
            lines += [f".. csv-table:: {title} (``{path.name}``)",
                      f"   :file: {rel}/{path.name}", "   :header-rows: 1", ""]
        elif suffix == ".rst":
            lines += [f".. include:: {rel}/{path.name}", ""]
        elif suffix in (".md", ".txt", ".json"):
            language = {".json": "json"}.get(suffix, "text")
            lines += [f"``{path.name}``:", "",
                      f".. literalinclude:: {rel}/{path.name}",
                      f"   :language: {language}", ""]
    return lines or ["No result files in ``benchmarks/results/`` yet."]


# The findings page (docs/findings.rst) shows the benchmark's ``findings``
# section, which ``python -m benchmarks.report`` writes to
# docs/findings_results.rst.
_FINDINGS_MARKER = ".. findings-results-here"
FINDINGS = DOCS / "findings_results.rst"
_FINDINGS_START = ".. start-findings-results"


def _findings_rst():
    if FINDINGS.is_file() and _FINDINGS_START in FINDINGS.read_text(encoding="utf-8"):
        return [".. include:: findings_results.rst", f"   :start-after: {_FINDINGS_START}"]
    return [
        ".. note::",
        "",
        "   No results of the ``findings`` benchmark are in ``benchmarks/results/`` yet;",
        "   run it (see above), then ``python -m benchmarks.report``, and rebuild the",
        "   documentation.",
    ]


def _insert_benchmark_results(app, docname, source):
    if docname == "benchmarks" and _MARKER in source[0]:
        source[0] = source[0].replace(_MARKER, "\n".join(_benchmark_results_rst()))
    if docname == "findings" and _FINDINGS_MARKER in source[0]:
        source[0] = source[0].replace(_FINDINGS_MARKER, "\n".join(_findings_rst()))


def _always_reread_benchmarks(app, env, added, changed, removed):
    # The page's content comes from files Sphinx does not track.
    return [name for name in ("benchmarks", "findings", "saelens") if name in env.found_docs]


# --------------------------------------------------------------------------
# The SAELens page's worked example
# --------------------------------------------------------------------------
# docs/examples/saelens_example.py makes a folder in SAELens' layout and uses
# it; it runs at every build and its output is shown, so the page cannot go
# stale (and an error in it fails the build).

_SAELENS_MARKER = ".. saelens-example-output-here"


def _insert_saelens_output(app, docname, source):
    if docname != "saelens" or _SAELENS_MARKER not in source[0]:
        return
    import contextlib
    import io
    import runpy

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        runpy.run_path(str(DOCS / "examples" / "saelens_example.py"), run_name="__main__")
    block = [".. code-block:: text", ""] + [
        "   " + line for line in buffer.getvalue().splitlines()]
    source[0] = source[0].replace(_SAELENS_MARKER, "\n".join(block))


def setup(app):
    app.connect("source-read", _insert_benchmark_results)
    app.connect("source-read", _insert_saelens_output)
    # After numpydoc (priority 500), which writes the rst being escaped.
    app.connect("autodoc-process-docstring", _escape_trailing_underscores, priority=600)
    app.connect("env-get-outdated", _always_reread_benchmarks)
