"""Tests for sparse_dict.metrics: hand-computed values, errors, invariants."""

import re

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparse_dict import metrics
from sparse_dict.metrics import (
    best_matches,
    dead_fraction,
    dense_fraction,
    explained_variance,
    feature_frequencies,
    fraction_variance_unexplained,
    l0,
    l1,
    mean_max_cosine_similarity,
    mse,
    one_to_one_matches,
    one_to_one_matching_score,
    recovery_rate,
)
from memory_peak import peak_bytes

X = np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
# Column means (2, 2); total sum of squares 1 + 0 + 1 + 4 + 0 + 4 = 10.
X_HAT = np.array([[1.0, 1.0], [3.0, 1.0], [2.0, 3.0]])
# Residual sum of squares 1 + 1 + 1 = 3.

CODES = np.array(
    [
        [0.0, 2.0, 0.0, -1.0],
        [0.0, 0.0, 0.0, 3.0],
        [0.0, 1.0, 0.0, 0.5],
    ]
)
# Active counts per row 2, 1, 2; column counts 0, 2, 0, 3; |codes| row sums
# 3, 3, 1.5.


# --------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------


def test_reconstruction_metrics_hand_computed():
    assert explained_variance(X, X_HAT) == pytest.approx(1 - 3 / 10)
    assert fraction_variance_unexplained(X, X_HAT) == pytest.approx(3 / 10)
    assert mse(X, X_HAT) == pytest.approx(3 / 6)
    assert explained_variance(X, np.tile(X.mean(axis=0), (3, 1))) == pytest.approx(0)
    assert explained_variance(X, X) == 1.0
    assert explained_variance(X, -X) < 0
    assert isinstance(explained_variance(X, X_HAT), float)


def test_explained_variance_pools_features():
    # Column 0 has variance 1e6 times column 1: a per-feature average would
    # weigh the badly reconstructed small column equally, the pooled one not.
    X = np.array([[1000.0, 1.0], [-1000.0, -1.0]])
    X_hat = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    assert explained_variance(X, X_hat) == pytest.approx(1 - 2 / (2e6 + 2))


def test_explained_variance_without_variance():
    constant = np.ones((3, 2))
    assert explained_variance(constant, constant) == 1.0
    assert explained_variance(constant, constant + 1) == 0.0
    assert explained_variance([[1.0, 2.0]], [[1.0, 2.0]]) == 1.0
    # Constant columns whose float mean is off by a rounding error: still no
    # variance (the score was -1.2e16 for a residual of a millionth).
    X = np.full((1000, 4), 0.7)
    assert explained_variance(X, X * 1.000001) == 0.0
    assert fraction_variance_unexplained(X, X * 1.000001) == 1.0
    assert explained_variance(np.full((10, 3), 0.1), np.full((10, 3), 0.1) + 1e-12) == 0.0
    # A wrong reconstruction of tiny values, whose squared error underflows
    # to 0, is not perfect (it scored 1.0).
    assert explained_variance([[1e-200]], [[0.0]]) == 0.0
    assert explained_variance([[1e-200, 1.0]], [[0.0, 1.0]]) == 0.0
    assert explained_variance([[1e-200], [1e-200]], [[1e-200], [1e-200]]) == 1.0


def test_a_constant_column_adds_no_variance_beside_columns_that_vary():
    # The float64 mean of three 0.1s is 0.10000000000000002: its squared
    # error was counted as variance and swamped the other column's (EV
    # 0.99999983 for a reconstruction worse than the mean).
    X = np.array([[0.1, 0.0], [0.1, 1e-20], [0.1, 0.0]])
    X_hat = X * [1.0, 0.0]
    assert explained_variance(X, X_hat) == pytest.approx(explained_variance(X[:, 1:], X_hat[:, 1:]))
    assert explained_variance(X, X_hat) == pytest.approx(-0.5)
    assert explained_variance(3 * X, 3 * X_hat) == pytest.approx(-0.5)


@pytest.mark.parametrize("unit", [1e300, 1e160, 1e-160, 1e-300])
def test_explained_variance_of_values_whose_squares_leave_float64(unit):
    # The ratio does not depend on the unit; squares beyond float64's range
    # gave NaN, squares below it 1.0 for any reconstruction.
    rng = np.random.RandomState(0)
    X = rng.normal(size=(50, 4))
    X_hat = X + 0.1 * rng.normal(size=X.shape)
    assert explained_variance(X * unit, X_hat * unit) == pytest.approx(
        explained_variance(X, X_hat), rel=1e-12)


def test_cosine_scores_stay_within_minus_one_and_one():
    # Unit rows' products rounded to 1.0000000000000002 for an atom and itself.
    atoms = np.array([[1e6, -122952.55467336182, -122952.55467336182, -122952.55467336182]])
    assert mean_max_cosine_similarity(atoms, atoms) <= 1.0
    assert one_to_one_matching_score(atoms, atoms) <= 1.0
    assert mean_max_cosine_similarity(atoms, -atoms) >= -1.0


