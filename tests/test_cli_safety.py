"""The command line never loses a user's file and always ends with a meaningful exit status.

Exit statuses: 0 success, 2 a problem the user can fix (one line on stderr),
130 interrupted, 1 only for a bug. Outputs appear whole or not at all, and
``--overwrite`` replaces only what sparse-dict itself wrote.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
import pytest

from sparse_dict import SparseAutoencoderDictionary, _persist
from sparse_dict import cli
from sparse_dict.cli import main
from sparse_dict.estimator import DivergenceError


def run(argv, capsys):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder):
    """Every path under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture
def work(tmp_path):
    """Activations and a dictionary fitted on them, in a fresh folder."""
    rng = np.random.RandomState(0)
    acts = rng.exponential(size=(60, 6)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    SparseAutoencoderDictionary(n_components=8, max_iter=1, batch_size=30, device="cpu",
                                random_state=0).fit(acts).save(tmp_path / "dict")
    return tmp_path


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("To be, or not to be\nThat is the question\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# Outputs: never an input, never a user's file, never partial
# --------------------------------------------------------------------------


def test_encode_output_equal_to_input_is_refused(work, capsys):
    before = (work / "acts.npy").read_bytes()
    for extra in ([], ["--overwrite"]):
        status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o",
                              work / "acts.npy", *extra], capsys)
        assert status == 2 and "is the input" in one_line(err)
        assert (work / "acts.npy").read_bytes() == before


def test_an_output_inside_an_input_folder_is_refused(work, texts, capsys):
    # A page or codes written into a saved dictionary (or a store) change
    # it: it is then no longer recognised as what it was.
    before = listing(work / "dict")
    cases = [
        ["report", work / "dict", texts, "-o", work / "dict", "--device", "cpu", "-q"],
        ["report", work / "dict", texts, "-o", work / "dict" / "pages", "--device", "cpu"],
        ["encode", work / "dict", work / "acts.npy", "-o", work / "dict" / "codes.npy"],
        ["encode", work / "dict", work / "acts.npy", "-o",
         work / "dict" / "weights.safetensors", "--overwrite"],
    ]
    for args in cases:
        status, _, err = run(args, capsys)
        assert status == 2 and "lies inside the input folder" in one_line(err), args
        assert listing(work / "dict") == before
    assert SparseAutoencoderDictionary.load(work / "dict").n_components_ == 8


def test_a_folder_given_as_an_output_file_is_named(work, texts, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "codes").mkdir()
    before = listing(work)
    # "new/" and an existing folder were written as new.npy and codes.npy beside them.
    for args in (["extract", texts, "-o", "."], ["encode", work / "dict", work / "acts.npy",
                                                 "-o", "."], ["extract", texts, "-o", ""],
                 ["extract", texts, "-o", "new/"],
                 ["encode", work / "dict", work / "acts.npy", "-o", "codes"]):
        status, _, err = run(args, capsys)
        assert status == 2 and "names a folder; give the output file's name" in one_line(err)
        assert listing(work) == before, args
    assert "for example codes/acts.npy" in err
    status, _, err = run(["demo", "--max-length", "1", "-o", work / "demo"], capsys)
    assert status == 2 and "--max-length: expected an integer >= 2" in err
    assert not (work / "demo").exists()


def test_extract_outputs_are_checked_against_each_other_first(work, texts, capsys):
    # The tokens file may be neither the activations nor their provenance
    # file; refused before anything is written.
    for tokens, words in (("q.npy", "is the activations output"),
                          ("q.provenance.json", "is the provenance file written beside")):
        status, _, err = run(["extract", texts, "-o", work / "q.npy", "--tokens",
                              work / tokens, "--device", "cpu", "-q"], capsys)
        assert status == 2 and words in one_line(err)
        assert not list(work.glob("q*")) and not list(work.glob(".q*"))


def test_fit_overwrite_never_replaces_a_user_folder(work, capsys):
    docs = work / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("three years")
    status, _, err = run(["fit", work / "acts.npy", "-o", docs, "--overwrite", "--max-iter",
                          "1", "--device", "cpu", "-q"], capsys)
    assert status == 2 and "not a saved dictionary" in one_line(err)
    assert (docs / "thesis.txt").read_text() == "three years" and (docs / "sub").is_dir()
    # Without --overwrite the refusal is the same: advising --overwrite
    # would only lead to it.
    status, _, err = run(["fit", work / "acts.npy", "-o", docs, "--max-iter", "1",
                          "--device", "cpu", "-q"], capsys)
    assert status == 2 and "refusing to replace it, even with overwrite" in one_line(err)


