"""The ``sparse-dict`` command line (also ``python -m sparse_dict``).

Subcommands::

    sparse-dict demo      the whole job on the built-in model and corpus
    sparse-dict extract   texts file -> activations (.npy, or a resumable store folder)
    sparse-dict fit       activations (.npy) -> saved dictionary (folder)
    sparse-dict encode    saved dictionary + activations -> codes (.npy)
    sparse-dict report    saved dictionary + texts -> feature browser + density plot
    sparse-dict steer     saved dictionary + prompts -> continuations with and without a feature
    sparse-dict convert   SAELens folder <-> saved dictionary

Every failure a user can cause (a missing or unreadable file, an array of the
wrong shape, a bad option) ends with one line on stderr and exit status 2;
``--traceback`` adds the full Python traceback, for bug reports (the exit
status stays the same).
Heavy libraries (torch, scikit-learn, matplotlib) are imported only by the
subcommand that needs them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import threading
import warnings
import time
import traceback
from pathlib import Path

import numpy as np

from sparse_dict import _persist
from sparse_dict._cli_options import _seed

__all__ = ["main"]

# The helpers are re-exported here, where users and tests have imported them from.
from sparse_dict._cli_common import (  # noqa: F401
    PROG,
    CLIError,
    _EXTRACTION_DEFAULTS,
    _check_nproc,
    _check_width,
    _divergence_is_an_error,
    _estimator_params,
    _extract,
    _fingerprint,
    _input_file,
    _launch_ranks,
    _load_dictionary,
    _make_extractor,
    _npy_name,
    _output_dir,
    _logit_effects_or_none,
    _output_file,
    _output_store,
    _progress,
    _provenance_kind,
    _provenance_path,
    _rank,
    _save_npy,
    _say,
    _write_report,
    _write_tokens,
    iter_texts,
    load_activations,
    load_matrix,
    open_activations_store,
    read_texts,
)
from sparse_dict._demo import _DEMO_DEFAULTS, _DEMO_ESTIMATOR_DEFAULTS, _demo_folder, cmd_demo  # noqa: F401,E501

# Exit statuses: 2 for a problem with the user's input (as argparse does for a
# bad option), 1 for anything unexpected, 130 for Ctrl-C, 143 for SIGTERM.
EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process it ended
# 128 + SIGPIPE: as a shell reports a writer whose reader closed the pipe
# (``sparse-dict demo | head``), which Python sees as a BrokenPipeError.
EXIT_PIPE_CLOSED = 141


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def _split(args):
    """How the texts file is cut into texts; a --split given where none applies is refused.

    ``--split`` defaults to None so that one given can be told from none: a
    .jsonl file holds its texts one a record, and a store holds activations
    already extracted. Given there, it was ignored, and recorded all the same.
    """
    texts = Path(args.texts)
    if texts.suffix.lower() == ".jsonl" or texts.is_dir():
        if args.split is not None:
            what = ("an activation store holds texts already extracted" if texts.is_dir()
                    else "a .jsonl file holds one text a record")
            raise CLIError(f"--split does not apply to {str(texts)!r}: {what}; leave it out")
        return None
    return args.split or "lines"


def cmd_extract(args):
    # The file is checked now and read line by line as the extraction goes,
    # so neither the texts nor the activations are ever held whole in memory.
    texts = iter_texts(args.texts, _split(args) or "lines")
    if args.store is not None:
        return _extract_to_store(args, texts)
    if args.resume:
        raise CLIError("--resume continues an extraction into a store: give --store FOLDER "
                       "instead of -o")
    # Every output is checked before the (long) extraction, and written only
    # after it: a bad --tokens path leaves no activations file behind.
    out = _output_file(_npy_name(args.out), "output file", overwrite=args.overwrite,
                       inputs=[args.texts])
    # Where the activations come from, beside them, for 'fit' to record.
    prov_path = _output_file(_provenance_path(out), "provenance file", _provenance_kind(),
                             overwrite=args.overwrite, inputs=[args.texts, out])
    tok_path = None
    if args.tokens:
        for other, what in ((out, "the activations output"),
                            (prov_path, "the provenance file written beside the output")):
            if Path(args.tokens).resolve() == other.resolve():
                raise CLIError(f"tokens file {str(args.tokens)!r} is {what} ({other}); "
                               "choose another name")
        tok_path = _output_file(args.tokens, "tokens file", _persist.TOKENS,
                                overwrite=args.overwrite, inputs=[args.texts])
    extractor = _make_extractor(args, verbose=0 if args.quiet else 1)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(_persist.staged(out, _persist.NPY, overwrite=args.overwrite,
                                                  hint="--overwrite"))
        prov_tmp = stack.enter_context(_persist.staged(
            prov_path, _provenance_kind(), overwrite=args.overwrite, hint="--overwrite"))
        # Extracted into a store of its own beside the output (so on the same
        # disk), whose activations file then becomes the output.
        # (Named as the output's temporaries are: if this process is killed,
        # the next write of the output removes it.)
        folder = _persist.scratch_folder(out)
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        store = extractor.transform_to_disk(texts, folder, chunk_texts=args.chunk_texts,
                                            corpus=_corpus_name(args))
        provenance = store.provenance()
        if tok_path is not None:
            tok_tmp = stack.enter_context(_persist.staged(
                tok_path, _persist.TOKENS, overwrite=args.overwrite, hint="--overwrite"))
            _write_tokens(store, tok_tmp)
        shape = store.activations.shape
        del store  # its memory maps, before its files move
        # Where the activations come from, beside them, for 'fit' to record;
        # with the file's fingerprint, so that other contents written there
        # later (codes of the same width, say) are not taken for them.
        provenance["activations_fingerprint"] = _fingerprint(folder / "activations.npy")
        prov_tmp.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        os.replace(folder / "activations.npy", tmp)
    _say(args, f"wrote {shape[0]} x {shape[1]} activations to {out}"
         + (f" and their tokens to {tok_path}" if tok_path is not None else ""))
    return 0


def _corpus_name(args):
    """How a dictionary's provenance names the texts file it was extracted from."""
    split = _split(args)
    return Path(args.texts).name + ("" if split is None else f" (split={split})")