def test_explained_variance_at_the_edges_of_float64():
    rng = np.random.RandomState(0)
    X = rng.uniform(1, 2, (100, 3))
    X_hat = X + 0.1 * rng.normal(size=X.shape)
    # Values near float64's largest: their column sums overflowed, and any
    # reconstruction scored 1.0.
    assert explained_variance(X * 1e307, X_hat * 1e307) == pytest.approx(
        explained_variance(X, X_hat), rel=1e-12)
    # Worse than the mean by more than float64 holds: -inf, not the 0.0 of
    # "as good as the mean" (X's variance underflowed beside X_hat's values).
    X = rng.normal(size=(20, 5))
    assert explained_variance(X, X * 1e200) == -np.inf
    assert explained_variance(X * 1e-200, X) == -np.inf
    assert explained_variance(X * 1e-200, X * 1e-200) == 1.0


def test_cosines_of_atoms_whose_norms_leave_float64():
    # A norm of rows near 1e-200 underflowed (1e160: overflowed), and the
    # atoms read as all zeros: a similarity of 0.
    rng = np.random.RandomState(0)
    learned, true = rng.normal(size=(6, 5)), rng.normal(size=(7, 5))
    expected = mean_max_cosine_similarity(learned, true)
    assert expected > 0.3
    for a, b in ((1e-200, 1.0), (1e160, 1e-300), (1.0, 1e300)):
        assert mean_max_cosine_similarity(learned * a, true * b) == pytest.approx(expected)


def test_explained_variance_float32_matches_float64():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 8))
    X_hat = X + 0.1 * rng.normal(size=X.shape)
    single = explained_variance(X.astype(np.float32), X_hat.astype(np.float32))
    assert single == pytest.approx(explained_variance(X, X_hat), abs=1e-5)


def test_sparsity_metrics_hand_computed():
    assert l0(CODES) == pytest.approx(5 / 3)
    assert l1(CODES) == pytest.approx(7.5 / 3)
    np.testing.assert_allclose(feature_frequencies(CODES), [0, 2 / 3, 0, 1])
    assert dead_fraction(CODES) == 0.5
    assert dense_fraction(CODES) == 0.5
    assert dense_fraction(CODES, threshold=0.9) == 0.25
    assert dense_fraction(CODES, threshold=1.0) == 0.0


def test_tol_ignores_small_codes():
    codes = np.array([[1e-9, 1.0], [0.0, -1e-9]])
    assert l0(codes) == 1.5
    assert l0(codes, tol=1e-6) == 0.5
    np.testing.assert_array_equal(feature_frequencies(codes, tol=1e-6), [0, 0.5])
    assert dead_fraction(codes, tol=1e-6) == 0.5
    assert dead_fraction(codes) == 0.0


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_codes_match_dense(fmt):
    codes = sp.random(40, 12, density=0.2, format=fmt, random_state=0)
    codes.data -= 0.5
    dense = codes.toarray()
    assert l0(codes) == pytest.approx(l0(dense))
    assert l1(codes) == pytest.approx(l1(dense))
    np.testing.assert_allclose(feature_frequencies(codes), feature_frequencies(dense))
    assert dead_fraction(codes) == dead_fraction(dense)
    assert dense_fraction(codes, threshold=0.1) == dense_fraction(dense, threshold=0.1)
    # Stored zeros are not active.
    csr = sp.csr_matrix(([0.0, 2.0], ([0, 1], [0, 1])), shape=(2, 2))
    assert l0(csr) == 0.5


def test_duplicate_sparse_entries_are_summed():
    # COO allows repeated coordinates; they mean one entry, their sum.
    coo = sp.coo_matrix(([1.0, -1.0, 2.0], ([0, 0, 1], [0, 0, 1])), shape=(2, 2))
    assert l0(coo) == 0.5
    assert l1(coo) == 1.0
    assert len(coo.data) == 3


def test_blockwise_reduction_matches_whole_array(monkeypatch):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(50, 7)).astype(np.float32)
    X_hat = X + rng.normal(size=X.shape).astype(np.float32)
    codes = np.maximum(rng.normal(size=(50, 9)), 0)
    whole = (
        explained_variance(X, X_hat), mse(X, X_hat), l0(codes), l1(codes),
        feature_frequencies(codes),
    )
    # Blocks of one to two rows exercise the accumulation across blocks.
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 10)
    blocked = (
        explained_variance(X, X_hat), mse(X, X_hat), l0(codes), l1(codes),
        feature_frequencies(codes),
    )
    for a, b in zip(whole, blocked):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    manual = np.sum((X.astype(np.float64) - X_hat) ** 2) / np.sum(
        (X.astype(np.float64) - X.mean(axis=0, dtype=np.float64)) ** 2
    )
    assert blocked[0] == pytest.approx(1 - manual, rel=1e-12)


