"""SAELens' on-disk format: reading its sparse autoencoders, writing ours in it.

SAELens (6.x) saves an SAE as a folder holding ``cfg.json`` and
``sae_weights.safetensors``. This module translates such a folder into the
fitted tensors of this package, and back, with pure functions of arrays and
dicts; :meth:`sparse_dict.SparseAutoencoderDictionary.from_saelens` and
:meth:`~sparse_dict.SparseAutoencoderDictionary.to_saelens` are thin wrappers around
them. SAELens itself is never imported.

SAELens' inference equations (for the architectures read here)::

    h     = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    f     = ReLU(h)                                   # "standard"
          = ReLU(h) * (h > threshold)                 # "jumprelu" (and BatchTopK,
                                                      #  a checkpoint's too: below)
          = TopK(ReLU)(h)                             # "topk"
          = TopK(ReLU)(h * ||W_dec||) ...             # "topk", rescale_acts_by_decoder_norm
    x_hat = f @ W_dec + b_dec                        (f / ||W_dec|| @ W_dec when rescaled)

This package's form is ``act((x - b_dec) @ W_enc.T + b_enc)`` and
``codes @ components + b_dec`` with unit-norm atoms. The translation folds,
in float64, and each step is exact in real arithmetic:

- ``apply_b_dec_to_input=False``: ``b_enc += W_enc.T @ b_dec``, so the
  subtraction of ``b_dec`` before encoding is cancelled.
- ``normalize_activations="expected_average_only_in"`` with a known scaling
  factor ``s``: as SAELens' ``fold_activation_norm_scaling_factor``,
  ``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``.
- decoder norms ``n_i``: atom ``i`` is divided by ``n_i`` and encoder row,
  encoder bias and threshold multiplied by it, so code ``i`` is SAELens' code
  times ``n_i`` (ReLU and JumpReLU are positively homogeneous). TopK chooses
  on the unscaled pre-activations, so it also keeps ``selection_scale = 1 /
  n`` (the choice is made on ``pre / n``); with
  ``rescale_acts_by_decoder_norm`` SAELens already chooses on the rescaled
  values and its codes are already those of unit-norm atoms.

Writing does the reverse: ``apply_b_dec_to_input=True``,
``normalize_activations="none"``, and unit-norm atoms (TopK with a selection
scale writes atoms of norm ``1 / selection_scale``, which SAELens' plain
``"topk"`` selects on exactly as this package does).

Firing frequencies go in ``sparsity.safetensors`` as SAELens keeps them: one
tensor ``"sparsity"`` of ``log10`` of each feature's frequency. SAELens
computes ``log10(frequency + 1e-10)``, so a feature that never fired is
stored as -10; this module writes ``log10(max(frequency, 1e-10))`` (the same
floor, and the known frequencies back to a unit in the last place) and
reads a value at that floor as 0.
"""

import json
from pathlib import Path

import numpy as np

from sparse_dict import _persist
from sparse_dict._version import version_tuple
from sparse_dict._warn import warn_at_caller

__all__ = ["SAELENS_FOLDER", "check_provenance", "is_saelens_folder", "read_saelens",
           "saelens_tensors", "write_saelens"]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SCALER_FILE = "activation_scaler.json"
# What written folders declare: the first SAELens version of this layout.
WRITTEN_FORMAT_VERSION = "6.0.0"

ARCHITECTURES = ("standard", "topk", "jumprelu")
# SAELens architectures that exist but whose equations this package lacks.
_OTHER_ARCHITECTURES = (
    "gated", "abstopk", "transcoder",
    "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "temporal",
    "matching_pursuit",
)
_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16",
           "bfloat16": "bfloat16"}
