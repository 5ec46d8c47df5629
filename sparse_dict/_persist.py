"""Writing outputs so that nothing is lost, and reading saved folders back with checks.

Every file or folder the package writes goes through :func:`staged`: the
content is written under a hidden temporary name in the target's own folder
and moved onto the target only once complete, so an error or Ctrl-C never
leaves a partial output, and a reader never sees one. (A process killed
outright cannot clean up; the next write of the same output removes what it
left, and says so.) Whether a path may be
written at all is decided in one place, :func:`check_target`:

- a path that does not exist (or an empty folder, for a folder output) is free;
- anything else is replaced only with ``overwrite`` and only if it is itself
  something this package writes there (a :class:`Kind` recognises it: a saved
  dictionary, a ``.npy`` array, ...), never an arbitrary file or folder of
  the user's;
- an output is never one of the command's inputs.

Creating a path that is absent is one atomic step (a hard link for files, a
rename for folders, both of which fail if the target appeared meanwhile), so
of several processes saving to the same new path exactly one succeeds and the
others get :class:`FileExistsError`.

The reading half validates a saved folder's JSON configuration and its
safetensors weights against a schema that the caller supplies, and reports
every problem as a :class:`ValueError` naming the file and the field.

Nothing here knows about scikit-learn or torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "Kind",
    "Integer",
    "Real",
    "OneOf",
    "Strings",
    "TensorSpec",
    "check_target",
    "staged",
    "write_folder",
    "read_config",
    "read_tensors",
    "config_field",
    "NPY",
    "PNG",
    "HTML",
    "TOKENS",
    "folder_kind",
]

# A saved configuration is a few kilobytes; anything far larger is not one,
# and is not read into memory to find out.
_MAX_CONFIG_BYTES = 64 << 20
# The header bytes read to recognise a file written by this package.
_HEAD_BYTES = 4096
# Replacing an output that other processes replace at the same moment can
# find the target moved; each try either succeeds or finds it changed.
_REPLACE_TRIES = 20
# For how long a target that reads as not replaceable is looked at again
# (see _commit): a folder another writer is swapping can read so for a moment.
_RECHECK_S = 1.0
# The HTML pages written by sparse_dict say so; this is how --overwrite
# tells them from a user's own page.
HTML_GENERATOR = "sparse_dict feature browser"
INTEGRITY_KEY = "sha256"


# --------------------------------------------------------------------------
# What the package writes, recognised
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of output this package writes, and how to recognise one on disk.

    Parameters
    ----------
    name : str
        What it is, for messages ("saved dictionary", ".npy array").
    folder : bool
        Whether it is a folder (else a file).
    recognize : callable
        ``recognize(path) -> bool``: whether ``path`` holds one, judged from
        its content, so that ``overwrite`` never replaces a user's own file or
        folder that merely has the same name.
    foreign : callable or None, default=None
        Of a folder kind: ``foreign(path) -> list of str or None``, the names
        in ``path`` that are not the kind's own where the rest is one (such
        a folder is not replaced, but can be added to), else None.
    """

    name: str
    folder: bool
    recognize: Callable[[Path], bool]
    foreign: Callable[[Path], list] | None = None


def _head(path, n=_HEAD_BYTES):
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _is_plain_file(path):
    path = Path(path)
    return path.is_file() and not path.is_symlink()


def _file_with_magic(magic, *, contains=b""):
    def recognize(path):
        if not _is_plain_file(path):
            return False
        head = _head(path)
        return head.startswith(magic) and contains in head

    return recognize


def _json_file(check, max_bytes=_MAX_CONFIG_BYTES):
    """A recogniser of JSON files whose parsed content passes ``check``."""

    def recognize(path):
        if not _is_plain_file(path) or Path(path).stat().st_size > max_bytes:
            return False
        try:
            return bool(check(json.loads(Path(path).read_bytes())))
        except (ValueError, OSError, TypeError, AttributeError):
            return False

    return recognize