def _extract_to_store(args, texts):
    if args.tokens:
        raise CLIError("--tokens goes with -o: a store holds the tokens of its rows")
    path = _output_store(args.store, args.texts, resume=args.resume, overwrite=args.overwrite)
    extractor = _make_extractor(args, verbose=0 if args.quiet else 1)
    try:
        store = extractor.transform_to_disk(texts, path, resume=args.resume,
                                            overwrite=args.overwrite,
                                            chunk_texts=args.chunk_texts,
                                            corpus=_corpus_name(args))
    except KeyboardInterrupt:
        if (path / "manifest.json").is_file():
            _say(args, f"the rows extracted so far are kept in {path}; run the same command "
                 "with --resume to continue")
        raise
    resumed = " (resumed)" if args.resume else ""
    _say(args, f"wrote {store.n_rows:,} x {store.activations.shape[1]} activations of "
         f"{store.n_texts:,} texts to the store {path}{resumed}")
    return 0


def cmd_fit(args):
    # The model, layer and hook the activations came from, as 'extract'
    # wrote them beside the .npy (or a store holds them): 'report' and
    # 'steer' then need no options. A warning about them is given once: by
    # the process that trains alone, or by rank 0 of several.
    with warnings.catch_warnings():
        if _rank() != 0 or args.nproc > 1:
            warnings.simplefilter("ignore")
        X, provenance = load_activations(args.activations)
    from sparse_dict.estimator import SAVED_DICTIONARY, SparseAutoencoderDictionary

    out = _output_file(args.out, "output", SAVED_DICTIONARY, overwrite=args.overwrite,
                       inputs=[args.activations])
    params = _estimator_params(args)
    params["verbose"] = 0 if args.quiet else 1
    sae = SparseAutoencoderDictionary(**params)
    if args.nproc > 1:
        # The inputs, the output and the parameters are checked here, once,
        # before any process starts.
        sae._validate_params()
        _check_nproc(args.nproc, sae.device)
        _launch_ranks(args.argv, args.nproc)
        return 0
    start = time.perf_counter()
    with _divergence_is_an_error(), warnings.catch_warnings():
        if _rank() != 0:
            # Every rank judges the same run alike; rank 0 says it once.
            warnings.simplefilter("ignore")
        sae.fit(X, provenance=provenance)
    seconds = time.perf_counter() - start
    sae.save(out, overwrite=args.overwrite)
    if _rank() == 0:
        _say(
            args,
            f"fitted {sae.n_components_} features on {X.shape[0]:,} x {X.shape[1]} "
            f"activations in {seconds:.1f} s; saved to {out}",
        )
    return 0


