"""What the ``sparse-dict`` subcommands share: one-line errors, reading and
writing files, messages, and building the extractor and the report."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from sparse_dict import _persist

PROG = "sparse-dict"


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
    _output_dir(path.parent, f"folder of {what}")
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


def _output_store(path, texts, *, resume, overwrite):
    """The store's folder after checking it may be written, resumed or replaced."""
    from sparse_dict.extraction._store import STORE, resumable

    if resume and overwrite:
        raise CLIError("--resume continues the store and --overwrite starts it again; "
                       "give one of them")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--store {str(path)!r} is a file, expected a folder")
    _output_dir(path.parent, "folder of the store")
    if resume and resumable(path):
        return path
    try:
        # With --resume, anything there must be a store (or an empty folder).
        _persist.check_target(path, STORE, overwrite=overwrite or resume,
                              inputs=[Path(texts)], hint="--overwrite")
    except FileExistsError as err:
        if STORE.recognize(path):
            raise CLIError(f"--store {str(path)!r} already exists; give --resume to continue "
                           "its extraction or --overwrite to start again") from None
        raise CLIError(f"--store: {err}") from None
    except ValueError as err:
        raise CLIError(f"--store: {err}") from None
    return path


def _write_tokens(store, path, chunk=1 << 16):
    """The text, position and token string of every row of ``store``, as JSON lines."""
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, store.n_rows, chunk):
            rows = slice(start, min(start + chunk, store.n_rows))
            tokens = store.tokens(rows).tolist()
            index = np.asarray(store.index[rows, :2]).tolist()
            fh.writelines(json.dumps({"text": text, "position": pos, "token": tok}) + "\n"
                          for tok, (text, pos) in zip(tokens, index))


def _npy_name(path):
    """The name numpy.save gives ``path``: with ``.npy`` added if it lacks it."""
    text = os.fspath(path)
    path = Path(path)
    # ".", "..", "" or "/", a name ending in a separator ("out/", which Path
    # would read as "out" and numpy.save as "out.npy"), or an existing
    # folder: a folder, not a file's name.
    if not path.name or text.endswith(("/", os.sep)) or path.is_dir():
        example = "acts.npy" if not path.name else str(path / "acts.npy")
        raise CLIError(f"{text!r} names a folder; give the output file's name "
                       f"(for example {example})")
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


def read_texts(path, split="lines"):
    """Read the texts of a file: a text file's non-blank ones, or a JSONL file's records.

    Parameters
    ----------
    path : str or Path
        A UTF-8 text file, or a ``.jsonl`` file of JSON strings or of objects
        with a ``"text"`` field, one per line.
    split : {"lines", "paragraphs", "whole"}, default="lines"
        How a plain text file is cut into texts: one per line, one per run of
        lines separated by a blank line, or the whole file as one text.
        Blank texts are skipped, and a text's leading and trailing newlines
        cut. A JSONL file's records are its texts exactly, blank ones
        included, so that text ``i`` is record ``i`` (blank lines between
        records are skipped).

    Returns
    -------
    texts : list of str

    See Also
    --------
    iter_texts : The same texts, read as they are used.

    Examples
    --------
    >>> import os, tempfile
    >>> from sparse_dict.cli import read_texts
    >>> path = os.path.join(tempfile.mkdtemp(), "texts.txt")
    >>> _ = open(path, "w").write("To be, or not to be\\n\\nThat is the question\\n")
    >>> read_texts(path)
    ['To be, or not to be', 'That is the question']
    """
    return list(iter_texts(path, split))


def iter_texts(path, split="lines"):
    """The texts of a file, as :func:`read_texts` gives them, read line by line.

    The file is checked now; its texts are read as they are taken, so a file
    larger than memory can be extracted (``split="whole"`` reads it whole).

    Parameters
    ----------
    path : str or Path
    split : {"lines", "paragraphs", "whole"}, default="lines"

    Returns
    -------
    texts : iterator of str
        Raises :class:`CLIError` when the file turns out not to be UTF-8,
        holds a bad JSON line, or holds no text at all.
    """
    path = _input_file(path, "texts file")
    return _texts_of(path, split)