_DTYPES.update({"torch." + k: v for k, v in list(_DTYPES.items())})
_NORMALIZATIONS = ("none", "expected_average_only_in")
_UNSUPPORTED_NORMALIZATIONS = {
    "constant_norm_rescale": "it rescales every row to a fixed norm at run time",
    "layer_norm": "it standardises every row at run time",
    "covariance_whitening": "its whitening is stored outside the SAE's weights",
}
_COMMON_FIELDS = ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                  "normalize_activations", "reshape_activations", "metadata", "architecture")
_FIELDS = {
    "standard": _COMMON_FIELDS,
    "jumprelu": _COMMON_FIELDS,
    # use_sparse_activations (some SAELens 6 releases) picks how the codes
    # are stored in memory, not their values.
    "topk": _COMMON_FIELDS + ("k", "rescale_acts_by_decoder_norm", "use_sparse_activations"),
}
# Architectures that only a training checkpoint has: SAELens saves a
# trained BatchTopK SAE (Matryoshka too, whose nested losses change only its
# training) as a JumpReLU SAE with one threshold, its running topk_threshold;
# read_saelens reads the checkpoint as that JumpReLU SAE.
_CHECKPOINT_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")
_FIELDS["batchtopk"] = _FIELDS["matryoshka_batchtopk"] = _FIELDS["topk"]
# A training checkpoint's cfg.json is SAELens 6's training config (its
# TrainingSAEConfig classes): the inference fields above and these, which
# set only how it trains. SAELens' load_from_disk drops them, and so does
# read_saelens; the checkpoint's activation_scaler.json is what makes such a
# folder worth reading (its scaling factor, not yet folded). The lists are
# those of 6.0 to 6.54; a later release's new ones are accepted where the
# checkpoint itself declares them training fields (_declared_training).
_TRAINING_COMMON = ("decoder_init_norm",)
_TRAINING_FIELDS = {
    "standard": _TRAINING_COMMON + ("l1_coefficient", "lp_norm", "l1_warm_up_steps"),
    "jumprelu": _TRAINING_COMMON + (
        "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
        "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient",
        "jumprelu_tanh_scale", "jumprelu_ste_to_input", "target_l0"),
    "topk": _TRAINING_COMMON + ("aux_loss_coefficient",),
}
_TRAINING_FIELDS["batchtopk"] = _TRAINING_FIELDS["topk"] + ("topk_threshold_lr",)
_TRAINING_FIELDS["matryoshka_batchtopk"] = _TRAINING_FIELDS["batchtopk"] + (
    "matryoshka_widths", "use_matryoshka_aux_loss")
# Atoms this close to unit norm are left as they are, so that a dictionary of
# this package (unit atoms, up to rounding) goes out and back bit for bit.
_UNIT_TOLERANCE = 1e-6


def _wrote_it(config):
    meta = config.get("metadata") if isinstance(config, dict) else None
    return isinstance(meta, dict) and "sparse_dict_version" in meta


# SAELens stores log10(frequency + 1e-10): a feature that never fired is at
# -10 (-10.000001 in float32). Values this close to the floor read as 0; a
# frequency under about 1e-10 is beyond any count of tokens anyway.
_LOG10_FLOOR = -10.0
_FLOOR_TOLERANCE = 1e-5
# At the other end, a feature that fired on every token is stored as
# log10(1 + 1e-10) = 4.3e-11 in float64: values up to this read as 1.
_LOG10_CEILING = 1e-6
# The files write_saelens writes, cfg.json vouching for the folder.
_WRITTEN_FILES = _persist.folder_kind(
    "SAELens folder written by sparse_dict",
    {CONFIG_FILE: _persist.json_kind("SAELens configuration written by sparse_dict", _wrote_it),
     WEIGHTS_FILE: None, SPARSITY_FILE: None},
)


def _is_written_folder(path):
    """Whether ``path`` is a folder that :func:`write_saelens` wrote, as it wrote it.

    Its ``cfg.json``, weights and any ``sparsity.safetensors`` must be the
    ones it wrote (their digests are in ``cfg.json``'s integrity record): a
    folder SAELens saved again after fine-tuning keeps the metadata that
    names sparse_dict but is SAELens' now, and a sparsity file added later is
    somebody else's, so neither folder is replaced.
    """
    return (_WRITTEN_FILES.recognize(path)
            and _persist.as_written(path, CONFIG_FILE, WEIGHTS_FILE, (SPARSITY_FILE,)))


# A folder that write_saelens wrote: what overwrite=True may replace.
SAELENS_FOLDER = _persist.Kind("SAELens folder written by sparse_dict", True,
                               _is_written_folder)


def is_saelens_folder(path):
    """Whether ``path`` is a folder in SAELens' layout (``cfg.json`` and weights).

    Only the file names are looked at; :func:`read_saelens` checks the content.

    Examples
    --------
    >>> is_saelens_folder("no-such-folder")
    False
    """
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _check_bool(config, key, file, default=None):
    if key not in config and default is not None:
        return default
    value = _persist.config_field(config, key, file, kind=bool)
    return value


