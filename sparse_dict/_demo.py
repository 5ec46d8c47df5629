"""``sparse-dict demo``: the whole job on the built-in model and corpus.

Activations of the bundled corpus, a sparse autoencoder and scikit-learn's
MiniBatchDictionaryLearning fitted on them, a comparison table, plots, the
saved dictionary and a feature browser.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings

import numpy as np

from sparse_dict import _persist
from sparse_dict._cli_common import (
    _divergence_is_an_error,
    _estimator_params,
    _extract,
    _logit_effects_or_none,
    _make_extractor,
    _output_file,
    _progress,
    _say,
    _write_report,
)

# Defaults of ``demo``: sized to finish in about a minute and a half on two
# CPU cores (README says how long it took), with enough tokens that the
# comparison of the two methods still means something.
_DEMO_DEFAULTS = {
    "out": "sparse-dict-out",
    "n_texts": 800,
    "n_eval_texts": 40,
    "n_browser_texts": 300,
    "max_length": 128,
    "classical_samples": 1536,
    "classical_max_iter": 1,
    "classical_alpha": 0.3,
    "top_k": 8,
    "context": 6,
}

# The demo's estimator parameters where they differ from the estimator's own
# defaults. A short run needs more, smaller steps than the estimator's
# defaults, which are set for long fits; l1_coef=3 brings L0 under 30, the
# usual target on this model.
_DEMO_ESTIMATOR_DEFAULTS = {
    "n_components": 1024,
    "l1_coef": 3.0,
    "learning_rate": 3e-3,
    "batch_size": 512,
    "max_iter": 3,
    "random_state": 0,
}

# The demo's size curve: top-k dictionaries of growing size at one L0 (k),
# each with the same short budget, so that the curve takes seconds. The
# benchmarks' findings section measures it properly (docs/findings.rst).
_SIZE_CURVE = {"sizes": (256, 512, 1024, 2048), "k": 16, "steps": 400, "batch_size": 512}
# Tiny: few enough atoms for its 768 tokens that fit does not warn of
# memorisation (at least 16 rows an atom).
_SIZE_CURVE_TINY = {"sizes": (16, 32), "k": 4, "steps": 20, "batch_size": 128}


# Sizes of ``demo --tiny``: enough of every stage to check an installation in
# seconds. They replace only the options left unset.
_TINY = {
    "n_texts": 24,
    "n_eval_texts": 6,
    "n_browser_texts": 8,
    "n_components": 32,
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
    # Every row, the last batch shorter where n is no multiple of the batch:
    # whole batches only fed 768 of 1,000 rows, and 1,000 were reported.
    starts = [s for _ in range(args.classical_max_iter) for s in range(0, n, batch)]
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


class _RememberedCodes:
    """A fitted dictionary that remembers the codes of the rows it has coded.

    The classical coder's encoding (OMP) is the slow part of its evaluation.
    Splicing asks for the codes of the same held-out activations that the
    table was measured on, batch by batch in its own order; rows already
    coded are looked up by their exact values instead of being coded again.
    """

    def __init__(self, est, desc, verbose):
        self.est, self.desc, self.verbose = est, desc, verbose
        self._codes = {}

    def transform(self, X):
        X = np.ascontiguousarray(X)
        keys = [row.tobytes() for row in X]
        missing = [i for i, key in enumerate(keys) if key not in self._codes]
        if missing:
            fresh = _chunked_transform(self.est, X[missing], self.desc, self.verbose)
            self._codes.update(zip((keys[i] for i in missing), fresh))
            self.verbose = False  # one bar, for the first (large) call
        return np.stack([self._codes[key] for key in keys])

    def inverse_transform(self, codes):
        return self.est.inverse_transform(codes)


def _loss_recovered(extractor, dictionary, texts, verbose, label):
    from sparse_dict.extraction import splice_evaluation

    result = splice_evaluation(extractor, dictionary, texts, verbose=verbose, label=label)
    return result.loss_recovered


def _format_table(rows, n_eval_tokens, n_eval_texts, tiny=False):
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
    note = (f"Measured on {n_eval_tokens:,} tokens of {n_eval_texts} texts of held-out works "
            "(density.png and the browser use more of them).")
    if len(rows) > 1:
        note += " MiniBatchDictionaryLearning codes by OMP at the sparse autoencoder's L0."
    lines.append(note)
    if tiny:
        lines.append(
            "--tiny: toy sizes, a smoke test of the installation only; these numbers say "
            "nothing about either method (a negative loss recovered is usual here)."
        )
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
    # Marked as the package's: --overwrite replaces a demo folder only if
    # each of its files is recognised as the package's own.
    fig.savefig(path, format="png", dpi=110, metadata=_persist.png_metadata())


def _size_curve(X_train, X_eval, extractor, texts, args):
    """Explained variance and loss recovered of top-k dictionaries of growing size.

    The seed's first finding (more features recover more of the model's
    loss), in miniature: one fixed L0, one short step budget for every size.
    Returns one row per size.
    """
    from sparse_dict.estimator import SparseAutoencoderDictionary
    from sparse_dict.extraction import splice_evaluation
    from sparse_dict.metrics import explained_variance

    setup = _SIZE_CURVE_TINY if args.tiny else _SIZE_CURVE
    rows = []
    for n in setup["sizes"]:
        sae = SparseAutoencoderDictionary(
            n, activation="topk", k=setup["k"], max_steps=setup["steps"],
            batch_size=setup["batch_size"], random_state=args.random_state,
            device=args.device)
        with warnings.catch_warnings():
            # Short by design, and said so in the table's caption.
            warnings.filterwarnings("ignore", message="The fit stopped after")
            sae.fit(X_train)
        ev = explained_variance(X_eval, sae.inverse_transform(sae.transform(X_eval)))
        lr = splice_evaluation(extractor, sae, texts).loss_recovered
        rows.append({"n_components": n, "k": setup["k"], "steps": setup["steps"],
                     "explained_variance": float(ev), "loss_recovered": float(lr)})
    return rows


def _format_size_curve(rows):
    """The size curve as a few plain-text lines."""
    head = (f"Size curve (top-k, k={rows[0]['k']} at every size, {rows[0]['steps']} steps "
            "each; the benchmarks measure it at length, docs/findings.rst):")
    lines = [head, f"  {'features':>8}  {'explained var':>13}  {'loss recovered':>14}"]
    lines += [f"  {r['n_components']:>8,}  {r['explained_variance']:>13.3f}  "
              f"{r['loss_recovered']:>14.3f}" for r in rows]
    return "\n".join(lines)


class _Steps:
    """Numbered step headers; each step's own duration is printed when it ends."""

    def __init__(self, args, total):
        self.args, self.total, self.started = args, total, time.perf_counter()
        self._current = None

    def __call__(self, number, message):
        self.end()
        _say(self.args, f"[{number}/{self.total}] {message}")
        self._current = (number, time.perf_counter())

    def end(self):
        if self._current is not None:
            number, start = self._current
            _say(self.args, f"      step {number} took {time.perf_counter() - start:.1f} s")
            self._current = None

    def elapsed(self):
        return time.perf_counter() - self.started


