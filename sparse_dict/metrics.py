"""Measures of a sparse dictionary: reconstruction, sparsity, and recovery.

Every metric is a pure function of numpy arrays (codes may also be scipy
sparse matrices), so it applies to any estimator's output:
:class:`~sparse_dict.SparseAutoencoderDictionary`, scikit-learn's
``DictionaryLearning``, ``MiniBatchDictionaryLearning``, ``SparseCoder`` or
:class:`~sparse_dict.LassoCoder`.

The scorers and the refit rule for GridSearchCV, built on these metrics, are
in :mod:`sparse_dict.model_selection`.
"""

from numbers import Real

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.utils import check_array

__all__ = [
    "best_matches",
    "dead_fraction",
    "dense_fraction",
    "explained_variance",
    "feature_frequencies",
    "fraction_variance_unexplained",
    "l0",
    "l1",
    "mean_max_cosine_similarity",
    "mse",
    "one_to_one_matches",
    "one_to_one_matching_score",
    "recovery_rate",
]

_FLOAT_DTYPES = (np.float64, np.float32)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _check_data(X, name):
    return check_array(X, dtype=_FLOAT_DTYPES, input_name=name)


def _check_pair(X, X_hat):
    X = _check_data(X, "X")
    X_hat = _check_data(X_hat, "X_hat")
    if X.shape != X_hat.shape:
        raise ValueError(
            f"X and X_hat must have the same shape, got X with shape {X.shape} "
            f"and X_hat with shape {X_hat.shape}."
        )
    return X, X_hat


def _check_codes(codes):
    codes = check_array(
        codes,
        accept_sparse=["csr", "csc", "coo"],
        dtype=_FLOAT_DTYPES,
        input_name="codes",
    )
    if sp.issparse(codes):
        # Duplicate entries (allowed in COO) would count twice; a copy
        # keeps the caller's matrix as it was.
        codes = sp.csr_matrix(codes, copy=True)
        codes.sum_duplicates()
    return codes


def _check_tol(tol):
    if not isinstance(tol, Real) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative real number, got {tol!r}.")


def _check_atom_pair(learned_atoms, true_atoms):
    learned = _check_data(learned_atoms, "learned_atoms")
    true = _check_data(true_atoms, "true_atoms")
    if learned.shape[1] != true.shape[1]:
        raise ValueError(
            f"learned_atoms has atoms of width {learned.shape[1]} but true_atoms "
            f"has atoms of width {true.shape[1]}; both must be arrays of shape "
            "(n_atoms, n_features) with the same n_features."
        )
    return learned, true


def _unit_rows(atoms):
    atoms = atoms.astype(np.float64)
    # Each row in units of its largest value first: a norm of rows near
    # 1e-200 underflowed to 0 (and 1e160, overflowed), and the atom read as
    # all zeros.
    peaks = np.abs(atoms).max(axis=1, keepdims=True) if atoms.size else np.ones((len(atoms), 1))
    atoms = np.divide(atoms, peaks, out=np.zeros_like(atoms), where=peaks > 0)
    norms = np.linalg.norm(atoms, axis=1, keepdims=True)
    # A zero atom points nowhere: give it cosine 0 with everything rather
    # than NaN, so one dead atom does not poison a whole comparison.
    return np.divide(atoms, norms, out=np.zeros_like(atoms), where=norms > 0)


# Cosines of unit rows computed in float64 are off by a few 1e-16.
_COSINE_ROUNDING = 1e-12


def _cosine_matrix(a, b):
    """Cosines of each row of ``a`` (the matrix's rows) with each row of ``b``."""
    # Unit rows' products can round to just past +-1 (1.0000000000000002).
    # Clipped in place: a clipped copy doubled the peak (1 GB for 8,192
    # atoms a side).
    cosines = _unit_rows(a) @ _unit_rows(b).T
    return np.clip(cosines, -1.0, 1.0, out=cosines)


