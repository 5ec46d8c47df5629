"""Logit effects: what each feature, written at an MLP, does to the next-token logits.

A feature's atom is pushed along the network's linear path from the hook to
the logits: the MLP's output projection (for a hook on the MLP's hidden
activations), then the final normalisation and the unembedding. The later
blocks are skipped: this is the feature's *direct* effect, which for a hook
in the last block (all of the built-in model) is its whole effect.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from torch import nn

from sparse_dict.extraction._provenance import check_compatible, check_fitted_dictionary
from sparse_dict.extraction._extractor import TransformerActivationExtractor
from sparse_dict.extraction._hook import (
    _OUT_PROJECTION_NAMES,
    _UNGATED_OUT_PROJECTION_NAMES,
    ActivationHook,
    locate_hook,
)
from sparse_dict.extraction._texts import _check_texts, token_strings

__all__ = ["LogitEffects", "NoDirectPathError", "logit_effects", "REFERENCE_TEXTS"]

# Plain sentences on which the final normalisation's reference scale is
# measured: any text gives a typical scale, and fixed ones make the effects
# of a model the same from run to run.
REFERENCE_TEXTS = (
    "The first thing that she saw when she opened the door was a letter on the floor.",
    "He said that he would come back tomorrow, and that we should wait for him here.",
    "In the morning the king rode out of the city with all his men.",
    "What do you think of it? I cannot tell you, for I do not know.",
)

# Where the final normalisation lives in the causal language models we know:
# the built-in model, GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT.
_FINAL_NORMS = ("ln_final", "transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm")
# The MLP's output projection, relative to a block: inside its MLP
# (built-in, GPT-2, Llama, GPT-NeoX, BLOOM), or the block's own (OPT's fc2).
_OUT_PROJECTIONS = tuple(f"mlp.{name}" for name in _OUT_PROJECTION_NAMES) + ("fc2",)
# A norm a block applies to its MLP's output before the residual stream
# (Olmo2 and Olmo3, Gemma2's post_feedforward_layernorm, Glm4's
# post_mlp_layernorm): the direct path would have to go through it.
_POST_MLP_NORM_NAMES = ("post_feedforward", "post_mlp", "ffn_post", "post_ffn")
# Config fields that scale the residual stream's updates or the logits
# (Granite's residual_multiplier and logits_scaling, Cohere's logit_scale,
# Gemma2's softcap): left out of the path, every effect would be off by them.
_SCALING_FIELDS = ("residual_multiplier", "logits_scaling", "logit_scale",
                   "final_logit_softcapping")
# Features whose effects are computed at once (bounds the (chunk, vocab) block).
_CHUNK = 256


class NoDirectPathError(ValueError):
    """Logit effects are undefined for this model or hook point.

    Raised for a model without a next-token head (an encoder such as MiniLM),
    a final normalisation or output projection this package does not know,
    a block that normalises or scales the MLP's output on its way to the
    logits (Olmo2's post-feed-forward norm, Granite's residual multiplier),
    and a hook that is not on an MLP's path to the residual stream.
    """


@dataclass(frozen=True)
class LogitEffects:
    """The tokens each feature promotes and suppresses, with its logit changes.

    Built by :func:`logit_effects`. Row ``i`` of every array describes
    feature ``features[i]``; columns are ranks, largest change first.

    Attributes
    ----------
    features : ndarray of shape (n_features,), dtype int64
        The dictionary features described.
    promoted_ids, suppressed_ids : ndarray of shape (n_features, top_k), dtype int64
        Token ids with the largest increase (decrease) of their logit; -1
        throughout for a feature whose atom is zero (it changes no logit).
    promoted_tokens, suppressed_tokens : ndarray of shape (n_features, top_k), dtype object
        Those tokens as strings ('' for id -1).
    promoted_logits, suppressed_logits : ndarray of shape (n_features, top_k), dtype float32
        The change of each token's logit per unit of the feature's code
        (positive for promoted, negative for suppressed tokens).
    norm_scale : float
        The reference scale the final normalisation's divisor is frozen at.
    hook_name : str
        The hook point the atoms are written at.
    """

    features: np.ndarray
    promoted_ids: np.ndarray
    promoted_tokens: np.ndarray
    promoted_logits: np.ndarray
    suppressed_ids: np.ndarray
    suppressed_tokens: np.ndarray
    suppressed_logits: np.ndarray
    norm_scale: float
    hook_name: str

    def __len__(self):
        return int(self.features.shape[0])

    def to_frame(self):
        """The effects as a long pandas DataFrame, one row per (feature, token).

        Returns
        -------
        frame : pandas.DataFrame
            Columns ``feature``, ``direction`` ("promoted" or "suppressed"),
            ``rank`` (0 = largest change), ``token_id``, ``token`` and
            ``logit_change``.

        Raises
        ------
        ImportError
            If pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "LogitEffects.to_frame (and as_frame=True) needs pandas: pip install pandas"
            ) from None
        n, k = self.promoted_ids.shape
        parts = []
        for direction, ids, tokens, logits in (
            ("promoted", self.promoted_ids, self.promoted_tokens, self.promoted_logits),
            ("suppressed", self.suppressed_ids, self.suppressed_tokens, self.suppressed_logits),
        ):
            parts.append(pd.DataFrame({
                "feature": np.repeat(self.features, k),
                "direction": direction,
                "rank": np.tile(np.arange(k), n),
                "token_id": ids.ravel(),
                "token": tokens.ravel(),
                "logit_change": logits.ravel(),
            }))
        frame = pd.concat(parts, ignore_index=True)
        return frame.sort_values(["feature", "direction", "rank"], kind="stable",
                                 ignore_index=True)