# The demo's steering example: a prompt, and the steering strength as a
# multiple of the root mean squared norm of the activations (a quarter of a
# typical token's activations moves the built-in model clearly without
# drowning the prompt; see docs/analysis.rst).
_STEERING_PROMPT = "My lord, I"
_STEERING_SHARE = 0.25
_STEERING_TOKENS = 12


def _whole_words(tokens):
    """Whether most of a feature's top promoted tokens are whole words (easy to read)."""
    words = [t for t in tokens[:5]
             if str(t).strip().isalpha() and (str(t)[:1] == " " or str(t)[:1].isupper())]
    return len(words) >= 4


def _steering_example(extractor, sae, effects, codes, X, dictionary):
    """Text showing one feature steering the model: the prompt continued without and with it.

    The feature is the one, among those that fire on the browser's texts and
    promote mostly whole words, whose strongest logit effect is largest, so
    that its push is plain to see. Returns "" when the model has no logit
    effects.
    """
    from sparse_dict.analysis import steer

    if effects is None:
        return ""
    fired = np.asarray((codes > 0).any(axis=0)).ravel()
    if not fired.any():
        return ""
    readable = np.array([_whole_words(row) for row in effects.promoted_tokens])
    if not (fired[effects.features] & readable).any():
        readable[:] = True
    size = np.where(fired[effects.features] & readable, effects.promoted_logits[:, 0], -np.inf)
    row = int(np.argmax(size))
    feature = int(effects.features[row])
    # Rounded as it is printed, so that the printed command does exactly this.
    strength = round(_STEERING_SHARE * float(np.sqrt(np.mean(np.sum(
        np.asarray(X, dtype=np.float64) ** 2, axis=1)))), 2)
    plain, steered = (
        steer(extractor, sae, [_STEERING_PROMPT], feature, s, max_new_tokens=_STEERING_TOKENS)[0]
        for s in (0.0, strength))
    promoted = ", ".join(repr(t) for t in effects.promoted_tokens[row, :5])
    # Quoted for a POSIX shell: the folder may hold spaces, the prompt does.
    command = ["sparse-dict", "steer", str(dictionary), _STEERING_PROMPT,
               "--feature", str(feature), "--strength", f"{strength:.2f}",
               "--max-new-tokens", str(_STEERING_TOKENS)]
    return "\n".join([
        f"Steering with feature {feature} (it promotes {promoted}), its atom added "
        f"at strength {strength:.2f} to every position:",
        f"  {_STEERING_PROMPT!r} + without steering: {plain!r}",
        f"  {_STEERING_PROMPT!r} + with steering:    {steered!r}",
        f"  ({shlex.join(command)} does the same)",
    ])


