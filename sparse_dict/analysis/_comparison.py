"""Comparisons between dictionaries: matched atoms, similarity, feature splitting.

Two dictionaries learned on the same activations (with different seeds, sizes
or methods) are compared atom by atom through the cosine similarity of their
atoms. The functions here take fitted estimators (anything with
``components_``, such as :class:`~sparse_dict.SparseAutoencoderDictionary` or
scikit-learn's ``MiniBatchDictionaryLearning``) or arrays of atoms of shape
``(n_atoms, n_features)``; they are pure numpy and scipy, built on the
matchings of :mod:`sparse_dict.metrics`.
"""

import warnings
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_array

from sparse_dict import metrics

# The cosine matrix of two dictionaries, zero atoms at cosine 0: the same
# helper the metrics' matchings use, so that every comparison agrees.
from sparse_dict.metrics import _COSINE_ROUNDING, _cosine_matrix

__all__ = ["FeatureMatching", "dictionary_similarity", "feature_splitting", "match_features"]

_METHODS = ("hungarian", "max")
# Rows of activations coded at a time when measuring co-firing: bounds the
# dense codes held at once (rows x atoms of the larger dictionary).
_BLOCK_ROWS = 4096


class FeatureMatching(NamedTuple):
    """The atom of ``b`` matched to each atom of ``a``, and their cosine.

    Returned by :func:`match_features`; unpacks as ``indices, similarities``.

    Attributes
    ----------
    indices : ndarray of shape (n_atoms_a,), dtype int64
        Row of ``b`` matched to each atom of ``a``; ``-1`` for an atom of
        ``a`` left without a partner by a one-to-one matching (when ``b`` has
        fewer atoms than ``a``).
    similarities : ndarray of shape (n_atoms_a,), dtype float64
        Cosine similarity of each atom of ``a`` with its match; NaN where
        ``indices`` is ``-1``.
    """

    indices: np.ndarray
    similarities: np.ndarray


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _atoms(dictionary, name):
    """The atoms of a fitted estimator or an array, as a 2-D float array."""
    if hasattr(dictionary, "fit") or hasattr(dictionary, "components_"):
        atoms = getattr(dictionary, "components_", None)
        if atoms is None:
            raise NotFittedError(
                f"This {type(dictionary).__name__} instance ({name}) is not fitted yet: "
                "call fit before comparing its dictionary, or pass an array of atoms."
            )
    else:
        atoms = dictionary
    if isinstance(atoms, str) or sp.issparse(atoms):
        raise TypeError(
            f"{name} must be a fitted estimator with components_ or an array of atoms of "
            f"shape (n_atoms, n_features), got {type(atoms).__name__}."
        )
    return check_array(atoms, dtype=(np.float64, np.float32), input_name=name)


def _atom_pair(a, b, names=("a", "b"), stacklevel=3):
    """The two dictionaries' atoms, checked; ``stacklevel``: the public caller's caller."""
    A, B = _atoms(a, names[0]), _atoms(b, names[1])
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"{names[0]} has atoms of width {A.shape[1]} but {names[1]} has atoms of width "
            f"{B.shape[1]}; dictionaries can only be compared when they were learned on "
            "activations of the same width (n_features)."
        )
    for atoms, name in ((A, names[0]), (B, names[1])):
        empty = np.flatnonzero(~np.any(atoms, axis=1))
        if empty.size:
            # They have no direction: matched at cosine 0, they pull the
            # mean similarity down without a word (as logit_effects warns).
            warnings.warn(
                f"{name} has {empty.size} atom(s) of norm 0 (rows {empty[:20].tolist()}): "
                "they point nowhere, and are matched at cosine 0.", UserWarning,
                stacklevel=stacklevel)
    return A, B


def _check_method(method):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}.")


def _check_fraction(value, name, low):
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= 1:
        raise ValueError(f"{name} must be a number in [{low:g}, 1], got {value!r}.")
    return float(value)


# --------------------------------------------------------------------------
# Matching and similarity
# --------------------------------------------------------------------------


