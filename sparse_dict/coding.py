"""Classical sparse coding against a fixed dictionary.

:class:`LassoCoder` finds, row by row, the sparse code of the data in a given
dictionary by per-sample optimisation (Lasso, LARS, orthogonal matching
pursuit) or by thresholding. Its main use here is to measure the
*amortisation gap* of a sparse autoencoder: how much better the optimal
sparse code of the autoencoder's own dictionary reconstructs the data, at the
same L0, than the autoencoder's one-matrix-product encoder does
(:func:`amortisation_gap`).
"""

import contextlib
import functools
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from joblib import effective_n_jobs
from scipy.optimize import nnls
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.decomposition import sparse_encode
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils import check_array, gen_even_slices
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import _get_feature_names, check_is_fitted, validate_data

from sparse_dict._warn import recording, warn_at_caller

__all__ = ["LassoCoder", "amortisation_gap"]

_FLOAT_DTYPES = (np.float64, np.float32)
# Atoms whose norms are within this of 1 count as unit atoms (float32 atoms
# normalised in float32 are off by a few 1e-8).
_UNIT_NORM_TOLERANCE = 1e-6


def _nonnegative_omp(X, dictionary, gram, n_nonzero_coefs):
    """Orthogonal matching pursuit with non-negative coefficients.

    Greedily adds the atom most positively correlated with the residual
    (by cosine: the correlation over the atom's norm, so that long atoms do
    not win for their length), then refits the coefficients on the support by non-negative least
    squares; stops early once no atom correlates positively or the
    residual vanishes (so exact fits do not pick up round-off atoms).
    Correlations with the residual come from the Gram matrix,
    ``D x - G[:, support] @ coef``, so each step costs O(n_components * k)
    instead of a product with the whole dictionary.
    """
    # A residual at the rounding of the data's own dtype is an exact fit:
    # float32 rows of an exact mix leave about 1e-7 of their norm, which
    # further atoms would only chase.
    precision = max(1e-12, 16 * float(np.finfo(X.dtype).eps)) ** 2
    D = dictionary.astype(np.float64)
    X = X.astype(np.float64)
    projections = X @ D.T
    # Atoms of norm 0 are never chosen (their correlation is 0, and so never
    # above 0 either).
    norms = np.linalg.norm(D, axis=1)
    inverse_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    codes = np.zeros((X.shape[0], D.shape[0]), dtype=np.float64)
    for i, x in enumerate(X):
        # Each row is solved at a largest value of 1 and its codes scaled
        # back (non-negative least squares is positively homogeneous): squares
        # of rows of 1e155 and above overflow float64.
        size = float(np.max(np.abs(x))) if x.size else 0.0
        if size == 0.0:
            continue
        x = x / size
        negligible = precision * (x @ x)
        support, coef = [], np.zeros(0)
        projection = projections[i] / size
        correlations = projection.copy()
        for _ in range(n_nonzero_coefs):
            correlations[support] = -np.inf
            best = int(np.argmax(correlations * inverse_norms))
            if not correlations[best] > 0:
                break
            support.append(best)
            coef, residual_norm = nnls(D[support].T, x)
            if residual_norm**2 <= negligible:
                break
            correlations = projection - gram[:, support] @ coef
        codes[i, support] = coef * size
    return codes


def _float_dtypes(X):
    """The dtypes ``X`` is validated to: its own float dtype, float32 for float16.

    scikit-learn's conversion would make a float16 array float64, four
    times its size, where float32 holds every value exactly.
    """
    return np.float32 if getattr(X, "dtype", None) == np.float16 else _FLOAT_DTYPES


# The rows coded at once are as many as fill about this many bytes of one
# float64 array of (rows, max(n_components, n_features)).
_BLOCK_BYTES = 1 << 24