def _finite_metadata(metadata, file):
    """``metadata`` with NaN and infinities as None, and a warning naming them.

    SAELens writes ``cfg.json`` with Python's json, which writes them, and
    strict JSON cannot hold them: kept, they failed the dictionary's
    ``save`` (and ``to_saelens``) later, naming no file or field.
    """
    found = []
    # Walked with a stack of its own, not recursively: JSON as deep as
    # Python's json reads (about a thousand levels) failed here with a
    # RecursionError from about 500, so that to_saelens wrote folders that
    # from_saelens could not read back. Each container is copied as it is
    # met; a pending (container, key) is cleaned in place of the original.
    root = [metadata]
    stack = [(root, 0, "metadata")]
    while stack:
        container, key, where = stack.pop()
        value = container[key]
        if isinstance(value, float) and not np.isfinite(value):
            found.append(where)
            container[key] = None
        elif isinstance(value, dict):
            container[key] = copy = dict(value)
            stack.extend((copy, k, f"{where}.{k}") for k in reversed(list(copy)))
        elif isinstance(value, list):
            container[key] = copy = list(value)
            stack.extend((copy, i, f"{where}[{i}]") for i in reversed(range(len(copy))))
    metadata = root[0]
    if found:
        warn_at_caller(f"{file}: {', '.join(found)} held NaN or infinite values, which JSON "
                       "cannot save; read as null.", UserWarning)
    return metadata


def _declared_training(config):
    """The fields a checkpoint's metadata lists as training-only, with the value they have.

    SAELens 6 copies a training config's own fields into
    ``metadata.training_architecture_details`` beside the top-level ones: a
    field named there, with the same value at the top level, sets only how
    the SAE trains, whatever release added it (6.54's
    ``jumprelu_ste_to_input`` and ``target_l0`` were refused as unexpected).
    """
    metadata = config.get("metadata")
    details = metadata.get("training_architecture_details") if isinstance(
        metadata, dict) else None
    if not isinstance(details, dict):
        return set()
    # Never a field that sets inference in some architecture: one of those
    # where its own architecture does not read it (a JumpReLU with a k)
    # stays unexpected.
    inference = set().union(*_FIELDS.values())
    return {key for key, value in details.items()
            if key in config and config[key] == value and key not in inference}