# Dense arrays are reduced a block of rows at a time, so that a float32
# array of activations is never copied whole to float64 (and a memmap is
# read piece by piece).
_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(array):
    rows = max(1, _BLOCK_ELEMENTS // max(1, array.shape[1]))
    for start in range(0, array.shape[0], rows):
        yield slice(start, start + rows)


def _activity_counts(codes, tol):
    """Number of active codes in each column."""
    if sp.issparse(codes):
        active = codes.copy()
        active.data = np.abs(active.data) > tol
        active.eliminate_zeros()
        return np.asarray(active.sum(axis=0)).ravel()
    counts = np.zeros(codes.shape[1], dtype=np.int64)
    for rows in _row_blocks(codes):
        block = codes[rows]
        # No copy of |block| where tol is 0, the usual case: counting the
        # non-zeros as they are took 1.6 to 2.4 times as long.
        counts += np.count_nonzero(block if tol == 0 else np.abs(block) > tol, axis=0)
    return counts


# --------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------


def explained_variance(X, X_hat):
    """Fraction of the variance of ``X`` that the reconstruction explains.

    ``1 - sum ||X - X_hat||^2 / sum ||X - mean(X, axis=0)||^2``, summed over
    all rows and features: the pooled definition used for sparse
    autoencoders. Where no column of ``X`` is constant it equals
    scikit-learn's ``r2_score(X, X_hat, multioutput="variance_weighted")``;
    a constant column (a dead neuron) differs: its errors count here, while
    ``r2_score`` gives such columns no weight. Unlike
    scikit-learn's ``explained_variance_score``, it counts a constant bias
    of the reconstruction as error (that score forgives any offset, which a
    dictionary's reconstruction must get right too). Sums are accumulated
    in float64.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data.
    X_hat : array-like of shape (n_samples, n_features)
        Its reconstruction.

    Returns
    -------
    score : float
        1.0 for a perfect reconstruction, 0.0 for predicting the column
        means, negative when worse than that. When ``X`` has no variance
        (for instance a single row) the score is 1.0 for a perfect
        reconstruction and 0.0 otherwise (scikit-learn's ``r2_score`` gives
        NaN for a single row); a reconstruction worse than the mean by more
        than float64 can hold scores ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import explained_variance
    >>> X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    >>> explained_variance(X, 0.5 * X)
    0.75
    """
    X, X_hat = _check_pair(X, X_hat)
    return _explained_variance(X, X_hat)


def _explained_variance(X, X_hat):
    """:func:`explained_variance` of checked inputs; ``X_hat`` may be given by blocks.

    ``X`` is a dense array or a CSR matrix. ``X_hat`` is an array of its
    shape or a function of a slice of rows giving their reconstruction, so
    that a model's reconstruction of data larger than memory is scored a
    block at a time (``score`` held all of it, and a dense copy of a CSR
    input: 1.4 GB beside a 1.07 GB memmap).
    """
    with np.errstate(over="ignore", under="ignore"):
        residual, total, constant, differs = _variance_sums(X, X_hat, 1.0)
        if (not (np.isfinite(residual) and np.isfinite(total))
                or (not constant and total < _TINY_SUM)
                or (differs and residual == 0.0)):
            # Squares beyond float64's range (values from about 1e154), or
            # lost below it (1e-150 and less): the ratio is the same in
            # units of the largest value.
            peak = max(_peak(X, _rows_of(X)), _peak(X, _rows_of(X_hat)))
            residual, total, constant, differs = _variance_sums(X, X_hat, peak)
    # No variance is told by the columns themselves (a constant column's
    # mean is its value): a perfect reconstruction is one equal to X.
    if constant:
        return 0.0 if differs else 1.0
    if total == 0.0:
        # X varies, but by less than float64 resolves beside the largest value
        # (of X_hat, 1e200 times X's): the ratio is beyond float64 too.
        return -np.inf if differs else 1.0
    return 1.0 - residual / total


# A total sum of squares this small has lost digits to float64's underflow.
_TINY_SUM = 1e-250


def _rows_of(array):
    """A function of a slice of rows giving them as a dense array.

    An array's own indexing (a CSR matrix densified a block at a time), or
    ``array`` itself where it is already such a function.
    """
    if callable(array):
        return array
    if sp.issparse(array):
        return lambda rows: array[rows].toarray()
    return lambda rows: array[rows]


def _peak(X, rows_of):
    """The largest absolute value of the rows ``rows_of`` gives, block by block."""
    return max((float(np.max(np.abs(rows_of(rows)), initial=0.0)) for rows in _row_blocks(X)),
               default=0.0)


def _variance_sums(X, X_hat, unit):
    """Sums of squares of ``X / unit``: residual, total; whether ``X`` is constant, and
    whether ``X_hat`` differs from it anywhere (a difference whose square underflows
    still counts)."""
    # First the columns' means, ranges and whether they are constant. The
    # mean of X / unit, not of X: X's column sums can overflow where its
    # values do not (rows near 1e307 summed to infinity, scored 1.0).
    data, reconstruction = _rows_of(X), _rows_of(X_hat)
    sums = np.zeros(X.shape[1])
    low, high = np.full(X.shape[1], np.inf), np.full(X.shape[1], -np.inf)
    for rows in _row_blocks(X):
        block = data(rows).astype(np.float64)
        if unit != 1.0:  # the common case divides nothing
            block /= unit
        sums += block.sum(axis=0)
        low, high = np.minimum(low, block.min(axis=0)), np.maximum(high, block.max(axis=0))
    fixed = low == high
    # A constant column's mean is its value: the mean's rounding error
    # (0.1 three times averages to 0.10000000000000002) squared would pass
    # for variance, and swamp that of columns that vary by little.
    mean = np.where(fixed, low, sums / X.shape[0])
    residual = total = 0.0
    differs = False
    for rows in _row_blocks(X):
        block = data(rows).astype(np.float64)
        block_hat = np.asarray(reconstruction(rows))
        differs = differs or not np.array_equal(block, block_hat)
        if unit != 1.0:
            block /= unit
            block_hat = block_hat / unit
        residual += float(np.sum((block - block_hat) ** 2))
        total += float(np.sum((block - mean) ** 2))
    return residual, total, bool(np.all(fixed)), differs


def fraction_variance_unexplained(X, X_hat):
    """Fraction of the variance of ``X`` left in the residual ``X - X_hat``.

    Equal to ``1 - explained_variance(X, X_hat)``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data.
    X_hat : array-like of shape (n_samples, n_features)
        Its reconstruction.

    Returns
    -------
    fvu : float
        0.0 for a perfect reconstruction, lower is better.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import fraction_variance_unexplained
    >>> X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    >>> fraction_variance_unexplained(X, 0.5 * X)
    0.25
    """
    return 1.0 - explained_variance(X, X_hat)


def mse(X, X_hat):
    """Mean squared reconstruction error over all entries.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The data.
    X_hat : array-like of shape (n_samples, n_features)
        Its reconstruction.

    Returns
    -------
    mse : float
        ``mean((X - X_hat) ** 2)``; multiply by ``n_features`` for the mean
        squared norm of the residual per row.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import mse
    >>> mse([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 2.0]])
    1.0
    """
    X, X_hat = _check_pair(X, X_hat)
    squared = sum(
        float(np.sum((X[rows].astype(np.float64) - X_hat[rows]) ** 2))
        for rows in _row_blocks(X)
    )
    return squared / X.size


# --------------------------------------------------------------------------
# Sparsity
# --------------------------------------------------------------------------


def l0(codes, *, tol=0.0):
    """Mean number of active features per row.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, one row per sample.
    tol : float, default=0.0
        A code counts as active when its absolute value exceeds ``tol``.

    Returns
    -------
    l0 : float
        Mean count of active codes per row.

    Examples
    --------
    >>> from sparse_dict.metrics import l0
    >>> l0([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    1.5
    >>> l0([[0.0, 1e-9, 2.0], [0.0, 0.0, 3.0]], tol=1e-6)
    1.0
    """
    codes = _check_codes(codes)
    _check_tol(tol)
    return float(_activity_counts(codes, tol).sum() / codes.shape[0])


def l1(codes):
    """Mean L1 norm of the codes per row.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, one row per sample.

    Returns
    -------
    l1 : float
        ``mean over rows of sum |codes|``.

    Examples
    --------
    >>> from sparse_dict.metrics import l1
    >>> l1([[0.0, -1.0, 2.0], [0.0, 0.0, 3.0]])
    3.0
    """
    codes = _check_codes(codes)
    if sp.issparse(codes):
        total = float(np.abs(codes.data).sum(dtype=np.float64))
    else:
        total = sum(
            float(np.abs(codes[rows]).sum(dtype=np.float64))
            for rows in _row_blocks(codes)
        )
    return total / codes.shape[0]


def feature_frequencies(codes, *, tol=0.0):
    """Fraction of rows on which each feature fires.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, one row per sample.
    tol : float, default=0.0
        A code counts as active when its absolute value exceeds ``tol``.

    Returns
    -------
    frequencies : ndarray of shape (n_components,)
        Firing frequency of each feature, in [0, 1].

    Examples
    --------
    >>> from sparse_dict.metrics import feature_frequencies
    >>> feature_frequencies([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    array([0. , 0.5, 1. ])
    """
    codes = _check_codes(codes)
    _check_tol(tol)
    return _activity_counts(codes, tol) / codes.shape[0]


def dead_fraction(codes, *, tol=0.0):
    """Fraction of features that never fire.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, one row per sample.
    tol : float, default=0.0
        A code counts as active when its absolute value exceeds ``tol``.

    Returns
    -------
    dead_fraction : float
        Share of columns of ``codes`` with no active entry.

    Examples
    --------
    >>> from sparse_dict.metrics import dead_fraction
    >>> dead_fraction([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    0.5
    """
    frequencies = feature_frequencies(codes, tol=tol)
    return float(np.mean(frequencies == 0))


def dense_fraction(codes, *, threshold=0.5, tol=0.0):
    """Fraction of features that fire on more than ``threshold`` of the rows.

    Dense features fire on most inputs and so carry little specific
    meaning; a healthy sparse dictionary has few of them.

    Parameters
    ----------
    codes : {array-like, sparse matrix} of shape (n_samples, n_components)
        Codes, one row per sample.
    threshold : float, default=0.5
        Firing frequency, in [0, 1], above which a feature counts as dense.
    tol : float, default=0.0
        A code counts as active when its absolute value exceeds ``tol``.

    Returns
    -------
    dense_fraction : float
        Share of features whose firing frequency exceeds ``threshold``.

    Examples
    --------
    >>> from sparse_dict.metrics import dense_fraction
    >>> codes = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    >>> dense_fraction(codes)
    0.5
    >>> dense_fraction(codes, threshold=0.9)
    0.25
    """
    if not isinstance(threshold, Real) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}.")
    frequencies = feature_frequencies(codes, tol=tol)
    return float(np.mean(frequencies > threshold))


