"""Tests for sparse_dict.datasets.make_superposition."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dict import datasets
from sparse_dict.datasets import _activation_probabilities, make_superposition
from memory_peak import peak_bytes


def test_shapes_and_dtypes():
    for dtype in (np.float32, np.float64):
        X, atoms, codes = make_superposition(
            n_samples=50, n_features=8, n_components=20, random_state=0, dtype=dtype
        )
        assert X.shape == (50, 8)
        assert atoms.shape == (20, 8)
        assert codes.shape == (50, 20)
        assert X.dtype == atoms.dtype == codes.dtype == dtype


def test_guarantees():
    X, atoms, codes = make_superposition(
        n_samples=500, n_features=16, n_components=40, n_active=3, random_state=0
    )
    np.testing.assert_allclose(np.linalg.norm(atoms, axis=1), 1.0)
    assert (codes >= 0).all()
    np.testing.assert_allclose(X, codes @ atoms, atol=1e-12)
    active = codes[codes > 0]
    assert active.min() > 0 and active.max() <= 1.0


def test_expected_number_active():
    n_samples, n_active = 4000, 5.0
    _, _, codes = make_superposition(
        n_samples=n_samples, n_features=32, n_components=128, n_active=n_active,
        random_state=0,
    )
    counts = (codes > 0).sum(axis=1)
    # The count per row is a sum of independent Bernoullis: its variance is
    # below n_active, so the mean is within 4 standard errors of n_active.
    assert abs(counts.mean() - n_active) < 4 * np.sqrt(n_active / n_samples)
    assert counts.var() == pytest.approx(n_active * (1 - n_active / 128), rel=0.15)


def test_repeatable():
    first = make_superposition(n_samples=30, n_features=6, n_components=12,
                               correlation=0.5, noise=0.1, random_state=3)
    second = make_superposition(n_samples=30, n_features=6, n_components=12,
                                correlation=0.5, noise=0.1, random_state=3)
    other = make_superposition(n_samples=30, n_features=6, n_components=12,
                               correlation=0.5, noise=0.1, random_state=4)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_repeatable_across_blocks():
    # Row blocks are drawn in sequence: asking for more rows than one block
    # must still be deterministic, and the first block's rows are unchanged.
    big = make_superposition(n_samples=5000, n_features=4, n_components=8,
                             random_state=0)[2]
    again = make_superposition(n_samples=5000, n_features=4, n_components=8,
                               random_state=0)[2]
    np.testing.assert_array_equal(big, again)
    small = make_superposition(n_samples=100, n_features=4, n_components=8,
                               random_state=0)[2]
    np.testing.assert_array_equal(big[:100], small)


def test_memory_stays_near_what_is_returned():
    # The rows were made from a float64 copy of all the codes at once: a
    # peak of 3.2 times what is returned (float32, 1,024 atoms).
    (X, atoms, codes), peak = peak_bytes(
        make_superposition, n_samples=40_000, n_features=32, n_components=1024, noise=0.1,
        random_state=0, dtype=np.float32)
    assert peak < 2.0 * (X.nbytes + atoms.nbytes + codes.nbytes)


def test_magnitude_range():
    _, _, codes = make_superposition(
        n_samples=300, n_features=8, n_components=16, magnitude_range=(2.0, 3.0),
        random_state=0,
    )
    active = codes[codes > 0]
    assert active.min() >= 2.0 and active.max() <= 3.0
    assert active.max() - active.min() > 0.9
    _, _, constant = make_superposition(
        n_samples=100, n_features=8, n_components=16, magnitude_range=(1.5, 1.5),
        random_state=0,
    )
    np.testing.assert_array_equal(np.unique(constant), [0.0, 1.5])


def test_frequency_decay():
    n_components, n_active = 50, 4.0
    _, _, codes = make_superposition(
        n_samples=6000, n_features=8, n_components=n_components, n_active=n_active,
        frequency_decay=1.0, random_state=0,
    )
    frequencies = (codes > 0).mean(axis=0)
    expected = 1.0 / np.arange(1, n_components + 1)
    expected *= n_active / expected.sum()
    np.testing.assert_allclose(frequencies, expected, atol=0.025)
    assert frequencies[0] > 5 * frequencies[-1]


def test_uniform_frequencies_without_decay():
    _, _, codes = make_superposition(
        n_samples=6000, n_features=8, n_components=20, n_active=2.0, random_state=0
    )
    np.testing.assert_allclose((codes > 0).mean(axis=0), 0.1, atol=0.02)


def test_activation_probabilities_capped_at_one():
    probabilities = _activation_probabilities(10, 4.0, frequency_decay=3.0)
    assert probabilities.sum() == pytest.approx(4.0)
    assert probabilities.max() == 1.0
    assert (np.diff(probabilities) <= 0).all()
    np.testing.assert_array_equal(_activation_probabilities(5, 5.0, 0.0), np.ones(5))


def _coactivation_spread(correlation):
    _, _, codes = make_superposition(
        n_samples=4000, n_features=8, n_components=30, n_active=6,
        correlation=correlation, random_state=0,
    )
    active = (codes > 0).astype(float)
    c = np.corrcoef(active.T)
    return np.abs(c[np.triu_indices_from(c, k=1)]).mean(), active.mean()


def test_correlation():
    independent, rate_independent = _coactivation_spread(0.0)
    correlated, rate_correlated = _coactivation_spread(0.8)
    assert independent < 0.03
    assert correlated > 3 * independent
    # Correlation leaves each feature's firing rate unchanged.
    assert rate_correlated == pytest.approx(rate_independent, abs=0.01)


def test_noise():
    X, atoms, codes = make_superposition(
        n_samples=2000, n_features=16, n_components=32, noise=0.3, random_state=0
    )
    assert np.std(X - codes @ atoms) == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(n_samples=0), "n_samples must be an integer >= 1"),
        (dict(n_features=2.5), "n_features must be an integer"),
        (dict(n_components=0), "n_components must be an integer >= 1"),
        (dict(n_active=0), "n_active must be a number in"),
        (dict(n_components=4, n_active=5), r"n_active must be a number in \(0, n_comp"),
        (dict(magnitude_range=(1.0, 0.5)), "magnitude_range must be"),
        (dict(magnitude_range=(-1.0, 1.0)), "magnitude_range must be"),
        (dict(magnitude_range=1.0), "magnitude_range must be a pair"),
        (dict(correlation=1.0), "correlation must be a finite real number"),
        (dict(frequency_decay=-1), "frequency_decay must be"),
        (dict(frequency_decay=np.inf), "frequency_decay must be a finite real number"),
        (dict(noise=-0.1), "noise must be"),
        (dict(noise=np.inf), "noise must be a finite real number >= 0.0, got inf"),
        (dict(magnitude_range=(0.0, 1e300), dtype=np.float32),
         "goes beyond the range of float32"),
        # Below it: codes and rows of zeros, where the codes are documented
        # non-zero exactly where a feature is active.
        (dict(magnitude_range=(1e-50, 1e-46), dtype=np.float32),
         "gives codes below the smallest float32, which round to 0"),
        (dict(magnitude_range=(1e-44, 2e-44), dtype=np.float32),
         "gives values below the smallest float32"),
        (dict(dtype=np.int64), "dtype must be np.float32 or np.float64"),
    ],
)
def test_errors(params, message):
    with pytest.raises(ValueError, match=message):
        make_superposition(**params)


def test_a_steep_frequency_decay_keeps_n_active():
    # The capped features pass their mass on; plain powers underflowed to
    # zero and lost it (one active feature a row instead of three).
    for decay in (50.0, 1e6):
        _, _, codes = make_superposition(500, 8, 64, n_active=3, frequency_decay=decay,
                                         random_state=0)
        assert (codes > 0).sum(axis=1).mean() == 3.0


def test_load_corpus_is_exported():
    assert "load_corpus" in datasets.__all__
    assert callable(datasets.load_corpus)


@pytest.mark.parametrize("bad", [None, "a", -5, 2.5, True])
def test_load_corpus_refuses_a_bad_min_length(bad):
    # None failed inside the filter, naming no argument; -5 passed silently.
    with pytest.raises(ValueError, match=f"min_length must be a non-negative int, got "
                                         f"{re.escape(repr(bad))}"):
        datasets.load_corpus("test", min_length=bad)
    assert len(datasets.load_corpus("test", n_texts=3, min_length=0)) == 3


@settings(max_examples=25, deadline=None)
@given(
    n_samples=st.integers(1, 40),
    n_features=st.integers(1, 10),
    n_components=st.integers(1, 30),
    active_share=st.floats(0.01, 1.0),
    decay=st.floats(0.0, 3.0),
    correlation=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_guarantees_hold_for_any_parameters(
    n_samples, n_features, n_components, active_share, decay, correlation, seed
):
    n_active = max(active_share * n_components, 1e-3)
    X, atoms, codes = make_superposition(
        n_samples=n_samples, n_features=n_features, n_components=n_components,
        n_active=n_active, frequency_decay=decay, correlation=correlation,
        random_state=seed,
    )
    np.testing.assert_allclose(np.linalg.norm(atoms, axis=1), 1.0)
    assert (codes >= 0).all()
    assert np.isfinite(X).all()
    np.testing.assert_allclose(X, codes @ atoms, atol=1e-10)
    probabilities = _activation_probabilities(n_components, n_active, decay)
    assert probabilities.sum() == pytest.approx(n_active)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