def test_fit_overwrite_replaces_a_saved_dictionary(work, capsys):
    before = SparseAutoencoderDictionary.load(work / "dict").components_
    status, _, err = run(["fit", work / "acts.npy", "-o", work / "dict", "--overwrite",
                          "--max-iter", "1", "--random-state", "5", "--device", "cpu", "-q"],
                         capsys)
    assert status == 0, err
    assert not np.array_equal(SparseAutoencoderDictionary.load(work / "dict").components_, before)
    assert [n for n in listing(work) if n.startswith(".")] == []


def test_encode_refuses_an_existing_output_without_overwrite(work, capsys):
    np.save(work / "codes.npy", np.zeros(3))
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "codes.npy"],
                         capsys)
    assert status == 2 and "--overwrite" in one_line(err)
    np.testing.assert_array_equal(np.load(work / "codes.npy"), np.zeros(3))
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "codes.npy",
                          "--overwrite", "-q"], capsys)
    assert status == 0, err
    assert np.load(work / "codes.npy").shape == (60, 8)
    # --overwrite does not extend to a file that is not an .npy array.
    (work / "notes.npy").write_text("my notes")
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "notes.npy",
                          "--overwrite"], capsys)
    assert status == 2 and "not a .npy array" in one_line(err)
    assert (work / "notes.npy").read_text() == "my notes"


def test_encode_of_nan_input_leaves_no_output(work, capsys):
    bad = np.load(work / "acts.npy")
    bad[40, 2] = np.nan
    np.save(work / "bad.npy", bad)
    before = listing(work)
    status, _, err = run(["encode", work / "dict", work / "bad.npy", "-o", work / "out" / "c.npy",
                          "--chunk-size", "16", "-q"], capsys)
    assert status == 2 and "NaN" in one_line(err)
    assert listing(work) == before  # no codes, no temporary, no "out" folder


def test_encode_reports_the_name_it_writes(work, capsys):
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "codes"],
                         capsys)
    assert status == 0
    assert (work / "codes.npy").is_file() and not (work / "codes").exists()
    assert str(work / "codes.npy") in err


def test_extract_outputs(tmp_path, texts, capsys):
    # -o without .npy: the name written is the name reported.
    status, _, err = run(["extract", texts, "-o", tmp_path / "acts", "--device", "cpu"], capsys)
    assert status == 0, err
    assert (tmp_path / "acts.npy").is_file() and str(tmp_path / "acts.npy") in err
    # A tokens path that cannot be written: nothing at all is written.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    before = listing(tmp_path)
    status, _, err = run(["extract", texts, "-o", tmp_path / "b.npy", "--tokens",
                          blocker / "t.jsonl", "--device", "cpu", "-q"], capsys)
    assert status == 2 and "not a folder" in one_line(err)
    assert listing(tmp_path) == before
    # An existing tokens file is kept unless --overwrite; a user's file always.
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"my": "data"}\n')
    for extra in ([], ["--overwrite"]):
        status, _, err = run(["extract", texts, "-o", tmp_path / "c.npy", "--tokens", mine,
                              "--device", "cpu", "-q", *extra], capsys)
        assert status == 2, err
        assert mine.read_text() == '{"my": "data"}\n' and not (tmp_path / "c.npy").exists()
    # Tokens onto the activations' own name: refused before any work.
    status, _, err = run(["extract", texts, "-o", tmp_path / "d.npy", "--tokens",
                          tmp_path / "d.npy", "--device", "cpu", "-q"], capsys)
    assert status == 2 and "is the activations output" in one_line(err)


def test_report_overwrite_keeps_a_user_page(work, texts, capsys):
    (work / "r").mkdir()
    (work / "r" / "features.html").write_text("<!DOCTYPE html><p>mine</p>")
    status, _, err = run(["report", work / "dict", texts, "-o", work / "r", "--overwrite",
                          "--device", "cpu", "-q"], capsys)
    assert status == 2 and "not a feature browser page" in one_line(err)
    assert (work / "r" / "features.html").read_text() == "<!DOCTYPE html><p>mine</p>"


