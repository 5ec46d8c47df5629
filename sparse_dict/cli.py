"""The ``sparse-dict`` command line (also ``python -m sparse_dict``).

Subcommands::

    sparse-dict demo      the whole job on the built-in model and corpus
    sparse-dict extract   texts file -> activations (.npy)
    sparse-dict fit       activations (.npy) -> saved dictionary (folder)
    sparse-dict encode    saved dictionary + activations -> codes (.npy)
    sparse-dict report    saved dictionary + texts -> feature browser + density plot

Every failure a user can cause (a missing or unreadable file, an array of the
wrong shape, a bad option) ends with one line on stderr and exit status 2;
``--traceback`` shows the full Python traceback instead, for bug reports.
Heavy libraries (torch, scikit-learn, matplotlib) are imported only by the
subcommand that needs them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sparse_dict import _persist

__all__ = ["main"]

PROG = "sparse-dict"

# Exit statuses: 2 for a problem with the user's input (as argparse does for a
# bad option), 1 for anything unexpected, 130 for Ctrl-C.
EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# --------------------------------------------------------------------------
# Reading and writing files, with one-line errors
# --------------------------------------------------------------------------


def _input_file(path, what):
    """``path`` as a Path after checking it names a readable file."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{what} {str(path)!r} is not readable (permission denied)")
    return path


def _output_file(path, what, kind=_persist.NPY, *, overwrite=False, inputs=()):
    """``path`` as a Path after checking it may be written: new, or replaceable with --overwrite.

    Nothing is created here: outputs are written when complete (see
    :mod:`sparse_dict._persist`), so a failed command leaves nothing behind.
    """
    path = Path(path)
    if path.is_dir() and not kind.folder:
        raise CLIError(f"{what} {str(path)!r} is a folder, expected a file name")
    _output_dir(path.parent if str(path.parent) else Path("."), f"folder of {what}")
    try:
        return _persist.check_target(path, kind, overwrite=overwrite,
                                     inputs=[Path(i) for i in inputs], hint="--overwrite")
    except (FileExistsError, ValueError) as err:
        raise CLIError(f"{what}: {err}") from None


def _output_dir(path, what):
    """``path`` as a Path after checking it is, or can be created as, a writable folder.

    The folder is not created here but by the writer, once there is something
    to write, so that a failed command leaves no empty folders behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {str(path)!r} exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.is_symlink() or existing.parent == existing:
            raise CLIError(f"cannot create {what} {str(path)!r}: {str(existing)!r} is a "
                           "broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot create {what} {str(path)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK):
        raise CLIError(f"{what} {str(path)!r} is not writable (permission denied)")
    return path


def _npy_name(path):
    """The name numpy.save gives ``path``: with ``.npy`` added if it lacks it."""
    path = Path(path)
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


def read_texts(path, split="lines"):
    """Read the texts of a file, skipping empty ones.

    Parameters
    ----------
    path : str or Path
        A UTF-8 text file, or a ``.jsonl`` file of JSON strings or of objects
        with a ``"text"`` field, one per line.
    split : {"lines", "paragraphs", "whole"}, default="lines"
        How a plain text file is cut into texts: one per line, one per run of
        lines separated by a blank line, or the whole file as one text.

    Returns
    -------
    texts : list of str

    Examples
    --------
    >>> import os, tempfile
    >>> from sparse_dict.cli import read_texts
    >>> path = os.path.join(tempfile.mkdtemp(), "texts.txt")
    >>> _ = open(path, "w").write("To be, or not to be\\n\\nThat is the question\\n")
    >>> read_texts(path)
    ['To be, or not to be', 'That is the question']
    """
    path = _input_file(path, "texts file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"texts file {str(path)!r} is not UTF-8 text") from None
    except OSError as err:
        raise CLIError(f"cannot read texts file {str(path)!r}: {err.strerror or err}") from None
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{str(path)!r} line {lineno} is not JSON: {err.msg}") from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise CLIError(
                    f"{str(path)!r} line {lineno}: expected a JSON string or an object "
                    "with a \"text\" string"
                )
            texts.append(item)
    elif split == "lines":
        texts = raw.splitlines()
    elif split == "paragraphs":
        import re

        texts = re.split(r"\n[ \t]*\n", raw)
    else:
        texts = [raw]
    texts = [t.strip("\n") for t in texts if t.strip()]
    if not texts:
        raise CLIError(f"texts file {str(path)!r} contains no text")
    return texts


def load_matrix(path, what="activations"):
    """Open a ``.npy`` file of shape (n_rows, n_columns) as a read-only memmap.

    Nothing is read into memory here: the estimator reads a memmap batch by
    batch, so activations larger than memory can be fitted and encoded.
    """
    path = _input_file(path, f"{what} file")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        # np.load would take any other file for a pickle and say so, which
        # is misleading; name the real problem instead.
        raise CLIError(f"{what} file {str(path)!r} is not a .npy file (as written by numpy.save)")
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CLIError(
            f"{what} file {str(path)!r} is not a readable .npy array ({err})"
        ) from None
    if isinstance(X, np.lib.npyio.NpzFile):  # pragma: no cover - np.load on .npz
        raise CLIError(f"{what} file {str(path)!r} is an .npz archive; expected one .npy array")
    if X.ndim != 2:
        raise CLIError(
            f"{what} in {str(path)!r} have shape {X.shape}; expected 2 dimensions "
            "(n_tokens, n_features)"
        )
    if X.dtype.kind not in "fiu":
        raise CLIError(f"{what} in {str(path)!r} have dtype {X.dtype}; expected numbers")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise CLIError(f"{what} in {str(path)!r} are empty (shape {X.shape})")
    return X


def _load_dictionary(path, device=None):
    """Load a dictionary saved by ``SparseAutoencoderDictionary.save``, or a SAELens folder."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"dictionary {str(path)!r} does not exist")
    if not path.is_dir():
        raise CLIError(
            f"dictionary {str(path)!r} is not a folder; expected one written by "
            f"'{PROG} fit' or SparseAutoencoderDictionary.save"
        )
    from sparse_dict.estimator import SparseAutoencoderDictionary
    from sparse_dict.saelens import is_saelens_folder

    try:
        if is_saelens_folder(path) and not (path / "config.json").exists():
            # A SAELens folder (cfg.json, sae_weights.safetensors) works wherever
            # a saved dictionary does.
            return SparseAutoencoderDictionary.from_saelens(path, device=device)
        return SparseAutoencoderDictionary.load(path, device=device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"cannot load dictionary {str(path)!r}: {msg}") from None


