"""SparseAutoencoderDictionary: a sparse autoencoder as a scikit-learn transformer.

This module is the scikit-learn shell: it validates parameters and data,
calls the torch core in :mod:`sparse_dict._torch`, and stores fitted
attributes. It holds no training logic of its own.
"""

import contextlib
import json
import math
import shutil
import tempfile
import warnings
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from sparse_dict._torch import (
    ACTIVATIONS,
    DivergenceError,
    TrainConfig,
    Trainer,
    assess_training,
    decode_array,
    encode_array,
    fitted_tensor_names,
    make_activation,
    resolve_device,
)
from sparse_dict._torch.model import STAT_NAMES

__all__ = ["DivergenceError", "SparseAutoencoderDictionary"]

# partial_fit cannot know the run's length: it warms up over this many steps.
_PARTIAL_FIT_WARMUP_STEPS = 100
# partial_fit checks for dead features this often unless resample_interval is set.
_PARTIAL_FIT_RESAMPLE_INTERVAL = 1000
# Rows per batch when encoding and decoding (no gradients, so larger is fine).
_INFERENCE_BATCH = 8192
_FORMAT = "sparse_dict.SparseAutoencoderDictionary"
_FORMAT_VERSION = 2
# The default training budget (max_iter=None, max_steps=None): at least this
# many steps, and at most this many rows seen (both measured; see
# SparseAutoencoderDictionary's docstring).
_MIN_DEFAULT_STEPS = 3000
_DEFAULT_ROWS = 10_000_000
_MAX_DEFAULT_PASSES = 200
# AuxK's defaults, as in Gao et al. (2024).
_DEFAULT_AUXK_COEF = 1 / 32
# Rows on which BatchTopK's inference threshold and transform_l0_ are measured.
_CALIBRATION_ROWS = 8192
_WEIGHTS_FILE = "weights.safetensors"
_CONFIG_FILE = "config.json"


@contextlib.contextmanager
def _restored_on_error(estimator):
    """Put ``estimator``'s state back as it was if the body raises.

    A failed fit (bad data, divergence, interruption) must not leave a
    previously fitted estimator half-updated.
    """
    saved = dict(estimator.__dict__)
    try:
        yield
    except BaseException:
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        raise