def cmd_encode(args):
    dictionary = _load_dictionary(args.dictionary, args.device)
    # A store's provenance, or the one 'extract' wrote beside an .npy: the
    # activations must come from the dictionary's hook point and model.
    X, provenance = load_activations(args.activations)
    if provenance is not None:
        _check_store(provenance, dictionary, args)
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
    from sparse_dict.estimator import SAVED_DICTIONARY
    from sparse_dict.saelens import SAELENS_FOLDER, is_saelens_folder

    source = Path(args.source)
    # The output checked first, as the other commands do, so that its errors
    # name this command's option (--overwrite) and nothing is loaded for a
    # conversion that cannot be written.
    _output_file(args.out, "output", SAVED_DICTIONARY if args.from_format == "saelens"
                 else SAELENS_FOLDER, overwrite=args.overwrite, inputs=[source])
    if args.from_format == "saelens":
        if source.is_dir() and not is_saelens_folder(source):
            raise CLIError(f"{str(source)!r} is not a SAELens folder (cfg.json and "
                           "sae_weights.safetensors)")
        dictionary = _load_dictionary(source, "cpu", args.norm_scaling_factor)
        dictionary.save(args.out, overwrite=args.overwrite)
    else:
        if (source / "cfg.json").exists() and not (source / "config.json").exists():
            raise CLIError(f"{str(source)!r} is a SAELens folder; use --from saelens")
        if args.norm_scaling_factor is not None:
            raise CLIError("--norm-scaling-factor is for --from saelens (a saved dictionary's "
                           "units already include any scaling)")
        dictionary = _load_dictionary(source, "cpu")
        if dictionary.transform_algorithm != "encoder":
            # SAELens codes with the encoder only; the command line has no
            # option to set it, and the source folder is left as it is.
            warnings.warn(
                f"{str(source)!r} codes with transform_algorithm="
                f"{dictionary.transform_algorithm!r}; SAELens codes with the encoder only, "
                "so the SAELens folder's codes are the encoder's", UserWarning, stacklevel=2)
            dictionary.set_params(transform_algorithm="encoder")
        dictionary.to_saelens(args.out, overwrite=args.overwrite)
    _say(args, f"wrote {args.out} ({dictionary.activation}, "
               f"{dictionary.n_components_} features of width {dictionary.n_features_in_})")
    return 0


def cmd_report(args):
    dictionary = _load_dictionary(args.dictionary, args.device)
    # Before a store's own check, which advised an option there is not.
    _refuse_pooled(args, getattr(dictionary, "provenance_", None))
    store = None
    if Path(args.texts).is_dir():
        # A store written by 'extract --store': its activations and tokens,
        # without running the model again.
        _split(args)
        if args.max_length is not None:
            raise CLIError(f"--max-length does not apply to the activation store "
                           f"{str(args.texts)!r}: its texts were cut when they were "
                           "extracted; leave it out")
        store = open_activations_store(args.texts)
    else:
        texts = read_texts(args.texts, _split(args) or "lines")
        if args.max_texts is not None:
            texts = texts[: args.max_texts]
    out = _output_dir(args.out, "output folder")
    inputs = [args.dictionary, args.texts]
    _output_file(out / "features.html", "feature browser", _persist.HTML,
                 overwrite=args.overwrite, inputs=inputs)
    _output_file(out / "density.png", "density plot", _persist.PNG, overwrite=args.overwrite,
                 inputs=inputs)
    if store is not None:
        n = (store.n_rows if args.max_texts is None
             else store.rows_of_texts(min(args.max_texts, store.n_texts)))
        acts, tokens = store.activations[:n], store.tokens(slice(0, n))
        index = np.asarray(store.index[:n, :2])
        _check_width(acts, dictionary, f"activations in the store {args.texts}")
        _check_store(store, dictionary, args)
        # The model is still needed for the logit effects: at the dictionary's
        # provenance, or the store's where the dictionary has none.
        provenance = getattr(dictionary, "provenance_", None) or store.provenance()
        extractor = _fitted_extractor(args, dictionary, ["The"], provenance=provenance)
    else:
        extractor = _fitted_extractor(args, dictionary, texts[:1])
        acts, tokens, index = _extract(extractor, texts)
    codes = dictionary.transform(acts)
    # Promoted and suppressed tokens where the model has a next-token head.
    effects = _logit_effects_or_none(extractor, dictionary, top_k=args.top_tokens)
    html_path, png_path = _write_report(
        out, dictionary, codes, tokens, index,
        k=args.top_k, context=args.context, title=args.title or f"Features of {args.dictionary}",
        overwrite=args.overwrite, logit_effects=effects,
    )
    _say(args, f"wrote {html_path} and {png_path}"
         + ("" if effects is not None else " (no logit effects: the model has no next-token "
            "head, or the hook is not on an MLP path)"))
    return 0