def _matplotlib_png(path, **savefig):
    """A figure saved with matplotlib, as a user saves their own."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([1, 2])
    fig.savefig(path, format="png", **savefig)
    return path


def _png_chunks(data):
    """A PNG's chunks, each whole (length, type, data, CRC), in order."""
    chunks, i = [], 8
    while i < len(data):
        end = i + 12 + int.from_bytes(data[i:i + 4], "big")
        chunks.append(data[i:end])
        i = end
    return chunks


def test_report_overwrite_keeps_a_users_matplotlib_png(work, texts, capsys):
    (work / "r").mkdir()
    before = _matplotlib_png(work / "r" / "density.png").read_bytes()
    status, _, err = run(["report", work / "dict", texts, "-o", work / "r", "--overwrite",
                          "--device", "cpu", "-q"], capsys)
    # Refused, saying that a plot without the mark (an older one of ours too) is kept.
    line = one_line(err)
    assert status == 2 and "not a PNG plot marked as written by sparse_dict" in line
    assert "older plots, without the mark, are kept too" in line
    assert (work / "r" / "density.png").read_bytes() == before


def test_only_a_png_marked_by_sparse_dict_may_be_replaced(tmp_path):
    from sparse_dict.browser import plot_feature_density

    ours = tmp_path / "ours.png"
    plot_feature_density(np.array([0.5, 0.0]), ours)
    assert _persist.check_target(ours, _persist.PNG, overwrite=True) == ours
    chunks = _png_chunks(ours.read_bytes())
    signature, text = ours.read_bytes()[:8], [c for c in chunks if c[4:8] == b"tEXt"]
    # Not the package's: a user's figure; one whose other text names
    # sparse_dict; the mark in a chunk whose CRC is wrong; the mark after the
    # image data, where the package never writes it and which is not read.
    _matplotlib_png(tmp_path / "mine.png")
    _matplotlib_png(tmp_path / "comment.png",
                    metadata={"Comment": "Software: sparse_dict 0.1.0"})
    damaged = [c if c[4:8] != b"tEXt" else c[:-1] + bytes([c[-1] ^ 1]) for c in chunks]
    (tmp_path / "crc.png").write_bytes(signature + b"".join(damaged))
    rest = [c for c in chunks if c[4:8] != b"tEXt"]
    (tmp_path / "late.png").write_bytes(signature + b"".join(rest[:-1] + text + rest[-1:]))
    for name in ("mine.png", "comment.png", "crc.png", "late.png"):
        with pytest.raises(FileExistsError, match="refusing to replace it, even with overwrite"):
            _persist.check_target(tmp_path / name, _persist.PNG, overwrite=True)
    # The mark itself: one text chunk, Software naming sparse_dict and its version.
    from sparse_dict import __version__

    assert [c[8:-4] for c in text] == [b"Software\0sparse_dict " + __version__.encode()]


def test_convert_overwrite_replaces_what_sparse_dict_wrote_as_its_help_says(work, capsys):
    status, out, _ = run(["convert", "--help"], capsys)
    help_text = " ".join(out.split())
    assert status == 0
    assert "a saved dictionary (fit, convert, save) with --from saelens" in help_text
    assert "a SAELens folder (convert, to_saelens) with --from sparse_dict" in help_text
    # A dictionary saved as fit saves it, and a SAELens folder to_saelens
    # wrote, are each replaced by a conversion...
    SparseAutoencoderDictionary.load(work / "dict").to_saelens(work / "sae")
    for fmt, source, target in (("saelens", work / "sae", work / "dict"),
                                ("sparse_dict", work / "dict", work / "sae")):
        status, _, err = run(["convert", "--from", fmt, source, "-o", target, "--overwrite",
                              "-q"], capsys)
        assert status == 0, err
    # ... a folder of the user's never.
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for fmt, source in (("saelens", work / "sae"), ("sparse_dict", work / "dict")):
        status, _, err = run(["convert", "--from", fmt, source, "-o", mine, "--overwrite"],
                             capsys)
        assert status == 2 and "refusing to replace it" in one_line(err)
    assert listing(mine) == ["notes.txt"]


# --------------------------------------------------------------------------
# Exit statuses
# --------------------------------------------------------------------------