def match_features(a, b, method="hungarian"):
    """Match each atom of dictionary ``a`` to an atom of dictionary ``b``.

    Atoms are compared by cosine similarity, with sign: codes are
    non-negative, so an atom and its negative are different features.

    Parameters
    ----------
    a : fitted estimator or array-like of shape (n_atoms_a, n_features)
        The first dictionary: an estimator with ``components_`` (one atom per
        row) or the atoms themselves.
    b : fitted estimator or array-like of shape (n_atoms_b, n_features)
        The second dictionary, with atoms of the same width.
    method : {"hungarian", "max"}, default="hungarian"
        ``"hungarian"``: the one-to-one matching of largest total cosine
        (:func:`scipy.optimize.linear_sum_assignment`), so no atom of ``b``
        stands for two atoms of ``a``; when ``b`` has fewer atoms, the atoms
        of ``a`` left over get no partner. ``"max"``: each atom of ``a`` takes
        its most similar atom of ``b``, which may be shared.

    Returns
    -------
    matching : FeatureMatching
        ``indices`` (row of ``b`` for each atom of ``a``, ``-1`` when
        unmatched) and ``similarities`` (their cosines, NaN when unmatched).

    See Also
    --------
    dictionary_similarity : The mean cosine of the matching.
    sparse_dict.metrics.one_to_one_matches : The same pairing, indexed by pair.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.analysis import match_features
    >>> a = np.array([[1.0, 0.0], [0.9, 0.1]])
    >>> b = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> match_features(a, b, method="max").indices     # both pick b's atom 1
    array([1, 1])
    >>> indices, similarities = match_features(a, b)   # one to one
    >>> indices
    array([1, 0])
    >>> similarities.round(3)
    array([1.  , 0.11])
    """
    return _match_features(a, b, method)


def _match_features(a, b, method):
    """:func:`match_features`, two calls below the public function's caller."""
    A, B = _atom_pair(a, b, stacklevel=4)
    _check_method(method)
    if method == "max":
        # best_matches finds, for each atom of its second argument, the best
        # row of its first.
        indices, similarities = metrics.best_matches(B, A)
        return FeatureMatching(indices.astype(np.int64), similarities.astype(np.float64))
    rows_b, rows_a, pair_similarities = metrics.one_to_one_matches(B, A)
    indices = np.full(A.shape[0], -1, dtype=np.int64)
    similarities = np.full(A.shape[0], np.nan)
    indices[rows_a] = rows_b
    similarities[rows_a] = pair_similarities
    return FeatureMatching(indices, similarities)


def dictionary_similarity(a, b, method="hungarian"):
    """How alike two dictionaries are: the mean cosine of matched atoms.

    Parameters
    ----------
    a : fitted estimator or array-like of shape (n_atoms_a, n_features)
        The first dictionary (an estimator with ``components_``, or atoms).
    b : fitted estimator or array-like of shape (n_atoms_b, n_features)
        The second dictionary, with atoms of the same width.
    method : {"hungarian", "max"}, default="hungarian"
        ``"hungarian"``: mean cosine over the ``min(n_atoms_a, n_atoms_b)``
        pairs of the one-to-one matching of largest total cosine; it is
        symmetric in ``a`` and ``b``. ``"max"``: mean over the atoms of ``a``
        of each one's highest cosine with an atom of ``b`` (the mean max
        cosine similarity of ``a`` against ``b``); it is not symmetric.

    Returns
    -------
    similarity : float
        In [-1, 1]; 1 when every matched atom appears in the other dictionary
        up to positive scale. Random directions in ``n_features`` dimensions
        score near 0 with ``"hungarian"`` (when the dictionaries are much
        smaller than the space) and higher with ``"max"``, which picks the
        best of many.

    See Also
    --------
    match_features : The matching itself.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.analysis import dictionary_similarity
    >>> rng = np.random.default_rng(0)
    >>> atoms = rng.standard_normal((64, 32))
    >>> dictionary_similarity(atoms, 2.0 * atoms[::-1])   # same atoms, reordered
    1.0
    >>> other = rng.standard_normal((64, 32))
    >>> dictionary_similarity(atoms, other) < 0.5
    True
    """
    similarities = _match_features(a, b, method).similarities
    return float(np.mean(similarities[np.isfinite(similarities)]))


