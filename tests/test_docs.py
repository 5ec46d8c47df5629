"""The Sphinx documentation builds with warnings treated as errors, as in CI."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None
        for name in ("sphinx", "numpydoc", "sphinx_gallery", "pydata_sphinx_theme")),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)

EXAMPLES = sorted(p.stem for p in (DOCS.parent / "examples").glob("plot_*.py"))


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600,
        # The gallery's examples run during the build: one thread each keeps
        # them quick on a small or shared machine (see docs/cli.rst, CPU threads).
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                 MPLBACKEND="Agg"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for page in ("index", "problem", "quickstart", "estimator", "model_selection",
                 "extraction", "classical", "benchmarks", "saving", "saelens", "gpu", "cli",
                 "builtin_model", "api", "glossary", "architecture", "analysis",
                 "findings", "scaling"):
        assert (out / f"{page}.html").is_file(), page
    # Every gallery example ran and drew its figure.
    assert len(EXAMPLES) >= 5
    gallery = (out / "auto_examples" / "index.html").read_text(encoding="utf-8")
    for example in EXAMPLES:
        page = out / "auto_examples" / f"{example}.html"
        assert page.is_file(), example
        assert example in gallery, example
        assert (out / "_images" / f"sphx_glr_{example}_001.png").is_file(), example
    assert "pydata" in (out / "index.html").read_text(encoding="utf-8").lower()
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("SparseAutoencoderDictionary", "TransformerActivationExtractor",
                 "LassoCoder", "splice_evaluation", "explained_variance",
                 "make_superposition", "write_feature_browser", "match_features",
                 "dictionary_similarity", "feature_splitting"):
        assert name in api, name
    # The SAELens page's example ran during this build and its checks held.
    saelens = (out / "saelens.html").read_text(encoding="utf-8")
    assert "codes match SAELens: True" in saelens
    assert "reconstructions match SAELens: True" in saelens
