"""The ``sparse-dict`` command line: every subcommand, and every error a user can cause.

Most tests call ``main(argv)`` in-process (fast, and stdout/stderr are
captured by pytest); a few run ``python -m sparse_dict`` in a subprocess to
check the real entry point and that errors print no traceback.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
from sparse_dict import _cli_common
from sparse_dict.cli import build_parser, main, read_texts

TEXTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die, to sleep;",
    "No more; and by a sleep to say we end",
]


@pytest.fixture(scope="module")
def builtin_model(tmp_path_factory):
    """The built-in model, or a small random stand-in while its weights are absent.

    The CLI only needs *a* model of the built-in kind; a random one with a
    small tokenizer keeps these tests independent of the shipped weights.
    """
    from sparse_dict.models import builtin

    try:
        builtin.load_builtin_model()
        yield builtin.BUILTIN_DIR
        return
    except FileNotFoundError:
        pass
    import torch

    from sparse_dict._corpus import load_corpus

    path = tmp_path_factory.mktemp("builtin")
    tok = builtin.BuiltinTokenizer.train(load_corpus("train", n_texts=50, random_state=0),
                                         vocab_size=300)
    torch.manual_seed(0)
    model = builtin.TinyTransformer(
        builtin.TinyTransformerConfig(vocab_size=tok.vocab_size, max_len=64)
    )
    builtin.save_builtin_model(model, tok, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtin, "BUILTIN_DIR", path)
        yield path


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def run(argv, capsys):
    """``main(argv)``: (status, stdout, stderr); argparse's exits count as a status."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("sparse-dict")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["demo"], ["extract"], ["fit"], ["encode"], ["report"]])
def test_help_everywhere(command, capsys):
    status, out, _ = run([*command, "--help"], capsys)
    assert status == 0
    assert out.startswith("usage: sparse-dict")


def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    # The fit parser imports the estimator and torch: seconds at the start.
    import sparse_dict.cli as cli

    def interrupted(command=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["fit", "a.npy", "-o", "d"]) == 130
    assert capsys.readouterr().err == "sparse-dict fit: interrupted\n"


def test_no_command_is_a_one_line_error(capsys):
    status, _, err = run([], capsys)
    assert_one_line_error(status, err, "required")


def test_every_option_has_help():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_help_has_no_markup_and_names_pages_by_their_files():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    helps = [a.help for sub in subparsers.values() for a in sub._actions if a.help]
    for text in helps:
        assert "``" not in text and not re.search(r":\w+:`", text), text
        # A docs page as a path a terminal user can open ("See /scaling" was not).
        assert not re.search(r"\s/\w", text), text
    budget = _options(parser, "fit")["device_data_budget"].help
    assert "docs/gpu.rst" in budget and (Path(__file__).parents[1] / "docs/gpu.rst").exists()


def _options(parser, command):
    sub = parser._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


def _parsed(command, flag, value, name):
    argv = [command, "a.npy", "-o", "d"] if command == "fit" else [command]
    return getattr(build_parser(command).parse_args(argv + [flag, value]), name)


@pytest.mark.parametrize("command", ["fit", "demo"])
def test_every_estimator_parameter_has_a_generated_option(command, capsys):
    """Each constructor parameter (bar callables, verbose and device) is an option of
    fit and demo with the estimator's type, choices and default, shown in --help."""
    import inspect

    from sklearn.utils._param_validation import StrOptions

    from sparse_dict._cli_options import SKIPPED, generated_parameters
    from sparse_dict._demo import _DEMO_ESTIMATOR_DEFAULTS
    from sparse_dict.estimator import SparseAutoencoderDictionary as SAE

    signature = inspect.signature(SAE.__init__).parameters
    expected = [n for n in signature if n != "self" and n not in SKIPPED
                and callable not in SAE._parameter_constraints[n]]
    assert generated_parameters(SAE) == expected
    assert "callback" not in expected  # a callable: no option
    overrides = _DEMO_ESTIMATOR_DEFAULTS if command == "demo" else {"random_state": 0}
    options = _options(build_parser(), command)
    _, help_text, _ = run([command, "--help"], capsys)
    help_text = " ".join(help_text.split())
    for name in expected:
        action = options.get(name)
        assert action is not None, f"{command} has no option for {name}"
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert action.default == overrides.get(name, signature[name].default), name
        assert f"--{name.replace('_', '-')}" in help_text
        shown = f"(default: {action.default})"
        assert shown in help_text, (name, shown)
        # Every word the estimator accepts parses to itself, and a boolean
        # parameter takes true and false.
        flag = action.option_strings[0]
        for constraint in SAE._parameter_constraints[name]:
            if isinstance(constraint, StrOptions):
                for word in constraint.options:
                    assert _parsed(command, flag, word, name) == word, (name, word)
            if constraint == "boolean" and action.nargs != 0:
                assert _parsed(command, flag, "false", name) is False, name


