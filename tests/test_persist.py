"""Safe writing: outputs appear whole or not at all, and only replace what the package wrote.

Covers :mod:`sparse_dict._persist` directly and through
``SparseAutoencoderDictionary.save``, including several processes saving to
the same path at once.
"""

import errno
import multiprocessing
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from sparse_dict import SparseAutoencoderDictionary, _persist
from sparse_dict.estimator import SAVED_DICTIONARY


def _fit(seed):
    rng = np.random.RandomState(seed)
    X = rng.exponential(size=(80, 5)).astype(np.float32)
    return SparseAutoencoderDictionary(
        n_components=6, max_iter=1, batch_size=40, device="cpu", random_state=seed
    ).fit(X)


@pytest.fixture(scope="module")
def models():
    return [_fit(seed) for seed in range(4)]


def _hidden(folder):
    """Names the package may have left behind: its temporary and set-aside outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _user_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("three years of work")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("more")
    return path


def _same_model(a, b):
    return np.array_equal(a.components_, b.components_) and a.n_steps_ == b.n_steps_


# --------------------------------------------------------------------------
# The one decision: may this path be written?
# --------------------------------------------------------------------------


def _npy_file(path):
    np.save(path, np.zeros(3))
    return path


def _text_file(path):
    path.write_text("mine")
    return path


def _empty_folder(path):
    path.mkdir()
    return path


def _saved(path):
    return _fit(0).save(path)


CASES = [
    # (what is at the path, kind, overwrite, expected error or None)
    ("nothing", None, _persist.NPY, False, None),
    ("our .npy", _npy_file, _persist.NPY, False, FileExistsError),
    ("our .npy, overwrite", _npy_file, _persist.NPY, True, None),
    ("user's text named .npy, overwrite", _text_file, _persist.NPY, True, FileExistsError),
    ("empty folder for a folder", _empty_folder, SAVED_DICTIONARY, False, None),
    ("empty folder for a file", _empty_folder, _persist.NPY, True, FileExistsError),
    ("user's folder, overwrite", _user_folder, SAVED_DICTIONARY, True, FileExistsError),
    ("saved dictionary", _saved, SAVED_DICTIONARY, False, FileExistsError),
    ("saved dictionary, overwrite", _saved, SAVED_DICTIONARY, True, None),
    ("user's file where a dictionary goes, overwrite", _text_file, SAVED_DICTIONARY, True,
     FileExistsError),
]


@pytest.mark.parametrize("what,make,kind,overwrite,error", CASES, ids=[c[0] for c in CASES])
def test_check_target(tmp_path, what, make, kind, overwrite, error):
    path = tmp_path / "target.npy"
    if make is not None:
        make(path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if error is None:
        assert _persist.check_target(path, kind, overwrite=overwrite) == path
    else:
        with pytest.raises(error, match="already exists"):
            _persist.check_target(path, kind, overwrite=overwrite)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_output_is_never_an_input(tmp_path):
    source = _npy_file(tmp_path / "acts.npy")
    for same in (source, tmp_path / "." / "acts.npy"):
        with pytest.raises(ValueError, match="is the input"):
            _persist.check_target(same, _persist.NPY, overwrite=True, inputs=[source])
    os.link(source, tmp_path / "hard.npy")  # another name of the same file
    with pytest.raises(ValueError, match="is the input"):
        _persist.check_target(tmp_path / "hard.npy", _persist.NPY, overwrite=True,
                              inputs=[source])


def test_symlinks_are_never_replaced(tmp_path, models):
    real = models[0].save(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileExistsError, match="symbolic link"):
        models[1].save(tmp_path / "link", overwrite=True)
    assert _same_model(SparseAutoencoderDictionary.load(real), models[0])


# --------------------------------------------------------------------------
# Writing: whole or not at all
# --------------------------------------------------------------------------


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.npy"
    with pytest.raises(RuntimeError, match="midway"):
        with _persist.staged(target, _persist.NPY) as tmp:
            np.save(tmp, np.zeros(10))
            raise RuntimeError("midway")
    # Neither the output, its temporary, nor the folders made for it remain.
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_output(tmp_path):
    target = _npy_file(tmp_path / "out.npy")
    with pytest.raises(KeyboardInterrupt):
        with _persist.staged(target, _persist.NPY, overwrite=True) as tmp:
            np.save(tmp, np.ones(10))
            raise KeyboardInterrupt
    np.testing.assert_array_equal(np.load(target), np.zeros(3))
    assert _hidden(tmp_path) == []


_WRITER = """
import sys, time
import numpy as np
from sparse_dict import _persist
with _persist.staged(sys.argv[1], _persist.NPY) as tmp:
    np.save(tmp, np.zeros(1000))
    print("writing", flush=True)
    time.sleep(60)
