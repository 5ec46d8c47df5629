"""Activations of transformer models, as a scikit-learn transformer, and splicing.

:class:`TransformerActivationExtractor` turns texts into the activations of a
transformer at one point of one layer (by default the MLP post-activation),
one row per real token or one pooled row per text, so that a sparse
dictionary can be learned on them inside a :class:`~sklearn.pipeline.Pipeline`.

:func:`splice_evaluation` runs the model again with those activations replaced
by a fitted dictionary's reconstruction and reports how much of the model's
behaviour survives ("loss recovered").
"""

import inspect
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from difflib import get_close_matches
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

__all__ = ["TokenIndex", "SpliceResult", "TransformerActivationExtractor", "splice_evaluation"]

HOOK_POINTS = ("mlp_post", "mlp_out", "resid_pre", "resid_post")

# Where the list of residual blocks lives in the model families we know:
# the built-in model, BERT-likes, GPT-2, Llama/Mistral, GPT-NeoX, OPT/BART.
_BLOCK_LIST_PATHS = (
    "blocks",
    "encoder.layer",
    "transformer.h",
    "model.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "encoder.layers",
    "layers",
    "h",
)

# Candidate sites of a named point, relative to one block, as (submodule,
# "output" of that module or "input" to it). The MLP post-activation is the
# input of the MLP's output projection where the activation module alone would
# miss a gate (Llama's act_fn output is multiplied by up_proj afterwards).
_SITES = {
    "mlp_post": (
        ("mlp.act", "output"),
        ("intermediate", "output"),
        ("mlp.down_proj", "input"),
        ("mlp.fc_out", "input"),
        ("mlp.c_proj", "input"),
        ("mlp.fc2", "input"),
        ("mlp.dense_4h_to_h", "input"),
        ("fc2", "input"),
    ),
    "mlp_out": (
        ("mlp", "output"),
        ("output.dense", "output"),
        ("fc2", "output"),
    ),
    "resid_pre": (("", "input"),),
    "resid_post": (("", "output"),),
}

# Loaded models by (source, device): clones and unpickled copies made by
# GridSearchCV or Pipeline(memory=...) then share one model instead of each
# reloading it. Two entries are enough for "one model, maybe two devices".
_MODEL_CACHE = OrderedDict()
_MODEL_CACHE_SIZE = 2


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the activations are taken."""


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


class _Loaded:
    """A model ready to run: the module, its tokenizer and where its blocks are."""

    def __init__(self, model, tokenizer, device, kind, max_positions=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.kind = kind
        self.max_positions = max_positions
        self.blocks_path, self.blocks = _find_blocks(model)
        forward = inspect.signature(model.forward).parameters
        self.takes_mask = "attention_mask" in forward or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in forward.values()
        )
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def vocab_size(self):
        config = getattr(self.model, "config", None)
        size = getattr(config, "vocab_size", None)
        if size is None and self.tokenizer is not None:
            try:
                size = len(self.tokenizer)
            except TypeError:
                size = getattr(self.tokenizer, "vocab_size", None)
        return size

    def __call__(self, input_ids, attention_mask):
        if self.kind == "hf":
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.takes_mask:
            return self.model(input_ids, attention_mask=attention_mask)
        return self.model(input_ids)


def _find_blocks(model):
    for path in _BLOCK_LIST_PATHS:
        module = _submodule(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    return None, None


def _submodule(root, path):
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts):
    return ".".join(p for p in parts if p)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _hf_model_dir(path):
    """The folder holding config.json: the path itself, or for a
    sentence-transformers folder the Transformer module's subfolder."""
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        import json

        for entry in json.loads(modules.read_text()):
            if entry.get("type", "").endswith("models.Transformer"):
                sub = path / entry.get("path", "")
                if (sub / "config.json").is_file():
                    return sub
    raise ValueError(
        f"model={str(path)!r} is a folder but not a Hugging Face model: it has no "
        "config.json (nor a sentence-transformers modules.json pointing to one)."
    )


