"""SparseAutoencoderDictionary: a sparse autoencoder as a scikit-learn transformer.

This module is the scikit-learn shell: it validates parameters and data,
calls the torch core in :mod:`sparse_dict._torch`, and stores fitted
attributes. It holds no training logic of its own.
"""

import concurrent.futures
import contextlib
import functools
import json
import math
import zlib
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
from sklearn.utils._param_validation import Interval, StrOptions, validate_parameter_constraints
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from sparse_dict import _persist
from sparse_dict._validation import IntegerInterval
from sparse_dict._warn import warn_at_caller
from sparse_dict._torch import (
    ACTIVATIONS,
    DivergenceError,
    RankFailedError,
    TrainConfig,
    Trainer,
    assess_training,
    decode_array,
    encode_array,
    reconstructor,
    fitted_tensor_names,
    make_activation,
    median_squared_distance,
    resolve_device,
    value_range,
)
from sparse_dict._torch.distributed import is_writer, replicas_for
from sparse_dict._torch.memory import device_bytes, training_bytes
from sparse_dict._torch.model import STAT_NAMES
from sparse_dict._torch import resume as _resume

__all__ = ["DivergenceError", "RankFailedError", "SparseAutoencoderDictionary"]

# partial_fit cannot know the run's length: it warms up over this many steps.
_PARTIAL_FIT_WARMUP_STEPS = 100
# partial_fit checks for dead features this often unless resample_interval is set.
_PARTIAL_FIT_RESAMPLE_INTERVAL = 1000
# Rows per batch when encoding and decoding (no gradients, so larger is fine).
_INFERENCE_BATCH = 8192
_FORMAT = "sparse_dict.SparseAutoencoderDictionary"
_FORMAT_VERSION = 2
# The default training budget (max_iter=None, max_steps=None): at least the
# activation's min_default_steps; beyond that two passes, but at most this
# many rows, and never more than this many passes (measured; see
# SparseAutoencoderDictionary's docstring).
_DEFAULT_ROWS = 10_000_000
_MAX_DEFAULT_PASSES = 1000
# Fewer training rows than this per atom and fit warns that the dictionary
# can memorise them (measured; see _warn_few_rows).
_MIN_ROWS_PER_ATOM = 16
# JumpReLU memorises more: its gap between training and held-out EV at 32
# rows an atom was as ReLU's at 16 (see _warn_few_rows).
_MIN_ROWS_PER_ATOM_JUMPRELU = 64
# AuxK's defaults, as in Gao et al. (2024).
_DEFAULT_AUXK_COEF = 1 / 32
# A first partial_fit call of fewer rows warns: the scale it sets and keeps
# is within about 10% of a large sample's from this many (measured; see
# _warn_small_first_call).
_STEADY_FIRST_CALL = 128
# Rows on which BatchTopK's inference threshold and transform_l0_ are measured.
_CALIBRATION_ROWS = 8192
# A partial_fit call of fewer rows keeps the running threshold of training:
# at k=4 a threshold from one call's single row gave held-out L0 from 0.4 to
# 26, where the running average of the steps gave 3.9.
_PARTIAL_CALIBRATION_MIN_ROWS = 1024
_WEIGHTS_FILE = "weights.safetensors"
_CONFIG_FILE = "config.json"
# save(training_state=True)'s third file: what partial_fit goes on from.
_TRAINING_STATE_FILE = "training_state.safetensors"
# A RandomState's Mersenne Twister key (numpy's get_state()[1]).
_MT_KEY_LENGTH = 624


# What a saved folder holds, checked at load. The tensors' shapes depend on
# the attributes, so their schema is made by _saved_tensor_schema.
_SAVED_ATTRIBUTES = {
    "n_features_in_": _persist.Integer(1),
    "n_components_": _persist.Integer(1),
    "n_iter_": _persist.Integer(0),
    "n_steps_": _persist.Integer(0),
    "scale_": _persist.Real(0.0, inclusive=False),
    "n_resampled_": _persist.Integer(0),
    "dtype": _persist.OneOf(("float32", "float64")),
}
_V1_HISTORY_WIDTH = 4  # loss, mse, l1, l0


# Bounds of the mechanisms' state: a negative threshold gave negative codes,
# and a selection scale of 0 or below, codes that were all zero.
_FITTED_MINIMUM = {"threshold": 0.0, "selection_scale": float(np.finfo(np.float32).tiny)}


def _saved_tensor_schema(fitted_names, n_components, n_features, dtype, history_width,
                         optional=()):
    """What each saved tensor must be: the model's fitted tensors and the statistics.

    ``optional`` names the activation's state tensors that older folders lack.
    """
    same = (dtype,)
    schema = {
        name: _persist.TensorSpec(_fitted_shape(name, n_components, n_features), same,
                                  minimum=_FITTED_MINIMUM.get(name), optional=name in optional)
        for name in fitted_names
    }
    # All NaN for a dictionary imported without its frequencies.
    schema["feature_frequencies"] = _persist.TensorSpec(
        (n_components,), minimum=0.0, maximum=1.0, unknown=True)
    schema["history"] = _persist.TensorSpec((None, history_width))
    # The estimator's dict_init parameter, where it was set (checked by fit).
    schema["dict_init"] = _persist.TensorSpec((None, None), optional=True)
    return schema


def _newer_than_this(version):
    """Whether the release string ``version`` is later than this package's (False if unknown)."""
    from sparse_dict._version import __version__, version_tuple

    theirs = version_tuple(version) if isinstance(version, str) else None
    return theirs is not None and theirs > version_tuple(__version__)


def _loads_back(folder):
    """Load a staged folder as :meth:`SparseAutoencoderDictionary.load` would.

    Not under a filter that silences warnings: Python's filters are the
    process's, and a save in one thread silenced other threads' warnings
    meanwhile (3 to 7% of a transform's scale warnings, beside a thread
    saving in a loop). On the CPU, a load warns of nothing.
    """
    SparseAutoencoderDictionary.load(folder, device="cpu")


def _fitted_shape(name, n_components, n_features):
    """The shape of the fitted tensor ``name`` (a core name: ``components``, ...)."""
    return {
        "components": (n_components, n_features),
        "encoder_weights": (n_components, n_features),
        "decoder_bias": (n_features,),
    }.get(name, (n_components,))


def _checked_settings(settings, activation, file):
    """A saved ``fitted_settings``: the fitted mechanism's settings, of other values."""
    names = set(activation.describe())
    if (not isinstance(settings, dict) or set(settings) != names
            or settings.get("name") != activation.name
            or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                       for v in settings.values())):
        raise ValueError(f"{file}: field 'attributes.fitted_settings' must hold the settings "
                         f"{sorted(names)} of activation {activation.name!r}, got {settings!r}")
    return settings


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


# A folder that save wrote: what overwrite=True may replace, and nothing else.
SAVED_DICTIONARY = _persist.folder_kind(
    "saved dictionary",
    {
        _CONFIG_FILE: _persist.json_kind(
            "dictionary configuration",
            lambda config: isinstance(config, dict) and config.get("format") == _FORMAT,
        ),
        _WEIGHTS_FILE: None,
        _TRAINING_STATE_FILE: None,
    },
)


# The parameters read at every transform, checked there (see
# SparseAutoencoderDictionary._check_inference_params).
_INFERENCE_PARAMS = ("k", "transform_algorithm", "transform_alpha", "transform_n_nonzero_coefs",
                     "transform_max_iter", "device")


def _check_not_a_store(X):
    """Refuse an activation store passed as ``X``, naming the array it holds."""
    if hasattr(X, "activations") and hasattr(X, "manifest"):
        raise TypeError(
            f"X is an {type(X).__name__}, not an array of rows; pass its activations "
            "(X.activations, a memory-mapped array read batch by batch), with "
            "provenance=X.provenance() to fit.")


def _accepted_dtypes(X):
    """The dtypes ``validate_data`` may leave ``X`` in (others are converted whole).

    A float16 array (activations are often saved so) stays as it is, and is
    read batch by batch in float32, as the model computes: scikit-learn's
    conversion would copy it whole into float64, four times its size, and a
    memmap would no longer be read piece by piece.
    """
    if _is_float16(X):
        return None
    return [np.float64, np.float32]


def _is_float16(X):
    """Whether ``X`` is float16 throughout: an array, or a DataFrame of float16 columns."""
    if isinstance(X, np.ndarray):
        return X.dtype == np.float16
    dtypes = getattr(X, "dtypes", None)  # a pandas DataFrame's, one per column
    try:
        return dtypes is not None and len(dtypes) > 0 and all(
            np.dtype(d) == np.float16 for d in dtypes)
    except TypeError:  # a pandas extension dtype, which numpy does not know
        return False


def _result_dtype(X):
    """The dtype of what is computed from ``X``: its own, float32 for float16."""
    return np.dtype(np.float32) if X.dtype == np.float16 else X.dtype


def _device_here(device):
    """``device``, or ``"cpu"`` with a warning if it names CUDA and this machine has none."""
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            warn_at_caller(
                f"This model was saved with device={device!r}, but CUDA is not "
                "available here; it will run on the CPU (device='cpu').",
                RuntimeWarning,
            )
            return "cpu"
    return device


def _check_fit_provenance(provenance, X):
    """``fit``'s ``provenance``: a copy of a JSON object, with ``n_tokens`` filled in."""
    if provenance is None:
        return None
    if not isinstance(provenance, dict):
        raise TypeError(
            f"provenance must be a dict (as TransformerActivationExtractor.provenance() "
            f"gives), got {type(provenance).__name__}."
        )
    provenance = dict(provenance)
    if provenance.get("n_tokens") is None:
        provenance["n_tokens"] = int(X.shape[0])
    width = provenance.get("n_features")
    if isinstance(width, Integral) and width != X.shape[1]:
        raise ValueError(
            f"provenance says the activations have {width} features, but X has "
            f"{X.shape[1]}; pass the provenance of the extractor X comes from."
        )
    try:
        json.dumps(provenance, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"provenance must be JSON-serialisable: {err}") from None
    return provenance


def _prepared_input(X):
    """``X`` as ``validate_data`` should see it: not a store, a tensor as an array, duplicates summed."""
    _check_not_a_store(X)
    return _summed_duplicates(_tensor_as_array(X))


def _tensor_as_array(X):
    """A torch tensor as a numpy array on the host (bfloat16 as float32); anything else as is.

    numpy has no bfloat16, in which activations are often kept: scikit-learn's
    conversion failed with "Got unsupported ScalarType BFloat16". A float32
    tensor stays float32 (converted by scikit-learn, it gave float64 codes).
    """
    if type(X).__module__.split(".")[0] != "torch" or not hasattr(X, "detach"):
        return X
    X = X.detach().cpu()
    if str(X.dtype) == "torch.bfloat16":
        X = X.float()
    return X.numpy()


def _checksum(array):
    """A checksum of an array's shape, dtype and values (its bytes).

    Examples
    --------
    >>> a = np.zeros(3, dtype=np.float32)
    >>> before = _checksum(a)
    >>> a[1] = 1.0
    >>> _checksum(a) == before, _checksum(a.copy()) == _checksum(a)
    (False, True)
    """
    array = np.ascontiguousarray(array)
    return (array.shape, array.dtype.str, zlib.crc32(memoryview(array).cast("B")))


def _summed_duplicates(X):
    """``X``, or for a sparse matrix that stores an entry twice, a copy with them summed.

    The checks read the stored values, while a batch's rows are the sums:
    two entries of 2e38 passed as finite, and training then met infinity
    (diverged at step 0) and transform returned non-finite codes.
    """
    if sp.issparse(X) and not getattr(X, "has_canonical_format", True):
        X = X.copy()
        X.sum_duplicates()
    return X


def _check_values(X):
    """Refuse NaN, infinities and data that float32, the model's arithmetic, cannot hold.

    One pass over ``X`` (:func:`~sparse_dict._torch.data.value_range`) in
    place of scikit-learn's finiteness check followed by a minimum and a
    maximum: three passes over what may be gigabytes, paid by every fit.
    """
    if (X.nnz if sp.issparse(X) else X.size) == 0:
        return  # a sparse matrix of implicit zeros
    low, high = value_range(X)
    if math.isnan(low):
        raise ValueError(
            "Input X contains NaN. SparseAutoencoderDictionary does not accept missing "
            "values: drop or impute them first (for example with "
            "sklearn.impute.SimpleImputer)."
        )
    if math.isinf(low) or math.isinf(high):
        raise ValueError(
            f"Input X contains infinity or a value too large for {X.dtype!r}.")
    peak = max(abs(low), abs(high))
    info = np.finfo(np.float32)
    if peak > float(info.max):
        raise ValueError(
            f"X has values up to {peak:.3g} in absolute value, beyond the range of "
            f"float32 (about {info.max:.3g}), in which the model computes. Rescale X, "
            "for example divide it by its largest absolute value."
        )
    if 0 < peak < float(info.tiny):
        raise ValueError(
            f"X's largest absolute value is {peak:.3g}, below float32's smallest normal "
            f"number ({info.tiny:.3g}): in float32, in which the model computes, such "
            "values lose their precision or vanish. Rescale X, for example divide it "
            "by its largest absolute value."
        )


def _check_distinct_atoms(atoms):
    """Refuse initial atoms of which two point the same way.

    Two such atoms, with their encoder rows (their transposes), get the same
    gradients at every step and stay the same atom for good: sixteen copies
    of one atom left a fit at EV 0.03 where random atoms reached 0.45, and
    no warning named the start. The directions are compared to six decimals
    after scaling each row to unit norm (the core's own scaling), which
    catches copies and multiples; opposite directions are distinct atoms.
    """
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    _, first, inverse = np.unique(np.round(unit, 6), axis=0, return_index=True,
                                  return_inverse=True)
    inverse = inverse.reshape(-1)
    repeats = np.flatnonzero(first[inverse] != np.arange(len(atoms)))
    if repeats.size:
        row = int(repeats[0])
        raise ValueError(
            f"dict_init's rows {int(first[inverse[row]])} and {row} point the same way "
            f"({repeats.size} {'row repeats' if repeats.size == 1 else 'rows repeat'} an "
            "earlier row's direction): atoms that start "
            "alike get the same updates and never separate. Give distinct atoms (a little "
            "noise separates copies), or dict_init=None for random ones.")


def _scan_beside_steps(device):
    """Whether a fit's first steps may run before the scan of its values ends.

    On a GPU: the host's cores are idle while the device steps, and a
    scan of the reference benchmark's 201 MB held a 50-step bf16 fit's
    first step up by about 17 ms (a tenth of the fit). Steps on rows the
    scan then refuses are discarded, unseen (:class:`_ScanVerdict`). Not
    on a CPU, whose steps need the cores the scan takes.
    """
    return device.type == "cuda"


class _ScanVerdict:
    """The scan of a fit's values (a future), and what follows it, settled once.

    ``result()`` raises the scan's error, each time it is asked; the first
    time the scan passes, the scan's thread is ended (nothing is left for
    it to do) and ``then()`` runs (the warnings of the fit's shape).
    """

    def __init__(self, future, executor, then):
        self._future, self._executor, self._then = future, executor, then

    def done(self):
        return self._future.done()

    def result(self):
        self._future.result()
        if self._then is not None:
            then, self._then = self._then, None
            self._executor.shutdown()
            then()


