"""Tests of the on-disk activation store: extraction to disk, resuming, reading back.

The built-in model (shipped with the package) does the extraction; the
interruptions are real: an exception raised while the texts are read, and a
process killed with SIGKILL in the middle of an extraction.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict._corpus import load_corpus
from sparse_dict.cli import main
from sparse_dict.extraction import ActivationStore, TransformerActivationExtractor, open_store
from sparse_dict.extraction._store import StoreWriter
from sparse_dict.models.builtin import TinyTransformer, TinyTransformerConfig

N_TEXTS = 30
CHUNK = 4
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def texts():
    return load_corpus("train", n_texts=N_TEXTS, random_state=0)


@pytest.fixture(scope="module")
def extractor(texts):
    return TransformerActivationExtractor(max_length=MAX_LENGTH, device="cpu").fit(texts[:1])


@pytest.fixture(scope="module")
def reference(extractor, texts, tmp_path_factory):
    """An extraction to disk that nothing interrupted."""
    path = tmp_path_factory.mktemp("reference") / "store"
    return extractor.transform_to_disk(texts, path, chunk_texts=CHUNK, corpus="corpus train")


def _files(path, manifest=False):
    """The bytes of a store's files (vocab.json only once the store is complete)."""
    names = ("activations.npy", "index.npy", "vocab.json") + (("manifest.json",) * manifest)
    return {name: (Path(path) / name).read_bytes() for name in names
            if (Path(path) / name).exists()}


def _interrupted(texts, after):
    """The texts, until reading text ``after`` raises as Ctrl-C would."""
    for i, text in enumerate(texts):
        if i == after:
            raise KeyboardInterrupt
        yield text


# ---------------------------------------------------------------------------
# What a store holds
# ---------------------------------------------------------------------------


