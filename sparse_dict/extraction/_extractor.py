"""TransformerActivationExtractor: texts in, activations at one point of a model out."""

import itertools
import os
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.validation import check_is_fitted
from torch import nn

from sparse_dict._torch.device import resolve_device
from sparse_dict._validation import IntegerInterval
from sparse_dict._warn import warn_at_caller
from sparse_dict.extraction._hook import HOOK_POINTS, ActivationHook, StopForward, locate_hook
from sparse_dict.extraction._loading import folder_stamp, load_model, weights_sample
from sparse_dict.extraction._texts import (
    _check_texts,
    _cut,
    _encode_texts,
    _text_chunks,
    _texts_of,
    token_strings,
)

# The ``source`` of the provenance an extractor writes; dictionaries imported
# from SAELens have "SAELens" there.
PROVENANCE_SOURCE = "sparse_dict.TransformerActivationExtractor"
# The fields of ``TransformerActivationExtractor.provenance()``, in order; an
# activation store's manifest holds them all but ``n_tokens`` (it counts rows).
PROVENANCE_FIELDS = ("source", "model", "model_class", "layer", "hook", "module", "hook_name",
                     "hook_module", "hook_direction", "n_features", "pooling", "max_length",
                     "n_tokens", "corpus", "weights_sample")


class TokenIndex(NamedTuple):
    """Where each output row of an extractor comes from.

    Attributes
    ----------
    text_index : ndarray of shape (n_rows,), dtype int64
        Index of the text in the input.
    position : ndarray of shape (n_rows,), dtype int64
        Position of the token in the tokenised text (special tokens such as
        BERT's ``[CLS]`` count). -1 for rows pooled by mean or max.
    token : ndarray of shape (n_rows,), dtype object
        The token's string ('' for rows pooled by mean or max).
    """

    text_index: np.ndarray
    position: np.ndarray
    token: np.ndarray


# The parameters that choose the model and the point read (see
# TransformerActivationExtractor._check_site_unchanged).
_SITE_PARAMS = ("model", "tokenizer", "layer", "hook", "module", "device")


def _same_param(was, now):
    """Whether a parameter is the one fitted: the same object, or an equal name or number."""
    if was is now:
        return True
    if isinstance(was, nn.Module) or isinstance(now, nn.Module):
        return False
    try:
        return bool(was == now)
    except Exception:  # noqa: BLE001 - objects that cannot be compared are not the same
        return False


def _seq_first(shape, n_tokens, name):
    """Whether a hook point's activations of one text of ``n_tokens`` tokens are laid out seq-first.

    Most models give (batch, tokens, features); XLNet's blocks and torch's
    ``nn.TransformerEncoderLayer`` without ``batch_first`` give (tokens,
    batch, features), which read in the other order mixes texts and
    positions. Anything else is refused.

    Examples
    --------
    >>> _seq_first((1, 5, 16), 5, "layer0.mlp_post"), _seq_first((5, 1, 16), 5, "layer0.mlp_post")
    (False, True)
    """
    if shape[:2] == (1, n_tokens):
        return False
    if shape[:2] == (n_tokens, 1):
        return True
    raise ValueError(
        f"The hook point {name!r} gives {shape} for one text of {n_tokens} tokens: neither "
        "(batch, tokens, features) nor (tokens, batch, features); choose another layer, "
        "hook or module."
    )


def _not_run(name, module_path):
    """The error for a hook point that a forward pass of token ids never reached.

    A module outside the path that token ids take (an unused branch, another
    tower of the model) has no activations to read; named by the hook point
    the user chose and the module it resolved to.
    """
    point = repr(name) if name == module_path else f"{name!r} (module {module_path!r})"
    return ValueError(
        f"The hook point {point} did not run in the model's forward pass on token ids, "
        "so it has no activations to read; choose another layer, hook or module."
    )


