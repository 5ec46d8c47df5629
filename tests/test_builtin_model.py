"""The built-in 1-layer transformer, its tokenizer and the bundled corpus."""

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dict._corpus import TEST_WORKS, load_corpus
from sparse_dict.models.builtin import (
    BUILTIN_DIR,
    BuiltinTokenizer,
    TinyTransformer,
    TinyTransformerConfig,
    _merge_word,
    load_builtin_model,
)

# Held-out next-token loss of the shipped weights on test-split documents
# must stay below this many nats per token (log(2048) = 7.62 is chance; the
# trained model's full-test-split figure is in training_report.json).
HELDOUT_LOSS_THRESHOLD = 4.5


@pytest.fixture(scope="module")
def builtin():
    return load_builtin_model()


@pytest.fixture(scope="module")
def test_texts():
    return load_corpus("test", n_texts=48, random_state=0)


# ---- the shipped model -------------------------------------------------------


def test_shipped_model_loads_in_reference_shape(builtin):
    model, tok = builtin
    cfg = model.config
    assert not model.training
    assert (cfg.d_model, cfg.d_mlp, cfg.n_layers) == (128, 512, 1)
    assert cfg.vocab_size == tok.vocab_size
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.act, torch.nn.ReLU)
    assert (mlp.fc_in.in_features, mlp.fc_in.out_features) == (128, 512)
    assert (mlp.fc_out.in_features, mlp.fc_out.out_features) == (512, 128)
    assert hasattr(model.blocks[0], "attn")


def test_loading_leaves_torch_s_global_generator_alone():
    # Its layers drew initial weights from it before the saved ones replaced
    # them: a caller's seeded torch.rand gave another number after loading.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_builtin_model()
    assert torch.equal(torch.rand(3), expected)


def test_shipped_files_are_small():
    sizes = {p.name: p.stat().st_size for p in BUILTIN_DIR.iterdir() if p.is_file()}
    assert sizes["model.safetensors"] < 8e6
    report = json.loads((BUILTIN_DIR / "training_report.json").read_text())
    assert report["test_loss"] < report["test_loss_mlp_zero_ablated"]


def test_logits_shape_and_hook_point(builtin):
    model, tok = builtin
    batch = tok(["To be, or not to be", "Alas, poor Yorick!"])
    seen = []
    handle = model.blocks[0].mlp.act.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    B, T = batch["input_ids"].shape
    assert logits.shape == (B, T, tok.vocab_size)
    assert seen[0].shape == (B, T, 512)
    assert (seen[0] >= 0).all()


def test_causal_masking(builtin):
    model, tok = builtin
    ids = torch.tensor([tok.encode("Friends, Romans, countrymen, lend me your ears")])
    changed = ids.clone()
    changed[0, -3:] = torch.tensor(tok.encode(" the king"))[:1]
    with torch.no_grad():
        a, b = model(ids), model(changed)
    k = ids.shape[1] - 3
    torch.testing.assert_close(a[:, :k], b[:, :k])
    assert not torch.allclose(a[:, k:], b[:, k:])


