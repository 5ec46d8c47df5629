"""A first look at a learned dictionary: a static feature browser and a density plot.

The browser is one self-contained HTML file (inline CSS and JavaScript, no
server, no network) that lists every feature with its firing frequency and the
tokens it fires on most strongly, shown in context and shaded by activation.
The data are embedded once as compact JSON and the page renders one page of
features at a time, so a dictionary with thousands of features opens quickly.

The functions here are pure functions of arrays: they know nothing of the
estimator, so they serve any sparse coder's output (an SAE's codes, or the
codes of scikit-learn's ``MiniBatchDictionaryLearning``).
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from sparse_dict import _persist

__all__ = [
    "FeatureExamples",
    "top_activating_examples",
    "write_feature_browser",
    "plot_feature_density",
]

# The dense block taken from the codes at a time, in elements. Bounded so that
# the top-k search over a large memmapped code matrix never holds more than
# ~64 MB of float32 at once.
_BLOCK_ELEMENTS = 16_000_000


@dataclass(frozen=True)
class FeatureExamples:
    """The top-activating tokens of each feature, with their context.

    Built by :func:`top_activating_examples`; read by
    :func:`write_feature_browser`. All arrays have one row per feature.

    Attributes
    ----------
    rows : ndarray of shape (n_features, k), dtype int64
        Row of the code matrix (the token) for each example, best first;
        ``-1`` where the feature fired on fewer than ``k`` tokens.
    values : ndarray of shape (n_features, k), dtype float32 (float64 for float64 codes)
        The feature's activation on that token (0 where ``rows`` is ``-1``).
    context_rows : ndarray of shape (n_features, k, 2 * context + 1), dtype int64
        Rows of the tokens around each example, the example in the middle;
        ``-1`` past the start or end of its text.
    context_values : ndarray of shape (n_features, k, 2 * context + 1), dtype float32 (float64 for float64 codes)
        The feature's activation on each context token.
    tokens : ndarray of shape (n_tokens,), dtype object
        Token string of each row of the code matrix.
    index : ndarray of shape (n_tokens, 2), dtype int64
        ``(text index, position)`` of each row of the code matrix.
    """

    rows: np.ndarray
    values: np.ndarray
    context_rows: np.ndarray
    context_values: np.ndarray
    tokens: np.ndarray
    index: np.ndarray

    @property
    def n_features(self):
        """Number of features described."""
        return self.rows.shape[0]


def _check_count(value, name, minimum):
    """``value`` as an int, if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or (
            value < minimum):
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def _check_codes(codes):
    """Return ``codes`` as a 2-D array or a scipy sparse matrix, unchanged otherwise."""
    try:
        import scipy.sparse as sp

        if sp.issparse(codes):
            return codes.tocsc()
    except ImportError:  # pragma: no cover - scipy is a hard dependency
        pass
    if not hasattr(codes, "shape") or not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(
            f"Expected codes of shape (n_tokens, n_features), got an array with "
            f"{codes.ndim} dimension(s)."
        )
    if codes.dtype.kind not in "fiub":
        raise ValueError(f"Expected numeric codes, got dtype {codes.dtype}.")
    return codes


def _dense_block(codes, start, stop, dtype=np.float32):
    """Columns ``start:stop`` of the codes as a C array of ``dtype``."""
    block = codes[:, start:stop]
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=dtype)