def test_store_holds_the_rows_tokens_and_provenance(reference, extractor, texts):
    acts, where = extractor.transform_with_tokens(texts)
    store = reference
    assert isinstance(store, ActivationStore) and store.complete
    assert store.activations.shape == acts.shape and store.activations.dtype == np.float32
    # Other batches than transform's round differently in the last bits only.
    np.testing.assert_allclose(store.activations, acts, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(store.text_index, where.text_index)
    np.testing.assert_array_equal(store.position, where.position)
    np.testing.assert_array_equal(store.tokens(), where.token)
    assert store.rows_of_texts(3) == int((where.text_index < 3).sum())
    assert store.rows_of_texts(store.n_texts) == store.n_rows
    for bad in (-1, store.n_texts + 1, 1.5, True):
        with pytest.raises(ValueError, match="n_texts must be an integer from 0 to"):
            store.rows_of_texts(bad)
    m = store.manifest
    assert (m["model"], m["layer"], m["hook"], m["corpus"]) == ("builtin", 0, "mlp_post",
                                                                "corpus train")
    assert m["n_tokens"] == m["n_rows"] == acts.shape[0] and m["n_texts"] == N_TEXTS
    assert m["max_length"] == MAX_LENGTH and m["n_features"] == 512
    # The plain .npy reading and open_store see the same rows.
    on_disk = np.load(store.path / "activations.npy", mmap_mode="r")
    np.testing.assert_array_equal(on_disk, store.activations)
    np.testing.assert_array_equal(open_store(store.path).index, store.index)


def test_chunks_of_texts_without_tokens_add_no_rows(extractor, texts, tmp_path):
    # A chunk whose texts are all empty has no rows to write: the store goes
    # on past it (it could never be finished before).
    some = [texts[0], "", texts[1], "", ""]
    store = extractor.transform_to_disk(some, tmp_path / "gaps", chunk_texts=1)
    acts, where = extractor.transform_with_tokens(some)
    assert store.complete and store.manifest["n_texts"] == len(some)
    np.testing.assert_allclose(store.activations, acts, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(store.text_index, where.text_index)
    empty = extractor.transform_to_disk(["", ""], tmp_path / "empty")
    assert empty.complete and empty.activations.shape == (0, 512)


def test_an_open_file_gives_its_lines_without_their_breaks(extractor, texts, tmp_path):
    # Each line's "\n" was a token more at the end of every text.
    # Short, so that no line's end is cut by max_length.
    one_line = [" ".join(text.split()[:5]) for text in texts[:4]]
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(one_line) + "\n", encoding="utf-8")
    with open(lines, encoding="utf-8") as fh:
        store = extractor.transform_to_disk(fh, tmp_path / "s")
    np.testing.assert_allclose(store.activations, extractor.transform(one_line), atol=1e-5)


def test_damaged_token_files_are_named(extractor, texts, tmp_path):
    store = extractor.transform_to_disk(texts[:3], tmp_path / "s")
    (tmp_path / "s" / "vocab.json").write_text("[\"a\", ", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON list of token strings"):
        open_store(tmp_path / "s").tokens()  # was json's own error, naming no file
    store = extractor.transform_to_disk(texts[:3], tmp_path / "t")
    index = np.load(tmp_path / "t" / "index.npy", mmap_mode="r+")
    index[0, -1] = -5  # read as the fifth token from the end of the vocabulary
    index.flush()
    del index, store
    with pytest.raises(ValueError, match=r"index\.npy: token id -5 is below -1"):
        open_store(tmp_path / "t").tokens()
    # A complete store's manifest edited to count fewer rows opened with the
    # rest left out, silently.
    store = extractor.transform_to_disk(texts[:3], tmp_path / "u")
    n_rows = store.n_rows
    del store
    manifest = json.loads((tmp_path / "u" / "manifest.json").read_text())
    manifest["n_rows"] = n_rows - 1
    (tmp_path / "u" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"holds {n_rows} rows where the manifest of the "
                                         rf"complete store counts {n_rows - 1}"):
        open_store(tmp_path / "u")


@pytest.mark.filterwarnings("ignore:The fit stopped after only")
def test_fit_reads_the_store(reference):
    acts = open_store(reference.path).activations
    assert isinstance(acts, np.memmap)
    sae = SparseAutoencoderDictionary(n_components=32, max_iter=1, batch_size=64,
                                      random_state=0, device="cpu")
    sae.fit(acts)
    eager = SparseAutoencoderDictionary(n_components=32, max_iter=1, batch_size=64,
                                        random_state=0, device="cpu").fit(np.array(acts))
    np.testing.assert_array_equal(sae.components_, eager.components_)


def test_pooled_store(texts, tmp_path):
    ext = TransformerActivationExtractor(max_length=MAX_LENGTH, pooling="mean", device="cpu")
    store = ext.transform_to_disk(iter(texts[:9]), tmp_path / "s", chunk_texts=CHUNK)
    np.testing.assert_allclose(store.activations, ext.transform(texts[:9]), atol=1e-5)
    assert store.text_index.tolist() == list(range(9))
    assert (store.position == -1).all() and set(store.tokens().tolist()) == {""}
    assert store.manifest["n_rows"] == 9 and store.manifest["n_tokens"] > 9
    # A text without tokens in the first chunk is refused before the store
    # exists (an empty store was left, which only overwrite could clear).
    with pytest.raises(ValueError, match="Text 1 has no tokens, so it cannot be pooled"):
        ext.transform_to_disk(["a", ""], tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert ext.transform_to_disk(["a", "b"], tmp_path / "p").n_rows == 2
    # In a later chunk, the chunks before it are stored: the message says how
    # to go on from them, and that way works.
    with pytest.raises(ValueError, match="Text 3 has no tokens, so it cannot be pooled. The "
                                         "store keeps the 2 texts before it"):
        ext.transform_to_disk(["a", "b", "c", ""], tmp_path / "q", chunk_texts=2)
    with pytest.warns(UserWarning, match="incomplete"):
        assert open_store(tmp_path / "q").n_texts == 2
    store = ext.transform_to_disk(["a", "b", "c"], tmp_path / "q", chunk_texts=2, resume=True)
    assert store.complete and store.n_rows == 3


# ---------------------------------------------------------------------------
# Interrupted, then resumed
# ---------------------------------------------------------------------------


def test_resumed_after_an_exception_equals_uninterrupted(reference, extractor, texts,
                                                         tmp_path):
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, chunk_texts=CHUNK)
    with pytest.warns(UserWarning, match="incomplete"):
        partial = open_store(path)
    assert not partial.complete and partial.n_texts == 12  # three whole chunks
    np.testing.assert_array_equal(partial.activations,
                                  reference.activations[: partial.n_rows])
    # A crash while a chunk was being written leaves rows (here, garbage)
    # past those the manifest counts; resuming must drop them.
    for name in ("activations.npy", "index.npy"):
        with open(path / name, "ab") as fh:
            fh.write(b"\x7f" * 5000)
    store = extractor.transform_to_disk(iter(texts), path, resume=True, chunk_texts=CHUNK)
    assert store.complete
    assert _files(path) == _files(reference.path)
    keep = ("n_texts", "n_rows", "n_tokens", "texts_sha256", "max_token_id", "complete")
    assert {k: store.manifest[k] for k in keep} == {k: reference.manifest[k] for k in keep}


def test_resumed_after_the_process_was_killed_equals_uninterrupted(reference, texts,
                                                                    tmp_path):
    path = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from sparse_dict._corpus import load_corpus
        from sparse_dict.extraction import TransformerActivationExtractor

        def texts():
            for i, text in enumerate(load_corpus("train", n_texts={N_TEXTS}, random_state=0)):
                if i == 21:  # in the sixth chunk: five are on disk
                    os.kill(os.getpid(), signal.SIGKILL)
                yield text

        ext = TransformerActivationExtractor(max_length={MAX_LENGTH}, device="cpu")
        ext.transform_to_disk(texts(), {str(path)!r}, chunk_texts={CHUNK})
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    with pytest.warns(UserWarning, match="incomplete"):
        partial = open_store(path)
    assert partial.n_texts == 20 and not partial.complete
    ext = TransformerActivationExtractor(max_length=MAX_LENGTH, device="cpu")
    ext.transform_to_disk(texts, path, resume=True, chunk_texts=CHUNK)
    assert _files(path) == _files(reference.path)


def test_resume_refuses_a_store_that_lost_counted_rows(reference, extractor, texts, tmp_path):
    # Resuming grew a file that lost rows with zeros and called it complete.
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, chunk_texts=CHUNK)
    acts = path / "activations.npy"
    os.truncate(acts, acts.stat().st_size - 3 * 4 * reference.activations.shape[1])
    before = _files(path, manifest=True)
    with pytest.raises(ValueError, match="holds fewer rows than its manifest counts"):
        extractor.transform_to_disk(iter(texts), path, resume=True, chunk_texts=CHUNK)
    assert _files(path, manifest=True) == before


def test_a_store_extended_is_incomplete_until_it_ends(reference, extractor, texts, tmp_path):
    path = tmp_path / "store"
    assert extractor.transform_to_disk(texts[:8], path, chunk_texts=CHUNK).complete
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, resume=True,
                                    chunk_texts=CHUNK)
    with pytest.warns(UserWarning, match="incomplete"):
        partial = open_store(path)
    assert partial.n_texts == 12 and not partial.complete
    store = extractor.transform_to_disk(iter(texts), path, resume=True, chunk_texts=CHUNK)
    assert store.complete and _files(path) == _files(reference.path)


