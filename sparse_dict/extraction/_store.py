"""The on-disk activation store: activations of a corpus written as they are extracted.

A store is a folder::

    manifest.json     what was extracted (model, layer, hook, corpus) and how far it got
    activations.npy   float32 (n_rows, n_features), one row per token (or per text, pooled)
    index.npy         int64 (n_rows, 3): text index, position, token id of each row
    vocab.json        the token string of each token id, written when the extraction ends

Both ``.npy`` files grow at their end while the extraction runs. They are
written with plain ``write`` calls, not through a memory map, so that the
written pages are the kernel's cache and never count towards the process's
memory: extracting 10^7 tokens needs no more memory than 10^5.

The manifest is the truth about progress. Each chunk of texts is appended to
both files, the files' headers are updated and both are flushed to the disk
(``fsync``) *before* the manifest is replaced (atomically) by one that counts
them, so a crash at any moment leaves a manifest that never counts rows that
are not on disk. Rows written after the manifest's count belong to a chunk
that was cut short; resuming truncates them and extracts that chunk again, so
the store never holds a row twice or misses one.

The manifest also records the running SHA-256 of the texts done. Resuming
reads the same texts again up to that point (it must, to reach where it
stopped) and refuses to go on if their digest differs, or if the model, layer,
hook, pooling or length limit differ from those recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from sparse_dict import _persist
from sparse_dict._version import __version__

__all__ = ["ActivationStore", "open_store", "STORE"]

FORMAT = "sparse_dict activation store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ACTIVATIONS = "activations.npy"
INDEX = "index.npy"
VOCAB = "vocab.json"
# The manifest is replaced through this name; a crash may leave it behind.
_MANIFEST_NEXT = "manifest.json.next"
_INDEX_COLUMNS = 3  # text index, position, token id
# What must match between the extraction that made a store and one that
# resumes it; anything else in the configuration is a record only.
RESUME_KEYS = ("model", "layer", "hook", "module", "hook_module", "pooling", "max_length",
               "n_features")


def _is_manifest(content):
    return isinstance(content, dict) and content.get("format") == FORMAT


# A store is made whole with its manifest, which vouches for it: a user's
# folder holding an activations.npy is not one.
STORE = _persist.folder_kind("activation store", {
    MANIFEST: _persist.json_kind("activation store manifest", _is_manifest),
    ACTIVATIONS: _persist.NPY,
    INDEX: _persist.NPY,
    VOCAB: None,
    _MANIFEST_NEXT: None,
}, required=(MANIFEST,))


# --------------------------------------------------------------------------
# .npy files whose first axis grows
# --------------------------------------------------------------------------


def _header(shape, dtype):
    """The .npy (version 1.0) header of a C-ordered array of ``shape`` and ``dtype``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
              "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    return buf.getvalue()


def _header_size(width, dtype):
    # numpy pads a header so that the first axis can grow to any length
    # without the header growing: rewriting it in place is safe. Checked,
    # since the rows would otherwise be shifted.
    size = len(_header((0, width), dtype))
    if len(_header((1 << 62, width), dtype)) != size:  # pragma: no cover - numpy < 1.24
        raise RuntimeError("This numpy version cannot grow a .npy header in place.")
    return size