def _raises(exc):
    def command(args):
        raise exc

    return command


def _missing(package, message):
    """The ImportError the package raises from a failed import of an optional package."""
    try:
        try:
            raise ModuleNotFoundError(f"No module named {package!r}")
        except ImportError as exc:
            raise ImportError(message) from exc
    except ImportError as err:
        return err


STATUSES = [
    ("KeyboardInterrupt", KeyboardInterrupt(), 130, "interrupted"),
    ("a bug", RuntimeError("boom"), 1, "a bug"),
    ("AssertionError is a bug", AssertionError("x"), 1, "a bug"),
    ("divergence", DivergenceError("Training diverged: lower learning_rate"), 2, "diverged"),
    ("warning turned error", RuntimeWarning("overflow encountered"), 2, "RuntimeWarning"),
    ("permission denied", PermissionError(13, "Permission denied", "/x/codes.npy"), 2,
     "Permission denied"),
    ("disk full", OSError(28, "No space left on device", "/x/codes.npy"), 2, "No space left"),
    ("out of memory", MemoryError(), 2, "out of memory"),
    ("torch out of memory", __import__("torch").OutOfMemoryError("CUDA out of memory."), 2,
     "out of memory"),
    ("torch's CPU allocator", RuntimeError("[enforce fail at alloc_cpu.cpp] "
                                           "DefaultCPUAllocator: can't allocate memory"), 2,
     "out of memory"),
    ("existing output", FileExistsError("/x already exists; pass --overwrite"), 2, "--overwrite"),
    # An output that appeared while the command ran (another fit writing it):
    # refused by the Python API, said in the command line's words.
    ("output appeared meanwhile", FileExistsError("race already exists; pass overwrite=True "
                                                  "to replace it"), 2,
     "error: race already exists; pass --overwrite to replace it"),
    # A missing optional package, named with how to install it, is no bug;
    # an import failing on its own is.
    ("missing optional package", _missing("transformers", "Loading a Hugging Face model "
                                          "needs the 'transformers' package: pip install "
                                          "'sparse_dict[hf]'."), 2, "pip install"),
    ("import error", ModuleNotFoundError("No module named 'sparse_dict.gone'"), 1, "a bug"),
    # A write cut short by a file size limit: said as such, not as a damaged
    # file, nor as "[Errno 27] File too large".
    ("file size limit", OSError(27, "File too large"), 2,
     "error: cannot read or write a file: File too large"),
    ("weights not written", type("SafetensorError", (Exception,), {})(
        "Error while serializing: I/O error: File too large (os error 27)"), 2,
     "error: cannot write the weights file: File too large (os error 27)"),
]


@pytest.mark.parametrize("what,exc,status,words", STATUSES, ids=[s[0] for s in STATUSES])
def test_exit_statuses(work, monkeypatch, capsys, what, exc, status, words):
    monkeypatch.setattr(cli, "cmd_encode", _raises(exc))
    got, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "c.npy"], capsys)
    assert got == status
    assert words in one_line(err)


def test_out_of_memory_names_the_subcommand_s_batch_option(work, monkeypatch, capsys):
    # report has no --batch-size: the advice named it all the same.
    monkeypatch.setattr(cli, "cmd_report", _raises(MemoryError()))
    (work / "t.txt").write_text("to be\n", encoding="utf-8")
    got, _, err = run(["report", work / "dict", work / "t.txt", "-o", work / "r"], capsys)
    assert got == 2
    assert one_line(err).endswith("out of memory; try smaller inputs or a smaller "
                                  "--extract-batch-size")


@pytest.mark.parametrize("exc,status", [(RuntimeError("boom"), 1), (ValueError("boom"), 2)])
def test_traceback_option_shows_the_error(work, monkeypatch, capsys, exc, status):
    # The traceback is added, and the exit status stays what it is without it.
    monkeypatch.setattr(cli, "cmd_encode", _raises(exc))
    got, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", "c.npy", "--traceback"],
                      capsys)
    assert got == status
    assert "Traceback (most recent call last)" in err
    assert f"{type(exc).__name__}: boom\n" in err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("sparse-dict encode: error: ") and "rerun" not in last