def _check_width(X, dictionary, source):
    n_in = int(dictionary.n_features_in_)
    if X.shape[1] != n_in:
        raise CLIError(
            f"{source} have {X.shape[1]} features per row but the dictionary was "
            f"fitted on {n_in}"
        )


def _save_npy(path, array, *, overwrite=False, inputs=()):
    """Save ``array`` to ``path``, written whole under a temporary name, then renamed."""
    with _persist.staged(path, _persist.NPY, overwrite=overwrite, inputs=inputs,
                         hint="--overwrite") as tmp:
        np.save(tmp, array)
    return path


@contextlib.contextmanager
def _divergence_is_an_error():
    """Turn a warning that training diverged into an error, so nothing diverged is saved."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*diverg")
        yield


def _progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, or the bare iterable when tqdm is disabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _say(args, message):
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The pieces the subcommands share
# --------------------------------------------------------------------------


def _make_extractor(args, verbose):
    from sparse_dict.extraction import TransformerActivationExtractor

    return TransformerActivationExtractor(
        model=args.model,
        layer=args.layer,
        hook=args.hook,
        max_length=args.max_length,
        batch_size=args.extract_batch_size,
        device=args.device,
        verbose=verbose,
    )


def _extract(extractor, texts):
    """Activations of ``texts``, with the token string and (text, position) of each row."""
    acts, where = extractor.fit(texts).transform_with_tokens(texts)
    index = np.column_stack([where.text_index, where.position]).astype(np.int64)
    return np.asarray(acts, dtype=np.float32), where.token, index


def _estimator_params(args):
    """The estimator's parameters given on the command line; the rest keep its defaults."""
    names = (
        "n_components", "l1_coef", "learning_rate", "batch_size", "max_iter",
        "max_steps", "device", "random_state",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _write_report(out, dictionary, codes, tokens, index, *, k, context, title, overwrite=False):
    """Feature browser and density plot of ``codes`` in folder ``out``."""
    from sparse_dict.browser import (
        plot_feature_density,
        top_activating_examples,
        write_feature_browser,
    )

    frequencies = (np.asarray(codes) > 0).mean(axis=0)
    examples = top_activating_examples(codes, tokens, index, k=k, context=context)
    html_path = write_feature_browser(out / "features.html", frequencies, examples, title=title,
                                      overwrite=overwrite)
    plot_feature_density(frequencies, out / "density.png", overwrite=overwrite)
    return Path(html_path), out / "density.png"


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def cmd_extract(args):
    texts = read_texts(args.texts, args.split)
    # Every output is checked before the (long) extraction, and written only
    # after it: a bad --tokens path leaves no activations file behind.
    out = _output_file(_npy_name(args.out), "output file", overwrite=args.overwrite,
                       inputs=[args.texts])
    tok_path = None
    if args.tokens:
        tok_path = _output_file(args.tokens, "tokens file", _persist.TOKENS,
                                overwrite=args.overwrite, inputs=[args.texts, out])
    extractor = _make_extractor(args, verbose=0 if args.quiet else 1)
    acts, tokens, index = _extract(extractor, texts)
    with contextlib.ExitStack() as stack:
        if tok_path is not None:
            tmp = stack.enter_context(_persist.staged(
                tok_path, _persist.TOKENS, overwrite=args.overwrite, hint="--overwrite"))
            with open(tmp, "w", encoding="utf-8") as fh:
                for tok, (text, pos) in zip(tokens.tolist(), index.tolist()):
                    fh.write(json.dumps({"text": text, "position": pos, "token": tok}) + "\n")
        _save_npy(out, acts, overwrite=args.overwrite)
    _say(args, f"wrote {acts.shape[0]} x {acts.shape[1]} activations to {out}"
         + (f" and their tokens to {tok_path}" if tok_path is not None else ""))
    return 0


def cmd_fit(args):
    X = load_matrix(args.activations)
    from sparse_dict.estimator import SAVED_DICTIONARY, SparseAutoencoderDictionary

    out = _output_file(args.out, "output", SAVED_DICTIONARY, overwrite=args.overwrite,
                       inputs=[args.activations])
    params = _estimator_params(args)
    params["verbose"] = 0 if args.quiet else 1
    sae = SparseAutoencoderDictionary(**params)
    start = time.perf_counter()
    with _divergence_is_an_error():
        sae.fit(X)
    seconds = time.perf_counter() - start
    sae.save(out, overwrite=args.overwrite)
    _say(
        args,
        f"fitted {sae.n_components_} features on {X.shape[0]:,} x {X.shape[1]} "
        f"activations in {seconds:.1f} s; saved to {out}",
    )
    return 0


def cmd_encode(args):
    dictionary = _load_dictionary(args.dictionary, args.device)
    X = load_matrix(args.activations)
    _check_width(X, dictionary, "activations")
    inputs = [args.activations, args.dictionary]
    out = _output_file(_npy_name(args.out), "output file", overwrite=args.overwrite,
                       inputs=inputs)
    n_components = dictionary.components_.shape[0]
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    with _persist.staged(out, _persist.NPY, overwrite=args.overwrite, inputs=inputs,
                         hint="--overwrite") as tmp:
        # Encoded in chunks into a .npy memmap, so codes larger than memory work.
        codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                          shape=(X.shape[0], n_components))
        starts = range(0, X.shape[0], args.chunk_size)
        for start in _progress(starts, desc="encode", unit="chunk", disable=args.quiet):
            stop = min(start + args.chunk_size, X.shape[0])
            # A copy of the chunk: the memmap is read-only, and the chunk is small.
            codes[start:stop] = dictionary.transform(np.array(X[start:stop], dtype=dtype))
        codes.flush()
        del codes
    _say(args, f"wrote {X.shape[0]} x {n_components} codes to {out}")
    return 0


