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
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from sparse_dict._torch import (
    DivergenceError,
    TrainConfig,
    Trainer,
    decode_array,
    encode_array,
    resolve_device,
)

__all__ = ["DivergenceError", "SparseAutoencoderDictionary"]

# partial_fit cannot know the run's length: it warms up over this many steps.
_PARTIAL_FIT_WARMUP_STEPS = 100
# partial_fit checks for dead features this often unless resample_interval is set.
_PARTIAL_FIT_RESAMPLE_INTERVAL = 1000
# Rows per batch when encoding and decoding (no gradients, so larger is fine).
_INFERENCE_BATCH = 8192
_FORMAT = "sparse_dict.SparseAutoencoderDictionary"
_FORMAT_VERSION = 1
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

        codes = ReLU(encoder_weights_ @ (x - decoder_bias_) + encoder_bias_)
        x_hat = codes @ components_ + decoder_bias_

    by minimising ``mean ||x - x_hat||^2 + l1_coef * mean sum_i codes_i *
    ||atom_i||`` with Adam. Unlike :class:`~sklearn.decomposition.DictionaryLearning`,
    coding a row costs one matrix product instead of an optimisation per row,
    which is what makes it practical on millions of activation vectors.

    During training the inputs are scaled so that their mean squared norm
    equals ``n_features``; one ``l1_coef`` therefore means the same sparsity
    pressure on any data set. The scale is folded back into the fitted
    attributes, which are all in the units of ``X``.

    Parameters
    ----------
    n_components : int, default=None
        Number of dictionary atoms (features). ``None`` means four times
        ``n_features``.
    l1_coef : float, default=3.0
        Weight of the L1 sparsity penalty. Larger values give sparser codes
        (lower L0) and worse reconstruction.
    learning_rate : float, default=3e-3
        Adam's peak learning rate.
    batch_size : int, default=1024
        Rows per training step.
    max_iter : int, default=20
        Number of passes (epochs) over the training data.
    max_steps : int, default=None
        An optional budget of training steps; training stops at whichever of
        ``max_iter`` and ``max_steps`` comes first.
    warmup_fraction : float, default=0.05
        Fraction of the steps over which the learning rate and ``l1_coef``
        ramp up linearly from zero (``partial_fit``: the first 100 steps).
    decay_fraction : float, default=0.2
        Final fraction of the steps over which the learning rate decays
        linearly to zero (``fit`` only).
    resample_dead : bool, default=True
        Restart features that stopped firing on inputs that are badly
        reconstructed, as in "Towards Monosemanticity".
    resample_interval : int, default=None
        Steps between checks for dead features; a feature that fired on no
        row during the last interval is resampled. ``None``: a tenth of the
        run in ``fit`` (at least 50 steps, and never in the last 30% of the
        run), 1000 steps in ``partial_fit``.
    decoder_bias_init : {"geometric_median", "mean", "zeros"}, default="geometric_median"
        How the decoder bias starts.
    bf16 : bool, default=False
        Run the matrix products in bfloat16 autocast: faster on recent GPUs,
        usually slower on CPUs.
    device : str, default="auto"
        ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    callback : callable, default=None
        Called after every pass with a dict (``epoch``, ``step``, ``loss``,
        ``mse``, ``l1``, ``l0``, ``dead``, ``learning_rate``); returning
        ``True`` stops training.
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
        ``"loss"``, ``"mse"``, ``"l1"`` and ``"l0"`` at every step.
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
    """

    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "l1_coef": [Interval(Real, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "max_steps": [Interval(Integral, 1, None, closed="left"), None],
        "warmup_fraction": [Interval(Real, 0, 1, closed="left")],
        "decay_fraction": [Interval(Real, 0, 1, closed="left")],
        "resample_dead": ["boolean"],
        "resample_interval": [Interval(Integral, 1, None, closed="left"), None],
        "decoder_bias_init": [StrOptions({"geometric_median", "mean", "zeros"})],
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
        l1_coef=3.0,
        learning_rate=3e-3,
        batch_size=1024,
        max_iter=20,
        max_steps=None,
        warmup_fraction=0.05,
        decay_fraction=0.2,
        resample_dead=True,
        resample_interval=None,
        decoder_bias_init="geometric_median",
        bf16=False,
        device="auto",
        callback=None,
        random_state=None,
        verbose=0,
    ):
        self.n_components = n_components
        self.l1_coef = l1_coef
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.max_steps = max_steps
        self.warmup_fraction = warmup_fraction
        self.decay_fraction = decay_fraction
        self.resample_dead = resample_dead
        self.resample_interval = resample_interval
        self.decoder_bias_init = decoder_bias_init
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

            steps_per_pass = math.ceil(X.shape[0] / self.batch_size)
            total = self.max_iter * steps_per_pass
            if self.max_steps is not None:
                total = min(total, self.max_steps)
            interval = self.resample_interval or max(total // 10, 50)
            config = TrainConfig(
                l1_coef=self.l1_coef,
                learning_rate=self.learning_rate,
                batch_size=self.batch_size,
                total_steps=total,
                warmup_steps=int(round(self.warmup_fraction * total)),
                decay_steps=int(round(self.decay_fraction * total)),
                resample_dead=self.resample_dead,
                resample_interval=interval,
                resample_until=int(0.7 * total),
                bf16=self.bf16,
            )
            n_passes = self._train(trainer, X, config, random_state, self.max_iter, total)
            self._trainer = trainer
            self.n_iter_ = n_passes
            self._store_fitted(trainer, X.dtype)
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
            warmup = _PARTIAL_FIT_WARMUP_STEPS if self.warmup_fraction > 0 else 0
            config = TrainConfig(
                l1_coef=self.l1_coef,
                learning_rate=self.learning_rate,
                batch_size=self.batch_size,
                total_steps=None,
                warmup_steps=warmup,
                resample_dead=self.resample_dead,
                resample_interval=self.resample_interval or _PARTIAL_FIT_RESAMPLE_INTERVAL,
                bf16=self.bf16,
            )
            steps = math.ceil(X.shape[0] / self.batch_size)
            self._train(trainer, X, config, random_state, 1, steps)
            self._trainer = trainer
            self.n_iter_ += 1
            self._store_fitted(trainer, X.dtype)
        return self

    def _new_trainer(self, X, random_state):
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        n_components = self.n_components or 4 * X.shape[1]
        trainer = Trainer(X.shape[1], n_components, resolve_device(self.device), seed)
        trainer.initialize(X, random_state, self.decoder_bias_init)
        return trainer

    def _train(self, trainer, X, config, random_state, n_passes, total):
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc=type(self).__name__, unit="step")
        try:
            return trainer.train(X, n_passes, config, random_state, self.callback, progress)
        finally:
            if progress is not None:
                progress.close()

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
        params = trainer.export()
        self.components_ = params["components"].astype(dtype, copy=False)
        self.encoder_weights_ = params["encoder_weights"].astype(dtype, copy=False)
        self.encoder_bias_ = params["encoder_bias"].astype(dtype, copy=False)
        self.decoder_bias_ = params["decoder_bias"].astype(dtype, copy=False)
        self.n_components_ = self.components_.shape[0]
        self.scale_ = float(trainer.scale)
        self.n_steps_ = int(trainer.step)
        history = trainer.history
        self.history_ = {k: history[:, i].copy() for i, k in enumerate(("loss", "mse", "l1", "l0"))}
        self.loss_curve_ = self.history_["loss"]
        rows = max(trainer.pass_rows, 1)
        self.feature_frequencies_ = trainer.pass_fired / rows
        self.n_resampled_ = int(trainer.n_resampled)

    def _get_trainer(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            # A dictionary loaded from disk has no optimiser state: continue
            # from its parameters with a fresh Adam.
            params = {
                "components": self.components_,
                "encoder_weights": self.encoder_weights_,
                "encoder_bias": self.encoder_bias_,
                "decoder_bias": self.decoder_bias_,
            }
            seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
            trainer = Trainer.from_parameters(params, self.scale_, "cpu", int(seed))
            trainer.step = int(getattr(self, "n_steps_", 0))
        return trainer


    # ------------------------------------------------------------ transforming
    def transform(self, X):
        """Encode ``X`` as non-negative sparse codes.

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
        return encode_array(
            self.encoder_weights_, self.encoder_bias_, self.decoder_bias_, X,
            _INFERENCE_BATCH, resolve_device(self.device), X.dtype,
        )

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
        from sparse_dict._version import __version__

        config = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "sparse_dict_version": __version__,
            "params": params,
            "attributes": attributes,
        }
        tensors = {
            "components": self.components_,
            "encoder_weights": self.encoder_weights_,
            "encoder_bias": self.encoder_bias_,
            "decoder_bias": self.decoder_bias_,
            "feature_frequencies": np.asarray(self.feature_frequencies_, dtype=np.float64),
            "history": np.stack([self.history_[k] for k in ("loss", "mse", "l1", "l0")], axis=1),
        }
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
        estimator = cls(**params)
        attrs = config["attributes"]
        n_components, n_features = attrs["n_components_"], attrs["n_features_in_"]
        expected = {
            "components": (n_components, n_features),
            "encoder_weights": (n_components, n_features),
            "encoder_bias": (n_components,),
            "decoder_bias": (n_features,),
        }
        for name, shape in expected.items():
            if name not in tensors or tensors[name].shape != shape:
                raise ValueError(
                    f"{weights_file}: tensor {name!r} is missing or not of shape {shape}."
                )
        dtype = np.dtype(attrs.get("dtype", "float32"))
        estimator.components_ = tensors["components"].astype(dtype)
        estimator.encoder_weights_ = tensors["encoder_weights"].astype(dtype)
        estimator.encoder_bias_ = tensors["encoder_bias"].astype(dtype)
        estimator.decoder_bias_ = tensors["decoder_bias"].astype(dtype)
        estimator.feature_frequencies_ = tensors["feature_frequencies"]
        history = tensors["history"]
        estimator.history_ = {k: history[:, i].copy() for i, k in enumerate(("loss", "mse", "l1", "l0"))}
        estimator.loss_curve_ = estimator.history_["loss"]
        estimator.n_features_in_ = n_features
        estimator.n_components_ = n_components
        estimator.n_iter_ = attrs["n_iter_"]
        estimator.n_steps_ = attrs["n_steps_"]
        estimator.scale_ = attrs["scale_"]
        estimator.n_resampled_ = attrs["n_resampled_"]
        if "feature_names_in_" in attrs:
            estimator.feature_names_in_ = np.asarray(attrs["feature_names_in_"], dtype=object)
        return estimator