@dataclass
class DirectPath:
    """The linear map from a hook point to the next-token logits.

    ``logits_change(v) = W_U (gain * centre(v @ out_projection) / norm_scale)``
    for a vector ``v`` added to the hooked activations.

    Attributes
    ----------
    out_projection : Tensor of shape (n_hook, d_model) or None
        The MLP's output projection (None when the hook is already in the
        residual stream's space, after it).
    centre : bool
        Whether the final normalisation subtracts the mean (LayerNorm) or
        not (RMSNorm).
    gain : Tensor of shape (d_model,)
    norm_scale : float
    unembedding : Tensor of shape (vocab_size, d_model)
    """

    out_projection: torch.Tensor | None
    centre: bool
    gain: torch.Tensor
    norm_scale: float
    unembedding: torch.Tensor

    def logit_change(self, vectors):
        """Logit change of adding each row of ``vectors`` (n, n_hook) at the hook."""
        resid = vectors if self.out_projection is None else vectors @ self.out_projection
        if self.centre:
            resid = resid - resid.mean(dim=-1, keepdim=True)
        return (resid * (self.gain / self.norm_scale)) @ self.unembedding.T


def _no_head(loaded, why):
    name = type(loaded.model).__name__
    return NoDirectPathError(
        f"Logit effects need a causal language model with a next-token head; {name} "
        f"{why}. They are undefined for encoders such as MiniLM."
    )


def _unembedding(loaded):
    """The unembedding matrix (vocab, d_model), or a clear error."""
    from sparse_dict.models.builtin import TinyTransformer

    model = loaded.model
    if isinstance(model, TinyTransformer):
        return model.unembed.weight
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise _no_head(loaded, "has none")
    if loaded.submodule("model.decoder.project_out") is not None:
        raise _no_head(loaded, "projects its final states before the head, which is "
                               "not supported")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise _no_head(loaded, "has a head without a weight matrix")
    return weight


