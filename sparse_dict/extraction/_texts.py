"""Checking the texts given to an extractor, and turning them into token ids."""

import inspect
import io
import itertools
import threading
import weakref
from collections.abc import Mapping, Set
from numbers import Integral

import numpy as np
import torch


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


def _check_container(X, name="X"):
    """Refuse what is not a sequence of texts before iterating over it."""
    if isinstance(X, (str, bytes)):
        raise TypeError(
            "Iterable over raw texts expected, string object received: pass a "
            "list of texts, e.g. [text] rather than text."
        )
    if isinstance(X, (Mapping, Set)):
        # Iterating would silently take a dict's keys, and a set has no order
        # to match rows to texts by.
        raise TypeError(
            f"{name} must be a list of texts (or of token-id lists), got a "
            f"{type(X).__name__}; pass list(...) of the texts themselves."
        )
    if hasattr(X, "columns") and getattr(X, "ndim", None) == 2:
        # A DataFrame iterates over its column labels, not its rows.
        columns = list(X.columns)
        raise TypeError(
            f"{name} is a {type(X).__name__} with columns {columns[:5]!r}"
            f"{'...' if len(columns) > 5 else ''}; pass its column of texts, e.g. "
            f"{name}[{columns[0]!r}] (a Series) or {name}[{columns[0]!r}].tolist()."
            if columns else f"{name} is an empty {type(X).__name__}; pass a list of texts."
        )
    if isinstance(X, np.ndarray) and X.ndim != 1 and not (X.ndim == 2 and X.dtype.kind in "iu"):
        raise ValueError(
            f"Expected a 1-D sequence of texts, got an array of shape {X.shape}."
        )


def _check_items(X, pretokenized, start=0, name="X"):
    """Check that every element of the list ``X`` is of the kind of the first text.

    ``start`` is the position of ``X[0]`` in the whole input, for messages.
    """
    if pretokenized is None:
        pretokenized = not isinstance(X[0], str)
        if pretokenized and not _is_id_sequence(X[0]):
            raise TypeError(
                f"{name} must hold texts (str) or sequences of integer token ids; element "
                f"{start} is {type(X[0]).__name__}: {X[0]!r:.60}."
            )
    for i, x in enumerate(X):
        if (isinstance(x, str) and not pretokenized) or (pretokenized and _is_id_sequence(x)):
            continue
        what = "texts (str)" if not pretokenized else "sequences of integer token ids"
        raise TypeError(
            f"{name} must hold only {what}, like its first element; element {start + i} is "
            f"{type(x).__name__}: {x!r:.60}."
        )
    if not pretokenized:
        _check_encodable(X, start)
    return pretokenized


def _texts_of(X):
    """``X`` itself, or an open text file's lines without their line breaks.

    As the command line reads a file: kept, each "\n" was a token more at
    every text's end.
    """
    if isinstance(X, io.TextIOBase):
        return (line[:-1] if line.endswith("\n") else line for line in X)
    return X


def _check_texts(X, name="X"):
    """Validate the input: a non-empty sequence of strings, or of token-id lists.

    Returns the list and whether it holds token ids.
    """
    _check_container(X, name)
    try:
        X = list(_texts_of(X))
    except TypeError:
        raise TypeError(
            f"{name} must be a list of texts (or of token-id lists), got {type(X).__name__}."
        ) from None
    if not X:
        raise ValueError(f"{name} is empty: expected at least one text.")
    return X, _check_items(X, None, name=name)


def _text_chunks(X, chunk_texts):
    """Checked lists of at most ``chunk_texts`` texts of the iterable ``X``, in order.

    Only one chunk is held at a time, so a generator or an open file of any
    length can be read. Yields ``(start, texts, pretokenized)``, ``start``
    being the position of the chunk's first text in ``X``; every chunk must
    hold the same kind of texts as the first.
    """
    _check_container(X)
    try:
        items = iter(_texts_of(X))
    except TypeError:
        raise TypeError(
            f"X must be an iterable of texts (or of token-id lists), got {type(X).__name__}."
        ) from None
    start, pretokenized = 0, None
    while True:
        chunk = list(itertools.islice(items, chunk_texts))
        if not chunk:
            break
        pretokenized = _check_items(chunk, pretokenized, start)
        yield start, chunk, pretokenized
        start += len(chunk)
    if start == 0:
        raise ValueError("X is empty: expected at least one text.")


def _check_encodable(texts, start=0):
    # A lone surrogate (such as "\ud800", from a bad decode) is a str that no
    # tokenizer can encode; each fails in its own opaque way, so say which text.
    for i, text in enumerate(texts, start):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"Text {i} cannot be encoded as UTF-8: it holds {text[err.start]!r} at "
                f"character {err.start} (a lone surrogate, often from decoding bytes "
                "with errors='surrogateescape'); clean or drop that text."
            ) from None


def _ids_to_lists(ids, mask=None):
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    if mask is None:
        return [list(map(int, row)) for row in ids]
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    return [ids[r][mask[r]].tolist() for r in range(len(ids))]


def _cut(seq, max_length, keep="start"):
    """The first (``keep="start"``) or last (``"end"``) ``max_length`` items of ``seq``."""
    return seq[:max_length] if keep == "start" else seq[max(len(seq) - max_length, 0):]


# A Hugging Face tokenizer keeps its truncation (max_length, side) as state
# of the object, set by each call before it encodes: extractors of one model
# folder share one tokenizer through the model cache, so two in threads with
# other max_length or keep cut each other's texts. A lock per tokenizer makes
# the setting and the encoding one step; tokenizers of other models still
# run side by side.
_TOKENIZER_LOCKS = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()
# For a tokenizer that cannot be a weak key (unhashable, or no weakref slot).
_SHARED_TOKENIZER_LOCK = threading.Lock()