def test_generated_options_parse_and_check_like_the_estimator():
    import inspect

    from sparse_dict.cli import build_parser
    from sparse_dict.estimator import SparseAutoencoderDictionary as SAE

    parser = build_parser("fit")
    args = parser.parse_args(["fit", "a.npy", "-o", "d", "--n-components", "8",
                              "--max-steps", "none", "--no-bf16", "--resample-dead", "false",
                              "--decoder-bias-init", "zeros", "--random-state", "none"])
    assert (args.n_components, args.max_steps, args.bf16) == (8, None, False)
    assert (args.resample_dead, args.decoder_bias_init, args.random_state) == (False, "zeros", None)
    defaults = parser.parse_args(["fit", "a.npy", "-o", "d"])
    assert defaults.random_state == 0  # seeded, like the demo
    signature = inspect.signature(SAE.__init__).parameters
    for name in ("l1_coef", "resample_dead", "bf16", "batch_size"):
        assert getattr(defaults, name) == signature[name].default, name


@pytest.mark.parametrize(
    "option, value, message",
    [("--l1-coef", "-1", "expected a number >= 0"),
     ("--learning-rate", "0", "expected a number > 0"),
     ("--warmup-fraction", "1", "expected a number >= 0 and < 1"),
     ("--n-components", "2.5", "expected an integer >= 1 or 'none'"),
     ("--batch-size", "none", "expected an integer >= 1, got 'none'"),
     ("--decoder-bias-init", "median", "invalid choice"),
     ("--random-state", "x", "expected an integer seed from 0 to 2**32 - 1, or 'none'")],
)
def test_generated_options_reject_bad_values_in_one_line(option, value, message, capsys):
    status, _, err = run(["fit", "a.npy", "-o", "d", option, value], capsys)
    assert_one_line_error(status, err, option, message)