def _final_norm(loaded):
    """(module, centre, gain, eps) of the final normalisation, or a clear error."""
    for path in _FINAL_NORMS:
        module = loaded.submodule(path)
        if module is None:
            continue
        if isinstance(module, nn.LayerNorm):
            return module, True, module.weight, module.eps
        name = type(module).__name__
        # Gemma's RMSNorm multiplies by (1 + weight); the others by weight.
        if name.endswith("RMSNorm") and not name.startswith("Gemma"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            return module, False, module.weight, eps
        raise _no_head(loaded, f"ends with a {name}, whose effect on the logits is not "
                               "known here")
    raise _no_head(loaded, "has no final normalisation this package recognises "
                           f"(looked for {list(_FINAL_NORMS)})")


def _projection_matrix(module, path):
    """The output projection as a (n_hook, d_model) matrix: ``x @ M`` is its linear part."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if type(module).__name__ == "Conv1D":  # GPT-2's projections store (in, out)
        return module.weight
    raise NoDirectPathError(f"The MLP's output projection {path!r} is a {type(module).__name__}, "
                     "not a linear layer; logit effects are undefined there.")


def _out_projection(extractor, loaded):
    """The MLP output projection after the hook, None for a hook after it, or an error.

    Logit effects are defined for the MLP's hidden activations (the input of
    its output projection, or the output of an activation function that
    feeds it directly) and for the MLP's output, which is added as it is to
    the residual stream.
    """
    site = locate_hook(loaded, layer=extractor.layer, hook=extractor.hook,
                       module=extractor.module)
    path, direction = site.module_path, site.direction
    _check_plain_residual(loaded, path)
    parent, _, leaf = path.rpartition(".")
    is_projection = any(path == r or path.endswith("." + r) for r in _OUT_PROJECTIONS)
    if is_projection and direction == "input":
        return _projection_matrix(loaded.submodule(path), path)
    if direction == "output" and (is_projection or leaf == "mlp"):
        return None  # the MLP's output, added as it is to the residual stream
    if direction == "output" and leaf == "act" and parent.rpartition(".")[2] == "mlp":
        mlp = loaded.submodule(parent)
        # A gated MLP multiplies the activation's output afterwards, so that
        # output is not the projection's input.
        gated = any(hasattr(mlp, name) for name in ("up_proj", "gate_proj"))
        for name in _UNGATED_OUT_PROJECTION_NAMES:  # built-in/GPT-J, GPT-2, NeoX
            projection = getattr(mlp, name, None)
            if projection is not None and not gated:
                return _projection_matrix(projection, f"{parent}.{name}")
    raise NoDirectPathError(
        f"Logit effects are defined for hooks on an MLP's path to the residual stream "
        f"(hook='mlp_post' or 'mlp_out'); {site.name!r} ({path}, {direction}) is not one."
    )


def _check_plain_residual(loaded, site_path):
    """Refuse a model whose MLP output reaches the logits by more than the final norm.

    The direct path here is: the MLP's output added as it is to the residual
    stream, then the final norm and the head. A block that normalises its
    MLP's output first, or a config that scales the residual updates or the
    logits, would make every figure wrong without any error.
    """
    block_path, mlp, _ = site_path.partition(".mlp")
    block = loaded.submodule(block_path) if mlp else None
    if block is not None:
        for name, _ in block.named_children():
            if "norm" in name and any(part in name for part in _POST_MLP_NORM_NAMES):
                raise NoDirectPathError(
                    f"{type(loaded.model).__name__} normalises the MLP's output "
                    f"({block_path}.{name}) before adding it to the residual stream; logit "
                    "effects through that norm are not supported.")
    config = getattr(loaded.model, "config", None)
    if getattr(config, "do_layer_norm_before", True) is False:
        raise NoDirectPathError(
            f"{type(loaded.model).__name__}'s blocks normalise after adding the MLP's output "
            "(do_layer_norm_before=False, as OPT-350m); logit effects through those norms "
            "are not supported.")
    for field in _SCALING_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            raise NoDirectPathError(
                f"{type(loaded.model).__name__}'s config sets {field}={value!r}, which "
                "scales the residual stream's updates or the logits; logit effects with it "
                "are not supported.")


def _reference_scale(extractor, norm_module, centre, eps, texts):
    """The final normalisation's mean divisor over the real positions of ``texts``."""
    loaded = extractor.loaded_model()
    if isinstance(texts, str):
        raise TypeError("reference_texts must be a list of texts, got one string; pass "
                        "[text].")
    texts = list(texts)
    if not texts:
        raise ValueError("reference_texts is empty; pass texts, or None for the default.")
    texts, _ = _check_texts(texts, "reference_texts")
    # Read whole (up to the model's own limit), whatever max_length the
    # extractor cuts its texts to: the scale, and so every logit effect, is
    # then the same for one model and dictionary (it changed with
    # --max-length: -1.03, -1.07, -1.01 for 128, 16, 4).
    whole = copy.copy(extractor)
    whole.max_length = None
    seqs = whole.token_ids(texts)
    total, count = 0.0, 0
    with torch.inference_mode(), ActivationHook(norm_module, "input") as hook:
        for _, ids, mask in whole.batches(seqs):
            hook.reset("capture")
            loaded(ids, mask)
            x = hook.captured[mask.bool()].double()
            if centre:
                x = x - x.mean(dim=-1, keepdim=True)
            scale = torch.sqrt((x * x).mean(dim=-1) + eps)
            total += float(scale.sum())
            count += int(scale.numel())
    if count == 0:
        raise ValueError("reference_texts have no tokens.")
    return total / count