def test_a_resume_with_fewer_texts_names_both_corpora(extractor, texts, tmp_path):
    # A texts file split otherwise on resume (--split) gave "The texts end
    # after 1 texts, but 64 were extracted", naming neither.
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, chunk_texts=CHUNK,
                                    corpus="t.txt (split=lines)")
    before = _files(path, manifest=True)
    with pytest.raises(ValueError, match=r"end after 1 text, but 12 texts were extracted "
                                         r".* from 't\.txt \(split=lines\)', and these are "
                                         r"'t\.txt \(split=paragraphs\)'"):
        extractor.transform_to_disk(texts[:1], path, resume=True, chunk_texts=CHUNK,
                                    corpus="t.txt (split=paragraphs)")
    assert _files(path, manifest=True) == before


def test_a_store_extended_from_a_longer_corpus_is_named_by_it(extractor, texts, tmp_path):
    # The manifest, and every dictionary fitted on the store, kept naming
    # the first, shorter file.
    path = tmp_path / "store"
    extractor.transform_to_disk(texts[:8], path, chunk_texts=CHUNK, corpus="part.txt")
    store = extractor.transform_to_disk(texts[:12], path, resume=True, chunk_texts=CHUNK,
                                        corpus="full.txt")
    assert store.complete and store.n_texts == 12
    assert open_store(path).manifest["corpus"] == "full.txt"
    assert store.provenance()["corpus"] == "full.txt"