def _tokenizer_lock(tokenizer):
    """The lock that serialises the calls of ``tokenizer`` that set its truncation."""
    with _TOKENIZER_LOCKS_GUARD:
        try:
            lock = _TOKENIZER_LOCKS.get(tokenizer)
            if lock is None:
                lock = _TOKENIZER_LOCKS[tokenizer] = threading.Lock()
        except TypeError:
            lock = _SHARED_TOKENIZER_LOCK
    return lock


def _encode_texts(tokenizer, texts, max_length, keep="start"):
    """Token ids of each text, unpadded, cut to ``max_length`` at its end or its start.

    ``keep="end"`` keeps a long text's last tokens (what a model continuing
    it must read); a Hugging Face tokenizer then cuts from the left itself,
    so that the special tokens it adds stay in place.

    Returns the id lists and how many texts were cut (None where the
    tokenizer cut them itself and does not say: a slow Hugging Face one, or
    another that takes ``max_length``).
    """
    if tokenizer is None:
        raise ValueError(
            "A tokenizer is needed to extract activations from texts; pass "
            "tokenizer=... or pre-tokenised input (lists of token ids)."
        )
    if type(tokenizer).__module__.startswith("transformers"):
        with _tokenizer_lock(tokenizer):
            side = getattr(tokenizer, "truncation_side", None)
            if keep == "end" and side is not None:
                tokenizer.truncation_side = "left"
            try:
                out = tokenizer(
                    texts, truncation=max_length is not None, max_length=max_length,
                    padding=False
                )
            finally:
                if side is not None:
                    tokenizer.truncation_side = side
        seqs = [list(s) for s in out["input_ids"]]
        n_cut = 0 if max_length is None else None
        encodings = getattr(out, "encodings", None)
        if max_length is not None and encodings is not None:
            # A fast tokenizer keeps what truncation cut off.
            n_cut = sum(bool(e.overflowing) for e in encodings)
        return seqs, n_cut
    try:
        params = inspect.signature(tokenizer).parameters
    except (TypeError, ValueError):
        params = {}
    # A tokenizer that cuts texts itself keeps their start.
    kwargs = ({"max_length": max_length}
              if "max_length" in params and keep == "start" else {})
    from sparse_dict.models.builtin import BuiltinTokenizer

    if kwargs and isinstance(tokenizer, BuiltinTokenizer):
        # One token more than kept tells which texts were cut; the built-in
        # tokenizer's first tokens are the same however many it keeps.
        kwargs["max_length"] = max_length + 1
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
    n_cut = 0
    if max_length is not None:
        over = sum(len(s) > max_length for s in seqs)
        # None where the tokenizer was given max_length and may have cut.
        n_cut = None if kwargs.get("max_length") == max_length and not over else over
        seqs = [_cut(s, max_length, keep) for s in seqs]
    return seqs, n_cut


def token_strings(loaded, ids):
    """Readable strings of single token ids, the same wherever a token is shown.

    The built-in tokenizer's own strings; a Hugging Face tokenizer's
    decoding of each id after a plain word, less that word's own text, so
    that a token that starts a word reads with its space: a byte-level BPE's
    ``'Ġking'``, a SentencePiece ``'▁king'`` (Llama, Mistral) and a WordPiece
    ``'king'`` (BERT, MiniLM) read ``' king'``, and a piece inside a word
    (``'##ing'``, ``'ing'``) reads ``'ing'``; special tokens are decoded
    alone (``'[CLS]'``). The rows' tokens, the activation store's vocabulary,
    the browser and the logit effects show the same strings.

    Parameters
    ----------
    loaded : LoadedModel
    ids : iterable of int

    Returns
    -------
    list of str
    """
    ids = [int(i) for i in ids]
    tokenizer = loaded.tokenizer
    if loaded.kind == "builtin" or not hasattr(tokenizer, "decode"):
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        return [str(t) for t in convert(ids)] if convert else [str(i) for i in ids]
    anchor = _anchor(tokenizer)
    if anchor is None:
        return _decode_each(tokenizer, [[i] for i in ids])
    # Decoded alone, a SentencePiece or WordPiece token loses the space
    # before it: "the king rode" read "thekingrode" in the browser, and
    # "▁A" and "A" were one string to the logit effects.
    prefix = _decode_each(tokenizer, [anchor])[0]
    after = _decode_each(tokenizer, [anchor + [i] for i in ids])
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    strings = [None if i in special or not b.startswith(prefix) else b[len(prefix):]
               for i, b in zip(ids, after)]
    # Only those decoded alone after all (special tokens, a prefix lost).
    alone = [i for i, text in zip(ids, strings) if text is None]
    decoded = iter(_decode_each(tokenizer, [[i] for i in alone]) if alone else ())
    return [next(decoded) if text is None else text for text in strings]


def _decode_each(tokenizer, id_lists):
    batch_decode = getattr(tokenizer, "batch_decode", None)
    if batch_decode is not None:
        return [str(t) for t in batch_decode(id_lists)]
    return [str(tokenizer.decode(i)) for i in id_lists]


def _anchor(tokenizer):
    """The ids of a plain word that decodes to itself, or None."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return None
    try:
        ids = [int(i) for i in encode("a", add_special_tokens=False)]
    except (TypeError, ValueError):
        return None
    if not ids or _decode_each(tokenizer, [ids])[0].strip() != "a":
        return None
    return ids