def test_threads_limits_torch_and_blas_during_the_command(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info

    from sparse_dict import cli

    seen = {}

    def probe(args):
        seen["torch"] = torch.get_num_threads()
        seen["blas"] = {pool["num_threads"] for pool in threadpool_info()}
        return 0

    before = torch.get_num_threads()
    monkeypatch.setattr(cli, "cmd_encode", probe)
    assert main(["encode", "d", "a.npy", "-o", "c.npy", "--threads", "1"]) == 0
    assert seen["torch"] == 1
    assert seen["blas"] <= {1}
    assert torch.get_num_threads() == before


def test_help_of_other_commands_does_not_import_torch():
    # The estimator's options are generated from the estimator, which imports
    # torch; only fit and demo need them, so other commands answer at once.
    code = ("import sys\nfrom sparse_dict.cli import main\n"
            "for argv in (['--help'], ['encode', '--help'], ['report', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_console_script_entry_point():
    # The module form runs the same main(); a bad path gives one line, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_dict", "encode", "no-dict", "no.npy", "-o", "c.npy"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sparse_dict", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sparse-dict" in proc.stdout


# --------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------


def test_read_texts_formats(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("one\n\ntwo\nthree\n", encoding="utf-8")
    assert read_texts(plain) == ["one", "two", "three"]
    assert read_texts(plain, "paragraphs") == ["one", "two\nthree"]
    assert read_texts(plain, "whole") == ["one\n\ntwo\nthree"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('"one"\n{"text": "two", "id": 3}\n\n', encoding="utf-8")
    assert read_texts(jsonl) == ["one", "two"]
    # A byte-order mark, as Windows editors write one, is no text.
    for name, body, want in (("b.txt", "one\ntwo\n", ["one", "two"]),
                             ("b.jsonl", '"one"\n', ["one"])):
        marked = tmp_path / name
        marked.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
        assert read_texts(marked) == want
    assert read_texts(tmp_path / "b.txt", "whole") == ["one\ntwo"]


def test_jsonl_records_are_the_texts_exactly(builtin_model, tmp_path):
    # Blank records were dropped and newlines trimmed: the tokens file's
    # "text 1" was record 3, and rows no longer joined back to the records.
    records = ["First text here.", "", "   ", "Fourth record.", "\n\nFifth.\n"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:3])
                     + json.dumps({"text": records[3]}) + "\n\n" + json.dumps(records[4]) + "\n",
                     encoding="utf-8")
    assert read_texts(jsonl) == records
    assert main(["extract", str(jsonl), "-o", str(tmp_path / "acts.npy"), "--tokens",
                 str(tmp_path / "tokens.jsonl"), "--device", "cpu", "-q"]) == 0
    extractor = TransformerActivationExtractor(model="builtin", device="cpu").fit(records)
    expected, index = extractor.transform_with_tokens(records)
    np.testing.assert_allclose(np.load(tmp_path / "acts.npy"), expected, rtol=1e-5, atol=1e-5)
    rows = [json.loads(line) for line in open(tmp_path / "tokens.jsonl", encoding="utf-8")]
    assert [r["text"] for r in rows] == index.text_index.tolist()
    assert [r["token"] for r in rows] == list(index.token)
    assert {r["text"] for r in rows} == {0, 2, 3, 4}  # the empty record has no tokens
    blank = tmp_path / "blank.jsonl"
    blank.write_text('""\n"  "\n', encoding="utf-8")
    with pytest.raises(_cli_common.CLIError, match="contains no text"):
        read_texts(blank)


# --------------------------------------------------------------------------
# The subcommands, chained: extract -> fit -> encode -> report
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(builtin_model, tmp_path_factory):
    """Activations extracted and a dictionary fitted by the CLI itself."""
    folder = tmp_path_factory.mktemp("chain")
    texts = folder / "texts.txt"
    texts.write_text("\n".join(TEXTS * 4) + "\n", encoding="utf-8")
    assert main(["extract", str(texts), "-o", str(folder / "acts.npy"),
                 "--tokens", str(folder / "tokens.jsonl"), "--device", "cpu", "-q"]) == 0
    assert main(["fit", str(folder / "acts.npy"), "-o", str(folder / "dict"),
                 "--n-components", "64", "--max-iter", "2", "--batch-size", "64",
                 "--random-state", "0", "--device", "cpu", "-q"]) == 0
    return folder


def test_extract_writes_activations_and_tokens(fitted):
    acts = np.load(fitted / "acts.npy")
    assert acts.dtype == np.float32 and acts.ndim == 2 and acts.shape[1] == 512
    rows = [json.loads(line) for line in open(fitted / "tokens.jsonl", encoding="utf-8")]
    assert len(rows) == acts.shape[0]
    assert rows[0] == {"text": 0, "position": 0, "token": rows[0]["token"]}
    assert {r["text"] for r in rows} == set(range(len(TEXTS) * 4))


def test_fit_saves_a_loadable_dictionary(fitted):
    from sparse_dict.estimator import SparseAutoencoderDictionary

    sae = SparseAutoencoderDictionary.load(fitted / "dict")
    assert sae.components_.shape == (64, 512)
    assert sae.get_params()["random_state"] == 0


def test_an_output_onto_the_current_folder_is_refused_before_any_work(fitted, tmp_path,
                                                                       monkeypatch, capsys):
    # An empty current folder passed the check, the fit ran to its end, and
    # the finished dictionary could not be moved onto "." (lost, with a
    # message that it had "appeared while this output was being written").
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    trained = []
    monkeypatch.setattr(SparseAutoencoderDictionary, "fit",
                        lambda self, *a, **k: trained.append(1) or self)
    for output in (".", str(here)):
        status, _, err = run(["fit", fitted / "acts.npy", "-o", output, "-q"], capsys)
        assert_one_line_error(status, err, "cannot be moved onto", "name a new folder")
    assert trained == [] and not any(here.iterdir())
    # An empty folder elsewhere is still a fine output.
    (tmp_path / "new").mkdir()
    monkeypatch.undo()
    status, _, err = run(["fit", fitted / "acts.npy", "-o", tmp_path / "new", "--max-steps", "5",
                          "--n-components", "8", "-q"], capsys)
    assert status == 0, err
    assert SparseAutoencoderDictionary.load(tmp_path / "new").n_components_ == 8


def test_encode_matches_transform(fitted, tmp_path, capsys):
    from sparse_dict.estimator import SparseAutoencoderDictionary

    status, _, err = run(["encode", fitted / "dict", fitted / "acts.npy",
                          "-o", tmp_path / "codes.npy", "--chunk-size", "7"], capsys)
    assert status == 0, err
    codes = np.load(tmp_path / "codes.npy")
    expected = SparseAutoencoderDictionary.load(fitted / "dict").transform(
        np.load(fitted / "acts.npy"))
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-6)


def test_report_writes_browser_and_plot(fitted, tmp_path, capsys):
    status, _, err = run(["report", fitted / "dict", _texts(tmp_path), "-o", tmp_path / "report",
                          "--top-k", "3", "--device", "cpu"], capsys)
    assert status == 0, err
    page = (tmp_path / "report" / "features.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Feature" in page
    assert (tmp_path / "report" / "density.png").read_bytes()[:4] == b"\x89PNG"


def test_a_report_that_fails_leaves_the_previous_one_whole(fitted, tmp_path, capsys,
                                                          monkeypatch):
    # The page was moved into place before the plot was drawn: a report that
    # failed on its plot (a full disk) left the new page beside the old plot.
    import errno

    from matplotlib.figure import Figure

    argv = ["report", fitted / "dict", _texts(tmp_path), "-o", tmp_path / "report", "--top-k",
            "3", "--device", "cpu", "-q"]
    status, _, err = run(argv, capsys)
    assert status == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}

    def full(fig, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    status, _, err = run(argv + ["--overwrite", "--title", "NEW RUN"], capsys)
    assert status == 2 and "No space left" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before


def _texts(folder):
    path = Path(folder) / "report_texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def test_fit_refuses_to_overwrite(fitted, capsys):
    status, _, err = run(["fit", fitted / "acts.npy", "-o", fitted / "dict", "-q"], capsys)
    assert_one_line_error(status, err, "already exists", "--overwrite")


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def test_demo_tiny_prints_table_and_writes_every_file(builtin_model, tmp_path, capsys):
    out = tmp_path / "my demo"  # a space, which the printed steer command must quote
    status, stdout, err = run(["demo", "--tiny", "--out", out, "--device", "cpu"], capsys)
    assert status == 0, err
    assert "SparseAutoencoderDictionary" in stdout
    assert "MiniBatchDictionaryLearning" in stdout
    for column in ("explained var", "L0", "dead", "loss recovered", "fit time"):
        assert column in stdout
    for name in ("features.html", "density.png", "training.png", "results.txt",
                 "results.json", "dictionary/config.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["SparseAutoencoderDictionary",
                                              "MiniBatchDictionaryLearning"]
    for r in results:
        assert -1.0 <= r["explained_variance"] <= 1.0
        assert r["l0"] >= 0 and 0 <= r["dead_fraction"] <= 1
        assert r["loss_recovered"] is not None and np.isfinite(r["loss_recovered"])
    # The size curve: one row per size, each a real fit scored on held-out texts.
    curve = json.loads((out / "results.json").read_text())["size_curve"]
    assert [p["n_components"] for p in curve] == [16, 32]
    for p in curve:
        assert 0 < p["explained_variance"] <= 1 and np.isfinite(p["loss_recovered"])
    assert "Size curve" in stdout and "Size curve" in (out / "results.txt").read_text()
    # Progress is shown (on stderr) unless --quiet; each step says its own duration.
    assert "[1/6]" in err
    for number in range(1, 7):
        assert re.search(rf"step {number} took \d+\.\d s", err), number
    # Every bar says what it does, and on which model or set of texts.
    for label in ("Extracting layer0.mlp_post activations of 24 texts (model builtin)",
                  "Extracting layer0.mlp_post activations of 8 texts (model builtin)",
                  "Splicing the sparse autoencoder's reconstruction",
                  "Splicing MiniBatchDictionaryLearning's reconstruction",
                  "OMP coding of "):
        assert label in err, label
    # --tiny says its numbers are a smoke test; the table says which tokens it used.
    assert "smoke test" in stdout
    assert re.search(r"Measured on [\d,]+ tokens of 6 texts of held-out works", stdout)
    # The steering example's command, run as a shell would split it, continues
    # the prompt exactly as the demo printed.
    command = re.search(r"\((sparse-dict steer .*) does the same\)", stdout)
    assert command, stdout
    argv = shlex.split(command.group(1))
    assert argv[2] == str(out / "dictionary") and "--max-new-tokens" in argv
    status, steered, err = run(argv[1:] + ["--device", "cpu", "-q"], capsys)
    assert status == 0, err
    continuation = re.compile(r"with steering: +(.*)")
    assert continuation.search(steered).group(1) == continuation.search(stdout).group(1)


def test_demo_quiet_and_no_classical(builtin_model, tmp_path, capsys):
    status, stdout, err = run(["demo", "--tiny", "--no-classical", "-q", "--out",
                               tmp_path / "d", "--device", "cpu"], capsys)
    assert status == 0
    assert err == ""
    assert "MiniBatchDictionaryLearning" not in stdout


def test_demo_without_size_curve(builtin_model, tmp_path, capsys):
    status, stdout, err = run(["demo", "--tiny", "--no-classical", "--no-size-curve",
                               "--out", tmp_path / "d", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "Size curve" not in stdout and "size curve skipped" in err
    assert json.loads((tmp_path / "d" / "results.json").read_text())["size_curve"] == []
    # --tiny sizes only what was left unset: a value given equal to the
    # default is the user's (it was replaced by the tiny one).
    status, _, err = run(["demo", "--tiny", "--no-classical", "--no-size-curve", "-q",
                          "--max-length", "128", "--n-components", "48",
                          "--out", tmp_path / "e", "--device", "cpu"], capsys)
    assert status == 0, err
    settings = json.loads((tmp_path / "e" / "results.json").read_text())["settings"]
    assert (settings["max_length"], settings["n_components"], settings["n_texts"]) == (128, 48, 24)
    # A length beyond the model's 128 positions is cut to them, and the
    # settings say what was used (they said 100000).
    status, _, err = run(["demo", "--tiny", "--no-classical", "--no-size-curve", "-q",
                          "--max-length", "100000", "--out", tmp_path / "g", "--device", "cpu"],
                         capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "g" / "results.json").read_text())["settings"][
        "max_length"] == 128
    # An abbreviation would be the user's too, unseen by --tiny (it gave 32
    # atoms for "--n-comp 48"): the demo takes options in full only.
    status, _, err = run(["demo", "--tiny", "--n-comp", "48", "--out", tmp_path / "f"], capsys)
    assert_one_line_error(status, err, "unrecognized arguments: --n-comp 48")
    assert not (tmp_path / "f").exists()


def test_demo_s_classical_fit_sees_the_rows_it_reports():
    # Whole batches only: 768 of 1,000 rows were fed, and 1,000 reported.
    from types import SimpleNamespace

    from sklearn.decomposition import MiniBatchDictionaryLearning

    from sparse_dict._demo import _classical_fit

    fed = []
    original = MiniBatchDictionaryLearning.partial_fit

    def counting(self, X, y=None):
        fed.append(len(X))
        return original(self, X)

    args = SimpleNamespace(classical_samples=1000, classical_max_iter=1, classical_alpha=0.3,
                           random_state=0)
    X = np.random.default_rng(0).normal(size=(1200, 8)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MiniBatchDictionaryLearning, "partial_fit", counting)
        _, n, _ = _classical_fit(X, 16, args, False)
    assert n == sum(fed) == 1000


def test_demo_classical_codes_are_computed_once(builtin_model, tmp_path, capsys, monkeypatch):
    """Splicing reuses the OMP codes of the table's tokens instead of coding them again."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    coded = []
    original = MiniBatchDictionaryLearning.transform

    def counting(self, X):
        coded.append(len(X))
        return original(self, X)

    monkeypatch.setattr(MiniBatchDictionaryLearning, "transform", counting)
    status, _, err = run(["demo", "--tiny", "-q", "--out", tmp_path / "d", "--device", "cpu"],
                         capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert sum(coded) > 0
    # Only the table's own tokens were coded: none a second time for splicing.
    assert sum(coded) == results["n_eval_tokens"], coded


# --------------------------------------------------------------------------
# Errors: one line on stderr, status 2, never a traceback
# --------------------------------------------------------------------------


def _npy(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_missing_and_folder_inputs(tmp_path, texts_file, capsys):
    status, _, err = run(["fit", tmp_path / "nope.npy", "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, "does not exist", "nope.npy")
    status, _, err = run(["fit", tmp_path, "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, "is not an activation store", "manifest.json")
    status, _, err = run(["extract", tmp_path / "nope.txt", "-o", tmp_path / "a.npy"], capsys)
    assert_one_line_error(status, err, "texts file", "does not exist")
    status, _, err = run(["report", tmp_path / "nodict", texts_file, "-o", tmp_path], capsys)
    assert_one_line_error(status, err, "dictionary", "does not exist")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path, capsys):
    path = _npy(tmp_path, "acts.npy", np.ones((4, 3), np.float32))
    path.chmod(0)
    status, _, err = run(["fit", path, "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, "not readable")


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.ones(5, np.float32), "expected 2 dimensions"),
        (np.ones((2, 3, 4), np.float32), "expected 2 dimensions"),
        (np.array([["a", "b"]]), "expected numbers"),
        (np.ones((0, 4), np.float32), "empty"),
    ],
)
def test_wrong_shapes_and_types(tmp_path, capsys, array, fragment):
    path = _npy(tmp_path, "acts.npy", array)
    status, _, err = run(["fit", path, "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, fragment)


def test_not_an_npy_file(tmp_path, capsys):
    path = tmp_path / "acts.npy"
    path.write_bytes(b"this is not numpy")
    status, _, err = run(["fit", path, "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, "is not a .npy file")
    # An object array would need unpickling, which is refused.
    obj = np.empty((2, 2), dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    status, _, err = run(["fit", tmp_path / "obj.npy", "-o", tmp_path / "d"], capsys)
    assert_one_line_error(status, err, "not a readable .npy")


def test_bad_texts_files(tmp_path, capsys):
    binary = tmp_path / "t.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    status, _, err = run(["extract", binary, "-o", tmp_path / "a.npy"], capsys)
    assert_one_line_error(status, err, "not UTF-8")
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    status, _, err = run(["extract", empty, "-o", tmp_path / "a.npy"], capsys)
    assert_one_line_error(status, err, "contains no text")
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('"ok"\n{oops\n', encoding="utf-8")
    status, _, err = run(["extract", bad_json, "-o", tmp_path / "a.npy"], capsys)
    assert_one_line_error(status, err, "line 2 is not JSON")


def test_nan_activations_are_refused(tmp_path, capsys):
    X = np.ones((20, 4), np.float32)
    X[3, 1] = np.nan
    status, _, err = run(["fit", _npy(tmp_path, "a.npy", X), "-o", tmp_path / "d",
                          "--device", "cpu", "-q"], capsys)
    assert_one_line_error(status, err, "NaN")


def test_bad_option_values(tmp_path, capsys):
    path = _npy(tmp_path, "a.npy", np.ones((4, 3), np.float32))
    for option in (["--n-components", "0"], ["--l1-coef", "-1"], ["--max-iter", "x"],
                   ["--learning-rate", "nan"]):
        status, _, err = run(["fit", path, "-o", tmp_path / "d", *option], capsys)
        assert_one_line_error(status, err, option[0])
    # A negative seed was numpy's "Seed must be between 0 and 2**32 - 1",
    # naming no option; an option before the command was a missing COMMAND.
    status, _, err = run(["fit", path, "-o", tmp_path / "d", "--random-state", "-3"], capsys)
    assert_one_line_error(status, err, "--random-state", "from 0 to 2**32 - 1")
    status, _, err = run(["steer", tmp_path, "Hi", "--feature", "1", "--strength", "1",
                          "--seed", "-5"], capsys)
    assert_one_line_error(status, err, "--seed", "from 0 to 2**32 - 1")
    status, _, err = run(["steer", tmp_path, "Hi", "--feature", "1", "--strength", "1",
                          "--max-new-tokens", "0"], capsys)
    assert_one_line_error(status, err, "--max-new-tokens")
    status, _, err = run(["--foo"], capsys)
    assert_one_line_error(status, err, "unrecognized arguments: --foo")


def test_encode_names_what_an_unreadable_provenance_costs_it(fitted, tmp_path, capsys):
    # The warning said "the dictionary will not record where its activations
    # came from": fit's consequence, where encode makes no dictionary.
    acts = _npy(tmp_path, "acts.npy", np.ones((5, 512), np.float32))
    (tmp_path / "acts.provenance.json").write_text("{not json")
    status, _, err = run(["encode", fitted / "dict", acts, "-o", tmp_path / "c.npy"], capsys)
    assert status == 0
    assert "is not a provenance file written by 'sparse-dict extract'; it is ignored" in err
    assert "'encode' cannot check it against the dictionary's" in err


def test_encode_wrong_width_and_not_a_dictionary(fitted, tmp_path, capsys):
    narrow = _npy(tmp_path, "narrow.npy", np.ones((5, 7), np.float32))
    status, _, err = run(["encode", fitted / "dict", narrow, "-o", tmp_path / "c.npy"], capsys)
    assert_one_line_error(status, err, "7 features", "512")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    status, _, err = run(["encode", empty_dir, narrow, "-o", tmp_path / "c.npy"], capsys)
    assert_one_line_error(status, err, "cannot load dictionary")
    status, _, err = run(["encode", narrow, narrow, "-o", tmp_path / "c.npy"], capsys)
    assert_one_line_error(status, err, "is not a folder")


def test_report_with_the_wrong_layer_point(fitted, tmp_path, texts_file, capsys):
    # The dictionary was fitted on the MLP, as its provenance (written by
    # extract, recorded by fit) says; the residual stream is another point.
    status, _, err = run(["report", fitted / "dict", texts_file, "-o", tmp_path / "r",
                          "--hook", "resid_post", "--device", "cpu", "-q"], capsys)
    assert_one_line_error(status, err, "layer0.mlp_post", "reads layer0.resid_post")


def test_report_and_steer_of_a_pooled_dictionary(builtin_model, tmp_path, texts_file, capsys):
    # Told to "use pooling='mean'", an option the command line does not have.
    extractor = TransformerActivationExtractor(model="builtin", pooling="mean",
                                               device="cpu").fit(TEXTS)
    pooled = SparseAutoencoderDictionary(n_components=8, max_steps=5, random_state=0,
                                         device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled.fit(extractor.transform(TEXTS * 4), provenance=extractor.provenance())
    pooled.save(tmp_path / "pooled")
    # Over a store too, whose own check came first.
    assert main(["extract", str(texts_file), "--store", str(tmp_path / "store"),
                 "--device", "cpu", "-q"]) == 0
    for argv in (["report", tmp_path / "pooled", texts_file, "-o", tmp_path / "r"],
                 ["report", tmp_path / "pooled", tmp_path / "store", "-o", tmp_path / "r"],
                 ["steer", tmp_path / "pooled", "Hello", "--feature", "0",
                  "--strength", "1"]):
        status, _, err = run(argv + ["--device", "cpu", "-q"], capsys)
        assert_one_line_error(status, err, "fitted on pooled activations (pooling='mean'",
                              f"'{argv[0]}' works with the features of single tokens")
    assert not (tmp_path / "r").exists()


def test_unknown_model_path(tmp_path, texts_file, capsys):
    status, _, err = run(["extract", texts_file, "-o", tmp_path / "a.npy",
                          "--model", tmp_path / "no-model", "-q"], capsys)
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # A typo of 'builtin' is a valid Hub id: the Hub client retried for half a
    # minute offline, printing as it went, before failing.
    for typo in ("buitlin", "Builtin", "built-in"):
        status, _, err = run(["extract", texts_file, "-o", tmp_path / "a.npy",
                              "--model", typo, "-q"], capsys)
        assert_one_line_error(status, err, f"model='{typo}'", "did you mean 'builtin'?")


def test_output_in_a_file_not_a_folder(tmp_path, texts_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = run(["extract", texts_file, "-o", blocker / "a.npy"], capsys)
    assert_one_line_error(status, err, "not a folder")


def test_a_short_fit_warns_in_one_line(tmp_path, capsys):
    acts = tmp_path / "acts.npy"
    # 600 rows: enough for 32 atoms, so the short run is the one warning.
    np.save(acts, np.random.RandomState(0).exponential(size=(600, 16)).astype(np.float32))
    assert main(["fit", str(acts), "-o", str(tmp_path / "d"), "--n-components", "32",
                 "--activation", "topk", "--k", "4", "--max-steps", "10"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("sparse-dict fit: warning: The fit stopped after only 10 steps")
    assert "site-packages" not in err and ".py:" not in err
    assert SparseAutoencoderDictionary.load(tmp_path / "d").activation == "topk"


def test_fit_starts_from_a_dict_init_file(tmp_path, capsys):
    rng = np.random.RandomState(0)
    acts = tmp_path / "acts.npy"
    np.save(acts, rng.exponential(size=(600, 16)).astype(np.float32))
    atoms = rng.standard_normal((32, 16))
    np.save(tmp_path / "atoms.npy", atoms)
    assert main(["fit", str(acts), "-o", str(tmp_path / "d"), "--dict-init",
                 str(tmp_path / "atoms.npy"), "--max-steps", "10", "-q"]) == 0
    loaded = SparseAutoencoderDictionary.load(tmp_path / "d")
    np.testing.assert_array_equal(loaded.dict_init, atoms)
    assert loaded.n_components_ == 32  # from the file's rows
    status, _, err = run(["fit", acts, "-o", tmp_path / "e", "--dict-init",
                          tmp_path / "missing.npy"], capsys)
    assert status == 2 and "--dict-init: no file" in err and "missing.npy" in err
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    status, _, err = run(["fit", acts, "-o", tmp_path / "e", "--dict-init",
                          tmp_path / "objects.npy"], capsys)
    assert status == 2 and "cannot read" in err and "as a .npy array" in err
    # A text file, and a 1-D array: named as what they are.
    (tmp_path / "notes.txt").write_text("my atoms")
    status, _, err = run(["fit", acts, "-o", tmp_path / "e", "--dict-init",
                          tmp_path / "notes.txt"], capsys)
    assert status == 2 and "--dict-init" in err and "is not a .npy file" in err
    np.save(tmp_path / "flat.npy", np.ones(16))
    status, _, err = run(["fit", acts, "-o", tmp_path / "e", "--dict-init",
                          tmp_path / "flat.npy"], capsys)
    assert status == 2 and "shape (16,); expected 2 dimensions (one row per atom)" in err
    assert not (tmp_path / "e").exists()
    status, _, err = run(["fit", acts, "-o", tmp_path / "e", "--dict-init",
                          tmp_path / "atoms.npy", "--n-components", "8", "-q"], capsys)
    assert_one_line_error(status, err, "dict_init has shape (32, 16)")
    assert not (tmp_path / "e").exists()


def test_a_rank_whose_peers_left_on_ctrl_c_says_interrupted(monkeypatch, capsys):
    # Ctrl-C reaches every process of fit --nproc: a rank blocked in a
    # collective saw its peers leave before its own signal came, and printed
    # "error: Data-parallel training stopped ... Connection closed by peer".
    from sparse_dict import cli
    from sparse_dict._torch import RankFailedError

    def peers_left(args):
        raise RankFailedError("Data-parallel training stopped: Connection closed by peer")

    waits = []

    def ctrl_c_while_waiting(seconds):
        waits.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_encode", peers_left)
    args = ["encode", "d", "x.npy", "-o", "c.npy"]
    monkeypatch.setattr(time, "sleep", ctrl_c_while_waiting)
    assert main(args) == cli.EXIT_INTERRUPTED
    assert waits == [cli._INTERRUPT_GRACE_S]
    assert capsys.readouterr().err.strip().endswith("encode: interrupted")
    # Without a Ctrl-C of its own, the peers' failure is said as before.
    monkeypatch.setattr(time, "sleep", waits.append)
    assert main(args) == cli.EXIT_USAGE
    assert "error: Data-parallel training stopped" in capsys.readouterr().err


def test_a_killed_rank_is_named_and_the_others_error_is_no_bug(monkeypatch):
    # Rank 1 killed (SIGKILL): rank 0 stopped with RankFailedError, which
    # was printed as "a bug: please report it", and the launcher blamed
    # rank 0 (status 1), never naming rank 1.
    from sparse_dict import _cli_common
    from sparse_dict._torch import RankFailedError
    from sparse_dict.cli import EXIT_USAGE, _user_error

    message, status = _user_error(RankFailedError("another rank exited"))
    assert status == EXIT_USAGE and "a bug" not in message

    class Finished:
        def __init__(self, status):
            self.returncode = status

        def poll(self):
            return self.returncode

        def wait(self, timeout=None):
            return self.returncode

    statuses = iter([2, -9])  # rank 0 stopped for rank 1, which was killed
    monkeypatch.setattr(_cli_common.subprocess, "Popen",
                        lambda *a, **k: Finished(next(statuses)))
    with pytest.raises(_cli_common.CLIError, match="rank 1 was killed by signal 9"):
        _cli_common._launch_ranks(["fit", "X.npy"], 2)


def test_ranks_run_with_the_interpreter_s_flags(monkeypatch):
    # "python -W error -m sparse_dict fit ... --nproc 2" started its ranks
    # without -W error (nor -X dev, -X utf8): a warning that failed the
    # command with --nproc 1 passed with --nproc 2.
    from sparse_dict import _cli_common

    started = []

    class Finished:
        returncode = 0

        def __init__(self, command, **kwargs):
            started.append(command)

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(_cli_common.subprocess, "Popen", Finished)
    monkeypatch.setattr(sys, "warnoptions", ["error"])
    _cli_common._launch_ranks(["fit", "X.npy"], 2)
    assert len(started) == 2
    for command in started:
        assert command[0] == sys.executable
        assert "-Werror" in command[1:command.index("-m")]
        assert command[command.index("-m"):] == ["-m", "sparse_dict", "fit", "X.npy",
                                                "--nproc", "1"]


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    # "--out=~/d" reaches the program unexpanded (the shell expands "-o ~/d"
    # only): a literal ./~ folder was made, and read back as such.
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    rng = np.random.RandomState(0)
    np.save(home / "acts.npy", rng.exponential(size=(600, 16)).astype(np.float32))
    np.save(home / "atoms.npy", rng.standard_normal((32, 16)))
    assert main(["fit", "~/acts.npy", "--out=~/d", "--dict-init=~/atoms.npy",
                 "--max-steps", "10", "-q"]) == 0
    assert main(["encode", "~/d", "~/acts.npy", "--out=~/codes.npy", "-q"]) == 0
    assert main(["convert", "--from", "sparse_dict", "~/d", "--out=~/lens", "-q"]) == 0
    assert not (elsewhere / "~").exists()
    sae = SparseAutoencoderDictionary.load("~/d")
    assert np.load(home / "codes.npy").shape == (600, 32)
    # And the Python functions, as pandas and Hugging Face take such paths.
    assert sae.save("~/again") == home / "again"
    assert SparseAutoencoderDictionary.load("~/again").n_components_ == 32
    assert sae.to_saelens("~/lens2") == home / "lens2"
    assert SparseAutoencoderDictionary.from_saelens("~/lens").n_components_ == 32
    assert not (elsewhere / "~").exists()