def cmd_convert(args):
    from sparse_dict.saelens import is_saelens_folder

    source = Path(args.source)
    if args.from_format == "saelens":
        if source.is_dir() and not is_saelens_folder(source):
            raise CLIError(f"{str(source)!r} is not a SAELens folder (cfg.json and "
                           "sae_weights.safetensors)")
        dictionary = _load_dictionary(source, "cpu")
        dictionary.save(args.out, overwrite=args.overwrite)
    else:
        if (source / "cfg.json").exists() and not (source / "config.json").exists():
            raise CLIError(f"{str(source)!r} is a SAELens folder; use --from saelens")
        dictionary = _load_dictionary(source, "cpu")
        dictionary.to_saelens(args.out, overwrite=args.overwrite)
    _say(args, f"wrote {args.out} ({dictionary.activation}, "
               f"{dictionary.n_components_} features of width {dictionary.n_features_in_})")
    return 0


def cmd_report(args):
    dictionary = _load_dictionary(args.dictionary, args.device)
    texts = read_texts(args.texts, args.split)
    if args.max_texts is not None:
        texts = texts[: args.max_texts]
    out = _output_dir(args.out, "output folder")
    _output_file(out / "features.html", "feature browser", _persist.HTML,
                 overwrite=args.overwrite)
    _output_file(out / "density.png", "density plot", _persist.PNG, overwrite=args.overwrite)
    extractor = _make_extractor(args, verbose=0 if args.quiet else 1)
    acts, tokens, index = _extract(extractor, texts)
    _check_width(acts, dictionary, f"activations of --model {args.model} --layer {args.layer}")
    codes = dictionary.transform(acts)
    html_path, png_path = _write_report(
        out, dictionary, codes, tokens, index,
        k=args.top_k, context=args.context, title=args.title or f"Features of {args.dictionary}",
        overwrite=args.overwrite,
    )
    _say(args, f"wrote {html_path} and {png_path}")
    return 0