def test_resume_when_the_first_text_has_no_tokens(extractor, tmp_path):
    # With chunks smaller than the texts done, the first stored text lay past
    # the chunk at hand (an IndexError).
    texts = ["", "To be, or not to be", "that is the question"]
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 2), tmp_path / "s", chunk_texts=1)
    store = extractor.transform_to_disk(texts, tmp_path / "s", chunk_texts=1, resume=True)
    np.testing.assert_allclose(store.activations, extractor.transform(texts), atol=1e-5)


def test_a_file_the_user_put_in_a_store_is_kept(reference, extractor, texts, tmp_path):
    # A README or a Finder's .DS_Store in the folder stopped a resume with the
    # advice to remove the folder, work and all.
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, chunk_texts=CHUNK)
    (path / ".DS_Store").write_bytes(b"finder")
    (path / "notes").mkdir()
    before = _files(path, manifest=True)
    with pytest.raises(FileExistsError, match=r"entries sparse_dict did not write in it "
                                              r"\(.DS_Store, notes\); refusing to replace"):
        extractor.transform_to_disk(texts, path, overwrite=True, chunk_texts=CHUNK)
    assert _files(path, manifest=True) == before
    store = extractor.transform_to_disk(texts, path, resume=True, chunk_texts=CHUNK)
    assert store.complete and _files(path) == _files(reference.path)
    assert (path / ".DS_Store").read_bytes() == b"finder" and (path / "notes").is_dir()


def test_an_incomplete_store_warns_and_a_store_is_not_rows(reference, extractor, texts,
                                                          tmp_path):
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 6), path, chunk_texts=CHUNK)
    with pytest.warns(UserWarning, match="is incomplete: its extraction stopped after 4 texts"):
        open_store(path)
    # The store itself is not the rows; said so, not float()'s TypeError.
    with pytest.raises(TypeError, match=r"pass its activations \(X.activations"):
        SparseAutoencoderDictionary(n_components=8, max_steps=1).fit(reference)
    # A damaged header names its file.
    acts = reference.path / "activations.npy"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("manifest.json", "index.npy", "vocab.json"):
        (damaged / name).write_bytes((reference.path / name).read_bytes())
    (damaged / "activations.npy").write_bytes(b"garbage!" + acts.read_bytes()[8:])
    with pytest.raises(ValueError, match=r"activations.npy does not start with a valid .npy "
                                         r"header .*: the activation store is damaged"):
        open_store(damaged)