"""


def _writer(target):
    """A process in the middle of writing ``target``, as it reports once it is."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


@pytest.mark.skipif(os.name != "posix", reason="a killed process is recognised on POSIX only")
def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.npy"
    killed, running = _writer(target), _writer(target)
    killed.kill()  # SIGKILL: nothing in the process can clean up
    killed.wait()
    try:
        left = _hidden(tmp_path)
        assert len(left) == 2
        # Names that are not a leftover of this host's: another host's writer,
        # and a user's own hidden file.
        other_host = tmp_path / left[0].replace(_persist._owner_tag().split("-")[0], "0" * 8)
        other_host.write_bytes(b"x")
        mine = tmp_path / ".out.npy.notes.partial.npy"
        mine.write_text("mine")
        before = set(_hidden(tmp_path))
        with pytest.warns(UserWarning, match=r"removed 1 partial output\(s\) that an earlier "
                          r"write of .*out.npy' left when its process was killed \(8.13 kB\)"):
            with _persist.staged(target, _persist.NPY) as tmp:
                np.save(tmp, np.ones(3))
        np.testing.assert_array_equal(np.load(target), np.ones(3))
        gone = before - set(_hidden(tmp_path))
        assert len(gone) == 1 and str(killed.pid) in gone.pop()
        assert other_host.exists() and mine.read_text() == "mine"
        # The running writer's output is left alone.
        assert any(f"-{running.pid}-" in name for name in _hidden(tmp_path))
    finally:
        running.kill()
        running.wait()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_permissions_follow_the_umask(tmp_path, models, umask):
    old = os.umask(umask)
    try:
        path = models[0].save(tmp_path / "d")
        with _persist.staged(tmp_path / "a.npy", _persist.NPY) as tmp:
            np.save(tmp, np.zeros(2))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == 0o777 & ~umask
    assert mode(path / "weights.safetensors") == 0o666 & ~umask
    assert mode(path / "config.json") == 0o666 & ~umask
    assert mode(tmp_path / "a.npy") == 0o666 & ~umask


