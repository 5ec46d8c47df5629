"""Comparisons between dictionaries: matching, similarity and feature splitting."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

from sparse_dict import LassoCoder, SparseAutoencoderDictionary
from sparse_dict.analysis import dictionary_similarity, feature_splitting, match_features
from sparse_dict.datasets import make_superposition


def _atoms(n_atoms, n_features, seed):
    return np.random.default_rng(seed).standard_normal((n_atoms, n_features))


@pytest.fixture(scope="module")
def fitted_sae():
    X, _, _ = make_superposition(n_samples=2000, n_features=16, n_components=32,
                                 random_state=0)
    return SparseAutoencoderDictionary(32, activation="topk", k=4, max_steps=60,
                                       batch_size=256, random_state=0).fit(X), X


# ------------------------------------------------------------------ matching


@pytest.mark.parametrize("method", ["hungarian", "max"])
def test_match_features_recovers_a_permutation(method):
    a = _atoms(20, 16, 0)
    perm = np.random.default_rng(1).permutation(20)
    scales = np.random.default_rng(2).uniform(0.5, 3.0, size=(20, 1))
    b = a[perm] * scales  # b[j] is a[perm[j]], rescaled
    indices, similarities = match_features(a, b, method=method)
    np.testing.assert_array_equal(indices, np.argsort(perm))
    np.testing.assert_allclose(similarities, 1.0)


@pytest.mark.parametrize("method", ["hungarian", "max"])
def test_match_features_survives_noise(method):
    a = _atoms(20, 64, 0)
    perm = np.random.default_rng(1).permutation(20)
    b = a[perm] + 0.1 * _atoms(20, 64, 3)
    indices, similarities = match_features(a, b, method=method)
    np.testing.assert_array_equal(indices, np.argsort(perm))
    assert np.all(similarities < 1.0) and np.all(similarities > 0.9)


def test_match_features_keeps_the_sign():
    a = _atoms(5, 8, 0)
    # b holds a's first atom negated and, elsewhere, as it is: the match is
    # the positive copy, and a negated dictionary is dissimilar.
    b = np.vstack([-a[0], a[1:], a[0]])
    indices, similarities = match_features(a, b, method="max")
    assert indices[0] == 5 and similarities[0] == pytest.approx(1.0)
    matching = match_features(a, -a)
    np.testing.assert_allclose(matching.similarities[matching.indices == np.arange(5)], -1.0)
    assert dictionary_similarity(a, -a, method="max") < 0.5


def test_hungarian_and_max_differ_on_shared_matches():
    b = np.eye(3)
    a = np.array([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 0.0, 1.0]])
    greedy = match_features(a, b, method="max")
    np.testing.assert_array_equal(greedy.indices, [0, 0, 2])  # b's atom 0 used twice
    one_to_one = match_features(a, b)
    assert len(set(one_to_one.indices.tolist())) == 3
    assert one_to_one.similarities.sum() < greedy.similarities.sum()
    assert dictionary_similarity(a, b) < dictionary_similarity(a, b, method="max")


def test_hungarian_with_fewer_atoms_in_b_leaves_some_unmatched():
    a = _atoms(6, 10, 0)
    b = a[[4, 1, 2]]
    indices, similarities = match_features(a, b)
    np.testing.assert_array_equal(indices, [-1, 1, 2, -1, 0, -1])
    assert np.isnan(similarities[[0, 3, 5]]).all()
    np.testing.assert_allclose(similarities[[1, 2, 4]], 1.0)
    # The mean is over the matched pairs, so a sub-dictionary scores 1.
    assert dictionary_similarity(a, b) == pytest.approx(1.0)
    # With more atoms in b every atom of a is matched, to distinct atoms.
    indices, _ = match_features(b, a)
    np.testing.assert_array_equal(indices, [4, 1, 2])


def test_fitted_estimators_are_compared_through_their_components(fitted_sae):
    sae, _ = fitted_sae
    assert dictionary_similarity(sae, sae) == pytest.approx(1.0)
    assert dictionary_similarity(sae, sae.components_, method="max") == pytest.approx(1.0)
    random_atoms = _atoms(32, 16, 5)
    assert dictionary_similarity(sae, random_atoms) < 0.5
    indices, _ = match_features(sae, sae.components_[::-1])
    np.testing.assert_array_equal(indices, np.arange(32)[::-1])


def test_similarity_of_random_dictionaries_is_low():
    a, b = _atoms(64, 256, 0), _atoms(64, 256, 1)
    assert dictionary_similarity(a, a) == pytest.approx(1.0)
    assert abs(dictionary_similarity(a, b)) < 0.15
    # The max matching picks the best of 64 for each atom: higher, still low.
    assert dictionary_similarity(a, b) < dictionary_similarity(a, b, method="max") < 0.35


@settings(max_examples=40, deadline=None)
@given(n_a=st.integers(1, 12), n_b=st.integers(1, 12), n_features=st.integers(2, 8),
       seed=st.integers(0, 2**31 - 1))
def test_hungarian_similarity_is_symmetric_and_permutation_invariant(n_a, n_b, n_features,
                                                                    seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_a, n_features))
    b = rng.standard_normal((n_b, n_features))
    s = dictionary_similarity(a, b)
    assert -1.0 <= s <= 1.0
    assert dictionary_similarity(b, a) == pytest.approx(s, abs=1e-12)
    shuffled = b[rng.permutation(n_b)] * rng.uniform(0.1, 10.0, size=(n_b, 1))
    assert dictionary_similarity(a[rng.permutation(n_a)], shuffled) == pytest.approx(
        s, abs=1e-12)
    # No matching does better than each atom's best partner.
    assert s <= max(dictionary_similarity(a, b, method="max"),
                    dictionary_similarity(b, a, method="max")) + 1e-12


# ----------------------------------------------------------- feature splitting


def _split_case():
    """A large dictionary of 5 orthonormal atoms, a small one with two blends.

    Small atom 0 is the mean of large atoms 0 and 1 and fires on their tokens:
    a split. Small atom 2 is the mean of large atoms 3 and 4, but the small
    dictionary also holds atoms 3 and 4 themselves (small atoms 3 and 4),
    which code those tokens instead: close in direction, never co-firing.
    """
    rng = np.random.default_rng(0)
    large = np.linalg.qr(rng.standard_normal((12, 5)))[0].T  # (5, 12), orthonormal rows
    small = np.vstack([(large[0] + large[1]) / np.sqrt(2), large[2],
                       (large[3] + large[4]) / np.sqrt(2), large[3], large[4]])
    which = rng.integers(0, 5, size=600)
    X = large[which] * rng.uniform(1.0, 2.0, size=(600, 1))
    coder = dict(algorithm="omp", n_nonzero_coefs=1)
    return (LassoCoder(small, **coder).fit(X), LassoCoder(large, **coder).fit(X), X,
            small, large, which)


def test_feature_splitting_finds_a_constructed_split_and_not_a_non_split():
    small_coder, large_coder, X, small, large, which = _split_case()
    # Atoms only: both blends look like splits.
    by_atoms = feature_splitting(small, large)
    assert by_atoms["parent"].tolist() == [0, 0, 2, 2]
    assert sorted(by_atoms["child"][:2].tolist()) == [0, 1]
    np.testing.assert_allclose(by_atoms["cosine"], 1 / np.sqrt(2))
    assert np.isnan(by_atoms["co_firing"]).all()
    # On activations, only small atom 0 fires where its children fire.
    table = feature_splitting(small_coder, large_coder, X=X)
    assert table["parent"].tolist() == [0, 0]
    assert sorted(table["child"].tolist()) == [0, 1]
    np.testing.assert_allclose(table["co_firing"], 1.0)
    np.testing.assert_array_equal(table["n_children"], [2, 2])
    np.testing.assert_allclose(table["parent_frequency"], np.mean(which <= 1))
    expected = [np.mean(which == c) for c in table["child"]]
    np.testing.assert_allclose(table["child_frequency"], expected)


def test_feature_splitting_thresholds_and_min_children():
    small_coder, large_coder, X, small, large, _ = _split_case()
    # Above the blends' cosine of 0.707 nothing splits.
    assert feature_splitting(small, large, threshold=0.75)["parent"].size == 0
    # One child is enough with min_children=1: every small atom has one.
    single = feature_splitting(small, large, threshold=0.9, min_children=1)
    assert single["parent"].tolist() == [1, 3, 4]
    assert single["child"].tolist() == [2, 3, 4]
    # Co-firing of 1 still passes a threshold of 1; a child must fire.
    strict = feature_splitting(small_coder, large_coder, X=X, co_firing_threshold=1.0)
    assert strict["parent"].tolist() == [0, 0]
    # On one token at most one child fires; children that never fire do not count.
    assert feature_splitting(small_coder, large_coder, X=X[:1])["parent"].size == 0


def test_feature_splitting_counts_identical_atoms_at_a_threshold_of_one():
    # An atom equal to the parent (or 3 times it) has a cosine of 1 - 1e-16:
    # at threshold=1.0 it was no child, where recovery_rate counts it.
    A = np.random.default_rng(0).normal(size=(5, 512))
    B = np.vstack([A[0], 3 * A[0], A[1:]])
    table = feature_splitting(A, B, threshold=1.0)
    assert table["parent"].tolist() == [0, 0] and table["child"].tolist() == [0, 1]
    single = feature_splitting(A, B, threshold=1.0, min_children=1)
    assert single["parent"].tolist() == [0, 0, 1, 2, 3, 4]
    # Another atom is still no child.
    B[1] = A[0] + 1e-3 * A[1]
    assert feature_splitting(A, B, threshold=1.0)["parent"].size == 0


def test_feature_splitting_as_frame():
    pd = pytest.importorskip("pandas")
    small_coder, large_coder, X, _, _, _ = _split_case()
    frame = feature_splitting(small_coder, large_coder, X=X, as_frame=True)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["parent", "child", "cosine", "co_firing", "n_children",
                                   "parent_frequency", "child_frequency"]
    assert frame["parent"].tolist() == [0, 0]


def test_feature_splitting_on_fitted_saes(fitted_sae):
    sae, X = fitted_sae
    # A dictionary against itself: each atom's only close atom is itself.
    assert feature_splitting(sae, sae, threshold=0.99, X=X)["parent"].size == 0
    table = feature_splitting(sae, sae, threshold=0.99, X=X, min_children=1)
    np.testing.assert_array_equal(table["parent"], table["child"])
    np.testing.assert_allclose(table["co_firing"], 1.0)


def test_feature_splitting_checks_a_data_frame_s_columns(fitted_sae):
    # X was made a bare array: the right frame drew "X does not have valid
    # feature names", and one of reordered columns was taken silently.
    pd = pytest.importorskip("pandas")
    _, X = fitted_sae
    frame = pd.DataFrame(X, columns=[f"n{i}" for i in range(X.shape[1])])
    sae = SparseAutoencoderDictionary(32, activation="topk", k=4, max_steps=60,
                                      batch_size=256, random_state=0).fit(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = feature_splitting(sae, sae, threshold=0.99, X=frame, min_children=1)
    np.testing.assert_allclose(table["co_firing"], 1.0)
    with pytest.raises(ValueError, match="feature names"):
        feature_splitting(sae, sae, threshold=0.99, X=frame[frame.columns[::-1]])


# --------------------------------------------------------------------- errors


def test_mismatched_widths_are_refused():
    with pytest.raises(ValueError, match="a has atoms of width 4 but b has atoms of width 5"):
        match_features(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="small has atoms of width 4 but large"):
        feature_splitting(np.ones((3, 4)), np.ones((6, 5)))


def test_unfitted_estimators_are_refused():
    with pytest.raises(NotFittedError, match="SparseAutoencoderDictionary instance .a. is not"):
        dictionary_similarity(SparseAutoencoderDictionary(8), np.ones((3, 4)))
    with pytest.raises(NotFittedError, match=r"\(large\) is not fitted"):
        feature_splitting(np.ones((3, 4)), LassoCoder(np.ones((3, 4))))


@pytest.mark.parametrize("bad, match", [
    (np.ones(4), "Expected 2D array"),
    (np.array([[1.0, np.nan]]), "contains NaN"),
    ("atoms", "must be a fitted estimator with components_ or an array"),
    (np.ones((0, 4)), "0 sample"),
])
def test_bad_atoms_are_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        match_features(bad, np.ones((3, 4)))


def test_bad_parameters_are_refused():
    a = np.eye(3)
    with pytest.raises(ValueError, match="method must be one of"):
        match_features(a, a, method="greedy")
    with pytest.raises(ValueError, match="method must be one of"):
        dictionary_similarity(a, a, method="Hungarian")
    for bad in (1.5, -2, "0.5", True, np.nan):
        with pytest.raises(ValueError, match=r"threshold must be a number in \[-1, 1\]"):
            feature_splitting(a, a, threshold=bad)
    for bad in (-0.1, 2, None):
        with pytest.raises(ValueError, match=r"co_firing_threshold must be a number in \[0, 1"):
            feature_splitting(a, a, co_firing_threshold=bad)
    for bad in (0, 1.5, False):
        with pytest.raises(ValueError, match="min_children must be a positive integer"):
            feature_splitting(a, a, min_children=bad)


def test_bad_activations_are_refused():
    small_coder, large_coder, X, small, large, _ = _split_case()
    with pytest.raises(TypeError, match="small must be a fitted estimator with transform"):
        feature_splitting(small, large_coder, X=X)
    with pytest.raises(ValueError, match="X has 11 features per row but the dictionaries "
                                         "have atoms of width 12"):
        feature_splitting(small_coder, large_coder, X=X[:, :11])
    with pytest.raises(ValueError, match="X must be a 2-D array"):
        feature_splitting(small_coder, large_coder, X=X[0])
    with pytest.raises(ValueError, match="X has no rows"):
        feature_splitting(small_coder, large_coder, X=X[:0])


def test_atoms_of_norm_0_are_named_when_matched():
    # An all-zero atom was matched at cosine 0 and pulled the mean
    # similarity down without a word.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    a[2] = 0.0
    with pytest.warns(UserWarning, match=r"a has 1 atom\(s\) of norm 0 \(rows \[2\]\)") as record:
        dictionary_similarity(a, b)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dictionary_similarity(b, b)