def test_the_cli_refuses_an_incomplete_store_s_npy_named_directly(reference, extractor, texts,
                                                                  tmp_path, capsys):
    # Given the folder, an incomplete store was refused; given its
    # activations.npy, the rows were trained on without a word (an
    # interrupted extraction can leave rows the manifest never counted).
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 6), path, chunk_texts=CHUNK)
    for given in (path, path / "activations.npy"):
        assert main(["fit", str(given), "--out", str(tmp_path / "sae"), "--n-components", "8",
                     "--max-steps", "2"]) == 2
        assert "is incomplete" in capsys.readouterr().err
    assert not (tmp_path / "sae").exists()
    # Complete, its file reads as the store's rows.
    store = extractor.transform_to_disk(texts, path, resume=True, chunk_texts=CHUNK)
    assert main(["fit", str(path / "activations.npy"), "--out", str(tmp_path / "sae"),
                 "--n-components", "8", "--max-steps", "2"]) == 0
    assert store.complete
    assert SparseAutoencoderDictionary.load(tmp_path / "sae").n_features_in_ == \
        store.activations.shape[1]


def test_a_users_folder_holding_an_activations_npy_is_not_a_store(extractor, texts, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    np.save(mine / "activations.npy", np.ones((3, 4), np.float32))
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match="is a folder that is not an activation "
                                                  "store; refusing to replace it"):
            extractor.transform_to_disk(texts[:2], mine, **flags)
    np.testing.assert_array_equal(np.load(mine / "activations.npy"), np.ones((3, 4)))
    assert os.listdir(mine) == ["activations.npy"]


def test_resume_refuses_another_extraction(reference, extractor, texts, tmp_path):
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 9), path, chunk_texts=CHUNK)
    before = _files(path, manifest=True)
    other_hook = TransformerActivationExtractor(max_length=MAX_LENGTH, hook="resid_post",
                                                device="cpu")
    with pytest.raises(ValueError, match=r"hook='mlp_post' \(now 'resid_post'\)"):
        other_hook.transform_to_disk(texts, path, resume=True, chunk_texts=CHUNK)
    with pytest.raises(ValueError, match="first 8 texts differ"):
        extractor.transform_to_disk(texts[::-1], path, resume=True, chunk_texts=CHUNK)
    with pytest.raises(ValueError, match="texts end after 5 texts"):
        extractor.transform_to_disk(texts[:5], path, resume=True, chunk_texts=CHUNK)
    with pytest.raises(FileExistsError, match="interrupted extraction"):
        extractor.transform_to_disk(texts, path, chunk_texts=CHUNK)
    with pytest.raises(ValueError, match="pass one of them"):
        extractor.transform_to_disk(texts, path, resume=True, overwrite=True)
    # Every refusal left the store as it was, ready to resume.
    assert _files(path, manifest=True) == before
    # The same hook point named another way resumes: layer -1 of the
    # one-layer model is its layer 0 (refused before, as another layer).
    last = TransformerActivationExtractor(max_length=MAX_LENGTH, layer=-1, device="cpu")
    with pytest.raises(ValueError, match="first 8 texts differ"):
        last.transform_to_disk(texts[::-1], path, resume=True, chunk_texts=CHUNK)
    # Another chunk size resumes too (rows equal to rounding: other batches).
    store = extractor.transform_to_disk(texts, path, resume=True, chunk_texts=7)
    np.testing.assert_allclose(store.activations, reference.activations, atol=1e-5)
    np.testing.assert_array_equal(store.index, reference.index)