# --------------------------------------------------------------------------
# Dictionary recovery
# --------------------------------------------------------------------------


def best_matches(learned_atoms, true_atoms):
    """For each true atom, the learned atom most similar to it.

    Similarity is the cosine, with sign: with non-negative codes an atom and
    its negative are different features. Atoms need not be unit norm; an
    all-zero atom has cosine 0 with every other atom.

    Parameters
    ----------
    learned_atoms : array-like of shape (n_learned, n_features)
        The learned dictionary, one atom per row (e.g. ``est.components_``).
    true_atoms : array-like of shape (n_true, n_features)
        The reference dictionary, one atom per row.

    Returns
    -------
    indices : ndarray of shape (n_true,)
        Row of ``learned_atoms`` closest to each true atom.
    similarities : ndarray of shape (n_true,)
        The cosine similarity of each true atom with its best match.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import best_matches
    >>> true = np.eye(3)
    >>> learned = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    >>> indices, similarities = best_matches(learned, true)
    >>> indices
    array([1, 1, 0])
    >>> similarities.round(3)
    array([0.707, 0.707, 1.   ])
    """
    learned, true = _check_atom_pair(learned_atoms, true_atoms)
    # One row a true atom: numpy's argmax down columns copies the matrix
    # to make them contiguous (twice the matrix at the peak).
    cosines = _cosine_matrix(true, learned)
    indices = np.argmax(cosines, axis=1)
    return indices, cosines[np.arange(true.shape[0]), indices]