def _load_hf(path, device, verbose):
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError(
            "Loading a model from a path needs the 'transformers' package: "
            "pip install 'sparse_dict[hf]'."
        ) from exc
    root = _hf_model_dir(path)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        causal = any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or ())
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(root, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device).eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    return _Loaded(model, tokenizer, device, "hf", max_positions)


def _load_builtin(device):
    from sparse_dict.models.builtin import load_builtin_model

    model, tokenizer = load_builtin_model(device=device)
    return _Loaded(model.eval(), tokenizer, device, "builtin", model.config.max_len)


def _load_module(model, tokenizer, device):
    if device is None:
        # With device="auto" a user's module stays where the user put it.
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        model.to(device)
    # Dropout and the like must not make activations random.
    model.eval()
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_len", None) or getattr(
        config, "max_position_embeddings", None
    )
    return _Loaded(model, tokenizer, device, "module", max_positions)


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


def _is_id_sequence(x):
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and (x.dtype.kind in "iu" or x.size == 0)
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not torch.is_floating_point(x)
    if isinstance(x, (list, tuple)):
        # The exact-type test is the fast path for the usual lists of ints;
        # isinstance on the Integral ABC would cost a fifth of an extraction.
        return all(type(i) is int for i in x) or all(
            isinstance(i, (Integral, np.integer)) and not isinstance(i, bool) for i in x
        )
    return False


def _check_texts(X):
    """Validate the input: a non-empty sequence of strings, or of token-id lists.

    Returns the list and whether it holds token ids.
    """
    if isinstance(X, (str, bytes)):
        raise TypeError(
            "Iterable over raw texts expected, string object received: pass a "
            "list of texts, e.g. [text] rather than text."
        )
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype.kind in "iu":
        X = list(X)
    elif isinstance(X, np.ndarray) and X.ndim != 1:
        raise ValueError(
            f"Expected a 1-D sequence of texts, got an array of shape {X.shape}."
        )
    try:
        X = list(X)
    except TypeError:
        raise TypeError(
            f"X must be a list of texts (or of token-id lists), got {type(X).__name__}."
        ) from None
    if not X:
        raise ValueError("X is empty: expected at least one text.")
    pretokenized = not isinstance(X[0], str)
    if pretokenized and not _is_id_sequence(X[0]):
        raise TypeError(
            "X must hold texts (str) or sequences of integer token ids; element 0 "
            f"is {type(X[0]).__name__}: {X[0]!r:.60}."
        )
    for i, x in enumerate(X):
        if (isinstance(x, str) and not pretokenized) or (pretokenized and _is_id_sequence(x)):
            continue
        what = "texts (str)" if not pretokenized else "sequences of integer token ids"
        raise TypeError(
            f"X must hold only {what}, like its first element; element {i} is "
            f"{type(x).__name__}: {x!r:.60}."
        )
    return X, pretokenized


def _ids_to_lists(ids, mask=None):
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    if mask is None:
        return [list(map(int, row)) for row in ids]
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    return [ids[r][mask[r]].tolist() for r in range(len(ids))]


def _encode_texts(tokenizer, texts, max_length):
    """Token ids of each text, unpadded, cut to ``max_length``."""
    if tokenizer is None:
        raise ValueError(
            "A tokenizer is needed to extract activations from texts; pass "
            "tokenizer=... or pre-tokenised input (lists of token ids)."
        )
    if type(tokenizer).__module__.startswith("transformers"):
        out = tokenizer(
            texts, truncation=max_length is not None, max_length=max_length, padding=False
        )
        seqs = [list(s) for s in out["input_ids"]]
    else:
        try:
            params = inspect.signature(tokenizer).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs = {"max_length": max_length} if "max_length" in params else {}
        out = tokenizer(texts, **kwargs)
        if hasattr(out, "keys") and "input_ids" in out:
            seqs = _ids_to_lists(out["input_ids"], out.get("attention_mask"))
        else:
            seqs = _ids_to_lists(out) if isinstance(out, (torch.Tensor, np.ndarray)) else [
                [int(i) for i in s] for s in out
            ]
        if len(seqs) != len(texts):
            raise ValueError(
                f"The tokenizer returned {len(seqs)} sequences for {len(texts)} texts."
            )
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    return seqs