def _tokens_file(path):
    """A ``.jsonl`` of ``{"text", "position", "token"}`` rows, as ``extract --tokens`` writes."""
    if not _is_plain_file(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    if not first:
        return True  # extract writes an empty file for no tokens
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and set(row) == {"text", "position", "token"}


NPY = Kind(".npy array", False, _file_with_magic(b"\x93NUMPY"))
# The mark of a PNG this package wrote: a PNG text entry "Software" naming
# sparse_dict, which every savefig of the package passes (png_metadata()).
# Matplotlib puts its own name there in every PNG it writes, so a user's own
# figure never carries the mark, whatever else it says.
PNG_SOFTWARE_KEY = "Software"
PNG_SOFTWARE_PREFIX = "sparse_dict "
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Text chunks come before the image data (matplotlib writes them there); at
# most this many chunks, and text chunks of at most this size, are read to
# find the mark, so a large image is never read whole.
_PNG_MAX_CHUNKS = 64
_PNG_MAX_TEXT_BYTES = 1 << 16
# The PNG standard's bound on a chunk's length.
_PNG_MAX_CHUNK_LENGTH = (1 << 31) - 1


def png_metadata():
    """The ``metadata`` for matplotlib's ``savefig`` that marks a PNG as this package's.

    Every PNG the package writes passes it, so that :data:`PNG` (what
    ``overwrite`` may replace) tells the package's plots from a user's own.

    Returns
    -------
    metadata : dict
        ``{"Software": "sparse_dict <version>"}``, written as a PNG text chunk.

    Examples
    --------
    >>> png_metadata()["Software"].startswith("sparse_dict ")
    True
    """
    from sparse_dict._version import __version__

    return {PNG_SOFTWARE_KEY: PNG_SOFTWARE_PREFIX + __version__}


def _png_texts(path):
    """The ``(keyword, text)`` of the ``tEXt`` chunks before a PNG's image data.

    The chunks are walked from the signature and ``IHDR`` on, each text
    chunk's CRC checked; the walk stops at the image data, at the end, after
    :data:`_PNG_MAX_CHUNKS` chunks, or at the first damaged chunk (what was
    read before it is kept). A file that is not a PNG gives ``[]``.
    """
    import zlib

    texts = []
    try:
        with open(path, "rb") as fh:
            if fh.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                return []
            for index in range(_PNG_MAX_CHUNKS):
                header = fh.read(8)
                if len(header) < 8:
                    break
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if (index == 0) != (kind == b"IHDR") or length > _PNG_MAX_CHUNK_LENGTH:
                    break  # not a PNG's chunk sequence
                if kind in (b"IDAT", b"IEND"):
                    break
                if kind != b"tEXt" or length > _PNG_MAX_TEXT_BYTES:
                    fh.seek(length + 4, os.SEEK_CUR)  # its data and CRC, unread
                    continue
                data, crc = fh.read(length), fh.read(4)
                if len(data) < length or crc != zlib.crc32(kind + data).to_bytes(4, "big"):
                    break
                keyword, null, text = data.partition(b"\0")
                if null:
                    # Latin-1, as the PNG standard has tEXt.
                    texts.append((keyword.decode("latin-1"), text.decode("latin-1")))
    except OSError:
        return []
    return texts


def _png_written_here(path):
    """Whether ``path`` is a PNG whose text says sparse_dict wrote it (:func:`png_metadata`)."""
    return _is_plain_file(path) and any(
        key == PNG_SOFTWARE_KEY and text.startswith(PNG_SOFTWARE_PREFIX)
        for key, text in _png_texts(path))


# A plot written before the mark existed is not recognised either: it is kept,
# the safe direction, and the message says why.
PNG = Kind("PNG plot marked as written by sparse_dict (its PNG text names sparse_dict as "
           "its Software; older plots, without the mark, are kept too)", False,
           _png_written_here)
# The page's own generator tag, not the words anywhere: a user's notes about
# the browser must not read as one of its pages.
HTML = Kind("feature browser page", False,
            _file_with_magic(b"<!DOCTYPE html>", contains=(
                f'<meta name="generator" content="{HTML_GENERATOR}">').encode()))
TOKENS = Kind("tokens file written by 'sparse-dict extract'", False, _tokens_file)


def text_kind(name, marker):
    """A :class:`Kind` of text files this package writes, recognised by ``marker`` in their head."""
    return Kind(name, False, _file_with_magic(b"", contains=marker.encode()))


def json_kind(name, check):
    """A :class:`Kind` of JSON files whose parsed content passes ``check``."""
    return Kind(name, False, _json_file(check))


def folder_kind(name, entries, required=()):
    """A :class:`Kind` of folders holding only the entries the package writes.

    Parameters
    ----------
    name : str
    entries : dict of str to Kind or None
        The names that may appear in the folder. An entry with a kind must be
        recognised by it; an entry with ``None`` is allowed but says nothing
        (a plain text file). At least one entry with a kind must be present,
        so that a folder is recognised by its content, not its names alone.
    required : tuple of str, default=()
        Entries that must be present (the one that vouches for the folder
        where the others, an ``activations.npy``, say, could be anyone's).

    Returns
    -------
    Kind
    """

    def foreign(path):
        path = Path(path)
        if not path.is_dir() or path.is_symlink():
            return None
        if not all((path / entry).is_file() for entry in required):
            return None
        vouched, others = False, []
        for child in sorted(path.iterdir()):
            if child.name not in entries:
                others.append(child.name)
                continue
            kind = entries[child.name]
            if child.is_symlink() or (kind is None and child.is_dir()):
                return None
            if kind is not None:
                if not kind.recognize(child):
                    return None
                vouched = True
        return others if vouched else None

    def recognize(path):
        return foreign(path) == []

    return Kind(name, True, recognize, foreign)


# --------------------------------------------------------------------------
# Where a path may be written: the one decision
# --------------------------------------------------------------------------


def _same_file(a, b):
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(path, folder):
    """Whether ``path`` lies inside the folder ``folder`` (links resolved)."""
    try:
        folder = Path(os.path.realpath(folder))
        return folder.is_dir() and folder in Path(os.path.realpath(path)).parents
    except OSError:
        return False


def _is_empty_dir(path):
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _describe(path):
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    return "not a regular file"


def _a(name):
    """``name`` with its indefinite article ("an activation store", "a saved dictionary")."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _check_replaceable(path, kind):
    """Raise FileExistsError unless ``path`` is a ``kind`` this package wrote."""
    others = kind.foreign(path) if kind.foreign is not None else None
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5
                                         else "")
        raise FileExistsError(
            f"{path} is {_a(kind.name)} with entries "
            f"sparse_dict did not write in it ({shown}); refusing to replace it, even with "
            "overwrite, since they would be lost. Move them out of it first, or choose "
            "another name."
        )
    if path.is_symlink() or path.is_dir() != kind.folder or not kind.recognize(path):
        raise FileExistsError(
            f"{path} already exists and is {_describe(path)} that is not "
            f"{_a(kind.name)}; "
            "refusing to replace it, even with overwrite, since sparse_dict did not write "
            "it as one. Remove it yourself or choose another name."
        )


def _check_replaceable_settled(path, kind):
    """:func:`_check_replaceable`, looked at again for up to ``_RECHECK_S`` before refusing.

    A folder that other writers are replacing at this moment can read as
    another kind half-way (in 1 of 240 saves by four processes at once, one
    was refused as "not a saved dictionary"). A user's own folder stays
    what it is, and is refused once that time is up.
    """
    deadline = time.monotonic() + _RECHECK_S
    while True:
        try:
            return _check_replaceable(path, kind)
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _check_movable_onto(path):
    """Raise ValueError where a finished output could not be moved onto the empty folder ``path``.

    An output is written beside its path and renamed onto it at the end
    (:func:`staged`), which no system allows onto the current folder, a
    folder above it or a mount point: ``fit -o .`` in an empty folder
    trained to the end and only then failed, its dictionary lost.
    """
    try:
        here, there = Path.cwd().resolve(), Path(path).resolve()
    except OSError:
        return
    if there == here or there in here.parents or os.path.ismount(there):
        where = ("the current folder" if there == here else
                 "a folder above the current one" if there in here.parents else
                 "a mount point")
        raise ValueError(
            f"the output {path} is {where}, which a finished output cannot be moved onto; "
            f"name a new folder for it instead (for example {Path(path) / 'out'})"
        )


def _check_name_length(path):
    """Refuse a name the file system cannot hold, before any work is done for it."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255  # Linux's, macOS's and Windows' limit
    length = len(os.fsencode(path.name))
    if length > limit:
        raise ValueError(
            f"the output name {path.name[:40]}... is {length} bytes long, and the file system "
            f"of {path.parent} allows {limit}: choose a shorter name")


def user_path(path):
    """``path`` as a :class:`~pathlib.Path`, with a leading ``~`` made the home folder.

    As the shell would have: the public functions that take a path take
    ``"~/d"`` as pandas and Hugging Face do (a literal ``./~`` folder was
    made, which invites ``rm -rf ~`` to clean it up).
    """
    return Path(os.path.expanduser(os.fspath(path)))


def check_target(path, kind, *, overwrite=False, inputs=(), hint="overwrite=True"):
    """Check that ``path`` may be written as a ``kind``; raise if not.

    This is the one place that decides whether an output path may be used.

    Parameters
    ----------
    path : str or path-like
    kind : Kind
    overwrite : bool, default=False
        Allow replacing an existing ``kind`` that this package wrote.
    inputs : iterable of path-like, default=()
        The paths the operation reads; writing any of them is refused.
    hint : str, default="overwrite=True"
        How the caller asks for ``overwrite``, for the message.

    Returns
    -------
    path : pathlib.Path

    Raises
    ------
    ValueError
        If ``path`` is one of ``inputs``, or lies inside one of them; or is
        an empty folder that an output cannot be moved onto (the current
        folder, one above it, a mount point).
    FileExistsError
        If ``path`` exists and may not be replaced.
    """
    path = Path(path)
    _check_name_length(path)
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise ValueError(
                f"the output {path} is the input {source}: writing it would destroy "
                "the input; choose another output name"
            )
        if source is not None and _inside(path, source):
            # A file added to a saved dictionary or a store changes the
            # input, which is then no longer recognised as what it was.
            raise ValueError(
                f"the output {path} lies inside the input folder {source}: writing it "
                "would change the input; choose an output outside it"
            )
    if not os.path.lexists(path):
        return path
    if kind.folder and _is_empty_dir(path):
        _check_movable_onto(path)
        return path  # an empty folder holds nothing to lose
    # What may never be replaced is said first: advising overwrite there
    # would only lead to this refusal. (Looked at again only with overwrite:
    # a folder other writers are swapping matters to those that replace it.)
    (_check_replaceable_settled if overwrite else _check_replaceable)(path, kind)
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass {hint} to replace it")
    return path


# --------------------------------------------------------------------------
# How a path is written: staged beside it, moved into place when complete
# --------------------------------------------------------------------------


def _umask():
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_parents(folder):
    """Create ``folder`` and missing parents; return those created, deepest last."""
    created = []
    folder = Path(folder)
    for parent in [*reversed(folder.parents), folder]:
        if not os.path.lexists(parent):
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            created.append(parent)
    return created


def _remove_created(folders):
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty: never anything else's


def _remove(path):
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _owner_tag():
    """This process's mark in its temporary names: its host's name, hashed, and its PID."""
    host = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _alive(pid):
    """Whether process ``pid`` of this host may still run (True when it cannot be told)."""
    if os.name != "posix":
        return True  # Windows' os.kill would end the process, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or a probe refused: assume it runs
    return True


# The longest part of an output's name, in bytes, that its temporary names
# repeat: with the tag, the random part and the label they add about 45
# bytes, and a longer name would pass NAME_MAX (255 on Linux and macOS), so
# that a name mkdir accepts could not be saved to, after a whole fit.
_NAME_IN_TEMPORARY = 120


def _temporary_stem(path):
    """``path``'s name as its temporary names hold it: whole, or cut and hashed when long."""
    name, suffix = path.name, path.suffix
    if len(os.fsencode(name)) <= _NAME_IN_TEMPORARY:
        return name, suffix
    # A long suffix is no file type (np.save's ".npy" is what must stay).
    if len(os.fsencode(suffix)) > 16:
        suffix = ""
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    # Cut as bytes, less a character cut in two.
    head = os.fsencode(name)[:_NAME_IN_TEMPORARY - 13].decode("utf-8", "ignore")
    return f"{head}~{digest}", suffix


def _leftovers(path):
    """Partial outputs for ``path`` left by processes of this host that have gone.

    A process killed outright (SIGKILL, a power cut) cannot remove its
    temporary output. Its name (see :func:`_temporary`) holds the host and
    the PID that made it, so that the next write of the same ``path`` can
    tell a leftover from the output of a writer still at work, here or on
    another host sharing the folder. Only names of exactly that form are
    considered; the ``.old`` copies of :func:`_replace` never are (one may
    hold the only copy of an output).
    """
    host, _, _ = _owner_tag().partition("-")
    stem, suffix = _temporary_stem(path)
    pattern = re.compile(rf"\.{re.escape(stem)}\.([0-9a-f]{{8}})-([0-9]+)-"
                         rf"[A-Za-z0-9_]+\.partial{re.escape(suffix)}")
    found = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and match.group(1) == host and not _alive(int(match.group(2))):
                found.append(Path(entry.path))
    return sorted(found)


def _size(path):
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.lstat().st_size


def _in_units(n_bytes):
    """``n_bytes`` for a person: "8 kB", "3.2 GB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes} bytes"


def _remove_leftovers(path):
    """Remove :func:`_leftovers` of ``path``, saying what went (they may be large)."""
    removed, size = [], 0
    for leftover in _leftovers(path):
        with contextlib.suppress(OSError):
            size += _size(leftover)
            _remove(leftover)
            removed.append(leftover.name)
    if removed:
        from sparse_dict._warn import warn_at_caller

        warn_at_caller(
            f"removed {len(removed)} partial output(s) that an earlier write of {str(path)!r} "
            f"left when its process was killed ({_in_units(size)}): "
            + ", ".join(removed), UserWarning)
    return removed


def scratch_folder(path):
    """A new hidden folder beside ``path`` for a command's intermediate files.

    Named as :func:`staged`'s temporaries are, so that what a process killed
    outright left is removed by the next write of ``path``; the caller
    removes it when done.

    Parameters
    ----------
    path : str or path-like
        The output it serves.

    Returns
    -------
    folder : pathlib.Path
    """
    return _temporary(Path(path), folder=True)


def _temporary(path, folder, label="partial"):
    """A hidden new name beside ``path``, created with the umask's permissions.

    The name holds this process's :func:`_owner_tag`, so that a later write
    can recognise the output of a process that was killed (:func:`_leftovers`).
    """
    parent = path.parent
    stem, extension = _temporary_stem(path)
    prefix, suffix = f".{stem}.{_owner_tag()}-", f".{label}{extension}"
    mask = _umask()
    try:
        if folder:
            name = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
            os.chmod(name, 0o777 & ~mask)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
            os.close(fd)
            os.chmod(name, 0o666 & ~mask)
    except OSError as exc:
        # Named by the user's path: the hidden name beside it means nothing
        # to them.
        raise type(exc)(exc.errno, f"cannot write {path} ({exc.strerror or exc})",
                        str(path)) from None
    return Path(name)


_RENAME_EXCHANGE = 2


def _exchange(a, b):
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # the file system cannot swap: the caller falls back
    raise OSError(err, os.strerror(err), str(b))


def _keep_mode_of(empty, tmp):
    """Give ``tmp`` the group and permissions of the ``empty`` folder it replaces.

    An empty folder made for the output is the user's choice of place,
    permissions included: one made private (0700) or group-shared (setgid
    2770) came back 0755 after the rename put the new folder in its place.
    """
    try:
        st = os.stat(empty, follow_symlinks=False)
    except OSError:
        return  # nothing there (the usual case), or nothing to read
    if not stat.S_ISDIR(st.st_mode):
        return
    with contextlib.suppress(OSError, AttributeError):  # no os.chown on Windows
        os.chown(tmp, -1, st.st_gid)  # a group the user is not in is refused
    with contextlib.suppress(OSError):
        os.chmod(tmp, stat.S_IMODE(st.st_mode))


def _create(tmp, path, folder):
    """Move ``tmp`` to ``path`` only if nothing is there; FileExistsError otherwise."""
    if folder:
        # rename(2) of a folder fails onto a file or a non-empty folder and
        # succeeds onto an absent or empty one (which holds nothing to lose),
        # all in one step: of several savers, exactly one wins.
        if os.path.lexists(path) and not _is_empty_dir(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(path))
        _keep_mode_of(path, tmp)
        try:
            os.rename(tmp, path)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
            raise
        return
    try:
        # link(2) fails if the name exists, in one step; rename would replace it.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links on this file system: check, then rename.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _replace(tmp, path, kind):
    """Put ``tmp`` in place of the existing ``path``; False if ``path`` vanished meanwhile."""
    if not kind.folder:
        os.replace(tmp, path)  # atomic for files
        return True
    try:
        swapped = _exchange(tmp, path)
    except FileNotFoundError:
        return False
    if swapped:
        _remove(tmp)  # now the old folder
        return True
    # No atomic swap here: move the old folder aside, put the new one in, and
    # remove the old one; if the new one cannot go in, the old one goes back.
    aside = _temporary(path, folder=True, label="old")
    aside.rmdir()
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(aside, path)
        if os.path.lexists(aside):
            _remove(aside)  # another writer put its own output in place
        raise
    _remove(aside)
    return True


def _commit(tmp, path, kind, overwrite, hint):
    for _ in range(_REPLACE_TRIES):
        try:
            _create(tmp, path, kind.folder)
            return
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(
                    f"{path} already exists (it appeared while this output was being "
                    f"written); pass {hint} to replace it"
                ) from None
        _check_replaceable_settled(path, kind)
        try:
            if _replace(tmp, path, kind):
                return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        # Another process moved the target at the same moment: try again.
    raise FileExistsError(f"{path} kept changing while it was being replaced; try again")


@contextlib.contextmanager
def staged(path, kind, *, overwrite=False, inputs=(), hint="overwrite=True"):
    """Write ``path`` through a temporary name beside it; move it into place when complete.

    Yields the temporary path (an empty folder for a folder ``kind``, an empty
    file otherwise) for the caller to write. If the block raises, the
    temporary output and any folders created for it are removed and ``path``
    is untouched; if it completes, the output is moved onto ``path`` as
    described in :func:`check_target`. Permissions follow the umask.

    Parameters
    ----------
    path : str or path-like
    kind : Kind
    overwrite, inputs, hint
        As in :func:`check_target`.

    Yields
    ------
    tmp : pathlib.Path
    """
    path = check_target(path, kind, overwrite=overwrite, inputs=inputs, hint=hint)
    created = _make_parents(path.parent)
    _remove_leftovers(path)
    tmp = None
    try:
        tmp = _temporary(path, kind.folder)
        yield tmp
        _commit(tmp, path, kind, overwrite, hint)
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        _remove_created(created)
        raise


# --------------------------------------------------------------------------
# Saved folders: a JSON config and safetensors weights
# --------------------------------------------------------------------------


def json_value(value, where):
    """``value`` with numpy numbers and arrays as JSON's, or ValueError naming ``where``.

    For objects a user may set by hand (``provenance_``): ``json.dump``
    fails on ``np.int64(3)`` with "Object of type int64 is not JSON
    serializable", naming neither the object nor the field.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}; JSON keys are strings")
            out[key] = json_value(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}, which JSON cannot hold; use None")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where} is a {type(value).__name__} ({value!r:.60}), which JSON "
                     "cannot hold; use a number, a string, a list or a dict")


