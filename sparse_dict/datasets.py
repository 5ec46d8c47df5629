"""Data with known ground truth, and the bundled text corpus.

:func:`make_superposition` draws synthetic activations in the set-up of
Sharkey et al., "Taking features out of superposition with sparse
autoencoders" (2022): more true features than dimensions, each row a sparse
non-negative mixture of them. A dictionary learner is then judged by how many
of the true atoms it recovers (see :mod:`sparse_dict.metrics`).
"""

from numbers import Integral, Real

import numpy as np
from scipy.special import ndtri
from sklearn.utils import check_random_state

from sparse_dict._corpus import load_corpus

__all__ = ["load_corpus", "make_superposition"]

# Rows are drawn in fixed-size blocks so that temporaries stay small for large
# n_samples; the block size is a constant so that random_state still fixes
# the output.
_BLOCK_ROWS = 4096

# Rank of the latent factor model behind `correlation`: a handful of shared
# causes, so that features fall into loosely co-active groups.
_N_FACTORS = 8


def _activation_probabilities(n_components, n_active, frequency_decay):
    """Per-feature firing probabilities summing to ``n_active``.

    Probabilities follow ``(rank + 1) ** -frequency_decay``; any that would
    exceed 1 are capped at 1 and the rest rescaled to keep the sum.
    """
    # In logs, and scaled to the largest free weight at each round: a steep
    # decay underflows the plain powers to zero, which would lose the mass
    # that the capped features pass on.
    log_weights = -frequency_decay * np.log(np.arange(1, n_components + 1, dtype=np.float64))
    probabilities = np.zeros(n_components)
    free = np.ones(n_components, dtype=bool)
    remaining = float(n_active)
    while free.any():
        weights = np.zeros(n_components)
        weights[free] = np.exp(log_weights[free] - log_weights[free].max())
        candidate = weights * (remaining / weights[free].sum())
        capped = free & (candidate >= 1.0)
        if not capped.any():
            probabilities[free] = candidate[free]
            break
        probabilities[capped] = 1.0
        free &= ~capped
        remaining -= capped.sum()
    return probabilities


def _check_int(value, name, low):
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)


def _check_real(value, name, low, high=np.inf, *, high_open=False):
    ok = isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        upper = "" if np.isinf(high) else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(
            f"{name} must be a finite real number >= {low}{upper}, got {value!r}."
        )
    return float(value)