def direct_path(extractor, reference_texts=None):
    """The linear map from ``extractor``'s hook point to the next-token logits.

    Parameters
    ----------
    extractor : TransformerActivationExtractor
        Fitted, on a causal language model with a hook on an MLP path.
    reference_texts : sequence of str or None, default=None
        Texts on which the final normalisation's scale is measured;
        :data:`~sparse_dict.analysis.REFERENCE_TEXTS` when None.

    Returns
    -------
    DirectPath
    """
    loaded = extractor.loaded_model()
    unembedding = _unembedding(loaded)
    if not loaded.causal:
        # A masked-language head has an unembedding too: without this, the
        # search for the hook's path to it failed on BERT's module names
        # and blamed the hook ("'mlp_post' ... is not one").
        raise _no_head(loaded, "gives logits that are not next-token predictions (a "
                               "masked-language or classification head)")
    # The block's own path first: a post-LN model has no final norm to find.
    out_projection = _out_projection(extractor, loaded)
    norm, centre, gain, eps = _final_norm(loaded)
    if gain is None:
        gain = torch.ones(unembedding.shape[1], device=unembedding.device)
    texts = REFERENCE_TEXTS if reference_texts is None else reference_texts
    scale = _reference_scale(extractor, norm, centre, eps, texts)

    def exact(weight):
        # A bf16 or fp16 checkpoint's product rounds each logit change to 3
        # significant digits: 10% of the top-10 tokens came out in another
        # order. The path is computed in float32 at least.
        weight = weight.detach()
        return weight.float() if weight.is_floating_point() and weight.element_size() < 4 \
            else weight

    return DirectPath(
        out_projection=None if out_projection is None else exact(out_projection),
        centre=centre, gain=exact(gain), norm_scale=scale, unembedding=exact(unembedding),
    )


def _fitted_extractor(extractor):
    if not isinstance(extractor, TransformerActivationExtractor):
        raise TypeError(
            "extractor must be a TransformerActivationExtractor, got "
            f"{type(extractor).__name__}."
        )
    try:
        check_is_fitted(extractor)
    except NotFittedError:
        # Fitting only loads the model and measures the hook's width. A
        # shallow copy: a user's nn.Module is run as it is, not deep-copied
        # (clone did, at every call), and the pooling stays the user's (it
        # was set to "none", and a mean-pooled dictionary refused for it).
        extractor = copy.copy(extractor).fit(["a"])
    return extractor