def _canonical(config):
    body = {k: v for k, v in config.items() if k != INTEGRITY_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest_bytes(data):
    return hashlib.sha256(data).hexdigest()


def _digest_file(path):
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_folder(path, config, tensors, *, kind, config_name, weights_name,
                 overwrite=False, hint="overwrite=True", extra_files=None, verify=None):
    """Save ``config`` (JSON) and ``tensors`` (safetensors) as a folder, safely.

    The folder is staged and moved into place as :func:`staged` does. The
    config records the SHA-256 of itself and of the weights, so that
    :func:`read_config` and :func:`read_tensors` detect any later damage.

    Parameters
    ----------
    path : str or path-like
    config : dict
        JSON-serialisable, without NaN or infinity.
    tensors : dict of str to ndarray
    kind : Kind
        The folder's kind (what may be replaced with ``overwrite``).
    config_name, weights_name : str
        File names inside the folder.
    overwrite : bool, default=False
    hint : str, default="overwrite=True"
    extra_files : dict of str to bytes or to dict of ndarray, optional
        Further files of the folder, by name, written and moved into place
        with it (a dict of arrays as a safetensors file, written straight
        to disk); their SHA-256 goes in the integrity record beside the
        weights' (under ``"files"``), which :func:`read_config` checks and
        :func:`as_written` reads.
    verify : callable, optional
        Called with the staged folder once it is complete, before it is
        moved into place; a ValueError it raises leaves ``path`` as it was
        and is raised again, naming ``path``: a folder its reader would
        refuse is never put in place of one it reads.

    Returns
    -------
    path : pathlib.Path
    """
    from safetensors.numpy import save_file

    text = json.dumps(config, indent=2, allow_nan=False)  # fails before anything is written
    def contiguous(array):
        # (np.ascontiguousarray would make a 0-d array, Adam's step, 1-d.)
        array = np.asarray(array)
        return array if array.flags.c_contiguous else np.ascontiguousarray(array)

    def write_tensors(arrays, file):
        save_file({k: contiguous(v) for k, v in arrays.items()}, str(file))
        # safetensors creates its file private (0600); ours follow the umask.
        os.chmod(file, 0o666 & ~_umask())

    with staged(path, kind, overwrite=overwrite, hint=hint) as tmp:
        weights = tmp / weights_name
        write_tensors(tensors, weights)
        signed = dict(json.loads(text))
        signed[INTEGRITY_KEY] = {
            "config": _digest_bytes(_canonical(signed).encode()),
            "weights": _digest_file(weights),
        }
        if extra_files:
            for name, data in extra_files.items():
                # Arrays go to disk as they are: serialised in memory first,
                # a training state held a second copy of itself there.
                if isinstance(data, dict):
                    write_tensors(data, tmp / name)
                else:
                    (tmp / name).write_bytes(data)
            signed[INTEGRITY_KEY]["files"] = {name: _digest_file(tmp / name)
                                              for name in extra_files}
        (tmp / config_name).write_text(json.dumps(signed, indent=2) + "\n", encoding="utf-8")
        if verify is not None:
            try:
                verify(tmp)
            except ValueError as exc:
                message = str(exc).replace(str(tmp), str(path))
                raise ValueError(f"{path} was not written: what would be saved does not load "
                                 f"back ({message})") from None
    return Path(path)


def read_whole(path, read, attempts=3):
    """``read()`` of the folder ``path``, again if another process replaced it meanwhile.

    A folder is read file by file, by name: a save with ``overwrite`` that
    swaps in a new folder between two of those reads gives a config of one
    save and weights of the other, which the integrity record refuses as
    damaged (91 loads in about 4,500, beside a process saving in a loop).
    When the folder at ``path`` is another one after a failed read, the
    failure was the swap, and the read starts again.
    """
    for attempt in range(attempts):
        before = _identity(path)
        try:
            return read()
        except (ValueError, FileNotFoundError):
            if attempt == attempts - 1 or before is None or _identity(path) == before:
                raise


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The inode number alone may be reused by the next save; a rename
    # changes the folder's ctime as well.
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _integrity_record(config):
    """The config's integrity record, checked in shape; None where it has none.

    Raises ValueError (without a file name: the callers add it) where it is
    damaged.
    """
    if INTEGRITY_KEY not in config:
        return None
    record = config[INTEGRITY_KEY]
    files = record.get("files", {}) if isinstance(record, dict) else None
    if not (isinstance(record, dict) and set(record) - {"files"} == {"config", "weights"}
            and all(isinstance(record[k], str) for k in ("config", "weights"))
            and isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) and Path(k).name == k
                    and k not in ("", ".", "..") for k, v in files.items())):
        raise ValueError(f"field {INTEGRITY_KEY!r} is damaged")
    return record