def make_superposition(
    n_samples=1000,
    n_features=64,
    n_components=256,
    *,
    n_active=5.0,
    magnitude_range=(0.0, 1.0),
    correlation=0.0,
    frequency_decay=0.0,
    noise=0.0,
    random_state=None,
    dtype=np.float64,
):
    """Synthetic activations in superposition, with their true features.

    Draws ``n_components`` true atoms, random directions of unit norm in
    ``n_features`` dimensions (usually ``n_components > n_features``, so they
    cannot all be orthogonal). Each row of ``X`` is a sparse non-negative
    combination of them, ``X = true_codes @ true_atoms + noise``: feature
    ``i`` fires on a row with probability ``p_i`` and then takes a magnitude
    drawn uniformly from ``magnitude_range``. This is the set-up of Sharkey
    et al., "Taking features out of superposition with sparse autoencoders".

    Parameters
    ----------
    n_samples : int, default=1000
        Number of rows.
    n_features : int, default=64
        Dimension of the activation space (width of ``X`` and of each atom).
    n_components : int, default=256
        Number of true features (atoms).
    n_active : float, default=5.0
        Expected number of active features per row: the firing probabilities
        ``p_i`` sum to it. The count on each row varies (rows with no active
        feature are possible). Must be in (0, n_components].
    magnitude_range : tuple of (float, float), default=(0.0, 1.0)
        ``(low, high)`` with ``0 <= low <= high`` and ``high > 0``: an active
        feature's magnitude is uniform on ``(low, high]``, so it is always
        positive. Set ``low == high`` for constant magnitudes.
    correlation : float, default=0.0
        Strength, in [0, 1), of the dependence between features firing.
        0 makes features fire independently. Above 0, firing is decided by
        thresholding Gaussian latents that share a few random common causes
        (a rank-8 factor model), so some pairs of features tend to fire
        together and others apart; ``correlation`` is the share of each
        latent's variance that comes from the shared causes. The firing
        probabilities ``p_i`` are unchanged.
    frequency_decay : float, default=0.0
        Exponent of the power law (Zipf-like) of firing frequencies:
        ``p_i`` is proportional to ``(i + 1) ** -frequency_decay``, so
        feature 0 is the most frequent. 0 gives every feature the same
        frequency ``n_active / n_components``. Probabilities that would
        exceed 1 are capped at 1 and the others raised to keep the sum.
    noise : float, default=0.0
        Standard deviation of the isotropic Gaussian noise added to ``X``.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw; an int gives the same output on every call. The
        first rows do not depend on ``n_samples``: asking for more rows
        extends the data set.
    dtype : {np.float64, np.float32}, default=np.float64
        Floating type of the three returned arrays.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        The activations.
    true_atoms : ndarray of shape (n_components, n_features)
        The true features, one unit-norm atom per row.
    true_codes : ndarray of shape (n_samples, n_components)
        The non-negative coefficients; non-zero exactly where a feature is
        active. ``X`` equals ``true_codes @ true_atoms`` (up to rounding) when
        ``noise=0``.

    See Also
    --------
    sparse_dict.metrics.mean_max_cosine_similarity : Score a learned
        dictionary against ``true_atoms``.

    Examples
    --------
    >>> from sparse_dict.datasets import make_superposition
    >>> X, true_atoms, true_codes = make_superposition(
    ...     n_samples=2000, n_features=32, n_components=128, n_active=4,
    ...     random_state=0)
    >>> X.shape, true_atoms.shape, true_codes.shape
    ((2000, 32), (128, 32), (2000, 128))
    >>> bool((true_codes >= 0).all())
    True
    >>> round(float((true_codes > 0).sum(axis=1).mean()), 1)  # about n_active
    4.1
    """
    n_samples = _check_int(n_samples, "n_samples", 1)
    n_features = _check_int(n_features, "n_features", 1)
    n_components = _check_int(n_components, "n_components", 1)
    if not isinstance(n_active, Real) or isinstance(n_active, bool) or not (
        0 < n_active <= n_components
    ):
        raise ValueError(
            f"n_active must be a number in (0, n_components={n_components}], "
            f"got {n_active!r}."
        )
    try:
        low, high = (float(v) for v in magnitude_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"magnitude_range must be a pair (low, high), got {magnitude_range!r}."
        ) from None
    if not (np.isfinite([low, high]).all() and 0 <= low <= high and high > 0):
        raise ValueError(
            "magnitude_range must be (low, high) with 0 <= low <= high and "
            f"high > 0, got {magnitude_range!r}."
        )
    correlation = _check_real(correlation, "correlation", 0.0, 1.0, high_open=True)
    frequency_decay = _check_real(frequency_decay, "frequency_decay", 0.0)
    noise = _check_real(noise, "noise", 0.0)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be np.float32 or np.float64, got {dtype}.")
    if high > float(np.finfo(dtype).max):
        raise ValueError(f"magnitude_range={magnitude_range!r} goes beyond the range of "
                         f"{dtype.name}; choose smaller magnitudes.")
    rng = check_random_state(random_state)

    true_atoms = rng.standard_normal((n_components, n_features))
    true_atoms /= np.linalg.norm(true_atoms, axis=1, keepdims=True)

    probabilities = _activation_probabilities(n_components, n_active, frequency_decay)
    # A feature fires when its standard-normal latent falls below the
    # p-quantile, which keeps the marginal rate p whatever the correlation.
    thresholds = ndtri(probabilities)
    n_factors = min(_N_FACTORS, n_components)
    if correlation > 0:
        loadings = rng.standard_normal((n_components, n_factors))
        loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)

    # One stream per kind of draw, each consumed row by row, so the first
    # rows come out the same whatever n_samples is.
    seeds = rng.randint(2**32, size=4, dtype=np.uint64)
    latent_rng, shared_rng, magnitude_rng, noise_rng = (
        np.random.RandomState(seed) for seed in seeds
    )
    true_codes = np.empty((n_samples, n_components), dtype=dtype)
    X = np.empty((n_samples, n_features), dtype=dtype)
    for start in range(0, n_samples, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, n_samples - start)
        latent = latent_rng.standard_normal((rows, n_components))
        if correlation > 0:
            shared = shared_rng.standard_normal((rows, n_factors)) @ loadings.T
            latent = np.sqrt(1.0 - correlation) * latent + np.sqrt(correlation) * shared
        magnitudes = high - (high - low) * magnitude_rng.random_sample(
            (rows, n_components)
        )
        active = latent < thresholds
        true_codes[start : start + rows] = np.where(active, magnitudes, 0.0)
        # Codes are non-zero exactly where a feature is active: magnitudes
        # below the dtype's smallest value would round to zero (1e-50 in
        # float32 gave codes and rows of zeros).
        if (active & (true_codes[start : start + rows] == 0)).any():
            raise ValueError(f"magnitude_range={magnitude_range!r} gives codes below the "
                             f"smallest {dtype.name}, which round to 0; choose larger "
                             "magnitudes.")
        # The rows block by block too: all at once, the float64 copy of the
        # codes took 3.2 times the memory of what is returned.
        wide = true_codes[start : start + rows].astype(np.float64) @ true_atoms
        if noise > 0:
            wide += noise * noise_rng.standard_normal(wide.shape)
        block = X[start : start + rows]
        block[...] = wide
        if not np.isfinite(block).all():
            raise ValueError(f"magnitude_range={magnitude_range!r} gives values beyond the "
                             f"range of {dtype.name}; choose smaller magnitudes.")
        if ((block == 0) & (wide != 0)).any():
            raise ValueError(f"magnitude_range={magnitude_range!r} gives values below the "
                             f"smallest {dtype.name}, which round to 0; choose larger "
                             "magnitudes.")
    return X, true_atoms.astype(dtype), true_codes