def _read_config(path):
    config = _persist.read_config(
        path, config_name=CONFIG_FILE, weights_name=WEIGHTS_FILE,
        # sparsity.safetensors is optional in SAELens' layout: a folder shared
        # without it reads with its frequencies unknown.
        optional=(SPARSITY_FILE,),
        other_layout=("config.json", "a folder that SparseAutoencoderDictionary.save wrote, "
                                     "which SparseAutoencoderDictionary.load reads"),
        edit_hint="To give its metadata (model_name, hook_name, ...), set them in the "
                  "dictionary's provenance_['metadata'] and write it again with to_saelens.")
    file = Path(path) / CONFIG_FILE
    metadata = config.get("metadata")
    if metadata is not None:
        _persist.config_field(config, "metadata", file)  # a JSON object, or named as not
    version = None
    if isinstance(metadata, dict):
        version = metadata.get("sae_lens_version")
    version = version or config.get("sae_lens_version")
    parsed = version_tuple(version) if isinstance(version, str) else None
    if parsed is None or parsed[0] < 6:
        raise ValueError(
            f"{file}: written by SAELens {version or 'before 6.0'} (field "
            "'metadata.sae_lens_version'); only the SAELens 6 layout is read. Load it "
            "in SAELens 6 (SAE.load_from_disk) and save it again with save_model."
        )
    architecture = _persist.config_field(config, "architecture", file, kind=str)
    if architecture not in ARCHITECTURES + _CHECKPOINT_ARCHITECTURES:
        known = architecture in _OTHER_ARCHITECTURES
        raise ValueError(
            f"{file}: field 'architecture' is {architecture!r}, "
            f"{'which sparse_dict cannot represent' if known else 'unknown'}; "
            f"supported: {list(ARCHITECTURES)}, and in training checkpoints "
            f"{list(_CHECKPOINT_ARCHITECTURES)}."
        )
    known = _FIELDS[architecture] + _TRAINING_FIELDS[architecture]
    declared = _declared_training(config)
    for key in config:
        if key not in known and key not in declared and key != _persist.INTEGRITY_KEY:
            raise ValueError(f"{file}: unexpected field {key!r} for architecture "
                             f"{architecture!r}")
    cfg = {"architecture": architecture}
    cfg["d_in"] = _persist.Integer(1).check(config.get("d_in"), file, "d_in")
    cfg["d_sae"] = _persist.Integer(1).check(config.get("d_sae"), file, "d_sae")
    dtype = _persist.config_field(config, "dtype", file, kind=str)
    if dtype not in _DTYPES:
        raise ValueError(f"{file}: field 'dtype' must be one of "
                         f"{sorted(set(_DTYPES.values()))}, got {dtype!r}")
    cfg["dtype"] = _DTYPES[dtype]
    if "device" in config:
        _persist.config_field(config, "device", file, kind=str)
    # Missing, the two take SAELens' own defaults (SAEConfig's), with which
    # SAELens loads such a folder: a hand-made or third-party cfg.json may
    # leave them out (it was refused as incomplete).
    cfg["apply_b_dec_to_input"] = _check_bool(config, "apply_b_dec_to_input", file,
                                              default=True)
    norm = (_persist.config_field(config, "normalize_activations", file, kind=str)
            if "normalize_activations" in config else "none")
    if norm in _UNSUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"{file}: field 'normalize_activations' is {norm!r}, which sparse_dict cannot "
            f"fold into the weights ({_UNSUPPORTED_NORMALIZATIONS[norm]}); supported: "
            f"{list(_NORMALIZATIONS)}"
        )
    cfg["normalize_activations"] = _persist.OneOf(_NORMALIZATIONS).check(
        norm, file, "normalize_activations")
    cfg["reshape_activations"] = _persist.OneOf(("none", "hook_z")).check(
        config.get("reshape_activations", "none"), file, "reshape_activations")
    cfg["metadata"] = _finite_metadata(_persist.config_field(config, "metadata", file), file)
    if architecture == "topk":
        cfg["k"] = _persist.Integer(1).check(config.get("k"), file, "k")
        if cfg["k"] > cfg["d_sae"]:
            raise ValueError(f"{file}: field 'k' ({cfg['k']}) exceeds 'd_sae' "
                             f"({cfg['d_sae']})")
    elif architecture in _CHECKPOINT_ARCHITECTURES:
        # Its k (a float: a mean over the batch) chose the codes in training
        # only: read, the SAE fires where its threshold says, as SAELens' own
        # conversion of the checkpoint does. Checked, not kept.
        _persist.Real(0.0, inclusive=False).check(config.get("k"), file, "k")
    if "k" in _FIELDS[architecture]:
        cfg["rescale_acts_by_decoder_norm"] = _check_bool(
            config, "rescale_acts_by_decoder_norm", file, default=False)
        _check_bool(config, "use_sparse_activations", file, default=False)
    return cfg


def _checkpoint_as_jumprelu(w, rescaled):
    """A BatchTopK checkpoint's weights as the JumpReLU SAE SAELens saves it as.

    In training SAELens keeps the batch's ``k * batch`` largest of ``ReLU(h)``
    (of ``h * ||W_dec||`` where ``rescaled``) and a running mean of the
    smallest kept value, ``topk_threshold``; the trained SAE fires where a
    value exceeds it. Where ``rescaled``, the norms are folded into the
    encoder first (``W_enc`` and ``b_enc`` times the norm, ``W_dec`` over
    it), which makes the rescaled value the pre-activation; the threshold,
    already in those units, stays one threshold shared by every feature. A
    zero decoder row's value is 0, never above the threshold: its encoder
    column is zeroed, and the row is left as it is.
    """
    w = dict(w)
    threshold = float(w.pop("topk_threshold"))
    if rescaled:
        norms = np.linalg.norm(w["W_dec"], axis=1)
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / np.where(norms > 0, norms, 1.0)[:, None]
    w["threshold"] = np.full(w["b_enc"].shape, threshold)
    return w