def _rows_in_parallel(code, X, n_jobs, *args):
    """``code(rows, *args)`` over ``X``'s rows split between ``n_jobs`` joblib workers, stacked.

    The workers' warnings are brought back and given again in this process:
    scikit-learn's ``sparse_encode``, left to split the rows itself, warned
    in its workers' processes (one line a row on the console, none that the
    caller could catch or :func:`_unconverged_rows_said` count).
    """
    n_jobs = min(effective_n_jobs(n_jobs), X.shape[0])
    if n_jobs <= 1:
        return code(X, *args)
    parts = Parallel(n_jobs=n_jobs)(delayed(_with_warnings)(code, X[rows], *args)
                                    for rows in gen_even_slices(X.shape[0], n_jobs))
    for _, said in parts:
        for message, category in said:
            warnings.warn(message, category)
    return np.vstack([codes for codes, _ in parts])


def _with_warnings(code, X, *args):
    """``code(X, *args)`` in a worker, with the warnings it gave."""
    # Without waiting: in a worker thread, the caller may hold the lock,
    # recording every warning of the process, these included.
    with recording(wait=False) as caught:
        codes = code(X, *args)
    return codes, [(str(w.message), w.category) for w in caught or ()]


@contextlib.contextmanager
def _unconverged_rows_said(max_iter, n_rows):
    """Count coordinate descent's warnings of rows stopped at ``max_iter``, and say them once.

    scikit-learn warns once for each such row (472 warnings for 1,000 rows,
    each pointing into scikit-learn and at a parameter the caller may not
    have): counted, and said in one ConvergenceWarning at the caller's
    line. Other warnings (LARS's among them) pass on as they were.
    """
    with recording() as caught:
        yield
    unconverged = 0
    for w in caught:
        if (issubclass(w.category, ConvergenceWarning)
                and str(w.message).startswith("Objective did not converge")):
            unconverged += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unconverged:
        warn_at_caller(
            f"Coordinate descent stopped at transform_max_iter={max_iter} iterations before "
            f"converging on {unconverged:,} of {n_rows:,} rows: their codes are near the "
            "lasso's optimum, not at it. Raise transform_max_iter (for example tenfold).",
            ConvergenceWarning)


def _row_sizes(X):
    """Each row's size: the power of two nearest its largest absolute entry (1 for a row of 0s).

    A maximum: no overflow for float32 values near their largest.
    """
    largest = np.abs(X).max(axis=1).astype(np.float64) if X.shape[1] else np.zeros(len(X))
    ok = np.isfinite(largest) & (largest > 0)
    exponents = np.zeros(len(X))
    exponents[ok] = np.round(np.log2(largest[ok]))
    return np.ldexp(1.0, exponents.astype(np.int64))


def _unit_atoms(atoms, gram):
    """``atoms`` of unit norm, their Gram matrix, and the codes' scale back; no
    scale where they are already within rounding of unit norm (as SAEs' are).

    A code ``c`` against a unit atom is ``c / norm`` against the atom itself.
    Atoms of norm 0 stay zero (a code of 0 either way).
    """
    norms = np.linalg.norm(atoms.astype(np.float64), axis=1)
    live = norms > 0
    if np.all(np.abs(norms[live] - 1.0) <= _UNIT_NORM_TOLERANCE):
        return atoms, gram, None
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=live)
    unit = (atoms * inverse[:, None].astype(atoms.dtype)).astype(atoms.dtype, copy=False)
    if gram is not None:
        gram = gram * np.outer(inverse, inverse)
    return unit, gram, inverse


def _gram(atoms):
    atoms = atoms.astype(np.float64)
    return atoms @ atoms.T


def _is_fitted(estimator):
    try:
        check_is_fitted(estimator)
    except (NotFittedError, TypeError):
        return False
    return True


