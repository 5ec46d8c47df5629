"""SAELens' on-disk format: folders built here from its documented layout.

The expected codes and reconstructions are SAELens' equations written out in
numpy (float64), not taken from this package: for architecture "standard",
"topk" (with and without rescale_acts_by_decoder_norm) and "jumprelu", with
apply_b_dec_to_input true and false, and normalisation folded or not.
"""

import json
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sklearn.exceptions import ConvergenceWarning

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict import _persist
from sparse_dict.cli import main
from sparse_dict.saelens import is_saelens_folder

D_IN, D_SAE, K = 6, 14, 3


def _weights(architecture, seed=0, shared=False):
    rng = np.random.default_rng(seed)
    w = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        # Decoder rows of norms between 0.2 and 3: never unit.
        "W_dec": rng.normal(size=(D_SAE, D_IN)) * rng.uniform(0.2, 3.0, size=(D_SAE, 1)),
        "b_enc": rng.normal(size=D_SAE) * 0.3,
        "b_dec": rng.normal(size=D_IN) * 0.5,
    }
    if architecture == "jumprelu":
        w["threshold"] = np.full(D_SAE, 0.4) if shared else rng.uniform(0.0, 0.8, D_SAE)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _write(folder, architecture, weights, **fields):
    folder.mkdir()
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2",
                     "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3},
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    cfg.update(fields)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def test_fields_saelens_defaults_may_be_left_out(tmp_path):
    # SAELens' SAEConfig defaults apply_b_dec_to_input (True) and
    # normalize_activations ("none"), and loads a cfg.json without them;
    # they were refused here as missing.
    w = _weights("standard")
    x = np.random.default_rng(1).normal(size=(20, D_IN)).astype(np.float32)
    full = SparseAutoencoderDictionary.from_saelens(_write(tmp_path / "full", "standard", w))
    lean = _write(tmp_path / "lean", "standard", w)
    cfg = json.loads((lean / "cfg.json").read_text())
    del cfg["apply_b_dec_to_input"], cfg["normalize_activations"]
    (lean / "cfg.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(
        SparseAutoencoderDictionary.from_saelens(lean).transform(x), full.transform(x))