def _lines(path, every_break=True):
    """The lines of ``path``, one at a time.

    A file's lines end at newlines only; with ``every_break`` they are also
    cut at the rarer breaks that ``str.splitlines`` knows (form feed,
    U+2028...), as the texts of ``--split lines`` always were.
    """
    try:
        # utf-8-sig: a byte-order mark (as Windows editors write) is no text;
        # read as UTF-8 it became the first text's first token.
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                if every_break:
                    yield from line.splitlines()
                else:
                    yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise CLIError(f"texts file {str(path)!r} is not UTF-8 text") from None
    except OSError as err:
        raise CLIError(f"cannot read texts file {str(path)!r}: {err.strerror or err}") from None


def _whole(path):
    try:
        yield path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CLIError(f"texts file {str(path)!r} is not UTF-8 text") from None
    except OSError as err:
        raise CLIError(f"cannot read texts file {str(path)!r}: {err.strerror or err}") from None


def _paragraphs(path):
    paragraph = []
    for line in _lines(path, every_break=False):
        if line.strip(" \t"):
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_texts(path):
    # JSON Lines records end at newlines only: a JSON string may hold U+2028.
    for lineno, line in enumerate(_lines(path, every_break=False), 1):
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
        yield item


def _texts_of(path, split):
    records = path.suffix.lower() == ".jsonl"
    if records:
        texts = _jsonl_texts(path)
    elif split == "lines":
        texts = _lines(path)
    elif split == "paragraphs":
        texts = _paragraphs(path)
    else:
        texts = _whole(path)
    found = False
    for text in texts:
        found = found or bool(text.strip())
        if records:
            # Each record as given, a blank one too: the tokens file and the
            # report number texts by their records (blank records were
            # dropped and newlines trimmed, so that "text 1" was record 3).
            yield text
        elif text.strip():
            yield text.strip("\n")
    if not found:
        raise CLIError(f"texts file {str(path)!r} contains no text")


def open_activations_store(path):
    """The store at ``path`` (a folder written by ``extract --store``), checked for the CLI."""
    from sparse_dict.extraction import open_store

    try:
        with warnings.catch_warnings():
            # An incomplete store is refused below, in the CLI's words.
            warnings.filterwarnings("ignore", "The activation store .* is incomplete")
            store = open_store(path)
    except (OSError, ValueError) as err:
        raise CLIError(str(err).splitlines()[0]) from None
    if not store.complete:
        raise CLIError(
            f"the activation store {str(path)!r} is incomplete (its extraction stopped "
            f"after {store.n_texts:,} texts); finish it with '{PROG} extract ... --store "
            f"{path} --resume' first"
        )
    if store.n_rows == 0:
        raise CLIError(f"the activation store {str(path)!r} holds no activations")
    return store


def load_matrix(path, what="activations"):
    """Open a ``.npy`` file of shape (n_rows, n_columns) as a read-only memmap.

    Nothing is read into memory here: the estimator reads a memmap batch by
    batch, so activations larger than memory can be fitted and encoded. A
    folder written by ``extract --store`` gives its activations.
    """
    if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
        return open_activations_store(path).activations
    if Path(path).name == "activations.npy" and (Path(path).parent / "manifest.json").is_file():
        # A store's own file, named directly: read through the store, which
        # refuses an incomplete one. An interrupted extraction can leave the
        # file with rows its manifest never counted (2,522 against 1,262),
        # which were trained on without a word.
        return open_activations_store(Path(path).parent).activations
    path = _input_file(path, f"{what} file")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        # np.load would take any other file for a pickle and say so, which
        # is misleading; name the real problem instead.
        raise CLIError(f"{what} file {str(path)!r} is not a .npy file (as written by numpy.save)")
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - a damaged header fails numpy's parser in many ways
        # (ValueError, tokenize's TokenError, SyntaxError, OverflowError for
        # a negative shape, ...): all of them mean the file is not readable.
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


def _load_dictionary(path, device=None, norm_scaling_factor=None):
    """Load a dictionary saved by ``SparseAutoencoderDictionary.save``, or a SAELens folder.

    ``norm_scaling_factor`` is passed to ``from_saelens``; it is refused for
    a saved dictionary, whose units already include any scaling.
    """
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
            return SparseAutoencoderDictionary.from_saelens(
                path, device=device, norm_scaling_factor=norm_scaling_factor)
        if norm_scaling_factor is not None:
            raise CLIError(f"--norm-scaling-factor is for a SAELens folder; {str(path)!r} is "
                           "not one (a saved dictionary's units already include any scaling)")
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


