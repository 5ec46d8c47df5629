"""Smoke test of the ``findings`` benchmark section and its docs page, in tiny mode.

Tiny figures are not meaningful; the test proves that the section runs end to
end on the built-in model and that its tables, plot and page have the promised
shape.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("findings")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--only", "findings", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    return out, results


def _finite(values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_size_curve_has_every_size(run):
    from benchmarks.findings import SIZES

    _, results = run
    section = results["sections"]["findings"]
    assert "error" not in section, section.get("error")
    curve = section["size_curve"]
    assert [p["n_components"] for p in curve] == SIZES["tiny"]["sizes"]
    for p in curve:
        assert _finite([p["loss_recovered"], p["explained_variance"], p["l0"], p["fit_s"]])
        assert p["l0"] == pytest.approx(section["k"])  # the same L0 budget at every size
        assert p["steps"] == section["steps"]
        assert p["converged"] is False  # 40 steps: the estimator warns, and it is recorded
    rises = section["size_curve_rises"]["loss_recovered"]
    lr = [p["loss_recovered"] for p in curve]
    assert rises == all(b > a for a, b in zip(lr, lr[1:]))


def test_universality_and_splitting_are_recorded(run):
    _, results = run
    section = results["sections"]["findings"]
    u = section["universality"]
    for key in ("two_seeds", "random", "neurons", "random_vs_neurons"):
        assert -1 <= u[key]["hungarian"] <= 1 and -1 <= u[key]["max"] <= 1, key
    # The neuron basis has 512 atoms; the tiny SAE fewer, all of them matched.
    assert u["neurons"]["n_pairs"] == u["n_components"]
    # Every comparison's best pairs: as many as the neuron basis can pair.
    for key in ("two_seeds", "random", "neurons", "random_vs_neurons"):
        assert u[key]["n_best"] == u["n_best_pairs"] == min(u["n_components"], 512)
        assert u[key]["hungarian_best"] >= u[key]["hungarian"] - 1e-12
    sp = section["splitting"]
    assert [b["large"] for b in sp["by_size"]] == [
        p["n_components"] for p in section["size_curve"] if p["n_components"] > sp["small"]]
    # The tiny thresholds are loose enough for worked examples.
    assert sp["examples"], sp["by_size"]
    for example in sp["examples"]:
        assert 2 <= len(example["children"]) <= 4
        assert example["parent_contexts"]
        assert all("\u00ab" in c["text"] for c in example["parent_contexts"])
        for child in example["children"]:
            assert child["cosine"] >= sp["threshold"]
            assert child["co_firing"] >= sp["co_firing_threshold"]
    names = {t["name"] for t in section["targets"]}
    assert names == {"size_curve_rises", "universality_vs_random"}


def test_tables_plot_and_docs_page(run, tmp_path):
    from benchmarks import report

    out, results = run
    assert (out / "size_curve.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "results.md").read_text()
    assert "The seed's findings" in markdown and "**Example 1**" in markdown
    page = tmp_path / "findings_results.rst"
    assert report.write_findings_rst(results, page, images="img")
    text = page.read_text()
    assert report.FINDINGS_START in text and ".. list-table::" in text
    assert ".. image:: img/size_curve.png" in text and "**Example 1**" in text
    # The benchmarks page leaves the findings to their own page.
    bench = tmp_path / "benchmarks_results.rst"
    report.write_rst(results, bench, images=None)
    assert "The seed's findings" not in bench.read_text()
    # Without a findings section there is no page, and nothing is written.
    other = tmp_path / "none.rst"
    assert not report.write_findings_rst(dict(results, sections={}), other, images=None)
    assert not other.exists()