def _check_store(store, dictionary, args):
    """Activations (a store, or a provenance record) must come from the dictionary's hook."""
    from sparse_dict.analysis import check_compatible

    try:
        check_compatible(store, dictionary, check_model=getattr(args, "model", None) is None)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _refuse_pooled(args, provenance):
    """Refuse activations pooled a text at a time: report and steer work token by token."""
    pooling = provenance.get("pooling", "none") if isinstance(provenance, dict) else "none"
    if pooling != "none":
        # The extractor's check said "use pooling='mean'", which no option
        # of the command line sets: its features are of texts, not tokens.
        raise CLIError(
            f"this dictionary was fitted on pooled activations (pooling={pooling!r}, one row "
            f"a text), and '{args.command}' works with the features of single tokens; code "
            "pooled rows in Python instead (TransformerActivationExtractor(..., "
            f"pooling={pooling!r}), then the dictionary's transform)")


def _fitted_extractor(args, dictionary, probe, provenance=None):
    """The extractor of the options and the dictionary's provenance, checked against it.

    ``provenance`` stands in for the dictionary's where it has none (a store's).
    """
    from sparse_dict.analysis import check_compatible

    if provenance is None:
        provenance = getattr(dictionary, "provenance_", None)
    _refuse_pooled(args, provenance)
    extractor = _make_extractor(args, verbose=0 if args.quiet else 1, provenance=provenance)
    extractor.fit(probe)
    # A --model given on the command line is taken as the dictionary's own
    # (its folder may have moved); the hook point is checked all the same.
    check_compatible(extractor, dictionary, check_model=args.model is None)
    return extractor


def cmd_steer(args):
    from sparse_dict.analysis import steer

    dictionary = _load_dictionary(args.dictionary, args.device)
    if args.strength is None and args.clamp is None:
        raise CLIError("give --strength (add the feature's atom) or --clamp (set its code)")
    if args.clamp is not None and args.strength not in (None, 0.0):
        raise CLIError("--clamp sets the feature's code and --strength adds its atom: give "
                       "one of them")
    strength = 0.0 if args.strength is None else args.strength
    extractor = _fitted_extractor(args, dictionary, args.texts[:1])
    # One seed for both runs, drawn where none is given: with a seed each
    # (--seed none), sampled continuations differed at strength 0, by chance.
    seed = args.seed if args.seed is not None else int(np.random.randint(2**31))
    common = dict(max_new_tokens=args.max_new_tokens, random_state=seed,
                  temperature=args.temperature)
    steered = steer(extractor, dictionary, args.texts, args.feature, strength,
                    clamp=args.clamp, **common)
    plain = steer(extractor, dictionary, args.texts, args.feature, 0.0, **common)
    how = (f"clamped to {args.clamp:g}" if args.clamp is not None
           else f"strength {strength:+g}")
    model = extractor.model if isinstance(extractor.model, str) else "a torch module"
    print(f"feature {args.feature} at {extractor.hook_name_} of model {model}, {how}")
    effects = _logit_effects_or_none(extractor, dictionary, top_k=args.top_tokens,
                                     features=[args.feature])
    if effects is not None:
        for name, tokens, values in (
                ("promotes", effects.promoted_tokens[0], effects.promoted_logits[0]),
                ("suppresses", effects.suppressed_tokens[0], effects.suppressed_logits[0])):
            print(f"  {name}: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(tokens, values)))
    for text, before, after in zip(args.texts, plain, steered):
        print()
        print(f"{text!r}")
        print(f"  without steering: {before!r}")
        print(f"  with steering:    {after!r}")
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
# The demo's loss recovered needs a next token to predict in every text.
_two_or_more = _number(int, 2, strict=False)
_non_negative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0, strict=True)
_non_negative_float = _number(float, 0, strict=False)


def _add_common(p):
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or messages (warnings are still shown, one line each)")
    p.add_argument(
        "--threads", type=_positive_int, default=None,
        help="CPU threads for torch and for numpy/scikit-learn's math; fewer "
        "than the cores leaves room for other work on a shared machine "
        "(default: torch's and the BLAS library's own choice, usually one per core)",
    )
    p.add_argument(
        "--traceback", action="store_true",
        help="on an error, also show the full Python traceback (for a bug report)",
    )