def _check_dictionary_names(dictionary, X):
    """Refuse ``X`` whose columns are not those a dictionary estimator was fitted on.

    Its atoms' entries are in the order of those columns: a DataFrame with
    the same columns in another order was coded against the wrong entries
    (an explained variance of -2.7 where the estimator's own transform,
    which checks the names, refuses it).
    """
    if not hasattr(dictionary, "fit") or isinstance(dictionary, np.ndarray):
        return
    fitted = getattr(dictionary, "feature_names_in_", None)
    if fitted is None:
        return
    given = _get_feature_names(X)
    name = type(dictionary).__name__
    if given is None:
        warn_at_caller(
            f"X has no feature names, but the {name} passed as dictionary was fitted with "
            "feature names; X's columns are taken to be in that order", UserWarning)
        return
    if len(given) != len(fitted) or np.any(given != fitted):
        first = next((i for i, (a, b) in enumerate(zip(given, fitted)) if a != b),
                     min(len(given), len(fitted)))
        raise ValueError(
            f"The feature names of X differ from those the {name} passed as dictionary was "
            f"fitted with (column {first}: {_name_at(given, first)} in X, "
            f"{_name_at(fitted, first)} there); its atoms follow that order. Reorder X's "
            "columns to match.")


def _name_at(names, i):
    return repr(str(names[i])) if i < len(names) else "none"


def _get_dictionary(dictionary):
    """The atoms, from an array or from a fitted estimator's components_."""
    if hasattr(dictionary, "fit") and not isinstance(dictionary, np.ndarray):
        try:
            atoms = dictionary.components_
        except AttributeError:
            # scikit-learn's SparseCoder keeps its atoms as a parameter.
            atoms = getattr(dictionary, "dictionary", None)
        if atoms is None and _is_fitted(dictionary):
            raise TypeError(
                f"The {type(dictionary).__name__} passed as dictionary is fitted but holds no "
                "dictionary (no components_ of atoms): pass a fitted dictionary learner (its "
                "last step, for a Pipeline: pipeline[-1]) or the atoms themselves."
            )
        if atoms is None or hasattr(atoms, "fit"):
            raise NotFittedError(
                f"The {type(dictionary).__name__} passed as dictionary has no "
                "components_: fit it first. clone() (used by GridSearchCV, "
                "cross_validate, Pipeline) returns it unfitted; pass "
                "dictionary=estimator.components_ or wrap it in "
                "sklearn.frozen.FrozenEstimator to keep it fitted."
            ) from None
    else:
        atoms = dictionary
    if sp.issparse(atoms):
        raise TypeError("dictionary must be a dense array, got a sparse matrix.")
    if atoms is None or np.ndim(atoms) != 2:
        # check_array's own words named neither (None: "got scalar array
        # instead: array=nan").
        raise ValueError(
            "dictionary must be the atoms, an array of shape (n_components, n_features), "
            f"or a fitted dictionary learner; got {atoms!r:.80}."
        )
    return check_array(
        atoms,
        dtype=_FLOAT_DTYPES,
        input_name="dictionary",
    )


class LassoCoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse coding of data against a fixed dictionary.

    Each row ``x`` gets the code ``c`` (one coefficient per atom) solving

    * ``algorithm="lasso_cd"`` or ``"lasso_lars"``: the Lasso problem
      ``min_c 0.5 * ||x - c @ D||^2 + alpha * ||c||_1``, by coordinate
      descent or by least angle regression (LARS is faster when codes are
      very sparse; with ``positive=True`` scikit-learn's LARS may stop a
      little short of the optimum, about 1e-3 of the objective on some
      rows, where coordinate descent reaches it);
    * ``algorithm="omp"``: orthogonal matching pursuit, the best
      least-squares fit using at most ``n_nonzero_coefs`` atoms (found
      greedily);
    * ``algorithm="threshold"``: soft thresholding of the projections,
      ``sign(D x) * max(|D x| - alpha, 0)``, which with ``positive=True`` is
      ``ReLU(D x - alpha)``, a tied-weight autoencoder's encoder.

    With ``positive=True`` (the default, matching the ReLU codes of a sparse
    autoencoder) every code is constrained to be non-negative. Lasso, LARS
    and thresholding use :func:`sklearn.decomposition.sparse_encode`, with
    the dictionary's Gram matrix computed once in :meth:`fit`; non-negative
    OMP refits each support by non-negative least squares.

    Parameters
    ----------
    dictionary : array-like of shape (n_components, n_features) or estimator
        The atoms, one per row, or a fitted estimator with a ``components_``
        attribute of that shape (e.g. a
        :class:`~sparse_dict.SparseAutoencoderDictionary` or scikit-learn's
        ``MiniBatchDictionaryLearning``), read at :meth:`fit` time. The atoms
        are used as given, not normalised; Lasso's ``alpha`` and
        thresholding assume they have about unit norm. OMP chooses atoms by
        their cosine with the residual, whatever their norms (the codes are
        against the atoms as given). ``clone`` (used by
        ``GridSearchCV`` and friends) unfits an estimator passed here: pass
        ``components_`` or wrap the estimator in
        :class:`~sklearn.frozen.FrozenEstimator` in that case.
    algorithm : {"lasso_cd", "lasso_lars", "omp", "threshold"}, \
