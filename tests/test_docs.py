"""The Sphinx documentation builds with warnings treated as errors, as in CI."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("numpydoc") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    for page in ("index", "problem", "quickstart", "estimator", "model_selection",
                 "extraction", "classical", "benchmarks", "saving", "saelens", "gpu", "cli",
                 "builtin_model", "api", "glossary"):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("SparseAutoencoderDictionary", "TransformerActivationExtractor",
                 "LassoCoder", "splice_evaluation", "explained_variance",
                 "make_superposition", "write_feature_browser"):
        assert name in api, name
    # The SAELens page's example ran during this build and its checks held.
    saelens = (out / "saelens.html").read_text(encoding="utf-8")
    assert "codes match SAELens: True" in saelens
    assert "reconstructions match SAELens: True" in saelens