def as_written(path, config_name, weights_name, extras=()):
    """Whether the folder ``path`` holds what :func:`write_folder` wrote, unchanged.

    The config must carry its integrity record, and the config, the weights
    and each of ``extras`` present must match their digests in it (an extra
    file added later, or changed since, is not the folder's). Another program
    that rewrote the folder (SAELens' ``save_model`` keeps the config's
    metadata but drops the record) made it its own: ``overwrite`` must not
    replace it.
    """
    path = Path(path)
    try:
        config = json.loads((path / config_name).read_bytes())
        record = _integrity_record(config) if isinstance(config, dict) else None
        if record is None or _digest_bytes(_canonical(config).encode()) != record["config"]:
            return False
    except (OSError, ValueError, RecursionError):
        return False
    files = {weights_name: record["weights"], **record.get("files", {})}
    present = [weights_name] + [name for name in extras if os.path.lexists(path / name)]
    return all(name in files and _is_plain_file(path / name)
               and _digest_file(path / name) == files[name] for name in present)


def _bad(file, message):
    return ValueError(f"{file}: {message}")


EDIT_HINT = "Set parameters after loading instead (set_params), and save again."


def read_config(path, *, config_name, weights_name, other_layout=None, edit_hint=EDIT_HINT,
                optional=()):
    """Read and integrity-check a saved folder's JSON config.

    Returns the config as a dict. A folder written before integrity records
    existed (no ``"sha256"`` entry) is read without the check. ``edit_hint``
    says, after a config that changed, how to change what it holds instead.
    A recorded file named in ``optional`` may have been removed since (a
    folder shared without it); present, it must match its digest.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a complete saved folder, the config is not a JSON
        object, or the config or weights differ from what was saved.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"{path} is not a saved dictionary: it does not exist (expected a folder "
            f"with {config_name} and {weights_name} inside)."
        )
    if not path.is_dir():
        raise ValueError(f"{path} is not a saved dictionary: it is not a folder.")
    # Reading follows links to files (the Hugging Face cache links each file
    # of a snapshot to its blob); only replacing a folder insists on plain
    # files (_is_plain_file).
    for name in (config_name, weights_name):
        if not (path / name).is_file():
            # A folder of the other layout (``other_layout``: its config
            # file's name, and what reads it) gets named as that.
            hint = ""
            if other_layout is not None and (path / other_layout[0]).is_file():
                hint = f" It holds {other_layout[0]}: {other_layout[1]}."
            raise ValueError(
                f"{path} is not a complete saved dictionary: {name} is missing or not a "
                f"file.{hint}"
            )
    config_file = path / config_name
    config = read_json_object(config_file, "a saved configuration")
    try:
        record = _integrity_record(config)
    except ValueError as exc:
        raise _bad(config_file, str(exc)) from None
    if record is not None:
        try:
            canonical = _canonical(config).encode()
        except ValueError:  # NaN or infinity: never written by save
            raise _bad(config_file, "contains NaN or infinity") from None
        if _digest_bytes(canonical) != record["config"]:
            raise _bad(config_file, "the file changed after it was saved (its checksum does "
                       f"not match): it is damaged or was edited by hand. {edit_hint}")
        for name, digest in [(weights_name, record["weights"]), *record.get("files", {}).items()]:
            if name in optional and not os.path.lexists(path / name):
                continue
            if not (path / name).is_file():
                raise ValueError(f"{path} is not a complete saved folder: {name} is missing "
                                 "or not a file, though the config records it.")
            if _digest_file(path / name) != digest:
                raise _bad(path / name, "the file changed after it was saved (its checksum "
                           "does not match): it is damaged.")
    return config


def read_json_object(file, what="a configuration"):
    """The JSON object in ``file``; ValueError naming it for anything else.

    For a saved configuration before its integrity record is checked, and
    for one that none vouches for (a model's or a tokenizer's), whose every
    field the caller then checks.
    """
    file = Path(file)
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise _bad(file, f"too large to be {what}")
    try:
        data = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _bad(file, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(file, "expected a JSON object")
    return data


def config_field(config, key, file, where=None, kind=dict):
    """``config[key]``, which must exist and be a ``kind``; ValueError naming it otherwise."""
    where = where or key
    if not isinstance(config, dict) or key not in config:
        raise _bad(file, f"field {where!r} is missing")
    value = config[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(file, f"field {where!r} must be {_noun(kind)}, got {value!r}")
    return value


def _noun(kind):
    names = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer"}
    return names.get(kind, kind.__name__ if isinstance(kind, type) else str(kind))


# Checks of single config values: each returns the value or raises ValueError.


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer (not a boolean) of at least ``minimum``."""

    minimum: int = 0

    def check(self, value, file, where):
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise _bad(file, f"field {where!r} must be an integer >= {self.minimum}, "
                       f"got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite number above ``minimum`` (or from it, if ``inclusive``)."""

    minimum: float = -math.inf
    inclusive: bool = True

    def check(self, value, file, where):
        try:
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and math.isfinite(value)
                  and (value >= self.minimum if self.inclusive else value > self.minimum))
        except OverflowError:  # an integer beyond any float, as JSON allows
            ok = False
        if not ok:
            bound = ">=" if self.inclusive else ">"
            raise _bad(file, f"field {where!r} must be a finite number {bound} "
                       f"{self.minimum}, got {value!r}")
        return float(value)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of ``options``."""

    options: tuple

    def check(self, value, file, where):
        if not isinstance(value, str) or value not in self.options:
            raise _bad(file, f"field {where!r} must be one of {list(self.options)}, "
                       f"got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Strings:
    """A list of strings."""

    def check(self, value, file, where):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(file, f"field {where!r} must be a list of strings")
        return value


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What a saved tensor must be.

    Parameters
    ----------
    shape : tuple of int or None
        ``None`` for a dimension of any length.
    dtypes : tuple of str, default=("float32", "float64")
    minimum, maximum : float, default=None
        Bounds on the values (all values must be finite in any case, but
        for ``unknown``).
    optional : bool, default=False
        Whether the file may lack it (a tensor added after files were first
        written); if present it is checked like any other.
    unknown : bool, default=False
        Whether it may be all NaN: values that were not known when it was
        saved.
    """

    shape: tuple
    dtypes: tuple = ("float32", "float64")
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False
    unknown: bool = False