class _GrowingNpy:
    """A .npy file of rows, open for appending; the header follows ``n_rows``."""

    def __init__(self, path, width, dtype, n_rows):
        """``n_rows``: the rows to keep, or a function giving them once the lock is held."""
        self.path, self.width, self.dtype = Path(path), int(width), np.dtype(dtype)
        self.offset = _header_size(self.width, self.dtype)
        self.row_bytes = self.width * self.dtype.itemsize
        self.fh = open(self.path, "r+b")  # noqa: SIM115 - closed by close()
        try:
            _lock(self.fh, self.path.parent)
            if callable(n_rows):
                n_rows = n_rows()
            # The rows the manifest counts must all be there, as written:
            # truncate would otherwise grow a file that lost some with zeros.
            _check_rows_file(self.path, self.width, self.dtype, n_rows)
            # Rows past the manifest's count are the remains of a chunk cut short.
            self.fh.truncate(self.offset + n_rows * self.row_bytes)
            self.n_rows = n_rows
            self._write_header()
        except BaseException:
            self.fh.close()
            raise

    @classmethod
    def create(cls, path, width, dtype):
        with open(path, "wb") as fh:
            fh.write(_header((0, width), dtype))

    def _write_header(self):
        self.fh.seek(0)
        self.fh.write(_header((self.n_rows, self.width), self.dtype))
        self.fh.seek(0, os.SEEK_END)

    def append(self, rows):
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows of shape {rows.shape} do not fit {self.path.name} "
                             f"of width {self.width}")
        if not rows.size:
            # Texts without tokens add no rows (and an empty view cannot be cast).
            return
        self.fh.seek(self.offset + self.n_rows * self.row_bytes)
        self.fh.write(memoryview(rows).cast("B"))
        self.n_rows += rows.shape[0]
        self._write_header()

    def sync(self):
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self):
        self.fh.close()