class SparseAutoencoderDictionary(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    """Sparse dictionary learning with a sparse autoencoder (SAE).

    Learns ``n_components`` unit-norm atoms (the rows of ``components_``) and
    an encoder such that each row ``x`` is approximated by a sparse,
    non-negative combination of atoms::

        pre   = encoder_weights_ @ (x - decoder_bias_) + encoder_bias_
        codes = activation(pre)
        x_hat = codes @ components_ + decoder_bias_

    trained with Adam on ``mean ||x - x_hat||^2`` plus the activation's
    sparsity term. Unlike :class:`~sklearn.decomposition.DictionaryLearning`,
    coding a row costs one matrix product instead of an optimisation per row,
    which is what makes it practical on millions of activation vectors; with
    ``transform_algorithm`` the optimal codes against the learned atoms are
    available too.

    The sparsity mechanism (``activation``):

    * ``"relu"``: ``ReLU(pre)`` with an L1 penalty ``l1_coef * mean sum_i
      codes_i`` ("Towards Monosemanticity"). L0 follows from ``l1_coef``.
    * ``"topk"``: each row keeps its ``k`` largest pre-activations (Gao et al.
      2024). L0 is ``k``; no coefficient to tune.
    * ``"batchtopk"``: a training batch keeps its ``k * batch_size`` largest
      pre-activations, so rows use ``k`` codes on average (Bussmann et al.
      2024). After fit one threshold, ``threshold_``, replaces the batch
      selection, so a row's code never depends on the other rows it is
      transformed with; ``transform_l0_`` reports the L0 this gives.
    * ``"jumprelu"``: ``pre * (pre > threshold_i)`` with a threshold learned
      per feature through straight-through estimators, and an L0 penalty
      ``l0_coef * mean L0`` (Rajamanoharan et al. 2024).

    Features that stop firing are revived by AuxK for the top-k family
    (``auxk_coef``: each row's ``k_aux`` strongest dead features learn to
    reconstruct what the live ones miss), and by resampling for ReLU and
    JumpReLU (``resample_dead``: dead features restart on badly
    reconstructed inputs). AuxK works continuously and gently, which suits
    the top-k family, whose dead features otherwise never get a gradient;
    resampling restarts features outright, which suits penalised codes.

    During training the inputs are scaled so that their mean squared norm
    equals ``n_features``; one ``l1_coef`` or ``l0_coef`` therefore means the
    same sparsity pressure on any data set. The scale is folded back into the
    fitted attributes, which are all in the units of ``X``.

    Parameters
    ----------
    n_components : int, default=None
        Number of dictionary atoms (features). ``None`` means four times
        ``n_features``.
    activation : {"relu", "topk", "batchtopk", "jumprelu"}, default="relu"
        The sparsity mechanism (see above).
    k : int, default=32
        Codes per row for ``"topk"`` (exactly, at most) and ``"batchtopk"``
        (on average). Ignored by ``"relu"`` and ``"jumprelu"``.
    l1_coef : float, default=3.0
        Weight of the L1 penalty of ``"relu"``. Larger values give sparser
        codes (lower L0) and worse reconstruction. Ignored by the other
        activations.
    l0_coef : float, default=0.3
        Weight of the L0 penalty of ``"jumprelu"``. Larger values give lower
        L0. Ignored by the other activations.
    jumprelu_bandwidth : float, default=0.05
        Width of the straight-through estimators' rectangle kernel for
        ``"jumprelu"``, in the training units (inputs scaled to mean squared
        norm ``n_features``, where active codes are of order one). Smaller
        values give less biased but noisier threshold gradients. Ignored by
        the other activations.
    auxk_coef : float or "auto", default="auto"
        Weight of the AuxK loss for dead features. ``"auto"``: 1/32 for
        ``"topk"`` and ``"batchtopk"``, 0 (off) for the others.
    k_aux : int, default=None
        Dead features each row may use in the AuxK loss. ``None``: half of
        ``n_features``.
    learning_rate : float, default=3e-3
        Adam's peak learning rate.
    batch_size : int, default=1024
        Rows per training step.
    max_iter : int, default=None
        Number of passes (epochs) over the training data. ``None``: the
        default budget, enough optimiser steps for small data without
        wasting time on large data: ``max(3000 steps, 10 million rows seen)``
        capped at 200 passes (measured on several synthetic generators and
        on transformer activations; see the user guide).
    max_steps : int, default=None
        An optional budget of training steps; training stops at whichever of
        ``max_iter`` and ``max_steps`` comes first.
    warmup_fraction : float, default=0.05
        Fraction of the steps over which the learning rate and the sparsity
        coefficient ramp up linearly from zero (``partial_fit``: the first
        100 steps).
    decay_fraction : float, default=0.2
        Final fraction of the steps over which the learning rate decays
        linearly to zero (``fit`` only).
    resample_dead : bool or "auto", default="auto"
        Restart features that stopped firing on inputs that are badly
        reconstructed, as in "Towards Monosemanticity". ``"auto"``: on for
        ``"relu"`` and ``"jumprelu"``, off for the top-k family (which has
        AuxK).
    resample_interval : int, default=None
        Steps between checks for dead features; a feature that fired on no
        row during the last interval is resampled (and, for AuxK, counts as
        dead). ``None``: a tenth of the run in ``fit`` (at least 50 steps,
        and never in the last 30% of the run), 1000 steps in ``partial_fit``.
    decoder_bias_init : {"geometric_median", "mean", "zeros"}, default="geometric_median"
        How the decoder bias starts.
    transform_algorithm : {"encoder", "omp", "lasso_lars", "lasso_cd", \
"threshold"}, default="encoder"
        How :meth:`transform` codes data. ``"encoder"``: the autoencoder's
        own encoder (one matrix product). The others solve for the codes of
        ``X - decoder_bias_`` against ``components_`` row by row with
        :class:`~sparse_dict.LassoCoder` (non-negative): slower, and closer
        to the best reconstruction at a given L0 (see
        :func:`~sparse_dict.coding.amortisation_gap`).
    transform_n_nonzero_coefs : int, default=None
        Active atoms per row for ``transform_algorithm="omp"``. ``None``:
        ``k`` for the top-k family, else the encoder's mean L0 on the
        training data rounded (``transform_l0_``), so that both codes have
        the same sparsity.
    transform_alpha : float, default=None
        The L1 penalty of ``"lasso_lars"`` and ``"lasso_cd"`` and the
        threshold of ``"threshold"``, in the units of ``X``. ``None``: 1.0,
        as in scikit-learn's ``DictionaryLearning``.
    bf16 : bool, default=False
        Run the matrix products in bfloat16 autocast: faster on recent GPUs,
        usually slower on CPUs.
    device : str, default="auto"
        ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    callback : callable, default=None
        Called after every pass with a dict (``epoch``, ``step``, ``loss``,
        ``mse``, ``l1``, ``l0``, ``auxk``, ``dead``, ``learning_rate``);
        returning ``True`` stops training.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial atoms, the batch order and the resampling. An
        integer makes CPU fits bit-for-bit repeatable.
    verbose : int, default=0
        If positive, show a progress bar with the loss, L0 and dead count.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary atoms, each of unit norm.
    encoder_weights_ : ndarray of shape (n_components, n_features)
    encoder_bias_ : ndarray of shape (n_components,)
    decoder_bias_ : ndarray of shape (n_features,)
        Subtracted before encoding and added after decoding.
    threshold_ : ndarray of shape (n_components,)
        Per-feature thresholds of ``"jumprelu"``, and the single inference
        threshold of ``"batchtopk"`` (repeated). Defined for those two only.
    n_components_ : int
    scale_ : float
        Factor that brought the training data to mean squared norm
        ``n_features`` (already folded into the other attributes).
    n_iter_ : int
        Passes over the data done (``partial_fit`` counts calls).
    n_steps_ : int
        Training steps done.
    loss_curve_ : ndarray of shape (n_steps_,)
        The loss at every step (in scaled units).
    history_ : dict of ndarray
        ``"loss"``, ``"mse"``, ``"l1"``, ``"l0"`` and ``"auxk"`` at every step
        (training batches, scaled units).
    train_l0_ : float
        Mean L0 over the last tenth of the training steps.
    transform_l0_ : float
        Mean L0 of the encoder's codes on (up to 8,192) training rows after
        fit. For ``"batchtopk"`` it shows how well the fitted threshold
        reproduces the training selection.
    feature_frequencies_ : ndarray of shape (n_components,)
        Fraction of the rows of the last pass on which each feature fired.
    n_resampled_ : int
        Number of dead-feature restarts so far.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when ``X`` has string column names.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : Classical online
        dictionary learning with per-row sparse coding.
    sparse_dict.LassoCoder : Optimal sparse codes against a fixed dictionary.

    Notes
    -----
    A fit that ends while its loss is still falling fast raises
    :class:`~sklearn.exceptions.ConvergenceWarning` with what to change; a
    fit whose reconstruction error ends far above where it started (a
    learning rate too large) raises :class:`DivergenceError` and leaves the
    estimator as it was.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict import SparseAutoencoderDictionary
    >>> rng = np.random.RandomState(0)
    >>> X = rng.exponential(size=(500, 8)).astype(np.float32)
    >>> sae = SparseAutoencoderDictionary(n_components=16, max_iter=5, random_state=0)
    >>> codes = sae.fit_transform(X)
    >>> codes.shape, codes.dtype, bool((codes >= 0).all())
    ((500, 16), dtype('float32'), True)
    >>> np.allclose(np.linalg.norm(sae.components_, axis=1), 1.0, atol=1e-5)
    True

    A TopK autoencoder sets the number of active codes per row directly:

    >>> topk = SparseAutoencoderDictionary(
    ...     n_components=16, activation="topk", k=3, max_iter=5, random_state=0)
    >>> codes = topk.fit_transform(X)
    >>> int((codes > 0).sum(axis=1).max())
    3
    """

    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "k": [Interval(Integral, 1, None, closed="left")],
        "l1_coef": [Interval(Real, 0, None, closed="left")],
        "l0_coef": [Interval(Real, 0, None, closed="left")],
        "jumprelu_bandwidth": [Interval(Real, 0, None, closed="neither")],
        "auxk_coef": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "k_aux": [Interval(Integral, 1, None, closed="left"), None],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left"), None],
        "max_steps": [Interval(Integral, 1, None, closed="left"), None],
        "warmup_fraction": [Interval(Real, 0, 1, closed="left")],
        "decay_fraction": [Interval(Real, 0, 1, closed="left")],
        "resample_dead": ["boolean", StrOptions({"auto"})],
        "resample_interval": [Interval(Integral, 1, None, closed="left"), None],
        "decoder_bias_init": [StrOptions({"geometric_median", "mean", "zeros"})],
        "transform_algorithm": [
            StrOptions({"encoder", "omp", "lasso_lars", "lasso_cd", "threshold"})
        ],
        "transform_n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "bf16": ["boolean"],
        "device": [str],
        "callback": [callable, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=None,
        *,
        activation="relu",
        k=32,
        l1_coef=3.0,
        l0_coef=0.3,
        jumprelu_bandwidth=0.05,
        auxk_coef="auto",
        k_aux=None,
        learning_rate=3e-3,
        batch_size=1024,
        max_iter=None,
        max_steps=None,
        warmup_fraction=0.05,
        decay_fraction=0.2,
        resample_dead="auto",
        resample_interval=None,
        decoder_bias_init="geometric_median",
        transform_algorithm="encoder",
        transform_n_nonzero_coefs=None,
        transform_alpha=None,
        bf16=False,
        device="auto",
        callback=None,
        random_state=None,
        verbose=0,
    ):
        self.n_components = n_components
        self.activation = activation
        self.k = k
        self.l1_coef = l1_coef
        self.l0_coef = l0_coef
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.auxk_coef = auxk_coef
        self.k_aux = k_aux
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.max_steps = max_steps
        self.warmup_fraction = warmup_fraction
        self.decay_fraction = decay_fraction
        self.resample_dead = resample_dead
        self.resample_interval = resample_interval
        self.decoder_bias_init = decoder_bias_init
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.bf16 = bf16
        self.device = device
        self.callback = callback
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionary and the encoder from ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Training rows; ``np.memmap`` input is read batch by batch.
        y : Ignored

        Returns
        -------
        self : object
        """
        with _restored_on_error(self):
            X = self._validate_train_data(X, reset=True)
            random_state = check_random_state(self.random_state)
            trainer = self._new_trainer(X, random_state)
            total = self._total_steps(X.shape[0])
            interval = self.resample_interval or max(total // 10, 50)
            config = self._train_config(
                total_steps=total,
                warmup_steps=int(round(self.warmup_fraction * total)),
                decay_steps=int(round(self.decay_fraction * total)),
                resample_interval=interval,
                resample_until=int(0.7 * total),
            )
            n_passes = self._train(trainer, X, config, random_state, total)
            self._finish(trainer, X, config, random_state)
            self.n_iter_ = n_passes
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Take one pass of training steps over ``X``, continuing from the last call.

        The first call on an unfitted estimator initialises the model from
        ``X`` (its scale and decoder bias); on a fitted one (by :meth:`fit`,
        an earlier call, or :meth:`load`) training continues from the fitted
        state. There is no final learning-rate decay, since the end of
        training is not known.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self : object
        """
        first_call = not hasattr(self, "components_")
        with _restored_on_error(self):
            X = self._validate_train_data(X, reset=first_call)
            # One random state across calls, so that successive calls draw
            # different batch orders.
            if getattr(self, "_partial_random_state", None) is None:
                self._partial_random_state = check_random_state(self.random_state)
            random_state = self._partial_random_state
            if first_call:
                trainer = self._new_trainer(X, random_state)
                self.n_iter_ = 0
            else:
                trainer = self._get_trainer().to(resolve_device(self.device))
            config = self._train_config(
                total_steps=None,
                warmup_steps=_PARTIAL_FIT_WARMUP_STEPS if self.warmup_fraction > 0 else 0,
                resample_interval=self.resample_interval or _PARTIAL_FIT_RESAMPLE_INTERVAL,
            )
            self._train(trainer, X, config, random_state, math.ceil(X.shape[0] / self.batch_size),
                        n_passes=1)
            self._finish(trainer, X, config, random_state, assess=False)
            self.n_iter_ += 1
        return self

    def _activation(self):
        """The core's sparsity mechanism for the current parameters."""
        return make_activation(
            self.activation, k=self.k, bandwidth=self.jumprelu_bandwidth
        )

    def _total_steps(self, n_samples):
        """The run's length in steps: max_iter and max_steps, or the default budget."""
        steps_per_pass = math.ceil(n_samples / self.batch_size)
        if self.max_iter is not None:
            total = self.max_iter * steps_per_pass
        elif self.max_steps is not None:
            return self.max_steps
        else:
            # Enough steps for small data, a fixed number of rows for large
            # data; never hundreds of passes over a tiny set.
            by_rows = math.ceil(_DEFAULT_ROWS / self.batch_size)
            total = min(max(_MIN_DEFAULT_STEPS, by_rows), _MAX_DEFAULT_PASSES * steps_per_pass)
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        return total

    def _train_config(self, **schedule):
        activation = self._activation()
        coef_name = activation.penalty_name
        auxk_coef = self.auxk_coef
        if auxk_coef == "auto":
            auxk_coef = _DEFAULT_AUXK_COEF if self.activation in ("topk", "batchtopk") else 0.0
        resample = self.resample_dead
        if resample == "auto":
            resample = self.activation in ("relu", "jumprelu")
        k_aux = self.k_aux or max(1, self.n_features_in_ // 2)
        return TrainConfig(
            coef=getattr(self, coef_name) if coef_name else 0.0,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            resample_dead=bool(resample),
            auxk_coef=float(auxk_coef),
            k_aux=int(k_aux),
            dead_window=schedule["resample_interval"],
            bf16=self.bf16,
            **schedule,
        )

    def _new_trainer(self, X, random_state):
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        n_components = self.n_components or 4 * X.shape[1]
        trainer = Trainer(
            X.shape[1], n_components, resolve_device(self.device), seed, self._activation()
        )
        trainer.initialize(X, random_state, self.decoder_bias_init)
        return trainer

    def _train(self, trainer, X, config, random_state, total, n_passes=None):
        if n_passes is None:
            n_passes = math.ceil(total / math.ceil(X.shape[0] / self.batch_size))
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc=type(self).__name__, unit="step")
        try:
            return trainer.train(X, n_passes, config, random_state, self.callback, progress)
        finally:
            if progress is not None:
                progress.close()

    def _finish(self, trainer, X, config, random_state, assess=True):
        """After training: calibrate, judge the run, and store the fitted state.

        Divergence raises (and the caller's context restores the estimator);
        an unconverged run stores its result and warns.
        """
        sample = trainer.calibration_sample(X, _CALIBRATION_ROWS, random_state)
        trainer.calibrate(sample)
        problems = assess_training(trainer, config, check_convergence=assess)
        diverged = [message for kind, message in problems if kind == "diverged"]
        if diverged:
            raise DivergenceError(diverged[0])
        self._trainer = trainer
        self._store_fitted(trainer, X.dtype)
        self.transform_l0_ = trainer.mean_l0(sample)
        for kind, message in problems:
            if kind == "unconverged":
                warnings.warn(message, ConvergenceWarning, stacklevel=3)

    def _validate_train_data(self, X, reset):
        return validate_data(
            self,
            X,
            reset=reset,
            accept_sparse="csr",
            dtype=[np.float64, np.float32],
            ensure_min_samples=2,
        )

    def _store_fitted(self, trainer, dtype):
        for name, value in trainer.export().items():
            setattr(self, name + "_", value.astype(dtype, copy=False))
        if "threshold" not in trainer.model.activation.state_names:
            # A refit with another activation must not keep a stale threshold.
            self.__dict__.pop("threshold_", None)
        self.n_components_ = self.components_.shape[0]
        self.scale_ = float(trainer.scale)
        self.n_steps_ = int(trainer.step)
        history = trainer.history
        self.history_ = {k: history[:, i].copy() for i, k in enumerate(STAT_NAMES)}
        self.loss_curve_ = self.history_["loss"]
        tail = self.history_["l0"][-max(1, len(history) // 10):]
        self.train_l0_ = float(tail.mean()) if len(tail) else float("nan")
        rows = max(trainer.pass_rows, 1)
        self.feature_frequencies_ = trainer.pass_fired / rows
        self.n_resampled_ = int(trainer.n_resampled)
        self._coder = None

    def _fitted_tensors(self):
        """The fitted tensors by their core names (``components``, ...)."""
        names = fitted_tensor_names(self._activation())
        return {name: getattr(self, name + "_") for name in names}

    def _get_trainer(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            # A dictionary loaded from disk has no optimiser state: continue
            # from its parameters with a fresh Adam.
            seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
            trainer = Trainer.from_parameters(
                self._fitted_tensors(), self.scale_, "cpu", int(seed), self._activation()
            )
            trainer.step = int(getattr(self, "n_steps_", 0))
        return trainer

    # ------------------------------------------------------------ transforming
    def transform(self, X):
        """Encode ``X`` as non-negative sparse codes.

        With ``transform_algorithm="encoder"`` (the default) the codes come
        from the autoencoder's encoder; otherwise they are solved for row by
        row against ``components_`` (see ``transform_algorithm``).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            Of the same float dtype as ``X`` (float32 or float64).
        """
        check_is_fitted(self)
        return self._encode(self._validate_inference_data(X))

    def inverse_transform(self, X):
        """Reconstruct inputs from their codes.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_components)
            Codes, as returned by :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        codes = check_array(X, accept_sparse="csr", dtype=[np.float64, np.float32])
        if codes.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {codes.shape[1]} features, but {type(self).__name__} is "
                f"expecting {self.n_components_} codes (n_components_) as input."
            )
        return self._decode(codes)

    def score(self, X, y=None):
        """Fraction of the variance of ``X`` explained by its reconstruction.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
            ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; higher is better.
        """
        from sparse_dict.metrics import explained_variance

        check_is_fitted(self)
        # Validated once here; transform and inverse_transform would each
        # validate (and scan for NaN) again.
        X = self._validate_inference_data(X)
        X_hat = self._decode(self._encode(X))
        dense = X.toarray() if sp.issparse(X) else X
        return float(explained_variance(dense, X_hat))

    def _validate_inference_data(self, X):
        return validate_data(
            self, X, reset=False, accept_sparse="csr", dtype=[np.float64, np.float32]
        )

    def _encode(self, X):
        if self.transform_algorithm != "encoder":
            return self._optimal_coder().transform(X.toarray() if sp.issparse(X) else X)
        return encode_array(
            self._fitted_tensors(), self._activation(), X,
            _INFERENCE_BATCH, resolve_device(self.device), X.dtype,
        )

    def _optimal_coder(self):
        """The LassoCoder for ``transform_algorithm``, built once per fit."""
        coder = getattr(self, "_coder", None)
        settings = (self.transform_algorithm, self.transform_n_nonzero_coefs, self.transform_alpha)
        if coder is None or coder[0] != settings:
            from sparse_dict.coding import LassoCoder

            n_nonzero = self.transform_n_nonzero_coefs
            if n_nonzero is None:
                if self.activation in ("topk", "batchtopk"):
                    n_nonzero = self.k
                else:
                    n_nonzero = max(1, int(round(getattr(self, "transform_l0_", 1.0))))
            lasso = LassoCoder(
                self.components_,
                algorithm=self.transform_algorithm,
                alpha=1.0 if self.transform_alpha is None else self.transform_alpha,
                n_nonzero_coefs=n_nonzero,
                offset=self.decoder_bias_,
            )
            width = np.zeros((1, self.n_features_in_), dtype=self.components_.dtype)
            coder = (settings, lasso.fit(width))
            self._coder = coder
        return coder[1]

    def _decode(self, codes):
        return decode_array(
            self.components_, self.decoder_bias_, codes,
            _INFERENCE_BATCH, resolve_device(self.device), codes.dtype,
        )

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------ saving and loading
    def __setstate__(self, state):
        super().__setstate__(state)
        device = state.get("device", "auto")
        if isinstance(device, str) and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                warnings.warn(
                    f"This model was saved with device={device!r}, but CUDA is not "
                    "available here; it will run on the CPU (device='cpu').",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.device = "cpu"

    def save(self, path, *, overwrite=False):
        """Save the fitted dictionary to a folder: safetensors weights and JSON.

        Nothing is pickled, so a saved dictionary can be shared and loaded
        safely. The optimiser state is not saved: :meth:`load` gives a model
        that transforms identically and can continue training with a fresh
        optimiser.

        Parameters
        ----------
        path : str or path-like
            The folder to write (``config.json`` and ``weights.safetensors``).
        overwrite : bool, default=False
            Replace an existing folder. The old one is removed only after the
            new one is completely written.

        Returns
        -------
        path : pathlib.Path
        """
        from safetensors.numpy import save_file

        check_is_fitted(self)
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        params["callback"] = None
        if not (params["random_state"] is None or isinstance(params["random_state"], Integral)):
            params["random_state"] = None
        attributes = {
            "n_features_in_": int(self.n_features_in_),
            "n_components_": int(self.n_components_),
            "n_iter_": int(self.n_iter_),
            "n_steps_": int(self.n_steps_),
            "scale_": float(self.scale_),
            "n_resampled_": int(self.n_resampled_),
            "dtype": np.dtype(self.components_.dtype).name,
        }
        if hasattr(self, "feature_names_in_"):
            attributes["feature_names_in_"] = [str(n) for n in self.feature_names_in_]
        from sparse_dict import __version__

        config = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "sparse_dict_version": __version__,
            "params": params,
            "attributes": attributes,
        }
        attributes["train_l0_"] = float(self.train_l0_)
        attributes["transform_l0_"] = float(self.transform_l0_)
        tensors = dict(self._fitted_tensors())
        tensors["feature_frequencies"] = np.asarray(self.feature_frequencies_, dtype=np.float64)
        tensors["history"] = np.stack([self.history_[k] for k in STAT_NAMES], axis=1)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                      staging / _WEIGHTS_FILE)
            (staging / _CONFIG_FILE).write_text(json.dumps(config, indent=2))
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                old.rmdir()
                path.rename(old)
                staging.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, *, device=None):
        """Load a dictionary written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like
        device : str, default=None
            Override the saved ``device`` parameter (for example ``"cpu"``).

        Returns
        -------
        estimator : SparseAutoencoderDictionary
        """
        from safetensors.numpy import load_file

        path = Path(path)
        config_file, weights_file = path / _CONFIG_FILE, path / _WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a saved dictionary: expected {_CONFIG_FILE} and "
                f"{_WEIGHTS_FILE} inside it."
            )
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError(f"{config_file} does not describe a {cls.__name__}.")
        if config.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer sparse_dict "
                f"(format {config['format_version']}); upgrade sparse_dict to load it."
            )
        tensors = load_file(str(weights_file))
        params = config["params"]
        if device is not None:
            params["device"] = device
        if config.get("format_version", 0) < 2:
            # Format 1 stored the defaults of its time: 20 passes, resampling.
            params.setdefault("max_iter", 20)
        estimator = cls(**params)
        attrs = config["attributes"]
        n_components, n_features = attrs["n_components_"], attrs["n_features_in_"]
        shapes = {
            "components": (n_components, n_features),
            "encoder_weights": (n_components, n_features),
            "decoder_bias": (n_features,),
        }
        names = fitted_tensor_names(estimator._activation())
        for name in names:
            shape = shapes.get(name, (n_components,))
            if name not in tensors or tensors[name].shape != shape:
                raise ValueError(
                    f"{weights_file}: tensor {name!r} is missing or not of shape {shape}."
                )
        dtype = np.dtype(attrs.get("dtype", "float32"))
        for name in names:
            setattr(estimator, name + "_", tensors[name].astype(dtype))
        estimator.feature_frequencies_ = tensors["feature_frequencies"]
        history = tensors["history"]
        if history.shape[1] < len(STAT_NAMES):
            # Format 1 had no AuxK column.
            pad = np.zeros((history.shape[0], len(STAT_NAMES) - history.shape[1]))
            history = np.concatenate([history, pad], axis=1)
        estimator.history_ = {k: history[:, i].copy() for i, k in enumerate(STAT_NAMES)}
        estimator.loss_curve_ = estimator.history_["loss"]
        tail = estimator.history_["l0"][-max(1, len(history) // 10):]
        estimator.train_l0_ = attrs.get("train_l0_", float(tail.mean()) if len(tail) else float("nan"))
        estimator.transform_l0_ = attrs.get("transform_l0_", estimator.train_l0_)
        estimator.n_features_in_ = n_features
        estimator.n_components_ = n_components
        estimator.n_iter_ = attrs["n_iter_"]
        estimator.n_steps_ = attrs["n_steps_"]
        estimator.scale_ = attrs["scale_"]
        estimator.n_resampled_ = attrs["n_resampled_"]
        if "feature_names_in_" in attrs:
            estimator.feature_names_in_ = np.asarray(attrs["feature_names_in_"], dtype=object)
        return estimator