def _pickle_note(file):
    """What a file that is no safetensors file looks like, when it is a pickle."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    # torch.save writes a zip archive of pickles; pickle protocols 2 and up
    # start with 0x80 and the protocol's number.
    if head.startswith(b"PK\x03\x04"):
        return ("; it is a zip archive, as torch.save writes, which is never read here: "
                "pickles can run code")
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "; it is a pickle, which is never read here: pickles can run code"
    return ""


def read_tensors(file, schema):
    """Read a safetensors file and check every tensor against ``schema``.

    Parameters
    ----------
    file : path-like
    schema : dict of str to TensorSpec
        Exactly the tensors the file must hold (the optional ones may be
        absent).

    Returns
    -------
    tensors : dict of str to ndarray

    Raises
    ------
    ValueError
        Naming the file and the tensor, for an unreadable file, a missing or
        unexpected tensor, or one of the wrong shape, dtype or values.
    """
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own and numpy's errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _bad(file, f"not a readable safetensors file ({first})"
                         f"{_pickle_note(file)}") from None
    for name in tensors:
        if name not in schema:
            raise _bad(file, f"unexpected tensor {name!r}")
    for name, spec in schema.items():
        if name not in tensors:
            if spec.optional:
                continue
            raise _bad(file, f"tensor {name!r} is missing")
        array = tensors[name]
        if array.dtype.name not in spec.dtypes:
            raise _bad(file, f"tensor {name!r} has dtype {array.dtype.name}; expected one "
                       f"of {list(spec.dtypes)}")
        shape_ok = len(array.shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, array.shape)
        )
        if not shape_ok:
            wanted = tuple("any" if s is None else s for s in spec.shape)
            raise _bad(file, f"tensor {name!r} has shape {array.shape}; expected {wanted}")
        if spec.unknown and array.size and np.isnan(array).all():
            continue
        if not np.isfinite(array).all():
            raise _bad(file, f"tensor {name!r} contains NaN or infinite values")
        if array.size and (
            (spec.minimum is not None and array.min() < spec.minimum)
            or (spec.maximum is not None and array.max() > spec.maximum)
        ):
            raise _bad(file, f"tensor {name!r} has values outside "
                       f"[{spec.minimum}, {spec.maximum}]")
    return tensors
