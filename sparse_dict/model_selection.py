"""Model selection of sparse dictionaries with scikit-learn's GridSearchCV.

:data:`~sparse_dict.model_selection.sparse_coding_scorer` is a multimetric ``scoring=`` and
:func:`best_under_l0` a ``refit=``. Held-out reconstruction alone always
prefers the weakest sparsity penalty, so the refit helper picks the best
reconstruction among candidates whose L0 stays within a budget.
"""

import warnings
from numbers import Real

import numpy as np
import scipy.sparse as sp
from sklearn.utils.validation import check_memory

from sparse_dict.metrics import (
    dead_fraction,
    dense_fraction,
    explained_variance,
    fraction_variance_unexplained,
    l0,
    l1,
    mse,
)

__all__ = [
    "SparseCodingScorer",
    "BestUnderL0",
    "best_under_l0",
    "explained_variance_scorer",
    "sparse_coding_scorer",
]


def _unwrapped(estimator):
    """The fitted estimator inside a fitted search or a FrozenEstimator, else itself.

    A search (nested cross-validation scores one) and a frozen model have
    transform but no inverse_transform of their own, or reconstruct ``X``
    itself where the dictionary reconstructs its Pipeline step's input.
    """
    from sklearn.frozen import FrozenEstimator

    while True:
        if hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        elif isinstance(estimator, FrozenEstimator):
            estimator = estimator.estimator
        else:
            return estimator


class _NotADictionary(TypeError):
    """What no search's candidate can be scored as: the caller's mistake."""


def _prefix_transform(prefix, X):
    """``prefix.transform(X)``: a module-level function, for joblib's cache."""
    return prefix.transform(X)


def _reconstruct(estimator, X):
    """Input to the dictionary, its codes and its reconstruction.

    For a Pipeline, the dictionary is the last step and its input is what
    the earlier steps make of ``X``; a fitted search or a FrozenEstimator is
    scored by the estimator it holds.
    """
    from sklearn.pipeline import Pipeline

    estimator = _unwrapped(estimator)
    if isinstance(estimator, Pipeline):
        dictionary = estimator.steps[-1][1]
        if len(estimator.steps) > 1:
            prefix = estimator[:-1]
            if estimator.memory is None:
                X = prefix.transform(X)
            else:
                # The Pipeline's cache keeps the training folds' activations;
                # the scored rows are kept beside them, so that each grid
                # point's fitted extractor (the same one on a fold) runs the
                # held-out texts once per fold, not once per grid point.
                X = check_memory(estimator.memory).cache(_prefix_transform)(prefix, X)
    else:
        dictionary = estimator
    if not (
        hasattr(dictionary, "transform") and hasattr(dictionary, "inverse_transform")
    ):
        raise _NotADictionary(
            "Scoring a sparse dictionary needs an estimator, or a Pipeline whose "
            "last step is one, with transform and inverse_transform methods; got "
            f"{type(dictionary).__name__}."
        )
    codes = dictionary.transform(X)
    X_hat = dictionary.inverse_transform(codes)
    codes = codes if sp.issparse(codes) else np.asarray(codes)
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return X, codes, np.asarray(X_hat)


def _finite(codes):
    return bool(np.isfinite(codes.data if sp.issparse(codes) else codes).all())


_SCORER_METRICS = {
    "explained_variance": lambda X, codes, X_hat: explained_variance(X, X_hat),
    "fraction_variance_unexplained": (
        lambda X, codes, X_hat: fraction_variance_unexplained(X, X_hat)
    ),
    "mse": lambda X, codes, X_hat: mse(X, X_hat),
    "l0": lambda X, codes, X_hat: l0(codes),
    "l1": lambda X, codes, X_hat: l1(codes),
    "dead_fraction": lambda X, codes, X_hat: dead_fraction(codes),
    "dense_fraction": lambda X, codes, X_hat: dense_fraction(codes),
}
# Every metric but explained variance is better when lower.
_LOWER_IS_BETTER = frozenset(_SCORER_METRICS) - {"explained_variance"}