def _rank():
    """This process's rank under torchrun (0 when not launched as one of several)."""
    return int(os.environ.get("RANK", "0"))


def free_port():
    """A TCP port of this machine that nothing listens on now, for a process group's rank 0."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# After one process fails, the others get this long to stop by themselves
# (each sees the failure at its next step and says which rank failed) before
# they are killed.
_GRACE_S = 30
# How long stopped ranks get to clean up before they are killed.
_STOP_S = 5.0


# Set in the processes that ``_launch_ranks`` starts: ``python -m sparse_dict``
# then leaves without the interpreter's teardown (see ``sparse_dict.__main__``).
RANK_PROCESS_ENV = "SPARSE_DICT_RANK_PROCESS"


def _check_nproc(nproc, device):
    """Refuse more processes than this machine can run side by side.

    Each is a whole Python and torch (hundreds of MB, a core to drive it);
    on GPUs each takes one of its own. A typo such as ``--nproc 5000`` would
    otherwise start them all.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    if nproc > cores:
        raise ValueError(f"--nproc {nproc} is more processes than the {cores} CPU cores "
                         "this command may use; data-parallel training runs one a core "
                         "at most (one a GPU on GPUs).")
    import torch

    # A GPU this machine lacks is named as such, not as more processes than
    # its 0 GPUs.
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was requested but CUDA is not available on this "
                         "machine; use --device cpu or --device auto.")
    on_gpus = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpus and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} is more processes than this machine's "
                         f"{torch.cuda.device_count()} GPUs; each process trains on one.")


def _stops_with(parent):
    """A ``preexec_fn`` by which a child is sent SIGTERM when ``parent`` dies (Linux).

    The launcher stops its ranks when it is interrupted or terminated, but
    not when it is killed (SIGKILL, the out-of-memory killer): the ranks
    trained on and rank 0 wrote the output after the command had ended.
    The kernel's parent-death signal covers that too. Elsewhere, None.
    """
    if not sys.platform.startswith("linux"):
        return None

    def stop_with_parent():
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # it died before the signal was set
            os.kill(os.getpid(), signal.SIGTERM)

    return stop_with_parent


def _launch_ranks(argv, nproc):
    """Run this command again in ``nproc`` processes on this machine, data-parallel.

    Each process is started with the variables that torchrun sets (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
    runs the same command with ``--nproc 1``; the estimator finds those
    variables and trains data-parallel, and rank 0 writes the outputs. When
    one process fails the others stop at their next step with an error
    naming it, and any still running after a grace period are killed. Each
    process gets an equal part of the cores unless ``OMP_NUM_THREADS`` or
    ``--threads`` says otherwise.
    """
    import time

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    env[RANK_PROCESS_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The last --nproc on a command line wins: each process runs alone.
    # With this interpreter's flags (-W error, -X dev, -X utf8, ...), as
    # multiprocessing starts its processes: a rank must warn, fail and decode
    # as the command it is part of (-W error failed with --nproc 1 only).
    command = [sys.executable, *subprocess._args_from_interpreter_flags(),
               "-m", "sparse_dict", *argv, "--nproc", "1"]
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                              preexec_fn=_stops_with(os.getpid()))
             for rank in range(nproc)]
    first_failure = None
    try:
        while any(p.poll() is None for p in procs):
            if first_failure is None and any(p.poll() for p in procs):
                first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > _GRACE_S:
                break
            time.sleep(0.05)
    finally:
        # Asked to stop first (SIGTERM ends each as Ctrl-C would, removing
        # its temporary outputs); killed if it has not within a few seconds
        # (a process blocked in a collective may not get to its handler).
        running = [p for p in procs if p.poll() is None]
        for p in running:
            p.terminate()
        deadline = time.monotonic() + _STOP_S
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode]
    if failed:
        # The rank that failed first is the cause; the others stopped for it
        # (RankFailedError, status 2) or were stopped here. A rank killed
        # by a signal (a negative status) is named as such: rank 0's status
        # 1 was blamed where rank 1 had been killed.
        killed = [(rank, status) for rank, status in failed if status < 0]
        rank, status = (killed or failed)[0]
        how = (f"was killed by signal {-status}" if status < 0
               else f"exited with status {status} (its error is shown above)")
        raise CLIError(f"the data-parallel fit in {nproc} processes failed: rank {rank} {how}")