def test_an_unknown_option_is_reported_by_its_subcommand(work, capsys):
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", "c.npy", "--bogus",
                          "3"], capsys)
    assert status == 2
    assert one_line(err) == ("sparse-dict encode: error: unrecognized arguments: --bogus 3 "
                             "(see 'sparse-dict encode --help')")
    status, _, err = run(["--bogus"], capsys)
    assert status == 2 and "see 'sparse-dict --help'" in one_line(err)


def test_a_write_refused_by_the_system_is_exit_2(work, monkeypatch, capsys):
    # Root writes anywhere, so the refusal is simulated where the file is placed.
    def refuse(tmp, path, folder):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(_persist, "_create", refuse)
    before = listing(work)
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "c.npy",
                          "-q"], capsys)
    assert status == 2 and "Permission denied" in one_line(err)
    assert listing(work) == before


def test_corrupt_weights_are_exit_2(work, capsys):
    weights = work / "dict" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    status, _, err = run(["encode", work / "dict", work / "acts.npy", "-o", work / "c.npy"],
                         capsys)
    assert status == 2 and "cannot load dictionary" in one_line(err)
    assert not (work / "c.npy").exists()


@pytest.mark.parametrize("how", ["error", "warning"])
def test_a_diverged_fit_is_exit_2_and_never_saved(work, monkeypatch, capsys, how):
    real_fit = SparseAutoencoderDictionary.fit

    def diverging_fit(self, X, y=None):
        if how == "error":
            raise DivergenceError("Training diverged: the loss became NaN at step 3.")
        with warnings.catch_warnings():
            # The deliberately short fit's own not-converged warning is not
            # what this test is about.
            warnings.simplefilter("ignore", ConvergenceWarning)
            real_fit(self, X)
        warnings.warn("Training diverged: the loss rose from 11 to 16404.", RuntimeWarning)
        return self

    monkeypatch.setattr(SparseAutoencoderDictionary, "fit", diverging_fit)
    status, _, err = run(["fit", work / "acts.npy", "-o", work / "new", "--max-iter", "1",
                          "--device", "cpu", "-q"], capsys)
    assert status == 2 and "diverged" in one_line(err)
    assert not (work / "new").exists()


def test_huge_learning_rate_is_exit_2(work, capsys):
    np.save(work / "big.npy", np.load(work / "acts.npy") * np.float32(1e30))
    # Few atoms for the 60 rows: fit's only message is the error.
    status, _, err = run(["fit", work / "big.npy", "-o", work / "new", "--learning-rate", "1e30",
                          "--l1-coef", "0", "--n-components", "3", "--device", "cpu", "-q"],
                         capsys)
    assert status == 2, err
    assert "diverged" in one_line(err) or "learning_rate" in one_line(err)
    assert not (work / "new").exists()


def test_huge_n_components_is_exit_2(work, capsys):
    status, _, err = run(["fit", work / "acts.npy", "-o", work / "new", "--n-components",
                          str(2**40), "--device", "cpu"], capsys)
    assert status == 2 and "smaller n_components" in one_line(err)
    assert not (work / "new").exists()