def test_float32_codes():
    assert l0(CODES.astype(np.float32)) == pytest.approx(5 / 3)
    assert l1(CODES.astype(np.float32)) == pytest.approx(2.5)


def test_dictionary_metrics_hand_computed():
    true = np.eye(3)
    learned = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    indices, sims = best_matches(learned, true)
    np.testing.assert_array_equal(indices, [1, 1, 0])
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(sims, [s, s, 1.0])
    assert mean_max_cosine_similarity(learned, true) == pytest.approx((2 * s + 1) / 3)
    assert recovery_rate(learned, true) == pytest.approx(1 / 3)
    assert recovery_rate(learned, true, threshold=0.7) == 1.0
    # Identical atoms are recovered at threshold 1, whatever their rounding.
    atoms = np.random.RandomState(0).standard_normal((40, 7))
    for dtype in (np.float64, np.float32):
        assert recovery_rate(atoms.astype(dtype), atoms.astype(dtype), threshold=1.0) == 1.0
    assert recovery_rate(atoms * 1.01 + 1e-3, atoms, threshold=1.0) < 1.0
    # One to one, learned atom 1 serves only true atom 0; true atom 1 gets
    # learned atom 2 (cosine 0), better than giving it true atom 0 (cosine -1).
    rows, cols, pair_sims = one_to_one_matches(learned, true)
    np.testing.assert_array_equal(rows, [1, 2, 0])
    np.testing.assert_array_equal(cols, [0, 1, 2])
    np.testing.assert_allclose(pair_sims, [s, 0.0, 1.0], atol=1e-12)
    assert one_to_one_matching_score(learned, true) == pytest.approx((s + 1) / 3)


def test_one_to_one_prefers_global_optimum():
    # Cosines (learned x true) are [[0.8, 0.6], [0.6, 0.0]]. Greedily giving
    # true atom 0 its best match (learned 0) leaves 0.0 for true atom 1;
    # the optimal pairing swaps them for 0.6 + 0.6.
    true = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    learned = np.array([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8]])
    rows, cols, sims = one_to_one_matches(learned, true)
    np.testing.assert_array_equal(rows, [1, 0])
    np.testing.assert_array_equal(cols, [0, 1])
    np.testing.assert_allclose(sims, [0.6, 0.6])
    assert one_to_one_matching_score(learned, true) == pytest.approx(0.6)
    assert mean_max_cosine_similarity(learned, true) == pytest.approx(0.7)


def test_fewer_learned_atoms_leaves_true_atoms_unmatched():
    learned = np.array([[1.0, 0.0]])
    assert one_to_one_matching_score(learned, np.eye(2)) == 0.5
    assert len(one_to_one_matches(learned, np.eye(2))[0]) == 1


def test_zero_atom_has_zero_similarity():
    learned = np.array([[0.0, 0.0], [0.0, 1.0]])
    indices, sims = best_matches(learned, np.array([[1.0, 0.0]]))
    assert sims[0] == 0.0
    assert np.isfinite(mean_max_cosine_similarity(learned, np.eye(2)))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_reconstruction_errors():
    message = re.escape("got X with shape (3, 2) and X_hat with shape (2, 2)")
    with pytest.raises(ValueError, match=message):
        explained_variance(X, X_HAT[:2])
    nan = X_HAT.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="Input X_hat contains NaN"):
        explained_variance(X, nan)
    with pytest.raises(ValueError, match="Input X contains infinity"):
        mse(np.where(X > 3, np.inf, X), X)
    with pytest.raises(ValueError, match="0 sample"):
        explained_variance(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="Expected 2D array"):
        explained_variance(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="could not convert|Complex|dtype"):
        explained_variance([["a", "b"]], [["a", "b"]])