def mean_max_cosine_similarity(learned_atoms, true_atoms):
    """Mean max cosine similarity (MMCS) of a learned dictionary to the truth.

    For each true atom take its highest cosine similarity with any learned
    atom, then average over the true atoms (Sharkey et al., "Taking features
    out of superposition with sparse autoencoders", 2022). It is 1 when every
    true atom appears, up to positive scale, among the learned atoms. Swap
    the arguments to ask instead how many learned atoms are real features.

    Parameters
    ----------
    learned_atoms : array-like of shape (n_learned, n_features)
        The learned dictionary, one atom per row (e.g. ``est.components_``).
    true_atoms : array-like of shape (n_true, n_features)
        The reference dictionary, one atom per row.

    Returns
    -------
    mmcs : float
        In [-1, 1], higher is better.

    See Also
    --------
    best_matches : The match and similarity of each true atom.
    recovery_rate : Share of true atoms matched above a threshold.
    one_to_one_matching_score : The same with each learned atom used once.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import mean_max_cosine_similarity
    >>> true = np.eye(2)
    >>> mean_max_cosine_similarity([[0.0, 3.0], [2.0, 0.0]], true)
    1.0
    >>> round(mean_max_cosine_similarity([[1.0, 1.0]], true), 4)
    0.7071
    """
    return float(np.mean(best_matches(learned_atoms, true_atoms)[1]))