def check_features(features, n_components, name="features"):
    """``features`` as an int64 array of valid indices, or a clear error."""
    if features is None:
        return np.arange(n_components, dtype=np.int64)
    given = features
    # numpy's and torch's arrays and scalars as Python's ints and lists (a
    # 0-d tensor failed with "iteration over a 0-d tensor"; a tensor's items
    # are tensors, not ints).
    if hasattr(features, "tolist") and not isinstance(features, (list, tuple)):
        features = features.tolist()
    scalar = isinstance(features, Integral)
    # Element by element: numpy's own conversion of [1, [2]] or of 10**20
    # raised its errors of shapes and of overflow, naming no argument.
    if scalar:
        items = [features]
    elif isinstance(features, (str, bytes)) or not hasattr(features, "__iter__"):
        items = None
    else:
        items = list(features)
    if items is None or not all(isinstance(v, Integral) and not isinstance(v, bool)
                                for v in items):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {given!r}.")
    if not items:
        # (An IndexError from inside the computation, before.)
        raise ValueError(f"{name} is empty: give at least one feature index, or None for "
                         "every feature.")
    bad = [int(v) for v in items if not 0 <= v < n_components]
    if bad:
        what = "feature" if scalar or len(bad) == 1 else "features"
        raise ValueError(
            f"{what} {bad if len(bad) > 1 else bad[0]} out of range: the "
            f"dictionary has {n_components} features (0 to {n_components - 1})."
        )
    return np.array(items, dtype=np.int64)


