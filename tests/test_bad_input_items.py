"""Bad parameters, unrepresentable data, interruptions and the browser: a clear error, nothing lost.

One table per kind of item found by trying the package as a careful user
would; each row is an input that once gave an unclear error or a wrong
result.
"""

import pickle

import numpy as np
import pytest
from sklearn.base import clone

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.browser import (
    plot_feature_density,
    top_activating_examples,
    write_feature_browser,
)


def small_sae(**kwargs):
    params = dict(n_components=8, max_iter=2, batch_size=32, device="cpu", random_state=0)
    params.update(kwargs)
    return SparseAutoencoderDictionary(**params)


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).exponential(size=(100, 6))


@pytest.fixture(scope="module")
def fitted(X):
    return small_sae().fit(X)


# ------------------------------------------- parameters and data, checked first

FIT_ERRORS = [
    ("n_components=True", dict(n_components=True), lambda X: X, "n_components"),
    ("n_components=False", dict(n_components=False), lambda X: X, "n_components"),
    ("k=True", dict(activation="topk", k=True), lambda X: X, "'k' parameter"),
    ("batch_size=True", dict(batch_size=True), lambda X: X, "batch_size"),
    ("max_steps=True", dict(max_steps=True), lambda X: X, "max_steps"),
    ("n_components=2**40", dict(n_components=2**40), lambda X: X, "smaller n_components"),
    ("beyond float32", {}, lambda X: X * 1e39, "beyond the range of float32"),
    ("beyond float32, negative", {}, lambda X: -X * 1e39, "beyond the range of float32"),
    ("subnormal in float32", {}, lambda X: (X * 1e-40).astype(np.float32), "smallest normal"),
    ("below float32 altogether", {}, lambda X: X * 1e-300, "smallest normal"),
    ("sparse beyond float32", {}, lambda X: __import__("scipy.sparse").sparse.csr_matrix(
        X * 1e39), "beyond the range of float32"),
]


@pytest.mark.parametrize("what,params,make,words", FIT_ERRORS, ids=[f[0] for f in FIT_ERRORS])
def test_fit_refuses_with_a_clear_error(fitted, X, what, params, make, words):
    sae = pickle.loads(pickle.dumps(fitted)).set_params(**params)
    before = sae.components_.copy()
    with pytest.raises(ValueError, match=words):
        sae.fit(make(X))
    # Nothing fitted is lost, and the message is not about the learning rate.
    np.testing.assert_array_equal(sae.components_, before)
    # partial_fit checks the same on its first call (later calls keep the
    # fitted shape and, as in scikit-learn, do not check parameters again).
    with pytest.raises(ValueError, match=words):
        clone(sae).partial_fit(make(X))


def test_data_near_the_limits_still_fits(X):
    # Large or small, but representable: the input scaling takes care of it.
    for factor in (1e-30, 1e30):
        sae = small_sae().fit(X * factor)
        assert np.isfinite(sae.components_).all()
        assert sae.score(X * factor) > 0


def test_memory_check_names_the_sizes(X):
    with pytest.raises(ValueError, match=r"needs at least .* GB .* has .* GB"):
        small_sae(n_components=2**40).fit(X)


# --------------------------------------------------- interruptions roll back


def test_interrupted_partial_fit_rolls_back_the_trainer(fitted, X, monkeypatch):
    sae = pickle.loads(pickle.dumps(fitted))
    reference = pickle.loads(pickle.dumps(fitted))
    steps = sae.n_steps_

    def interrupted(self, trainer, dtype):
        raise KeyboardInterrupt  # in the last stage, after the training steps

    with monkeypatch.context() as m:
        m.setattr(SparseAutoencoderDictionary, "_store_fitted", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sae.partial_fit(X)
    assert sae.n_steps_ == steps
    assert sae._trainer.step == steps  # the hidden trainer did not run ahead
    # Training continues exactly as if the interrupted call never happened.
    sae.partial_fit(X)
    reference.partial_fit(X)
    np.testing.assert_array_equal(sae.components_, reference.components_)
    assert sae._trainer.step == sae.n_steps_ == reference.n_steps_


# ------------------------------------------------------ browser and plots


def test_browser_keeps_tokens_that_utf8_cannot_encode(tmp_path):
    codes = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    tokens = ["ok", "\ud800", "caf\u00e9"]  # a lone surrogate, as a cut character
    examples = top_activating_examples(codes, tokens, k=2, context=1)
    path = write_feature_browser(tmp_path / "f.html", (codes > 0).mean(axis=0), examples,
                                 title="t\udc80")
    page = (tmp_path / "f.html").read_bytes()
    assert path == str(tmp_path / "f.html")
    assert page.startswith(b"<!DOCTYPE html>") and len(page) > 1000
    text = page.decode("utf-8")  # valid UTF-8 throughout
    assert "\\ud800" in text and "caf\\u00e9" in text
    assert [p.name for p in tmp_path.iterdir()] == ["f.html"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_plots_and_pages_refuse_non_finite_frequencies(tmp_path, bad):
    frequencies = np.array([0.1, bad, 0.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        plot_feature_density(frequencies, tmp_path / "d.png")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_feature_browser(tmp_path / "f.html", frequencies)
    assert list(tmp_path.iterdir()) == []


def test_failed_page_leaves_no_empty_file(tmp_path, monkeypatch):
    import sparse_dict.browser as browser

    def broken(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "cannot encode")

    monkeypatch.setattr(browser, "_page", broken)
    with pytest.raises(UnicodeEncodeError):
        write_feature_browser(tmp_path / "f.html", np.array([0.5]))
    assert list(tmp_path.iterdir()) == []


def test_browser_and_plot_replace_only_their_own_files(tmp_path):
    page, png = tmp_path / "f.html", tmp_path / "d.png"
    write_feature_browser(page, np.array([0.5]))
    plot_feature_density(np.array([0.5]), png)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_feature_browser(page, np.array([0.25]))
    with pytest.raises(FileExistsError, match="overwrite"):
        plot_feature_density(np.array([0.25]), png)
    write_feature_browser(page, np.array([0.25]), overwrite=True)
    plot_feature_density(np.array([0.25]), png, overwrite=True)
    assert "0.25" in page.read_text(encoding="utf-8")
    mine = tmp_path / "mine.html"
    mine.write_text("<!DOCTYPE html><p>my own page</p>")
    with pytest.raises(FileExistsError, match="not a feature browser page"):
        write_feature_browser(mine, np.array([0.5]), overwrite=True)
    assert mine.read_text() == "<!DOCTYPE html><p>my own page</p>"
    # A user's page that merely names the browser is still the user's.
    notes = "<!DOCTYPE html><p>My notes about the sparse_dict feature browser</p>"
    mine.write_text(notes)
    with pytest.raises(FileExistsError, match="not a feature browser page"):
        write_feature_browser(mine, np.array([0.5]), overwrite=True)
    assert mine.read_text() == notes