def _fsync_folder(folder):
    # Makes a rename inside the folder durable; some systems cannot open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_durably(folder, name, content, **dumps):
    """Replace ``folder/name`` by ``content`` as JSON in one step, on the disk when this returns.

    Written under the manifest's temporary name, then moved: never half written.
    """
    text = json.dumps(content, **(dumps or {"indent": 2, "allow_nan": False})) + "\n"
    nxt = Path(folder) / _MANIFEST_NEXT
    with open(nxt, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(nxt, Path(folder) / name)
    _fsync_folder(folder)


class StoreInUseError(RuntimeError):
    """Another process is writing the activation store (a condition to wait out, not a bug)."""


def _lock(fh, path):
    """Hold an exclusive lock on ``fh``: two processes appending would mix their rows."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this system (Windows)
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreInUseError(
            f"{path} is being written by another process; wait for it to finish."
        ) from None


def _digest_texts(sha, texts, pretokenized):
    """Add ``texts`` to the running digest ``sha``, each unambiguously delimited."""
    for text in texts:
        data = (np.asarray(text, dtype=np.int64).tobytes() if pretokenized
                else text.encode("utf-8"))
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)


# --------------------------------------------------------------------------
# Reading a store
# --------------------------------------------------------------------------


def _read_manifest(path):
    file = path / MANIFEST
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist: expected an activation store "
                                f"(a folder with {MANIFEST}, {ACTIVATIONS} and {INDEX}).")
    if not path.is_dir():
        raise ValueError(f"{path} is not an activation store: it is not a folder.")
    if not file.is_file():
        raise ValueError(f"{path} is not an activation store: {MANIFEST} is missing.")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, OSError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not _is_manifest(manifest):
        raise ValueError(f"{file}: not the manifest of an activation store "
                         f"(its 'format' is not {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {manifest.get('format_version')!r}; this "
                         f"sparse_dict reads version {FORMAT_VERSION}.")
    for key in ("n_rows", "n_texts", "n_tokens", "n_features", "max_token_id"):
        _persist.Integer(minimum=-1 if key == "max_token_id" else 0).check(
            manifest.get(key), file, key)
    return manifest


def _rows(path, width, dtype, n_rows, complete=False):
    """The first ``n_rows`` rows of the growing .npy ``path``, memory-mapped read-only."""
    offset = _check_rows_file(path, width, dtype, n_rows, complete)
    if n_rows == 0:
        return np.empty((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_rows, width))


def _check_rows_file(path, width, dtype, n_rows, complete=False):
    """Raise unless the growing .npy ``path`` holds ``n_rows`` rows as written; its offset.

    Of a ``complete`` store, exactly those rows, as its header says too: a
    manifest edited to count fewer opened with rows left out, silently.
    """
    offset = _header_size(width, dtype)
    need = offset + n_rows * width * np.dtype(dtype).itemsize
    if not path.is_file():
        raise ValueError(f"{path} is missing: the activation store is damaged.")
    if path.stat().st_size < need:
        raise ValueError(f"{path} holds fewer rows than its manifest counts ({n_rows}): "
                         "the activation store is damaged.")
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(fh)
        except ValueError as exc:
            raise ValueError(f"{path} does not start with a valid .npy header ({exc}): the "
                             "activation store is damaged.") from None
        if version != (1, 0):
            raise ValueError(f"{path} is a .npy file of version {version}, not one written "
                             "by an activation store: the store is damaged.")
        if fortran or file_dtype != np.dtype(dtype) or shape[1:] != (width,):
            raise ValueError(f"{path} is not a C-ordered {np.dtype(dtype)} array of width "
                             f"{width}: the activation store is damaged.")
    if complete and (shape[0] != n_rows or path.stat().st_size != need):
        raise ValueError(f"{path} holds {shape[0]} rows where the manifest of the complete "
                         f"store counts {n_rows}: the activation store is damaged.")
    return offset


class ActivationStore:
    """Activations of a corpus on disk, with the text, position and token of each row.

    Made by :meth:`TransformerActivationExtractor.transform_to_disk
    <sparse_dict.TransformerActivationExtractor.transform_to_disk>` and
    opened by :func:`open_store`. Nothing is read into memory when it is
    opened: ``activations`` is a read-only ``np.memmap``, which
    :meth:`SparseAutoencoderDictionary.fit
    <sparse_dict.SparseAutoencoderDictionary.fit>` reads batch by batch.

    Attributes
    ----------
    path : pathlib.Path
        The store's folder.
    manifest : dict
        What was extracted and how far: ``model``, ``layer``, ``hook``,
        ``module``, ``hook_name``, ``pooling``, ``max_length``,
        ``n_features``, ``corpus`` (a description of the texts), ``n_texts``
        (texts done), ``n_tokens`` (their tokens), ``n_rows``, ``complete``
        (whether the extraction reached the end of its texts),
        ``texts_sha256`` and ``sparse_dict_version``.
    activations : np.memmap of shape (n_rows, n_features), dtype float32
        One row per token, texts one after another (or one per text, pooled).
    index : np.memmap of shape (n_rows, 3), dtype int64
        For each row: the index of its text (in the order the texts were
        given), its position in the tokenised text (-1 for rows pooled by
        mean or max) and its token id (-1 likewise).

    Notes
    -----
    ``np.load(path / "activations.npy", mmap_mode="r")`` gives the same
    array once the store is complete. Of an interrupted store it may also
    give rows of a chunk that was being written; this class gives only the
    rows its manifest counts.

    See Also
    --------
    open_store : Open a store.

    Examples
    --------
    >>> import tempfile, os
    >>> from sparse_dict.extraction import TransformerActivationExtractor, open_store
    >>> ext = TransformerActivationExtractor(device="cpu")
    >>> path = os.path.join(tempfile.mkdtemp(), "acts")
    >>> store = ext.transform_to_disk(["To be, or not to be", "ay, there's the rub"], path)
    >>> store.activations.shape == (store.n_rows, 512), store.complete
    (True, True)
    >>> store.text_index[:3].tolist(), store.position[:3].tolist()
    ([0, 0, 0], [0, 1, 2])
    >>> same = open_store(path)
    >>> bool((same.activations[:5] == store.activations[:5]).all())
    True
    """

    def __init__(self, path, manifest):
        self.path = Path(path)
        self.manifest = manifest
        n_rows, width = manifest["n_rows"], manifest["n_features"]
        complete = bool(manifest.get("complete"))
        self.activations = _rows(self.path / ACTIVATIONS, width, np.float32, n_rows, complete)
        self.index = _rows(self.path / INDEX, _INDEX_COLUMNS, np.int64, n_rows, complete)
        self._table = None

    def provenance(self):
        """Where the stored activations come from, as the extractor records it.

        The dictionary of :meth:`TransformerActivationExtractor.provenance
        <sparse_dict.TransformerActivationExtractor.provenance>` with
        ``n_tokens`` the rows stored: pass it to ``fit(store.activations,
        provenance=store.provenance())``, as ``sparse-dict fit`` does.

        Returns
        -------
        provenance : dict
        """
        from sparse_dict.extraction._extractor import PROVENANCE_FIELDS

        return {**{k: self.manifest.get(k) for k in PROVENANCE_FIELDS}, "n_tokens": self.n_rows}

    @property
    def n_rows(self):
        """Rows stored."""
        return int(self.manifest["n_rows"])

    @property
    def n_texts(self):
        """Texts done (a text without tokens counts, though it gives no row)."""
        return int(self.manifest["n_texts"])

    @property
    def complete(self):
        """Whether the extraction reached the end of its texts."""
        return bool(self.manifest["complete"])

    @property
    def text_index(self):
        """Index of each row's text, shape (n_rows,)."""
        return self.index[:, 0]

    @property
    def position(self):
        """Position of each row's token in its text, shape (n_rows,)."""
        return self.index[:, 1]

    @property
    def token_ids(self):
        """Token id of each row, shape (n_rows,); -1 for rows pooled by mean or max."""
        return self.index[:, 2]

    def __len__(self):
        return self.n_rows

    def __repr__(self):
        state = "complete" if self.complete else "incomplete"
        return (f"ActivationStore({str(self.path)!r}: {self.n_rows:,} x "
                f"{self.manifest['n_features']} activations of {self.n_texts:,} texts at "
                f"{self.manifest['hook_name']}, {state})")

    def rows_of_texts(self, n_texts):
        """Number of rows that the first ``n_texts`` texts gave.

        Rows are stored text after text, so the rows of the first ``n_texts``
        texts are ``activations[:rows_of_texts(n_texts)]``.

        Parameters
        ----------
        n_texts : int
            From 0 to :attr:`n_texts`.

        Returns
        -------
        n_rows : int

        Raises
        ------
        ValueError
            For a count outside that range, or not an integer (-1 gave 0
            rows, where it reads as "all but the last text").
        """
        if isinstance(n_texts, bool) or not isinstance(n_texts, numbers.Integral) or not (
                0 <= n_texts <= self.n_texts):
            raise ValueError(f"n_texts must be an integer from 0 to the store's {self.n_texts} "
                             f"texts, got {n_texts!r}.")
        return int(np.searchsorted(self.text_index, n_texts, side="left"))

    def tokens(self, rows=slice(None)):
        """Token strings of ``rows`` ('' for rows pooled by mean or max).

        Parameters
        ----------
        rows : slice or array of int, default=all rows

        Returns
        -------
        tokens : ndarray of str objects
        """
        table = self._token_table()
        ids = np.asarray(self.token_ids[rows])
        # -1 marks a pooled row; a lower id would read a token from the end.
        if ids.size and ids.min() < -1:
            raise ValueError(f"{self.path / INDEX}: token id {int(ids.min())} is below -1: the "
                             "store's index is damaged.")
        if ids.size and ids.max() >= len(table) - 1:
            raise ValueError(f"{self.path / VOCAB} has {len(table) - 1} tokens but the rows "
                             f"hold id {int(ids.max())}: the activation store is damaged.")
        return table[ids]

    def _token_table(self):
        """The token strings by id, and '' last (for id -1), read once."""
        if self._table is None:
            vocab_file = self.path / VOCAB
            if not vocab_file.is_file():
                raise ValueError(f"{self.path}: {VOCAB} is missing; it is written when the "
                                 "extraction ends, so resume the extraction first.")
            try:
                vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                vocab = None  # damaged: said below, by the file's name
            if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
                raise ValueError(f"{vocab_file}: expected a JSON list of token strings.")
            table = np.empty(len(vocab) + 1, dtype=object)
            table[:-1] = vocab
            table[-1] = ""  # id -1: rows pooled by mean or max
            self._table = table
        return self._table


def open_store(path):
    """Open the activation store at ``path`` for reading.

    Parameters
    ----------
    path : str or path-like
        A folder written by :meth:`TransformerActivationExtractor.transform_to_disk
        <sparse_dict.TransformerActivationExtractor.transform_to_disk>` (or by
        ``sparse-dict extract --store``).

    Returns
    -------
    ActivationStore
        Of an interrupted extraction too, with a warning: then it holds the
        rows of the texts done, and ``complete`` is False.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not an activation store, or is damaged.

    Examples
    --------
    >>> import tempfile, os
    >>> from sparse_dict.extraction import TransformerActivationExtractor, open_store
    >>> path = os.path.join(tempfile.mkdtemp(), "acts")
    >>> _ = TransformerActivationExtractor(device="cpu").transform_to_disk(["Hello"], path)
    >>> store = open_store(path)
    >>> store.manifest["model"], store.manifest["hook"], store.manifest["n_tokens"]
    ('builtin', 'mlp_post', 3)
    >>> store.tokens().tolist()
    ['H', 'ell', 'o']
    """
    path = _persist.user_path(path)
    store = ActivationStore(path, _read_manifest(path))
    if not store.complete:
        # Readable on purpose (to look at, or to fit on what is there), but a
        # fit on it would silently learn from part of the corpus.
        warnings.warn(
            f"The activation store {path} is incomplete: its extraction stopped after "
            f"{store.n_texts:,} texts, and its activations hold their rows only. Resume it "
            "(transform_to_disk(..., resume=True), or 'sparse-dict extract ... --resume') to "
            "finish it.", UserWarning, stacklevel=2)
    return store


# --------------------------------------------------------------------------
# Writing a store
# --------------------------------------------------------------------------


class StoreWriter:
    """Appends chunks of extracted texts to a store, durably; resumes one.

    Used by ``TransformerActivationExtractor.transform_to_disk``: ``config``
    is the extraction's provenance (see :data:`RESUME_KEYS`), and the caller
    feeds every text in order, through :meth:`skip` for those already done
    (``n_texts``) and :meth:`append` for the others, then calls
    :meth:`finish`.
    """

    def __init__(self, path, config, *, resume=False, overwrite=False):
        if resume and overwrite:
            raise ValueError("resume=True continues the extraction in the store and "
                             "overwrite=True starts it again; pass one of them.")
        self.path = _persist.user_path(path)
        hint = "overwrite=True (or resume=True to continue it)"
        # A file the user added to the folder (a README, a Finder's
        # .DS_Store) does not stop a resume, which replaces nothing.
        if resume and resumable(self.path):
            # Checked against this extraction once the lock is held, below.
            manifest = _read_manifest(self.path)
        else:
            if resume:
                # Something else is there: refused, naming it, unless it is an
                # empty folder, in which a new store starts.
                _persist.check_target(self.path, STORE, overwrite=True)
            try:
                _persist.check_target(self.path, STORE, overwrite=overwrite, hint=hint)
            except FileExistsError:
                if STORE.recognize(self.path) and not _read_manifest(self.path)["complete"]:
                    raise FileExistsError(
                        f"{self.path} holds an interrupted extraction; resume it (resume=True, "
                        "--resume on the command line) or start again (overwrite=True, "
                        "--overwrite).") from None
                raise
            if overwrite and STORE.recognize(self.path):
                # Not while another process is filling it.
                with open(self.path / ACTIVATIONS, "rb") as fh:
                    _lock(fh, self.path)
            manifest = self._create(config, overwrite, hint)
        self.manifest = manifest
        # The texts' description as this extraction gives it: a store
        # extended from a longer file is that file's ('part.txt' stayed).
        self._corpus = config.get("corpus")
        width = manifest["n_features"]

        def rows_under_lock():
            # Read again once the lock is held: a writer that finished since
            # the first reading added rows, which truncating to the count
            # read before would cut off.
            self.manifest = _read_manifest(self.path)
            _check_same_extraction(self.path, self.manifest, config)
            return self.manifest["n_rows"]

        self._acts = _GrowingNpy(self.path / ACTIVATIONS, width, np.float32, rows_under_lock)
        try:
            self._index = _GrowingNpy(self.path / INDEX, _INDEX_COLUMNS, np.int64,
                                      self.manifest["n_rows"])
        except BaseException:
            self._acts.close()
            raise
        self._acts.sync()
        self._index.sync()
        self._sha = hashlib.sha256()
        self._seen = 0  # texts fed so far, skipped or appended
        self._pretokenized = manifest["pretokenized"]

    def _create(self, config, overwrite, hint):
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            **config,
            "n_texts": 0, "n_tokens": 0, "n_rows": 0, "max_token_id": -1,
            "complete": False, "pretokenized": None,
            "texts_sha256": hashlib.sha256().hexdigest(),
            "sparse_dict_version": __version__,
        }
        # Created whole under a temporary name and renamed into place, so that
        # a store either exists with its manifest or not at all.
        with _persist.staged(self.path, STORE, overwrite=overwrite, hint=hint) as tmp:
            _GrowingNpy.create(tmp / ACTIVATIONS, manifest["n_features"], np.float32)
            _GrowingNpy.create(tmp / INDEX, _INDEX_COLUMNS, np.int64)
            _write_json_durably(tmp, MANIFEST, manifest)
        _fsync_folder(self.path.parent)
        return manifest

    @property
    def n_texts(self):
        """Texts done, which the caller skips."""
        return int(self.manifest["n_texts"])

    def first_text_rows(self):
        """``(text index, rows)`` of the first text with rows in the store, or None."""
        n_rows = self.manifest["n_rows"]
        if n_rows == 0:
            return None
        index = _rows(self.path / INDEX, _INDEX_COLUMNS, np.int64, n_rows)
        first = int(index[0, 0])
        n = int(np.searchsorted(index[:, 0], first, side="right"))
        acts = _rows(self.path / ACTIVATIONS, self.manifest["n_features"], np.float32, n_rows)
        return first, np.array(acts[:n])

    def _check_kind(self, pretokenized):
        if self._pretokenized is None:
            self._pretokenized = pretokenized
        elif pretokenized != self._pretokenized:
            held = "token ids" if self._pretokenized else "texts"
            raise ValueError(f"{self.path} was extracted from {held}; resume it with the "
                             "same kind of input.")

    def skip(self, texts, pretokenized):
        """Texts already in the store: only their digest is checked, once all are seen."""
        self._check_kind(pretokenized)
        if self._seen + len(texts) > self.n_texts:
            raise ValueError("skip() was given texts past those done")
        _digest_texts(self._sha, texts, pretokenized)
        self._seen += len(texts)
        if self._seen == self.n_texts:
            self._check_digest()

    def _check_digest(self):
        if self._sha.hexdigest() != self.manifest["texts_sha256"]:
            raise ValueError(
                f"The first {self.n_texts:,} texts differ from those extracted into "
                f"{self.path} (corpus {self.manifest.get('corpus')!r}): resume with the "
                "same texts in the same order, or start again (overwrite=True, "
                "--overwrite on the command line)."
            )

    def append(self, texts, pretokenized, activations, index, n_tokens):
        """Add the rows of ``texts`` (the next texts after those done), durably.

        Parameters
        ----------
        texts : list
            The texts, for the digest.
        activations : ndarray of shape (n_rows, n_features)
        index : ndarray of shape (n_rows, 3), int64
            Text index (counting from the first text of the whole input),
            position and token id.
        n_tokens : int
            Tokens of ``texts``.
        """
        self._check_kind(pretokenized)
        if self._seen != self.n_texts:
            raise ValueError(f"append() after {self._seen} texts, but {self.n_texts} are done")
        if len(activations) != len(index):
            raise ValueError("one index row per activation row expected")
        _digest_texts(self._sha, texts, pretokenized)
        self._acts.append(activations)
        self._index.append(index)
        # The rows reach the disk before the manifest counts them.
        self._acts.sync()
        self._index.sync()
        self._seen += len(texts)
        ids = index[:, 2]
        self._save_manifest(
            # A store extended past its end is incomplete until finish().
            complete=False,
            n_texts=self._seen,
            n_rows=self._acts.n_rows,
            n_tokens=self.manifest["n_tokens"] + int(n_tokens),
            max_token_id=max(self.manifest["max_token_id"], int(ids.max()) if ids.size else -1),
            texts_sha256=self._sha.hexdigest(),
            pretokenized=self._pretokenized,
            **({} if self._corpus is None else {"corpus": self._corpus}),
        )

    def _save_manifest(self, **changes):
        manifest = dict(self.manifest, **changes)
        _write_json_durably(self.path, MANIFEST, manifest)
        self.manifest = manifest

    def finish(self, vocab):
        """Mark the store complete, with ``vocab`` (the token string of each id)."""
        if self._seen < self.n_texts:
            stored, given = self.manifest.get("corpus"), self._corpus
            # A texts file split otherwise (--split) is the likeliest cause.
            differ = (f" They were extracted from {stored!r}, and these are {given!r}."
                      if stored and given and stored != given else "")
            raise ValueError(
                f"The texts end after {_texts(self._seen)}, but {_texts(self.n_texts)} "
                f"were extracted into {self.path}.{differ} Resume with the same texts (or "
                "more), or start again (overwrite=True, --overwrite on the command line)."
            )
        vocab = list(vocab)
        if len(vocab) <= self.manifest["max_token_id"]:
            raise ValueError("the vocabulary does not cover the token ids stored")
        _write_json_durably(self.path, VOCAB, vocab, ensure_ascii=False)
        self._save_manifest(complete=True)

    def close(self):
        self._acts.close()
        self._index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# How a hook point was asked for, and what it resolved to: one point may be