def _neighbours(index, context):
    """Rows of the ``context`` tokens either side of every row, within its text.

    Rows need not be ordered: they are sorted by (text, position) once, and the
    window is taken in that order, cut at the text's first and last token.
    Returns an int64 array of shape (n_tokens, 2 * context + 1), ``-1`` outside
    the text.
    """
    n = index.shape[0]
    order = np.lexsort((index[:, 1], index[:, 0]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    sorted_text = index[order, 0]
    # First and one-past-last sorted position of the text each sorted row is in.
    starts = np.searchsorted(sorted_text, sorted_text, side="left")
    stops = np.searchsorted(sorted_text, sorted_text, side="right")
    offsets = np.arange(-context, context + 1)
    window = rank[:, None] + offsets[None, :]
    inside = (window >= starts[rank][:, None]) & (window < stops[rank][:, None])
    rows = np.where(inside, order[np.clip(window, 0, n - 1)], -1)
    return rows.astype(np.int64)


def _lowest_rows_of_ties(block, top, cols):
    """Make ``top`` (the partition's rows of each column's largest values) take tied rows by row.

    Where the last value kept ties with rows left out, the partition chose
    among them as its algorithm fell (row 1392 over 720 for one feature);
    the lowest rows are taken instead, so the examples do not depend on it.
    Changes ``top`` in place, column by column, only where such a tie lies.
    """
    kth = block[top, cols[None, :]].min(axis=0)
    kept = (block[top, cols[None, :]] == kth).sum(axis=0)
    tied = np.flatnonzero((kth > 0) & ((block == kth).sum(axis=0) > kept))
    n_kept = top.shape[0]
    for c in tied:
        column = block[:, c]
        above = np.flatnonzero(column > kth[c])
        level = np.flatnonzero(column == kth[c])[: n_kept - len(above)]
        top[:, c] = np.concatenate([above, level])


def _is_token_index(value):
    """Whether ``value`` is an extractor's TokenIndex (by its fields: this module
    knows nothing of extraction)."""
    return isinstance(value, tuple) and all(
        hasattr(value, name) for name in ("text_index", "position", "token"))


def top_activating_examples(codes, tokens, index=None, *, k=8, context=6):
    """Find the ``k`` tokens each feature fires on most strongly, with context.

    The search runs over blocks of features at a time with
    :func:`numpy.argpartition` down each column, so its cost is one pass over
    the codes and it works on a memory-mapped or scipy sparse code matrix of
    any size.

    Parameters
    ----------
    codes : array-like or sparse matrix of shape (n_tokens, n_features)
        Feature activations, one row per token (for example the output of
        ``SparseAutoencoderDictionary.transform``).
    tokens : sequence of str of length n_tokens, or TokenIndex
        The token string of each row. An extractor's
        :class:`~sparse_dict.extraction.TokenIndex` (from
        ``transform_with_tokens``) gives its tokens, and its index when
        ``index`` is None.
    index : array-like of shape (n_tokens, 2) or TokenIndex, default=None
        ``(text index, position)`` of each row, used to find each example's
        neighbours within its own text. ``None`` treats all rows as one text
        in order (unless ``tokens`` is a TokenIndex).
    k : int, default=8
        Number of examples per feature: its largest positive codes (signed
        codes' negative values are not examples of the feature). At most the
        number of rows.
    context : int, default=6
        Number of tokens shown on each side of an example. At most the
        longest text's tokens less one.

    Returns
    -------
    examples : FeatureExamples
        The examples; features that never fire have none (``rows`` is -1).

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.browser import top_activating_examples
    >>> codes = np.array([[0.0, 1.0], [2.0, 0.0], [0.5, 3.0], [0.0, 0.0]])
    >>> ex = top_activating_examples(codes, ["a", "b", "c", "d"], k=2, context=1)
    >>> ex.rows.tolist()   # best token first, for each feature
    [[1, 2], [2, 0]]
    >>> ex.context_rows[1, 0].tolist()   # around row 2: rows 1, 2, 3
    [1, 2, 3]
    """
    codes = _check_codes(codes)
    n_tokens, n_features = codes.shape
    if _is_token_index(tokens):
        index = tokens if index is None else index
        tokens = tokens.token
    if _is_token_index(index):
        index = np.column_stack([index.text_index, index.position])
    if isinstance(tokens, (str, bytes)):
        # Its characters would pass for tokens, one per row.
        raise TypeError("tokens must be a sequence of token strings, one per row of codes, "
                        f"not one string ({tokens[:20]!r}).")
    tokens = np.asarray(list(tokens), dtype=object)
    if tokens.shape != (n_tokens,):
        raise ValueError(
            f"Expected {n_tokens} token strings, one per row of codes, got {tokens.shape[0]}."
        )
    if index is None:
        index = np.column_stack([np.zeros(n_tokens, np.int64), np.arange(n_tokens)])
    index = np.asarray(index, dtype=np.int64)
    if index.shape != (n_tokens, 2):
        raise ValueError(
            f"Expected index of shape ({n_tokens}, 2) as (text, position) pairs, "
            f"got shape {index.shape}."
        )
    k = _check_count(k, "k", 1)
    context = _check_count(context, "context", 0)
    # Beyond the rows there are, or beyond the longest text, more asks for
    # nothing but memory: k=100,000 and context=100,000 on 436 tokens asked
    # numpy for 18 TiB.
    k = min(k, max(n_tokens, 1))
    if n_tokens:
        context = min(context, int(np.unique(index[:, 0], return_counts=True)[1].max()) - 1)

    width = 2 * context + 1
    n_kept = min(k, n_tokens)
    # float64 codes stay float64: cast to float32, 1e39 became inf (and was
    # refused as such) and 1e-50 became 0 (its example lost).
    dtype = np.float64 if codes.dtype == np.float64 else np.float32
    rows = np.full((n_features, k), -1, dtype=np.int64)
    values = np.zeros((n_features, k), dtype=dtype)
    context_rows = np.full((n_features, k, width), -1, dtype=np.int64)
    context_values = np.zeros((n_features, k, width), dtype=dtype)
    if n_tokens == 0 or n_features == 0:
        return FeatureExamples(rows, values, context_rows, context_values, tokens, index)

    neighbours = _neighbours(index, context)
    step = max(1, _BLOCK_ELEMENTS // max(n_tokens, 1))
    for start in range(0, n_features, step):
        stop = min(start + step, n_features)
        block = _dense_block(codes, start, stop, dtype)  # (n_tokens, b)
        if not np.isfinite(block).all():
            # A NaN is never among the largest values: it would be skipped
            # silently; an infinite one would shade every other value as 0.
            raise ValueError(f"codes contain NaN or infinite values (in features {start} to "
                             f"{stop - 1}).")
        cols = np.arange(stop - start)
        if n_kept < n_tokens:
            top = np.argpartition(-block, n_kept - 1, axis=0)[:n_kept]  # (n_kept, b), unordered
            _lowest_rows_of_ties(block, top, cols)
        else:
            top = np.broadcast_to(np.arange(n_tokens)[:, None], (n_tokens, stop - start))
        top_vals = block[top, cols[None, :]]
        # Best first; ties broken by row so the result does not depend on the
        # partition algorithm.
        order = np.lexsort((top, -top_vals), axis=0)
        top = np.take_along_axis(top, order, axis=0).T  # (b, n_kept)
        top_vals = np.take_along_axis(top_vals, order, axis=0).T
        fired = top_vals > 0
        rows[start:stop, :n_kept] = np.where(fired, top, -1)
        values[start:stop, :n_kept] = np.where(fired, top_vals, 0.0)
        ctx = np.where(fired[:, :, None], neighbours[top], -1)  # (b, n_kept, width)
        ctx_vals = block[np.clip(ctx, 0, None), cols[:, None, None]]
        context_rows[start:stop, :n_kept] = ctx
        context_values[start:stop, :n_kept] = np.where(ctx >= 0, ctx_vals, 0.0)
    return FeatureExamples(rows, values, context_rows, context_values, tokens, index)


_EFFECT_FIELDS = ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits")


def _check_effects(effects, n_features):
    """``{feature: (promoted, their values, suppressed, their values)}`` from logit effects.

    ``effects`` is a :class:`~sparse_dict.analysis.LogitEffects` or any object
    or mapping with its arrays (``features`` optional: rows are features
    ``0..n-1`` without it); only token strings and numbers are read, so this
    module needs no torch.
    """
    if effects is None:
        return {}

    def field(name):
        value = effects.get(name) if isinstance(effects, dict) else getattr(effects, name, None)
        return value

    missing = [name for name in _EFFECT_FIELDS if field(name) is None]
    if missing:
        raise ValueError(f"logit_effects lacks {missing}; expected the arrays of a "
                         "LogitEffects (sparse_dict.analysis.logit_effects).")
    arrays = [np.asarray(field(name), dtype=object if "tokens" in name else np.float64)
              for name in _EFFECT_FIELDS]
    n_rows = arrays[0].shape[0] if arrays[0].ndim == 2 else -1
    if any(a.ndim != 2 or a.shape[0] != n_rows for a in arrays):
        raise ValueError("logit_effects' token and logit arrays must be 2-D with one row "
                         "per feature.")
    # Each token beside its value: rows of other lengths drew a blank page.
    for tokens, logits in ((arrays[0], arrays[1]), (arrays[2], arrays[3])):
        if tokens.shape != logits.shape:
            raise ValueError(f"logit_effects' tokens have shape {tokens.shape} but their "
                             f"logits {logits.shape}: one value a token.")
    if not all(np.isfinite(a).all() for a in (arrays[1], arrays[3])):
        raise ValueError("logit_effects' logits contain NaN or infinite values.")
    features = field("features")
    features = (np.arange(n_rows) if features is None
                else np.asarray(features, dtype=np.int64).ravel())
    if features.shape[0] != n_rows or np.any((features < 0) | (features >= n_features)):
        raise ValueError(f"logit_effects describe features outside 0..{n_features - 1} "
                         "(or a features array of the wrong length).")
    # A feature that changes no logit (a zero atom) has no tokens to show.
    return {int(f): [a[i] for a in arrays] for i, f in enumerate(features)
            if np.any(arrays[1][i]) or np.any(arrays[3][i])}


def _feature_payload(frequencies, examples, max_features, effects=()):
    """The browser's data as plain lists, small enough to embed as JSON.

    Token strings are stored once in a vocabulary and referred to by number;
    activations are shaded in ten levels, one digit per token, relative to the
    feature's largest activation. That keeps the page to a few bytes per shown
    token, so thousands of features fit in a few megabytes.
    """
    n_features = frequencies.shape[0]
    n_shown = n_features if max_features is None else min(
        n_features, _check_count(max_features, "max_features", 1))
    vocab_list = []
    features = []
    if examples is not None:
        ctx_rows = examples.context_rows[:n_shown]
        used = ctx_rows[ctx_rows >= 0]
        # One vocabulary of the token strings actually shown, with one
        # dictionary lookup per distinct row shown. (numpy's unique on the
        # strings made a fixed-width array as wide as the longest token, a
        # GB for one long token, and dropped trailing NUL characters.)
        rows_shown = np.unique(used)
        vocab_index = {}
        token_ids = np.full(examples.tokens.shape[0], -1, dtype=np.int64)
        token_ids[rows_shown] = [vocab_index.setdefault(str(examples.tokens[r]), len(vocab_index))
                                 for r in rows_shown.tolist()]
        vocab_list = list(vocab_index)
        peaks = examples.values[:n_shown, 0]
        scale = np.where(peaks > 0, peaks, 1.0)[:, None, None]
        shares = np.clip(examples.context_values[:n_shown] / scale, 0, 1)
        levels = np.ceil(shares * 9).astype(np.int8)
    vocab_index = {token: i for i, token in enumerate(vocab_list)}

    def token_id(token):
        token = str(token)
        if token not in vocab_index:
            vocab_index[token] = len(vocab_list)
            vocab_list.append(token)
        return vocab_index[token]

    for f in range(n_shown):
        ex_list = []
        peak = 0
        if examples is not None:
            peak = _round_sig(float(examples.values[f, 0]))
            for j in np.flatnonzero(examples.rows[f] >= 0):
                ctx = ctx_rows[f, j]
                keep = ctx >= 0
                half = ctx.shape[0] // 2
                text, pos = (int(v) for v in examples.index[examples.rows[f, j]])
                ex_list.append(
                    [
                        _round_sig(float(examples.values[f, j])),
                        text,
                        pos,
                        # The example's place in the window once cut-off
                        # context (past the text's ends) is dropped.
                        half - int(np.count_nonzero(~keep[:half])),
                        token_ids[ctx[keep]].tolist(),
                        "".join(map(str, levels[f, j][keep].tolist())),
                    ]
                )
        # Frequencies also give "1 in N tokens": kept to float32's digits.
        entry = [f, _round_sig(float(frequencies[f]), 7), peak, ex_list]
        if f in effects:
            # [promoted token ids, their logit changes, suppressed ..., ...]
            up, up_values, down, down_values = effects[f]
            entry.append([[token_id(t) for t in up], [_round_sig(float(v)) for v in up_values],
                          [token_id(t) for t in down],
                          [_round_sig(float(v)) for v in down_values]])
        features.append(entry)
    return {"vocab": vocab_list, "features": features}


def _round_sig(x, digits=3):
    """``x`` rounded to ``digits`` significant digits, to keep the JSON short.

    The page shows activations and logit changes to 3 digits: rounded here to
    just those, the page shows them as they are. Rounded to 4 here and to 3
    by the page, a value was rounded twice, and the last digit shown was
    wrong for about one number in eight (2.9653 shown as 2.96).
    """
    if x == 0 or not np.isfinite(x):
        return 0
    return float(f"{x:.{digits}g}")


def _check_frequencies(frequencies):
    frequencies = np.asarray(frequencies, dtype=np.float64)
    if frequencies.ndim != 1:
        raise ValueError(
            f"Expected frequencies of shape (n_features,), got shape {frequencies.shape}."
        )
    if not np.isfinite(frequencies).all():
        raise ValueError(
            f"frequencies contain {np.count_nonzero(~np.isfinite(frequencies))} NaN or "
            "infinite values; expected the fraction of tokens on which each feature fires."
        )
    if frequencies.size and (frequencies.min() < 0 or frequencies.max() > 1):
        raise ValueError(
            f"frequencies range from {frequencies.min():g} to {frequencies.max():g}; expected "
            "the fraction of tokens on which each feature fires, between 0 and 1."
        )
    return frequencies


def _encodable(text):
    """``text`` with what UTF-8 cannot encode (lone surrogates) shown as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _page(title, payload, ascii_only):
    # "<" is escaped so that no token text (say "</script>") can end the
    # script element early; the JSON stays valid since "<" only occurs in strings.
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=ascii_only)
    parts = {
        "TITLE": html.escape(title),
        "GENERATOR": _persist.HTML_GENERATOR,
        "CSS": _CSS,
        "JS": _JS,
        "DATA": data.replace("<", "\\u003c"),
    }
    # In one pass: a title holding "@@JS@@" stays that text, not the script.
    return re.sub(r"@@(TITLE|GENERATOR|CSS|JS|DATA)@@", lambda m: parts[m.group(1)], _PAGE)


def write_feature_browser(
    path, frequencies, examples=None, *, title="Feature browser", max_features=None,
    overwrite=False, logit_effects=None,
):
    """Write a self-contained HTML page to browse a dictionary's features.

    The page lists features with their firing frequency, their largest
    activation and their top-activating tokens in context, each token shaded
    by how strongly the feature fires on it, and (given ``logit_effects``)
    the tokens each feature promotes and suppresses. It can be searched by feature id
    (``12`` or ``#12``) or by the text of the tokens a feature fires on, and
    sorted by frequency. Only one page of features is drawn at a time, so it
    stays responsive with thousands of features. It needs no server and
    loads nothing from the network: open the file in any browser.

    Parameters
    ----------
    path : str or path-like
        Where to write the HTML file; missing folders above it are created.
    frequencies : array-like of shape (n_features,)
        Fraction of tokens on which each feature fires (for example
        ``SparseAutoencoderDictionary.feature_frequencies_`` or
        :func:`sparse_dict.metrics.feature_frequencies` of the codes).
    examples : FeatureExamples, default=None
        Top-activating examples from :func:`top_activating_examples`.
        ``None`` writes a page of frequencies only.
    title : str, default="Feature browser"
        Page title and heading.
    max_features : int, default=None
        Show only the first ``max_features`` features; ``None`` shows all.
    overwrite : bool, default=False
        Replace an existing page written by this function; any other existing
        file is never replaced. The page is written under a temporary name and
        renamed into place once complete.
    logit_effects : LogitEffects, dict or None, default=None
        The tokens each feature promotes and suppresses, shown beside its
        examples: a :class:`~sparse_dict.analysis.LogitEffects` from
        :func:`sparse_dict.analysis.logit_effects`, or a dict of its arrays
        ``promoted_tokens``, ``promoted_logits``, ``suppressed_tokens``,
        ``suppressed_logits`` (one row per feature) and optionally
        ``features`` (which feature each row is). Token text is shown as
        text, never as markup.

    Returns
    -------
    path : str
        The path written.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from sparse_dict.browser import top_activating_examples, write_feature_browser
    >>> codes = np.array([[0.0, 1.0], [2.0, 0.0], [0.5, 3.0]])
    >>> ex = top_activating_examples(codes, ["to", "be", "or"], k=2, context=1)
    >>> out = os.path.join(tempfile.mkdtemp(), "features.html")
    >>> _ = write_feature_browser(out, (codes > 0).mean(axis=0), ex)
    >>> "<!DOCTYPE html>" in open(out, encoding="utf-8").read(100)
    True
    """
    content = browser_page(frequencies, examples, title=title, max_features=max_features,
                           logit_effects=logit_effects)
    with _persist.staged(path, _persist.HTML, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
    return os.fspath(path)


def browser_page(frequencies, examples=None, *, title="Feature browser", max_features=None,
                 logit_effects=None):
    """The page :func:`write_feature_browser` writes, as UTF-8 bytes."""
    frequencies = _check_frequencies(frequencies)
    if examples is not None and examples.n_features != frequencies.shape[0]:
        raise ValueError(
            f"frequencies describe {frequencies.shape[0]} features but examples "
            f"describe {examples.n_features}."
        )
    effects = _check_effects(logit_effects, frequencies.shape[0])
    if not isinstance(title, str):
        # str(None) titled the page "None".
        raise TypeError(f"title must be a str, got {title!r}.")
    payload = _feature_payload(frequencies, examples, max_features, effects)
    title = _encodable(title)
    payload["title"] = title
    payload["n_features"] = int(frequencies.shape[0])
    payload["n_dead"] = int(np.count_nonzero(frequencies <= 0))
    try:
        content = _page(title, payload, ascii_only=False).encode("utf-8")
    except UnicodeEncodeError:
        # A token holding a lone surrogate (half a character, as a tokenizer
        # can cut one) has no UTF-8 form; JSON escapes (\uD800) carry it to the
        # page's script as it is.
        content = _page(title, payload, ascii_only=True).encode("utf-8")
    return content


def plot_feature_density(frequencies, path=None, *, bins=50, title=None, overwrite=False):
    """Plot the histogram of log10 firing frequency of a dictionary's features.

    The usual first look at a dictionary: a healthy one has a single bump of
    features firing on, say, 1 in 10 000 to 1 in 10 tokens. Features that
    never fire cannot sit on a log axis; they are counted in the title instead.
    Uses matplotlib's Agg canvas directly, so it never opens a window and does
    not change the global pyplot backend.

    Parameters
    ----------
    frequencies : array-like of shape (n_features,)
        Fraction of tokens on which each feature fires.
    path : str or path-like, default=None
        If given, the figure is saved there as a PNG; the name must end in
        ``.png`` (PNG bytes under another name would be misread).
    bins : int, default=50
        Number of histogram bins.
    title : str, default=None
        Figure title; by default it says how many features are dead.
    overwrite : bool, default=False
        Replace an existing PNG written by this package at ``path``; any other
        existing file is never replaced.

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure.

    Examples
    --------
    >>> import numpy as np
    >>> from sparse_dict.browser import plot_feature_density
    >>> fig = plot_feature_density(np.array([0.0, 1e-3, 1e-2, 0.1]))
    >>> fig.axes[0].get_xlabel()
    'log10 firing frequency'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if path is not None and not str(path).lower().endswith(".png"):
        raise ValueError(f"path must name a .png file (the figure is saved as a PNG), got "
                         f"{str(path)!r}.")
    frequencies = _check_frequencies(np.asarray(frequencies, dtype=np.float64).ravel())
    alive = frequencies[frequencies > 0]
    n_dead = frequencies.size - alive.size
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if alive.size:
        ax.hist(np.log10(alive), bins=bins, color="#d9661f")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("number of features")
    if title is None:
        share = n_dead / frequencies.size if frequencies.size else 0.0
        title = (
            f"Feature density: {alive.size} alive, "
            f"{n_dead} dead ({share:.1%}) of {frequencies.size}"
        )
    ax.set_title(title, fontsize=10)
    if path is not None:
        with _persist.staged(path, _persist.PNG, overwrite=overwrite) as tmp:
            save_png(fig, tmp)
    return fig


def save_png(fig, file):
    """Save ``fig`` as the package's plots are: PNG, marked as written by it.

    The mark lets ``overwrite`` replace the plot later, and no PNG of anyone else.
    """
    fig.savefig(file, format="png", dpi=110, metadata=_persist.png_metadata())


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="@@GENERATOR@@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head>
<body>
<header>
<h1>@@TITLE@@</h1>
<p id="summary"></p>
<div class="controls">
<input id="search" type="search" placeholder="Search: feature id (12 or #12) or token text" autocomplete="off" aria-label="Search features">
<label>Sort <select id="sort" aria-label="Sort features">
<option value="id">feature id</option>
<option value="freq-desc">frequency, high first</option>
<option value="freq-asc">frequency, low first</option>
<option value="act-desc">max activation, high first</option>
</select></label>
<label><input id="hide-dead" type="checkbox"> hide dead</label>
</div>
<nav class="pager"><button id="prev" type="button">&larr; previous</button>
<span id="page-info"></span>
<button id="next" type="button">next &rarr;</button></nav>
</header>
<main id="features"></main>
<script id="feature-data" type="application/json">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.6em 1em;z-index:1}
h1{font-size:1.3em;margin:.1em 0}
#summary{margin:.2em 0;color:#555}
.controls{display:flex;gap:1em;align-items:center;flex-wrap:wrap}
#search{flex:1;min-width:16em;padding:.35em .5em;font-size:1em}
.pager{margin-top:.4em;display:flex;gap:1em;align-items:center}
main{padding:.5em 1em}
.feature{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.5em .8em}
.feature h2{font-size:1em;margin:0 0 .3em 0}
.feature .stats{font-weight:normal;color:#666;margin-left:.6em}
.dead{color:#b00}
.example{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;white-space:pre;overflow-x:auto;line-height:1.6}
.example .act{display:inline-block;min-width:4.5em;color:#888}
.tok{border-radius:2px;unicode-bidi:isolate}
.tok.max{outline:1px solid #a33}
.l0{}.l1{background:#fff1e6}.l2{background:#ffe0c7}.l3{background:#ffcfa8}.l4{background:#ffbd8a}
.l5{background:#ffac6b}.l6{background:#ff9a4d}.l7{background:#f8862f}.l8{background:#ec7014}.l9{background:#d95f02;color:#fff}
.empty{color:#777;font-style:italic}
.effects{font-size:.9em;margin:.2em 0 .4em 0;line-height:1.7}
.effects .label{color:#666;display:inline-block;min-width:6.5em}
.effect{font-family:ui-monospace,Menlo,Consolas,monospace;border-radius:3px;padding:0 .25em;margin-right:.3em;white-space:pre;unicode-bidi:isolate}
.effects{overflow-x:auto}
.effect.up{background:#e3f1e3}.effect.down{background:#f6e1e1}
.effect .v{color:#777;margin-left:.25em}
"""

# Plain ES2015, no libraries. Token text is only ever set through textContent,
# so nothing in the data can inject markup.
_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("feature-data").textContent);
  var PAGE_SIZE = 50;
  var vocab = DATA.vocab;
  var all = DATA.features.map(function (f) {
    // f = [id, frequency, max activation, examples, logit effects (optional)]; each example is
    // [activation, text, position, centre, token ids, shade digits].
    var firing = [];
    f[3].forEach(function (ex) {
      for (var i = 0; i < ex[4].length; i++) {
        if (ex[5].charAt(i) !== "0") firing.push(vocab[ex[4][i]].toLowerCase());
      }
    });
    return {id: f[0], freq: f[1], maxAct: f[2], examples: f[3], effects: f[4] || null,
            search: "\u0001" + firing.join("\u0001") + "\u0001"};
  });
  var state = {query: "", sort: "id", hideDead: false, page: 0};
  var shown = all;
  var el = function (id) { return document.getElementById(id); };

  function visible(s) {
    // A token that would draw nothing (empty, a carriage return, another
    // control character) is shown by its control picture, a newline as an
    // arrow; the strongest token of an example was otherwise invisible.
    if (s === "") return "\u2205";
    return s.replace(/\n/g, "\u21b5").replace(/[\x00-\x08\x0b-\x1f\x7f]/g, function (c) {
      return c === "\x7f" ? "\u2421" : String.fromCharCode(0x2400 + c.charCodeAt(0));
    });
  }

  function pct(x) {
    if (x <= 0) return "never fires";
    if (x >= 0.001) return (100 * x).toPrecision(3) + "% of tokens";
    return "1 in " + Math.round(1 / x).toLocaleString("en") + " tokens";
  }

  function recompute() {
    var q = state.query.trim().toLowerCase();
    var idMatch = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : null;
    shown = all.filter(function (f) {
      if (state.hideDead && f.freq <= 0) return false;
      if (!q) return true;
      if (idMatch !== null) return f.id === idMatch;
      return f.search.indexOf(q) !== -1;
    });
    var key = {
      "id": function (a, b) { return a.id - b.id; },
      "freq-desc": function (a, b) { return b.freq - a.freq || a.id - b.id; },
      "freq-asc": function (a, b) { return a.freq - b.freq || a.id - b.id; },
      "act-desc": function (a, b) { return b.maxAct - a.maxAct || a.id - b.id; }
    }[state.sort];
    shown = shown.slice().sort(key);
    state.page = 0;
    render();
  }

  function renderExample(ex) {
    var line = document.createElement("div");
    line.className = "example";
    var act = document.createElement("span");
    act.className = "act";
    act.textContent = ex[0].toPrecision(3);
    act.title = "text " + ex[1] + ", position " + ex[2];
    line.appendChild(act);
    for (var i = 0; i < ex[4].length; i++) {
      var t = document.createElement("span");
      t.className = "tok l" + ex[5].charAt(i) + (i === ex[3] ? " max" : "");
      t.textContent = visible(vocab[ex[4][i]]);
      line.appendChild(t);
    }
    return line;
  }

  function renderEffects(e) {
    // e = [promoted token ids, logit changes, suppressed token ids, logit changes].
    var div = document.createElement("div");
    div.className = "effects";
    [["promotes", "up", e[0], e[1]], ["suppresses", "down", e[2], e[3]]].forEach(function (row) {
      var line = document.createElement("div");
      line.className = row[1] === "up" ? "promoted" : "suppressed";
      var label = document.createElement("span");
      label.className = "label";
      label.textContent = row[0];
      line.appendChild(label);
      for (var i = 0; i < row[2].length; i++) {
        var t = document.createElement("span");
        t.className = "effect " + row[1];
        t.textContent = visible(vocab[row[2][i]]);
        var v = document.createElement("span");
        v.className = "v";
        v.textContent = (row[3][i] > 0 ? "+" : "") + row[3][i].toPrecision(3);
        t.appendChild(v);
        line.appendChild(t);
      }
      div.appendChild(line);
    });
    return div;
  }

  function renderFeature(f) {
    var box = document.createElement("section");
    box.className = "feature";
    box.setAttribute("data-feature", String(f.id));
    box.setAttribute("data-frequency", String(f.freq));
    var h = document.createElement("h2");
    h.textContent = "Feature " + f.id;
    var stats = document.createElement("span");
    stats.className = "stats" + (f.freq <= 0 ? " dead" : "");
    stats.textContent = pct(f.freq) + (f.maxAct > 0 ? " \u00b7 max activation " + f.maxAct.toPrecision(3) : "");
    h.appendChild(stats);
    box.appendChild(h);
    if (!f.examples.length) {
      var p = document.createElement("p");
      p.className = "empty";
      p.textContent = f.freq <= 0 ? "Dead: fires on no token." : "No examples recorded.";
      box.appendChild(p);
    }
    if (f.effects) box.appendChild(renderEffects(f.effects));
    f.examples.forEach(function (ex) { box.appendChild(renderExample(ex)); });
    return box;
  }

  function render() {
    var main = el("features");
    var pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    var frag = document.createDocumentFragment();
    shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).forEach(function (f) {
      frag.appendChild(renderFeature(f));
    });
    main.textContent = "";
    if (!shown.length) {
      var p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No feature matches.";
      main.appendChild(p);
    }
    main.appendChild(frag);
    el("page-info").textContent = shown.length + " of " + all.length + " features shown \u00b7 page " + (state.page + 1) + " of " + pages;
    el("prev").disabled = state.page === 0;
    el("next").disabled = state.page >= pages - 1;
  }

  el("summary").textContent = DATA.n_features + " features, " + DATA.n_dead + " dead" +
    (all.length < DATA.n_features ? " (first " + all.length + " included)" : "") + ".";
  var timer = null;
  function onSearch(e) {
    // A short pause before filtering keeps typing smooth on large dictionaries.
    clearTimeout(timer);
    var value = e.target.value;
    timer = setTimeout(function () {
      if (value !== state.query) { state.query = value; recompute(); }
    }, 60);
  }
  ["input", "change", "search"].forEach(function (type) {
    el("search").addEventListener(type, onSearch);
  });
  el("sort").addEventListener("change", function (e) { state.sort = e.target.value; recompute(); });
  el("hide-dead").addEventListener("change", function (e) { state.hideDead = e.target.checked; recompute(); });
  el("prev").addEventListener("click", function () { state.page -= 1; render(); window.scrollTo(0, 0); });
  el("next").addEventListener("click", function () { state.page += 1; render(); window.scrollTo(0, 0); });
  recompute();
})();
"""