# --------------------------------------------------------------------------
# Feature splitting
# --------------------------------------------------------------------------


def _check_can_code(dictionary, name):
    if not callable(getattr(dictionary, "transform", None)):
        raise TypeError(
            f"{name} must be a fitted estimator with transform to measure co-firing on X; "
            f"got {type(dictionary).__name__}, which cannot code activations. Pass "
            "fitted estimators, or leave X out to compare atoms only."
        )


def _check_activations(X, n_features):
    if sp.issparse(X):
        raise TypeError("X must be a dense array of activations, got a sparse matrix.")
    # A DataFrame stays one: transform checks its column names against the
    # fit's (as a bare array, reordered columns were taken silently).
    if not hasattr(X, "shape") or not hasattr(X, "ndim"):
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(
            f"X must be a 2-D array of activations of shape (n_tokens, {n_features}), got "
            f"an array with {X.ndim} dimension(s)."
        )
    if X.shape[1] != n_features:
        raise ValueError(
            f"X has {X.shape[1]} features per row but the dictionaries have atoms of width "
            f"{n_features}; X must hold the activations the dictionaries were learned on."
        )
    if X.shape[0] == 0:
        raise ValueError("X has no rows; co-firing needs at least one token.")
    return X


def _firing(codes):
    """Boolean (n_rows, n_atoms) array: where each atom's code is non-zero."""
    if sp.issparse(codes):
        return (codes != 0).toarray()
    return np.asarray(codes) != 0


def _co_firing_counts(small, large, X):
    """Tokens on which each pair fires together, and each atom's firing count."""
    both = None
    for start in range(0, X.shape[0], _BLOCK_ROWS):
        rows = (X.iloc[start:start + _BLOCK_ROWS] if hasattr(X, "iloc")
                else np.asarray(X[start:start + _BLOCK_ROWS]))
        fire_s, fire_l = _firing(small.transform(rows)), _firing(large.transform(rows))
        # A product of 0/1 float32 matrices counts exactly up to 2**24 rows,
        # far more than one block; the running total is kept in int64.
        block = fire_s.T.astype(np.float32) @ fire_l.astype(np.float32)
        if both is None:
            both = np.zeros(block.shape, dtype=np.int64)
            n_small = np.zeros(fire_s.shape[1], dtype=np.int64)
            n_large = np.zeros(fire_l.shape[1], dtype=np.int64)
        both += np.rint(block).astype(np.int64)
        n_small += fire_s.sum(axis=0)
        n_large += fire_l.sum(axis=0)
    return both, n_small, n_large


_COLUMNS = ("parent", "child", "cosine", "co_firing", "n_children", "parent_frequency",
            "child_frequency")