def _read_scaling_factor(path):
    """The scaling factor in a training checkpoint's ``activation_scaler.json``, or None."""
    file = Path(path) / SCALER_FILE
    if not file.is_file():
        return None
    data = _persist.read_json_object(file)
    # SAELens writes {"scaling_factor": null} where it scaled nothing; a file
    # without the field (a misspelt key) was read as no file.
    if "scaling_factor" not in data:
        raise ValueError(f"{file}: field 'scaling_factor' is missing")
    if data["scaling_factor"] is None:
        return None
    return _persist.Real(0.0, inclusive=False).check(data["scaling_factor"], file,
                                                     "scaling_factor")


def _read_weights(file, cfg):
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    floats = ("float16", "float32", "float64")
    schema = {
        "W_enc": _persist.TensorSpec((d_in, d_sae), floats),
        "W_dec": _persist.TensorSpec((d_sae, d_in), floats),
        "b_enc": _persist.TensorSpec((d_sae,), floats),
        "b_dec": _persist.TensorSpec((d_in,), floats),
    }
    if cfg["architecture"] == "jumprelu":
        schema["threshold"] = _persist.TensorSpec((d_sae,), floats)
    if cfg["architecture"] in _CHECKPOINT_ARCHITECTURES:
        schema["topk_threshold"] = _persist.TensorSpec((), floats)
    if _has_bfloat16(file):
        raise ValueError(
            f"{file}: the weights are bfloat16, which sparse_dict reads only as float16, "
            "float32 or float64; load it in SAELens with dtype='float32' and save it again."
        )
    return {k: v.astype(np.float64) for k, v in _persist.read_tensors(file, schema).items()}