def _saelens_reference(cfg, w, x, scaling=None):
    """SAELens' encode and decode, from its documented equations, in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    if scaling is not None:  # fold_activation_norm_scaling_factor
        w["W_enc"], w["W_dec"], w["b_dec"] = (
            w["W_enc"] * scaling, w["W_dec"] / scaling, w["b_dec"] / scaling)
    norms = np.linalg.norm(w["W_dec"], axis=1)
    h = (x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if cfg["architecture"] == "standard":
        f = np.maximum(h, 0)
    elif cfg["architecture"] == "jumprelu":
        f = np.maximum(h, 0) * (h > w["threshold"])
    else:
        if rescale:
            h = h * norms
        f = np.zeros_like(h)
        top = np.argsort(-h, axis=1)[:, :K]
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(h, top, 1), 0), 1)

    def decode(f):
        return (f / norms if rescale else f) @ w["W_dec"] + w["b_dec"]

    # This package's codes are against unit-norm atoms.
    unit_codes = f if rescale else f * norms
    return f, decode, unit_codes


CASES = [
    ("standard", {}), ("jumprelu", {}), ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
]


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture, fields", CASES)
def test_from_saelens_reproduces_encode_and_decode(tmp_path, architecture, fields, apply_b_dec):
    w = _weights(architecture)
    fields = dict(fields, apply_b_dec_to_input=apply_b_dec)
    folder = _write(tmp_path / "sae", architecture, w, **fields)
    x = np.random.default_rng(1).normal(size=(40, D_IN))
    f, decode, unit_codes = _saelens_reference(dict(fields, architecture=architecture), w, x)

    est = SparseAutoencoderDictionary.from_saelens(folder, device="cpu")
    codes = est.transform(x)
    np.testing.assert_allclose(codes, unit_codes, atol=1e-5)
    np.testing.assert_array_equal(codes > 0, f > 0)
    np.testing.assert_allclose(est.inverse_transform(codes), decode(f), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1.0, atol=1e-6)
    assert est.activation == {"standard": "relu"}.get(architecture, architecture)
    assert est.provenance_["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"
    assert est.provenance_["apply_b_dec_to_input"] is apply_b_dec


def test_batchtopk_saved_as_jumprelu_with_one_threshold(tmp_path):
    w = _weights("jumprelu", shared=True)
    folder = _write(tmp_path / "sae", "jumprelu", w)
    x = np.random.default_rng(2).normal(size=(30, D_IN))
    f, decode, unit_codes = _saelens_reference({"architecture": "jumprelu"}, w, x)
    est = SparseAutoencoderDictionary.from_saelens(folder)
    assert est.provenance_["shared_threshold"] is True
    np.testing.assert_allclose(est.transform(x), unit_codes, atol=1e-5)
    np.testing.assert_allclose(est.inverse_transform(est.transform(x)), decode(f), atol=1e-5)


@pytest.mark.parametrize("source", ["argument", "activation_scaler.json"])
def test_expected_average_only_in_is_folded(tmp_path, source):
    w = _weights("standard")
    folder = _write(tmp_path / "sae", "standard", w, normalize_activations="expected_average_only_in",
                    apply_b_dec_to_input=False)
    factor = 2.5
    kwargs = {"norm_scaling_factor": factor}
    if source != "argument":
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
        kwargs = {}
    x = np.random.default_rng(3).normal(size=(30, D_IN))
    cfg = {"architecture": "standard", "apply_b_dec_to_input": False}
    f, decode, unit_codes = _saelens_reference(cfg, w, x, scaling=factor)
    est = SparseAutoencoderDictionary.from_saelens(folder, **kwargs)
    np.testing.assert_allclose(est.transform(x), unit_codes, atol=1e-5)
    np.testing.assert_allclose(est.inverse_transform(est.transform(x)), decode(f), atol=1e-5)
    # Unfolded, the same SAE would give other codes: the fold mattered.
    assert not np.allclose(_saelens_reference(cfg, w, x)[2], unit_codes, atol=1e-3)


def test_expected_average_only_in_without_a_factor_warns_and_is_used_as_is(tmp_path):
    w = _weights("standard")
    folder = _write(tmp_path / "sae", "standard", w, normalize_activations="expected_average_only_in")
    x = np.random.default_rng(4).normal(size=(20, D_IN))
    with pytest.warns(UserWarning, match="no scaling factor is known"):
        est = SparseAutoencoderDictionary.from_saelens(folder)
    np.testing.assert_allclose(est.transform(x), _saelens_reference(
        {"architecture": "standard"}, w, x)[2], atol=1e-5)
    # Written back, the folder still says its inputs are scaled (it said
    # "none", as if raw activations were what its weights expect).
    written = json.loads((est.to_saelens(tmp_path / "back") / "cfg.json").read_text())
    assert written["normalize_activations"] == "expected_average_only_in"
    factor = SparseAutoencoderDictionary.from_saelens(folder, norm_scaling_factor=2.0)
    written = json.loads((factor.to_saelens(tmp_path / "folded") / "cfg.json").read_text())
    assert written["normalize_activations"] == "none"


def test_a_provenance_set_by_hand_is_saved_with_numpy_numbers_or_named(tmp_path):
    # np.int64 failed save and to_saelens with "Object of type int64 is not
    # JSON serializable", naming no field.
    est = SparseAutoencoderDictionary.from_saelens(_write(tmp_path / "sae", "standard",
                                                          _weights("standard")))
    est.provenance_ = {"metadata": {"hook_layer": np.int64(3), "model_name": "gpt2",
                                    "scales": np.array([1.0, 2.0])}}
    loaded = SparseAutoencoderDictionary.load(est.save(tmp_path / "d"))
    assert loaded.provenance_["metadata"]["hook_layer"] == 3
    back = SparseAutoencoderDictionary.from_saelens(est.to_saelens(tmp_path / "s"))
    assert back.provenance_["metadata"]["hook_layer"] == 3
    est.provenance_ = {"metadata": {"hook_layer": np.nan}}
    for write in (est.save, est.to_saelens):
        with pytest.raises(ValueError, match=r"provenance_\['metadata'\]\['hook_layer'\]"):
            write(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_cli_convert_takes_the_scaling_factor_and_an_omp_dictionary(tmp_path, capsys):
    w = _weights("standard")
    folder = _write(tmp_path / "sae", "standard", w, normalize_activations="expected_average_only_in")
    x = np.random.default_rng(4).normal(size=(20, D_IN))
    assert main(["convert", "--from", "saelens", str(folder), "-o", str(tmp_path / "sd"),
                 "--norm-scaling-factor", "2.5"]) == 0
    assert "no scaling factor" not in capsys.readouterr().err
    expected = SparseAutoencoderDictionary.from_saelens(folder, norm_scaling_factor=2.5)
    # (Equal on a CPU; a GPU's products round differently from call to call.)
    np.testing.assert_allclose(SparseAutoencoderDictionary.load(tmp_path / "sd").transform(x),
                               expected.transform(x), rtol=1e-12, atol=1e-12)
    # Without it, the warning names the command line's option.
    assert main(["convert", "--from", "saelens", str(folder), "-o", str(tmp_path / "sd2")]) == 0
    assert "'convert --norm-scaling-factor'" in capsys.readouterr().err
    # It means nothing for a saved dictionary, whose units include any scaling.
    assert main(["convert", "--from", "sparse_dict", str(tmp_path / "sd"), "-o",
                 str(tmp_path / "back"), "--norm-scaling-factor", "2"]) == 2
    assert "--norm-scaling-factor is for --from saelens" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()
    # A dictionary saved with OMP coding goes out with its encoder's codes, said so;
    # the saved folder is left as it was.
    SparseAutoencoderDictionary.load(tmp_path / "sd").set_params(
        transform_algorithm="omp", transform_n_nonzero_coefs=2).save(tmp_path / "omp")
    before = (tmp_path / "omp" / "config.json").read_bytes()
    assert main(["convert", "--from", "sparse_dict", str(tmp_path / "omp"), "-o",
                 str(tmp_path / "back")]) == 0
    assert "SAELens codes with the encoder only" in capsys.readouterr().err
    np.testing.assert_allclose(SparseAutoencoderDictionary.from_saelens(tmp_path / "back")
                               .transform(x), expected.transform(x), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "omp" / "config.json").read_bytes() == before


def _fitted(activation, **kw):
    X = np.random.default_rng(5).normal(size=(300, D_IN)) @ np.random.default_rng(6).normal(
        size=(D_IN, D_IN))
    est = SparseAutoencoderDictionary(n_components=D_SAE, activation=activation, max_steps=60,
                                      random_state=0, device="cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # short on purpose
        est.fit(X)
    return est, X


@pytest.mark.parametrize("activation, kw, architecture", [
    ("relu", {}, "standard"), ("topk", {"k": K}, "topk"),
    ("batchtopk", {"k": K}, "jumprelu"), ("jumprelu", {}, "jumprelu"),
])
def test_round_trip_through_saelens_format_is_exact(tmp_path, activation, kw, architecture):
    est, X = _fitted(activation, **kw)
    folder = est.to_saelens(tmp_path / "out")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    # What SAELens would compute from the written folder equals transform.
    w = load_file(str(folder / "sae_weights.safetensors"))
    f, decode, _ = _saelens_reference(cfg, w, X)
    np.testing.assert_allclose(est.transform(X), f, atol=1e-4)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X)), decode(f), atol=1e-4)

    # On the CPU, as est: a GPU's arithmetic differs in the last bits.
    back = SparseAutoencoderDictionary.from_saelens(folder, device="cpu")
    for name in ("components", "encoder_weights", "encoder_bias", "decoder_bias"):
        np.testing.assert_array_equal(getattr(back, name + "_"), getattr(est, name + "_"))
    np.testing.assert_array_equal(back.transform(X), est.transform(X))
    np.testing.assert_array_equal(back.inverse_transform(est.transform(X)),
                                  est.inverse_transform(est.transform(X)))


def test_imported_topk_goes_back_out_with_its_norms(tmp_path):
    w = _weights("topk")
    est = SparseAutoencoderDictionary.from_saelens(_write(tmp_path / "a", "topk", w))
    assert not np.allclose(est.selection_scale_, 1.0)
    folder = est.to_saelens(tmp_path / "b")
    w2 = load_file(str(folder / "sae_weights.safetensors"))
    x = np.random.default_rng(7).normal(size=(30, D_IN))
    f1, dec1, _ = _saelens_reference({"architecture": "topk"}, w, x)
    f2, dec2, _ = _saelens_reference({"architecture": "topk"}, w2, x)
    np.testing.assert_allclose(f2, f1, atol=1e-5)
    np.testing.assert_allclose(dec2(f2), dec1(f1), atol=1e-5)


def test_provenance_survives_save_and_load(tmp_path):
    est = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "sae", "jumprelu", _weights("jumprelu")))
    est.save(tmp_path / "saved")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "saved")
    assert loaded.provenance_ == est.provenance_
    assert loaded.provenance_["metadata"]["model_name"] == "gpt2"
    loaded.to_saelens(tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    assert meta["hook_layer"] == 3 and "sparse_dict_version" in meta
    # Refitted, it is a new dictionary: no provenance, no selection scale left over.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        loaded.set_params(activation="relu", max_steps=5).fit(
            np.random.default_rng(9).normal(size=(50, D_IN)))
    assert not hasattr(loaded, "provenance_") and not hasattr(loaded, "threshold_")


def test_an_extractors_provenance_goes_through_saelens_and_back(tmp_path):
    # A dictionary of the built-in model's activations, converted to SAELens
    # and back, still knows its model and hook point (report and steer need
    # no --model/--layer then), and still refuses another hook point.
    from sparse_dict import TransformerActivationExtractor
    from sparse_dict.analysis import check_compatible
    from sparse_dict.extraction._extractor import PROVENANCE_SOURCE
    from sparse_dict.saelens import _EXTRACTOR_SOURCE

    assert _EXTRACTOR_SOURCE == PROVENANCE_SOURCE
    ext = TransformerActivationExtractor("builtin", device="cpu", max_length=16).fit(["to be"])
    X = np.random.default_rng(0).normal(size=(80, 512)).astype(np.float32)
    sae = SparseAutoencoderDictionary(n_components=16, activation="topk", k=4, max_steps=3,
                                      random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X, provenance=ext.provenance(corpus="noise"))
    meta = json.loads((sae.to_saelens(tmp_path / "sae") / "cfg.json").read_text())["metadata"]
    assert meta["sparse_dict_provenance"] == sae.provenance_ and meta["context_size"] == 16
    # Where SAELens and Neuronpedia read the model and hook (they went out
    # empty); what a user gives in provenance_["metadata"] would win.
    assert (meta["model_name"], meta["hook_name"]) == ("builtin", "layer0.mlp_post")
    back = SparseAutoencoderDictionary.from_saelens(tmp_path / "sae")
    assert back.provenance_ == sae.provenance_
    check_compatible(ext, back)
    other = TransformerActivationExtractor("builtin", device="cpu", hook="resid_post").fit(["a"])
    with pytest.raises(ValueError, match="reads layer0.resid_post"):
        check_compatible(other, back)
    # Round trip again: the same record, not one nested in another.
    back.to_saelens(tmp_path / "again")
    assert SparseAutoencoderDictionary.from_saelens(tmp_path / "again").provenance_ == (
        sae.provenance_)
    # A damaged record is named (in a folder as SAELens would save it again:
    # without this package's checksum).
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["sha256"]
    cfg["metadata"]["sparse_dict_provenance"] = [1, 2]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="metadata.sparse_dict_provenance"):
        SparseAutoencoderDictionary.from_saelens(tmp_path / "sae")


def test_old_topk_folders_without_selection_scale_still_load(tmp_path):
    est, X = _fitted("topk", k=K)
    est.save(tmp_path / "saved")
    weights = tmp_path / "saved" / "weights.safetensors"
    tensors = load_file(str(weights))
    del tensors["selection_scale"]
    save_file(tensors, str(weights))
    # Checksummed anew, as a folder saved before selection_scale existed was.
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["sha256"]["weights"] = _persist._digest_file(weights)
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    loaded = SparseAutoencoderDictionary.load(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.selection_scale_, 1.0)
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))


def test_to_saelens_refuses_what_saelens_cannot_express(tmp_path):
    est, _ = _fitted("relu")
    est.set_params(transform_algorithm="omp")
    with pytest.raises(ValueError, match="transform_algorithm='omp' cannot be written"):
        est.to_saelens(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_to_saelens_never_replaces_a_users_folder(tmp_path):
    est, _ = _fitted("relu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        est.to_saelens(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    est.to_saelens(tmp_path / "out")
    est.to_saelens(tmp_path / "out", overwrite=True)  # its own output may be replaced


def _damage(folder, what):
    cfg_file, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    cfg = json.loads(cfg_file.read_text())
    if what == "weights":
        weights.write_bytes(weights.read_bytes()[:50])
        return "sae_weights.safetensors: not a readable safetensors file"
    if what == "missing-weights":
        weights.unlink()
        return "sae_weights.safetensors is missing"
    if what == "nan":
        t = load_file(str(weights))
        t["b_enc"][0] = np.nan
        save_file(t, str(weights))
        return "tensor 'b_enc' contains NaN"
    if what == "shape":
        t = load_file(str(weights))
        t["W_enc"] = t["W_enc"][:, :-1].copy()
        save_file(t, str(weights))
        return "tensor 'W_enc' has shape"
    if what == "extra-tensor":
        t = load_file(str(weights))
        t["scaling_factor"] = np.ones(D_SAE, dtype=np.float32)
        save_file(t, str(weights))
        return "unexpected tensor 'scaling_factor'"
    if what == "json":
        cfg_file.write_text("{not json")
        return "cfg.json: not valid JSON"
    edits = {
        "architecture": ({"architecture": "gated"}, "'architecture' is 'gated', which sparse_dict"),
        "unknown-arch": ({"architecture": "quantum"}, "'architecture' is 'quantum', unknown"),
        "field": ({"finetuning_scaling_factor": True}, "unexpected field 'finetuning_scaling_factor'"),
        "d_sae": ({"d_sae": "14"}, "field 'd_sae' must be an integer"),
        "norm": ({"normalize_activations": "layer_norm"}, "'normalize_activations' is 'layer_norm'"),
        "norm-unknown": ({"normalize_activations": "magic"}, "'normalize_activations' must be one of"),
        "bool": ({"apply_b_dec_to_input": "yes"}, "'apply_b_dec_to_input' must be bool"),
        "k": ({"k": 99}, "field 'k' \\(99\\) exceeds 'd_sae'"),
        "dtype": ({"dtype": "int8"}, "field 'dtype' must be one of"),
        "old": ({"metadata": {"sae_lens_version": "5.9.1"}}, "only the SAELens 6 layout is read"),
    }
    change, message = edits[what]
    cfg.update(change)
    cfg_file.write_text(json.dumps(cfg))
    return message


@pytest.mark.parametrize("what", [
    "weights", "missing-weights", "nan", "shape", "extra-tensor", "json", "architecture",
    "unknown-arch", "field", "d_sae", "norm", "norm-unknown", "bool", "k", "dtype", "old",
])
def test_damaged_folders_give_value_error(tmp_path, what):
    folder = _write(tmp_path / "sae", "topk", _weights("topk"))
    message = _damage(folder, what)
    with pytest.raises(ValueError, match=message):
        SparseAutoencoderDictionary.from_saelens(folder)


def test_cli_convert_both_ways_and_report_reads_a_saelens_folder(tmp_path, capsys):
    folder = _write(tmp_path / "sae", "jumprelu", _weights("jumprelu"))
    assert is_saelens_folder(folder) and not is_saelens_folder(tmp_path)
    x = np.random.default_rng(8).normal(size=(25, D_IN)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)

    assert main(["convert", "--from", "saelens", str(folder), "-o", str(tmp_path / "sd")]) == 0
    est = SparseAutoencoderDictionary.load(tmp_path / "sd")
    assert main(["convert", "--from", "sparse_dict", str(tmp_path / "sd"),
                 "-o", str(tmp_path / "back")]) == 0
    back = SparseAutoencoderDictionary.from_saelens(tmp_path / "back")
    np.testing.assert_allclose(back.transform(x), est.transform(x), atol=1e-6)
    # A format mismatch and an existing output are one-line errors.
    assert main(["convert", "--from", "sparse_dict", str(folder), "-o", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["convert", "--from", "saelens", str(folder), "-o", str(tmp_path / "sd")]) == 2
    # The command's own option named, in both directions.
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["convert", "--from", "sparse_dict", str(tmp_path / "sd"),
                 "-o", str(tmp_path / "back")]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    # The output may never be the input, even with --overwrite; both survive.
    before = sorted(p.name for p in folder.iterdir())
    for source, fmt in ((folder, "saelens"), (tmp_path / "sd", "sparse_dict")):
        assert main(["convert", "--from", fmt, str(source), "-o", str(source),
                     "--overwrite"]) == 2
        assert "is the input" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before
    np.testing.assert_array_equal(SparseAutoencoderDictionary.load(tmp_path / "sd").transform(x),
                                  est.transform(x))

    # encode (and report, through the same loader) take the SAELens folder itself.
    assert main(["encode", str(folder), str(tmp_path / "acts.npy"),
                 "-o", str(tmp_path / "codes.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "codes.npy"), est.transform(x), atol=1e-6)


def test_imported_topk_trains_on_with_its_selection_scale(tmp_path):
    est = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "sae", "topk", _weights("topk")), device="cpu")
    scale = est.selection_scale_.copy()
    x = np.random.default_rng(10).normal(size=(64, D_IN)).astype(np.float32)
    est.partial_fit(x)
    # The training step chose on pre * selection_scale: the scale is kept, and
    # codes still have at most k active features.
    np.testing.assert_allclose(est.selection_scale_, scale, rtol=1e-6)
    assert ((est.transform(x) > 0).sum(axis=1) <= K).all()
    assert np.isfinite(est.components_).all()


def test_frequencies_are_unknown_without_the_sparsity_file(tmp_path):
    # Not zeros: a feature at 0 reads as dead.
    est = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "sae", "standard", _weights("standard")), device="cpu")
    assert est.feature_frequencies_.shape == (D_SAE,)
    assert np.isnan(est.feature_frequencies_).all()
    est.save(tmp_path / "saved")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "saved")
    assert np.isnan(loaded.feature_frequencies_).all()
    x = np.random.default_rng(3).normal(size=(64, D_IN)).astype(np.float32)
    loaded.partial_fit(x)
    assert np.isfinite(loaded.feature_frequencies_).all()
    assert loaded.feature_frequencies_.max() > 0


def test_topk_use_sparse_activations_is_read_and_checked(tmp_path):
    w = _weights("topk")
    x = np.random.default_rng(1).normal(size=(40, D_IN))
    plain = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "plain", "topk", w), device="cpu")
    sparse = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "sparse", "topk", w, use_sparse_activations=True), device="cpu")
    np.testing.assert_array_equal(sparse.transform(x), plain.transform(x))
    _write(tmp_path / "bad", "topk", w, use_sparse_activations="yes")
    with pytest.raises(ValueError, match="use_sparse_activations"):
        SparseAutoencoderDictionary.from_saelens(tmp_path / "bad", device="cpu")
    _write(tmp_path / "relu", "standard", _weights("standard"), use_sparse_activations=False)
    with pytest.raises(ValueError, match="unexpected field 'use_sparse_activations'"):
        SparseAutoencoderDictionary.from_saelens(tmp_path / "relu", device="cpu")


def test_imported_dictionaries_code_with_every_transform_algorithm(tmp_path):
    # Their training L0 is unknown: OMP needs its budget said, the others
    # do not use one.
    est = SparseAutoencoderDictionary.from_saelens(
        _write(tmp_path / "sae", "standard", _weights("standard")), device="cpu")
    x = np.random.default_rng(4).normal(size=(20, D_IN)).astype(np.float32)
    for algorithm in ("lasso_lars", "lasso_cd", "threshold"):
        codes = est.set_params(transform_algorithm=algorithm, transform_alpha=0.01).transform(x)
        assert codes.shape == (20, D_SAE) and np.isfinite(codes).all()
    est.set_params(transform_algorithm="omp")
    with pytest.raises(ValueError, match="set transform_n_nonzero_coefs"):
        est.transform(x)
    est.set_params(transform_n_nonzero_coefs=2)
    assert (est.transform(x) > 0).sum(axis=1).max() <= 2


def test_a_folder_of_the_other_layout_is_named_as_such(tmp_path):
    sae, _ = _fitted("relu")
    sae.save(tmp_path / "ours")
    sae.to_saelens(tmp_path / "theirs")
    with pytest.raises(ValueError, match=r"cfg\.json is missing.*It holds config\.json: a "
                                         r"folder that SparseAutoencoderDictionary\.save wrote"):
        SparseAutoencoderDictionary.from_saelens(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"config\.json is missing.*It holds cfg\.json: a "
                                         r"folder in SAELens' layout, which "
                                         r"SparseAutoencoderDictionary\.from_saelens reads"):
        SparseAutoencoderDictionary.load(tmp_path / "theirs")
    # A folder of neither gets no such hint.
    (tmp_path / "neither").mkdir()
    with pytest.raises(ValueError, match=r"is missing or not a file\.$"):
        SparseAutoencoderDictionary.load(tmp_path / "neither")


# A dead feature (0), rare ones and one that always fires (log10 = 0).
FREQUENCIES = np.r_[0.0, np.geomspace(1e-7, 1.0, D_SAE - 1)]


def _write_ours(folder, frequencies=FREQUENCIES, **kw):
    """A folder as to_saelens writes it, with ``frequencies`` (write_saelens itself)."""
    from sparse_dict.saelens import write_saelens

    est, _ = _fitted("relu")
    return write_saelens(folder, est.activation, est.k, est._fitted_tensors(),
                         frequencies=frequencies, **kw)


def test_known_frequencies_go_out_in_sparsity_safetensors_and_back(tmp_path):
    folder = _write_ours(tmp_path / "sae")
    # SAELens' layout: one tensor, log10 of the frequencies; the dead feature
    # at SAELens' floor, -10, since 0 has no logarithm.
    sparsity = load_file(str(folder / "sparsity.safetensors"))
    assert list(sparsity) == ["sparsity"] and sparsity["sparsity"].shape == (D_SAE,)
    assert sparsity["sparsity"][0] == -10.0
    np.testing.assert_allclose(10.0 ** sparsity["sparsity"][1:], FREQUENCIES[1:], rtol=1e-12)
    back = SparseAutoencoderDictionary.from_saelens(folder, device="cpu")
    np.testing.assert_allclose(back.feature_frequencies_, FREQUENCIES, rtol=1e-12, atol=0)
    assert back.feature_frequencies_[0] == 0.0  # dead, not 1e-10
    # Unknown frequencies write no file, and come back unknown.
    unknown = _write_ours(tmp_path / "unknown", np.full(D_SAE, np.nan))
    assert sorted(p.name for p in unknown.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert np.isnan(SparseAutoencoderDictionary.from_saelens(unknown).feature_frequencies_).all()


def test_saelens_own_dead_features_read_as_zero(tmp_path):
    # SAELens saves log10(frequency + 1e-10) in float32: -10.000001 for a
    # feature that never fired.
    folder = _write(tmp_path / "sae", "standard", _weights("standard"))
    log10 = np.log10(FREQUENCIES.astype(np.float32) + np.float32(1e-10))
    save_file({"sparsity": log10}, str(folder / "sparsity.safetensors"))
    read = SparseAutoencoderDictionary.from_saelens(folder).feature_frequencies_
    assert read[0] == 0.0
    np.testing.assert_allclose(read[1:], FREQUENCIES[1:], rtol=1e-3)
    # A feature that fired on every token, in float64: just above 0.
    everywhere = np.log10(np.r_[1.0, FREQUENCIES[1:]] + 1e-10)
    assert everywhere[0] > 0
    save_file({"sparsity": everywhere}, str(folder / "sparsity.safetensors"))
    read = SparseAutoencoderDictionary.from_saelens(folder).feature_frequencies_
    assert read[0] == 1.0 and (read <= 1).all()


def test_sparsity_safetensors_is_part_of_the_folder_written(tmp_path):
    folder = _write_ours(tmp_path / "sae")
    # Its own output, sparsity file and all, may be replaced.
    _write_ours(folder, FREQUENCIES[::-1], overwrite=True)
    np.testing.assert_allclose(SparseAutoencoderDictionary.from_saelens(folder)
                               .feature_frequencies_, FREQUENCIES[::-1], rtol=1e-12)
    # Damaged, or gone: named, as for the weights.
    sparsity = folder / "sparsity.safetensors"
    save_file({"sparsity": np.full(D_SAE, -1.0)}, str(sparsity))
    with pytest.raises(ValueError, match="sparsity.safetensors: the file changed after it "
                                         "was saved"):
        SparseAutoencoderDictionary.from_saelens(folder)
    # Gone (the folder shared without it, as SAELens' layout allows): the
    # frequencies are unknown, as for any SAELens folder without the file.
    sparsity.unlink()
    assert np.isnan(SparseAutoencoderDictionary.from_saelens(folder)
                    .feature_frequencies_).all()
    # One added to a folder written without it is someone else's: kept.
    plain = _write_ours(tmp_path / "plain", None)
    save_file({"sparsity": np.full(D_SAE, -2.0)}, str(plain / "sparsity.safetensors"))
    added = (plain / "sparsity.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not a SAELens folder written by sparse_dict"):
        _write_ours(plain, overwrite=True)
    assert (plain / "sparsity.safetensors").read_bytes() == added


def test_a_scaling_factor_for_no_normalisation_is_refused(tmp_path, capsys):
    folder = _write(tmp_path / "sae", "standard", _weights("standard"))
    message = ("cfg.json's normalize_activations is 'none': there is no scaling to fold; "
               "leave norm_scaling_factor")
    with pytest.raises(ValueError, match=message):
        SparseAutoencoderDictionary.from_saelens(folder, norm_scaling_factor=2.5)
    # On the command line: its one-line error, exit 2, nothing written.
    assert main(["convert", "--from", "saelens", str(folder), "-o", str(tmp_path / "sd"),
                 "--norm-scaling-factor", "2.5"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sd").exists()


def test_to_saelens_and_convert_keep_the_feature_frequencies(tmp_path):
    est, _ = _fitted("relu")
    est.feature_frequencies_ = FREQUENCIES.copy()
    back = SparseAutoencoderDictionary.from_saelens(est.to_saelens(tmp_path / "sae"))
    np.testing.assert_allclose(back.feature_frequencies_, FREQUENCIES, rtol=1e-12, atol=0)
    # The command line both ways, through a saved dictionary.
    est.save(tmp_path / "saved")
    assert main(["convert", "--from", "sparse_dict", str(tmp_path / "saved"), "-o",
                 str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "sparsity.safetensors").is_file()
    assert main(["convert", "--from", "saelens", str(tmp_path / "out"), "-o",
                 str(tmp_path / "again"), "-q"]) == 0
    np.testing.assert_allclose(
        SparseAutoencoderDictionary.load(tmp_path / "again").feature_frequencies_,
        FREQUENCIES, rtol=1e-12, atol=0)


def test_nan_in_saelens_metadata_reads_as_null_and_the_dictionary_saves(tmp_path):
    # SAELens writes cfg.json with Python's json, NaN and all; kept, it failed
    # save and to_saelens later with JSON's message, naming nothing.
    metadata = {"sae_lens_version": "6.5.0", "model_name": "gpt2",
                "hook_name": "blocks.3.hook_resid_pre", "dataset_trust": float("nan"),
                "extra": {"scores": [1.0, float("inf")]}}
    folder = _write(tmp_path / "sae", "standard", _weights("standard"), metadata=metadata)
    with pytest.warns(UserWarning, match=r"cfg.json: metadata.dataset_trust, "
                                         r"metadata.extra.scores\[1\] held NaN or infinite"):
        sae = SparseAutoencoderDictionary.from_saelens(folder)
    assert sae.provenance_["metadata"]["dataset_trust"] is None
    assert sae.provenance_["metadata"]["extra"] == {"scores": [1.0, None]}
    SparseAutoencoderDictionary.load(sae.save(tmp_path / "saved"))
    sae.to_saelens(tmp_path / "again")


def test_metadata_goes_out_from_provenance_and_a_hand_edit_says_so(tmp_path):
    # SAELens and Neuronpedia need model_name and hook_name, which a
    # dictionary of a bare array does not know: provenance_'s metadata gives them.
    folder = _write_ours(tmp_path / "first")
    sae = SparseAutoencoderDictionary.from_saelens(folder)
    sae.provenance_ = {"metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_mlp_out"}}
    out = sae.to_saelens(tmp_path / "out")
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]
    assert metadata["model_name"] == "gpt2" and metadata["hook_name"] == "blocks.3.hook_mlp_out"
    # Edited by hand instead, the checksum fails, and the message says the way.
    config = json.loads((out / "cfg.json").read_text())
    config["metadata"]["hook_name"] = "blocks.4.hook_mlp_out"
    (out / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"edited by hand. To give its metadata .*"
                                         r"provenance_\['metadata'\] .* to_saelens"):
        SparseAutoencoderDictionary.from_saelens(out)


def test_metadata_of_another_type_is_named_as_such(tmp_path):
    # It was taken for a folder of SAELens before 6.0.
    folder = _write(tmp_path / "sae", "standard", _weights("standard"), metadata=["6.5.0"])
    with pytest.raises(ValueError, match="field 'metadata' must be a JSON object"):
        SparseAutoencoderDictionary.from_saelens(folder)


# SAELens 6's training configs (TrainingSAEConfig.to_dict) add these to a
# checkpoint's cfg.json, as its 6.0 to 6.54 releases write them.
TRAINING_FIELDS = {
    "standard": {"decoder_init_norm": 0.1, "l1_coefficient": 5.0, "lp_norm": 1.0,
                 "l1_warm_up_steps": 0},
    "jumprelu": {"decoder_init_norm": 0.1, "jumprelu_init_threshold": 0.01,
                 "jumprelu_bandwidth": 0.05, "jumprelu_sparsity_loss_mode": "step",
                 "l0_coefficient": 1.0, "l0_warm_up_steps": 0,
                 "pre_act_loss_coefficient": None, "jumprelu_tanh_scale": 4.0,
                 # 6.54's, refused as unexpected before
                 "jumprelu_ste_to_input": False, "target_l0": None},
    "topk": {"decoder_init_norm": 0.1, "use_sparse_activations": False,
             "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": True},
}


@pytest.mark.parametrize("architecture", sorted(TRAINING_FIELDS))
def test_a_training_checkpoint_reads_with_its_scaling_factor(tmp_path, architecture):
    # A checkpoint is where activation_scaler.json sits, beside a factor not
    # yet folded; its training fields were refused as unexpected, so the
    # factor was never read.
    w = _weights(architecture)
    fields = dict(TRAINING_FIELDS[architecture], normalize_activations="expected_average_only_in")
    folder = _write(tmp_path / "checkpoint", architecture, w, **fields)
    factor = 0.42
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
    x = np.random.default_rng(5).normal(size=(30, D_IN))
    f, decode, unit_codes = _saelens_reference(dict(fields, architecture=architecture), w, x,
                                               scaling=factor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the factor is known: nothing to warn of
        est = SparseAutoencoderDictionary.from_saelens(folder)
    np.testing.assert_allclose(est.transform(x), unit_codes, atol=1e-5)
    np.testing.assert_allclose(est.inverse_transform(est.transform(x)), decode(f), atol=1e-5)
    # A scaler file without its field is named, not taken for no file (a
    # warning that the SAE is used unscaled was all there was).
    for damaged, said in (([factor], "expected a JSON object"),
                          ({"scaling_factr": factor}, "field 'scaling_factor' is missing")):
        (folder / "activation_scaler.json").write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=f"activation_scaler.json: {said}"):
            SparseAutoencoderDictionary.from_saelens(folder)
    # A field of neither config is still an error.
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(dict(cfg, l1_coeficient=5.0)))
    with pytest.raises(ValueError, match="unexpected field 'l1_coeficient'"):
        SparseAutoencoderDictionary.from_saelens(folder)


def _with_details(folder, **fields):
    """``folder``'s cfg.json with ``fields`` at its top level and, as SAELens 6 lists
    a training config's own fields, in ``metadata.training_architecture_details``."""
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["training_architecture_details"] = dict(fields)
    cfg.update(fields)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_training_fields_the_checkpoint_declares_are_read_as_such(tmp_path):
    # A later SAELens release adds training fields: a checkpoint lists them
    # in metadata.training_architecture_details, and one listed there with
    # its value is a training field, whatever its name (6.54's
    # jumprelu_ste_to_input made every JumpReLU checkpoint unreadable).
    w = _weights("jumprelu")
    x = np.random.default_rng(3).normal(size=(20, D_IN))
    plain = SparseAutoencoderDictionary.from_saelens(_write(tmp_path / "plain", "jumprelu", w))
    folder = _write(tmp_path / "checkpoint", "jumprelu", w)
    _with_details(folder, l0_coefficient=1.0, some_future_knob=[1, 2])
    est = SparseAutoencoderDictionary.from_saelens(folder)
    np.testing.assert_array_equal(est.transform(x), plain.transform(x))
    # Not listed, or listed with another value: not vouched for, an error.
    cfg = json.loads((folder / "cfg.json").read_text())
    for changed in (dict(cfg, other_knob=1),
                    dict(cfg, some_future_knob=[1, 3])):
        (folder / "cfg.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="unexpected field '(other|some_future)_knob'"):
            SparseAutoencoderDictionary.from_saelens(folder)
    # Nor a field that sets inference in another architecture.
    details = cfg["metadata"]["training_architecture_details"]
    (folder / "cfg.json").write_text(json.dumps(dict(
        cfg, k=3, metadata=dict(cfg["metadata"], training_architecture_details=dict(
            details, k=3)))))
    with pytest.raises(ValueError, match="unexpected field 'k'"):
        SparseAutoencoderDictionary.from_saelens(folder)
    # An inference field is never waved through so: its value is checked.
    cfg["metadata"]["training_architecture_details"]["apply_b_dec_to_input"] = "yes"
    (folder / "cfg.json").write_text(json.dumps(dict(cfg, apply_b_dec_to_input="yes")))
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SparseAutoencoderDictionary.from_saelens(folder)


def _batchtopk_reference(w, x, threshold, rescale, apply_b_dec, scaling):
    """A BatchTopK checkpoint's SAE as SAELens saves it trained, from its equations.

    In SAELens' units (inputs times ``scaling``): ``z = ReLU(h)``, times
    ``||W_dec||`` where rescaled; the SAE fires where ``z > threshold``; the
    codes are ``z`` there, decoded over ``W_dec / ||W_dec||`` where rescaled.
    """
    w = {k: v.astype(np.float64) for k, v in w.items()}
    norms = np.linalg.norm(w["W_dec"], axis=1)
    h = (x * scaling - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    z = np.maximum(h, 0) * (norms if rescale else 1.0)
    f = z * (z > threshold)
    x_hat = ((f / norms if rescale else f) @ w["W_dec"] + w["b_dec"]) / scaling
    return f, x_hat


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("rescale, apply_b_dec", [(True, True), (False, True), (True, False)])
def test_a_batchtopk_checkpoint_reads_as_saelens_saves_it(tmp_path, architecture, rescale,
                                                          apply_b_dec):
    # SAELens' usual training architecture: its checkpoints hold the running
    # topk_threshold that the trained SAE (saved as "jumprelu") fires above.
    # They were refused, with a hint to look for a "jumprelu" folder that a
    # checkpoint does not have.
    w = _weights("topk", seed=2)
    w["topk_threshold"] = np.array(0.6)  # SAELens keeps it in float64
    fields = {"decoder_init_norm": 0.1, "k": 3.5, "use_sparse_activations": False,
              "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": rescale,
              "topk_threshold_lr": 0.01}
    if architecture == "matryoshka_batchtopk":
        fields.update(matryoshka_widths=[4, D_SAE], use_matryoshka_aux_loss=False)
    folder = _write(tmp_path / "checkpoint", architecture, w, apply_b_dec_to_input=apply_b_dec,
                    normalize_activations="expected_average_only_in", **fields)
    factor = 0.42
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
    x = np.random.default_rng(6).normal(size=(200, D_IN)) * 2.0
    f, x_hat = _batchtopk_reference(w, x, 0.6, rescale, apply_b_dec, factor)
    assert 0 < (f > 0).mean() < 0.9  # the threshold binds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = SparseAutoencoderDictionary.from_saelens(folder)
    codes = est.transform(x)
    np.testing.assert_array_equal(codes > 0, f > 0)
    np.testing.assert_allclose(est.inverse_transform(codes), x_hat, atol=1e-5)
    assert est.activation == "jumprelu" and est.provenance_["architecture"] == architecture
    assert est.provenance_["shared_threshold"]
    assert any("topk_threshold" in note for note in est.provenance_["folded"])


def test_a_batchtopk_checkpoint_without_its_threshold_is_refused(tmp_path):
    w = _weights("topk")
    folder = _write(tmp_path / "checkpoint", "batchtopk", w, k=3,
                    rescale_acts_by_decoder_norm=True)
    with pytest.raises(ValueError, match="topk_threshold"):
        SparseAutoencoderDictionary.from_saelens(folder)


def _as_hub_snapshot(folder, root):
    """``folder`` as huggingface_hub's cache holds a download: links to blobs."""
    import os
    import shutil

    snapshot, blobs = root / "snapshots" / "abc123" / folder.name, root / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in folder.iterdir():
        shutil.copy(file, blobs / file.name)
        os.symlink(os.path.relpath(blobs / file.name, snapshot), snapshot / file.name)
    return snapshot


def test_a_hub_cache_snapshot_reads_as_its_folder(tmp_path):
    # Every file of a snapshot is a link to its blob; they were refused as
    # "missing or not a file".
    est, x = _fitted("jumprelu")
    written = _as_hub_snapshot(est.to_saelens(tmp_path / "sae"), tmp_path / "hub_sae")
    saved = _as_hub_snapshot(est.save(tmp_path / "saved"), tmp_path / "hub_saved")
    assert (written / "sparsity.safetensors").is_symlink()
    for back in (SparseAutoencoderDictionary.from_saelens(written),
                 SparseAutoencoderDictionary.load(saved)):
        np.testing.assert_array_equal(back.transform(x), est.transform(x))


def test_a_folder_saelens_saved_again_is_not_replaced(tmp_path):
    # SAE.load_from_disk, fine-tune, save_model: SAELens keeps the metadata
    # naming sparse_dict but drops the integrity record, and writes its own
    # weights; overwrite=True replaced them.
    est, _ = _fitted("relu")
    folder = est.to_saelens(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert "sparse_dict_version" in cfg["metadata"]
    del cfg[_persist.INTEGRITY_KEY]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sparsity.safetensors").unlink()
    tuned = {k: v * 1.5 for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    save_file(tuned, str(folder / "sae_weights.safetensors"))
    before = (folder / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not a SAELens folder written by sparse_dict"):
        est.to_saelens(folder, overwrite=True)
    assert (folder / "sae_weights.safetensors").read_bytes() == before
    # Weights changed under an intact record: not as written either.
    ours = est.to_saelens(tmp_path / "ours")
    save_file(tuned, str(ours / "sae_weights.safetensors"))
    with pytest.raises(FileExistsError, match="not a SAELens folder written by sparse_dict"):
        est.to_saelens(ours, overwrite=True)
    # As written, it is replaced.
    est.to_saelens(est.to_saelens(tmp_path / "again"), overwrite=True)


def _deep(depth, leaf):
    nested = leaf
    for _ in range(depth):
        nested = {"a": nested}
    return nested


def _depth(value):
    depth = 0
    while isinstance(value, dict):
        depth, value = depth + 1, value["a"]
    return depth, value


def test_metadata_as_deep_as_json_reads_goes_out_and_back(tmp_path):
    # The NaN check walked the metadata recursively, two frames a level:
    # from about 500 levels from_saelens (and convert) failed with a
    # RecursionError on a folder to_saelens had just written.
    est, x = _fitted("relu")
    est.provenance_ = {"metadata": {"model_name": "gpt2", "extra": _deep(900, "leaf")}}
    back = SparseAutoencoderDictionary.from_saelens(est.to_saelens(tmp_path / "sae"))
    np.testing.assert_array_equal(back.transform(x), est.transform(x))
    assert _depth(back.provenance_["metadata"]["extra"]) == (900, "leaf")
    # A NaN that deep in SAELens' own metadata is found, and named.
    folder = _write(tmp_path / "saelens", "standard", _weights("standard"),
                    metadata={"sae_lens_version": "6.5.0", "extra": _deep(900, float("nan"))})
    with pytest.warns(UserWarning, match=r"metadata\.extra(\.a){900} held NaN"):
        read = SparseAutoencoderDictionary.from_saelens(folder)
    assert _depth(read.provenance_["metadata"]["extra"]) == (900, None)