def test_overwrite_leaves_no_hidden_copies(tmp_path, models):
    path = models[0].save(tmp_path / "d")
    for model in models[1:]:
        model.save(path, overwrite=True)
        assert _same_model(SparseAutoencoderDictionary.load(path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # Onto a file: refused, the file is kept, and nothing is left behind.
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved dictionary"):
        models[0].save(blocker, overwrite=True)
    assert blocker.read_text() == "mine"
    assert _hidden(tmp_path) == []


def test_overwrite_without_an_atomic_swap(tmp_path, models, monkeypatch):
    # File systems without renameat2's exchange take the move-aside path.
    monkeypatch.setattr(_persist, "_exchange", lambda a, b: False)
    path = models[0].save(tmp_path / "d")
    models[1].save(path, overwrite=True)
    assert _same_model(SparseAutoencoderDictionary.load(path), models[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_create_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with _persist.staged(tmp_path / "a.npy", _persist.NPY) as tmp:
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
    with pytest.raises(FileExistsError):
        with _persist.staged(tmp_path / "a.npy", _persist.NPY) as tmp:
            np.save(tmp, np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_user_folder_is_never_replaced(tmp_path, models):
    docs = _user_folder(tmp_path / "mydocs")
    with pytest.raises(FileExistsError, match="not a saved dictionary"):
        models[0].save(docs, overwrite=True)
    assert (docs / "thesis.txt").read_text() == "three years of work"
    assert (docs / "sub" / "notes.txt").read_text() == "more"
    # A saved dictionary with a file of the user's added is the user's too.
    path = models[0].save(tmp_path / "d")
    (path / "my notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"is a saved dictionary with entries sparse_dict "
                                              r"did not write in it \(my notes.txt\)"):
        models[1].save(path, overwrite=True)
    assert (path / "my notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------
# Several processes at once
# --------------------------------------------------------------------------


def _save_in_child(model, path, overwrite, barrier, results, index):
    barrier.wait()
    try:
        model.save(path, overwrite=overwrite)
        results.put((index, "saved"))
    except FileExistsError:
        results.put((index, "exists"))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((index, f"{type(exc).__name__}: {exc}"))


def _race(models, path, overwrite):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(len(models)), ctx.Queue()
    procs = [ctx.Process(target=_save_in_child, args=(m, path, overwrite, barrier, results, i))
             for i, m in enumerate(models)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [outcome[i] for i in range(len(models))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork")
def test_concurrent_saves_one_wins(tmp_path, models):
    for trial in range(4):
        path = tmp_path / f"d{trial}"
        outcome = _race(models, path, overwrite=False)
        assert sorted(outcome) == ["exists"] * (len(models) - 1) + ["saved"], outcome
        winner = models[outcome.index("saved")]
        assert _same_model(SparseAutoencoderDictionary.load(path), winner)
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork")
def test_concurrent_overwrites_all_succeed(tmp_path, models):
    path = models[0].save(tmp_path / "d")
    for _ in range(3):
        outcome = _race(models, path, overwrite=True)
        assert outcome == ["saved"] * len(models), outcome
        loaded = SparseAutoencoderDictionary.load(path)
        assert any(_same_model(loaded, m) for m in models)
        assert _hidden(tmp_path) == []


@pytest.mark.parametrize("values, ok", [
    ([np.nan, np.nan], True),      # unknown: all NaN
    ([0.5, np.nan], False),        # part NaN is damage, not "unknown"
    ([0.5, np.inf], False),
    ([0.5, 0.25], True),
])
def test_unknown_tensors_are_all_nan_or_all_finite(tmp_path, values, ok):
    from safetensors.numpy import save_file

    file = tmp_path / "t.safetensors"
    save_file({"f": np.array(values)}, str(file))
    spec = {"f": _persist.TensorSpec((2,), minimum=0.0, maximum=1.0, unknown=True)}
    if ok:
        np.testing.assert_array_equal(_persist.read_tensors(file, spec)["f"], values)
    else:
        with pytest.raises(ValueError, match="NaN or infinite"):
            _persist.read_tensors(file, spec)
    strict = {"f": _persist.TensorSpec((2,), minimum=0.0, maximum=1.0)}
    if not np.isfinite(values).all():
        with pytest.raises(ValueError, match="NaN or infinite"):
            _persist.read_tensors(file, strict)


def test_a_random_state_instance_is_saved_as_none_with_a_warning(models, tmp_path):
    X = np.random.RandomState(0).exponential(size=(80, 5)).astype(np.float32)
    drawn = SparseAutoencoderDictionary(
        n_components=6, max_iter=1, batch_size=40, device="cpu",
        random_state=np.random.RandomState(3)).fit(X)
    with pytest.warns(UserWarning, match="random_state is a RandomState instance"):
        drawn.save(tmp_path / "drawn")
    assert SparseAutoencoderDictionary.load(tmp_path / "drawn").random_state is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models[0].save(tmp_path / "seeded")  # an int is kept, silently
    assert SparseAutoencoderDictionary.load(tmp_path / "seeded").random_state == 0


@pytest.mark.parametrize("mode", [0o700, 0o2770, 0o750])
def test_an_empty_folder_keeps_its_permissions(tmp_path, models, mode):
    # The renamed new folder took the umask's 0755 in place of a private or
    # group-shared folder made for the output.
    target = tmp_path / "private"
    target.mkdir()
    os.chmod(target, mode)
    models[0].save(target)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert _same_model(SparseAutoencoderDictionary.load(target), models[0])


def test_long_names_are_saved_and_too_long_ones_refused_first(tmp_path, models):
    # A temporary name adds about 45 bytes to the output's: a 235-byte name
    # that mkdir takes could not be saved to (after a whole fit, in the CLI).
    long = "d" * 235
    path = models[0].save(tmp_path / long)
    assert path.name == long and _same_model(SparseAutoencoderDictionary.load(path), models[0])
    with _persist.staged(tmp_path / ("a" * 240 + ".npy"), _persist.NPY) as tmp:
        assert tmp.suffix == ".npy" and len(tmp.name) < 255
        np.save(tmp, np.ones(2))
    assert np.load(tmp_path / ("a" * 240 + ".npy")).tolist() == [1, 1]
    assert _hidden(tmp_path) == []
    # A killed writer's temporary of a long name is still found as its leftover.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target = tmp_path / ("e" * 250)
    leftover = _persist._temporary(target, folder=True)
    renamed = leftover.with_name(leftover.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    leftover.rename(renamed)
    assert _persist._leftovers(target) == [renamed]
    with pytest.raises(ValueError, match=r"is 256 bytes long, and the file system of .* "
                                         r"allows 255: choose a shorter name"):
        _persist.check_target(tmp_path / ("f" * 256), SAVED_DICTIONARY)


@pytest.mark.parametrize("edit", ["dtype", "frequencies", "scale"])
def test_a_state_load_would_refuse_is_not_saved_over_a_good_one(tmp_path, models, edit):
    # Fitted attributes set by hand were saved as they were: overwrite=True
    # put a folder load refuses in place of a good one.
    good = models[1].save(tmp_path / "d")
    sae = _fit(0)
    if edit == "dtype":
        sae.components_ = sae.components_.astype(np.float64)  # the rest stays float32
    elif edit == "frequencies":
        sae.feature_frequencies_ = np.full_like(sae.feature_frequencies_, 1.5)
    else:
        sae.scale_ = 0.0
    with pytest.raises(ValueError, match=r"d was not written: what would be saved does not "
                                         r"load back \(.*d/(weights.safetensors|config.json)"):
        sae.save(good, overwrite=True)
    assert _same_model(SparseAutoencoderDictionary.load(good), models[1])
    assert _hidden(tmp_path) == []


def test_a_load_beside_an_overwrite_reads_one_whole_save(tmp_path, models, monkeypatch):
    # load reads config.json, then the weights, by name: a save with
    # overwrite swapping in its folder between the two gave one save's
    # config with the other's weights, refused as damaged.
    path = models[0].save(tmp_path / "d")
    digest_file = _persist._digest_file
    swaps = []

    def swapped_first(file):
        # Once config.json is read, before its record of the weights is checked.
        if not swaps:
            swaps.append(path)  # before the save, whose check reads its folder back
            models[1].save(path, overwrite=True)
        return digest_file(file)

    monkeypatch.setattr(_persist, "_digest_file", swapped_first)
    assert _same_model(SparseAutoencoderDictionary.load(path), models[1])
    assert swaps
    # A folder that is damaged, not replaced, is refused as before.
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="changed"):
        SparseAutoencoderDictionary.load(path)