def test_right_padding_leaves_real_token_logits_unchanged(builtin):
    model, tok = builtin
    texts = ["Now is the winter of our discontent", "O Romeo, Romeo!", "Exit."]
    batch = tok(texts)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    with torch.no_grad():
        padded = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, text in enumerate(texts):
            alone = model(torch.tensor([tok.encode(text)]))
            n = alone.shape[1]
            torch.testing.assert_close(padded[row, :n], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()


def test_longer_than_max_len_is_a_clear_error(builtin):
    model, _ = builtin
    ids = torch.zeros((1, model.config.max_len + 1), dtype=torch.long)
    with pytest.raises(ValueError, match="max_len"):
        model(ids)


def test_heldout_loss_below_threshold(builtin, test_texts):
    model, tok = builtin
    batch = tok(test_texts, max_length=model.config.max_len)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    keep = mask[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = losses[keep].mean().item()
    assert loss < HELDOUT_LOSS_THRESHOLD < math.log(tok.vocab_size)


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_builtin"):
        load_builtin_model(path=tmp_path)


def _damaged_copy(tmp_path, name, edit):
    """The shipped model's folder copied to ``tmp_path``, ``name`` edited by ``edit``."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(BUILTIN_DIR / file, folder / file)
    path = folder / name
    if callable(edit):
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(edit)
    return folder


@pytest.mark.parametrize("name, edit, match", [
    ("config.json", lambda c: c.update(n_heads=0), "config.json: field 'n_heads' must be an "
                                                   "integer >= 1, got 0"),
    ("config.json", lambda c: c.update(n_heads=3), "'d_model' \\(128\\) must be a multiple"),
    ("config.json", lambda c: c.update(d_mlp=-5), "field 'd_mlp' must be an integer >= 1"),
    ("config.json", lambda c: c.update(d_model="128"), "field 'd_model' must be an integer"),
    ("config.json", lambda c: c.update(max_len=12.5), "field 'max_len' must be an integer"),
    ("config.json", lambda c: c.update(layer_norm_eps=0), "field 'layer_norm_eps' must be"),
    ("config.json", lambda c: c.update(tie_embeddings=1), "field 'tie_embeddings' must be"),
    ("config.json", lambda c: c.update(foo=1), "config.json: unexpected field 'foo'"),
    ("config.json", lambda c: c.pop("vocab_size"), "field 'vocab_size' is missing"),
    # Weights of another size: named from the header, before the model is
    # built (a huge size was an allocation failure taken for out of memory).
    ("config.json", lambda c: c.update(d_mlp=256), "model.safetensors: tensor "
                                                   "'blocks.0.mlp.fc_in.weight' has shape"),
    ("config.json", lambda c: c.update(d_mlp=10**12), "has shape \\(512, 128\\); "
                                                      "expected \\(1000000000000, 128\\)"),
    ("model.safetensors", b"\x80\x04garbage", "model.safetensors: not a readable safetensors"),
    ("tokenizer.json", lambda t: t.pop("pattern"), "tokenizer.json: field 'pattern' is missing"),
    ("tokenizer.json", lambda t: t.update(pattern="(unclosed"),
     "field 'pattern' is not a regular expression"),
    ("tokenizer.json", lambda t: t["merges"].__setitem__(0, [0, 300]),
     "field 'merges\\[0\\]' must be two token ids below 256"),
    ("tokenizer.json", b"{not json", "tokenizer.json: not valid JSON"),
    ("tokenizer.json", b"[]", "tokenizer.json: expected a JSON object"),
])
def test_a_damaged_model_folder_is_a_value_error_naming_file_and_field(tmp_path, name, edit,
                                                                       match):
    # Such folders failed with ZeroDivisionError, KeyError, torch's
    # "negative dimension" or its list of mismatched parameters, naming no
    # file; the command line called them bugs (exit 1).
    folder = _damaged_copy(tmp_path, name, edit)
    with pytest.raises(ValueError, match=match):
        load_builtin_model(path=folder)


def test_a_model_with_non_finite_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _damaged_copy(tmp_path, "config.json", lambda c: None)
    state = load_file(str(folder / "model.safetensors"))
    state["ln_final.weight"][3] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor 'ln_final.weight' contains NaN"):
        load_builtin_model(path=folder)


def test_random_model_forward_backward():
    torch.manual_seed(0)
    model = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16, n_layers=2))
    ids = torch.randint(0, 300, (3, 16))
    loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- the tokenizer -------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Good night, sweet prince:\nAnd flights of angels sing thee to thy rest!",
        "  leading and  double   spaces\t\ttabs\r\nand CRLF \n\n\n",
        "Ünïcödé — “quotes” and emoji 🎭 and 漢字",
        "numbers 1599 and_underscores __x__ {braces} [Exit.]",
    ],
)
def test_tokenizer_round_trips(builtin, text):
    _, tok = builtin
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_round_trips_corpus_text(builtin, test_texts):
    _, tok = builtin
    for text in test_texts:
        assert tok.decode(tok.encode(text)) == text


def test_tokens_are_readable_words(builtin):
    _, tok = builtin
    ids = tok.encode(" the king")
    assert tok.convert_ids_to_tokens(ids) == [" the", " king"]
    assert tok.convert_ids_to_tokens([tok.pad_token_id]) == ["<pad>"]
    assert tok.decode([*ids, tok.pad_token_id]) == " the king"


def test_tokenizer_batch_padding_and_truncation(builtin):
    _, tok = builtin
    batch = tok(["a b c d e f", "a"], max_length=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids[1, 1:].tolist() == [tok.pad_token_id] * 2
    with pytest.raises(ValueError, match="padding"):
        tok(["a b c", "a"], padding=False)


def test_tokenizer_save_load(builtin, tmp_path):
    _, tok = builtin
    tok.save(tmp_path / "tok.json")
    again = BuiltinTokenizer.load(tmp_path / "tok.json")
    text = "What light through yonder window breaks?"
    assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size


def test_tokenizer_is_fast(builtin):
    _, tok = builtin
    fresh = BuiltinTokenizer(tok.merges)  # empty per-word cache
    texts = load_corpus("train", n_texts=300, random_state=0)
    start = time.perf_counter()
    fresh(texts)
    # About 0.1 s on an idle core; the bound leaves room for a busy machine.
    assert time.perf_counter() - start < 3.0


def _merged_again_and_again(tok, word):
    """The tokens of ``word`` as BPE defines them: every occurrence of the
    adjacent pair of lowest rank merged, then the next, as training merges."""
    symbols = list(word.encode("utf-8"))
    while True:
        ranks = [tok._ranks[p] for p in zip(symbols, symbols[1:]) if p in tok._ranks]
        if not ranks:
            return symbols
        best = min(ranks)
        symbols = _merge_word(symbols, tok.merges[best - 256], best)


_WORDY = st.text(st.sampled_from(list("etaoinshrdlu  ,.'-\n\té漢")), max_size=3000)


@settings(max_examples=40, deadline=None)
@given(text=_WORDY)
def test_tokens_are_those_of_merging_the_lowest_pair_again_and_again(builtin, text):
    # Merges go through a heap (O(n log n) in a word's length) rather than
    # a search of every pair after each merge: the tokens must not change.
    _, tok = builtin
    expected = [i for word in tok._regex.findall(text)
                for i in _merged_again_and_again(tok, word)]
    assert tok.encode(text) == expected


def test_tokens_of_every_word_of_the_corpus_are_unchanged(builtin):
    # The shipped model was trained on these tokens.
    from sparse_dict._corpus import _load_works

    _, tok = builtin
    fresh = BuiltinTokenizer(tok.merges)  # nothing cached
    words = {w for _, text in _load_works() for w in tok._regex.findall(text)}
    for word in words:
        assert fresh._encode_word(word) == _merged_again_and_again(tok, word), word


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200) | st.builds(
    lambda char, n, tail: char * n + tail,
    st.characters(exclude_categories=("Cs",)), st.integers(900, 2600), st.text(max_size=20)))
def test_tokenizer_round_trips_any_text(builtin, text):
    # Words of over 1,000 characters are encoded in pieces: still exactly.
    _, tok = builtin
    assert tok.decode(tok.encode(text)) == text


def test_a_text_cut_to_max_length_is_encoded_only_as_far_as_it_is_kept(builtin, monkeypatch):
    # A text was encoded whole, then cut: 100,000 letters in one word (a
    # blob, a DNA string) took 10 s for 128 tokens, with merges quadratic
    # in the word's length; 20,000 words took as many word encodings.
    _, tok = builtin
    fresh = BuiltinTokenizer(tok.merges)
    blob = "".join(np.random.RandomState(0).choice(list("abcdefghijklmnopqrstuvwxyz"), 100_000))
    prose = "word " * 20_000
    encoded, real = [], fresh._encode_word
    monkeypatch.setattr(fresh, "_encode_word", lambda word: encoded.append(word) or real(word))
    ids = fresh([blob, prose], max_length=128)["input_ids"]
    assert ids.shape == (2, 128)
    assert sum(map(len, encoded)) <= 2_000 and len(encoded) <= 200
    monkeypatch.undo()
    # The first tokens of the whole text, which is encoded in a time linear
    # in its length (the longest piece is 1,000 characters).
    start = time.perf_counter()
    whole = fresh.encode(blob)
    assert time.perf_counter() - start < 3.0  # about 0.06 s on an idle core
    assert ids[0].tolist() == whole[:128]
    assert ids[1].tolist() == tok.encode(prose[:1000])[:128]
    # Words met once in a blob are not kept.
    assert max(map(len, fresh._cache)) <= 64


def test_tokenizer_rejects_non_strings(builtin):
    _, tok = builtin
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


# ---- the corpus ----------------------------------------------------------------


def test_corpus_splits_are_disjoint_and_cover_all():
    train, test = load_corpus("train"), load_corpus("test")
    assert len(train) > 5 * len(test) > 0
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(load_corpus("all"))
    assert len(TEST_WORKS) == 5


def test_corpus_is_repeatable():
    a = load_corpus("train", n_texts=20, random_state=3)
    assert a == load_corpus("train", n_texts=20, random_state=3)
    assert a != load_corpus("train", n_texts=20, random_state=4)
    rng = np.random.RandomState(3)
    assert a == load_corpus("train", n_texts=20, random_state=rng)
    assert load_corpus("test", n_texts=5) == load_corpus("test")[:5]


def test_corpus_min_length_and_content():
    texts = load_corpus("train", min_length=500)
    assert texts and min(map(len, texts)) >= 500
    assert all(isinstance(t, str) and t.strip() for t in load_corpus("test"))
    assert "Gutenberg" not in "".join(load_corpus("all"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "validation"}, "split"),
        ({"n_texts": 10**7}, "n_texts"),
        ({"n_texts": -1}, "n_texts"),
        ({"n_texts": 2.5}, "n_texts"),
    ],
)
def test_corpus_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(**kwargs)


def test_the_tokenizer_s_save_replaces_only_a_tokenizer(builtin, tmp_path):
    # It wrote over any file, and through a symbolic link into its target.
    tokenizer = builtin[1]
    mine = tmp_path / "notes.json"
    mine.write_text("three years of work")
    (tmp_path / "link.json").symlink_to(mine)
    for target in (mine, tmp_path / "link.json"):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="not a built-in tokenizer"):
                tokenizer.save(target, overwrite=overwrite)
    assert mine.read_text() == "three years of work"
    path = tokenizer.save(tmp_path / "tokenizer.json")
    with pytest.raises(FileExistsError):
        tokenizer.save(path)
    tokenizer.save(path, overwrite=True)
    assert BuiltinTokenizer.load(path).encode("Wherefore art thou") == \
        tokenizer.encode("Wherefore art thou")