default="lasso_cd"
        How codes are computed (see above).
    alpha : float, default=1.0
        L1 penalty for ``"lasso_cd"`` and ``"lasso_lars"``; threshold for
        ``"threshold"``. Ignored by ``"omp"``.
    n_nonzero_coefs : int, default=None
        Maximum number of active atoms per row for ``"omp"``; None means
        ``max(1, n_features // 10)``. Capped at ``n_components`` (where
        scikit-learn's OMP raises, every atom may be used). Ignored by the
        other algorithms.
    offset : array-like of shape (n_features,), default=None
        Vector subtracted from each row before coding and added back by
        :meth:`inverse_transform`, for dictionaries that come with a bias
        (a sparse autoencoder's decoder bias). None means no offset.
    positive : bool, default=True
        Whether to constrain codes to be non-negative.
    transform_max_iter : int, default=1000
        Maximum number of iterations for ``"lasso_cd"`` and
        ``"lasso_lars"``.
    n_jobs : int, default=None
        Number of joblib workers the rows are split over in
        :meth:`transform`. None means 1 unless in a
        :obj:`joblib.parallel_backend` context; -1 means all processors.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary atoms used, as given.
    offset_ : ndarray of shape (n_features,)
        The offset used (zeros when ``offset=None``).
    n_components_ : int
        Number of atoms.
    n_features_in_ : int
        Number of features seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.decomposition.SparseCoder : The same without the non-negative
        OMP, the offset, or taking atoms from a fitted estimator.
    sparse_dict.coding.amortisation_gap : Compare an autoencoder's encoder with optimal codes.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict import LassoCoder
    >>> from sparse_dict.datasets import make_superposition
    >>> X, true_atoms, true_codes = make_superposition(
    ...     n_samples=200, n_features=32, n_components=48, n_active=2,
    ...     magnitude_range=(0.5, 1.0), random_state=0)
    >>> coder = LassoCoder(true_atoms, alpha=0.05)
    >>> codes = coder.fit_transform(X)
    >>> codes.shape
    (200, 48)
    >>> bool(np.mean((codes > 1e-3) == (true_codes > 0)) > 0.99)
    True
    >>> X_hat = coder.inverse_transform(codes)
    """

    _parameter_constraints: dict = {
        "dictionary": "no_validation",
        "algorithm": [StrOptions({"lasso_cd", "lasso_lars", "omp", "threshold"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "offset": ["array-like", None],
        "positive": ["boolean"],
        "transform_max_iter": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        dictionary,
        *,
        algorithm="lasso_cd",
        alpha=1.0,
        n_nonzero_coefs=None,
        offset=None,
        positive=True,
        transform_max_iter=1000,
        n_jobs=None,
    ):
        self.dictionary = dictionary
        self.algorithm = algorithm
        self.alpha = alpha
        self.n_nonzero_coefs = n_nonzero_coefs
        self.offset = offset
        self.positive = positive
        self.transform_max_iter = transform_max_iter
        self.n_jobs = n_jobs

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Take the dictionary and check that it fits the data.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data; only its width (and feature names) are used.
        y : None
            Ignored.

        Returns
        -------
        self : LassoCoder
            The fitted coder.
        """
        atoms = _get_dictionary(self.dictionary)
        # Every check before validate_data sets n_features_in_ and the
        # feature names: a refit that fails leaves a fitted coder as it was.
        checked = check_array(X, dtype=_float_dtypes(X), estimator=self, input_name="X")
        if atoms.shape[1] != checked.shape[1]:
            raise ValueError(
                f"X has {checked.shape[1]} features, but the dictionary has atoms of "
                f"width {atoms.shape[1]}; they must be equal."
            )
        if self.offset is None:
            offset = np.zeros(atoms.shape[1], dtype=atoms.dtype)
        else:
            offset = check_array(
                self.offset, ensure_2d=False, dtype=_FLOAT_DTYPES, input_name="offset"
            )
            if offset.shape != (atoms.shape[1],):
                raise ValueError(
                    f"offset must have shape ({atoms.shape[1]},), the width of the "
                    f"dictionary, got shape {offset.shape}."
                )
        _check_dictionary_names(self.dictionary, X)
        validate_data(self, X, skip_check_array=True)
        self.components_ = atoms
        self.offset_ = offset
        self.n_components_ = atoms.shape[0]
        # Thresholding never needs the Gram matrix, which for large
        # dictionaries is far bigger than the dictionary itself.
        self._gram = None if self.algorithm == "threshold" else _gram(atoms)
        return self

    def transform(self, X):
        """Code each row of ``X`` against the dictionary.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Data to code; sparse rows are made dense a block at a time.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            Sparse codes, in the dtype of ``X`` (float32 stays float32;
            float16 gives float32).
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=_float_dtypes(X), reset=False, order="C",
                          accept_sparse="csr")
        with _unconverged_rows_said(self.transform_max_iter, X.shape[0]):
            return self._code(X)

    def _code(self, X):
        """The codes of validated rows, a block at a time; unconverged rows not yet said."""
        n_nonzero = self.n_nonzero_coefs
        if n_nonzero is None:
            n_nonzero = max(1, X.shape[1] // 10)
        n_nonzero = min(n_nonzero, self.n_components_)
        dictionary = self._dictionary(X.dtype)
        # A block of rows at a time (sparse rows densified a block at a
        # time): the solvers hold several float64 arrays of (rows,
        # n_components) (100,000 rows of 1,024 atoms peaked at 5.6 times the
        # codes' memory when coded at once).
        rows = max(1, _BLOCK_BYTES // (8 * max(self.n_components_, X.shape[1])))
        if X.shape[0] <= rows:
            # One block: its codes as they come (copying them into a C-ordered
            # array doubled thresholding's time).
            return self._code_block(X, dictionary, n_nonzero)
        codes = np.empty((X.shape[0], self.n_components_), dtype=X.dtype)
        for start in range(0, X.shape[0], rows):
            block = X[start:start + rows]
            codes[start:start + block.shape[0]] = self._code_block(block, dictionary, n_nonzero)
        return codes

    def _dictionary(self, dtype):
        """The atoms, their Gram matrix and the codes' scale back, as the solver takes them.

        Made once for all the blocks of a transform: for OMP a Gram matrix
        of unit atoms (2 GB for 16,384 atoms) would otherwise be made again
        for each block.
        """
        gram = self._gram
        if gram is None and self.algorithm != "threshold":
            gram = _gram(self.components_)
        if self.algorithm == "omp" and self.positive:
            return self.components_.astype(dtype, copy=False), gram, None
        # sparse_encode fixes coordinate descent's tol at 1e-8, below float32
        # resolution: it solves in float64, and the codes return in X's dtype.
        work = np.float64 if self.algorithm == "lasso_cd" else dtype
        atoms, scale = self.components_.astype(work, copy=False), None
        if self.algorithm == "omp":
            # scikit-learn's OMP picks atoms by their raw correlation: atoms
            # of norms from 0.2 to 5 explained 0.73 of the rows where the
            # same directions of unit norm explained 0.93. It codes against
            # unit atoms here, the codes scaled back.
            atoms, gram, scale = _unit_atoms(atoms, gram)
        return atoms, (None if gram is None else gram.astype(work, copy=False)), scale

    def _code_block(self, X, dictionary, n_nonzero):
        """The codes of the rows ``X`` (as validated by :meth:`transform`)."""
        atoms, gram, scale = dictionary
        X = X.toarray() if sp.issparse(X) else X
        dtype = X.dtype
        X = X - self.offset_.astype(dtype, copy=False)
        if self.algorithm == "omp" and self.positive:
            codes = _rows_in_parallel(_nonnegative_omp, X, self.n_jobs, atoms, gram, n_nonzero)
        else:
            X = X.astype(atoms.dtype, copy=False)
            # scikit-learn's LARS and OMP stop on absolute tolerances (LARS
            # at alpha_min plus float32's eps, OMP at a squared correlation
            # of float64's eps): rows of typical entries 1e-5 lost most of
            # their codes, silently. The lasso is homogeneous, c(tx, t alpha)
            # = t c(x, alpha), so each row is solved at unit size: rows are
            # grouped by the power of two nearest their largest entry, which
            # divides exactly, so a row's codes do not depend on the rows
            # coded beside it.
            # (Thresholding has no tolerance, and coordinate descent's is
            # relative to each row: they take the rows as they are.)
            sizes = (_row_sizes(X) if self.algorithm in ("lasso_lars", "omp")
                     else np.ones(len(X)))
            groups = np.unique(sizes)
            codes = None if len(groups) == 1 else np.empty((len(X), len(atoms)), X.dtype)
            for size in groups.tolist():  # Python floats: a numpy float64 alpha made
                # thresholding's float32 arithmetic float64, and twice as slow
                rows = np.flatnonzero(sizes == size) if codes is not None else slice(None)
                encode = functools.partial(
                    sparse_encode, gram=gram, algorithm=self.algorithm,
                    n_nonzero_coefs=n_nonzero, alpha=self.alpha / size,
                    max_iter=self.transform_max_iter, n_jobs=None, check_input=False,
                    positive=self.positive)
                group = _rows_in_parallel(
                    encode, X[rows] / np.asarray(size, dtype=X.dtype) if size != 1 else X[rows],
                    self.n_jobs, atoms)
                if size != 1:
                    group *= np.asarray(size, dtype=group.dtype)
                if codes is None:
                    codes = group
                else:
                    codes[rows] = group
            if self.positive:
                # LARS can leave round-off negatives (~1e-17) on a
                # degenerate path; a non-negative code must be exactly that.
                np.maximum(codes, 0, out=codes)
            if scale is not None:
                codes = codes * scale.astype(codes.dtype)
        return codes.astype(dtype, copy=False)

    def inverse_transform(self, X):
        """Reconstruct data from codes: ``X @ components_ + offset_``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_components)
            Codes, e.g. from :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
            Reconstruction, in the dtype of the codes (float32 for float16
            codes, float64 for integer ones).
        """
        check_is_fitted(self)
        codes = check_array(
            X, accept_sparse=["csr", "csc"], dtype=_float_dtypes(X), input_name="X"
        )
        if codes.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {codes.shape[1]} components per row, but this "
                f"{type(self).__name__} has {self.n_components_} atoms; "
                "inverse_transform expects codes of shape (n_samples, "
                f"{self.n_components_})."
            )
        atoms = self.components_.astype(codes.dtype, copy=False)
        X_hat = np.asarray(codes @ atoms)
        return X_hat + self.offset_.astype(codes.dtype, copy=False)

    @property
    def _n_features_out(self):
        return self.n_components_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def amortisation_gap(estimator, X, *, offset="auto", n_jobs=None):
    """Explained variance of an encoder's codes vs optimal codes at equal L0.

    Codes ``X`` with the estimator's own ``transform`` (for a
    :class:`~sparse_dict.SparseAutoencoderDictionary`, its
    ``transform_algorithm``: the encoder by default; with a solver there the
    gap compares two solvers), takes its mean L0 ``k``
    (rounded, at least 1), then codes ``X`` again against the same
    dictionary (``estimator.components_``) with orthogonal matching
    pursuit limited to ``k`` atoms per row: non-negative when the encoder's
    codes are (a sparse autoencoder's), signed when some are negative (as
    scikit-learn's dictionary learning codes by default) or are signed codes
    split in two halves (``split_sign=True``), so that both
    codings draw on the same set of codes. The difference in explained
    variance is the amortisation gap: what the encoder loses against
    per-sample optimisation.

    Parameters
    ----------
    estimator : fitted estimator
        Has ``components_``, ``transform`` and ``inverse_transform``.
    X : array-like of shape (n_samples, n_features)
        Data to code.
    offset : "auto", array-like of shape (n_features,) or None, default="auto"
        The dictionary's bias, passed to :class:`LassoCoder`. ``"auto"``
        takes the estimator's ``decoder_bias_`` (a
        :class:`~sparse_dict.SparseAutoencoderDictionary` has one), for a
        :class:`LassoCoder` its ``offset_``, for scikit-learn's estimators
        that centre the data before coding it
        (:class:`~sklearn.decomposition.SparsePCA`,
        :class:`~sklearn.decomposition.MiniBatchSparsePCA`) their ``mean_``,
        and no offset otherwise.
    n_jobs : int, default=None
        Number of joblib workers for the optimal coding.

    Returns
    -------
    result : dict
        ``"encoder"``: explained variance of the estimator's reconstruction;
        ``"optimal"``: that of the OMP codes; ``"gap"``: optimal minus
        encoder; ``"l0"``: the L0 budget used; ``"positive"``: whether the
        OMP codes were kept non-negative.

    Examples
    --------
    >>> from sklearn.decomposition import MiniBatchDictionaryLearning
    >>> from sparse_dict.coding import amortisation_gap
    >>> from sparse_dict.datasets import make_superposition
    >>> X, _, _ = make_superposition(n_samples=300, n_features=16,
    ...                              n_components=32, random_state=0)
    >>> est = MiniBatchDictionaryLearning(
    ...     n_components=32, transform_algorithm="threshold",
    ...     transform_alpha=0.3, random_state=0).fit(X)
    >>> result = amortisation_gap(est, X)
    >>> sorted(result)
    ['encoder', 'gap', 'l0', 'optimal', 'positive']
    >>> bool(result["gap"] > 0)
    True
    """
    from sparse_dict.metrics import explained_variance, l0

    given = X
    X = check_array(X, dtype=_FLOAT_DTYPES, input_name="X")
    if isinstance(offset, str) and offset == "auto":
        # The encoder side codes X against the estimator's own bias: the
        # optimal codes must be of the same X - bias (a LassoCoder's offset
        # left out gave an "optimal" EV of -0.97 against the encoder's 0.59).
        # scikit-learn's SparsePCA and MiniBatchSparsePCA code X - mean_ and
        # add mean_ back: without it, their "optimal" EV was -34.8 (0.78 with).
        offset = next((getattr(estimator, name) for name in ("decoder_bias_", "offset_", "mean_")
                       if getattr(estimator, name, None) is not None), None)
    # X as given: an estimator fitted on a DataFrame checks its column names
    # (and warns at an array without them).
    codes = estimator.transform(given)
    if hasattr(codes, "to_numpy"):  # set_output(transform="pandas")
        codes = codes.to_numpy()
    budget = max(1, int(round(l0(codes))))
    encoder = explained_variance(X, np.asarray(estimator.inverse_transform(codes)))
    # Non-negative OMP against signed codes would be a smaller search than
    # the encoder's, and could come out worse than it. split_sign=True
    # writes signed codes as two non-negative halves: they are signed too
    # (read as non-negative, the gap of the same atoms went from +0.02 to
    # -0.11).
    positive = not (_has_negative(codes) or getattr(estimator, "split_sign", False))
    coder = LassoCoder(
        estimator, algorithm="omp", n_nonzero_coefs=budget, offset=offset,
        positive=positive, n_jobs=n_jobs,
    ).fit(given)  # as given, for the same check of column names as the estimator's
    optimal = explained_variance(X, np.asarray(coder.inverse_transform(coder.transform(given))))
    return {"encoder": encoder, "optimal": optimal, "gap": optimal - encoder,
            "l0": budget, "positive": positive}


def _has_negative(codes):
    values = codes.data if sp.issparse(codes) else np.asarray(codes)
    return bool(np.any(values < 0))