def test_resume_refuses_other_weights_under_the_same_name(tmp_path):
    ids = [[int(i) for i in np.random.RandomState(k).randint(0, 300, 6 + k)] for k in range(6)]

    def extractor(seed):
        torch.manual_seed(seed)
        lm = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16))
        return TransformerActivationExtractor(lm, device="cpu")

    with pytest.raises(KeyboardInterrupt):
        extractor(0).transform_to_disk(_interrupted(ids, 4), tmp_path / "s", chunk_texts=2)
    with pytest.raises(ValueError, match="other weights"):
        extractor(1).transform_to_disk(ids, tmp_path / "s", resume=True, chunk_texts=2)
    # Weights a little off (a checkpoint trained on in place) give activations
    # within the re-extracted text's tolerance; the weights' sample tells.
    nudged = extractor(0)
    with torch.no_grad():
        for param in nudged.loaded_model().model.parameters():
            param.mul_(1 + 0.01 * torch.randn(param.shape, generator=torch.Generator()
                                               .manual_seed(param.numel())))
    with pytest.raises(ValueError, match="other weights than this model's"):
        nudged.transform_to_disk(ids, tmp_path / "s", resume=True, chunk_texts=2)
    store = extractor(0).transform_to_disk(ids, tmp_path / "s", resume=True, chunk_texts=2)
    assert store.complete and store.n_rows == sum(min(len(s), 16) for s in ids)
    assert store.tokens()[:2].tolist() == [str(i) for i in ids[0][:2]]


def test_a_writer_reads_the_count_once_it_holds_the_lock(reference, extractor, texts,
                                                         tmp_path, monkeypatch):
    # Another writer finishing between the manifest's first reading and the
    # lock: the count read first cut the finished store back (then unreadable).
    from sparse_dict.extraction import _store

    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extractor.transform_to_disk(_interrupted(texts, 14), path, chunk_texts=CHUNK)
    read, raced = _store._read_manifest, []

    def finished_meanwhile(folder):
        manifest = read(folder)  # the first reading, before the lock
        if not raced:
            raced.append(True)
            extractor.transform_to_disk(iter(texts), path, resume=True, chunk_texts=CHUNK)
        return manifest

    monkeypatch.setattr(_store, "_read_manifest", finished_meanwhile)
    with StoreWriter(path, extractor._store_config(None), resume=True) as writer:
        # Were the writer to stop here (a crash), the finished store would be
        # readable, all its texts done.
        assert raced and writer.n_texts == N_TEXTS
        assert open_store(path).complete and _files(path) == _files(reference.path)


# ---------------------------------------------------------------------------
# Nothing of the user's is replaced
# ---------------------------------------------------------------------------