# asked for two ways (layer -1 and layer 0 of a one-layer model).
_NAMING_KEYS = ("layer", "hook", "module")
_RESOLVED_KEYS = ("hook_name", "hook_module", "hook_direction")


def _check_same_extraction(path, manifest, config):
    differ = [k for k in RESUME_KEYS if manifest.get(k) != config.get(k)]
    if all(manifest.get(k) is not None and manifest.get(k) == config.get(k)
           for k in _RESOLVED_KEYS):
        # The same hook point however it was named ('--layer -1' refused
        # a store made with '--layer 0', where encode and report take both).
        differ = [k for k in differ if k not in _NAMING_KEYS]
    if differ:
        what = ", ".join(f"{k}={manifest.get(k)!r} (now {config.get(k)!r})" for k in differ)
        raise ValueError(
            f"{path} was extracted with {what}; resume it with the same extractor, or "
            "start again (overwrite=True, --overwrite on the command line)."
        )
    # The same name with other weights (a checkpoint trained on in place):
    # its activations differ by little, too little for the re-extracted
    # first text to tell at 1% of noise.
    # Imported here: _loading brings torch, which readers of a store do without.
    from sparse_dict.extraction._loading import sample_of, same_weights

    samples = sample_of(manifest), sample_of(config)
    if None not in samples and not same_weights(*samples):
        raise ValueError(
            f"{path} was extracted with other weights than this model's (a sample of them "
            "is kept in its manifest's weights_sample), though under the same name; resume "
            "it with the same model, or start again (overwrite=True, --overwrite on the "
            "command line)."
        )


def resumable(path):
    """Whether ``path`` is an activation store, other files in its folder aside."""
    return STORE.foreign(path) is not None


def _texts(n):
    """``n`` texts, in words."""
    return f"{n:,} text{'' if n == 1 else 's'}"