class SparseCodingScorer:
    """Multimetric scorer of a sparse dictionary, for ``GridSearchCV(scoring=)``.

    Called as ``scorer(estimator, X)``, it codes ``X``, reconstructs it and
    returns a dict of metrics, which ``GridSearchCV`` records as
    ``mean_test_<name>`` in ``cv_results_``. The estimator may be a bare
    dictionary (any object with ``transform`` and ``inverse_transform``) or a
    :class:`~sklearn.pipeline.Pipeline` whose last step is one; then the
    reconstruction of that step's input (``X`` run through the earlier steps)
    is measured. Metrics are reported as they are: ``l0``, ``l1``, ``mse``,
    ``fraction_variance_unexplained``, ``dead_fraction`` and
    ``dense_fraction`` are better when lower, so do not name them as
    ``refit=``; use :func:`best_under_l0`.

    Parameters
    ----------
    metrics : tuple of str, default=("explained_variance", "l0", "dead_fraction")
        Which metrics to compute, from ``"explained_variance"``,
        ``"fraction_variance_unexplained"``, ``"mse"``, ``"l0"``, ``"l1"``,
        ``"dead_fraction"`` and ``"dense_fraction"``. Codes count as active
        when non-zero. ``dead_fraction`` is measured on the scored rows only,
        so it grows when they are few.

    See Also
    --------
    sparse_coding_scorer : The instance with the default metrics.
    best_under_l0 : The refit helper that reads this scorer's results.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sparse_dict.model_selection import SparseCodingScorer
    >>> X = np.random.RandomState(0).normal(size=(50, 4))
    >>> scorer = SparseCodingScorer(metrics=("explained_variance", "l0"))
    >>> scores = scorer(PCA(n_components=4).fit(X), X)
    >>> round(scores["explained_variance"], 6), scores["l0"]
    (1.0, 4.0)
    """

    def __init__(self, metrics=("explained_variance", "l0", "dead_fraction")):
        if isinstance(metrics, str):
            metrics = (metrics,)
        try:
            metrics = tuple(metrics)
        except TypeError:
            raise ValueError(
                f"metrics must be a non-empty selection of {sorted(_SCORER_METRICS)}, "
                f"got {metrics!r}.") from None
        # Names only (a list inside was a TypeError of hashing), each once:
        # a repeat would be one column of cv_results_ named twice.
        unknown = [name for name in metrics
                   if not isinstance(name, str) or name not in _SCORER_METRICS]
        if unknown or not metrics or len(set(metrics)) < len(metrics):
            raise ValueError(
                f"metrics must be a non-empty selection of {sorted(_SCORER_METRICS)}, "
                f"each named once, got {list(metrics)!r}."
            )
        self.metrics = metrics

    def __call__(self, estimator, X, y=None):
        """Score a fitted dictionary (or Pipeline ending in one) on ``X``.

        Parameters
        ----------
        estimator : estimator or Pipeline
            Has ``transform`` and ``inverse_transform``, or is a Pipeline
            whose last step has them.
        X : array-like of shape (n_samples, n_features)
            Data to score on.
        y : None
            Ignored.

        Returns
        -------
        scores : dict of str to float
            One entry per name in ``metrics``; NaN for each, with a warning
            that says why, where ``estimator`` cannot code or reconstruct
            ``X`` (a step without ``inverse_transform`` included).
        """
        try:
            X_in, codes, X_hat = _reconstruct(estimator, X)
        except _NotADictionary as exc:
            # Raised, scikit-learn's error_score put one NaN where the other
            # candidates' splits had dicts: a grid of a PCA and a KMeans
            # died with "'float' object is not subscriptable", and one of
            # KMeans alone was told to use the scorer it was using.
            warnings.warn(f"{exc} Every metric is scored NaN.", UserWarning, stacklevel=2)
            return dict.fromkeys(self.metrics, float("nan"))
        except Exception as exc:  # noqa: BLE001 - scored NaN, named in the warning
            # As below: raised here, scikit-learn's error_score put one NaN
            # where the other splits have dicts, and the search died with
            # "'float' object is not subscriptable" (a transform asking
            # scikit-learn's OMP for more atoms than the dictionary has, say).
            warnings.warn(f"{type(estimator).__name__} could not code or reconstruct X here "
                          f"({type(exc).__name__}: {exc}): every metric is scored NaN.",
                          UserWarning, stacklevel=2)
            return dict.fromkeys(self.metrics, float("nan"))
        if not (np.isfinite(X_hat).all() and _finite(codes)):
            # Scored NaN, which best_under_l0 passes over, like a failed fit:
            # raised here, it broke the whole search even with
            # error_score=np.nan (scikit-learn puts one NaN where the other
            # splits have dicts).
            warnings.warn(f"{type(estimator).__name__} gives NaN or infinite codes or "
                          "reconstructions here: every metric is scored NaN.",
                          UserWarning, stacklevel=2)
            return dict.fromkeys(self.metrics, float("nan"))
        return {
            name: _SCORER_METRICS[name](X_in, codes, X_hat) for name in self.metrics
        }

    def __repr__(self):
        return f"SparseCodingScorer(metrics={self.metrics!r})"