def _demo_folder():
    """The kind of folder the demo writes: what its --overwrite may replace."""
    from sparse_dict.estimator import SAVED_DICTIONARY

    # Folders of earlier versions (without n_eval_tokens) are the demo's too.
    results = _persist.json_kind(
        "demo results", lambda r: isinstance(r, dict)
        and {"results", "settings"} <= set(r)
        <= {"results", "settings", "n_eval_tokens", "size_curve"})
    return _persist.folder_kind("sparse-dict demo folder", {
        "features.html": _persist.HTML, "density.png": _persist.PNG,
        # The table's own header: a file of the user's named results.txt
        # is not the demo's to replace.
        "training.png": _persist.PNG, "results.json": results,
        "results.txt": _persist.text_kind("demo results table",
                                          "fit rows  fit time  explained var"),
        "dictionary": SAVED_DICTIONARY,
    })


def cmd_demo(args):
    if args.tiny:
        # The options given on the command line are the user's, even where
        # they equal the defaults; --tiny sizes the others.
        given = getattr(args, "argv", ())
        for name, value in _TINY.items():
            option = "--" + name.replace("_", "-")
            if not any(a == option or a.startswith(option + "=") for a in given):
                setattr(args, name, value)
    # The folder is built under a temporary name and renamed into place at
    # the end, so an error or Ctrl-C leaves no partial folder behind.
    kind = _demo_folder()
    final = _output_file(args.out, "output folder", kind, overwrite=args.overwrite)
    with _persist.staged(final, kind, overwrite=args.overwrite, hint="--overwrite") as out:
        summary, step = _run_demo(args, out, final)
    # Printed once the folder is in place: a stdout that fails (closed by the
    # reader of a pipe, or unable to encode a name) must not cost the folder.
    print(summary)
    sys.stdout.flush()
    _say(args, f"done in {step.elapsed():.0f} s")
    return 0