def _add_extraction(p, from_provenance=False, split=True):
    """The options that build the extractor.

    With ``from_provenance`` (commands that read a saved dictionary), the
    model, layer, hook and length default to what the dictionary's
    provenance recorded, and to the usual defaults only without one.
    """
    g = p.add_argument_group("activations")

    def default(value):
        if from_provenance:
            return None, f"default: the dictionary's provenance, else {value}"
        return value, f"default: {value}"

    value, note = default(_EXTRACTION_DEFAULTS["model"])
    g.add_argument(
        "--model", default=value,
        help="'builtin' (the bundled 1-layer transformer), the path of a local "
        "Hugging Face model folder (or of one in the built-in format), or a Hugging Face "
        f"Hub id such as gpt2 ({note})",
    )
    value, note = default(_EXTRACTION_DEFAULTS["layer"])
    g.add_argument("--layer", type=int, default=value, help=f"layer number ({note})")
    value, note = default(_EXTRACTION_DEFAULTS["hook"])
    g.add_argument(
        "--hook", default=value,
        help=f"named point in the layer, e.g. mlp_post ({note})",
    )
    value, note = default(_EXTRACTION_DEFAULTS["max_length"])
    g.add_argument(
        "--max-length", type=_positive_int, default=value,
        help=f"texts are cut to this many tokens ({note})",
    )
    g.add_argument(
        "--extract-batch-size", type=_positive_int, default=32,
        help="texts per forward pass (default: 32)",
    )
    if split:
        g.add_argument(
            "--split", choices=("lines", "paragraphs", "whole"), default=None,
            help="how a plain texts file is cut into texts: one per line, one per "
            "blank-line separated paragraph, or the whole file (default: lines; a "
            ".jsonl file holds one JSON string or {\"text\": ...} per line)",
        )


def _add_estimator(p, defaults):
    from sparse_dict._cli_options import add_estimator_options
    from sparse_dict.estimator import SparseAutoencoderDictionary

    g = p.add_argument_group(
        "dictionary",
        "parameters of SparseAutoencoderDictionary (see its documentation); "
        "'none' gives None where a parameter takes it",
    )
    add_estimator_options(g, SparseAutoencoderDictionary, defaults)


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