sparse_coding_scorer = SparseCodingScorer()
"""Scorer giving ``explained_variance``, ``l0`` and ``dead_fraction``.

Pass it as ``GridSearchCV(..., scoring=sparse_coding_scorer,
refit=best_under_l0(max_l0=...))``. See :class:`SparseCodingScorer`.
"""


def explained_variance_scorer(estimator, X, y=None):
    """Single-metric scorer: explained variance of the dictionary's input.

    For ``GridSearchCV(scoring=explained_variance_scorer)`` or
    ``cross_val_score``. Handles bare estimators and Pipelines as
    :class:`SparseCodingScorer` does.

    Parameters
    ----------
    estimator : estimator or Pipeline
        A fitted dictionary with ``transform`` and ``inverse_transform``, or
        a Pipeline ending in one.
    X : array-like of shape (n_samples, n_features)
        Data to score on.
    y : None
        Ignored.

    Returns
    -------
    score : float
        :func:`~sparse_dict.metrics.explained_variance` of the dictionary's input and its
        reconstruction.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sparse_dict.model_selection import explained_variance_scorer
    >>> X = np.random.RandomState(0).normal(size=(50, 4))
    >>> round(explained_variance_scorer(PCA(n_components=4).fit(X), X), 6)
    1.0
    """
    X_in, _, X_hat = _reconstruct(estimator, X)
    return explained_variance(X_in, X_hat)


class BestUnderL0:
    """Refit rule: best explained variance among candidates within an L0 budget.

    Built by :func:`best_under_l0`; see there.

    Parameters
    ----------
    max_l0 : float
        Largest admissible mean L0 (mean active features per row).
    score : str, default="explained_variance"
        Name of the metric to optimise in ``cv_results_``: maximised, or
        minimised for the metrics that are better lower (``mse``,
        ``fraction_variance_unexplained``, ``l1``, ``dead_fraction``,
        ``dense_fraction``, ``l0``).
    l0 : str, default="l0"
        Name of the L0 metric in ``cv_results_``.
    """

    def __init__(self, max_l0, *, score="explained_variance", l0="l0"):
        if (
            not isinstance(max_l0, Real)
            or isinstance(max_l0, bool)
            or not max_l0 >= 0
            or not np.isfinite(max_l0)
        ):
            raise ValueError(
                f"max_l0 must be a finite non-negative number, got {max_l0!r}."
            )
        self.max_l0 = max_l0
        self.score = score
        self.l0 = l0

    def _column(self, cv_results, name):
        key = f"mean_test_{name}"
        if key not in cv_results:
            found = sorted(
                k[len("mean_test_") :] for k in cv_results if k.startswith("mean_test_")
            )
            raise ValueError(
                f"cv_results_ has no {key!r}: the search must be scored with a "
                f"metric named {name!r} (e.g. scoring=sparse_coding_scorer); "
                f"the metrics found were {found}."
            )
        return np.asarray(cv_results[key], dtype=np.float64)

    def __call__(self, cv_results):
        """Index of the chosen candidate in ``cv_results``.

        Parameters
        ----------
        cv_results : dict
            A search's ``cv_results_``.

        Returns
        -------
        index : int
            The candidate with the best mean score among those with mean L0
            at most ``max_l0``; candidates whose score is NaN (failed fits)
            are never chosen. Leave the search's ``error_score`` at NaN, its
            default: a number there is recorded as the failed fit's score and
            its L0 alike (``error_score=0`` reads as an L0 of 0, under any
            limit), and scikit-learn keeps no other mark of the failure.
        """
        scores = self._column(cv_results, self.score)
        if self.score in _LOWER_IS_BETTER:
            # The best mse is the smallest: maximised, the worst was chosen.
            scores = -scores
        l0s = self._column(cv_results, self.l0)
        # NaN is a failed fit or scoring; -inf explained variance is a real
        # (worst) score, which explained_variance gives.
        admissible = (l0s <= self.max_l0) & ~np.isnan(scores)
        if not admissible.any():
            if not np.isfinite(l0s).any():
                raise ValueError(
                    "No candidate could be scored: every mean L0 is NaN, so all "
                    "fits or scorings failed (the scorings' warnings say why; "
                    "error_score='raise' raises a failed fit's error)."
                )
            within = l0s <= self.max_l0
            if within.any():
                # Within the budget, but unscored: the scores failed, not L0.
                first = int(np.flatnonzero(within)[0])
                raise ValueError(
                    f"The {int(within.sum())} candidate(s) with a mean L0 within "
                    f"max_l0={self.max_l0} have no mean {self.score} (NaN; the first "
                    f"has params {cv_results['params'][first]}): their "
                    "fits or scorings failed (the scorings' warnings say why; "
                    "error_score='raise' raises a failed fit's error)."
                )
            smallest = int(np.nanargmin(l0s))
            raise ValueError(
                f"No candidate has a mean L0 within max_l0={self.max_l0}; the "
                f"smallest mean L0 seen was {l0s[smallest]:.4g}, with params "
                f"{cv_results['params'][smallest]}. Raise max_l0 or add "
                "candidates with a stronger sparsity penalty."
            )
        candidates = np.flatnonzero(admissible)
        return int(candidates[np.argmax(scores[candidates])])

    def __repr__(self):
        # The metric names only where they are not the defaults, as
        # scikit-learn prints estimators.
        extra = "".join(f", {name}={value!r}" for name, value, default in (
            ("score", self.score, "explained_variance"), ("l0", self.l0, "l0"))
            if value != default)
        return f"best_under_l0(max_l0={self.max_l0!r}{extra})"