def test_code_errors():
    with pytest.raises(ValueError, match="Input codes contains NaN"):
        l0([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="0 sample"):
        dead_fraction(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="tol must be a non-negative"):
        l0(CODES, tol=-1)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        dense_fraction(CODES, threshold=2)


def test_atom_errors():
    message = "atoms of width 5 but true_atoms has atoms of width 6"
    with pytest.raises(ValueError, match=message):
        mean_max_cosine_similarity(np.ones((3, 5)), np.ones((4, 6)))
    with pytest.raises(ValueError, match="atoms of width"):
        one_to_one_matching_score(np.ones((3, 5)), np.ones((4, 6)))
    with pytest.raises(ValueError, match="Input true_atoms contains NaN"):
        recovery_rate(np.ones((3, 2)), [[np.nan, 1.0]])
    with pytest.raises(ValueError, match="0 sample"):
        best_matches(np.zeros((0, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="threshold must be a number in"):
        recovery_rate(np.ones((3, 2)), np.ones((3, 2)), threshold=1.5)


def test_public_names():
    for name in metrics.__all__:
        assert hasattr(metrics, name), name


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

_finite = st.floats(-100, 100, allow_nan=False, width=64)


@st.composite
def _dictionaries(draw, min_atoms=1, max_atoms=8):
    n_atoms = draw(st.integers(min_atoms, max_atoms))
    width = draw(st.integers(1, 6))
    atoms = draw(arrays(np.float64, (n_atoms, width), elements=_finite))
    # Nearly-zero atoms have no direction to compare.
    keep = np.linalg.norm(atoms, axis=1) > 1e-3
    atoms = atoms[keep]
    if len(atoms) == 0:
        atoms = np.ones((1, width))
    return atoms


@settings(max_examples=50, deadline=None)
@given(atoms=_dictionaries(), seed=st.integers(0, 2**16), data=st.data())
def test_mmcs_invariant_to_permutation_and_scale(atoms, seed, data):
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(atoms))
    scales = rng.uniform(0.1, 10.0, size=(len(atoms), 1))
    copy = atoms[order] * scales
    assert mean_max_cosine_similarity(copy, atoms) == pytest.approx(1.0)
    assert one_to_one_matching_score(copy, atoms) == pytest.approx(1.0)
    assert recovery_rate(copy, atoms, threshold=0.999) == 1.0


@settings(max_examples=50, deadline=None)
@given(learned=_dictionaries(), true=_dictionaries())
def test_matching_bounds(learned, true):
    width = min(learned.shape[1], true.shape[1])
    learned, true = learned[:, :width], true[:, :width]
    if np.linalg.norm(learned, axis=1).min() < 1e-3 or np.linalg.norm(
        true, axis=1
    ).min() < 1e-3:
        return
    mmcs = mean_max_cosine_similarity(learned, true)
    assert -1 - 1e-9 <= mmcs <= 1 + 1e-9
    if len(learned) >= len(true):
        # The assignment cannot beat each true atom's unconstrained best.
        assert one_to_one_matching_score(learned, true) <= mmcs + 1e-9
    rate = recovery_rate(learned, true, threshold=0.5)
    assert 0 <= rate <= 1


@settings(max_examples=50, deadline=None)
@given(
    X=arrays(
        np.float64,
        st.tuples(st.integers(2, 10), st.integers(1, 5)),
        elements=_finite,
    ),
    shift=_finite,
    noise_seed=st.integers(0, 2**16),
)
def test_explained_variance_properties(X, shift, noise_seed):
    assert explained_variance(X, X) == 1.0
    X_hat = X + np.random.RandomState(noise_seed).normal(size=X.shape)
    ev = explained_variance(X, X_hat)
    assert ev <= 1.0
    assert fraction_variance_unexplained(X, X_hat) == pytest.approx(1 - ev)
    if np.var(X) * X.size > 1e-6:
        # A common offset changes neither the residual nor the variance.
        assert explained_variance(X + shift, X_hat + shift) == pytest.approx(
            ev, rel=1e-6, abs=1e-6
        )


@settings(max_examples=50, deadline=None)
@given(
    codes=arrays(
        np.float64,
        st.tuples(st.integers(1, 12), st.integers(1, 8)),
        elements=st.sampled_from([0.0, 0.0, 0.0, 1.0, -2.5, 0.25]),
    )
)
def test_sparsity_properties(codes):
    counts = (codes != 0).sum(axis=1)
    assert l0(codes) == pytest.approx(counts.mean())
    assert 0 <= l0(codes) <= codes.shape[1]
    assert l0(codes) == pytest.approx(feature_frequencies(codes).sum())
    assert l0(sp.csr_matrix(codes)) == pytest.approx(l0(codes))
    assert 0 <= dead_fraction(codes) <= 1
    assert dead_fraction(codes) + dense_fraction(codes, threshold=0.0) == pytest.approx(
        1.0
    )
    assert l1(codes) == pytest.approx(l1(-codes))


def test_cosine_matching_holds_one_cosine_matrix():
    # The cosines were clipped into a copy: twice the matrix at the peak
    # (1 GB for 8,192 atoms a side, where 512 MB does).
    rng = np.random.default_rng(0)
    learned, true = rng.standard_normal((2048, 16)), rng.standard_normal((2048, 16))
    matrix_bytes = 2048 * 2048 * 8
    for measure in (mean_max_cosine_similarity, lambda a, b: best_matches(a, b)):
        _, peak = peak_bytes(measure, learned, true)
        assert peak < 1.5 * matrix_bytes