@contextlib.contextmanager
def _cpu_threads(n):
    """Limit torch and the BLAS/OpenMP pools of numpy and scikit-learn to ``n`` threads."""
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the rest of the CLI."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports an unknown option of a subcommand from the top
        # level ("sparse-dict: error: ..., see 'sparse-dict --help'"), whose
        # help does not list the subcommand's options; the subcommand's
        # parser reports it here, pointing at its own --help.
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})
            commands.get(getattr(namespace, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return namespace


# ``fit`` is seeded like ``demo``, so that two runs of one command agree.
_FIT_DEFAULTS = {"random_state": 0}


def build_parser(command=None):
    """The ``sparse-dict`` argument parser.

    Parameters
    ----------
    command : str or None, default=None
        The subcommand about to run. The estimator's options of ``fit`` and
        ``demo`` are generated from the estimator, which imports torch; they
        are added only for that subcommand (all of them when None), so that
        the other subcommands and ``--help`` answer at once.
    """

    def wanted(name):
        return command is None or command == name

    parser = _Parser(
        prog=PROG,
        description="Learn sparse dictionaries of neural-network activations with "
        "sparse autoencoders, the scikit-learn way.",
        epilog=f"Start with '{PROG} demo'. Each subcommand has its own --help.",
    )
    from sparse_dict._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser.commands = sub.choices

    d = _DEMO_DEFAULTS
    p = sub.add_parser(
        "demo",
        # No abbreviations: --tiny sizes every option not given in full on the
        # command line (cmd_demo reads them from argv), and "--n-comp 48"
        # was silently sized to 32.
        allow_abbrev=False,
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
                   help="a run of a few seconds at toy sizes, to check an installation "
                   "(its numbers are a smoke test only)")
    _add_overwrite(p, "a folder written by an earlier demo")
    p.add_argument("--n-texts", type=_positive_int, default=d["n_texts"],
                   help=f"training texts from the corpus (default: {d['n_texts']})")
    p.add_argument("--n-eval-texts", type=_positive_int, default=d["n_eval_texts"],
                   help="texts of held-out works the table is measured on "
                   f"(default: {d['n_eval_texts']})")
    p.add_argument("--n-browser-texts", type=_positive_int, default=d["n_browser_texts"],
                   help="texts of held-out works the feature browser shows "
                   f"(default: {d['n_browser_texts']})")
    p.add_argument("--max-length", type=_two_or_more, default=d["max_length"],
                   help="texts are cut to this many tokens, at least 2 (the loss recovered "
                   f"predicts each next token; default: {d['max_length']})")
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
    p.add_argument("--no-size-curve", action="store_true",
                   help="skip the size curve (top-k dictionaries of growing size, "
                   "a few seconds each)")
    g = p.add_argument_group("feature browser")
    g.add_argument("--top-k", type=_positive_int, default=d["top_k"],
                   help=f"examples per feature (default: {d['top_k']})")
    g.add_argument("--context", type=_non_negative_int, default=d["context"],
                   help=f"tokens of context either side of an example (default: {d['context']})")
    if wanted("demo"):
        _add_estimator(p, _DEMO_ESTIMATOR_DEFAULTS)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo, model="builtin", layer=0, hook="mlp_post",
                   extract_batch_size=32, **({} if wanted("demo") else _DEMO_ESTIMATOR_DEFAULTS))

    p = sub.add_parser(
        "extract", help="texts file -> activations (.npy, or a store folder)",
        description="Run a transformer over the texts of a file and save the "
        "activations at one layer, one row per token, as a float32 .npy array (-o) or "
        "an activation store (--store). The texts are read and the activations "
        "written chunk by chunk, so memory stays flat however large the file.",
    )
    p.add_argument("texts", help="texts file (.txt, or .jsonl)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--out",
                       help="output .npy file ('.npy' is added if the name lacks it)")
    where.add_argument("--store", metavar="FOLDER",
                       help="write an activation store to this folder instead: the "
                       "activations, each row's text, position and token, and a manifest "
                       "of what was extracted and how far (resumable with --resume)")
    p.add_argument("--tokens", help="with -o, also write each row's text, position and "
                   "token string to this .jsonl file")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted extraction in --store FOLDER: its texts "
                   "are read again and checked, not extracted again")
    p.add_argument("--chunk-texts", type=_positive_int, default=256,
                   help="texts extracted and written to disk at a time; an interruption "
                   "loses at most this many (default: 256)")
    _add_overwrite(p, "an .npy array (any: an .npy file carries no mark of what wrote it), "
                      "or a tokens file or store written earlier")
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
    p.add_argument("activations", help=".npy array of shape (n_tokens, n_features), or a "
                   "store folder written by 'extract --store'")
    p.add_argument("-o", "--out", required=True, help="output folder for the dictionary")
    _add_overwrite(p, "a dictionary saved earlier")
    p.add_argument(
        "--nproc", type=_positive_int, default=1,
        help="train data-parallel in this many processes on this machine, started "
        "with the variables torchrun sets (gloo on CPUs, NCCL on GPUs); each reads its "
        "share of every batch and rank 0 saves (default: 1)",
    )
    if wanted("fit"):
        _add_estimator(p, _FIT_DEFAULTS)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "encode", help="saved dictionary + activations -> codes (.npy)",
        description="Encode activations with a saved dictionary: writes the "
        "features' activations (the codes), one row per input row, as .npy.",
    )
    p.add_argument("dictionary", help="folder written by 'sparse-dict fit', or a SAELens folder")
    p.add_argument("activations", help=".npy array of shape (n_tokens, n_features), or a "
                   "store folder written by 'extract --store'")
    p.add_argument("-o", "--out", required=True,
                   help="output .npy file ('.npy' is added if the name lacks it)")
    p.add_argument("--chunk-size", type=_positive_int, default=8192,
                   help="rows encoded at a time (default: 8192)")
    _add_overwrite(p, "an .npy array (any: an .npy file carries no mark of what wrote it)")
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "report", help="saved dictionary + texts -> feature browser and density plot",
        description="Run the model over the texts, encode the activations with the "
        "dictionary, and write features.html (the feature browser: each feature's "
        "firing frequency and top-activating tokens in context) and density.png "
        "(histogram of log firing frequency) to --out. Where the model has a "
        "next-token head, each feature's section also lists the tokens it promotes "
        "and suppresses (its logit effects). The model, layer and hook come from the "
        "dictionary's provenance (recorded by 'extract' and 'fit'); give --model, "
        "--layer and --hook for a dictionary without one.",
    )
    p.add_argument("dictionary", help="folder written by 'sparse-dict fit', or a SAELens folder")
    p.add_argument("texts", help="texts file (.txt, or .jsonl), or a store written by "
                   "'extract --store' (its activations and tokens are used as they are)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--max-texts", type=_positive_int, help="use only the first N texts")
    p.add_argument("--top-k", type=_positive_int, default=8,
                   help="examples per feature (default: 8)")
    p.add_argument("--context", type=_non_negative_int, default=6,
                   help="tokens of context either side of an example (default: 6)")
    p.add_argument("--top-tokens", type=_positive_int, default=8,
                   help="promoted and suppressed tokens per feature (default: 8)")
    p.add_argument("--title", help="title of the browser page")
    _add_overwrite(p, "a report written earlier (features.html, density.png)")
    _add_extraction(p, from_provenance=True)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "steer", help="saved dictionary + prompts -> continuations with and without a feature",
        description="Continue each prompt twice with the model the dictionary was "
        "learned on: as it is, and with --strength times the feature's atom added to "
        "the activations at the hook point at every position (or, with --clamp, the "
        "feature's code set to a value). Prints the tokens the feature promotes and "
        "suppresses, and both continuations. The model, layer and hook come from the "
        "dictionary's provenance; the options override it.",
    )
    p.add_argument("dictionary", help="folder written by 'sparse-dict fit', or a SAELens folder")
    p.add_argument("texts", nargs="+", help="prompts to continue")
    p.add_argument("--feature", type=_non_negative_int, required=True,
                   help="the feature to steer with (its index)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the feature's unit-norm atom is added, in the units "
                   "of the activations (negative pushes the other way)")
    p.add_argument("--clamp", type=float, default=None,
                   help="set the feature's code to this value instead of adding")
    p.add_argument("--max-new-tokens", type=_positive_int, default=20,
                   help="tokens generated per prompt (default: 20)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0 generates greedily; above 0 samples (default: 0)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the sampling with --temperature, the same for the runs with "
                   "and without steering; 'none' draws one (default: 0)")
    p.add_argument("--top-tokens", type=_positive_int, default=8,
                   help="promoted and suppressed tokens shown (default: 8)")
    _add_extraction(p, from_provenance=True, split=False)
    _add_device(p)
    _add_common(p)
    p.set_defaults(func=cmd_steer)

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
    p.add_argument("--norm-scaling-factor", type=_positive_float, default=None,
                   help="with --from saelens, for an SAE trained with "
                   "normalize_activations='expected_average_only_in': the factor its inputs "
                   "were multiplied by (SAELens' pretrained directory lists it), folded into "
                   "the weights; read from the folder's activation_scaler.json when not given")
    _add_overwrite(p, "a folder that sparse_dict wrote in the output's format: a saved "
                   "dictionary (fit, convert, save) with --from saelens, a SAELens folder "
                   "(convert, to_saelens) with --from sparse_dict")
    _add_common(p)
    p.set_defaults(func=cmd_convert)
    return parser