def recovery_rate(learned_atoms, true_atoms, threshold=0.9):
    """Share of true atoms with a learned atom at cosine ``>= threshold``.

    Parameters
    ----------
    learned_atoms : array-like of shape (n_learned, n_features)
        The learned dictionary, one atom per row.
    true_atoms : array-like of shape (n_true, n_features)
        The reference dictionary, one atom per row.
    threshold : float, default=0.9
        Cosine similarity, in [-1, 1], from which a true atom counts as
        recovered. Cosines within ``1e-12`` below it count too: identical
        atoms must count at ``threshold=1``, whatever the rounding of their
        norms.

    Returns
    -------
    rate : float
        In [0, 1], higher is better.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import recovery_rate
    >>> learned = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    >>> recovery_rate(learned, np.eye(3))
    0.3333333333333333
    >>> recovery_rate(learned, np.eye(3), threshold=0.7)
    1.0
    """
    if not isinstance(threshold, Real) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}.")
    similarities = best_matches(learned_atoms, true_atoms)[1]
    return float(np.mean(similarities >= threshold - _COSINE_ROUNDING))


def one_to_one_matches(learned_atoms, true_atoms):
    """Pair learned and true atoms one to one, maximising total cosine.

    Solves the assignment problem (Hungarian algorithm,
    :func:`scipy.optimize.linear_sum_assignment`) on the cosine similarity
    matrix, so no learned atom can stand for two true atoms.

    Parameters
    ----------
    learned_atoms : array-like of shape (n_learned, n_features)
        The learned dictionary, one atom per row.
    true_atoms : array-like of shape (n_true, n_features)
        The reference dictionary, one atom per row.

    Returns
    -------
    learned_indices : ndarray of shape (n_pairs,)
        Rows of ``learned_atoms`` in the pairs, ``n_pairs = min(n_learned,
        n_true)``.
    true_indices : ndarray of shape (n_pairs,)
        Rows of ``true_atoms`` in the pairs, in increasing order.
    similarities : ndarray of shape (n_pairs,)
        Cosine similarity of each pair.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import one_to_one_matches
    >>> learned = np.array([[0.0, 1.0], [1.0, 0.1]])
    >>> learned_idx, true_idx, sims = one_to_one_matches(learned, np.eye(2))
    >>> learned_idx, true_idx
    (array([1, 0]), array([0, 1]))
    """
    learned, true = _check_atom_pair(learned_atoms, true_atoms)
    cosines = _cosine_matrix(learned, true)
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    order = np.argsort(cols)
    rows, cols = rows[order], cols[order]
    return rows, cols, cosines[rows, cols]


def one_to_one_matching_score(learned_atoms, true_atoms):
    """Mean cosine of the best one-to-one pairing, over the true atoms.

    Unlike :func:`mean_max_cosine_similarity`, one learned atom cannot match
    several true atoms; true atoms left without a partner (when there are
    fewer learned atoms than true ones) count as 0.

    Parameters
    ----------
    learned_atoms : array-like of shape (n_learned, n_features)
        The learned dictionary, one atom per row.
    true_atoms : array-like of shape (n_true, n_features)
        The reference dictionary, one atom per row.

    Returns
    -------
    score : float
        In [-1, 1], higher is better.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.metrics import (
    ...     mean_max_cosine_similarity, one_to_one_matching_score)
    >>> learned = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> mean_max_cosine_similarity(learned, np.eye(2))
    0.5
    >>> one_to_one_matching_score(learned, np.array([[1.0, 0.0], [0.8, 0.6]]))
    0.9
    """
    similarities = one_to_one_matches(learned_atoms, true_atoms)[2]
    n_true = _check_data(true_atoms, "true_atoms").shape[0]
    return float(np.sum(similarities) / n_true)



# The model-selection helpers live in sparse_dict.model_selection; their names
# stay importable from here for one release, with a warning. Imported on
# first use, because model_selection itself imports the metrics above.
_MOVED_TO_MODEL_SELECTION = (
    "BestUnderL0",
    "SparseCodingScorer",
    "best_under_l0",
    "explained_variance_scorer",
    "sparse_coding_scorer",
)


def __getattr__(name):
    if name in _MOVED_TO_MODEL_SELECTION:
        import warnings

        from sparse_dict import model_selection

        warnings.warn(
            f"sparse_dict.metrics.{name} has moved to sparse_dict.model_selection."
            f"{name}; importing it from sparse_dict.metrics is deprecated and will "
            "stop working in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(model_selection, name)
    raise AttributeError(f"module 'sparse_dict.metrics' has no attribute {name!r}")