# The relative reconstruction bias above which a ReLU fit's codes count as
# shrunk. With the defaults on 3,000 rows of thirteen generators no test
# uses, the fits at 1.56 to 2.62 explained 0.31 to 0.65 of the held-out
# variance where TopK at the same L0 explained 0.76 to 0.97 (0.24 to 0.45
# more); those at 1.02 to 1.43 explained 0.74 to 0.94 (TopK 0.05 to 0.14
# more), the README's example 0.81 at 1.44. On 8,000 rows of eight of them,
# the two poor fits were at 1.50 and 1.52 (0.66 and 0.65), the others at
# 1.13 to 1.44 (0.73 to 0.92). The boundary is narrow: 1.47 lies between.
# (At 1.75, as before, the fits of features that fire on half the rows and
# of frequencies spread over three decades, 0.65 beside TopK's 0.96 and
# 0.89, said nothing.)
_SHRINKAGE_WARN = 1.47
# The same for a run that ended unconverged, where too few steps are the
# likelier cause of a bias a little above 1.47 and the convergence warning
# says so. Above this one, more steps did not help: on exponential rows the
# default fit's bias went from 2.1 to 1.7 (explained variance 0.47 to 0.53,
# TopK 0.88) over eight times the steps, still unconverged each time, and on
# Poisson counts (2.62) it explained 0.31 against TopK's 0.76; lowering
# l1_coef is what helped (0.84).
_SHRINKAGE_WARN_UNCONVERGED = 1.6
# The bias misses shrinkage that is uneven across rows and features. With
# the defaults on data no test uses (2026-11-27), the fits where TopK at the
# same L0 explained 0.17 to 0.21 more of the held-out rows (a non-negative
# Student-t superposition, random ReLU-MLP activations, a power-law
# superposition, scikit-learn's make_sparse_coded_signal) had biases of 1.22
# to 1.67, and two of them said nothing. Refitting each row's active
# features' magnitudes by least squares (Trainer.refit_gain, on the
# calibration sample of training rows) gained 0.14 to 0.24 there, 0.15 on
# the README's superposition example (TopK 0.12 ahead), and 0.07 to 0.08 on
# digits, blobs and the built-in model's activations (TopK 0.07 to 0.13
# ahead). A gain above this is named, whatever the bias, where the code is
# sparse enough for the refit to mean something (_REFIT_L0_SHARE).
_REFIT_GAIN_WARN = 0.12
# ... namely, an L0 under half the width. Least squares on a support as wide
# as the space fits anything (L0 9.6 of 8 dimensions refit to 0.995). Below
# half the width the gain still told the fits apart (2026-11-27, defaults,
# 2,000 training rows, held-out EV against TopK at the same L0 and atoms):
# at L0 0.30 to 0.43 of the width, fits that TopK beat by 0.30 to 0.59
# (Gaussian rows, friedman1, diabetes, a superposition with 16 atoms a
# dimension, a low-rank set) gained 0.22 to 0.54, and said nothing where the
# bound was a quarter; fits at 0.36 to 0.56 of the width that TopK beat by
# 0.03 to 0.07 (l1_coef=1 on three of those sets) gained 0.04 to 0.07.
_REFIT_L0_SHARE = 0.5


# A tail of rows far from the mean that holds this share of the variance or
# more, and a fit this much worse on the other rows than on all of them,
# are worth a warning (see _tail_dominates). Measured on 18 data sets, each
# fitted with ReLU and TopK: 1% of rows at 10 times the others' norm took
# ReLU's held-out EV on the others from 0.55 to 0.15 (share 0.49, gap 0.41;
# TopK's gap 0.10), heavy-tailed rows gave ReLU gaps of 0.16 and 0.23 where
# TopK's were 0.03 and 0.04; no data set without such a tail (superposition,
# Poisson, log-normal, Student t with 4 degrees, MiniLM's and the built-in
# model's activations) held over 0.11 of the variance in its 1%.
_TAIL_WARN_SHARE = 0.15
_TAIL_WARN_GAP = 0.09


def _tail_dominates(tail):
    """Whether the rows farthest from the mean hide how poorly the others are reconstructed."""
    return (tail is not None and tail.share >= _TAIL_WARN_SHARE
            and tail.explained_rest < tail.explained - _TAIL_WARN_GAP)


def _tail_message(tail, uses_k=False):
    """The warning for rows far from the mean; ``uses_k``: the fit is of the top-k family."""
    advice = ("remove them and fit again." if uses_k else
              "remove them and fit again; if they matter, a top-k activation "
              "(activation='topk') holds up better where a few rows dominate.")
    return (
        f"The {tail.n_rows:,} rows of the sample farthest from the mean (1%) hold "
        f"{tail.share:.0%} of its variance, and the dictionary spends itself on them: it "
        f"explains {tail.explained:.2f} of the variance of all rows but {tail.explained_rest:.2f} "
        "of the others'. If those rows are outliers (a corrupted record, an extreme token), "
        + advice
    )


# Rows given to the encoder whose median squared distance from the decoder
# bias is this many times the training rows' (train_distance_; or less than
# its inverse: a norm four times larger or smaller) are coded in units the
# biases and thresholds were not trained for. At 10 times the scale a default ReLU fit
# coded 20 atoms a row instead of 5; at 0.1 times none at all (EV -2.7), and
# TopK's EV fell from 0.90 to 0.37, silently. Held-out rows of the training
# distribution gave ratios of 0.95 to 1.19 (nine generators, each activation,
# 2026-11-28; the mean of all but the largest 1%, against n_features /
# scale_**2), the same rows at 10 times their scale 95 to 280, and at a
# tenth 0.01 to 0.2 where the rows' mean is near the origin (rows far from
# it, such as digits', stay about as far from the bias: 0.4 to 1.9, unsaid).
# The training rows' figure is measured from the fitted bias, which can move
# far from where it started (decoder_bias_init="zeros" on rows offset by
# 20: the training rows themselves read 0.015 against the scale's figure),
# and as a median, which one outsized row in 64 (a transformer's first
# token) does not move (the mean read 240).
_SCALE_SHIFT_WARN = 16.0
# Rows read for it: an even spread of at most this many, of calls of at least
# _SCALE_SHIFT_MIN_ROWS (a few rows say little of a scale).
_SCALE_SHIFT_ROWS = 2048  # as the training rows' (Trainer.median_distance)
_SCALE_SHIFT_MIN_ROWS = 64