class TransformerActivationExtractor(TransformerMixin, BaseEstimator):
    """Activations of a transformer at one point of one layer, for each token.

    Texts are tokenised, run through the model in batches, and the activations
    at the hooked point are returned: one float32 row per real token (padding
    excluded), texts one after another, or one row per text with ``pooling``.
    The forward pass stops at the hooked point, so later layers do no work.

    The model is loaded lazily (on ``fit``) and is not pickled when it is
    named by ``"builtin"`` or a path: an unpickled extractor reloads it. This
    keeps the extractor cheap to clone, hash and cache in
    ``Pipeline(memory=...)``, which then computes the activations of a
    training fold once rather than once per grid point.

    Parameters
    ----------
    model : "builtin", str, path-like or torch.nn.Module, default="builtin"
        ``"builtin"`` is the 1-layer language model shipped with the package
        (d_model 128, ReLU MLP of 512). A str or path names a local Hugging
        Face model folder (a sentence-transformers folder works too), or a
        folder in the built-in model's format (``train_builtin --out``),
        loaded without touching the network; any other str is a Hugging Face Hub id
        such as ``"gpt2"``, downloaded through transformers' own cache (with
        ``HF_HUB_OFFLINE=1``, only from that cache). Either is loaded as a
        causal language model when its config says so, else as the bare
        encoder, with its weights in float32 whatever precision they were
        saved in (transformers 5 would keep a bfloat16 or float16
        checkpoint's; for another precision, load the model yourself and
        pass the module). Only text models are read: a transformers model that takes
        other inputs (ViT, Wav2Vec2, or CLIP with its image tower) is refused
        by its class. Code shipped with a model is never run: a model whose
        config or tokenizer config has an ``auto_map`` is refused. A
        ``torch.nn.Module`` is used as it is with ``tokenizer``; it is put in
        eval mode, and moved only when ``device`` is not "auto".
    layer : int, default=0
        Index of the residual block to read; negative counts from the end.
    hook : {"mlp_post", "mlp_out", "resid_pre", "resid_post"}, default="mlp_post"
        The point in the block: the MLP's hidden activations after the
        nonlinearity, the MLP's output (before it is added to the residual
        stream), or the residual stream entering or leaving the block.
    module : str or None, default=None
        A dotted module path (as in ``model.named_modules()``), such as
        ``"encoder.layer.1.intermediate"``; its output is read instead of
        ``layer`` and ``hook``.
    tokenizer : callable or None, default=None
        Needed with an ``nn.Module`` model and text input. Called as
        ``tokenizer(list_of_texts)`` (with ``max_length=`` if it takes it) and
        returning a mapping with ``input_ids`` (and optionally
        ``attention_mask``) or a list of id lists. Hugging Face tokenizers
        work. Ignored for "builtin" and paths, which bring their own.
    pooling : {"none", "mean", "max", "last"}, default="none"
        "none" gives one row per token, the others one row per text (the mean
        or maximum over its tokens, or its last token). Per-token rows cannot
        be matched to a ``y`` with one value per text, so ``fit`` with ``y``
        needs pooling.
    max_length : int or None, default=128
        Keep at most this many tokens of each text (special tokens included),
        and never more than the model has positions for. None means the
        model's maximum. Where it cuts texts that the model could have read
        further, ``transform`` warns with how many (MiniLM takes 512; at
        128, 23 of 60 texts of the built-in corpus were cut).
    batch_size : int, default=32
        Texts per forward pass.
    device : str, default="auto"
        "auto" (a GPU if there is one), "cpu", "cuda" or "cuda:N".
    verbose : int, default=0
        Show a progress bar over batches when positive.

    Attributes
    ----------
    n_features_out_ : int
        Width of the activations.
    hook_module_ : str
        Dotted path of the hooked module.
    hook_name_ : str
        Readable name of the point, such as "layer0.mlp_post" or the module
        path; prefixes the feature names.
    device_ : str
        The device the model runs on.

    See Also
    --------
    sparse_dict.extraction.splice_evaluation : How much of the model's loss survives replacing the
        activations by a dictionary's reconstruction.
    sparse_dict.SparseAutoencoderDictionary : Learns a dictionary of the
        activations.

    Notes
    -----
    Texts are batched longest first to waste little work on padding; the
    output is in input order. :meth:`transform_with_tokens` also gives, for
    each row, the text, position and token string it comes from.

    Token ids given instead of texts are used as they are (no special tokens
    are added), cut to ``max_length``.

    The hook raises a private exception once it has the activations, which
    ends the forward pass there; with ``hook="mlp_post"`` not even the MLP's
    output projection runs. Models named by "builtin" or a path are shared by
    all extractors of a process (the last two loaded are kept), so clones made
    by GridSearchCV do not reload them. An ``nn.Module`` passed as ``model``
    is a parameter, so it is cloned and pickled with the extractor.

    Examples
    --------
    >>> import torch
    >>> from sparse_dict.extraction import TransformerActivationExtractor
    >>> from sparse_dict.models.builtin import TinyTransformer, TinyTransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> lm = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16))
    >>> ext = TransformerActivationExtractor(lm, layer=0, hook="mlp_post", device="cpu")
    >>> acts, index = ext.fit([[5, 6, 7], [8, 9]]).transform_with_tokens([[5, 6, 7], [8, 9]])
    >>> acts.shape, acts.dtype
    ((5, 512), dtype('float32'))
    >>> index.text_index.tolist(), index.position.tolist()
    ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    >>> ext.get_feature_names_out()[:2].tolist()
    ['layer0.mlp_post_0', 'layer0.mlp_post_1']
    """

    _parameter_constraints = {
        "model": [str, os.PathLike, nn.Module],
        "layer": [IntegerInterval(None, None, closed="neither")],
        "hook": [StrOptions(set(HOOK_POINTS))],
        "module": [str, None],
        "tokenizer": [callable, None],
        "pooling": [StrOptions({"none", "mean", "max", "last"})],
        "max_length": [IntegerInterval(1, None, closed="left"), None],
        "batch_size": [IntegerInterval(1, None, closed="left")],
        "device": [str],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        model="builtin",
        *,
        layer=0,
        hook="mlp_post",
        module=None,
        tokenizer=None,
        pooling="none",
        max_length=128,
        batch_size=32,
        device="auto",
        verbose=0,
    ):
        self.model = model
        self.layer = layer
        self.hook = hook
        self.module = module
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    # -- sklearn plumbing ---------------------------------------------------

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        # The model is reloaded from its name or path, never pickled with the
        # extractor (an nn.Module given as `model` is a parameter and travels
        # as one).
        state.pop("_loaded", None)
        # A folder's stamp, read now: joblib.Memory keys its cache on the
        # pickled state, and weights saved again under the same path must
        # not give the activations of the old ones.
        stamp = folder_stamp(self.model)
        if stamp is not None:
            state["_model_stamp"] = stamp
        return state

    def __setstate__(self, state):
        state = dict(state)
        state.pop("_model_stamp", None)
        super().__setstate__(state)

    # -- the model, and the small interface splicing uses ---------------------

    def _device(self):
        # With device="auto" a user's module stays where the user put it.
        if isinstance(self.model, nn.Module) and self.device == "auto":
            return None
        return resolve_device(self.device)

    def _load_model(self):
        return load_model(self.model, self.tokenizer, self._device(), self.verbose)

    def loaded_model(self):
        """The model this extractor runs, loaded now if it is not yet.

        Returns
        -------
        LoadedModel
            The torch module (``.model``), its tokenizer (``.tokenizer``),
            device, and a call ``loaded(input_ids, attention_mask)`` that runs
            its forward pass.
        """
        self._check_site_unchanged()
        loaded = getattr(self, "_loaded", None)
        if loaded is None:
            loaded = self._load_model()
            self._loaded = loaded
        return loaded

    def _site_params(self):
        return tuple(getattr(self, name) for name in _SITE_PARAMS)

    def _check_site_unchanged(self):
        """Refuse to run a fitted extractor whose model or hook point was changed by ``set_params``.

        The fitted model, hook module and width would be used while the
        parameters (and so the provenance) named others: a MiniLM set after
        fitting the built-in model gave the built-in model's 512 columns.
        ``max_length``, ``batch_size``, ``pooling`` and ``verbose`` apply as
        they are set.
        """
        fitted = getattr(self, "_fitted_site", None)
        if fitted is None:
            return
        changed = [name for name, was, now in zip(_SITE_PARAMS, fitted, self._site_params())
                   if not _same_param(was, now)]
        if changed:
            raise NotFittedError(
                f"{', '.join(changed)} changed since this extractor was fitted (by set_params "
                "or assignment): call fit again, which loads the model and finds the hook "
                "point now named."
            )

    def token_ids(self, X, *, keep="start"):
        """Token ids of each text of ``X``, cut to ``max_length``.

        Parameters
        ----------
        X : list of str, or list of lists of int
            Texts, or token ids of already tokenised texts (checked against
            the model's vocabulary).
        keep : {"start", "end"}, default="start"
            Which tokens of a longer text are kept: its first ``max_length``
            (as :meth:`transform` reads it), or its last, for a model that
            is to continue the text (a Hugging Face tokenizer's special
            tokens stay where it puts them).

        Returns
        -------
        token_ids : list of lists of int
        """
        if keep not in ("start", "end"):
            raise ValueError(f"keep must be 'start' or 'end', got {keep!r}.")
        X, pretokenized = _check_texts(X)
        return self._tokenize(X, pretokenized, self.loaded_model(), keep=keep)

    def batches(self, token_ids, desc=None):
        """Padded batches of ``token_ids`` on the model's device, longest texts first.

        Parameters
        ----------
        token_ids : list of lists of int
            As :meth:`token_ids` returns them.
        desc : str or None, default=None
            Label of the progress bar shown when ``verbose`` is set.

        Yields
        ------
        text_indices : list of int
            Which texts the batch holds, row by row (empty texts are left out).
        input_ids, attention_mask : torch.LongTensor of shape (n_texts, n_tokens)
        """
        loaded = self.loaded_model()
        chunks = self._chunks(np.array([len(s) for s in token_ids]), loaded.takes_mask)
        batches = self._batches(token_ids, loaded, chunks)
        if desc is None or not self.verbose:
            yield from batches
            return
        from tqdm.auto import tqdm

        yield from tqdm(batches, total=len(chunks), desc=desc)

    def activation_hook(self):
        """A hook on the fitted hook point, to use as a context manager.

        Returns
        -------
        ActivationHook
            Its ``reset(mode, replacement=None)`` makes the next forward pass
            stop at the hook point ("stop"), run through ("capture"), run
            with the activations replaced by a tensor ("replace"), or by a
            function of them ("edit"); ``captured`` holds the activations
            seen.
        """
        check_is_fitted(self)
        loaded = self.loaded_model()
        return ActivationHook(loaded.submodule(self.hook_module_), self._hook_direction,
                              root=loaded.model, seq_first=getattr(self, "_seq_first", False))

    def provenance(self, *, n_tokens=None, corpus=None):
        """Where this extractor's activations come from, as a JSON-ready dict.

        Pass it to :meth:`SparseAutoencoderDictionary.fit
        <sparse_dict.SparseAutoencoderDictionary.fit>` (``provenance=``):
        the dictionary keeps it in ``provenance_`` and in its saved folder,
        so that :func:`sparse_dict.analysis.logit_effects`,
        :func:`sparse_dict.analysis.steer` and ``sparse-dict report`` /
        ``steer`` know the model and hook point without being told again,
        and refuse an extractor that reads another point.

        Parameters
        ----------
        n_tokens : int or None, default=None
            Number of activation rows the dictionary is fitted on; ``fit``
            fills it in from ``X`` when None.
        corpus : str or None, default=None
            A description of the texts (a file name, a data set and split).

        Returns
        -------
        provenance : dict
            ``source`` ("sparse_dict.TransformerActivationExtractor"),
            ``model`` ("builtin", a Hub id, the absolute path of a local
            folder, or None for a torch module passed as ``model``),
            ``model_class``, ``layer``, ``hook``, ``module``, ``hook_name``,
            ``hook_module``, ``hook_direction`` ("input" or "output" of that
            module), ``n_features``, ``pooling``, ``max_length`` (the
            length texts are cut to, the model's limit included), ``n_tokens``,
            ``corpus`` and ``weights_sample`` (64 of the model's weights,
            spread over its tensors, by which
            :func:`~sparse_dict.analysis.check_compatible` tells its
            checkpoint from another of the same shapes).

        Examples
        --------
        >>> from sparse_dict import TransformerActivationExtractor
        >>> ext = TransformerActivationExtractor("builtin", device="cpu").fit(["to be"])
        >>> p = ext.provenance(corpus="two words")
        >>> p["model"], p["hook_name"], p["n_features"], p["corpus"]
        ('builtin', 'layer0.mlp_post', 512, 'two words')
        """
        check_is_fitted(self)
        loaded = self.loaded_model()
        if isinstance(self.model, nn.Module):
            model = None  # a user's module has no name it could be reloaded by
        elif isinstance(self.model, str) and self.model == "builtin":
            model = "builtin"
        else:
            path = Path(self.model).expanduser()
            model = str(path.resolve()) if path.is_dir() else str(self.model)
        limits = [n for n in (self.max_length, loaded.max_positions) if n is not None]
        return {
            "source": PROVENANCE_SOURCE,
            "model": model,
            "model_class": type(loaded.model).__name__,
            "layer": int(self.layer),
            "hook": self.hook,
            "module": self.module,
            "hook_name": self.hook_name_,
            "hook_module": self.hook_module_,
            # Input or output of that module: with hook_module, the hook point
            # itself, however it was named (layer/hook or module=).
            "hook_direction": self._hook_direction,
            "n_features": int(self.n_features_out_),
            "pooling": self.pooling,
            # The length texts were really cut to: the model's own limit caps it.
            "max_length": int(min(limits)) if limits else None,
            "n_tokens": None if n_tokens is None else int(n_tokens),
            "corpus": None if corpus is None else str(corpus),
            "weights_sample": weights_sample(loaded.model),
        }

    def _progress_label(self, n_texts):
        # Says what runs, on how many texts and on which model, so that the
        # bars of several extractions (or of extraction and splicing) are
        # told apart.
        model = "a torch module" if isinstance(self.model, nn.Module) else f"model {self.model}"
        return f"Extracting {self.hook_name_} activations of {n_texts:,} texts ({model})"

    # -- fit / transform ------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Load the model, check the hook point and measure its width.

        Nothing is learned from ``X``; it is validated, and its first text is
        run once to find the width of the activations.

        Parameters
        ----------
        X : list of str, or list of lists of int
            Texts, or token ids of already tokenised texts.
        y : None or array-like of shape (n_texts,)
            Allowed only with pooling, where rows are texts.

        Returns
        -------
        self : TransformerActivationExtractor
        """
        if y is not None and self.pooling == "none":
            raise ValueError(
                "pooling='none' gives one row per token, which cannot be matched to a "
                "y with one value per text; set pooling='mean', 'max' or 'last', or "
                "fit without y."
            )
        X, pretokenized = _check_texts(X)
        # Everything is worked out before anything is stored, so that a fit
        # that fails leaves a fitted extractor as it was.
        loaded = self._load_model()
        site = locate_hook(loaded, layer=self.layer, hook=self.hook, module=self.module)
        seqs = self._tokenize(X[:1], pretokenized, loaded)
        probe = seqs[0][:8] or [loaded.pad_token_id]
        # One text of two tokens or more: its activations' first two sizes,
        # (1, tokens) or (tokens, 1), tell the layout apart.
        if len(probe) < min(2, loaded.max_positions or 2):
            probe = probe * 2
        ids = torch.tensor([probe], dtype=torch.long, device=loaded.device)
        module = loaded.submodule(site.module_path)
        with torch.inference_mode(), ActivationHook(module, site.direction, root=loaded.model,
                                                    seq_first=None) as hook:
            hook.reset("stop")
            try:
                loaded(ids, torch.ones_like(ids))
            except StopForward:
                pass
            if hook.captured is None:
                raise _not_run(site.name, site.module_path)
            n_features_out = int(hook.captured.shape[-1])
            seq_first = _seq_first(tuple(hook.captured.shape), len(probe), site.name)
        self._loaded = loaded
        self.n_features_out_ = n_features_out
        self.hook_module_ = site.module_path
        self.hook_name_ = site.name
        self.device_ = str(loaded.device)
        self._hook_direction = site.direction
        self._seq_first = seq_first
        self._fitted_site = self._site_params()
        return self

    def fit_transform(self, X, y=None, **fit_params):
        """Fit to ``X``, then give its activations (as :meth:`transform`).

        ``X`` may be read once only (a generator, an open file): it is
        read into a list first, where fit would spend it and transform find
        it empty.

        Parameters
        ----------
        X : iterable of str, or of lists of int
        y : None or array-like of shape (n_texts,)
            As in :meth:`fit`.

        Returns
        -------
        X_new : ndarray of shape (n_tokens, n_features_out_) or (n_texts, n_features_out_)
        """
        if isinstance(X, Iterator):
            X = list(_texts_of(X))
        return super().fit_transform(X, y, **fit_params)

    def _tokenize(self, X, pretokenized, loaded, keep="start"):
        return self._tokenize_counted(X, pretokenized, loaded, keep)[0]

    def _tokenize_counted(self, X, pretokenized, loaded, keep="start"):
        """Token ids of each text, and how many texts were cut (None: not known)."""
        # Longer sequences than the model has positions for would fail inside
        # the model, so the model's limit caps max_length.
        limits = [n for n in (self.max_length, loaded.max_positions) if n is not None]
        max_length = min(limits) if limits else None
        if pretokenized:
            seqs = [[int(i) for i in x] for x in X]
            n_cut = 0 if max_length is None else sum(len(s) > max_length for s in seqs)
            seqs = seqs if max_length is None else [_cut(s, max_length, keep) for s in seqs]
            vocab = loaded.vocab_size()
            if vocab is not None:
                for i, s in enumerate(seqs):
                    if s and (min(s) < 0 or max(s) >= vocab):
                        raise ValueError(
                            f"Token ids of text {i} fall outside the model's vocabulary "
                            f"0..{vocab - 1}."
                        )
            return seqs, n_cut
        return _encode_texts(loaded.tokenizer, X, max_length, keep=keep)

    def _warn_cut(self, n_cut, n_texts, loaded):
        """Say how many texts ``max_length`` cut, where the model would have taken more.

        Where the model's own limit cuts them, nothing can be raised; that
        is said by the docs, not at every extraction.
        """
        limit = loaded.max_positions
        if not n_cut or self.max_length is None or (limit is not None
                                                    and limit <= self.max_length):
            return
        more = (f"this model takes up to {limit:,}" if limit is not None
                else "max_length=None keeps every token")
        warn_at_caller(
            f"{n_cut:,} of {n_texts:,} texts have more than max_length={self.max_length} "
            f"tokens and were cut to their first {self.max_length}: the rest of each is not "
            f"extracted. Raise max_length ({more}) to keep more of them, or split long "
            "texts.", UserWarning)

    def _batches(self, seqs, loaded, chunks):
        """(text indices, input_ids, attention_mask) batches of ``chunks`` (:meth:`_chunks`)."""
        lengths = np.array([len(s) for s in seqs])
        for chunk in chunks:
            width = int(lengths[chunk[0]])
            ids = torch.full((len(chunk), width), loaded.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : lengths[i]] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            yield chunk, ids.to(loaded.device), mask.to(loaded.device)

    def _chunks(self, lengths, padded):
        """Texts of each batch, longest first; of one length each unless ``padded``.

        A module whose ``forward`` takes no ``attention_mask`` cannot be told
        which positions are padding, and a bidirectional one attends to them:
        its rows changed with the batch size by up to 16% (two texts of 2 and
        3 tokens beside one of 8). Its batches hold texts of one length.
        """
        order = np.array([i for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0],
                         dtype=np.int64)
        # Runs of one length (the whole order where padding is allowed).
        cuts = [] if padded else np.flatnonzero(np.diff(lengths[order])) + 1
        return [run[start : start + self.batch_size].tolist()
                for run in np.split(order, cuts)
                for start in range(0, len(run), self.batch_size)]

    def _extract(self, X):
        """Activations of ``X`` and, per text, its token ids."""
        check_is_fitted(self)
        X, pretokenized = _check_texts(X)
        loaded = self.loaded_model()
        seqs, n_cut = self._tokenize_counted(X, pretokenized, loaded)
        self._warn_cut(n_cut, len(seqs), loaded)
        return self._activations(seqs, self._progress_label(len(seqs))), seqs

    @staticmethod
    def _check_poolable(lengths, first=0, stored=0):
        """Raise where a text of these token counts has none to pool.

        ``first`` is the offset of the first text; ``stored`` the texts a
        store already holds, which a resume keeps.
        """
        empty = np.flatnonzero(np.asarray(lengths) == 0)
        if empty.size:
            keep = (f" The store keeps the {stored:,} texts before it: mend or remove that "
                    "text (those before it unchanged) and resume." if stored else "")
            raise ValueError(
                f"Text {first + int(empty[0])} has no tokens, so it cannot be pooled.{keep}"
            )

    def _activations(self, seqs, desc=None, first=0):
        """Activations of the token-id lists ``seqs``, in their order.

        ``first`` is the index of ``seqs[0]`` in the whole input, for messages.
        """
        loaded = self.loaded_model()
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        d = self.n_features_out_
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if self.pooling == "none":
            out = np.empty((int(offsets[-1]), d), dtype=np.float32)
        else:
            self._check_poolable(lengths, first)
            out = np.empty((len(seqs), d), dtype=np.float32)
        with torch.inference_mode(), self.activation_hook() as hook:
            for chunk, ids, mask in self.batches(seqs, desc):
                hook.reset("stop")
                try:
                    loaded(ids, mask)
                except StopForward:
                    pass
                acts = hook.captured
                if acts is None:
                    raise _not_run(self.hook_name_, self.hook_module_)
                self._store(out, acts, mask, chunk, lengths, offsets)
        return out

    def _row_index(self, seqs):
        """Text index, position and token id of each output row of ``seqs``.

        Positions and token ids are -1 for rows pooled by mean or max.
        """
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        if self.pooling == "none":
            text_index = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
            position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(
                np.cumsum(lengths) - lengths, lengths)
            token_id = np.fromiter((t for s in seqs for t in s), dtype=np.int64,
                                   count=int(lengths.sum()))
        else:
            text_index = np.arange(len(seqs), dtype=np.int64)
            if self.pooling == "last":
                position = lengths - 1
                token_id = np.array([s[-1] for s in seqs], dtype=np.int64)
            else:
                position = np.full(len(seqs), -1, dtype=np.int64)
                token_id = np.full(len(seqs), -1, dtype=np.int64)
        return text_index, position, token_id

    def _store(self, out, acts, mask, chunk, lengths, offsets):
        if self.pooling == "none":
            # Boolean indexing keeps row-major order: text by text, position by
            # position, which is the layout of `out` for each text.
            real = acts[mask.bool()].float().cpu().numpy()
            start = 0
            for i in chunk:
                n = int(lengths[i])
                out[offsets[i] : offsets[i] + n] = real[start : start + n]
                start += n
            return
        m = mask.bool().unsqueeze(-1)
        acts = acts.float()
        if self.pooling == "mean":
            # masked_fill, not a product: a model may leave NaN at padded
            # positions, and NaN times 0 is NaN.
            pooled = acts.masked_fill(~m, 0.0).sum(1) / m.sum(1)
        elif self.pooling == "max":
            pooled = acts.masked_fill(~m, float("-inf")).amax(1)
        else:
            last = mask.sum(1) - 1
            pooled = acts[torch.arange(acts.shape[0], device=acts.device), last]
        out[np.asarray(chunk)] = pooled.cpu().numpy()

    def transform(self, X):
        """Activations at the hooked point.

        Parameters
        ----------
        X : list of str, or list of lists of int
            Texts, or token ids of already tokenised texts.

        Returns
        -------
        X_new : ndarray of shape (n_tokens, n_features_out_) or (n_texts, n_features_out_)
            float32; one row per real token, text after text, or one per text
            with pooling.
        """
        return self._with_token_rows_index(X, self._extract(X)[0])

    def _with_token_rows_index(self, X, out):
        """``out`` as a DataFrame of its own rows where pandas output would index it by ``X``'s.

        scikit-learn's pandas output keeps the input's index, which a
        Series of texts has one entry a text: rows of tokens (pooling
        "none") then failed ("Shape of passed values is (32, 512), indices
        imply (4, 512)"). They are numbered 0, 1, ... instead, as for a
        list of texts; transform_with_tokens says which text each is from.
        """
        # (A list's .index is a method, not an index.)
        if (self.pooling != "none" or not hasattr(X, "index") or isinstance(X, list)
                or _get_output_config("transform", self)["dense"] != "pandas"):
            return out
        import pandas as pd

        return pd.DataFrame(out, columns=self.get_feature_names_out())

    def transform_with_tokens(self, X):
        """Activations, and for each row the text, position and token it comes from.

        Parameters
        ----------
        X : list of str, or list of lists of int

        Returns
        -------
        X_new : ndarray of shape (n_rows, n_features_out_)
            As :meth:`transform`.
        index : TokenIndex
            ``text_index``, ``position`` and ``token`` arrays, one entry per
            row of ``X_new``.
        """
        out, seqs = self._extract(X)
        text_index, position, token_id = self._row_index(seqs)
        token = np.full(len(token_id), "", dtype=object)
        real = token_id >= 0
        token[real] = token_strings(self.loaded_model(), token_id[real].tolist())
        return out, TokenIndex(text_index, position, token)

    def transform_to_disk(self, X, path, *, resume=False, overwrite=False, chunk_texts=256,
                          corpus=None):
        """Write the activations of ``X`` to an on-disk store, chunk by chunk.

        The texts are read ``chunk_texts`` at a time from ``X``, which may be
        any iterable (a generator, an open file): neither the texts nor the
        activations are ever held whole in memory, so the corpus may be far
        larger than memory. Each chunk is on the disk before the store counts
        it, so an interrupted extraction (an error, Ctrl-C, a killed process,
        a crash) is continued with ``resume=True``, and the store then holds
        exactly the rows an uninterrupted extraction would have written.

        Parameters
        ----------
        X : iterable of str, or of lists of int
            Texts, or token ids of already tokenised texts, read once, in order.
            An open text file gives one text per line, without its line
            break (as ``sparse-dict extract`` reads a file's lines).
        path : str or path-like
            The store's folder; see :class:`~sparse_dict.extraction.ActivationStore`.
        resume : bool, default=False
            Continue the extraction in the store at ``path``: the texts it has
            done are read again from ``X`` (and checked to be the same) but
            not extracted. A ``path`` that does not exist is started afresh.
            Refused if the store was made by another model, layer, hook,
            pooling or ``max_length``.
        overwrite : bool, default=False
            Replace the store at ``path`` (only a store: any other file or
            folder is never replaced). The old store is removed when the new
            extraction starts.
        chunk_texts : int, default=256
            Texts per chunk: the unit of work made durable at once, and of
            what is redone after an interruption. Memory grows with it.
        corpus : str or None, default=None
            A description of the texts (a file name, a data set's name),
            recorded in the store's manifest as ``corpus``.

        Returns
        -------
        store : ActivationStore
            The store, opened for reading: ``store.activations`` is a
            read-only ``np.memmap`` that
            :meth:`SparseAutoencoderDictionary.fit
            <sparse_dict.SparseAutoencoderDictionary.fit>` reads batch by batch.

        Raises
        ------
        FileExistsError
            If ``path`` exists and neither ``resume`` nor ``overwrite`` is
            given, or is not a store.
        ValueError
            On resuming, if the extraction or the texts differ from those of
            the store.

        Notes
        -----
        An extractor that is not fitted is fitted first, as :meth:`fit` would,
        on the first chunk of texts. Rows are stored text after text, in the
        order of ``X``, as :meth:`transform` returns them; the store also
        holds each row's text index, position and token (see
        :class:`~sparse_dict.extraction.ActivationStore`). Texts are batched
        longest first within a chunk, so larger chunks waste less work on
        padding.

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from sparse_dict.extraction import TransformerActivationExtractor
        >>> texts = ["To be, or not to be", "that is the question"] * 3
        >>> ext = TransformerActivationExtractor(device="cpu")
        >>> path = os.path.join(tempfile.mkdtemp(), "acts")
        >>> store = ext.transform_to_disk(iter(texts), path, chunk_texts=2)
        >>> np.allclose(store.activations, ext.transform(texts), atol=1e-5)
        True
        >>> np.load(os.path.join(path, "activations.npy"), mmap_mode="r").shape
        (36, 512)
        """
        from sparse_dict.extraction._store import StoreWriter, open_store

        if isinstance(chunk_texts, bool) or not isinstance(chunk_texts, Integral) \
                or chunk_texts < 1:
            raise ValueError(f"chunk_texts must be a positive integer, got {chunk_texts!r}.")
        if corpus is not None and not isinstance(corpus, str):
            raise TypeError(f"corpus must be a str or None, got {type(corpus).__name__}.")
        chunks = _text_chunks(X, chunk_texts)
        # The first chunk is read before anything is written, so that bad input
        # (and the fit of an unfitted extractor) fails before the store exists.
        first = next(chunks)
        if getattr(self, "n_features_out_", None) is None:
            self.fit(first[1][:1])
        first_seqs = None
        if self.pooling != "none":
            # A text without tokens cannot be pooled: said before the store
            # exists too (found while writing, it left an empty store that
            # only --overwrite could clear). The tokens serve the chunk below.
            first_seqs = self._tokenize_counted(first[1], first[2], self.loaded_model())
            self._check_poolable([len(s) for s in first_seqs[0]], first[0])
        n_cut = n_extracted = 0
        writer = StoreWriter(path, self._store_config(corpus), resume=resume,
                             overwrite=overwrite)
        with writer, self._disk_progress(X, writer.n_texts) as bar:
            # The first text with rows is extracted again once the texts done
            # are known to be the same, to check the model is too.
            stored = writer.first_text_rows() if writer.n_texts else None
            for start, texts, pretokenized in itertools.chain([first], chunks):
                done = writer.n_texts - start
                if done > 0:
                    # Texts extracted before the interruption: checked, not redone.
                    # (done may reach past this chunk, whose texts alone are here.)
                    if stored is not None and start <= stored[0] < start + min(done, len(texts)):
                        probe = texts[stored[0] - start]
                    writer.skip(texts[:done], pretokenized)
                    if done <= len(texts) and stored is not None:
                        self._check_same_activations(probe, pretokenized, *stored, path)
                    texts, start = texts[done:], start + len(texts[:done])
                    if not texts:
                        continue
                seqs, cut = (first_seqs if texts is first[1] and first_seqs is not None
                             else self._tokenize_counted(texts, pretokenized,
                                                         self.loaded_model()))
                n_cut, n_extracted = n_cut + (cut or 0), n_extracted + len(texts)
                if self.pooling != "none":
                    self._check_poolable([len(q) for q in seqs], start, writer.n_texts)
                acts = self._activations(seqs, first=start)
                text_index, position, token_id = self._row_index(seqs)
                index = np.column_stack([text_index + start, position, token_id])
                writer.append(texts, pretokenized, acts, index,
                              n_tokens=sum(len(s) for s in seqs))
                bar.update(len(texts))
            writer.finish(self._vocabulary(writer.manifest["max_token_id"]))
        # Once for the whole extraction, not a chunk at a time.
        self._warn_cut(n_cut, n_extracted, self.loaded_model())
        return open_store(path)

    def _check_same_activations(self, text, pretokenized, text_index, stored, path):
        """Refuse to resume a store whose first text this model reads otherwise.

        The manifest names the model, but a folder or a module can hold other
        weights under the same name; one text extracted again tells. The
        tolerance allows for other batching and for a GPU's rounding, not for
        other weights.
        """
        seqs = self._tokenize([text], pretokenized, self.loaded_model())
        again = self._activations(seqs)
        scale = float(np.linalg.norm(stored))
        if again.shape != stored.shape or (
            float(np.linalg.norm(again - stored)) > 0.05 * scale + 1e-6
        ):
            raise ValueError(
                f"This extractor gives other activations for text {text_index} than those "
                f"stored in {path}: the store was made with another model or other "
                "weights. Resume it with the same model, or start again (overwrite=True, "
                "--overwrite on the command line)."
            )

    def _store_config(self, corpus):
        """What the manifest of a store records about this extraction: its provenance."""
        config = self.provenance(corpus=corpus)
        # The store counts its own rows and tokens as it grows; its
        # provenance() fills n_tokens in from them.
        del config["n_tokens"]
        config["dtype"] = "float32"
        return config

    def _vocabulary(self, max_token_id):
        """The token string of every id up to the vocabulary's size (or ``max_token_id``)."""
        loaded = self.loaded_model()
        size = max(loaded.vocab_size() or 0, max_token_id + 1)
        return token_strings(loaded, range(size))

    def _disk_progress(self, X, done):
        """A progress bar over texts when ``verbose`` is set, else one that shows nothing."""
        from tqdm.auto import tqdm

        total = len(X) if hasattr(X, "__len__") else None
        model = "a torch module" if isinstance(self.model, nn.Module) else f"model {self.model}"
        return tqdm(total=total, initial=done, unit="text", disable=not self.verbose,
                    desc=f"Extracting {self.hook_name_} activations to disk ({model})")

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns: the hook's name and the unit index.

        Parameters
        ----------
        input_features : ignored

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        return np.asarray(
            [f"{self.hook_name_}_{i}" for i in range(self.n_features_out_)], dtype=object
        )