# Defaults of ``demo``: sized to finish in under five minutes on two CPU cores.
_DEMO_DEFAULTS = {
    "out": "sparse-dict-out",
    "n_texts": 1500,
    "n_eval_texts": 60,
    "n_browser_texts": 400,
    "max_length": 128,
    "classical_samples": 5000,
    "classical_max_iter": 1,
    "classical_alpha": 0.3,
    "top_k": 8,
    "context": 6,
    "n_components": 1024,
    # A short run needs a higher learning rate and more, smaller steps than the
    # estimator's defaults, which are set for long fits; l1_coef=3 brings L0
    # under 30, the usual target on this model.
    "l1_coef": 3.0,
    "learning_rate": 3e-3,
    "batch_size": 512,
    "max_iter": 3,
    "random_state": 0,
}

# Sizes of ``demo --tiny``: enough of every stage to check an installation in
# seconds. They replace only the options left at their defaults.
_TINY = {
    "n_texts": 24,
    "n_eval_texts": 6,
    "n_browser_texts": 8,
    "n_components": 64,
    "max_iter": 2,
    "batch_size": 128,
    "classical_samples": 256,
    "max_length": 32,
    "top_k": 3,
    "context": 3,
}


def _classical_fit(X, n_components, args, verbose):
    """Fit MiniBatchDictionaryLearning on a random subsample of the rows of ``X``.

    Returns the fitted estimator, the number of rows it saw and its fit time.
    Its sparsity penalty is ``--classical-alpha`` times the root mean squared
    norm of the rows, so one value means the same on activations of any scale
    (the Lasso problem is invariant when data and alpha scale together).
    """
    import warnings

    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(args.random_state)
    n = min(args.classical_samples, X.shape[0])
    rows = np.sort(rng.choice(X.shape[0], size=n, replace=False))
    sample = np.asarray(X[rows], dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1))))
    batch = min(256, n)
    est = MiniBatchDictionaryLearning(
        n_components=n_components,
        alpha=args.classical_alpha * max(rms, 1e-12),
        batch_size=batch,
        fit_algorithm="lars",
        transform_algorithm="omp",
        random_state=args.random_state,
    )
    starts = [s for _ in range(args.classical_max_iter) for s in range(0, n - batch + 1, batch)]
    start_time = time.perf_counter()
    with warnings.catch_warnings():
        # LARS warns when it stops early on nearly exact fits; harmless here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for s in _progress(starts, desc="MiniBatchDictionaryLearning", unit="batch",
                           disable=not verbose):
            est.partial_fit(sample[s:s + batch])
    return est, n, time.perf_counter() - start_time


def _chunked_transform(est, X, desc, verbose, chunk=2048):
    """``est.transform(X)`` in chunks, with a progress bar."""
    import warnings

    with warnings.catch_warnings():
        # OMP warns when a residual is already explained by fewer atoms than
        # asked for; the code is still the best one, so the warning is noise.
        warnings.filterwarnings("ignore", message="Orthogonal matching pursuit ended")
        parts = [
            est.transform(X[s:s + chunk])
            for s in _progress(range(0, X.shape[0], chunk), desc=desc, unit="chunk",
                               disable=not verbose)
        ]
    return np.concatenate(parts, axis=0)


class _FixedCodes:
    """A fitted dictionary whose codes of ``X`` are already known.

    Loss recovered needs the codes of the activations the model produces on
    the held-out texts, which are the ones just encoded; for the classical
    coder, whose encoding is the slow part, they are looked up instead of being
    computed a second time.
    """

    def __init__(self, est, X, codes):
        self.est, self.X, self.codes = est, X, codes

    def transform(self, X):
        X = np.asarray(X)
        if X.shape == self.X.shape and np.array_equal(X, self.X):
            return self.codes
        return _chunked_transform(self.est, X, "OMP coding", verbose=False)

    def inverse_transform(self, codes):
        return self.est.inverse_transform(codes)


def _loss_recovered(extractor, dictionary, texts, verbose):
    from sparse_dict.extraction import splice_evaluation

    result = splice_evaluation(extractor, dictionary, texts, verbose=verbose)
    return result.loss_recovered