def _median_distance(X, decoder_bias):
    """The median squared distance of ``X``'s rows from ``decoder_bias``.

    Over at most ``_SCALE_SHIFT_ROWS`` rows spread over ``X`` (fewer where
    they are wide: about 32 MB of them at most); sparse rows are not made
    dense. For rows given to ``transform``, by the arithmetic of the
    training rows' figure (:func:`median_squared_distance`, as
    :meth:`Trainer.median_distance` takes it on the device). The median, so
    that a few outsized rows (a transformer's first token) move it no more
    than they would the training rows'.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 8))
    >>> ratio = _median_distance(10 * X, np.zeros(8)) / _median_distance(X, np.zeros(8))
    >>> round(float(ratio))
    100
    """
    import torch

    n_rows = min(_SCALE_SHIFT_ROWS, max(_SCALE_SHIFT_MIN_ROWS, (1 << 25) // (8 * X.shape[1])))
    rows = X[::max(1, X.shape[0] // n_rows)][:n_rows]
    bias = np.array(decoder_bias, dtype=np.float64)  # a copy: torch wraps it below
    if sp.issparse(rows):
        # Expanded, so that the rows are not made dense.
        rows = rows.astype(np.float64)
        distance = (np.asarray(rows.multiply(rows).sum(axis=1)).ravel()
                    - 2.0 * (rows @ bias) + bias @ bias)
        return float(torch.from_numpy(distance).median())
    # As for the training rows (Trainer.median_distance): the same arithmetic.
    rows = np.ascontiguousarray(rows)
    if rows.dtype.kind != "f":
        rows = rows.astype(np.float64)
    elif not rows.flags.writeable:
        # The caller's read-only memory (a memmap, a frozen array): torch
        # warns of wrapping it, and this is a sample.
        rows = rows.copy()
    return median_squared_distance(torch.from_numpy(rows), torch.from_numpy(bias))


def _shrinkage_message(shrinkage, explained, l1_coef, refit=None):
    """The warning for shrunk codes; ``refit``: :meth:`Trainer.refit_gain`'s two figures."""
    if refit is None:
        said = (f"the reconstructions fit the training rows best when scaled by "
                f"{shrinkage:.2g} (the relative reconstruction bias; 1 without shrinkage), and "
                f"they explain {explained:.2f} of the rows' variance")
    else:
        # The bias is of the whole calibration sample, which a few outsized
        # rows can hold at 1 while the refit's rows are shrunk: named only
        # where it says the same.
        bias = (f" (the relative reconstruction bias is {shrinkage:.2g}; 1 without "
                "shrinkage)" if shrinkage > 1.1 else "")
        said = (f"with the same features active, magnitudes fitted by least squares would "
                f"explain {refit[1]:.2f} of a sample of the training rows' variance, against "
                f"the codes' {refit[0]:.2f}{bias}")
    return (
        f"The codes are shrunk: {said}. The L1 penalty (l1_coef={l1_coef:g}) pulls every "
        "active code towards 0 on this data; lower l1_coef (for example by a factor of 3), "
        "or use activation='topk' or 'jumprelu', whose codes are not shrunk.")


def _per_atom(n_rows, n_components, floor=_MIN_ROWS_PER_ATOM):
    """Rows an atom for the few-rows warning, never rounded up to the floor it is below.

    Examples
    --------
    >>> _per_atom(4000, 256), _per_atom(500, 1024), _per_atom(1024, 512)
    ('15.6', '0.49', '2')
    """
    ratio = n_rows / n_components
    text = f"{ratio:.2g}"
    if float(text) >= floor > ratio:  # 15.6 shown as "16", the floor itself
        text = f"{math.floor(ratio * 10) / 10:.1f}"
    return text


# Rows of X read to judge what float32 rounding takes from float64 data.
_ROUNDING_PROBE_ROWS = 4096
# The share of X's variance that rounding to float32 may take before a fit
# says so: a ceiling on the explained variance of 0.99.
_ROUNDING_SHARE_WARN = 0.01


def _warn_float32_rounding(X):
    """Warn where rounding float64 ``X`` to float32 loses a part of its variance.

    The model computes in float32, which keeps about 7 digits: rows of 1e8
    plus a spread of 1 lost it all (explained variance -0.003 where the same
    rows centred in float64 gave 0.85), and nothing said so. The rounding
    error of a value has a variance of its float32 spacing squared over 12;
    measured on evenly spaced rows. Returns whether it warned.
    """
    if sp.issparse(X) or X.dtype != np.float64 or X.shape[0] < 2:
        return False
    rows = np.unique(np.linspace(0, X.shape[0] - 1, _ROUNDING_PROBE_ROWS).astype(np.int64))
    sample = np.asarray(X[rows], dtype=np.float64)
    # About the first row: rows that are all the same have a variance of
    # exactly 0 (about their mean, float64's own rounding made one).
    variance = float((sample - sample[:1]).var(axis=0).sum())
    # Rounding to a float32 spacing u errs uniformly within +-u/2: variance u**2 / 12.
    spacing = np.spacing(np.abs(sample).astype(np.float32)).astype(np.float64)
    rounding = float((spacing ** 2).mean(axis=0).sum()) / 12
    if variance > 0 and rounding > _ROUNDING_SHARE_WARN * variance:
        share = min(rounding / variance, 1.0)
        peak = float(np.abs(sample).max())
        warn_at_caller(
            f"X is float64 with values up to {peak:.3g} that vary by much less: rounded to "
            f"float32, in which the model computes, about {share:.0%} of their variance is "
            "rounding error, which no dictionary can explain. Subtract the column means in "
            "float64 first (X - X.mean(axis=0)), or a StandardScaler in a Pipeline.",
            UserWarning)
        return True
    return False


def _rows_to_learn_from(n_samples, distinct):
    """X's rows as the few-rows rules count them: its distinct ones where it repeats them."""
    return n_samples if distinct is None else min(distinct, n_samples)


def _few_rows_caveat(n_samples, n_components, distinct=None, floor=_MIN_ROWS_PER_ATOM):
    """What to add to advice to train longer where the rows are few for the atoms ("" if not).

    With 200 rows for 128 atoms, more steps, as the convergence warning
    advised, took a ReLU fit's held-out EV from 0.32 to -0.43 (JumpReLU's
    from 0.18 to -0.60): on too few rows the loss keeps falling as the
    atoms memorise them.
    """
    rows = _rows_to_learn_from(n_samples, distinct)
    if rows >= floor * n_components:
        return ""
    return (f" But with {_per_atom(rows, n_components, floor)} rows an atom (see the warning "
            "on few rows) more steps fit these rows ever closer and new rows worse: compare "
            "held-out scores before training longer (for example GridSearchCV over "
            "max_steps), or give it more rows or fewer atoms.")


def _warn_few_rows(n_samples, n_components, distinct=None, fixed_l0=False,
                   floor=_MIN_ROWS_PER_ATOM):
    """Warn when the rows are too few for the atoms: the fit can memorise them.

    Measured with the defaults (ReLU, the default budget) on the built-in
    model's activations, 1,024 atoms, EV on the training rows against EV
    on 4,096 held-out tokens:

    ============  =======  ========  =====
    rows an atom  trained  held out  gap
    ============  =======  ========  =====
    1             0.978    0.505     0.473
    2             0.903    0.546     0.358
    4             0.832    0.580     0.252
    8             0.814    0.659     0.155
    16            0.816    0.731     0.085
    64            0.820    0.798     0.022
    ============  =======  ========  =====

    TopK (k=32) on the same rows: 0.962 and 0.412 at 2 rows an atom, 0.953
    and 0.912 at 16, 0.948 and 0.942 at 64. On MiniLM's layer-3 MLP
    activations (1,536 neurons, the default 6,144 atoms, ReLU) at 1.8 rows
    an atom, 0.932 and 0.538. A memorised
    dictionary looks excellent on the rows it was fitted on, so the warning
    says how to see it (score held-out rows). Rows that repeat count once
    (``distinct``, the trainer's estimate where its sample found repeats):
    500 distinct rows repeated to 40,000 were memorised as 500 are (held-out
    EV -1.7 with the ReLU defaults, training EV 0.90).

    JumpReLU (``floor`` 64 for it) memorises more. Its defaults, 256 atoms,
    training against held-out EV, at 32 and 64 rows an atom: 0.86 and 0.66,
    0.85 and 0.77 on a uniform superposition of 64 features; 0.86 and 0.76,
    0.87 and 0.83 with power-law frequencies; 0.89 and 0.83, 0.91 and 0.90 on
    clustered mixtures; 0.98 and 0.97, 0.98 and 0.98 on one of 32 features
    (ReLU on the same rows: gaps of 0.027 to 0.054 at 32, 0 to 0.029 at 64).
    On MiniLM's layer-4 MLP output (384 wide, 634 atoms, 40 rows an atom,
    3,000 steps) the gap was small: 0.935 and 0.932 (ReLU 0.941 and 0.938).
    """
    if distinct is not None and distinct < floor * n_components:
        rows = (f"X has about {distinct:,} distinct rows among its {n_samples:,} (its rows "
                f"repeat) for {n_components:,} atoms "
                f"({_per_atom(distinct, n_components, floor)} distinct rows an atom)")
        least = f"{floor} distinct rows an atom"
    elif n_samples >= floor * n_components:
        return
    else:
        rows = (f"X has {n_samples:,} rows for {n_components:,} atoms "
                f"({_per_atom(n_samples, n_components, floor)} rows an atom)")
        least = f"{floor} rows an atom"
    rows_per_atom = _rows_to_learn_from(n_samples, distinct) / n_components
    jumping = ("; JumpReLU memorises more on some data: 0.86 against 0.66 at 32 rows an "
               "atom, 0.85 against 0.77 at 64, on a superposition of 64 features, though "
               "0.935 against 0.932 at 40 on MiniLM's layer-4 MLP output"
               if floor > _MIN_ROWS_PER_ATOM else "")
    # Measured (2026-11-27) with the defaults on superpositions and random
    # ReLU-MLP activations of 100 features: 240 training rows for the 400
    # atoms of n_components=None explained -2.0 to -0.1 of held-out rows
    # (0.76 to 0.99 of their own).
    fewer = (" With fewer rows than atoms it can be worse than predicting the mean: "
             "240 rows of 100 features for 400 atoms explained -2.0 to -0.1 of held-out "
             "rows." if rows_per_atom < 1 else "")
    # Measured (2026-11-27) with the defaults (400 atoms) on rows of 100
    # features from three generators, L0 on the 300 training rows against
    # held-out rows: ReLU 2.8-8.6 against 19-39, JumpReLU 7.6-13 against
    # 17-22, BatchTopK (k=32) 32 against 55-83; at 5 rows an atom 1.1 to 1.6
    # times, at 50 equal (BatchTopK). TopK codes k a row whatever the row.
    if not fixed_l0:
        fewer += (" New rows also code denser than these: L0 on 300 training rows against "
                  "held-out ones, 400 atoms, was 2.8-8.6 against 19-39 (ReLU), 7.6-13 "
                  "against 17-22 (JumpReLU) and 32 against 55-83 (BatchTopK, k=32), still "
                  "1.1 to 1.6 times at 5 rows an atom; measure L0 on held-out rows too.")
    warn_at_caller(
        f"{rows}: with so few rows an SAE this wide "
        "can memorise them, and reconstruct them far better than rows it has not seen "
        "(measured with the defaults: EV 0.82 on the training rows against 0.66 on "
        f"held-out ones at 8 rows an atom, 0.55 at 2; 0.80 at 64{jumping}).{fewer} Fit on "
        f"at least {least} ({floor * n_components:,} here) where you can, and judge "
        "the fit on held-out rows (score(X_held_out)); a smaller n_components memorises "
        "less, but where the data holds many features it also explains less, so compare "
        "held-out scores before choosing it.",
        UserWarning,
    )


def _warn_small_first_call(n_samples):
    """Warn when partial_fit's first call sets the scale from too few rows to keep.

    The input scale (and the decoder bias) are set from the first call's
    rows and kept for the stream. Measured (10 windows of each size, against
    the scale of 10,000 rows; superpositions of 32 features, and 48 offset
    features of sparse exponential codes): from 2 rows the scale was 0.97 to
    2.78 times it, from 8 0.74 to 1.68, from 32 0.93 to 1.37, from 128 0.95
    to 1.09. A scale 2 times too large halves what one ``l1_coef`` asks.
    """
    if n_samples >= _STEADY_FIRST_CALL:
        return
    warn_at_caller(
        f"The first partial_fit call had {n_samples:,} rows: the input scale and the "
        "decoder bias are set from them and kept for the whole stream, and from so few "
        "rows the scale can be off by a factor of 2 or more (from 2 rows, 0.97 to 2.78 "
        "times that of 10,000 rows; from 128, 0.95 to 1.09), which changes the sparsity "
        f"l1_coef or l0_coef gives. Start the stream with {_STEADY_FIRST_CALL} rows or "
        "more where you can; later calls may bring any number.",
        UserWarning,
    )


def _warn_dominant_rows(dominant):
    """Warn that a few rows of outsized norm hold most of the data's spread."""
    warn_at_caller(
        f"The largest {dominant.n_rows:,} of {dominant.n_sampled:,} rows sampled from X hold "
        f"{dominant.share:.0%} of its spread around its centre (rows of outsized norm). "
        "The input scale is set from the other rows, so that these few do not shrink every "
        "other row against the sparsity penalty. Look at the largest row norms "
        "(np.linalg.norm(X, axis=1)): rows that are artefacts (a corrupted record, a "
        "token of another kind) are best dropped; rows that belong to the data (heavy-"
        "tailed activations) can stay, and are fitted as the others are.",
        UserWarning,
    )


def _warn_batch_of_one(batch_size):
    """Warn that BatchTopK on batches of one row trains as TopK but codes by a threshold.

    Its top ``k * batch`` codes of a one-row batch are that row's top ``k``:
    training is TopK's, step for step, while transform applies one threshold
    learned from those rows. Measured on 300 exponential rows (8 wide, 32
    atoms, k=3, 3,000 steps): explained variance 0.72 with the threshold, 0.89
    with the same weights coded by per-row top-k; batches of 4 or more gave
    0.90 to 0.93.
    """
    if batch_size == 1:
        warn_at_caller(
            "activation='batchtopk' with batch_size=1 trains exactly as 'topk' (a batch of "
            "one row keeps that row's top k), but codes with one threshold learned from "
            "those rows, which explains less; use activation='topk', or batches of several "
            "rows.", UserWarning)


def _warn_dense_k(k, n_features, n_components):
    """Warn when top-k's ``k`` leaves its codes no sparsity to find.

    Two cases. With ``k`` not below ``n_components`` top-k keeps every
    feature of every row (those with a positive pre-activation): its codes
    are a ReLU's without a penalty, not sparse. With ``k`` not below
    ``n_features`` (atoms to spare) any row is reconstructed exactly, sparse
    structure or not, so the atoms need not be the data's features.
    Measured on ``make_superposition`` rows (16 features, 64 true atoms, 3
    active a row; 64 atoms, the default budget): k=3 gave a held-out EV of
    0.83 and a mean max cosine similarity (MMCS) with the true atoms of
    0.97; k=16 gave 0.999 and 0.59, k=32 1.0 and 0.60.
    """
    if k >= n_components:
        exact = (f"; and {n_components:,} active atoms on {n_features:,} input features "
                 "reconstruct any row exactly" if n_components >= n_features else "")
        warn_at_caller(
            f"k={k} is not below n_components={n_components:,}: top-k keeps every feature of "
            f"every row, so the codes are not sparse{exact}. Choose k well below n_components "
            "and n_features.",
            UserWarning,
        )
    elif k >= n_features:
        warn_at_caller(
            f"k={k} keeps {k:,} features a row on {n_features:,} input features: with as "
            "many active atoms as input dimensions any row is reconstructed exactly, so the "
            "atoms need not be the data's features (measured on superposed data with 16 "
            "features and 3 active a row: k=16 gave EV 0.999 but a mean max cosine "
            "similarity of 0.59 with the true atoms, against 0.97 at k=3). Choose k well "
            "below n_features.",
            UserWarning,
        )


# Fewer active features a row than this at the end of a fit, and most rows
# are reconstructed by the decoder bias alone: the fit warns.
_SILENT_L0 = 0.1


def _silent_features_message(penalty_name, coef, l0, n_rows, k=None, learning_rate=None,
                             explained=float("nan"), rose=False):
    """The warning for a fit whose features fire on (almost) none of the rows.

    A penalty that outweighs every feature's use ends in codes of zero
    nearly everywhere, and in a run that can look converged: said apart,
    with its remedy. The top-k family (``k`` given) has no such penalty: its
    codes fall silent when the encoder's pre-activations all turned
    negative, which a learning rate too high does. A penalised fit that
    also reconstructs worse than the rows' mean (``explained`` below
    -_LITTLE_EXPLAINED), or whose error ended above where it started
    (``rose``), took steps too large: at learning_rate 1 the message blamed
    l1_coef alone, and a tenth of it diverged.
    """
    text = (f"Features fire on almost no row: L0 is {l0:.3g} on {n_rows:,} training rows "
            "sampled after the fit, so most rows are reconstructed by the decoder bias "
            "alone. ")
    if k is not None:
        return text + (f"With k={k}, this means the encoder's pre-activations are negative "
                       "on nearly every row, as after steps too large: lower learning_rate "
                       f"(now {learning_rate:g}), for example by a factor of 10.")
    penalty = (f"The sparsity penalty ({penalty_name}={coef:g})" if penalty_name
               else "The sparsity penalty")
    if explained < -_LITTLE_EXPLAINED or rose:
        worse = (f"explained variance {explained:.2f}" if explained < -_LITTLE_EXPLAINED
                 else "its error ended above where it started")
        return text + (f"The fit also reconstructs its training rows worse than their mean "
                       f"({worse}), as after steps too large: lower learning_rate (now "
                       f"{learning_rate:g}) first, for example by a factor of 10; if features "
                       f"still fire on almost no row, {penalty[0].lower() + penalty[1:]} "
                       "outweighs what they explain, and lowering it helps.")
    return text + (f"{penalty} outweighs what the features explain on this data; lower it, "
                   "for example by a factor of 10, or use activation='topk', which keeps k "
                   "features active on every row.")


# A fit of at least this many steps whose last pass left at least this share
# of the features unfired warns: it uses fewer features than it was given.
_DEAD_JUDGED_STEPS = 50
_DEAD_SHARE = 0.25
# A fit with many dead features that explains less than this share of its
# training rows' variance, or whose error ended above where it started,
# names the learning rate as a likely cause.
_LITTLE_EXPLAINED = 0.1


# A live atom with another live one at a cosine below _OPPOSITE is one of an
# opposite-sign pair; JumpReLU's dense regime pairs nearly all of them (at
# -0.9997 on normal noise), a sparse fit almost none: from _PAIRED_SHARE of
# the live atoms on, the dead-features warning names that regime.
_OPPOSITE = -0.9
_PAIRED_SHARE = 0.5
# ... and the code is dense: its L0 at least this share of the data's width.
# The dense fits measured had L0 near half the width (17.4 of 32); data whose
# codes are signed pairs its atoms at any L0, and a sparse fit of it (L0 1.6
# of 32, 82% paired, on scikit-learn's make_sparse_coded_signal) was told to
# raise l0_coef, which only made it sparser and worse (EV 0.68, then 0.64).
_DENSE_L0_SHARE = 0.25


def _paired_share(atoms, live, n_probe=256):
    """The share of the live atoms with an opposite-sign partner among the live ones.

    Probed on at most ``n_probe`` live atoms, evenly spread, against all the
    live ones: a few GFLOP for the largest dictionaries.
    """
    live_atoms = np.asarray(atoms[live], dtype=np.float32)
    if len(live_atoms) < 2:
        return 0.0
    live_atoms = live_atoms / np.maximum(np.linalg.norm(live_atoms, axis=1, keepdims=True),
                                         1e-12)
    probe = live_atoms[np.unique(np.linspace(0, len(live_atoms) - 1, n_probe).astype(int))]
    # Each probe meets itself at +1, never below _OPPOSITE.
    return float(((probe @ live_atoms.T).min(axis=1) < _OPPOSITE).mean())


def _dense_regime_message(l0, paired, left=False):
    """The warning for a JumpReLU fit in its dense regime (most live atoms in opposite-sign pairs).

    A pair of atoms of opposite signs carries one direction linearly, as a
    dense code does: below some ``l0_coef`` JumpReLU settles there, whether
    or not many features die beside it (``left``: the dead-features
    warning's sentence, which has just named the dead).
    """
    return (f"With JumpReLU, an L0 of {l0:.3g} and {paired:.0%} of the features "
            f"{'left ' if left else ''}in pairs of atoms of opposite signs, this is its dense "
            "regime: raise l0_coef. ")


def _dead_features_message(activation, n_dead, n_components, n_rows, l0, paired=0.0):
    """The warning for a fit that left a large share of its features dead.

    Measured with the defaults: features the data has no use for die and
    stay dead (on rank-5 rows in 64 dimensions, 74% of 256; on 8 distinct
    rows repeated, 65% of 128), and JumpReLU below some ``l0_coef`` settles
    on a dense code of opposite-sign pairs with the rest dead (36 to 50%;
    ``docs/sparsity.rst``). ReLU and TopK on the project's generators and on
    the built-in and MiniLM activations end with at most about 4% dead,
    JumpReLU in the recovery benchmark with up to 15%. ``paired``: the share
    of the live atoms in opposite-sign pairs (:func:`_paired_share`), which
    tells JumpReLU's dense regime from data with fewer features than atoms.
    """
    text = (f"{n_dead:,} of {n_components:,} features ({n_dead / n_components:.0%}) fired on "
            f"none of the last {n_rows:,} training rows (a pass's worth): the dictionary uses "
            f"{n_components - n_dead:,} features. ")
    if activation == "jumprelu" and paired >= _PAIRED_SHARE:
        return text + _dense_regime_message(l0, paired, left=True)
    text += ("Where the data has fewer features than n_components (low rank, few "
             "distinct rows, a few columns carrying most of the variance), a smaller "
             "n_components fits as well; feature_frequencies_ says which features fired.")
    if activation != "relu":
        # JumpReLU below some l0_coef falls into its dense regime instead.
        return text
    # 96 features of strengths from 0.03 to 30 in 32 dimensions: the default
    # ReLU fit left a third dead and explained 0.907 of held-out rows; 64
    # atoms, as advised, 0.906; l1_coef=1 0.978 with 1% dead, TopK at the
    # same L0 0.970 (2026-11-28).
    return text + (" Where it holds features of very different strengths, the L1 penalty "
                   "may instead silence the weak ones: a lower l1_coef (for example by a "
                   "factor of 3), or activation='topk', keeps them; compare held-out scores.")


def _speaks(replicas):
    """Whether this process gives the fit's warnings and progress: alone, or rank 0."""
    return replicas is None or replicas.rank == 0


@contextlib.contextmanager
def _restored_on_error(estimator, trainer=None):
    """Put ``estimator``'s state back as it was if the body raises.

    A failed fit (bad data, divergence, interruption) must not leave a
    previously fitted estimator half-updated. ``trainer``, the hidden trainer
    that the body continues training, is rolled back too: it can have trained
    before the interruption came.
    """
    saved = dict(estimator.__dict__)
    # The mutable states a call advances in place: partial_fit's random
    # state, and a RandomState given as random_state, which fit draws its
    # seed and batches from (kept as they were, the next call would draw
    # other batches than after an uninterrupted run: a fit refused for its
    # NaN rows, or interrupted, and then fitted again differed from a fresh
    # one). Their states are put back in the same objects, which may be
    # the caller's own.
    generators = {id(g): g for g in (saved.get("_partial_random_state"),
                                     saved.get("random_state"))
                  if isinstance(g, np.random.RandomState)}
    drawn = {key: g.get_state() for key, g in generators.items()}
    snapshot = trainer._snapshot() if trainer is not None else None
    try:
        yield
    except BaseException:
        if trainer is not None:
            trainer._restore(snapshot)
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        for key, generator in generators.items():
            generator.set_state(drawn[key])
        raise


def _own_precision(method):
    """``method`` run outside any ``torch.autocast`` of the caller's.

    The estimator chooses its own precision (``bf16``); inside a caller's
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` the products came out
    in bfloat16 where the rest was float32: fit failed ("addmv input
    tensors must have the same dtype") and transform could not return them
    ("Got unsupported ScalarType BFloat16"). The caller's autocast is back
    on return.
    """

    @functools.wraps(method)
    def outside_autocast(self, *args, **kwargs):
        import torch

        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return method(self, *args, **kwargs)

    return outside_autocast


def _trains(method):
    """``method`` run with torch's inference mode off and autocast its own, whatever the caller's.

    Training updates its parameters in place and keeps version counters,
    which tensors made inside ``torch.inference_mode()`` lack: a top-k fit
    there failed ("Inference tensors do not track version counter"). The
    mode is the calling thread's, and is restored on return. See
    :func:`_own_precision` for autocast.
    """

    @functools.wraps(method)
    def train_outside_inference_mode(self, *args, **kwargs):
        import torch

        with torch.inference_mode(False):
            return method(self, *args, **kwargs)

    return _own_precision(train_outside_inference_mode)


def _with_pass_lines(callback, progress):
    """``callback``, preceded by one printed line per pass (``verbose >= 2``)."""

    def report(info):
        line = (f"pass {info['epoch']}: step {info['step']}, loss {info['loss']:.4g}, "
                f"mse {info['mse']:.4g}, L0 {info['l0']:.1f}, dead {info['dead']}")
        progress.write(line)
        return callback(info) if callback is not None else None

    return report


def _offset_epochs(callback, offset):
    """``callback``, told the passes counted from ``offset`` (partial_fit's earlier calls)."""

    def call(info):
        return callback(dict(info, epoch=info["epoch"] + offset))

    return call


def _plain_int(value):
    """A count parameter as a Python int (None kept): numpy's small ints wrap round."""
    return None if value is None else int(value)


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
      ``l0_coef * n_features * mean L0`` in the training units (inputs scaled
      to a mean squared norm of ``n_features``; see ``l0_coef``)
      (Rajamanoharan et al. 2024).

    Features that stop firing are revived by AuxK for the top-k family
    (``auxk_coef``: each row's ``k_aux`` strongest dead features learn to
    reconstruct what the live ones miss), and by resampling for ReLU and
    JumpReLU (``resample_dead``: dead features restart on badly
    reconstructed inputs). AuxK works continuously and gently, which suits
    the top-k family, whose dead features otherwise never get a gradient;
    resampling restarts features outright, which suits penalised codes.

    During training the inputs are scaled so that their mean squared
    distance from where the decoder bias starts equals ``n_features``; one
    ``l1_coef`` or ``l0_coef`` therefore means the same sparsity pressure on
    any data set, whatever its units and whatever offset its rows share.
    The scale is folded back into the fitted attributes, which are all in
    the units of ``X``.

    Parameters
    ----------
    n_components : int, default=None
        Number of dictionary atoms (features). ``None`` means the rows of
        ``dict_init`` when it is given, else four times ``n_features``.
    activation : {"relu", "topk", "batchtopk", "jumprelu"}, default="relu"
        The sparsity mechanism (see above).
    k : int, default=32
        Codes per row for ``"topk"`` (exactly, at most) and ``"batchtopk"``
        (on average). Ignored by ``"relu"`` and ``"jumprelu"``. A new ``k``
        set on a fitted ``"topk"`` dictionary applies at the next
        :meth:`transform`; a ``"batchtopk"`` one's ``transform`` keeps
        ``threshold_``, fitted for the ``k`` it was trained with, until
        :meth:`partial_fit` or :meth:`fit` trains at the new ``k`` (which
        restarts the threshold's running average).
    l1_coef : float, default=3.0
        Weight of the L1 penalty of ``"relu"``. Larger values give sparser
        codes (lower L0) and worse reconstruction. Ignored by the other
        activations.
    l0_coef : float, default=0.005
        Weight of the L0 penalty of ``"jumprelu"``, in units of the inputs'
        mean squared distance from the decoder bias's start: a feature fires
        on a row when it lowers the squared error by more than ``l0_coef``
        times that. Larger values give lower L0 (0.005 gave an L0 of about
        23 on the built-in model's MLP activations with 1024 features). Ignored
        by the other activations.
    jumprelu_bandwidth : float, default=0.05
        Width of the straight-through estimators' rectangle kernel for
        ``"jumprelu"``, in the training units (inputs scaled to a mean
        squared distance ``n_features`` from the decoder bias's start, where
        active codes are of order one). Smaller
        values give less biased but noisier threshold gradients. Ignored by
        the other activations.
    auxk_coef : float or "auto", default="auto"
        Weight of the AuxK loss for dead features. ``"auto"``: 1/32 for
        ``"topk"`` and ``"batchtopk"``, 0 (off) for the others. As in
        OpenAI's code, the AuxK loss is the dead features' error on the
        residual relative to the residual's power, and the reconstruction
        error is relative to the data's variance, so 1/32 weighs the two as
        the paper does on any data.
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
        wasting time on large data: ``max(S, min(2 passes, 10M rows))``
        steps and never more than 1000 passes, where ``S`` is 3000 for the
        top-k family and 8000 for ``"relu"`` and ``"jumprelu"``, whose L0
        settles only as the penalty takes effect (measured on synthetic
        generators and transformer activations; see the user guide).
    max_steps : int, default=None
        A budget of training steps for :meth:`fit`: with ``max_iter`` set,
        training stops at whichever comes first; with ``max_iter=None``,
        it replaces the default budget (it may be longer). A
        :meth:`partial_fit` call makes one pass over its rows, whatever it
        says.
    warmup_fraction : float, default=0.05
        Fraction of the steps over which the learning rate and the sparsity
        coefficient ramp up linearly from zero (``partial_fit``: the first
        100 steps).
    decay_fraction : float, default=0.2
        Final fraction of the steps over which the learning rate decays
        linearly to zero (``fit`` only). ``warmup_fraction + decay_fraction``
        must be at most 1.
    resample_dead : bool or "auto", default="auto"
        Restart features that stopped firing on inputs that are badly
        reconstructed, as in "Towards Monosemanticity". ``"auto"``: on for
        ``"relu"`` and ``"jumprelu"``, off for the top-k family (which has
        AuxK).
    resample_interval : int, default=None
        Steps between checks for dead features; a feature that fired on no
        row during the last interval is resampled (and, for AuxK, counts as
        dead). ``None``: a tenth of the run in ``fit`` (at least 50 steps),
        1000 steps in ``partial_fit``. Set or not, never in the last 30% of
        a ``fit`` or of a ``partial_fit`` call's steps, so that restarted
        features train before it returns: a check falling there waits for
        the next call's first allowed step, a call of one batch never
        resamples, and at most one feature restarts on each of a call's
        inputs.
    decoder_bias_init : {"geometric_median", "mean", "zeros"}, default="geometric_median"
        How the decoder bias starts.
    dict_init : array-like of shape (n_components, n_features), default=None
        The atoms to start from, as in scikit-learn's dictionary learners:
        a warm start from another dictionary (a fitted
        ``MiniBatchDictionaryLearning``'s or another SAE's
        ``components_``) or from known features. Each row is scaled to unit
        norm, and the encoder starts as their transpose, as it does with
        random atoms. Rows must be finite, not all zero, and point different
        ways (copies would get the same updates for good). ``None`` draws
        random unit atoms. ``fit`` and the first ``partial_fit`` start from
        it; later ``partial_fit`` calls continue from the fitted atoms.
        ``save`` keeps it with the dictionary.
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
        the same sparsity. Capped at ``n_components``.
    transform_alpha : float, default=None
        The L1 penalty of ``"lasso_lars"`` and ``"lasso_cd"`` and the
        threshold of ``"threshold"``, in the units of ``X``. ``None``:
        ``1 / scale_``, that is 1.0 in the units the dictionary was trained
        in (``X`` times ``scale_``, whose entries are of order one), so that
        the default codes alike at any scale of ``X``; scikit-learn's
        ``DictionaryLearning`` takes 1.0 in the units of ``X``, which is the
        same for data of that order.
    transform_max_iter : int, default=1000
        The iterations of ``"lasso_cd"`` and ``"lasso_lars"`` per row, as
        scikit-learn's ``transform_max_iter``. Rows whose coordinate descent
        stops at this limit are counted in one ``ConvergenceWarning`` per
        :meth:`transform`.
    bf16 : bool, default=False
        Run the matrix products in bfloat16 autocast: faster on recent GPUs,
        usually slower on CPUs.
    sparse_step : bool or "auto", default="auto"
        The training step of ``"topk"`` and ``"batchtopk"`` that forms the
        decoder's product and every gradient from the ``k`` active codes of
        each row, so that only the encoder's product is dense: about a fifth
        of the dense step's operations, and the same gradients up to
        rounding. ``"auto"``: on a CPU when ``k`` is at most a sixteenth of
        ``n_components`` and ``n_components`` is at least 512 (where it
        measured faster; see the user guide on sparsity), dense otherwise
        and on GPUs. ``True`` forces it (top-k family only; always in
        float32, even with ``bf16``), ``False`` forces the dense step.
    device : str, default="auto"
        ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    device_data_budget : float in [0, 1], default=0.5
        On a GPU: when ``X``, as float32, takes at most this share of the
        GPU's free memory (after the model's training memory), it is copied
        to the GPU once and every batch is gathered there; otherwise the
        batches are gathered on the host by background threads into pinned
        buffers and copied ahead of the step that uses them. Both train on
        the same batches; the first is faster, the second holds only a few
        batches on the GPU. 0 always streams. Ignored on the CPU. See
        :doc:`/gpu`.
    distributed : {"auto", True, False}, default="auto"
        Data-parallel training across processes on ``torch.distributed``
        (see :doc:`/scaling`). ``"auto"``: in a script started by
        ``torchrun`` (or one that initialised the default process group),
        :meth:`fit` and :meth:`partial_fit` train one model on all the
        processes together, each reading its share of every batch, and
        every process ends with the same fitted dictionary; :meth:`save`
        writes on rank 0 only. Elsewhere, one process trains alone.
        ``True``: the same, but without a process group it is an error.
        ``False``: every process trains its own model (for example in a
        search over parameters). Every process must pass the same ``X``
        (a memmap of the same file costs no memory). The backend is gloo
        on CPUs and NCCL on GPUs, where ``device="auto"`` or ``"cuda"``
        gives each process the GPU of its local rank.
    callback : callable, default=None
        Called after every pass with a dict (``epoch``, ``step``, ``loss``,
        ``mse``, ``l1``, ``l0``, ``auxk``, ``dead``, ``learning_rate``);
        returning ``True`` stops training (any other value, None or the
        dict itself, does not). ``epoch`` counts passes from 1: in
        ``partial_fit``, across its calls, as ``n_iter_`` does.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial atoms, the batch order and the resampling. An
        integer makes CPU fits bit-for-bit repeatable, across processes too
        (with the same torch thread count, and under
        ``SPARSE_DICT_CPU_PRODUCT=openblas`` the same OpenBLAS thread count;
        ``SPARSE_DICT_CPU_PRODUCT=auto`` trades that for the faster BLAS, see
        :doc:`/scaling`).
    verbose : int, default=0
        If positive, show a progress bar with the loss, L0 and dead count;
        from 2, also one line per pass with the pass's figures.

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
    selection_scale_ : ndarray of shape (n_components,)
        ``"topk"`` only: weights of the pre-activations when the ``k``
        largest are chosen (the codes are not weighted). All ones when fitted
        here; other values come from SAEs trained with atoms of other norms
        (:meth:`from_saelens`), where they keep the choice exact.
    provenance_ : dict
        Where the training activations came from: the ``provenance`` given to
        :meth:`fit` (model, layer, hook, number of tokens, corpus, as
        :meth:`TransformerActivationExtractor.provenance
        <sparse_dict.TransformerActivationExtractor.provenance>` records
        them), or for dictionaries imported by :meth:`from_saelens` the SAE's
        metadata and what was folded into the attributes. Saved and loaded
        with the dictionary; absent when neither was given.
    n_components_ : int
    scale_ : float
        Factor that brought the training data to a mean squared distance
        ``n_features`` from the decoder bias's starting point (already
        folded into the other attributes). Measured without a few rows of
        outsized norm where they hold most of the spread (the largest
        thousandth, and those beyond 10 times the median distance, up to 1%
        of the rows), which a warning then names.
    n_iter_ : int
        Passes over the data done (``partial_fit`` counts calls).
    n_steps_ : int
        Training steps done.
    loss_curve_ : ndarray of shape (n_steps_,)
        The loss at every step (in scaled units): reconstruction error plus
        the sparsity penalty, with the coefficient as it was at that step
        (ramped up over the warm-up); AuxK's term is apart, in
        ``history_["auxk"]``.
    history_ : dict of ndarray
        ``"loss"``, ``"mse"``, ``"l1"``, ``"l0"`` and ``"auxk"`` at every step
        (training batches, scaled units; ``"auxk"`` is the dead features'
        error on the live features' residual relative to the previous
        step's mean squared error, which can exceed 1, and 0 while none is
        dead). Read-only arrays, which later calls of :meth:`partial_fit`
        leave as they are (they give new, longer ones).
    train_l0_ : float
        Mean L0 over the last tenth of the training steps.
    transform_l0_ : float
        Mean L0 of the encoder's codes on (up to 8,192) training rows after
        fit. For ``"batchtopk"`` it shows how well the fitted threshold
        reproduces the training selection.
    train_distance_ : float
        Median squared distance of (up to about 2,048) training rows from
        ``decoder_bias_`` after fit (after each :meth:`partial_fit` call, of
        its rows), in ``X``'s units: ``transform`` and ``score`` warn where
        the encoder is given rows 16 times as far, or 16 times as near. NaN
        where unknown (a dictionary read from SAELens).
    feature_frequencies_ : ndarray of shape (n_components,)
        Fraction of the training rows on which each feature fired, over the
        last pass; when a step budget ended the run inside a pass, over that
        partial pass and the whole pass before it, so that a full pass's
        worth of rows (or all that training saw) is counted. A feature at 0
        is dead. After :meth:`partial_fit`, over the rows of the calls so
        far, about the latest 8,192 (earlier calls' counts fade as a call's
        rows come in). NaN (unknown) for a dictionary read by
        :meth:`from_saelens` from a folder without ``sparsity.safetensors``,
        until a :meth:`partial_fit`.
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
    learning rate too large) raises
    :class:`~sparse_dict.estimator.DivergenceError` and leaves the
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
        "n_components": [IntegerInterval(1, None, closed="left"), None],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "k": [IntegerInterval(1, None, closed="left")],
        "l1_coef": [Interval(Real, 0, None, closed="left")],
        "l0_coef": [Interval(Real, 0, None, closed="left")],
        "jumprelu_bandwidth": [Interval(Real, 0, None, closed="neither")],
        "auxk_coef": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "k_aux": [IntegerInterval(1, None, closed="left"), None],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [IntegerInterval(1, None, closed="left")],
        "max_iter": [IntegerInterval(1, None, closed="left"), None],
        "max_steps": [IntegerInterval(1, None, closed="left"), None],
        "warmup_fraction": [Interval(Real, 0, 1, closed="left")],
        "decay_fraction": [Interval(Real, 0, 1, closed="left")],
        "resample_dead": ["boolean", StrOptions({"auto"})],
        "resample_interval": [IntegerInterval(1, None, closed="left"), None],
        "decoder_bias_init": [StrOptions({"geometric_median", "mean", "zeros"})],
        "dict_init": ["array-like", None],
        "transform_algorithm": [
            StrOptions({"encoder", "omp", "lasso_lars", "lasso_cd", "threshold"})
        ],
        "transform_n_nonzero_coefs": [IntegerInterval(1, None, closed="left"), None],
        "transform_alpha": [Interval(Real, 0, None, closed="left"), None],
        "transform_max_iter": [IntegerInterval(1, None, closed="left")],
        "bf16": ["boolean"],
        "sparse_step": ["boolean", StrOptions({"auto"})],
        "device_data_budget": [Interval(Real, 0, 1, closed="both")],
        "device": [str],
        "distributed": [StrOptions({"auto"}), "boolean"],
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
        l0_coef=0.005,
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
        dict_init=None,
        transform_algorithm="encoder",
        transform_n_nonzero_coefs=None,
        transform_alpha=None,
        transform_max_iter=1000,
        bf16=False,
        sparse_step="auto",
        device="auto",
        device_data_budget=0.5,
        distributed="auto",
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
        self.dict_init = dict_init
        self.transform_algorithm = transform_algorithm
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.transform_alpha = transform_alpha
        self.transform_max_iter = transform_max_iter
        self.bf16 = bf16
        self.sparse_step = sparse_step
        self.device = device
        self.device_data_budget = device_data_budget
        self.distributed = distributed
        self.callback = callback
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    @_trains
    def fit(self, X, y=None, provenance=None):
        """Learn the dictionary and the encoder from ``X``.

        A fit that fails or is interrupted (an error, a divergence, Ctrl-C)
        leaves the estimator as it was before the call, its training
        discarded; to keep what an interrupted run had learnt, stop it from
        ``callback`` (which keeps the result) or train in :meth:`partial_fit`
        calls.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Training rows; ``np.memmap`` input is read batch by batch.
        y : Ignored
        provenance : dict or None, default=None
            Where ``X`` comes from, as
            :meth:`TransformerActivationExtractor.provenance
            <sparse_dict.TransformerActivationExtractor.provenance>` gives it
            (any JSON object is accepted). Kept in ``provenance_`` and saved
            with the dictionary; its ``n_tokens`` is set to the number of rows
            of ``X`` when missing. Without it, a refitted dictionary has no
            ``provenance_``.

        Returns
        -------
        self : object

        Warns
        -----
        UserWarning
            When ``X`` has fewer than 16 rows per atom (64 for JumpReLU): a
            dictionary that wide can memorise its training rows (see
            ``docs/estimator.rst``). When
            top-k's ``k`` is not below ``n_features``: codes that dense need
            not find the data's features. When features fire on almost no
            row after training (an L0 below 0.1): the sparsity penalty is too
            strong for the data. When a quarter of the features or more fired
            on none of the last pass's worth of rows: the fit uses fewer
            features than ``n_components``. When ReLU's codes are shrunk by
            its penalty (a relative reconstruction bias above 1.47, or a
            least-squares refit of the active codes' magnitudes explaining
            0.12 more of the variance): a lower ``l1_coef``, or TopK or
            JumpReLU, reconstructs better.
        ConvergenceWarning
            When the run ends with its loss or L0 still moving.
        """
        # The scan of X's values runs in a thread beside the set-up below (the
        # model, its initialisation, the start of the copy to a GPU) and, on
        # a GPU, beside the first steps too (_scan_beside_steps); its verdict
        # comes before the fit's first statistics are read or any warning is
        # given. Leaving the block waits for the thread, however the fit ends
        # (a first error is the one reported).
        with (_restored_on_error(self),
              concurrent.futures.ThreadPoolExecutor(1, "sparse_dict-check") as checks):
            if self.warmup_fraction + self.decay_fraction > 1:
                # The two ramps would overlap: a schedule no one asked for.
                raise ValueError(
                    f"warmup_fraction ({self.warmup_fraction:g}) and decay_fraction "
                    f"({self.decay_fraction:g}) add up to more than 1: the warm-up and the "
                    "final decay would overlap. Make their sum at most 1.")
            # Reset, then train: nothing of earlier partial_fit calls is kept.
            self.__dict__.pop("_partial_random_state", None)
            X = self._validate_train_data(X, reset=True, check_values=False)
            values_checked = checks.submit(_check_values, X)
            provenance = _check_fit_provenance(provenance, X)
            replicas, device = self._replicas_and_device()
            random_state = self._shared_random_state(replicas)
            total = self._total_steps(X.shape[0])
            interval = _plain_int(self.resample_interval) or max(total // 10, 50)
            config = self._train_config(
                total_steps=total,
                warmup_steps=int(round(self.warmup_fraction * total)),
                decay_steps=int(round(self.decay_fraction * total)),
                resample_interval=interval,
                resample_until=int(0.7 * total),
            )
            trainer = self._new_trainer(X, random_state, device)
            # Opened before the model is initialised: rows bound for the GPU
            # start their copy there now, in the background.
            with trainer.open_feed(X, config) as feed:
                # The scan may yet refuse a NaN or an infinity that the
                # initial sample holds: its sums must not warn before the
                # scan's clear error ("invalid value encountered in scalar
                # subtract" did).
                with np.errstate(invalid="ignore", over="ignore"):
                    trainer.initialize(X, random_state, self.decoder_bias_init, replicas)
                # After the checks that refuse a fit: the warnings of its shape.
                verdict = _ScanVerdict(values_checked, checks,
                                       lambda: self._warn_about_shape(X, trainer, replicas))
                if replicas is not None:
                    # A NaN on one rank's rows stops every rank, named.
                    with replicas.together("checking the training data"):
                        values_checked.result()
                if replicas is not None or not _scan_beside_steps(trainer.device):
                    verdict.result()
                n_passes = self._train(trainer, X, config, random_state, total,
                                       replicas=replicas, feed=feed, verdict=verdict)
                verdict.result()  # settled by the training; a refusal raises again
                # Inside the feed: a resident copy of X serves the calibration.
                self._finish(trainer, X, config, random_state, replicas=replicas, feed=feed)
            self.n_iter_ = n_passes
            # A dictionary fitted anew is no longer the imported one.
            self.__dict__.pop("provenance_", None)
            if provenance is not None:
                self.provenance_ = provenance
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    @_trains
    def partial_fit(self, X, y=None):
        """Take one pass of training steps over ``X``, continuing from the last call.

        The first call on an unfitted estimator initialises the model from
        ``X`` (its scale and decoder bias); on a fitted one (by :meth:`fit`,
        an earlier call, or :meth:`load`) training continues from the fitted
        state: its fitted attributes as they are, with the optimiser's state
        where they are as the last call left them (attributes set since, such
        as edited atoms, are trained from with a fresh optimiser, as after
        :meth:`load` of a folder saved without ``training_state``). There is
        no final learning-rate decay, since the end of training is not known.

        A call is not judged as :meth:`fit` judges a finished run: a stream
        gets the warnings of bad training (a divergence, a fit that explains
        nothing, features that fire on almost no row) and of the first
        call's rows, but not those of shrunk codes, outlier rows, dead
        features or an unconverged run, since more calls may follow. To have
        a stream's end judged, :meth:`score` held-out rows, or compare a
        :meth:`fit` on a sample of them.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self : object
        """
        first_call = not hasattr(self, "components_")
        if not first_call:
            # scikit-learn checks the parameters at the first call only; one
            # set since (a negative learning rate, a zero batch size) would
            # train wrongly or fail deep inside.
            self._validate_params()
            fitted = self.components_.shape[0]
            if self.n_components is not None and self.n_components != fitted:
                # Training goes on from the fitted atoms, whatever the
                # parameter says (silently, before).
                raise ValueError(
                    f"This dictionary was fitted with {fitted} atoms, but n_components is now "
                    f"{self.n_components}; partial_fit goes on training the fitted atoms. Set "
                    f"n_components back to {fitted}, or call fit to train a new dictionary.")
        with _restored_on_error(self, getattr(self, "_trainer", None)):
            X = self._validate_train_data(X, reset=first_call)
            replicas, device = self._replicas_and_device()
            # One random state across calls, so that successive calls draw
            # different batch orders.
            if getattr(self, "_partial_random_state", None) is None:
                self._partial_random_state = self._shared_random_state(replicas)
            random_state = self._partial_random_state
            if first_call:
                trainer = self._new_trainer(X, random_state, device)
                # As in fit: float32 products of rows near float32's largest
                # values overflow on the way (numpy's "overflow encountered
                # in matmul"), which the sums allow for.
                with np.errstate(invalid="ignore", over="ignore"):
                    trainer.initialize(X, random_state, self.decoder_bias_init, replicas)
                self._warn_about_shape(X, trainer, replicas, rows=False)
                _warn_small_first_call(X.shape[0])
                self.n_iter_ = 0
            else:
                trainer = self._get_trainer().to(device)
            call_steps = math.ceil(X.shape[0] / self.batch_size)
            config = self._train_config(
                total_steps=None,
                warmup_steps=_PARTIAL_FIT_WARMUP_STEPS if self.warmup_fraction > 0 else 0,
                resample_interval=(_plain_int(self.resample_interval)
                                   or _PARTIAL_FIT_RESAMPLE_INTERVAL),
                # As fit's last 30%: restarted atoms train before the call
                # returns (one restarted on a call's last step left a model
                # that explained 0.60 of held-out rows instead of 0.96).
                resample_until=trainer.step + int(0.7 * call_steps),
            )
            self._train(trainer, X, config, random_state, call_steps,
                        n_passes=1, replicas=replicas, epoch_offset=self.n_iter_,
                        carried=(trainer.pass_fired.copy(), trainer.pass_rows))
            self._finish(trainer, X, config, random_state, assess=False, replicas=replicas,
                         new_rows=not first_call)
            self.n_iter_ += 1
        return self

    def _warn_about_shape(self, X, trainer, replicas, rows=True):
        """The warnings a fit's shapes call for, before its training (rank 0's alone).

        ``rows=False`` (``partial_fit``, whose calls each see a part of the
        data) leaves out the count of rows an atom.
        """
        if not _speaks(replicas):
            return
        # First: float64 rows that float32 rounds together (rows of 1e8 plus
        # a spread of 1.6) were called all the same, or repeating (852
        # "distinct" rows of 2,000), which the rounding made them; the
        # remedy is to centre them in float64.
        rounded = _warn_float32_rounding(X)
        if trainer.rows_alike() and X.shape[0] > 1:
            if rounded:
                return
            # The one thing to say: every other warning would judge a fit
            # that had nothing to fit.
            warn_at_caller(
                f"Every row of X is the same (its {X.shape[0]:,} rows differ by no more than "
                "float32's rounding): there is nothing for a dictionary to explain. The decoder "
                "bias reproduces the rows, and the features and their codes mean nothing. "
                "Check where X came from (a layer or hook point that is constant, padding "
                "tokens only).", UserWarning)
            return
        if trainer.dominant_rows is not None:
            _warn_dominant_rows(trainer.dominant_rows)
        if rows and not rounded:
            _warn_few_rows(X.shape[0], trainer.model.n_components, trainer.distinct_rows,
                           fixed_l0=self.activation == "topk", floor=self._rows_floor())
        if trainer.model.activation.uses_k:
            _warn_dense_k(self.k, X.shape[1], trainer.model.n_components)
        if self.activation == "batchtopk":
            _warn_batch_of_one(min(self.batch_size, X.shape[0]))

    def _rows_floor(self):
        """Rows an atom below which fit warns that the dictionary can memorise them."""
        return (_MIN_ROWS_PER_ATOM_JUMPRELU if self.activation == "jumprelu"
                else _MIN_ROWS_PER_ATOM)

    def _activation(self):
        """The core's sparsity mechanism for the current parameters."""
        return make_activation(
            self.activation, k=self.k, bandwidth=self.jumprelu_bandwidth
        )

    def _fitted_activation(self):
        """:meth:`_activation`, once checked to be the mechanism the weights were fitted with.

        ``set_params(activation=...)`` after a fit would otherwise read the
        weights through another mechanism (or fail on a state it lacks).
        ``k`` and the penalties may change: they are read at each call, as
        scikit-learn's ``transform_*`` parameters are.
        """
        # Files and pickles that predate the record were fitted as their
        # parameters say.
        fitted = getattr(self, "_fitted_with", self.activation)
        if fitted != self.activation:
            raise ValueError(
                f"This dictionary was fitted with activation={fitted!r}, but activation is "
                f"now {self.activation!r}; its weights are for {fitted!r}. Set activation "
                f"back to {fitted!r}, or call fit to train a new dictionary.")
        return self._activation()

    def _total_steps(self, n_samples):
        """The run's length in steps: max_iter and max_steps, or the default budget."""
        # Python ints: a numpy int8 max_iter of 100 wrapped round to 0 steps.
        batch_size, max_iter, max_steps = map(
            _plain_int, (self.batch_size, self.max_iter, self.max_steps))
        steps_per_pass = math.ceil(n_samples / batch_size)
        if max_iter is not None:
            total = max_iter * steps_per_pass
        elif max_steps is not None:
            return max_steps
        else:
            # Enough steps for small data; two passes for medium data; a
            # fixed number of rows for large data; never more than a
            # thousand passes over a tiny set.
            by_rows = min(2 * steps_per_pass, math.ceil(_DEFAULT_ROWS / batch_size))
            least = self._activation().min_default_steps
            total = min(max(least, by_rows), _MAX_DEFAULT_PASSES * steps_per_pass)
        if max_steps is not None:
            total = min(total, max_steps)
        return total

    def _train_config(self, **schedule):
        activation = self._activation()
        coef_name = activation.penalty_name
        # AuxK for the top-k family, whose dead features lose every
        # selection; resampling for the penalised mechanisms.
        auxk_coef = self.auxk_coef
        if auxk_coef == "auto":
            auxk_coef = _DEFAULT_AUXK_COEF if activation.uses_k else 0.0
        forced = not isinstance(self.sparse_step, str) and bool(self.sparse_step)
        if forced and not activation.has_sparse_step:
            raise ValueError(
                f"sparse_step=True needs activation='topk' or 'batchtopk', whose codes are "
                f"k per row; activation={self.activation!r} has no sparse training step.")
        resample = self.resample_dead
        if resample == "auto":
            resample = not activation.uses_k
        k_aux = self.k_aux or max(1, self.n_features_in_ // 2)
        return TrainConfig(
            coef=getattr(self, coef_name) if coef_name else 0.0,
            learning_rate=self.learning_rate,
            batch_size=int(self.batch_size),
            resample_dead=bool(resample),
            auxk_coef=float(auxk_coef),
            k_aux=int(k_aux),
            dead_window=schedule["resample_interval"],
            bf16=self.bf16,
            sparse_step=self.sparse_step,
            device_data_budget=float(self.device_data_budget),
            **schedule,
        )

    def _replicas_and_device(self):
        """The processes to train with (None: this one alone) and this process's device."""
        device = resolve_device(self.device)
        replicas = replicas_for(self._distributed(), device)
        return replicas, (device if replicas is None else replicas.device)

    def _distributed(self):
        """``distributed`` as ``"auto"``, True or False (a numpy bool made plain)."""
        return "auto" if self.distributed == "auto" else bool(self.distributed)

    def _shared_random_state(self, replicas):
        """The training's random state, the same on every rank."""
        if replicas is None:
            return check_random_state(self.random_state)
        if isinstance(self.random_state, Integral):
            # Each rank takes its share of one permutation: another seed on
            # one rank would make their union no real batch, silently.
            replicas.check_same(int(self.random_state), "random_state")
            return check_random_state(self.random_state)
        # None, or a RandomState instance, differs between processes: rank
        # 0's draw seeds every rank.
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return np.random.RandomState(replicas.broadcast_value(seed, "sharing the random seed"))

    def _new_trainer(self, X, random_state, device):
        """A trainer for ``X``'s width, its model drawn; the caller initialises it from ``X``."""
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        atoms = self._initial_atoms(X.shape[1])
        n_components = _plain_int(self.n_components) or (
            4 * X.shape[1] if atoms is None else atoms.shape[0])
        self._check_memory(X.shape[1], n_components, device)
        return Trainer(X.shape[1], n_components, device, seed, self._activation(), atoms=atoms)

    def _initial_atoms(self, n_features):
        """``dict_init`` checked against the data's width and ``n_components`` (or None).

        The core scales its rows to unit norm.
        """
        if self.dict_init is None:
            return None
        atoms = check_array(self.dict_init, dtype=np.float64, input_name="dict_init")
        if not atoms.flags.writeable:
            # The core wraps the array; torch warns of wrapping read-only memory.
            atoms = atoms.copy()
        expected = (self.n_components or atoms.shape[0], n_features)
        if atoms.shape != expected:
            raise ValueError(
                f"dict_init has shape {atoms.shape}; it must be (n_components, n_features) "
                f"= {expected}, one atom per row."
            )
        peak = np.abs(atoms).max(axis=1)
        zero = np.flatnonzero(peak == 0)
        if zero.size:
            raise ValueError(
                f"dict_init's row {zero[0]} is all zeros ({zero.size} all-zero rows in all): "
                "every atom needs a direction to start from."
            )
        _check_distinct_atoms(atoms)
        return atoms

    def _check_memory(self, n_features, n_components, device):
        need, have = training_bytes(n_features, n_components), device_bytes(device)
        if have is not None and need > have:
            raise ValueError(
                f"n_components={n_components} on {n_features} features needs at least "
                f"{need / 1e9:.3g} GB to train, but the {device.type} device has "
                f"{have / 1e9:.3g} GB in all. Choose a smaller n_components."
            )

    def _train(self, trainer, X, config, random_state, total, n_passes=None, replicas=None,
               feed=None, verdict=None, epoch_offset=0, carried=None):
        if n_passes is None:
            n_passes = math.ceil(total / math.ceil(X.shape[0] / self.batch_size))
        progress = None
        # One progress bar for a data-parallel fit: rank 0's.
        if self.verbose and _speaks(replicas):
            from tqdm.auto import tqdm

            progress = tqdm(total=total, desc=type(self).__name__, unit="step")
        callback = self.callback
        if self.verbose >= 2 and progress is not None:
            callback = _with_pass_lines(callback, progress)
        if epoch_offset and callback is not None:
            callback = _offset_epochs(callback, epoch_offset)
        # The host arrays of the export, their pages touched while it trains.
        trainer.prepare_export(_result_dtype(X))
        try:
            # No snapshot inside: fit discards a failed new trainer, and
            # partial_fit's _restored_on_error keeps its own.
            return trainer.train(X, n_passes, config, random_state, callback, progress, replicas,
                                 rollback=False, feed=feed, verdict=verdict, carried=carried)
        except BaseException:
            trainer.prepare_export(None)  # nothing to export: the host arrays go
            raise
        finally:
            if progress is not None:
                progress.close()

    def _finish(self, trainer, X, config, random_state, assess=True, replicas=None, feed=None,
                new_rows=False):
        """After training: calibrate, judge the run, and store the fitted state.

        Divergence raises (and the caller's context restores the estimator);
        an unconverged run, or one that uses few of its features
        (:meth:`_unused_features`), stores its result and warns. Every rank
        of a data-parallel fit judges the same history alike: the warnings
        are given once, by rank 0. ``new_rows``: ``X``'s rows join those the
        trainer has seen (a ``partial_fit`` call after the first; the first
        call's rows were counted when it initialised the model).
        """
        # Training is over: its (batch, n_components) buffers can go. The
        # weights' copy to the host runs beside the calibration (on a GPU),
        # which leaves them as they are.
        trainer.model.release_workspace()
        trainer.start_export(_result_dtype(X))
        sample = trainer.calibration_sample(X, _CALIBRATION_ROWS, random_state, feed)
        trainer.calibrate(sample, min_rows=1 if assess else _PARTIAL_CALIBRATION_MIN_ROWS)
        l0, final_error, shrinkage, tail = trainer.sample_stats(sample)
        mean_error = trainer.mean_error(sample)
        if new_rows:
            trainer.see_rows(sample, X.shape[0])
        said = {}
        # A run its callback stopped ended where its user chose.
        judge_convergence = assess and not trainer.stopped_by_callback
        for kind, message in assess_training(trainer, config, check_convergence=judge_convergence,
                                             data_variance=mean_error,
                                             final_error=final_error,
                                             final_rows=len(sample)):
            said.setdefault(kind, []).append(message)
        if "diverged" in said:
            raise DivergenceError(said["diverged"][0])
        self._trainer = trainer
        self._store_fitted(trainer, _result_dtype(X))
        self.transform_l0_ = l0
        # What transform compares new rows with (_warn_scale_shift), from the
        # calibration sample on the device: on the host, 4,096 rows of 768
        # would have added milliseconds to a short GPU fit's finish.
        self.train_distance_ = trainer.median_distance(sample)
        if _speaks(replicas) and not trainer.rows_alike():
            few = _few_rows_caveat(X.shape[0], trainer.model.n_components,
                                   getattr(trainer, "distinct_rows", None),
                                   floor=self._rows_floor())
            for message in said.get("unconverged", ()):
                warn_at_caller(message + few, ConvergenceWarning)
            poor = said.get("poor", [])
            explained = 1.0 - final_error / mean_error if mean_error > 0 else float("nan")
            for message in self._unused_features(trainer, config, len(sample), assess, poor,
                                                 explained, said.get("rose", [])):
                warn_at_caller(message, UserWarning)
            if assess and not poor and _tail_dominates(tail):
                warn_at_caller(_tail_message(tail, trainer.model.activation.uses_k),
                               UserWarning)
            # For a run that ended unconverged, only beyond what more steps
            # would mend (see _SHRINKAGE_WARN_UNCONVERGED).
            limit = (_SHRINKAGE_WARN_UNCONVERGED if "unconverged" in said
                     else _SHRINKAGE_WARN)
            if (assess and not poor
                    and self._fitted_activation().penalty_name == "l1_coef"):
                # Least squares on a support that spans much of the space fits
                # anything, so only a sparse code's gain counts (_REFIT_L0_SHARE).
                refit = (None if self._dense_code(_REFIT_L0_SHARE)
                         else trainer.refit_gain(sample))
                if refit is not None and refit[1] - refit[0] > _REFIT_GAIN_WARN:
                    warn_at_caller(_shrinkage_message(shrinkage, explained, self.l1_coef,
                                                      refit), UserWarning)
                elif shrinkage > limit:
                    warn_at_caller(_shrinkage_message(shrinkage, explained, self.l1_coef),
                                   UserWarning)

    def _unused_features(self, trainer, config, n_rows, judge_dead, poor=(),
                         explained=float("nan"), rose=()):
        """What to say of a fitted state that uses few of its features (a list, maybe empty).

        Features that fire on almost no row mean a penalty too strong; a
        quarter of them or more dead after a fit long enough to judge
        (``judge_dead``: ``fit``, not ``partial_fit``), a data set that uses
        fewer features than it was given. A fit no better than the rows'
        mean (``poor``, its messages) has likelier causes than the data's
        rank, which those messages say instead; one that explains little of
        the training rows (``explained``, their explained variance), or
        whose error ended above where it started (``rose``, the assessment's
        sentence saying so), gets the learning rate named beside the data's
        rank.
        """
        if self.transform_l0_ < _SILENT_L0:
            activation = trainer.model.activation
            return [_silent_features_message(activation.penalty_name, config.coef,
                                             self.transform_l0_, n_rows,
                                             k=self.k if activation.uses_k else None,
                                             learning_rate=config.learning_rate,
                                             explained=explained, rose=bool(rose))]
        if poor:
            return list(poor)
        n_dead = int((self.feature_frequencies_ == 0).sum())
        judged = judge_dead and trainer.step >= _DEAD_JUDGED_STEPS
        live = self.feature_frequencies_ > 0
        # Pairs in a sparse code are not the dense regime: not measured there.
        paired = (_paired_share(self.components_, live)
                  if judged and self.activation == "jumprelu" and self._dense_code() else 0.0)
        if judged and n_dead >= _DEAD_SHARE * self.n_components_:
            message = _dead_features_message(self.activation, n_dead, self.n_components_,
                                             int(trainer.pass_rows), self.transform_l0_,
                                             paired)
            # Low-rank data is reconstructed well by the features left, and
            # its error falls; features killed by steps too large leave the
            # rows unexplained, or the error above where it started.
            lower = (f"steps too large kill features so; lower learning_rate (now "
                     f"{self.learning_rate:g}), for example by a factor of 10.")
            if explained < _LITTLE_EXPLAINED:
                message += (f" The fit also explains little of its training rows (explained "
                            f"variance {explained:.2f}): " + lower)
            elif rose:
                message += f" {rose[0]}: " + lower
            return [message]
        if paired >= _PAIRED_SHARE:
            # The dense regime with fewer dead: 27 of 128 on normal noise
            # (random_state=5, 65% of the live atoms paired, L0 17.4 of 32
            # dimensions), 20 of 128 on 4-sparse superposition data at the
            # default l0_coef (56% paired, L0 17.4), where it said nothing.
            return [_dense_regime_message(self.transform_l0_, paired).strip()]
        return []

    def _dense_code(self, share=_DENSE_L0_SHARE):
        """Whether the fitted code is dense: an L0 of ``share`` of the width or more."""
        return self.transform_l0_ >= share * self.n_features_in_

    def _validate_train_data(self, X, reset, check_values=True):
        """X as training data; ``check_values=False`` leaves the scan of its values to the caller."""
        X = _prepared_input(X)
        X = validate_data(
            self,
            X,
            reset=reset,
            accept_sparse="csr",
            dtype=_accepted_dtypes(X),
            ensure_min_samples=1,
            # _check_values does it, in the same pass as its range check.
            ensure_all_finite=False,
        )
        if reset and X.shape[0] < 2:
            # A later call may be a stream's one row; the first sets the
            # scale and the decoder bias from its rows, and one row has no
            # spread to set them from.
            raise ValueError(
                "X has 1 sample, but the first training call needs at least 2: it sets the "
                "input scale and the decoder bias from its rows. Start a partial_fit stream "
                "with a few rows (a batch gives steadier estimates), then go on one row a "
                "call.")
        if check_values:
            _check_values(X)
        return X

    def _store_fitted(self, trainer, dtype):
        for name, value in trainer.export(dtype).items():
            setattr(self, name + "_", value)
        for cls in ACTIVATIONS.values():
            for name in set(cls.state_names) - set(trainer.model.activation.state_names):
                # A refit with another activation must not keep a stale state.
                self.__dict__.pop(name + "_", None)
        self.n_components_ = self.components_.shape[0]
        self.scale_ = float(trainer.scale)
        self.n_steps_ = int(trainer.step)
        # Views of the trainer's record, whose rows are never written again:
        # copying the whole record at every partial_fit call made a stream's
        # calls cost in proportion to all the steps before.
        self._show_history({name: trainer.history[:, i] for i, name in enumerate(STAT_NAMES)})
        rows = max(trainer.pass_rows, 1)
        self.feature_frequencies_ = trainer.pass_fired / rows
        self.n_resampled_ = int(trainer.n_resampled)
        self._start_fitted_state()

    def _start_fitted_state(self):
        """The private record that goes with new fitted weights (a fit, load or import)."""
        # The mechanism the weights are for, which set_params must not change.
        self._fitted_with = self.activation
        # And the settings its state was fitted for (k, a bandwidth): a
        # partial_fit with others restarts that state (BatchTopK's threshold).
        self._fitted_settings = self._activation().describe()
        # transform's LassoCoder, by its settings (_optimal_coder): filled in
        # place, so that transform leaves the estimator's attributes as they
        # were, as scikit-learn asks of it.
        self._coders = {}

    def _history_array(self):
        """``history_`` as the (steps, stats) array :meth:`_set_history` reads."""
        return np.stack([self.history_[k] for k in STAT_NAMES], axis=1)

    def _set_history(self, history):
        """``history_``, ``loss_curve_`` and ``train_l0_`` from the (steps, stats) array."""
        self._show_history({k: history[:, i].copy() for i, k in enumerate(STAT_NAMES)})

    def _show_history(self, history):
        """``history_`` (a dict of columns, made read-only), ``loss_curve_`` and ``train_l0_``.

        Read-only: after a fit the columns are views of the trainer's record,
        which judges the next ``partial_fit`` call.
        """
        for column in history.values():
            column.flags.writeable = False
        self.history_ = history
        self.loss_curve_ = history["loss"]
        tail = history["l0"][-max(1, len(history["l0"]) // 10):]
        self.train_l0_ = float(tail.mean()) if len(tail) else float("nan")

    def _fitted_tensors(self):
        """The fitted tensors by their core names (``components``, ...)."""
        activation = self._fitted_activation()
        tensors = {}
        for name in fitted_tensor_names(activation):
            if not hasattr(self, name + "_") and name in activation.state_defaults:
                # Pickled before this state existed.
                tensors[name] = np.full(self.n_components_, activation.state_defaults[name],
                                        dtype=self.components_.dtype)
            else:
                tensors[name] = getattr(self, name + "_")
                if isinstance(tensors[name], np.ndarray) and not tensors[name].flags.writeable:
                    # Read-only (a joblib.load(..., mmap_mode="r") of this
                    # estimator): the core wraps the arrays, and torch warns
                    # of wrapping read-only memory.
                    tensors[name] = tensors[name].copy()
        return tensors

    def _get_trainer(self):
        activation = self._fitted_activation()
        params = self._fitted_tensors()
        self._check_fitted_shapes(params)
        settings = activation.describe()
        # Records older than this one do not say: taken as unchanged.
        changed = getattr(self, "_fitted_settings", settings) != settings
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.model.activation.describe() != settings:
            # k or the bandwidth set since the last call: the mechanism is
            # rebuilt from the fitted attributes, with a fresh Adam, as a
            # loaded dictionary's is (the kept one would train at the old k).
            trainer = None
        if trainer is not None:
            if trainer.differs_from(params, self.scale_):
                # Fitted attributes set since the last fit (atoms edited, a
                # bias zeroed) are what transform and save use, so training
                # goes on from them too, as scikit-learn's partial_fit goes
                # on from components_; Adam starts afresh, as after load.
                trainer.load_parameters_(params, self.scale_)
        else:
            trainer = self._trainer_from_attributes(params, activation)
        if changed:
            trainer.model.activation.settings_changed_(trainer.model)
        return trainer

    def _trainer_from_attributes(self, params, activation):
        """A trainer that goes on from the fitted attributes, its record included."""
        # A dictionary loaded from disk has no optimiser state: continue
        # from its parameters with a fresh Adam.
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        trainer = Trainer.from_parameters(params, self.scale_, "cpu", int(seed), activation)
        trainer.step = int(getattr(self, "n_steps_", 0))
        trainer.resample_checked = trainer.step  # the next check an interval on
        # The record goes on where it stopped (it restarted empty: a saved
        # run's 600 steps of history_ gave way to the new call's 8, and
        # n_resampled_ counted from 0, while n_steps_ went on). Each old
        # step counts as a full batch, the rows it had being unknown.
        if getattr(self, "history_", None) is not None and len(self.history_["loss"]):
            trainer.history = self._history_array().astype(np.float64)
            trainer.history_rows = np.full(len(trainer.history), float(self.batch_size))
        trainer.n_resampled = int(getattr(self, "n_resampled_", 0))
        frequencies = getattr(self, "feature_frequencies_", None)
        if frequencies is not None and np.shape(frequencies) == (self.n_components_,):
            trainer.resume_counts_(frequencies, trainer.step * int(self.batch_size))
        return trainer

    def _check_fitted_shapes(self, params):
        """Refuse fitted attributes set by hand to another shape than the model's."""
        for name, value in params.items():
            shape = _fitted_shape(name, self.n_components_, self.n_features_in_)
            if np.shape(value) != shape:
                raise ValueError(
                    f"{name}_ has shape {np.shape(value)}, but this dictionary of "
                    f"{self.n_components_} atoms of width {self.n_features_in_} needs "
                    f"{shape}; partial_fit trains from the fitted attributes as they are."
                )

    # ------------------------------------------------------------ transforming
    @_own_precision
    def transform(self, X):
        """Encode ``X`` as non-negative sparse codes.

        With ``transform_algorithm="encoder"`` (the default) the codes come
        from the autoencoder's encoder; otherwise they are solved for row by
        row against ``components_`` (see ``transform_algorithm``). The
        encoder's biases are in the training rows' units, so ``X`` must be
        scaled as they were; where it lies far off their scale (a median
        squared distance from ``decoder_bias_`` 16 times theirs,
        ``train_distance_``, or a sixteenth; of 64 rows or more), a warning
        says so.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            Of the same float dtype as ``X`` (float32 or float64; float32 for
            float16).
        """
        check_is_fitted(self)
        X = self._validate_inference_data(X)
        self._warn_scale_shift(X)
        return self._encode(X)

    def _warn_scale_shift(self, X):
        """Warn where the encoder is given rows far from the training rows' scale."""
        # Unknown (nan) for an imported dictionary (from_saelens) and for
        # folders and pickles from before it; a solver's codes follow the
        # rows' scale.
        reference = getattr(self, "train_distance_", float("nan"))
        if (self.transform_algorithm != "encoder" or not reference > 0
                or X.shape[0] < _SCALE_SHIFT_MIN_ROWS):
            return
        ratio = _median_distance(X, self.decoder_bias_) / reference
        if 1.0 / _SCALE_SHIFT_WARN <= ratio <= _SCALE_SHIFT_WARN:
            return
        warn_at_caller(
            f"These rows are on another scale than the training rows: their median squared "
            f"distance from the decoder bias is {ratio:.3g} times the training rows'. The "
            "encoder's biases and thresholds are in the training rows' units, so its codes "
            "do not follow a change of scale (at a tenth of the scale a ReLU dictionary "
            "coded no atom at all). Prepare these rows as the training rows were (the same "
            "scaling or normalisation), or fit on rows of this scale.", UserWarning)

    @_own_precision
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
        self._check_inference_params()
        X = _tensor_as_array(X)
        # float16 codes decode in float32, as float16 inputs encode.
        codes = check_array(X, accept_sparse="csr",
                            dtype=np.float32 if _is_float16(X) else [np.float64, np.float32])
        if codes.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {codes.shape[1]} features, but {type(self).__name__} is "
                f"expecting {self.n_components_} codes (n_components_) as input."
            )
        return self._decode(codes)

    @_own_precision
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
        from sparse_dict.metrics import _explained_variance

        check_is_fitted(self)
        # Validated once here; transform and inverse_transform would each
        # validate (and scan for NaN) again.
        X = self._validate_inference_data(X)
        self._warn_scale_shift(X)
        # Reconstructed a block of rows at a time, as the metric reads them:
        # data larger than memory, which fit streams, is scored the same way.
        # The weights (or the solver's coder) are prepared once, not a block.
        if self.transform_algorithm == "encoder":
            reconstruct = reconstructor(self._fitted_tensors(), self._fitted_activation(),
                                        _INFERENCE_BATCH, resolve_device(self.device),
                                        _result_dtype(X))
            return float(_explained_variance(X, lambda rows: reconstruct(X[rows])))
        from sparse_dict.coding import _unconverged_rows_said

        coder = self._optimal_coder()
        # Unconverged rows said once for the call, as transform says them (a
        # warning a block gave hundreds on a large memmap).
        # Float16 rows coded in float32, as transform codes them (the codes
        # came out float16, and decoding into them failed in torch).
        dtype = _result_dtype(X)
        with _unconverged_rows_said(coder.transform_max_iter, X.shape[0]):
            return float(_explained_variance(
                X, lambda rows: self._decode(coder._code(X[rows].astype(dtype, copy=False)))))

    def _check_inference_params(self):
        """Check the parameters read at each call, as fit checks them.

        ``k`` and the ``transform_*`` parameters may change after a fit (as
        scikit-learn's ``transform_*`` do); a value fit would refuse is
        refused here by its own name, not by torch or by LassoCoder under
        theirs.
        """
        validate_parameter_constraints(
            {name: self._parameter_constraints[name] for name in _INFERENCE_PARAMS},
            {name: getattr(self, name) for name in _INFERENCE_PARAMS},
            caller_name=type(self).__name__)

    def _validate_inference_data(self, X):
        self._check_inference_params()
        X = _prepared_input(X)
        return validate_data(
            self, X, reset=False, accept_sparse="csr", dtype=_accepted_dtypes(X)
        )

    def _encode(self, X):
        if self.transform_algorithm != "encoder":
            # Sparse rows too, made dense a block at a time by the coder.
            return self._optimal_coder().transform(X)
        return encode_array(
            self._fitted_tensors(), self._fitted_activation(), X,
            _INFERENCE_BATCH, resolve_device(self.device), _result_dtype(X),
        )

    def _transform_alpha(self):
        """``transform_alpha`` in the units of X: by default 1 in the training units."""
        if self.transform_alpha is not None:
            return self.transform_alpha
        # 1.0 in X's units (scikit-learn's default) coded data of scale 100
        # densely (EV 1.00, half the atoms on) and data of scale 0.1 with
        # no atom at all (EV -0.01), with the same atoms; the encoder and
        # the training penalties work in units where X's rows have a mean
        # squared norm of n_features, which this follows.
        return 1.0 / self.scale_

    def _optimal_coder(self):
        """The LassoCoder for ``transform_algorithm``, built once per fit and settings."""
        # Fitted attributes set by hand, or an old pickle: no cache, since
        # transform must add no attribute.
        coders = getattr(self, "_coders", {})
        # And by the atoms and bias it codes against: set (or edited in place)
        # after the first transform, they were ignored by the cached coder
        # while inverse_transform, save and the encoder used them (a score of
        # 0.09 in memory, 0.86 once saved and loaded). A checksum reads the
        # atoms once, little beside a solver's transform.
        settings = (self.transform_algorithm, self.transform_n_nonzero_coefs, self.transform_alpha,
                    self.transform_max_iter,
                    self.activation, self.k, self.scale_, _checksum(self.components_),
                    _checksum(self.decoder_bias_))
        coder = coders.get(settings)
        if coder is None:
            from sparse_dict.coding import LassoCoder

            n_nonzero = _plain_int(self.transform_n_nonzero_coefs)
            if n_nonzero is None and self.transform_algorithm == "omp":
                if self._fitted_activation().uses_k:
                    n_nonzero = int(self.k)
                else:
                    l0 = getattr(self, "transform_l0_", 1.0)
                    if not np.isfinite(l0):
                        raise ValueError(
                            "transform_algorithm='omp' takes its number of active atoms from "
                            "the encoder's mean L0 on the training data (transform_l0_), which "
                            "is not known for this dictionary (read from SAELens); set "
                            "transform_n_nonzero_coefs.")
                    n_nonzero = max(1, int(round(l0)))
            # Its codes are this estimator's to wrap: a global
            # set_output(transform="pandas") must not make them a DataFrame here.
            lasso = LassoCoder(
                self.components_,
                algorithm=self.transform_algorithm,
                alpha=self._transform_alpha(),
                n_nonzero_coefs=n_nonzero,
                offset=self.decoder_bias_,
                transform_max_iter=int(self.transform_max_iter),
            )
            width = np.zeros((1, self.n_features_in_), dtype=self.components_.dtype)
            coder = lasso.set_output(transform="default").fit(width)
            # One at a time: each holds the dictionary's Gram matrix.
            coders.clear()
            coders[settings] = coder
        return coder

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
    def __getstate__(self):
        state = super().__getstate__()
        if getattr(self, "_coders", None):
            # The solvers' coders hold a float64 Gram matrix of the atoms
            # (n_components squared: 8.6 GB at 32,768 atoms), rebuilt on the
            # first transform; pickles, joblib's copies and deep copies
            # carried it (4.3 MB grew to 38 MB at 2,048 atoms).
            state = dict(state, _coders={})
        trainer = state.get("_trainer")
        if trainer is not None:
            # What partial_fit goes on from, as the plain arrays and numbers
            # that save(training_state=True) writes, not as torch objects:
            # skops, which trusts numpy's types and not torch's, could not
            # hold a fitted estimator (nor a Pipeline holding one).
            state = dict(state, _trainer=None, _trainer_state=(
                _resume.resume_state(trainer), trainer.model.activation.describe()))
        return state

    def __setstate__(self, state):
        state = dict(state)
        packed = state.pop("_trainer_state", None)
        super().__setstate__(state)
        if packed is not None:
            self._trainer = self._unpacked_trainer(*packed)
        if "components_" in state:
            # A fitted model runs here, on the CPU where it was fitted on a
            # GPU this machine lacks. An unfitted one keeps its parameter, as
            # clone and deepcopy promise: joblib pickles the clones it sends
            # to worker processes, and n_jobs=2 trained device="cuda" on the
            # CPU where n_jobs=1 raised fit's error.
            self.device = _device_here(state.get("device", "auto"))
        # Pickles from before the parameter: scikit-learn's default.
        self.__dict__.setdefault("transform_max_iter", 1000)

    def _unpacked_trainer(self, arrays_numbers, settings):
        """The trainer :meth:`__getstate__` packed, or None where it no longer applies.

        None where the parameters were set to another mechanism since it
        trained (``set_params(k=...)``): :meth:`_get_trainer` then builds one
        from the fitted attributes, as it would have from the unpacked one.
        """
        try:
            activation = self._fitted_activation()
        except (ValueError, TypeError):
            return None
        if activation.describe() != settings:
            return None
        arrays, numbers = arrays_numbers
        return _resume.trainer_from_state(Trainer, arrays, numbers, activation,
                                          self._history_array())

    def save(self, path, *, overwrite=False, training_state=False):
        """Save the fitted dictionary to a folder: safetensors weights and JSON.

        Nothing is pickled, so a saved dictionary can be shared and loaded
        safely. :meth:`load` gives a model that transforms identically. With
        ``training_state=True`` its :meth:`partial_fit` also goes on exactly
        as this one's would, as after a pickle; without it, training goes on
        from the weights with a fresh optimiser, which takes another course
        (a JumpReLU stream saved and loaded after 80 of its 1,200 steps ended
        with 38% of its features silent, against 0.8% unsaved). Parameters
        that JSON cannot hold are not saved: ``callback`` (a function) loads
        as None, and so does a ``random_state`` that is a ``RandomState``
        instance, with a warning (an int is kept).

        The folder is written under a temporary name beside ``path`` and
        renamed into place only once complete, so a failed or interrupted save
        leaves nothing behind, and of several processes saving to the same new
        path at once exactly one succeeds. Permissions follow the umask.

        Parameters
        ----------
        path : str or path-like
            The folder to write (``config.json`` and ``weights.safetensors``).
            It must not exist, or be an empty folder.
        overwrite : bool, default=False
            Replace an existing saved dictionary. Only a folder written by
            :meth:`save` is ever replaced, never any other file or folder; the
            old dictionary is swapped for the new one once the new one is
            completely written.
        training_state : bool, default=False
            Also save what further training goes on from, in a third file
            (``training_state.safetensors``, about three times the size of
            float32 weights, one and a half times float64 ones, since
            training is in float32): the model in its training units,
            Adam's moments and step counts, the generators of resampling
            and of :meth:`partial_fit`'s batch order, and the counts that
            tell which features are dead. A checkpoint of a long
            :meth:`partial_fit` stream needs it; a dictionary to share does
            not, and a folder shared without that file loads as one saved
            without it.

        Returns
        -------
        path : pathlib.Path

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is False, or if it is not a
            saved dictionary.
        ValueError
            If a parameter or a fitted attribute set since the fit holds a
            value :meth:`load` would refuse (atoms of another dtype than the
            rest, a NaN, a scale of 0): the folder is read back before it is
            put in place, and ``path`` is left as it was.

        Notes
        -----
        In a data-parallel run (see ``distributed``) every rank holds the
        same dictionary and only rank 0 writes: on the other ranks this
        method returns ``path`` at once without writing or waiting, so it
        may be called on every rank or on rank 0 alone. A rank that needs
        the folder afterwards waits for rank 0 itself (a barrier).
        """
        check_is_fitted(self)
        path = _persist.user_path(path)
        if not isinstance(training_state, (bool, np.bool_)):
            raise TypeError(f"training_state must be True or False, got {training_state!r}.")
        # load checks every parameter as fit would: a value set after the fit
        # that fit would refuse is refused here, before anything is written,
        # rather than saved into a folder that cannot be loaded (and that
        # overwrite=True would have put in place of a good one).
        self._validate_params()
        self._fitted_activation()
        if not self.device.startswith("cuda"):  # a GPU's name loads on a CPU, with a warning
            resolve_device(self.device)
        if not is_writer(self._distributed()):
            return path
        # numpy scalars (a search's grid gives them) as the plain numbers
        # JSON holds.
        params = {name: value.item() if isinstance(value, np.generic) else value
                  for name, value in self.get_params().items()}
        params["callback"] = None
        # An array: kept in the weights file (below), not in the JSON.
        params["dict_init"] = None
        if not (params["random_state"] is None or isinstance(params["random_state"], Integral)):
            further = ("its partial_fit goes on in the batch order saved with its training "
                       "state, but a new fit draws other batches" if training_state
                       else "further training draws other batches")
            warn_at_caller(
                "random_state is a RandomState instance, which a saved folder cannot hold: "
                f"the loaded dictionary has random_state=None ({further}). Set an int "
                "random_state before saving to keep one.", UserWarning)
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
        if hasattr(self, "provenance_"):
            attributes["provenance_"] = _persist.json_value(self.provenance_, "provenance_")
        # set_output's choice, which a pickle keeps too.
        output = getattr(self, "_sklearn_output_config", {}).get("transform")
        if output is not None:
            attributes["set_output"] = str(output)
        from sparse_dict._version import __version__

        config = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "sparse_dict_version": __version__,
            "params": params,
            "attributes": attributes,
        }
        # JSON has no NaN: an L0 that was never measured is saved as null.
        attributes["train_l0_"] = _finite_or_none(self.train_l0_)
        attributes["transform_l0_"] = _finite_or_none(self.transform_l0_)
        attributes["train_distance_"] = _finite_or_none(
            getattr(self, "train_distance_", float("nan")))
        # The settings the mechanism's state was fitted for: a BatchTopK
        # whose k was set since restarts its threshold at the next
        # partial_fit, after load as before it (loaded, it kept the old one).
        attributes["fitted_settings"] = getattr(self, "_fitted_settings",
                                                self._fitted_activation().describe())
        tensors = dict(self._fitted_tensors())
        tensors["feature_frequencies"] = np.asarray(self.feature_frequencies_, dtype=np.float64)
        tensors["history"] = self._history_array()
        if self.dict_init is not None:
            tensors["dict_init"] = check_array(self.dict_init, dtype=[np.float64, np.float32],
                                               input_name="dict_init")
        extra_files = None
        if training_state:
            arrays, config["training_state"] = self._training_state()
            extra_files = {_TRAINING_STATE_FILE: arrays}
        return _persist.write_folder(
            path, config, tensors, kind=SAVED_DICTIONARY, overwrite=overwrite,
            config_name=_CONFIG_FILE, weights_name=_WEIGHTS_FILE, extra_files=extra_files,
            # Fitted attributes set by hand (atoms of another dtype, a
            # negative threshold, NaN) save as they are; load would refuse
            # them, so the folder is read back before it goes in place.
            verify=_loads_back,
        )

    @classmethod
    def load(cls, path, *, device=None):
        """Load a dictionary written by :meth:`save`.

        The whole folder is checked first: every field of the configuration
        (its type and range), every tensor (its name, shape, dtype and that
        its values are finite), and that neither file changed since it was
        saved. A dictionary saved with a CUDA device loads on a machine
        without one on the CPU, with a warning.

        Parameters
        ----------
        path : str or path-like
        device : str, default=None
            Override the saved ``device`` parameter (for example ``"cpu"``);
            checked now.

        Returns
        -------
        estimator : SparseAutoencoderDictionary

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If ``path`` is not a complete, undamaged saved dictionary; the
            message names the file and the field. Also for a ``device`` this
            machine does not have, or that names no device.
        """
        path = _persist.user_path(path)
        return _persist.read_whole(path, lambda: cls._load_once(path, device))

    @classmethod
    def _load_once(cls, path, device):
        config = _persist.read_config(
            path, config_name=_CONFIG_FILE, weights_name=_WEIGHTS_FILE,
            optional=(_TRAINING_STATE_FILE,),
            other_layout=("cfg.json", "a folder in SAELens' layout, which "
                                      f"{cls.__name__}.from_saelens reads"))
        try:
            return cls._load_config(path, config, device)
        except ValueError as exc:
            # A newer release may save fields of its own within the same
            # format (parameters were added so): say so, not only that a
            # field is unexpected.
            written = config.get("sparse_dict_version")
            if "unexpected" in str(exc) and _newer_than_this(written):
                from sparse_dict._version import __version__

                raise ValueError(f"{exc}. It was written by sparse_dict {written}, newer than "
                                 f"this {__version__}: upgrade sparse_dict to load it.") from None
            raise

    @classmethod
    def _load_config(cls, path, config, device):
        """The estimator a saved folder's checked ``config`` and weights describe."""
        file = path / _CONFIG_FILE
        if config.get("format") != _FORMAT:
            raise ValueError(f"{file} does not describe a {cls.__name__}.")
        version = _persist.Integer(1).check(config.get("format_version"), file, "format_version")
        if version > _FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer sparse_dict (format {version}); "
                "upgrade sparse_dict to load it."
            )
        if version >= 2 and _persist.INTEGRITY_KEY not in config:
            # Only folders saved before integrity records existed (format 1)
            # lack one; without this, deleting it skipped every checksum.
            raise ValueError(
                f"{file}: its integrity record (field {_persist.INTEGRITY_KEY!r}) is missing, "
                f"though every folder of format {version} has one: the file was edited by "
                f"hand or damaged. {_persist.EDIT_HINT}")
        unknown = set(config) - {"format", "format_version", "sparse_dict_version", "params",
                                 "attributes", "training_state", _persist.INTEGRITY_KEY}
        if unknown:
            raise ValueError(f"{file}: unexpected field {sorted(unknown)[0]!r}")
        raw = _persist.config_field(config, "attributes", file)
        attrs = {
            key: spec.check(_persist.config_field(raw, key, file, f"attributes.{key}", object),
                            file, f"attributes.{key}")
            for key, spec in _SAVED_ATTRIBUTES.items()
        }
        # Added in format 2; null when never measured.
        # train_distance_ since 0.1.0's fortieth session; null when unknown.
        for key in ("train_l0_", "transform_l0_", "train_distance_"):
            if raw.get(key) is not None:
                attrs[key] = _persist.Real(0.0).check(raw[key], file, f"attributes.{key}")
        n_components, n_features = attrs["n_components_"], attrs["n_features_in_"]
        names = raw.get("feature_names_in_")
        if names is not None:
            _persist.Strings().check(names, file, "attributes.feature_names_in_")
            if len(names) != n_features:
                raise ValueError(f"{file}: field 'attributes.feature_names_in_' has "
                                 f"{len(names)} names for {n_features} features")
        provenance = raw.get("provenance_")
        if provenance is not None:
            from sparse_dict.saelens import check_provenance

            check_provenance(provenance, file)
        output = raw.get("set_output")
        if output is not None:
            _persist.OneOf(("default", "pandas", "polars")).check(
                output, file, "attributes.set_output")
        unknown = set(raw) - set(_SAVED_ATTRIBUTES) - {
            "feature_names_in_", "train_l0_", "transform_l0_", "train_distance_", "provenance_",
            "set_output", "fitted_settings"}
        if unknown:
            raise ValueError(f"{file}: unexpected field 'attributes.{sorted(unknown)[0]}'")
        params = dict(_persist.config_field(config, "params", file))
        if version < 2:
            # Format 1 stored the defaults of its time: 20 passes, resampling.
            params.setdefault("max_iter", 20)
        # params.n_components may differ from the fitted n_components_: it
        # is the next fit's (set_params after a fit), as a pickle keeps it.
        estimator = cls._from_saved_params(params, file, device)
        # Format 1 had no AuxK column in the history.
        history_width = len(STAT_NAMES) if version >= 2 else _V1_HISTORY_WIDTH
        activation = estimator._activation()
        fitted_names = fitted_tensor_names(activation)
        tensors = _persist.read_tensors(
            path / _WEIGHTS_FILE,
            _saved_tensor_schema(fitted_names, n_components, n_features, attrs["dtype"],
                                 history_width, optional=activation.state_defaults),
        )
        for name, fill in activation.state_defaults.items():
            if name not in tensors:  # saved before this state existed
                tensors[name] = np.full(n_components, fill, dtype=attrs["dtype"])
        for name in fitted_names:
            setattr(estimator, name + "_", tensors[name])
        estimator.feature_frequencies_ = tensors["feature_frequencies"].astype(np.float64)
        if "dict_init" in tensors:
            estimator.dict_init = tensors["dict_init"]
        history = tensors["history"].astype(np.float64)
        if history.shape[1] < len(STAT_NAMES):
            pad = np.zeros((history.shape[0], len(STAT_NAMES) - history.shape[1]))
            history = np.concatenate([history, pad], axis=1)
        estimator._set_history(history)
        estimator._start_fitted_state()
        estimator.train_l0_ = attrs.get("train_l0_", estimator.train_l0_)
        estimator.transform_l0_ = attrs.get("transform_l0_", estimator.train_l0_)
        estimator.train_distance_ = attrs.get("train_distance_", float("nan"))
        estimator.n_features_in_ = n_features
        estimator.n_components_ = n_components
        estimator.n_iter_ = attrs["n_iter_"]
        estimator.n_steps_ = attrs["n_steps_"]
        estimator.scale_ = attrs["scale_"]
        estimator.n_resampled_ = attrs["n_resampled_"]
        if names is not None:
            estimator.feature_names_in_ = np.asarray(names, dtype=object)
        if provenance is not None:
            estimator.provenance_ = provenance
        if output is not None:
            estimator.set_output(transform=output)
        settings = raw.get("fitted_settings")
        if settings is not None:
            estimator._fitted_settings = _checked_settings(settings, activation, file)
        # Absent from a folder shared without it: training goes on afresh.
        if "training_state" in config and (path / _TRAINING_STATE_FILE).is_file():
            record = config.get(_persist.INTEGRITY_KEY)
            if record is not None and _TRAINING_STATE_FILE not in record.get("files", {}):
                # Its checksum deleted, any file of that name was read.
                raise ValueError(
                    f"{file}: field {_persist.INTEGRITY_KEY!r} records no checksum of "
                    f"{_TRAINING_STATE_FILE}, though every folder saved with a training "
                    f"state has one: the file was edited by hand or damaged. "
                    f"{_persist.EDIT_HINT}")
            estimator._load_training_state(path / _TRAINING_STATE_FILE,
                                           config["training_state"], file)
        return estimator

    def _training_state(self):
        """What partial_fit goes on from, as arrays and a JSON object (save's training_state)."""
        random_state = getattr(self, "_partial_random_state", None)
        if random_state is None and isinstance(self.random_state, np.random.RandomState):
            # The next partial_fit takes its batch order from this instance,
            # which the folder cannot hold as a parameter.
            random_state = self.random_state
        drawn = (self.random_state.get_state()
                 if isinstance(self.random_state, np.random.RandomState) else None)
        try:
            trainer = self._get_trainer()
            # Where the batch order is the caller's RandomState, it goes on
            # after the seed that rebuilding drew (the loaded trainer makes
            # no such draw): saved as the next partial_fit would find it.
            order = random_state.get_state() if random_state is not None else None
        finally:
            # A trainer rebuilt from the attributes draws its seed from the
            # caller's RandomState: saving must not move it (the next
            # partial_fit makes that same draw).
            if drawn is not None:
                self.random_state.set_state(drawn)
        arrays, numbers = _resume.resume_state(trainer)
        if order is not None:
            _, key, position, has_gauss, gauss = order
            arrays["batch_order_key"] = np.asarray(key, dtype=np.uint32)
            numbers["batch_order"] = {"position": int(position), "has_gauss": int(has_gauss),
                                      "cached_gaussian": float(gauss)}
        return arrays, numbers

    def _load_training_state(self, file, raw, config_file):
        """Set the trainer (and partial_fit's batch order) from a saved training state."""
        if not isinstance(raw, dict):
            raise ValueError(f"{config_file}: field 'training_state' must be a JSON object")
        unknown = set(raw) - set(_resume.NUMBERS) - {"batch_order"}
        if unknown:
            raise ValueError(
                f"{config_file}: unexpected field 'training_state.{sorted(unknown)[0]}'")
        specs = {"count": _persist.Integer(0), "amount": _persist.Real(0.0),
                 "positive": _persist.Real(0.0, inclusive=False)}
        numbers = {}
        for name, (kind, nullable) in _resume.NUMBERS.items():
            where = f"training_state.{name}"
            if name not in raw:
                raise ValueError(f"{config_file}: field {where!r} is missing")
            value = raw[name]
            numbers[name] = (None if value is None and nullable
                             else specs[kind].check(value, config_file, where))
        order = raw.get("batch_order")
        if order is not None:
            order = _persist.config_field(raw, "batch_order", config_file,
                                          "training_state.batch_order")
            checks = {"position": _persist.Integer(0), "has_gauss": _persist.Integer(0),
                      "cached_gaussian": _persist.Real()}
            if set(order) != set(checks):
                raise ValueError(f"{config_file}: field 'training_state.batch_order' must hold "
                                 f"exactly {sorted(checks)}")
            order = {key: check.check(order[key], config_file, f"training_state.batch_order.{key}")
                     for key, check in checks.items()}
            if order["position"] > _MT_KEY_LENGTH or order["has_gauss"] > 1:
                raise ValueError(f"{config_file}: field 'training_state.batch_order' holds no "
                                 "state of a RandomState")
        activation = self._fitted_activation()
        schema = {
            name: _persist.TensorSpec(shape, (dtype,), minimum=minimum, optional=optional)
            for name, (shape, dtype, optional, minimum) in _resume.state_schema(
                self.n_features_in_, self.n_components_, activation).items()}
        schema["batch_order_key"] = _persist.TensorSpec(
            (_MT_KEY_LENGTH,), ("uint32",), optional=order is None)
        arrays = _persist.read_tensors(file, schema)
        if order is None and "batch_order_key" in arrays:
            raise ValueError(f"{file}: tensor 'batch_order_key' is not described in "
                             f"{config_file.name}'s field 'training_state.batch_order'")
        try:
            trainer = _resume.trainer_from_state(Trainer, arrays, numbers, activation,
                                                 self._history_array())
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from None
        if not _resume.holds_weights(trainer, self._fitted_tensors(), self.scale_):
            raise ValueError(f"{file}: the model it holds is not the dictionary in "
                             f"{_WEIGHTS_FILE}: the files are of different saves")
        self._trainer = trainer
        if order is not None:
            random_state = np.random.RandomState()
            random_state.set_state(("MT19937", arrays["batch_order_key"], order["position"],
                                    order["has_gauss"], order["cached_gaussian"]))
            self._partial_random_state = random_state

    @classmethod
    def from_saelens(cls, path, *, norm_scaling_factor=None, device=None):
        """A fitted dictionary from a sparse autoencoder saved by SAELens.

        Reads a SAELens 6 folder (``cfg.json`` and
        ``sae_weights.safetensors``) of architecture ``"standard"``,
        ``"topk"`` or ``"jumprelu"`` (SAELens saves BatchTopK SAEs as
        JumpReLU with one shared threshold; a BatchTopK training checkpoint
        reads as that JumpReLU SAE), and folds its settings into this
        package's form exactly; see :mod:`sparse_dict.saelens`. Every field
        and tensor is checked; SAELens itself is not needed.

        ``inverse_transform(transform(X))`` equals SAELens' ``decode(encode(X))``.
        The atoms are the decoder's rows at unit norm, so each code is
        SAELens' code times its atom's norm (as after SAELens'
        ``fold_W_dec_norm``; for ``"topk"`` with
        ``rescale_acts_by_decoder_norm`` SAELens' codes already are these).

        Parameters
        ----------
        path : str or path-like
        norm_scaling_factor : float, optional
            For ``normalize_activations="expected_average_only_in"``: the
            factor the inputs were multiplied by in training (SAELens lists
            it for its pretrained releases), folded into the weights so that
            the dictionary takes raw activations. Read from the folder's
            ``activation_scaler.json`` when absent; without either, the SAE
            is used as is (as SAELens' ``load_from_disk`` does) with a warning.
        device : str, default=None
            The ``device`` parameter of the result (``"auto"`` when None).

        Returns
        -------
        estimator : SparseAutoencoderDictionary
            Fitted, with ``provenance_`` holding the SAE's metadata (model,
            hook, layer, ...) and what was folded; a folder that
            :meth:`to_saelens` wrote from a dictionary fitted on an
            extractor's activations gives back that dictionary's
            ``provenance_``, so the analysis tools know its model and hook
            point.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the folder is damaged or incomplete, or uses an architecture,
            normalisation or field this package cannot reproduce exactly; the
            message names the file and the field.

        See Also
        --------
        to_saelens : Write a dictionary in SAELens' format.

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from sparse_dict import SparseAutoencoderDictionary
        >>> X = np.random.default_rng(0).normal(size=(64, 6))
        >>> est = SparseAutoencoderDictionary(n_components=12, max_steps=20,
        ...                                   random_state=0).fit(X)
        >>> folder = est.to_saelens(Path(tempfile.mkdtemp()) / "sae")
        >>> back = SparseAutoencoderDictionary.from_saelens(folder)
        >>> bool(np.allclose(back.transform(X), est.transform(X), atol=1e-5))
        True
        """
        from sparse_dict.saelens import read_saelens

        path = _persist.user_path(path)
        read = _persist.read_whole(
            path, lambda: read_saelens(path, norm_scaling_factor=norm_scaling_factor))
        tensors = read["tensors"]
        n_components, n_features = tensors["components"].shape
        if device is not None:
            resolve_device(device)  # as load checks it
        params = {"n_components": n_components, "activation": read["activation"],
                  "device": "auto" if device is None else device}
        if read["k"] is not None:
            params["k"] = read["k"]
        estimator = cls(**params)
        dtype = np.dtype(read["dtype"])
        for name, value in tensors.items():
            setattr(estimator, name + "_", value.astype(dtype))
        frequencies = read["frequencies"]
        # Unknown, not 0 ("dead"), until partial_fit counts them.
        estimator.feature_frequencies_ = (
            np.full(n_components, np.nan) if frequencies is None else frequencies)
        estimator.n_features_in_ = n_features
        estimator.n_components_ = n_components
        estimator.n_iter_ = estimator.n_steps_ = estimator.n_resampled_ = 0
        # The weights are in input units already; training would go on there.
        estimator.scale_ = 1.0
        estimator._set_history(np.zeros((0, len(STAT_NAMES))))
        estimator._start_fitted_state()
        estimator.transform_l0_ = float("nan")
        estimator.train_distance_ = float("nan")  # its training rows are unknown
        estimator.provenance_ = read["provenance"]
        return estimator

    def to_saelens(self, path, *, overwrite=False):
        """Write the dictionary as a SAELens 6 folder (``cfg.json``, ``sae_weights.safetensors``).

        Known ``feature_frequencies_`` go in ``sparsity.safetensors`` too, as
        SAELens' training writes it (``log10`` of each; see
        :mod:`sparse_dict.saelens`), so that :meth:`from_saelens` gives them
        back.

        SAELens' ``SAE.load_from_disk`` opens it as ``"standard"`` (ReLU),
        ``"topk"`` or ``"jumprelu"`` (JumpReLU, and BatchTopK with its one
        threshold), and its ``decode(encode(X))`` equals
        ``inverse_transform(transform(X))``, with
        ``apply_b_dec_to_input=True`` and ``normalize_activations="none"``.
        A dictionary imported by :meth:`from_saelens` keeps its metadata
        (model, hook, layer). A dictionary fitted on an extractor's
        activations keeps its ``provenance_`` under the metadata key
        ``sparse_dict_provenance`` (SAELens keeps any metadata key), and its
        ``max_length`` as ``context_size``. Written safely as :meth:`save`
        writes.

        Parameters
        ----------
        path : str or path-like
            A folder that does not exist, or is empty.
        overwrite : bool, default=False
            Replace a folder that ``to_saelens`` wrote earlier (never any other).

        Returns
        -------
        path : pathlib.Path

        Raises
        ------
        ValueError
            For settings SAELens cannot express: a ``transform_algorithm``
            other than ``"encoder"``.
        FileExistsError
            If ``path`` exists and may not be replaced.

        Notes
        -----
        As :meth:`save`, only rank 0 of a data-parallel run writes.
        """
        from sparse_dict.saelens import write_saelens

        check_is_fitted(self)
        if self.transform_algorithm != "encoder":
            raise ValueError(
                f"transform_algorithm={self.transform_algorithm!r} cannot be written for "
                "SAELens, which codes with the encoder only; set "
                "transform_algorithm='encoder' first."
            )
        path = _persist.user_path(path)
        if not is_writer(self._distributed()):
            return path
        return write_saelens(path, self.activation, self.k, self._fitted_tensors(),
                             _persist.json_value(getattr(self, "provenance_", None),
                                                 "provenance_"),
                             frequencies=self.feature_frequencies_, overwrite=overwrite)

    @classmethod
    def _from_saved_params(cls, params, file, device):
        """An estimator of the saved ``params``, each checked as ``fit`` would."""
        known = cls._get_param_names()
        for name in params:
            if name not in known:
                raise ValueError(f"{file}: unexpected field 'params.{name}'")
        # Parameters added after the folder was saved keep their defaults.
        estimator = cls(**params)
        try:
            estimator._validate_params()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{file}: field 'params': {exc}") from None
        if device is not None:
            # Asked for by name, so checked now: a GPU this machine lacks, or a
            # misspelt device, is an error at load rather than at transform.
            resolve_device(device)
            estimator.device = device
            return estimator
        estimator.device = _device_here(estimator.device)
        if not estimator.device.startswith("cuda"):
            try:
                resolve_device(estimator.device)
            except ValueError as exc:
                raise ValueError(f"{file}: field 'params.device': {exc}") from None
        return estimator