def logit_effects(extractor, sae, features=None, top_k=10, *, as_frame=False,
                  reference_texts=None):
    """The tokens each feature promotes and suppresses when written at the hook.

    Each feature's atom (its row of ``sae.components_``, in the units of the
    hooked activations) is pushed through the network's linear path from the
    hook to the next-token logits: the MLP's output projection (for
    ``hook="mlp_post"``; not for ``"mlp_out"``, already after it), the final
    normalisation and the unembedding. Biases cancel, since only a change is
    measured. Later blocks are skipped, so this is the feature's direct
    effect; for a hook in the last block (all of the built-in model) it is
    the whole effect.

    The final normalisation divides the residual stream by its scale (its
    standard deviation for LayerNorm, its root mean square for RMSNorm),
    which depends on the input and makes the map nonlinear. That divisor is
    *frozen at a reference scale*, the mean of the divisor over the tokens
    of a few plain sentences (:data:`~sparse_dict.analysis.REFERENCE_TEXTS`), and the
    normalisation's gain is applied as it is: the map is then linear, the
    same for every input, and effects of different features are comparable
    (a feature twice as strong has twice the effect). The figures are
    exactly the change of the logits when the atom is added at the hook with
    the divisor held at that scale; with the real normalisation, a small
    addition changes them by the ratio of the scales and by the
    normalisation's projection, but hardly changes which tokens come first.

    Parameters
    ----------
    extractor : TransformerActivationExtractor
        Gives the model and the hook. The model must be a causal language
        model: the built-in model, or a GPT-2-, Llama- (Mistral, Qwen),
        GPT-NeoX- or OPT-style Hugging Face model; the hook must be
        ``"mlp_post"`` or ``"mlp_out"`` (or a ``module`` at one of those
        points). Fitted here if it is not fitted.
    sae : fitted dictionary
        With ``components_`` of shape (n_components, width of the hook), such
        as a :class:`~sparse_dict.SparseAutoencoderDictionary`. If its
        ``provenance_`` names another model or hook point, it is refused.
    features : int, sequence of int or None, default=None
        Which features; all when None.
    top_k : int, default=10
        Tokens per feature and direction.
    as_frame : bool, default=False
        Return a pandas DataFrame (:meth:`LogitEffects.to_frame`) instead.
    reference_texts : sequence of str or None, default=None
        Texts the reference scale is measured on; :data:`~sparse_dict.analysis.REFERENCE_TEXTS`
        when None.

    Returns
    -------
    effects : LogitEffects or pandas.DataFrame

    Raises
    ------
    ValueError
        For a model without a next-token head (an encoder such as MiniLM), a
        hook off the MLP path, a feature out of range, a dictionary whose
        width is not the hook's, or one learned at another hook point.

    See Also
    --------
    steer : Generate text with a feature added at the hook.

    Examples
    --------
    >>> from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
    >>> from sparse_dict.analysis import logit_effects
    >>> texts = ["To be, or not to be, that is the question.",
    ...          "Now is the winter of our discontent."]
    >>> ext = TransformerActivationExtractor("builtin", device="cpu").fit(texts)
    >>> sae = SparseAutoencoderDictionary(n_components=64, max_steps=20, random_state=0)
    >>> _ = sae.fit(ext.transform(texts), provenance=ext.provenance())
    >>> effects = logit_effects(ext, sae, features=[0, 5], top_k=3)
    >>> effects.promoted_tokens.shape, effects.suppressed_logits.shape
    ((2, 3), (2, 3))
    >>> bool((effects.promoted_logits[:, 0] >= effects.promoted_logits[:, 1]).all())
    True
    """
    extractor = _fitted_extractor(extractor)
    check_fitted_dictionary(sae)
    check_compatible(extractor, sae)
    components = np.asarray(sae.components_)
    features = check_features(features, components.shape[0])
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    path = direct_path(extractor, reference_texts)
    vocab = path.unembedding.shape[0]
    k = int(min(top_k, vocab))
    device, dtype = path.unembedding.device, path.unembedding.dtype
    n = features.shape[0]
    out = {name: np.empty((n, k), dtype=np.int64) for name in ("up", "down")}
    values = {name: np.empty((n, k), dtype=np.float32) for name in ("up", "down")}
    with torch.inference_mode():
        for start in range(0, n, _CHUNK):
            rows = features[start:start + _CHUNK]
            atoms = torch.as_tensor(components[rows], device=device, dtype=dtype)
            change = path.logit_change(atoms).float()
            up = torch.topk(change, k, dim=1)
            down = torch.topk(-change, k, dim=1)
            stop = start + rows.shape[0]
            out["up"][start:stop] = up.indices.cpu().numpy()
            values["up"][start:stop] = up.values.cpu().numpy()
            out["down"][start:stop] = down.indices.cpu().numpy()
            values["down"][start:stop] = -down.values.cpu().numpy()
    # A zero atom changes no logit: its top tokens would be ties broken by
    # token id ('\x00', '\x01', ...), which reads as an effect.
    empty = ~np.any(components[features], axis=1)
    if empty.any():
        warnings.warn(
            f"Features {features[empty].tolist()[:20]} have atoms of norm 0: they change no "
            "logit, so they promote and suppress no token (token ids -1, tokens '', "
            "changes 0).", UserWarning, stacklevel=2)
        for name in ("up", "down"):
            out[name][empty] = -1
            values[name][empty] = 0.0
    loaded = extractor.loaded_model()
    strings = {}
    for name in ("up", "down"):
        unique, inverse = np.unique(out[name], return_inverse=True)
        names = np.empty(unique.shape[0], dtype=object)
        names[:] = [""] * int(unique[0] < 0) + token_strings(
            loaded, unique[unique >= 0].tolist())
        strings[name] = names[inverse.reshape(out[name].shape)]
    effects = LogitEffects(
        features=features,
        promoted_ids=out["up"], promoted_tokens=strings["up"], promoted_logits=values["up"],
        suppressed_ids=out["down"], suppressed_tokens=strings["down"],
        suppressed_logits=values["down"],
        norm_scale=float(path.norm_scale), hook_name=extractor.hook_name_,
    )
    return effects.to_frame() if as_frame else effects