def test_real_entry_point_reports_interrupt_as_130(work):
    # SIGINT as Ctrl-C sends it, to the real process. raise_signal delivers
    # it to the main thread and handles it before returning: os.kill could
    # hand it to one of torch's threads, and the main thread might notice it
    # only after main had returned (seen once: exit status 0).
    code = (
        "import signal, sys\n"
        "import sparse_dict.cli as cli\n"
        "cli.cmd_encode = lambda args: signal.raise_signal(signal.SIGINT)\n"
        f"sys.exit(cli.main(['encode', {str(work / 'dict')!r}, {str(work / 'acts.npy')!r},"
        f" '-o', {str(work / 'c.npy')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------
# The demo: all or nothing
# --------------------------------------------------------------------------


def test_demo_keeps_its_folder_when_stdout_fails(tmp_path, monkeypatch, capsys):
    # The summary was printed inside the staged block, so a reader that
    # closed the pipe (``sparse-dict demo | head``), or a stdout that cannot
    # encode the folder's name, cost the whole finished folder.
    import io
    import os

    argv = ["demo", "--tiny", "--no-classical", "--no-size-curve", "-q", "--device", "cpu"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", encoding="utf-8") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        status, _, err = run([*argv, "--out", tmp_path / "piped"], capsys)
    monkeypatch.undo()
    # Quiet, as a writer killed by SIGPIPE is, with the shell's status for one.
    assert status == 141 and err == ""
    assert {p.name for p in (tmp_path / "piped").iterdir()} >= {
        "results.json", "results.txt", "features.html", "dictionary"}
    # An ASCII-only stdout (LANG=C, a Windows redirect): the name is escaped.
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    status, _, err = run([*argv, "--out", tmp_path / "d\u00e9mo"], capsys)
    ascii_out.flush()
    assert status == 0, err
    assert (tmp_path / "d\u00e9mo" / "results.json").is_file()
    assert b"d\\xe9mo" in raw.getvalue()
    # Restored for a caller that runs main in its own process.
    assert ascii_out.errors == "strict"


def test_demo_is_all_or_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--tiny", "--no-classical", "-q", "--out", out, "--device", "cpu"]
    status, _, err = run(argv, capsys)
    assert status == 0, err
    first = json.loads((out / "results.json").read_text())
    # A second run refuses without --overwrite, before any work.
    status, _, err = run(argv, capsys)
    assert status == 2 and "--overwrite" in one_line(err)
    # Interrupted late (after the dictionary was written): the old folder stays whole.
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from sparse_dict import _demo

    monkeypatch.setattr(_demo, "_plot_training", interrupt)
    before = listing(tmp_path)
    status, _, err = run([*argv, "--overwrite", "--random-state", "3"], capsys)
    assert status == 130
    assert listing(tmp_path) == before
    assert json.loads((out / "results.json").read_text()) == first
    # A folder of the user's is never replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.txt").write_text("my results")
    status, _, err = run(["demo", "--tiny", "--out", mine, "--overwrite", "-q"], capsys)
    assert status == 2 and "not a sparse-dict demo folder" in one_line(err)
    assert (mine / "results.txt").read_text() == "my results"
    # Beside a page the package wrote, a results.txt of the user's is still
    # the user's: the folder is not the demo's.
    (mine / "features.html").write_bytes((out / "features.html").read_bytes())
    status, _, err = run(["demo", "--tiny", "--out", mine, "--overwrite", "-q"], capsys)
    assert status == 2 and "not a sparse-dict demo folder" in one_line(err)
    assert (mine / "results.txt").read_text() == "my results"


# --------------------------------------------------------------------------
# Ended from outside: SIGTERM cleans up as Ctrl-C does; SIGKILL's remains go
# --------------------------------------------------------------------------


def _extract_until_writing(tmp_path):
    """``extract -o`` in a process of its own, once its hidden rows are on disk."""
    import os
    import time

    corpus = tmp_path / "big.txt"
    corpus.write_text("To be, or not to be, that is the question of the day\n" * 4000,
                      encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_dict", "extract", str(corpus), "-o",
         str(tmp_path / "acts.npy"), "--chunk-texts", "8", "--device", "cpu", "--threads", "1",
         "-q"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # The scratch store's rows: present once the first chunk is written.
    while not list(tmp_path.glob(".acts.npy.*/activations.npy")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    return proc


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path):
    import signal

    proc = _extract_until_writing(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "sparse-dict extract: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_what_a_killed_extract_left_goes_with_the_next_run(tmp_path, capsys):
    proc = _extract_until_writing(tmp_path)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(left) >= 2  # the output's staged file, and the scratch store
    (tmp_path / "small.txt").write_text("To be\n", encoding="utf-8")
    assert main(["extract", str(tmp_path / "small.txt"), "-o", str(tmp_path / "acts.npy"),
                 "--device", "cpu", "-q"]) == 0
    err = capsys.readouterr().err
    assert "left when its process was killed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "acts.npy", "acts.provenance.json", "big.txt", "small.txt"]


@pytest.mark.parametrize("damage", [
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 6), }",  # a negative shape
    b"{'descr': '<f4', 'fortran_order': (False, 'shape",  # cut: numpy's parser fails
])
def test_a_damaged_npy_header_is_exit_2(work, capsys, damage):
    path = work / "bad.npy"
    header = damage.ljust(118) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
                     + b"\x00" * 72)
    status, _, err = run(["fit", path, "-o", work / "d"], capsys)
    assert status == 2 and "is not a readable .npy array" in one_line(err)