def test_paths_are_written_only_when_free_or_asked(extractor, texts, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(FileExistsError, match="not a activation store|already exists"):
            extractor.transform_to_disk(texts[:2], mine, **flags)
    assert os.listdir(mine) == ["notes.txt"]
    afile = tmp_path / "file"
    afile.write_text("keep me too")
    with pytest.raises(FileExistsError):
        extractor.transform_to_disk(texts[:2], afile, overwrite=True)
    assert afile.read_text() == "keep me too"
    # An empty folder holds nothing to lose; a store is replaced when asked.
    (tmp_path / "empty").mkdir()
    first = extractor.transform_to_disk(texts[:2], tmp_path / "empty")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        extractor.transform_to_disk(texts[2:4], first.path)
    again = extractor.transform_to_disk(texts[2:4], first.path, overwrite=True)
    np.testing.assert_allclose(again.activations, extractor.transform(texts[2:4]), atol=1e-5)
    # Resuming where nothing is starts afresh.
    assert extractor.transform_to_disk(texts[:2], tmp_path / "new", resume=True).complete


def test_one_writer_at_a_time(extractor, reference, tmp_path, capsys):
    path = tmp_path / "s"
    config = extractor._store_config(None)
    (tmp_path / "t.txt").write_text("to be\n", encoding="utf-8")
    with StoreWriter(path, config):
        with pytest.raises(RuntimeError, match="another process"):
            StoreWriter(path, config, resume=True)
        with pytest.raises(RuntimeError, match="another process"):
            StoreWriter(path, config, overwrite=True)
        # On the command line: a condition to wait out, exit 2, not "a bug".
        capsys.readouterr()
        for flag in ("--resume", "--overwrite"):
            assert main(["extract", str(tmp_path / "t.txt"), "--store", str(path), flag,
                         "--max-length", str(MAX_LENGTH), "--device", "cpu", "-q"]) == 2
            err = capsys.readouterr().err
            assert "is being written by another process" in err and "bug" not in err
    # Released when the writer closes.
    with StoreWriter(path, config, resume=True) as writer:
        assert writer.n_texts == 0


def test_bad_input_is_refused_before_anything_is_written(extractor, tmp_path):
    for bad, error in (("one text", TypeError), ([], ValueError), (["a", 3], TypeError),
                       ({"a": 1}, TypeError)):
        with pytest.raises(error):
            extractor.transform_to_disk(bad, tmp_path / "s")
        assert not (tmp_path / "s").exists()
    with pytest.raises(TypeError, match="element 5"):
        extractor.transform_to_disk(iter(["a"] * 5 + [None]), tmp_path / "t", chunk_texts=2)
    with pytest.raises(ValueError, match="chunk_texts"):
        extractor.transform_to_disk(["a"], tmp_path / "u", chunk_texts=0)
    with pytest.raises(ValueError, match="not an activation store"):
        open_store(tmp_path)


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_extract_to_a_store_fit_and_report(reference, extractor, texts, tmp_path, capsys):
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    store = tmp_path / "acts"
    common = ["--max-length", str(MAX_LENGTH), "--chunk-texts", str(CHUNK), "--device", "cpu",
              "-q"]
    assert main(["extract", str(corpus), "--store", str(store), *common]) == 0
    np.testing.assert_array_equal(open_store(store).activations, reference.activations)
    # A .jsonl file is not split (its records are the texts): none recorded,
    # and one given is refused, not ignored.
    assert open_store(store).manifest["corpus"] == corpus.name
    capsys.readouterr()
    assert main(["extract", str(corpus), "-o", str(tmp_path / "s.npy"), "--split", "whole",
                 *common]) == 2
    assert "--split does not apply to" in capsys.readouterr().err
    assert not (tmp_path / "s.npy").exists()
    assert main(["extract", str(corpus), "--store", str(store), *common]) == 2
    assert "give --resume" in capsys.readouterr().err
    assert main(["extract", str(corpus), "-o", str(tmp_path / "a.npy"), "--resume",
                 *common]) == 2
    assert "--store" in capsys.readouterr().err
    # Resuming a complete store with the same texts changes nothing.
    before = _files(store, manifest=True)
    assert main(["extract", str(corpus), "--store", str(store), "--resume", *common]) == 0
    assert _files(store, manifest=True) == before
    # fit and report take the store where they take activations and texts.
    assert main(["fit", str(store), "-o", str(tmp_path / "dict"), "--n-components", "32",
                 "--max-iter", "1", "--batch-size", "64", "--device", "cpu", "-q"]) == 0
    # The dictionary records the store's provenance, rows counted.
    from sparse_dict import SparseAutoencoderDictionary

    provenance = SparseAutoencoderDictionary.load(tmp_path / "dict").provenance_
    # The store's provenance has the extractor's fields, in the extractor's order.
    from sparse_dict.extraction._extractor import PROVENANCE_FIELDS

    assert tuple(provenance) == PROVENANCE_FIELDS
    assert tuple(extractor.provenance()) == PROVENANCE_FIELDS
    assert (provenance["hook_name"], provenance["n_tokens"], provenance["corpus"]) == (
        "layer0.mlp_post", reference.activations.shape[0], corpus.name)
    # A store's texts were cut and split when extracted: options that would
    # do either are refused, not ignored.
    for option in (["--split", "whole"], ["--max-length", "5"]):
        assert main(["report", str(tmp_path / "dict"), str(store), "-o", str(tmp_path / "r"),
                     *option, "--device", "cpu", "-q"]) == 2
        assert f"{option[0]} does not apply to" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "dict"), str(store), "-o", str(tmp_path / "r"),
                 "--max-texts", "5", "--device", "cpu", "-q"]) == 0
    page = (tmp_path / "r" / "features.html").read_text(encoding="utf-8")
    assert "sparse_dict feature browser" in page
    # More texts than the store holds: all of them.
    assert main(["report", str(tmp_path / "dict"), str(store), "-o", str(tmp_path / "r-all"),
                 "--max-texts", "100000", "--device", "cpu", "-q"]) == 0
    # A dictionary of another hook point of the same width is refused, not
    # paired with the store's activations.
    other = SparseAutoencoderDictionary.load(tmp_path / "dict")
    other.provenance_ = dict(other.provenance_, hook="mlp_out", hook_name="layer0.mlp_out",
                             hook_module="blocks.0.mlp")
    other.save(tmp_path / "other")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "other"), str(store), "-o", str(tmp_path / "r2"),
                 "--device", "cpu", "-q"]) == 2
    assert "layer0.mlp_out" in capsys.readouterr().err
    assert main(["encode", str(tmp_path / "other"), str(store), "-o",
                 str(tmp_path / "codes.npy"), "-q"]) == 2
    assert "layer0.mlp_post" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "codes.npy").exists()
    # An incomplete store is not fitted by mistake.
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    capsys.readouterr()
    assert main(["fit", str(store), "-o", str(tmp_path / "d2"), "-q"]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_cli_extract_to_npy_streams_through_a_store(reference, texts, tmp_path):
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["extract", str(corpus), "-o", str(tmp_path / "a"), "--tokens",
                 str(tmp_path / "t.jsonl"), "--max-length", str(MAX_LENGTH), "--chunk-texts",
                 str(CHUNK), "--device", "cpu", "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "a.provenance.json", "t.jsonl", "texts.jsonl"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), reference.activations)
    rows = [json.loads(line) for line in open(tmp_path / "t.jsonl", encoding="utf-8")]
    assert [[r["text"], r["position"]] for r in rows] == reference.index[:, :2].tolist()
    assert [r["token"] for r in rows] == reference.tokens().tolist()


def test_texts_files_are_read_line_by_line_as_before(tmp_path):
    import re

    from sparse_dict.cli import iter_texts, read_texts

    raw = "a\nb\n\nc\n \t\nd\n\n\n\ne\r\nf\rg\x0ch\u2028i\n"
    path = tmp_path / "t.txt"
    path.write_bytes(raw.encode("utf-8"))
    text = path.read_text(encoding="utf-8")  # newlines translated, as read_texts once read
    expected = {"lines": text.splitlines(), "paragraphs": re.split(r"\n[ \t]*\n", text),
                "whole": [text]}
    for split, pieces in expected.items():
        assert read_texts(path, split) == [t.strip("\n") for t in pieces if t.strip()], split
    texts = iter_texts(path)
    assert next(texts) == "a" and not isinstance(texts, list)


def test_a_json_lines_text_may_hold_a_line_separator(tmp_path):
    from sparse_dict._cli_common import read_texts

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n"
                    + json.dumps("c\u2029d", ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_texts(path, "lines") == ["a\u2028b", "c\u2029d"]
    # The suffix in capitals is JSON lines too (it was read as plain text).
    upper = path.rename(tmp_path / "T.JSONL")
    assert read_texts(upper, "lines") == ["a\u2028b", "c\u2029d"]


def test_a_dictionary_of_an_unnamed_torch_module_needs_model(tmp_path):
    from types import SimpleNamespace

    from sparse_dict._cli_common import CLIError, _make_extractor
    from sparse_dict.extraction._extractor import PROVENANCE_SOURCE

    provenance = {"source": PROVENANCE_SOURCE, "model": None, "layer": 0,
                  "hook": "mlp_post", "max_length": 32}
    args = SimpleNamespace(model=None, layer=None, hook=None, max_length=None,
                           extract_batch_size=8, device="cpu")
    with pytest.raises(CLIError, match="give --model"):
        _make_extractor(args, verbose=0, provenance=provenance)
    args.model = "builtin"
    assert _make_extractor(args, verbose=0, provenance=provenance).model == "builtin"