def _run_demo(args, out, final):
    verbose = 0 if args.quiet else 1
    from sparse_dict._corpus import load_corpus
    from sparse_dict.estimator import SparseAutoencoderDictionary
    from sparse_dict.model_selection import SparseCodingScorer

    step = _Steps(args, 6)
    scorer = SparseCodingScorer()

    step(1, f"activations of the built-in model (layer {args.layer}, {args.hook}) "
         "over the bundled corpus")
    train_texts = load_corpus("train", n_texts=args.n_texts, random_state=args.random_state)
    # Held-out works: the first --n-eval-texts make the table (the classical
    # coder optimises every token, so they are few), more of them the browser.
    eval_texts = load_corpus("test", n_texts=max(args.n_eval_texts, args.n_browser_texts),
                             random_state=args.random_state)
    table_texts = eval_texts[: args.n_eval_texts]
    extractor = _make_extractor(args, verbose)
    with warnings.catch_warnings():
        # --max-length below the model's 128 positions (--tiny's 32) cuts
        # texts by the demo's own choice, for speed.
        warnings.filterwarnings("ignore", message=r".* texts have more than max_length=")
        X_train = np.asarray(extractor.fit(train_texts).transform(train_texts),
                             dtype=np.float32)
        # The table's activations are extracted on their own, in the batches
        # that splicing will use, so that the classical coder's codes can be
        # reused there.
        X_eval = np.asarray(extractor.transform(table_texts), dtype=np.float32)
        X_browse, tokens, index = _extract(extractor, eval_texts)
    _say(args, f"      {X_train.shape[0]:,} training tokens; held out: {X_eval.shape[0]:,} "
         f"tokens of {len(table_texts)} texts for the table, {X_browse.shape[0]:,} tokens "
         f"of {len(eval_texts)} texts for the browser and density plot; "
         f"{X_train.shape[1]} neurons")

    step(2, f"sparse autoencoder, {args.n_components} features, on the training tokens")
    params = _estimator_params(args)
    params["verbose"] = verbose
    sae = SparseAutoencoderDictionary(**params)
    start = time.perf_counter()
    with _divergence_is_an_error(), warnings.catch_warnings(record=True) as caught:
        # The demo's run is short by design; say so in one line rather than
        # with the estimator's full warning.
        warnings.filterwarnings("always", message="The fit stopped after", category=Warning)
        sae.fit(X_train, provenance=extractor.provenance(
            corpus=f"sparse_dict.datasets.load_corpus('train', n_texts={args.n_texts}, "
                   f"random_state={args.random_state})"))
    if any("The fit stopped after" in str(w.message) for w in caught):
        _say(args, "      a short run: the loss was still falling at its end; raise "
             "--max-iter for a converged dictionary")
    for w in caught:
        # --tiny's toy run is judged by nothing (its table says so): a
        # warning that its codes are shrunk would send the user to l1_coef.
        toy = args.tiny and "The codes are shrunk" in str(w.message)
        if "The fit stopped after" not in str(w.message) and not toy:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    sae_row = {"method": "SparseAutoencoderDictionary", "fit_rows": int(X_train.shape[0]),
               "fit_seconds": time.perf_counter() - start, **scorer(sae, X_eval)}
    rows = [sae_row]
    if not args.no_classical:
        n_classical = min(args.classical_samples, X_train.shape[0])
        step(3, f"MiniBatchDictionaryLearning on {n_classical:,} of the training tokens, "
             f"then OMP coding of the {X_eval.shape[0]:,} table tokens")
        classical, n_rows, seconds = _classical_fit(X_train, sae.n_components_, args, verbose)
        classical.set_params(transform_n_nonzero_coefs=max(1, int(round(sae_row["l0"]))))
        coder = _RememberedCodes(
            classical, f"OMP coding of {X_eval.shape[0]:,} held-out tokens", verbose)
        rows.append({"method": "MiniBatchDictionaryLearning", "fit_rows": int(n_rows),
                     "fit_seconds": seconds, **scorer(coder, X_eval)})
    else:
        step(3, "MiniBatchDictionaryLearning skipped (--no-classical)")

    step(4, f"loss recovered on the {len(table_texts)} table texts: the model run with its "
         "MLP activations replaced by each reconstruction")
    sae_row["loss_recovered"] = _loss_recovered(
        extractor, sae, table_texts, verbose, "the sparse autoencoder")
    if len(rows) > 1:
        rows[1]["loss_recovered"] = _loss_recovered(
            extractor, coder, table_texts, verbose, "MiniBatchDictionaryLearning")

    size_curve = []
    if args.no_size_curve:
        step(5, "size curve skipped (--no-size-curve)")
    else:
        setup = _SIZE_CURVE_TINY if args.tiny else _SIZE_CURVE
        step(5, "size curve: top-k dictionaries of "
             + ", ".join(f"{n:,}" for n in setup["sizes"])
             + f" features at k={setup['k']}, scored on the table texts")
        size_curve = _size_curve(X_train, X_eval, extractor, table_texts, args)

    step(6, f"writing the dictionary, plots and feature browser to {final}")
    sae.save(out / "dictionary", overwrite=True)
    _plot_training(sae.history_, out / "training.png")
    browse_codes = sae.transform(X_browse)
    n_dead = int(np.count_nonzero(~(browse_codes > 0).any(axis=0)))
    effects = _logit_effects_or_none(extractor, sae, top_k=8)
    _write_report(
        out, sae, browse_codes, tokens, index, k=args.top_k,
        context=args.context, title="Features of the built-in model's MLP (sparse-dict demo)",
        density_title=(f"{n_dead} of {browse_codes.shape[1]} features dead on "
                       f"{X_browse.shape[0]:,} tokens of {len(eval_texts)} held-out texts"),
        logit_effects=effects,
    )
    steering = _steering_example(extractor, sae, effects, browse_codes, X_browse,
                                  final / "dictionary")
    table = _format_table(rows, X_eval.shape[0], len(table_texts), tiny=args.tiny)
    curve_text = "\n\n" + _format_size_curve(size_curve) if size_curve else ""
    (out / "results.txt").write_text(table + curve_text + "\n", encoding="utf-8")
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "overwrite")}
    # The length the texts were cut to: the model's positions cap what was
    # asked (--max-length 100000 was recorded as if used).
    settings["max_length"] = extractor.provenance()["max_length"]
    (out / "results.json").write_text(
        json.dumps({"results": rows, "n_eval_tokens": int(X_eval.shape[0]),
                    "size_curve": size_curve, "settings": settings},
                   indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    step.end()
    lines = [table, ""]
    if size_curve:
        lines += [_format_size_curve(size_curve), ""]
    if steering:
        lines += [steering, ""]
    lines.append(f"Wrote to {final}/:")
    for name, what in [
        ("features.html", "the feature browser (open it in a web browser)"),
        ("density.png", f"histogram of the features' firing frequencies on the "
                        f"{len(eval_texts)} browser texts"),
        ("training.png", "training loss and L0"),
        ("dictionary/", "the saved dictionary (SparseAutoencoderDictionary.load)"),
        ("results.txt", "this table; results.json: the same with the settings"),
    ]:
        lines.append(f"  {name:<14} {what}")
    return "\n".join(lines), step