def _say(args, message):
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The pieces the subcommands share
# --------------------------------------------------------------------------


# The extraction options and their values when neither the command line nor
# a dictionary's provenance gives them.
_EXTRACTION_DEFAULTS = {"model": "builtin", "layer": 0, "hook": "mlp_post", "max_length": 128}


def _make_extractor(args, verbose, provenance=None):
    """The extractor the options describe; options left unset come from ``provenance``.

    ``provenance`` is a dictionary's ``provenance_`` (as recorded from an
    extractor); the options a user gives win over it, and the defaults fill
    in what neither gives.
    """
    from sparse_dict.extraction import TransformerActivationExtractor
    from sparse_dict.extraction._extractor import PROVENANCE_SOURCE

    recorded = {}
    if isinstance(provenance, dict) and provenance.get("source") == PROVENANCE_SOURCE:
        recorded = {k: provenance.get(k) for k in _EXTRACTION_DEFAULTS}
        if recorded["model"] is None:
            # Fitted on a torch module: nothing names it to reload, and the
            # built-in model would only match by the width, by chance.
            if getattr(args, "model", None) is None:
                raise CLIError("the dictionary was fitted on activations of a torch module "
                               "that its provenance cannot name; give --model")
            recorded.pop("model")
        given = any(getattr(args, name, None) is not None for name in ("layer", "hook"))
        if provenance.get("module") is not None and not given:
            recorded["module"] = provenance["module"]
    options = {}
    for name, default in _EXTRACTION_DEFAULTS.items():
        given = getattr(args, name, None)
        options[name] = given if given is not None else recorded.get(name, default)
    return TransformerActivationExtractor(
        model=options["model"],
        layer=options["layer"],
        hook=options["hook"],
        module=recorded.get("module"),
        max_length=options["max_length"],
        batch_size=args.extract_batch_size,
        device=args.device,
        verbose=verbose,
    )


def _provenance_path(npy_path):
    """The provenance file beside activations: ``acts.npy`` -> ``acts.provenance.json``."""
    path = Path(npy_path)
    stem = path.name[:-4] if path.name.endswith(".npy") else path.name
    return path.with_name(stem + ".provenance.json")


def _provenance_kind():
    from sparse_dict.extraction._extractor import PROVENANCE_SOURCE

    return _persist.json_kind(
        "activations provenance written by 'sparse-dict extract'",
        lambda p: isinstance(p, dict) and p.get("source") == PROVENANCE_SOURCE)


def load_activations(path):
    """The activations at ``path`` (a .npy file or a store) and their provenance, or None.

    A store is opened once for both; beside a .npy, the provenance is the
    file ``extract`` wrote (see :func:`_read_provenance`).
    """
    if Path(path).is_dir():
        # A folder is a store, or the store's error says what it lacks.
        store = open_activations_store(path)
        return store.activations, store.provenance()
    X = load_matrix(path)
    return X, _read_provenance(path, X)


# The fingerprint of an activations file: its size and a hash of this many
# blocks of this many bytes, spread evenly over it (its header among them).
# About 2 MB read, whatever the file's size; two extractions' activations,
# or codes against activations, differ in every block.
_FINGERPRINT_BLOCKS = 32
_FINGERPRINT_BLOCK_BYTES = 1 << 16


