"""Whether a dictionary belongs to an extractor's (or a store's) hook point, from its provenance."""

from pathlib import Path

from sklearn.utils.validation import check_is_fitted

from sparse_dict.extraction._extractor import PROVENANCE_SOURCE, TransformerActivationExtractor
from sparse_dict.extraction._loading import sample_of, same_weights


def _same_model(recorded, current):
    """Whether two provenance ``model`` entries name the same model.

    A local folder is recognised by its name, so a dictionary still matches
    its model after the folder moved (or was copied to another machine); a
    torch module passed as ``model`` (recorded as None) cannot be told apart
    and always matches.
    """
    if recorded is None or current is None:
        return True
    if recorded == current:
        return True
    if "builtin" in (recorded, current):
        return False
    return Path(recorded).name == Path(current).name


def _same_hook(recorded, current):
    """Whether two provenance records name the same hook point.

    The point is a module's input or output: named by ``layer``/``hook``
    ("layer0.mlp_post") or by ``module=`` (its path), the same point reads
    the same activations. Records without ``hook_direction`` (written before
    it was kept) are compared by name.
    """
    if recorded.get("hook_name") == current.get("hook_name"):
        return True
    keys = ("hook_module", "hook_direction")
    sides = [tuple(record.get(k) for k in keys) for record in (recorded, current)]
    return None not in sides[0] and sides[0] == sides[1]


def check_fitted_dictionary(dictionary):
    """Raise unless ``dictionary`` is a fitted estimator with ``components_``.

    An array of atoms is refused with a pointer to what wraps one (scikit-
    learn's own check would print the whole array as the estimator's name).
    """
    if not all(callable(getattr(dictionary, m, None)) for m in ("transform",
                                                                "inverse_transform")):
        raise TypeError(
            f"Expected a fitted dictionary (an estimator with components_, transform and "
            f"inverse_transform, such as SparseAutoencoderDictionary), got "
            f"{type(dictionary).__name__}. For an array of atoms, use "
            "sparse_dict.LassoCoder(atoms).fit(X).")
    check_is_fitted(dictionary, "components_")


def check_compatible(extractor, dictionary, *, check_model=True):
    """Raise a clear error if ``dictionary`` was not learned at ``extractor``'s hook point.

    ``extractor`` may also be an activation store
    (:func:`~sparse_dict.extraction.open_store`), or the provenance record of
    some activations (a dict, as ``sparse-dict extract`` writes beside an
    ``.npy``): their activations must come from the dictionary's hook point,
    which their widths alone cannot tell (every layer of a model has the
    same width).

    The dictionary's width must be the hook's width. A dictionary whose
    ``provenance_`` was recorded from an extractor (see
    :meth:`~sparse_dict.TransformerActivationExtractor.provenance`) must
    also come from the same model and the same hook point, with the same
    ``pooling`` (rows of tokens, or one row a text). The model is told by a
    sample of its weights that the provenance keeps (``weights_sample``),
    whatever its folder is called: another checkpoint, or other weights of
    the same shapes in a folder of the same name, is refused, and the same
    weights moved and renamed are accepted; a record without the sample
    (written by sparse_dict before it kept one) names its model, and a
    local folder is then recognised by its name. A dictionary
    without such a record (fitted on a bare array, or imported from SAELens)
    is checked by its width only.

    Parameters
    ----------
    extractor : TransformerActivationExtractor, ActivationStore or dict
        Fitted (an extractor), complete (a store), or a provenance record
        (:meth:`~sparse_dict.TransformerActivationExtractor.provenance`).
    dictionary : fitted estimator with ``components_`` and ``n_features_in_``
    check_model : bool, default=True
        Also compare the models. False takes the extractor's model as the
        dictionary's (for a model folder that was moved and renamed); the
        hook point and the width are checked all the same.

    Raises
    ------
    ValueError
        On a mismatch, naming both sides.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
    >>> from sparse_dict.analysis import check_compatible
    >>> ext = TransformerActivationExtractor("builtin", device="cpu").fit(["to be"])
    >>> sae = SparseAutoencoderDictionary(n_components=8, max_steps=2, random_state=0)
    >>> _ = sae.fit(np.random.default_rng(0).random((32, 6)))
    >>> check_compatible(ext, sae)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The dictionary was fitted on 6 features per row, but layer0.mlp_post ...
    """
    is_extractor = isinstance(extractor, TransformerActivationExtractor)
    if isinstance(dictionary, TransformerActivationExtractor) and not is_extractor:
        # Swapped, the dictionary was told it was no dictionary.
        raise TypeError("check_compatible takes the extractor first and the dictionary "
                        f"second; got a {type(extractor).__name__} and an extractor.")
    if is_extractor:
        check_is_fitted(extractor, "n_features_out_")
    check_fitted_dictionary(dictionary)
    if isinstance(extractor, dict):
        current, what = extractor, "the activations"
        missing = [k for k in ("model", "hook_name", "n_features") if k not in current]
        if missing:
            raise ValueError(
                f"The provenance record lacks {missing}; pass one made by "
                "TransformerActivationExtractor.provenance() (as 'sparse-dict extract' "
                "writes beside an .npy).")
    else:
        current = extractor.provenance()
        what = "the extractor" if is_extractor else "the store"
    # The provenance first: it names what the dictionary belongs to.
    recorded = getattr(dictionary, "provenance_", None)
    if isinstance(recorded, dict) and recorded.get("source") == PROVENANCE_SOURCE:
        _check_recorded(recorded, current, check_model, what)
    check_width(current, dictionary.n_features_in_)