def _format_table(rows, n_eval_tokens):
    """The demo's results as an aligned plain-text table."""
    header = ["method", "fit rows", "fit time", "explained var", "L0", "dead", "loss recovered"]

    def fmt(v, spec):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "n/a"
        return format(v, spec)

    body = [
        [
            r["method"],
            fmt(r["fit_rows"], ","),
            fmt(r["fit_seconds"], ".1f") + " s",
            fmt(r["explained_variance"], ".3f"),
            fmt(r["l0"], ".1f"),
            fmt(r["dead_fraction"], ".1%"),
            fmt(r["loss_recovered"], ".3f"),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    note = f"Measured on {n_eval_tokens:,} tokens of held-out works."
    if len(rows) > 1:
        note += " MiniBatchDictionaryLearning codes by OMP at the sparse autoencoder's L0."
    lines.append(note)
    return "\n".join(lines)


def _plot_training(history, path):
    """Loss and L0 over the training steps, side by side, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "l0"), ("training loss", "L0")):
        ax.plot(np.asarray(history[key]), color="#1b6ca8", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if key == "loss":
            ax.set_yscale("log")
    fig.savefig(path, format="png", dpi=110)


def _demo_folder():
    """The kind of folder the demo writes: what its --overwrite may replace."""
    from sparse_dict.estimator import SAVED_DICTIONARY

    results = _persist.json_kind(
        "demo results", lambda r: isinstance(r, dict) and set(r) == {"results", "settings"})
    return _persist.folder_kind("sparse-dict demo folder", {
        "features.html": _persist.HTML, "density.png": _persist.PNG,
        "training.png": _persist.PNG, "results.json": results, "results.txt": None,
        "dictionary": SAVED_DICTIONARY,
    })


def cmd_demo(args):
    if args.tiny:
        for name, value in _TINY.items():
            if getattr(args, name) == _DEMO_DEFAULTS.get(name):
                setattr(args, name, value)
    # The folder is built under a temporary name and renamed into place at
    # the end, so an error or Ctrl-C leaves no partial folder behind.
    kind = _demo_folder()
    final = _output_file(args.out, "output folder", kind, overwrite=args.overwrite)
    with _persist.staged(final, kind, overwrite=args.overwrite, hint="--overwrite") as out:
        return _run_demo(args, out, final)


def _run_demo(args, out, final):
    verbose = 0 if args.quiet else 1
    from sparse_dict import metrics
    from sparse_dict._corpus import load_corpus
    from sparse_dict.estimator import SparseAutoencoderDictionary

    started = time.perf_counter()

    def stage(number, message):
        elapsed = time.perf_counter() - started
        _say(args, f"[{number}/5] {message}  ({elapsed:.0f} s)")

    stage(1, f"activations of the built-in model (layer {args.layer}, {args.hook}) "
          "over the bundled corpus")
    train_texts = load_corpus("train", n_texts=args.n_texts, random_state=args.random_state)
    # Held-out works: the first --n-eval-texts make the table (the classical
    # coder optimises every token, so they are few), all of them the browser.
    eval_texts = load_corpus("test", n_texts=max(args.n_eval_texts, args.n_browser_texts),
                             random_state=args.random_state)
    table_texts = eval_texts[: args.n_eval_texts]
    extractor = _make_extractor(args, verbose)
    X_train = np.asarray(extractor.fit(train_texts).transform(train_texts), dtype=np.float32)
    X_browse, tokens, index = _extract(extractor, eval_texts)
    # Texts come out one after the other, so the table's rows are a prefix.
    X_eval = X_browse[: int(np.count_nonzero(index[:, 0] < len(table_texts)))]
    _say(args, f"      {X_train.shape[0]:,} training tokens; held out: {X_eval.shape[0]:,} "
         f"tokens for the table, {X_browse.shape[0]:,} for the browser; "
         f"{X_train.shape[1]} neurons")

    stage(2, f"sparse autoencoder, {args.n_components} features")
    params = _estimator_params(args)
    params["verbose"] = verbose
    sae = SparseAutoencoderDictionary(**params)
    start = time.perf_counter()
    with _divergence_is_an_error():
        sae.fit(X_train)
    sae_seconds = time.perf_counter() - start

    codes = sae.transform(X_eval)
    sae_row = {
        "method": "SparseAutoencoderDictionary",
        "fit_rows": int(X_train.shape[0]),
        "fit_seconds": sae_seconds,
        "explained_variance": metrics.explained_variance(X_eval, sae.inverse_transform(codes)),
        "l0": metrics.l0(codes),
        "dead_fraction": metrics.dead_fraction(codes),
    }
    rows = [sae_row]
    if not args.no_classical:
        n_classical = min(args.classical_samples, X_train.shape[0])
        stage(3, f"MiniBatchDictionaryLearning on {n_classical:,} of the training rows")
        classical, n_rows, seconds = _classical_fit(X_train, sae.n_components_, args, verbose)
        classical.set_params(transform_n_nonzero_coefs=max(1, int(round(sae_row["l0"]))))
        classical_codes = _chunked_transform(classical, X_eval, "OMP coding", verbose)
        rows.append({
            "method": "MiniBatchDictionaryLearning",
            "fit_rows": int(n_rows),
            "fit_seconds": seconds,
            "explained_variance": metrics.explained_variance(
                X_eval, classical.inverse_transform(classical_codes)),
            "l0": metrics.l0(classical_codes),
            "dead_fraction": metrics.dead_fraction(classical_codes),
        })
    else:
        stage(3, "MiniBatchDictionaryLearning skipped (--no-classical)")

    stage(4, "loss recovered: the model run with its MLP activations replaced by "
          "each reconstruction")
    sae_row["loss_recovered"] = _loss_recovered(extractor, sae, table_texts, verbose)
    if len(rows) > 1:
        rows[1]["loss_recovered"] = _loss_recovered(
            extractor, _FixedCodes(classical, X_eval, classical_codes), table_texts, verbose)

    stage(5, f"writing the dictionary, plots and feature browser to {final}")
    sae.save(out / "dictionary", overwrite=True)
    _plot_training(sae.history_, out / "training.png")
    _write_report(
        out, sae, sae.transform(X_browse), tokens, index, k=args.top_k,
        context=args.context, title="Features of the built-in model's MLP (sparse-dict demo)",
    )
    table = _format_table(rows, X_eval.shape[0])
    (out / "results.txt").write_text(table + "\n", encoding="utf-8")
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "overwrite")}
    (out / "results.json").write_text(
        json.dumps({"results": rows, "settings": settings}, indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    print(table)
    print()
    print(f"Wrote to {final}/:")
    for name, what in [
        ("features.html", "the feature browser (open it in a web browser)"),
        ("density.png", "histogram of the features' firing frequencies"),
        ("training.png", "training loss and L0"),
        ("dictionary/", "the saved dictionary (SparseAutoencoderDictionary.load)"),
        ("results.txt", "this table; results.json: the same with the settings"),
    ]:
        print(f"  {name:<14} {what}")
    sys.stdout.flush()
    _say(args, f"done in {time.perf_counter() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------


def _number(kind, minimum, strict):
    """An argparse type: a finite ``kind`` above (``strict``) or from ``minimum``."""
    bound = f"> {minimum}" if strict else f">= {minimum}"
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")) or (
            value <= minimum if strict else value < minimum
        ):
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 0, strict=True)
_non_negative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0, strict=True)
_non_negative_float = _number(float, 0, strict=False)


def _add_common(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument(
        "--traceback", action="store_true",
        help="on an error, show the full Python traceback instead of one line",
    )


def _add_extraction(p):
    g = p.add_argument_group("activations")
    g.add_argument(
        "--model", default="builtin",
        help="'builtin' (the bundled 1-layer transformer) or the path of a local "
        "Hugging Face model (default: builtin)",
    )
    g.add_argument("--layer", type=int, default=0, help="layer number (default: 0)")
    g.add_argument(
        "--hook", default="mlp_post",
        help="named point in the layer, e.g. mlp_post (default: mlp_post)",
    )
    g.add_argument(
        "--max-length", type=_positive_int, default=128,
        help="texts are cut to this many tokens (default: 128)",
    )
    g.add_argument(
        "--extract-batch-size", type=_positive_int, default=32,
        help="texts per forward pass (default: 32)",
    )
    g.add_argument(
        "--split", choices=("lines", "paragraphs", "whole"), default="lines",
        help="how a plain texts file is cut into texts: one per line, one per "
        "blank-line separated paragraph, or the whole file (default: lines; a "
        ".jsonl file holds one JSON string or {\"text\": ...} per line)",
    )


def _add_estimator(p, *, demo=False):
    defaults = _DEMO_DEFAULTS if demo else {}

    def shown(name):
        return f" (default: {defaults[name]})" if name in defaults else ""

    g = p.add_argument_group(
        "dictionary",
        "parameters of SparseAutoencoderDictionary; those not given keep the "
        "estimator's defaults" + (", except where a default is shown" if demo else ""),
    )
    g.add_argument("--n-components", type=_positive_int, default=defaults.get("n_components"),
                   help="number of features" + (shown("n_components") if demo else
                   " (default: 4 x the number of input features)"))
    g.add_argument("--l1-coef", type=_non_negative_float, default=defaults.get("l1_coef"),
                   help="sparsity penalty: higher gives fewer active features" + shown("l1_coef"))
    g.add_argument("--learning-rate", type=_positive_float,
                   default=defaults.get("learning_rate"),
                   help="Adam's peak step size" + shown("learning_rate"))
    g.add_argument("--batch-size", type=_positive_int, default=defaults.get("batch_size"),
                   help="rows per training step" + shown("batch_size"))
    g.add_argument("--max-iter", type=_positive_int, default=defaults.get("max_iter"),
                   help="passes over the data (epochs)" + shown("max_iter"))
    g.add_argument("--max-steps", type=_positive_int, default=defaults.get("max_steps"),
                   help="cap on training steps" + shown("max_steps"))
    g.add_argument("--random-state", type=int, default=defaults.get("random_state"),
                   help="seed, for repeatable fits" + shown("random_state"))


def _add_overwrite(p, what):
    p.add_argument(
        "--overwrite", action="store_true",
        help=f"replace the output if it exists and is {what}; nothing else is ever "
        "replaced, and without this option nothing is",
    )


def _add_device(p):
    p.add_argument(
        "--device", default="auto",
        help="'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N' (default: auto)",
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the rest of the CLI."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    """The ``sparse-dict`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Learn sparse dictionaries of neural-network activations with "
        "sparse autoencoders, the scikit-learn way.",
        epilog=f"Start with '{PROG} demo'. Each subcommand has its own --help.",
    )
    from sparse_dict import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = _DEMO_DEFAULTS
    p = sub.add_parser(
        "demo",
        help="the whole job on the built-in model: extract, fit, compare, browse",
        description="Extract the built-in model's MLP activations over the bundled "
        "Shakespeare corpus, fit a sparse autoencoder and scikit-learn's "
        "MiniBatchDictionaryLearning on them, print a table comparing the two "
        "(explained variance, L0, dead fraction, loss recovered, fit time) on "
        "held-out works, and write the plots, the saved dictionary and the feature "
        "browser to --out.",
    )
    p.add_argument("--out", default=d["out"],
                   help=f"output folder (default: ./{d['out']})")
    p.add_argument("--tiny", action="store_true",
                   help="a run of a few seconds at toy sizes, to check an installation")
    _add_overwrite(p, "a folder written by an earlier demo")
    p.add_argument("--n-texts", type=_positive_int, default=d["n_texts"],
                   help=f"training texts from the corpus (default: {d['n_texts']})")
    p.add_argument("--n-eval-texts", type=_positive_int, default=d["n_eval_texts"],
                   help="texts of held-out works the table is measured on "
                   f"(default: {d['n_eval_texts']})")
    p.add_argument("--n-browser-texts", type=_positive_int, default=d["n_browser_texts"],
                   help="texts of held-out works the feature browser shows "
                   f"(default: {d['n_browser_texts']})")
    p.add_argument("--max-length", type=_positive_int, default=d["max_length"],
                   help=f"texts are cut to this many tokens (default: {d['max_length']})")
    g = p.add_argument_group("classical dictionary learning")
    g.add_argument("--classical-samples", type=_positive_int, default=d["classical_samples"],
                   help="training rows MiniBatchDictionaryLearning is fitted on; it "
                   "solves an optimisation per row, so it gets a random subsample "
                   f"(default: {d['classical_samples']})")
    g.add_argument("--classical-max-iter", type=_positive_int, default=d["classical_max_iter"],
                   help="its passes over those rows "
                   f"(default: {d['classical_max_iter']})")
    g.add_argument("--classical-alpha", type=_positive_float, default=d["classical_alpha"],
                   help="its sparsity penalty, relative to the root mean squared norm "
                   f"of the activations (default: {d['classical_alpha']})")
    g.add_argument("--no-classical", action="store_true",
                   help="skip MiniBatchDictionaryLearning")
    g = p.add_argument_group("feature browser")
    g.add_argument("--top-k", type=_positive_int, default=d["top_k"],
                   help=f"examples per feature (default: {d['top_k']})")
    g.add_argument("--context", type=_non_negative_int, default=d["context"],
                   help=f"tokens of context either side of an example (default: {d['context']})")
    _add_estimator(p, demo=True)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo, model="builtin", layer=0, hook="mlp_post",
                   extract_batch_size=32)

    p = sub.add_parser(
        "extract", help="texts file -> activations (.npy)",
        description="Run a transformer over the texts of a file and save the "
        "activations at one layer, one row per token, as a float32 .npy array.",
    )
    p.add_argument("texts", help="texts file (.txt, or .jsonl)")
    p.add_argument("-o", "--out", required=True,
                   help="output .npy file ('.npy' is added if the name lacks it)")
    p.add_argument("--tokens", help="also write each row's text, position and token "
                   "string to this .jsonl file")
    _add_overwrite(p, "an .npy (or tokens file) written earlier")
    _add_extraction(p)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "fit", help="activations (.npy) -> saved dictionary",
        description="Fit a SparseAutoencoderDictionary on a .npy array of "
        "activations (read batch by batch from disk, never loaded whole) and save "
        "it to a folder (safetensors and JSON).",
    )
    p.add_argument("activations", help=".npy array of shape (n_tokens, n_features)")
    p.add_argument("-o", "--out", required=True, help="output folder for the dictionary")
    _add_overwrite(p, "a dictionary saved earlier")
    _add_estimator(p)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "encode", help="saved dictionary + activations -> codes (.npy)",
        description="Encode activations with a saved dictionary: writes the "
        "features' activations (the codes), one row per input row, as .npy.",
    )
    p.add_argument("dictionary", help="folder written by 'sparse-dict fit', or a SAELens folder")
    p.add_argument("activations", help=".npy array of shape (n_tokens, n_features)")
    p.add_argument("-o", "--out", required=True,
                   help="output .npy file ('.npy' is added if the name lacks it)")
    p.add_argument("--chunk-size", type=_positive_int, default=8192,
                   help="rows encoded at a time (default: 8192)")
    _add_overwrite(p, "an .npy written earlier")
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "report", help="saved dictionary + texts -> feature browser and density plot",
        description="Run the model over the texts, encode the activations with the "
        "dictionary, and write features.html (the feature browser: each feature's "
        "firing frequency and top-activating tokens in context) and density.png "
        "(histogram of log firing frequency) to --out. Use the same --model, --layer "
        "and --hook as the activations the dictionary was fitted on.",
    )
    p.add_argument("dictionary", help="folder written by 'sparse-dict fit', or a SAELens folder")
    p.add_argument("texts", help="texts file (.txt, or .jsonl)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--max-texts", type=_positive_int, help="use only the first N texts")
    p.add_argument("--top-k", type=_positive_int, default=8,
                   help="examples per feature (default: 8)")
    p.add_argument("--context", type=_non_negative_int, default=6,
                   help="tokens of context either side of an example (default: 6)")
    p.add_argument("--title", help="title of the browser page")
    _add_overwrite(p, "a report written earlier (features.html, density.png)")
    _add_extraction(p)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "convert", help="SAELens folder <-> saved dictionary",
        description="Convert between SAELens' format (a folder with cfg.json and "
        "sae_weights.safetensors; architectures standard, topk, jumprelu) and this "
        "package's saved dictionary. The outputs encode and decode as the inputs do.",
    )
    p.add_argument("--from", dest="from_format", required=True,
                   choices=("saelens", "sparse_dict"), help="the format of SOURCE")
    p.add_argument("source", help="the folder to convert")
    p.add_argument("-o", "--out", required=True, help="output folder")
    _add_overwrite(p, "a folder that convert wrote earlier in the same format")
    _add_common(p)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None):
    """Run the ``sparse-dict`` command line.

    Parameters
    ----------
    argv : list of str, default=None
        The arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    status : int
        The exit status: 0 on success; 2 for a problem the user can fix (bad
        input, an output that exists, an unwritable path, a diverged fit; one
        line on stderr says what); 130 when interrupted (Ctrl-C); 1 only for a
        bug.

    Examples
    --------
    >>> from sparse_dict.cli import main
    >>> main(["encode", "no-such-dictionary", "acts.npy", "-o", "codes.npy"])
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the promise is one line, never a traceback
        if args.traceback:
            raise
        message, status = _user_error(err)
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return status


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _user_error(err):
    """The one-line message for ``err`` and the exit status: 2 if the user can fix it, else 1."""
    # ValueError and TypeError are how the estimators reject bad input (NaN,
    # wrong shapes, invalid parameters), with a message meant for users.
    if isinstance(err, (CLIError, ValueError, TypeError)):
        return _first_line(err), EXIT_USAGE
    # A diverged fit (DivergenceError is a FloatingPointError) or a warning
    # that -W error turned into an exception: a setting to change, not a bug.
    if isinstance(err, (FloatingPointError, Warning)):
        prefix = "" if isinstance(err, FloatingPointError) else f"{type(err).__name__}: "
        return prefix + _first_line(err), EXIT_USAGE
    if isinstance(err, OSError):
        # A file that cannot be read or written, a full disk, a read-only folder.
        if err.strerror and err.filename is not None:
            return f"{err.strerror}: {str(err.filename)!r}", EXIT_USAGE
        return _first_line(err), EXIT_USAGE
    if isinstance(err, MemoryError):
        return "out of memory; try smaller inputs or a smaller --batch-size", EXIT_USAGE
    if type(err).__name__ == "SafetensorError":  # a damaged weights file
        return f"damaged safetensors file: {_first_line(err)}", EXIT_USAGE
    first = str(err).splitlines()[0] if str(err) else ""
    return (f"{type(err).__name__}: {first} (a bug: please report it; rerun with "
            "--traceback for details)"), EXIT_BUG