# The options that name files or folders. The shell expands a leading ~ in
# "-o ~/d" but not in "--out=~/d", which made a literal ./~ folder.
_PATH_OPTIONS = ("out", "store", "tokens", "activations", "dictionary", "source")


def _expand_home(args):
    names = _PATH_OPTIONS + (() if args.command == "steer" else ("texts",))  # steer's are prompts
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))


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
        line on stderr says what); 130 when interrupted (Ctrl-C); 143 when
        ended by SIGTERM (cleaned up as on Ctrl-C); 141, silently, when the
        reader of its standard output closed it (a pipe into ``head``), its
        outputs written all the same; 1 only for a bug.

    Examples
    --------
    >>> from sparse_dict.cli import main
    >>> main(["encode", "no-such-dictionary", "acts.npy", "-o", "codes.npy"])
    2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        # The parser imports what the command's options document (the
        # estimator, torch): seconds in which Ctrl-C is as likely as later.
        parser = build_parser(command)
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
            # argparse names the missing COMMAND first, not the option it
            # does not know.
            parser.error(f"unrecognized arguments: {argv[0]} (options go after the COMMAND)")
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted" if command else f"{PROG}: interrupted",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    args.argv = argv
    _expand_home(args)
    try:
        with _terminate_cleanly(), _cpu_threads(args.threads), \
                _one_line_warnings(args.command), _lenient_stdout():
            return int(args.func(args) or 0)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return EXIT_PIPE_CLOSED
    except _Terminated:
        print(f"{PROG} {args.command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the promise is one line, never a traceback
        if type(err).__name__ == "RankFailedError" and _interrupted_soon():
            print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if args.traceback:
            # The full traceback for a bug report, and the same exit status
            # as without it (a script that checks for 2 must see 2).
            traceback.print_exc()
        message, status = _user_error(err, traceback_shown=args.traceback,
                                      batch_option=_batch_option(args))
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return status


# How long a rank whose peers left waits for a Ctrl-C of its own (below).
_INTERRUPT_GRACE_S = 0.5


def _interrupted_soon(wait_s=_INTERRUPT_GRACE_S):
    """Whether Ctrl-C reaches this process within ``wait_s`` seconds.

    A terminal's Ctrl-C reaches every process of ``fit --nproc``; a rank
    blocked in a collective could see its peers leave before its own signal
    came, and printed their lost connection as an error ("Data-parallel
    training stopped ... Connection closed by peer") before "interrupted".
    """
    try:
        time.sleep(wait_s)
    except KeyboardInterrupt:
        return True
    return False


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it cleans up as on Ctrl-C."""


@contextlib.contextmanager
def _terminate_cleanly():
    """Make SIGTERM (kill, a scheduler, docker stop) end the command as Ctrl-C does.

    Python's default ends the process at once, leaving its temporary outputs
    (a hidden copy of every row extracted so far) behind. Only where the
    handler is still the default, in the main thread: a program that runs
    ``main`` and handles SIGTERM itself keeps its own handler.
    """
    def terminate(signum, frame):
        raise _Terminated

    installed = False
    if (threading.current_thread() is threading.main_thread()
            and hasattr(signal, "SIGTERM")
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, terminate)
        installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _lenient_stdout():
    """Write what standard output cannot encode as escapes, not as an error.

    A token, a path or a prompt may hold characters that the terminal's or a
    redirect's encoding lacks (ASCII under ``LANG=C`` without UTF-8 mode,
    cp1252 on Windows); stderr already escapes them, and a command's report
    is worth more than a failure over one character. Restored on return, as
    ``main`` may run inside a caller's process.
    """
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    if errors != "strict" or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            stream.reconfigure(errors=errors)


def _stdout_closed():
    """Whether standard output's reader is gone; then stdout is pointed at the null device.

    So that the interpreter's flush at exit does not print a second
    BrokenPipeError (Python's documented remedy).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if hasattr(select, "poll"):
        # The write end of a pipe without a reader polls as an error (the
        # BrokenPipeError may as well have come from elsewhere, a socket).
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(event & select.POLLERR for _, event in poll.poll(0)):
            return False
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return True


@contextlib.contextmanager
def _one_line_warnings(command):
    """Show each warning (a fit that did not converge, ...) as one plain line.

    Python's default display adds the library's file and source line, which
    mean nothing to a user of the command line.
    """
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"{PROG} {command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _batch_option(args):
    """The subcommand's option that sets how many rows are held at once, if it has one."""
    for dest in ("batch_size", "extract_batch_size"):
        if hasattr(args, dest):
            return "--" + dest.replace("_", "-")
    return None


def _user_error(err, traceback_shown=False, batch_option="--batch-size"):
    """The one-line message for ``err`` and the exit status: 2 if the user can fix it, else 1.

    ``batch_option`` is the subcommand's option for smaller batches, named in
    the advice on running out of memory (None where it has none).
    """
    # ValueError and TypeError are how the estimators reject bad input (NaN,
    # wrong shapes, invalid parameters), with a message meant for users.
    if isinstance(err, (CLIError, ValueError, TypeError)):
        return _first_line(err), EXIT_USAGE
    if isinstance(err, FileExistsError):
        # Raised by the Python API when an output appeared while the command
        # ran (another command writing it): its words are the command line's.
        return _first_line(err).replace("overwrite=True", "--overwrite"), EXIT_USAGE
    # A diverged fit (DivergenceError is a FloatingPointError) or a warning
    # that -W error turned into an exception: a setting to change, not a bug.
    if isinstance(err, (FloatingPointError, Warning)):
        prefix = "" if isinstance(err, FloatingPointError) else f"{type(err).__name__}: "
        return prefix + _first_line(err), EXIT_USAGE
    if isinstance(err, OSError):
        # A file that cannot be read or written, a full disk, a read-only folder.
        if err.strerror and err.filename is not None:
            return f"{err.strerror}: {str(err.filename)!r}", EXIT_USAGE
        if err.strerror:  # a write to an open file: "[Errno 27] File too large" read as code
            return f"cannot read or write a file: {err.strerror}", EXIT_USAGE
        return _first_line(err), EXIT_USAGE
    # torch's own (a RuntimeError subclass on a GPU, a plain RuntimeError
    # from its CPU allocator) are the same condition as Python's.
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
            isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        smaller = f" or a smaller {batch_option}" if batch_option else ""
        return f"out of memory; try smaller inputs{smaller}", EXIT_USAGE
    if isinstance(err, ImportError) and isinstance(err.__cause__, ImportError):
        # A missing optional package, named with how to install it (raised
        # from the failed import); an import failing on its own is a bug.
        return _first_line(err), EXIT_USAGE
    if type(err).__name__ == "RankFailedError":
        # Another process of the fit failed (its own error, or a kill): this
        # one stopped because of it, which is no bug of its own.
        return _first_line(err), EXIT_USAGE
    if type(err).__name__ == "StoreInUseError":  # another process writes the store
        return _first_line(err), EXIT_USAGE
    if type(err).__name__ == "SafetensorError" and "No space left" in str(err):
        return "no space left on the device", EXIT_USAGE
    if type(err).__name__ == "SafetensorError" and "I/O error" in str(err):
        # Writing failed (a quota, a file size limit): the file is not damaged.
        return ("cannot write the weights file: " + str(err).split("I/O error:", 1)[1].strip(),
                EXIT_USAGE)
    if type(err).__name__ == "SafetensorError":  # a damaged weights file
        return f"damaged safetensors file: {_first_line(err)}", EXIT_USAGE
    first = str(err).splitlines()[0] if str(err) else ""
    how = (" with the traceback above" if traceback_shown
           else "; rerun with --traceback for details")
    return f"{type(err).__name__}: {first} (a bug: please report it{how})", EXIT_BUG