def check_width(provenance, n_features_in):
    """Raise a clear error unless a dictionary of ``n_features_in`` fits the hook's width.

    Parameters
    ----------
    provenance : dict
        The extractor's (or store's) provenance record.
    n_features_in : int
        The width the dictionary was fitted on.
    """
    width = int(provenance["n_features"])
    if int(n_features_in) != width:
        raise ValueError(
            f"The dictionary was fitted on {int(n_features_in)} features per row, but "
            f"{provenance['hook_name']} of this model gives {width}; use the extractor "
            "(model, layer, hook) its activations came from."
        )


def _check_recorded(recorded, current, check_model, what="the extractor"):
    where = f"{recorded.get('hook_name')} of model {recorded.get('model')}"
    reads, runs = (("are of", "are of model") if what == "the activations"
                   else ("reads", "runs model"))
    if not _same_hook(recorded, current):
        raise ValueError(
            f"The dictionary was learned on activations of {where}, but {what} "
            f"{reads} {current['hook_name']}; use layer/hook (or module) of the dictionary's "
            "provenance_."
        )
    # Rows of tokens against rows of texts (mean, max or last of each): the
    # same hook point, and codes of the one are no codes of the other.
    pooled, pooling = recorded.get("pooling", "none"), current.get("pooling", "none")
    if pooled != pooling:
        rows = {"none": "one row a token"}
        has = {"the activations": "have", "the store": "holds rows of"}.get(what, "uses")
        raise ValueError(
            f"The dictionary was learned on activations of {where} with pooling={pooled!r} "
            f"({rows.get(pooled, 'one row a text')}), but {what} {has} pooling={pooling!r} "
            f"({rows.get(pooling, 'one row a text')}); use pooling={pooled!r}, as in the "
            "dictionary's provenance_."
        )
    if not check_model:
        return
    # Weights sampled on both sides tell the model itself, whatever its
    # folder is called now; older records have only the name.
    samples = sample_of(recorded), sample_of(current)
    if None not in samples:
        if not same_weights(*samples):
            raise ValueError(
                f"The dictionary was learned on activations of {where}, but {what} "
                f"{runs} {current['model']}, whose weights are others (a sample of them "
                "is kept in provenance_['weights_sample']): another checkpoint, or other "
                "weights of the same shapes; give the dictionary's model."
            )
    elif not _same_model(recorded.get("model"), current["model"]):
        raise ValueError(
            f"The dictionary was learned on activations of {where}, but {what} "
            f"{runs} {current['model']}; give the dictionary's model (a folder that "
            "moved is recognised by its name)."
        )