def _token_strings(tokenizer, ids):
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return [str(i) for i in ids]
    return list(convert(list(ids)))


# ---------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------


class _Tap:
    """One hook at the chosen site that captures, stops or replaces.

    Only the first call of the module in a forward pass counts, so a module
    reused inside the model is tapped once. Models are shared between
    extractors through the process cache, so a tap ignores forward passes run
    by other threads (GridSearchCV with a threading backend).
    """

    def __init__(self, module, where):
        self.module = module
        self.where = where
        self.mode = "stop"
        self.captured = None
        self.replacement = None
        self._calls = 0
        self._thread = threading.get_ident()

    def __enter__(self):
        if self.where == "output":
            self._handle = self.module.register_forward_hook(self._on_output)
        else:
            self._handle = self.module.register_forward_pre_hook(
                self._on_input, with_kwargs=True
            )
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def reset(self, mode, replacement=None):
        self.mode, self.replacement = mode, replacement
        self.captured, self._calls = None, 0
        self._thread = threading.get_ident()

    def _visit(self, tensor):
        if threading.get_ident() != self._thread:
            return None
        self._calls += 1
        if self._calls > 1:
            return None
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise ValueError(
                f"The hooked point gives {shape}, not a (batch, tokens, features) "
                "tensor; choose another layer, hook or module."
            )
        self.captured = tensor
        if self.mode == "stop":
            raise _StopForward
        if self.mode == "replace":
            if self.replacement.shape != tensor.shape:
                raise ValueError(
                    f"Replacement of shape {tuple(self.replacement.shape)} does not match "
                    f"the activations' {tuple(tensor.shape)}."
                )
            return self.replacement.to(dtype=tensor.dtype)
        return None

    def _on_output(self, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        new = self._visit(first)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def _on_input(self, module, args, kwargs):
        if args:
            new = self._visit(args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(
            (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None
        )
        new = self._visit(kwargs.get(key))
        return None if new is None else (args, {**kwargs, key: new})


# ---------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------


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
        Face model folder (a sentence-transformers folder works too), loaded
        with ``local_files_only=True``: a causal language model when its
        config says so, else the bare encoder. A ``torch.nn.Module`` is used
        as it is with ``tokenizer``; it is put in eval mode, and moved only
        when ``device`` is not "auto".
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
        model's maximum.
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
    splice_evaluation : How much of the model's loss survives replacing the
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
        "layer": [Interval(Integral, None, None, closed="neither")],
        "hook": [StrOptions(set(HOOK_POINTS))],
        "module": [str, None],
        "tokenizer": [callable, None],
        "pooling": [StrOptions({"none", "mean", "max", "last"})],
        "max_length": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
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
        return state

    # -- model ----------------------------------------------------------------

    def _resolve_device(self):
        from sparse_dict._torch.device import resolve_device

        if isinstance(self.model, nn.Module) and self.device == "auto":
            return None
        return resolve_device(self.device)

    def _load(self):
        """The loaded model: this instance's, else loaded (and kept) now."""
        loaded = getattr(self, "_loaded", None)
        if loaded is None:
            loaded = self._load_model()
            self._loaded = loaded
        return loaded

    def _load_model(self):
        """Load the model named by the parameters, through the process cache."""
        device = self._resolve_device()
        if isinstance(self.model, nn.Module):
            return _load_module(self.model, self.tokenizer, device)
        if isinstance(self.model, str) and self.model == "builtin":
            key = ("builtin", str(device))
        else:
            path = Path(self.model).expanduser()
            if not path.exists():
                raise ValueError(
                    f"model={str(self.model)!r} is neither 'builtin' nor an existing "
                    "path to a local Hugging Face model folder."
                )
            if not path.is_dir():
                raise ValueError(f"model={str(self.model)!r} is a file, not a model folder.")
            path = path.resolve()
            key = (str(path), str(device))
        loaded = _MODEL_CACHE.get(key)
        if loaded is None:
            loaded = (
                _load_builtin(device) if key[0] == "builtin"
                else _load_hf(path, device, self.verbose)
            )
            _MODEL_CACHE[key] = loaded
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
        _MODEL_CACHE.move_to_end(key)
        return loaded

    def _site(self, loaded):
        """(dotted module path, "input"/"output", readable name) of the hook."""
        model = loaded.model
        if self.module is not None:
            if _submodule(model, self.module) is None or self.module == "":
                names = [n for n, _ in model.named_modules() if n]
                close = get_close_matches(self.module, names, n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(
                    f"module={self.module!r} is not a module of this model.{hint} "
                    f"Valid module paths: {names}"
                )
            return self.module, "output", self.module
        if loaded.blocks is None:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(
                "Could not find the model's list of blocks (an nn.ModuleList), so "
                f"layer/hook cannot be used; pass module=... one of {names}"
            )
        n_layers = len(loaded.blocks)
        if not -n_layers <= self.layer < n_layers:
            raise ValueError(
                f"layer={self.layer} is out of range: this model has {n_layers} layers "
                f"({loaded.blocks_path}); valid layers are 0 to {n_layers - 1} "
                f"(or -{n_layers} to -1)."
            )
        layer = self.layer % n_layers
        block = loaded.blocks[layer]
        block_path = f"{loaded.blocks_path}.{layer}"
        for rel, where in _SITES[self.hook]:
            if _submodule(block, rel) is not None:
                return _join(block_path, rel), where, f"layer{layer}.{self.hook}"
        available = [
            h for h in HOOK_POINTS
            if any(_submodule(block, rel) is not None for rel, _ in _SITES[h])
        ]
        raise ValueError(
            f"hook={self.hook!r} is not found in this model's blocks; valid hooks "
            f"here are {available}, or pass module=... (a dotted path such as "
            f"{block_path}.<submodule>)."
        )

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
        module_path, where, name = self._site(loaded)
        seqs = self._tokenize(X[:1], pretokenized, loaded)
        probe = seqs[0][:8] or [loaded.pad_token_id]
        ids = torch.tensor([probe], dtype=torch.long, device=loaded.device)
        with torch.inference_mode(), _Tap(_model_module(loaded, module_path), where) as tap:
            tap.reset("stop")
            try:
                loaded(ids, torch.ones_like(ids))
            except _StopForward:
                pass
            if tap.captured is None:
                raise ValueError(
                    f"The module {module_path!r} was not called in the forward pass; "
                    "choose another layer, hook or module."
                )
            n_features_out = int(tap.captured.shape[-1])
        self._loaded = loaded
        self.n_features_out_ = n_features_out
        self.hook_module_ = module_path
        self.hook_name_ = name
        self.device_ = str(loaded.device)
        self._where = where
        return self

    def _tokenize(self, X, pretokenized, loaded):
        # Longer sequences than the model has positions for would fail inside
        # the model, so the model's limit caps max_length.
        limits = [n for n in (self.max_length, loaded.max_positions) if n is not None]
        max_length = min(limits) if limits else None
        if pretokenized:
            seqs = [[int(i) for i in x] for x in X]
            seqs = seqs if max_length is None else [s[:max_length] for s in seqs]
            vocab = loaded.vocab_size()
            if vocab is not None:
                for i, s in enumerate(seqs):
                    if s and (min(s) < 0 or max(s) >= vocab):
                        raise ValueError(
                            f"Token ids of text {i} fall outside the model's vocabulary "
                            f"0..{vocab - 1}."
                        )
            return seqs
        return _encode_texts(loaded.tokenizer, X, max_length)

    def _batches(self, seqs, loaded):
        """(text indices, input_ids, attention_mask) batches, longest texts first."""
        lengths = np.array([len(s) for s in seqs])
        order = [i for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = int(lengths[chunk[0]])
            ids = torch.full((len(chunk), width), loaded.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : lengths[i]] = torch.as_tensor(seqs[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            yield chunk, ids.to(loaded.device), mask.to(loaded.device)

    def _progress(self, iterable, total, desc):
        if not self.verbose:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc)

    def _extract(self, X):
        """Activations of ``X`` and, per text, its token ids."""
        check_is_fitted(self)
        X, pretokenized = _check_texts(X)
        loaded = self._load()
        seqs = self._tokenize(X, pretokenized, loaded)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        d = self.n_features_out_
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if self.pooling == "none":
            out = np.empty((int(offsets[-1]), d), dtype=np.float32)
        else:
            empty = np.flatnonzero(lengths == 0)
            if empty.size:
                raise ValueError(
                    f"Text {int(empty[0])} has no tokens, so it cannot be pooled."
                )
            out = np.empty((len(seqs), d), dtype=np.float32)
        n_batches = -(-int(np.count_nonzero(lengths)) // self.batch_size)
        module = _model_module(loaded, self.hook_module_)
        with torch.inference_mode(), _Tap(module, self._where) as tap:
            batches = self._progress(
                self._batches(seqs, loaded), n_batches, "Extracting activations"
            )
            for chunk, ids, mask in batches:
                tap.reset("stop")
                try:
                    loaded(ids, mask)
                except _StopForward:
                    pass
                acts = tap.captured
                if acts is None:
                    raise ValueError(f"The module {self.hook_module_!r} was not called.")
                self._store(out, acts, mask, chunk, lengths, offsets)
        return out, seqs

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
            pooled = (acts * m).sum(1) / m.sum(1)
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
        return self._extract(X)[0]

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
        loaded = self._load()
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        if self.pooling == "none":
            text_index = np.repeat(np.arange(len(seqs)), lengths)
            position = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
            flat = [t for s in seqs for t in s]
            tokens = _token_strings(loaded.tokenizer, flat)
        elif self.pooling == "last":
            text_index = np.arange(len(seqs))
            position = lengths - 1
            tokens = _token_strings(loaded.tokenizer, [s[-1] for s in seqs])
        else:
            text_index = np.arange(len(seqs))
            position = np.full(len(seqs), -1, dtype=np.int64)
            tokens = [""] * len(seqs)
        token = np.empty(len(tokens), dtype=object)
        token[:] = tokens
        return out, TokenIndex(text_index.astype(np.int64), position, token)

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


def _model_module(loaded, path):
    return _submodule(loaded.model, path)


# ---------------------------------------------------------------------------
# Splicing
# ---------------------------------------------------------------------------


@dataclass
class SpliceResult:
    """What survives when a dictionary's reconstruction replaces the activations.

    Losses are mean next-token cross-entropies in nats over the positions that
    have a next real token; they, ``loss_recovered`` and ``kl_divergence`` are
    None for a model without a language-model head, which gets the cosine
    similarities of its mean-pooled final outputs instead.

    Attributes
    ----------
    loss_original, loss_spliced, loss_ablated : float or None
        With the real activations, the reconstruction, and the ablation.
    loss_recovered : float or None
        ``(loss_ablated - loss_spliced) / (loss_ablated - loss_original)``:
        1 when splicing costs nothing, 0 when it is as bad as ablation.
    kl_divergence : float or None
        Mean KL(original || spliced) of the next-token distributions, nats.
    cosine_spliced, cosine_ablated : float or None
        Mean over texts of the cosine similarity between the mean-pooled
        final outputs with real activations and with the reconstruction
        (or the ablation).
    explained_variance : float
        Pooled fraction of the activations' variance the reconstruction
        explains, as :func:`sparse_dict.metrics.explained_variance`.
    l0 : float
        Mean number of non-zero codes per token.
    n_texts, n_tokens : int
    ablation : str
    """

    loss_original: float | None
    loss_spliced: float | None
    loss_ablated: float | None
    loss_recovered: float | None
    kl_divergence: float | None
    cosine_spliced: float | None
    cosine_ablated: float | None
    explained_variance: float
    l0: float
    n_texts: int
    n_tokens: int
    ablation: str

    def to_dict(self):
        """The fields as a plain dict."""
        return asdict(self)


def _final_output(out, vocab_size):
    """("lm", logits) or ("hidden", final hidden states) from a model's output."""
    if hasattr(out, "logits") and out.logits is not None:
        return "lm", out.logits
    if hasattr(out, "last_hidden_state"):
        return "hidden", out.last_hidden_state
    if isinstance(out, (tuple, list)):
        out = out[0]
    if vocab_size is not None and out.shape[-1] == vocab_size:
        return "lm", out
    return "hidden", out


def _count_nonzero(codes):
    import scipy.sparse as sp

    return int(codes.count_nonzero()) if sp.issparse(codes) else int(np.count_nonzero(codes))


def splice_evaluation(extractor, dictionary, texts, *, ablation="zero", verbose=0):
    """Run the model with its activations replaced by a dictionary's reconstruction.

    At the extractor's hook point, the activations of every real token are
    replaced by ``dictionary.inverse_transform(dictionary.transform(acts))``
    (padding is left alone), and the model's output is compared with the
    original run and with a run where the activations are ablated.

    Parameters
    ----------
    extractor : TransformerActivationExtractor, "builtin", str, path-like or nn.Module
        Gives the model, the hook point, the tokenizer, ``max_length``,
        ``batch_size`` and ``device``. Anything else is wrapped in a default
        extractor. Fitted on ``texts`` first if it is not fitted.
    dictionary : object with ``transform`` and ``inverse_transform``
        A fitted dictionary, such as
        :class:`~sparse_dict.SparseAutoencoderDictionary`, taking float32
        arrays of shape (n_tokens, n_features_out_).
    texts : list of str, or list of lists of int
    ablation : {"zero", "mean"}, default="zero"
        Replace the activations by zeros, or by their mean over all tokens of
        ``texts``.
    verbose : int, default=0
        Progress bar over batches when positive.

    Returns
    -------
    result : SpliceResult
        Losses and loss recovered (language models) or cosine similarities
        (encoders), explained variance and L0. ``result.to_dict()`` gives a
        dict.

    Examples
    --------
    >>> import torch
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from sparse_dict.extraction import TransformerActivationExtractor, splice_evaluation
    >>> from sparse_dict.models.builtin import TinyTransformer, TinyTransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> lm = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16))
    >>> ext = TransformerActivationExtractor(lm, device="cpu")
    >>> identity = FunctionTransformer()  # a "dictionary" that reconstructs exactly
    >>> result = splice_evaluation(ext, identity, [[1, 2, 3, 4], [5, 6, 7]])
    >>> result.loss_recovered, result.kl_divergence, result.explained_variance
    (1.0, 0.0, 1.0)
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")
    for method in ("transform", "inverse_transform"):
        if not callable(getattr(dictionary, method, None)):
            raise TypeError(
                f"dictionary must have transform and inverse_transform methods; "
                f"{type(dictionary).__name__} has no {method}."
            )
    if not isinstance(extractor, TransformerActivationExtractor):
        extractor = TransformerActivationExtractor(extractor)
    texts, pretokenized = _check_texts(texts)
    try:
        check_is_fitted(extractor)
    except Exception:
        extractor = clone(extractor).set_params(pooling="none").fit(texts)
    loaded = extractor._load()
    seqs = extractor._tokenize(texts, pretokenized, loaded)
    module = _model_module(loaded, extractor.hook_module_)
    n_batches = -(-sum(1 for s in seqs if s) // extractor.batch_size)
    vocab = loaded.vocab_size()

    acc = dict.fromkeys(
        ["nll_o", "nll_s", "nll_a", "kl", "n_pred", "cos_s", "cos_a", "n_texts",
         "sse", "sq", "n_tok", "nnz"], 0.0
    )
    sum_x = None
    mean_act = None
    training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.inference_mode(), _Tap(module, extractor._where) as tap:
            if ablation == "mean":
                total, count = None, 0
                for _, ids, mask in extractor._batches(seqs, loaded):
                    tap.reset("stop")
                    try:
                        loaded(ids, mask)
                    except _StopForward:
                        pass
                    real = tap.captured[mask.bool()].double()
                    total = real.sum(0) if total is None else total + real.sum(0)
                    count += real.shape[0]
                mean_act = total / count

            batches = extractor._progress(
                extractor._batches(seqs, loaded), n_batches, "Splicing"
            )
            for _, ids, mask in batches:
                keep = mask.bool()
                tap.reset("capture")
                kind, out_o = _final_output(loaded(ids, mask), vocab)
                acts = tap.captured.clone()

                real = acts[keep].float().cpu().numpy()
                codes = dictionary.transform(real)
                recon = np.array(dictionary.inverse_transform(codes), dtype=np.float32)
                acc["nnz"] += _count_nonzero(codes)
                acc["sse"] += float(np.sum((real.astype(np.float64) - recon) ** 2))
                real64 = real.astype(np.float64)
                acc["sq"] += float(np.sum(real64**2))
                sum_x = real64.sum(0) if sum_x is None else sum_x + real64.sum(0)
                acc["n_tok"] += real.shape[0]

                spliced = acts.clone()
                spliced[keep] = torch.as_tensor(recon, device=acts.device, dtype=acts.dtype)
                tap.reset("replace", spliced)
                _, out_s = _final_output(loaded(ids, mask), vocab)

                ablated = acts.clone()
                ablated[keep] = 0.0 if mean_act is None else mean_act.to(acts.dtype)
                tap.reset("replace", ablated)
                _, out_a = _final_output(loaded(ids, mask), vocab)

                if kind == "lm":
                    _accumulate_lm(acc, ids, keep, out_o, out_s, out_a)
                else:
                    _accumulate_hidden(acc, keep, out_o, out_s, out_a)
    finally:
        loaded.model.train(training)

    n_tok = acc["n_tok"]
    sst = acc["sq"] - float(np.sum(sum_x**2)) / n_tok if n_tok else 0.0
    if sst > 0:
        ev = 1.0 - acc["sse"] / sst
    else:
        ev = 1.0 if acc["sse"] == 0 else 0.0
    result = dict(
        loss_original=None, loss_spliced=None, loss_ablated=None, loss_recovered=None,
        kl_divergence=None, cosine_spliced=None, cosine_ablated=None,
        explained_variance=float(ev), l0=acc["nnz"] / n_tok if n_tok else 0.0,
        n_texts=len(texts), n_tokens=int(n_tok), ablation=ablation,
    )
    if acc["n_pred"]:
        n = acc["n_pred"]
        lo, ls, la = acc["nll_o"] / n, acc["nll_s"] / n, acc["nll_a"] / n
        denom = la - lo
        result.update(
            loss_original=lo, loss_spliced=ls, loss_ablated=la,
            loss_recovered=(la - ls) / denom if denom != 0 else float("nan"),
            kl_divergence=acc["kl"] / n,
        )
    if acc["n_texts"]:
        result.update(
            cosine_spliced=acc["cos_s"] / acc["n_texts"],
            cosine_ablated=acc["cos_a"] / acc["n_texts"],
        )
    return SpliceResult(**result)


def _accumulate_lm(acc, ids, keep, out_o, out_s, out_a):
    # Position t predicts token t + 1; with right padding a position has a
    # target exactly when the next position is a real token.
    target = ids[:, 1:]
    valid = keep[:, 1:]
    logp = [torch.log_softmax(o[:, :-1].double(), dim=-1) for o in (out_o, out_s, out_a)]
    for key, lp in zip(("nll_o", "nll_s", "nll_a"), logp):
        nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        acc[key] += float(nll[valid].sum())
    kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
    acc["kl"] += float(kl[valid].sum())
    acc["n_pred"] += int(valid.sum())


def _accumulate_hidden(acc, keep, out_o, out_s, out_a):
    m = keep.unsqueeze(-1).double()

    def pooled(h):
        return (h.double() * m).sum(1) / m.sum(1)

    e_o, e_s, e_a = pooled(out_o), pooled(out_s), pooled(out_a)
    acc["cos_s"] += float(torch.cosine_similarity(e_o, e_s, dim=-1).sum())
    acc["cos_a"] += float(torch.cosine_similarity(e_o, e_a, dim=-1).sum())
    acc["n_texts"] += e_o.shape[0]