def _has_bfloat16(file):
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(min(size, 100 << 20)))
    except (OSError, ValueError):
        return False  # read_tensors reports the damage
    return isinstance(header, dict) and any(
        isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def _read_frequencies(path, d_sae):
    """Firing frequencies from ``sparsity.safetensors`` (log10 of them), or None.

    A value at SAELens' floor of -10 reads as 0 (a feature that never fired).
    Where :func:`write_saelens` wrote the file, :func:`_read_config` has
    checked it against its digest.
    """
    file = Path(path) / SPARSITY_FILE
    if not file.is_file():
        return None
    tensors = _persist.read_tensors(file, {"sparsity": _persist.TensorSpec(
        (d_sae,), ("float16", "float32", "float64"), maximum=_LOG10_CEILING)})
    log10 = tensors["sparsity"].astype(np.float64)
    frequencies = np.clip(10.0 ** log10, 0.0, 1.0)
    frequencies[log10 <= _LOG10_FLOOR + _FLOOR_TOLERANCE] = 0.0
    return frequencies


# provenance["folded"]'s record of a scaling that stays in the weights: such
# a dictionary expects inputs scaled as in its training, and writing it back
# says so again (written as "none", the scaling would have been lost).
_NOT_FOLDED = "normalize_activations: no scaling factor known, not folded"


def read_saelens(path, *, norm_scaling_factor=None):
    """Read a SAELens folder as this package's fitted tensors, folded exactly.

    Parameters
    ----------
    path : str or path-like
        A folder with ``cfg.json`` and ``sae_weights.safetensors`` (SAELens 6).
    norm_scaling_factor : float, optional
        For ``normalize_activations="expected_average_only_in"``: the factor
        the SAE's inputs were multiplied by in training (SAELens' pretrained
        directory lists it as ``norm_scaling_factor``). Read from the
        folder's ``activation_scaler.json`` when not given. Refused for
        ``normalize_activations="none"``, which has no scaling to fold.

    Returns
    -------
    result : dict
        ``activation`` and ``k`` (the estimator's parameters), ``dtype``,
        ``tensors`` (this package's names, float64, input units),
        ``frequencies`` (from ``sparsity.safetensors``, or None),
        ``code_scale`` (per feature: this package's
        code is SAELens' code times it) and ``provenance`` (SAELens'
        metadata and what was folded; or, for a folder :func:`write_saelens`
        wrote from a dictionary with an extractor's provenance, that
        provenance).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file and the field: a damaged or incomplete folder, an
        architecture, normalisation or field this package cannot reproduce;
        or a ``norm_scaling_factor`` for ``normalize_activations="none"``.
    """
    path = Path(path)
    cfg = _read_config(path)
    if norm_scaling_factor is not None and cfg["normalize_activations"] == "none":
        # Ignoring it would leave the caller believing a scaling was folded.
        raise ValueError(
            f"{path / CONFIG_FILE}: cfg.json's normalize_activations is 'none': there is no "
            "scaling to fold; leave norm_scaling_factor (convert's --norm-scaling-factor) out"
        )
    w = _read_weights(path / WEIGHTS_FILE, cfg)
    folded = []
    architecture = cfg["architecture"]
    if architecture in _CHECKPOINT_ARCHITECTURES:
        w = _checkpoint_as_jumprelu(w, cfg["rescale_acts_by_decoder_norm"])
        folded.append(f"{architecture} training checkpoint: read as SAELens saves the "
                      "trained SAE, a JumpReLU SAE whose one threshold is its topk_threshold"
                      + (" (decoder norms folded into the encoder first, as "
                         "rescale_acts_by_decoder_norm chose on them)"
                         if cfg["rescale_acts_by_decoder_norm"] else ""))
    W_enc, W_dec, b_enc, b_dec = w["W_enc"].T.copy(), w["W_dec"], w["b_enc"], w["b_dec"]

    if cfg["normalize_activations"] == "expected_average_only_in":
        factor = norm_scaling_factor
        if factor is None:
            factor = _read_scaling_factor(path)
        else:
            factor = _persist.Real(0.0, inclusive=False).check(
                factor, "norm_scaling_factor", "norm_scaling_factor")
        if factor is None:
            warn_at_caller(
                f"{path / CONFIG_FILE}: normalize_activations='expected_average_only_in' "
                "but no scaling factor is known (pass norm_scaling_factor, or on the command "
                "line 'convert --norm-scaling-factor'); like SAELens' "
                "load_from_disk, the SAE is used as is, so inputs must be scaled as in its "
                "training.", UserWarning)
            folded.append(_NOT_FOLDED)
        else:
            W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
            folded.append(f"normalize_activations: scaling factor {factor!r} folded")
    if not cfg["apply_b_dec_to_input"]:
        b_enc = b_enc + W_enc @ b_dec
        # Named in SAELens' layout, W_enc of shape (d_in, d_sae), as the docs name it.
        folded.append("apply_b_dec_to_input=False: W_enc.T @ b_dec added to the encoder bias")

    norms = np.linalg.norm(W_dec, axis=1)
    # A zero atom never contributes: it is left alone rather than divided by 0.
    norms[(np.abs(norms - 1.0) <= _UNIT_TOLERANCE) | (norms < 1e-30)] = 1.0
    rescaled = cfg.get("rescale_acts_by_decoder_norm", False)
    # A checkpoint's BatchTopK is now the JumpReLU it stands for.
    form = "jumprelu" if architecture in _CHECKPOINT_ARCHITECTURES else architecture
    tensors = {
        "components": W_dec / norms[:, None],
        "encoder_weights": W_enc * norms[:, None],
        "encoder_bias": b_enc * norms,
        "decoder_bias": b_dec,
    }
    code_scale = norms.copy()
    if form == "standard":
        activation, k = "relu", None
    elif form == "jumprelu":
        activation, k = "jumprelu", None
        # SAELens computes ReLU(h) * (h > threshold): a threshold below zero acts
        # as zero, which is what this package's h * (h > threshold) needs.
        tensors["threshold"] = np.maximum(w["threshold"], 0.0) * norms
    else:
        activation, k = "topk", cfg["k"]
        if rescaled:
            code_scale[:] = 1.0
            tensors["selection_scale"] = np.ones_like(norms)
        else:
            tensors["selection_scale"] = 1.0 / norms
    if np.any(norms != 1.0):
        folded.append("decoder norms folded into the codes" + (
            " (TopK keeps selection_scale = 1 / norm)"
            if architecture == "topk" and not rescaled else ""))

    recorded = _recorded_provenance(cfg["metadata"], Path(path) / CONFIG_FILE)
    provenance = recorded if recorded is not None else {
        "source": "SAELens",
        "architecture": architecture,
        "shared_threshold": bool(form == "jumprelu"
                                 and np.all(w["threshold"] == w["threshold"][0])),
        "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
        "normalize_activations": cfg["normalize_activations"],
        "reshape_activations": cfg["reshape_activations"],
        "dtype": cfg["dtype"],
        "metadata": cfg["metadata"],
        "folded": folded,
    }
    if architecture == "topk" and recorded is None:
        provenance["rescale_acts_by_decoder_norm"] = rescaled
    return {
        "activation": activation, "k": k,
        "dtype": "float64" if cfg["dtype"] == "float64" else "float32",
        "tensors": tensors,
        "frequencies": _read_frequencies(path, cfg["d_sae"]),
        "code_scale": code_scale,
        "provenance": provenance,
    }


# The metadata key under which write_saelens keeps a dictionary's extractor
# provenance (model, layer, hook point, max_length, ...): SAELens keeps any
# metadata key, and read_saelens gives it back as the provenance, so that a
# dictionary converted both ways still knows its model and hook point.
PROVENANCE_KEY = "sparse_dict_provenance"
# The ``source`` of an extractor's provenance (as in sparse_dict.extraction,
# which imports torch; this module does not).
_EXTRACTOR_SOURCE = "sparse_dict.TransformerActivationExtractor"


def _recorded_provenance(metadata, file):
    """The extractor provenance that :func:`write_saelens` kept in ``metadata``, or None."""
    recorded = metadata.get(PROVENANCE_KEY) if isinstance(metadata, dict) else None
    if recorded is None:
        return None
    check_provenance(recorded, file, f"metadata.{PROVENANCE_KEY}")
    return dict(recorded) if recorded.get("source") == _EXTRACTOR_SOURCE else None


def saelens_tensors(activation, k, tensors):
    """SAELens' architecture, its extra config fields and weights for fitted tensors.

    Parameters
    ----------
    activation : {"relu", "topk", "batchtopk", "jumprelu"}
    k : int or None
    tensors : dict of str to ndarray
        This package's fitted tensors (``components``, ...), input units.

    Returns
    -------
    architecture : str
    fields : dict
        The architecture's own config fields (``k`` for ``"topk"``).
    weights : dict of str to ndarray
        ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` (and ``threshold``).

    Raises
    ------
    ValueError
        For what SAELens cannot express.
    """
    components = np.asarray(tensors["components"])
    n_components = components.shape[0]
    scale = np.ones(n_components, dtype=components.dtype)
    fields = {}
    if activation == "relu":
        architecture = "standard"
    elif activation in ("jumprelu", "batchtopk"):
        # SAELens saves its own BatchTopK SAEs as JumpReLU with one shared threshold.
        architecture = "jumprelu"
        threshold = np.asarray(tensors["threshold"])
        if np.any(threshold < 0):
            raise ValueError("threshold_ has negative values, which SAELens' JumpReLU "
                             "(ReLU(h) * (h > threshold)) cannot express")
    elif activation == "topk":
        architecture = "topk"
        fields = {"k": int(min(k, n_components)), "rescale_acts_by_decoder_norm": False}
        if "selection_scale" in tensors:
            scale = np.asarray(tensors["selection_scale"])
            if np.any(scale <= 0):
                raise ValueError("selection_scale_ must be positive to be written for "
                                 "SAELens")
    else:
        raise ValueError(f"activation={activation!r} has no SAELens architecture")
    # Atom i of norm 1 / scale_i makes SAELens' plain TopK choose on pre * scale.
    unit = np.all(scale == 1)
    weights = {
        "W_enc": (np.asarray(tensors["encoder_weights"])
                  * (1 if unit else scale[:, None])).T.copy(),
        "W_dec": components if unit else components / scale[:, None],
        "b_enc": np.asarray(tensors["encoder_bias"]) * (1 if unit else scale),
        "b_dec": np.asarray(tensors["decoder_bias"]),
    }
    if architecture == "jumprelu":
        weights["threshold"] = np.asarray(tensors["threshold"])
    return architecture, fields, weights


def _sparsity_bytes(frequencies, d_sae):
    """``sparsity.safetensors`` for known ``frequencies``, as bytes; None for unknown ones.

    SAELens' layout: one tensor ``"sparsity"`` of ``log10`` of the
    frequencies. A frequency of 0 (a feature that never fired) has no
    logarithm: it is written at SAELens' floor, -10 (SAELens stores
    ``log10(frequency + 1e-10)``), which :func:`read_saelens` reads as 0.
    Known frequencies are written in float64, so that they read back as they
    were (to a unit in the last place).
    """
    from safetensors.numpy import save

    if frequencies is None:
        return None
    frequencies = np.asarray(frequencies, dtype=np.float64)
    if frequencies.shape != (d_sae,):
        raise ValueError(f"frequencies must have shape ({d_sae},), one per feature, got "
                         f"{frequencies.shape}")
    if not np.isfinite(frequencies).all():
        return None  # unknown (NaN), as for a dictionary imported without them
    if frequencies.min() < 0 or frequencies.max() > 1:
        raise ValueError("frequencies must lie in [0, 1] (the share of tokens on which each "
                         "feature fires)")
    log10 = np.log10(np.maximum(frequencies, 10.0 ** _LOG10_FLOOR))
    return save({"sparsity": np.ascontiguousarray(log10)})


def write_saelens(path, activation, k, tensors, provenance=None, *, frequencies=None,
                  overwrite=False):
    """Write fitted tensors as a SAELens folder (``cfg.json``, ``sae_weights.safetensors``).

    With known ``frequencies`` the folder also holds ``sparsity.safetensors``,
    as SAELens' training writes it (``log10`` of each feature's firing
    frequency; see :func:`_sparsity_bytes` for a frequency of 0), and
    :func:`read_saelens` gives them back. Its SHA-256 is recorded beside the
    weights' in ``cfg.json``'s integrity record, so that damage to it is
    detected and it counts as part of the folder for ``overwrite``.

    The folder is staged and moved into place as every output of this package
    (:func:`sparse_dict._persist.staged`); with ``overwrite`` only a folder
    this function wrote is replaced.

    Parameters
    ----------
    path : str or path-like
    activation : str
    k : int or None
    tensors : dict of str to ndarray
    provenance : dict, optional
        From :func:`read_saelens`: its metadata (model, hook, ...) are written
        back. An extractor's (``TransformerActivationExtractor.provenance()``)
        is kept whole under ``metadata.sparse_dict_provenance``, which
        :func:`read_saelens` gives back, and its ``max_length`` is written as
        SAELens' ``context_size``.
    frequencies : array-like of shape (d_sae,), optional
        Each feature's firing frequency (``feature_frequencies_``), written
        to ``sparsity.safetensors`` where all are known (finite); NaN
        (unknown) or None writes no such file.
    overwrite : bool, default=False

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    ValueError
        For what SAELens cannot express, or ``frequencies`` of the wrong
        shape or outside [0, 1].
    """
    from sparse_dict._version import __version__

    architecture, fields, weights = saelens_tensors(activation, k, tensors)
    dtype = np.dtype(weights["W_dec"].dtype).name
    weights = {name: np.ascontiguousarray(value, dtype=dtype) for name, value in weights.items()}
    provenance = provenance or {}
    metadata = dict(provenance.get("metadata") or {})
    if provenance.get("source") == _EXTRACTOR_SOURCE:
        metadata[PROVENANCE_KEY] = provenance
        if isinstance(provenance.get("max_length"), int):
            metadata.setdefault("context_size", provenance["max_length"])
        # Where SAELens and Neuronpedia look for the model and the hook
        # (they went out empty): this package's names, unless given.
        for key, field in (("model_name", "model"), ("hook_name", "hook_name")):
            if isinstance(provenance.get(field), str):
                metadata.setdefault(key, provenance[field])
    metadata.setdefault("sae_lens_version", WRITTEN_FORMAT_VERSION)
    metadata.setdefault("sae_lens_training_version", None)
    metadata["sparse_dict_version"] = __version__
    d_sae, d_in = weights["W_dec"].shape
    sparsity = _sparsity_bytes(frequencies, d_sae)
    config = {
        "d_in": int(d_in), "d_sae": int(d_sae), "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": ("expected_average_only_in"
                                  if _NOT_FOLDED in (provenance.get("folded") or ())
                                  else "none"),
        "reshape_activations": provenance.get("reshape_activations", "none"),
        "metadata": metadata, **fields, "architecture": architecture,
    }
    return _persist.write_folder(
        path, config, weights, kind=SAELENS_FOLDER, overwrite=overwrite,
        config_name=CONFIG_FILE, weights_name=WEIGHTS_FILE,
        extra_files=None if sparsity is None else {SPARSITY_FILE: sparsity},
    )


def _is_finite_json(value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def check_provenance(value, file, where="attributes.provenance_"):
    """A saved ``provenance_``: a JSON object; ValueError naming ``file`` otherwise."""
    if not isinstance(value, dict) or not _is_finite_json(value):
        raise ValueError(f"{file}: field {where!r} must be a JSON object")
    return value