def best_under_l0(max_l0, *, score="explained_variance", l0="l0"):
    """Refit helper for ``GridSearchCV``: best reconstruction within an L0 budget.

    Held-out reconstruction alone always prefers the weakest sparsity
    penalty. This rule instead picks, among the candidates whose mean test L0
    is at most ``max_l0``, the one with the highest mean test explained
    variance. Use it with :data:`~sparse_dict.model_selection.sparse_coding_scorer` (or any multimetric
    scoring that has the two names).

    Parameters
    ----------
    max_l0 : float
        Largest admissible mean L0 (mean active features per row).
    score : str, default="explained_variance"
        Name of the metric to optimise; read from
        ``cv_results_["mean_test_<score>"]``. Maximised, except the metrics
        of :class:`SparseCodingScorer` that are better lower (``mse``,
        ``fraction_variance_unexplained``, ``l1``, ``dead_fraction``,
        ``dense_fraction``, ``l0``), which are minimised.
    l0 : str, default="l0"
        Name of the L0 metric; read from ``cv_results_["mean_test_<l0>"]``.

    Returns
    -------
    refit : callable
        ``refit(cv_results) -> int``, the index of the chosen candidate. It
        raises ValueError naming the smallest mean L0 seen when no candidate
        is within the budget.

    Examples
    --------
    >>> from sparse_dict.model_selection import best_under_l0
    >>> cv_results = {
    ...     "params": [{"l1_coef": 0.1}, {"l1_coef": 1.0}, {"l1_coef": 10.0}],
    ...     "mean_test_explained_variance": [0.99, 0.9, 0.6],
    ...     "mean_test_l0": [40.0, 12.0, 3.0],
    ... }
    >>> best_under_l0(max_l0=20)(cv_results)
    1
    >>> best_under_l0(max_l0=2)(cv_results)
    Traceback (most recent call last):
    ...
    ValueError: No candidate has a mean L0 within max_l0=2; the smallest mean L0 \
seen was 3, with params {'l1_coef': 10.0}. Raise max_l0 or add candidates with a \
stronger sparsity penalty.
    """
    return BestUnderL0(max_l0, score=score, l0=l0)