def feature_splitting(small, large, threshold=0.5, *, X=None, co_firing_threshold=0.5,
                      min_children=2, as_frame=False):
    """The atoms of a smaller dictionary that split into several atoms of a larger one.

    As a dictionary grows, one of its features often splits into several
    narrower ones: the larger dictionary holds atoms close to the small one's
    atom, each firing on part of the tokens where it fired. An atom of
    ``small`` (a *parent*) counts as split when at least ``min_children``
    atoms of ``large`` (its *children*) have cosine similarity
    ``>= threshold`` with it and, when activations ``X`` are given, fire
    mostly where it fires: the co-firing of a child, the share of the
    child's firing tokens on which the parent fires too, is at least
    ``co_firing_threshold``.

    Parameters
    ----------
    small : fitted estimator or array-like of shape (n_atoms_small, n_features)
        The smaller dictionary (an estimator with ``components_``, or atoms).
    large : fitted estimator or array-like of shape (n_atoms_large, n_features)
        The larger dictionary, learned on the same activations.
    threshold : float, default=0.5
        Cosine similarity, in [-1, 1], from which an atom of ``large`` can be
        a child. Random directions in 512 dimensions have cosines of about
        0.04, so 0.5 is far above chance.
    X : array-like of shape (n_tokens, n_features), default=None
        Activations to measure co-firing on, coded by both dictionaries'
        ``transform`` (so ``small`` and ``large`` must then be fitted
        estimators); read a block of rows at a time. ``None`` compares atoms
        only.
    co_firing_threshold : float, default=0.5
        Least co-firing, in [0, 1], of a child with its parent; used only
        with ``X``. A child that never fires on ``X`` is not a child.
    min_children : int, default=2
        Least number of children for a split.
    as_frame : bool, default=False
        Return a :class:`pandas.DataFrame` instead of a dict (needs pandas).

    Returns
    -------
    table : dict of ndarray, or pandas.DataFrame
        One row per (parent, child) pair of every split parent, by parent and
        then by decreasing cosine. Columns: ``parent`` and ``child`` (rows of
        ``small`` and ``large``), ``cosine``, ``co_firing``, ``n_children``
        (of that parent), ``parent_frequency`` and ``child_frequency`` (share
        of the rows of ``X`` on which each fires); these three are measured
        on ``X`` and are NaN without it. The number of split parents
        is ``len(np.unique(table["parent"]))``. A child may belong to more
        than one parent.

    See Also
    --------
    match_features : One-to-one or best matches between two dictionaries.

    Examples
    --------
    Atom 0 of the small dictionary lies between atoms 0 and 1 of the large
    one; atom 1 has a single close match, so it does not split:

    >>> import numpy as np
    >>> from sparse_dict.analysis import feature_splitting
    >>> large = np.eye(4)
    >>> small = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.1]])
    >>> table = feature_splitting(small, large)
    >>> table["parent"], table["child"]
    (array([0, 0]), array([0, 1]))
    >>> table["cosine"].round(3)
    array([0.707, 0.707])
    """
    S, L = _atom_pair(small, large, names=("small", "large"))
    threshold = _check_fraction(threshold, "threshold", -1)
    co_firing_threshold = _check_fraction(co_firing_threshold, "co_firing_threshold", 0)
    if isinstance(min_children, bool) or not isinstance(min_children, Integral) \
            or min_children < 1:
        raise ValueError(f"min_children must be a positive integer, got {min_children!r}.")
    if as_frame:
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("as_frame=True needs pandas; install it or leave "
                              "as_frame=False for a dict of arrays.") from exc

    cosines = _cosine_matrix(S, L)
    # Within rounding of the threshold counts, as recovery_rate has it: an
    # atom equal to the parent has a cosine of 1 - 1e-16 (threshold=1.0 found
    # no child).
    candidate = cosines >= threshold - _COSINE_ROUNDING
    n_rows = None
    if X is not None:
        _check_can_code(small, "small")
        _check_can_code(large, "large")
        X = _check_activations(X, S.shape[1])
        both, n_small, n_large = _co_firing_counts(small, large, X)
        n_rows = X.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            co_firing = both / n_large[None, :]
        # NaN (a child that never fires) fails the comparison: not a child.
        candidate &= co_firing >= co_firing_threshold

    n_children = candidate.sum(axis=1)
    parents, children = np.nonzero(candidate & (n_children >= min_children)[:, None])
    pair_cosines = cosines[parents, children]
    order = np.lexsort((children, -pair_cosines, parents))
    parents, children, pair_cosines = parents[order], children[order], pair_cosines[order]
    table = {
        "parent": parents.astype(np.int64),
        "child": children.astype(np.int64),
        "cosine": pair_cosines,
        "co_firing": np.full(parents.size, np.nan),
        "n_children": n_children[parents].astype(np.int64),
        "parent_frequency": np.full(parents.size, np.nan),
        "child_frequency": np.full(parents.size, np.nan),
    }
    if n_rows is not None:
        table["co_firing"] = co_firing[parents, children]
        table["parent_frequency"] = n_small[parents] / n_rows
        table["child_frequency"] = n_large[children] / n_rows
    if as_frame:
        return pd.DataFrame(table, columns=list(_COLUMNS))
    return table