def _fingerprint(path):
    """A string that changes when the file at ``path`` is rewritten with other contents.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> _ = f.write_bytes(b"x" * 100_000)
    >>> a = _fingerprint(f)
    >>> _ = f.write_bytes(b"x" * 99_999 + b"y")
    >>> a == _fingerprint(f), a.split(":")[0]
    (False, '100000')
    """
    import hashlib

    size = os.path.getsize(path)
    digest = hashlib.sha256()
    last = max(size - _FINGERPRINT_BLOCK_BYTES, 0)
    starts = sorted({last * i // (_FINGERPRINT_BLOCKS - 1) for i in range(_FINGERPRINT_BLOCKS)})
    with open(path, "rb") as fh:
        for start in starts:
            fh.seek(start)
            digest.update(fh.read(_FINGERPRINT_BLOCK_BYTES))
    return f"{size}:{digest.hexdigest()}"


# What an ignored provenance file costs, whichever command read it ('fit'
# made no record of it; 'encode' could not check the rows' hook point).
_UNKNOWN_ORIGIN = ("where these activations came from is unknown: 'fit' cannot record it, "
                   "and 'encode' cannot check it against the dictionary's")


def _read_provenance(npy_path, X):
    """The provenance ``extract`` wrote beside activations, if it describes ``X``; else None.

    A provenance file that describes other activations (the .npy was
    replaced) is ignored with a warning rather than recorded wrongly.
    """
    path = _provenance_path(npy_path)
    if not path.is_file():
        return None
    if not _provenance_kind().recognize(path):
        warnings.warn(f"{str(path)!r} is not a provenance file written by "
                      f"'{PROG} extract'; it is ignored, so {_UNKNOWN_ORIGIN}",
                      UserWarning, stacklevel=2)
        return None
    provenance = json.loads(path.read_text(encoding="utf-8"))
    recorded = provenance.pop("activations_fingerprint", None)
    if recorded is not None and recorded != _fingerprint(npy_path):
        warnings.warn(f"{str(path)!r} describes the activations 'extract' wrote to "
                      f"{str(npy_path)!r}, which has been written over since; it is ignored, "
                      f"so {_UNKNOWN_ORIGIN}", UserWarning, stacklevel=2)
        return None
    shape = (provenance.get("n_tokens"), provenance.get("n_features"))
    if shape != tuple(X.shape):
        warnings.warn(f"{str(path)!r} describes {shape[0]} x {shape[1]} activations, not "
                      f"the {X.shape[0]} x {X.shape[1]} of {str(npy_path)!r}; it is "
                      "ignored", UserWarning, stacklevel=2)
        return None
    return provenance



def _logit_effects_or_none(extractor, dictionary, top_k, features=None):
    """The dictionary's logit effects, or None where the model has no next-token head
    or the hook is not on an MLP path (an encoder, a residual-stream hook)."""
    from sparse_dict.analysis import NoDirectPathError, logit_effects

    try:
        return logit_effects(extractor, dictionary, features=features, top_k=top_k)
    except NoDirectPathError:
        return None


def _extract(extractor, texts):
    """Activations of ``texts``, with the token string and (text, position) of each row."""
    acts, where = extractor.fit(texts).transform_with_tokens(texts)
    index = np.column_stack([where.text_index, where.position]).astype(np.int64)
    return np.asarray(acts, dtype=np.float32), where.token, index


def _estimator_params(args):
    """The estimator's parameters from the command line (all generated options, and --device)."""
    from sparse_dict._cli_options import estimator_params
    from sparse_dict.estimator import SparseAutoencoderDictionary

    params = estimator_params(args, SparseAutoencoderDictionary)
    params["device"] = args.device
    return params


def _write_report(out, dictionary, codes, tokens, index, *, k, context, title, overwrite=False,
                  density_title=None, logit_effects=None):
    """Feature browser and density plot of ``codes`` in folder ``out``.

    ``logit_effects`` (a :class:`~sparse_dict.analysis.LogitEffects`) adds
    each feature's promoted and suppressed tokens to its section.
    """
    import contextlib

    from sparse_dict import _persist
    from sparse_dict.browser import (
        browser_page,
        plot_feature_density,
        save_png,
        top_activating_examples,
    )

    frequencies = (np.asarray(codes) > 0).mean(axis=0)
    examples = top_activating_examples(codes, tokens, index, k=k, context=context)
    # Both made before either is written, and both staged, then moved into
    # place together: the page used to land seconds before the plot (the
    # plotting library's import), so an interrupted or failed report left a
    # page beside no plot, or beside the previous run's.
    page = browser_page(frequencies, examples, title=title, logit_effects=logit_effects)
    figure = plot_feature_density(frequencies, title=density_title)
    html_path, png_path = out / "features.html", out / "density.png"
    with contextlib.ExitStack() as stack:
        html = stack.enter_context(_persist.staged(html_path, _persist.HTML, overwrite=overwrite))
        png = stack.enter_context(_persist.staged(png_path, _persist.PNG, overwrite=overwrite))
        html.write_bytes(page)
        save_png(figure, png)
    return html_path, png_path
