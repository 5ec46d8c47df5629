"""Loading saved dictionaries: every damage is a ValueError naming the file and the field.

A damaged folder either loads as exactly the dictionary that was saved or
raises ValueError, never another error and never a silently different model.
"""

import json
import math
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict import _persist

CONFIG, WEIGHTS = "config.json", "weights.safetensors"


@pytest.fixture(scope="module")
def X():
    return np.random.RandomState(0).exponential(size=(120, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(X):
    return SparseAutoencoderDictionary(
        n_components=10, max_iter=2, batch_size=40, device="cpu", random_state=0
    ).fit(X)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("saved") / "d")


def _copy(saved, folder):
    return Path(shutil.copytree(saved, Path(folder) / "copy"))


def _edit_config(path, edit):
    """Apply ``edit`` to the config, and record the checksums of the edited folder anew.

    So that only validation stands guard, as over a folder saved with what
    the edit wrote. A folder made format 1 (saved before checksums existed)
    gets none, as it had none.
    """
    config = json.loads((path / CONFIG).read_text())
    edit(config)
    _write_signed(path, config)


def _write_signed(path, config):
    """Write ``config`` with an integrity record of itself and the weights as they are now."""
    config.pop("sha256", None)
    if config.get("format_version") != 1:
        try:
            digest = _persist._digest_bytes(_persist._canonical(config).encode())
        except ValueError:  # NaN written in: no checksum can be made, as save makes none
            digest = "0" * 64
        config["sha256"] = {"config": digest,
                            "weights": _persist._digest_file(path / WEIGHTS)}
    (path / CONFIG).write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = dict(load_file(str(path / WEIGHTS)))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))
    _edit_config(path, lambda c: None)


def _set(keys, value):
    def edit(config):
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _delete(keys):
    def edit(config):
        node = config
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


def equal(a, b):
    """Same parameters and the same fitted state, exactly."""
    if a.get_params() != b.get_params():
        return False
    names = ("components_", "encoder_weights_", "encoder_bias_", "decoder_bias_",
             "feature_frequencies_", "loss_curve_")
    if not all(np.array_equal(getattr(a, n), getattr(b, n)) and getattr(a, n).dtype
               == getattr(b, n).dtype for n in names):
        return False
    scalars = ("n_features_in_", "n_components_", "n_iter_", "n_steps_", "scale_",
               "n_resampled_")
    return all(getattr(a, n) == getattr(b, n) for n in scalars) and all(
        np.array_equal(a.history_[k], b.history_[k]) for k in a.history_)


def test_round_trip_is_exact(saved, fitted):
    loaded = SparseAutoencoderDictionary.load(saved)
    fitted_params = {**fitted.get_params(), "callback": None}
    assert loaded.get_params() == fitted_params
    assert equal(loaded, SparseAutoencoderDictionary.load(saved))
    np.testing.assert_array_equal(loaded.components_, fitted.components_)


def test_set_output_survives_save_and_load(fitted, X, tmp_path):
    # As a pickle keeps it.
    pd = pytest.importorskip("pandas")
    fitted = pickle.loads(pickle.dumps(fitted)).set_output(transform="pandas")
    fitted.save(tmp_path / "pandas")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "pandas")
    assert isinstance(loaded.transform(X[:3]), pd.DataFrame)
    fitted.set_output(transform="default").save(tmp_path / "plain")
    assert isinstance(SparseAutoencoderDictionary.load(tmp_path / "plain").transform(X[:3]),
                      np.ndarray)


# Each row: what the issue found, the damage, and the words the error must hold.
DAMAGES = [
    ("missing params", lambda p: _edit_config(p, _delete(["params"])), "'params'"),
    ("missing attributes", lambda p: _edit_config(p, _delete(["attributes"])), "'attributes'"),
    ("missing n_steps_", lambda p: _edit_config(p, _delete(["attributes", "n_steps_"])),
     "attributes.n_steps_"),
    ("n_iter_ a string", lambda p: _edit_config(p, _set(["attributes", "n_iter_"], "abc")),
     "attributes.n_iter_"),
    ("scale_ negative", lambda p: _edit_config(p, _set(["attributes", "scale_"], -1)),
     "attributes.scale_"),
    # (No checksum can be made of it: the record's check names it first.)
    ("scale_ NaN", lambda p: _edit_config(p, _set(["attributes", "scale_"], math.nan)),
     "contains NaN or infinity"),
    ("n_components_ a float", lambda p: _edit_config(
        p, _set(["attributes", "n_components_"], 10.0)), "attributes.n_components_"),
    ("n_components_ a bool", lambda p: _edit_config(
        p, _set(["attributes", "n_components_"], True)), "attributes.n_components_"),
    ("n_components_ wrong", lambda p: _edit_config(
        p, _set(["attributes", "n_components_"], 11)),
     "tensor 'components' has shape (10, 6); expected (11, 6)"),
    ("format_version a string", lambda p: _edit_config(p, _set(["format_version"], "x")),
     "format_version"),
    ("format_version from the future", lambda p: _edit_config(p, _set(["format_version"], 99)),
     "newer sparse_dict"),
    ("dtype int8", lambda p: _edit_config(p, _set(["attributes", "dtype"], "int8")),
     "attributes.dtype"),
    ("dtype object", lambda p: _edit_config(p, _set(["attributes", "dtype"], "object")),
     "attributes.dtype"),
    ("dtype complex128", lambda p: _edit_config(
        p, _set(["attributes", "dtype"], "complex128")), "attributes.dtype"),
    ("dtype bogus", lambda p: _edit_config(p, _set(["attributes", "dtype"], "bogus")),
     "attributes.dtype"),
    ("dtype float64 over float32 tensors", lambda p: _edit_config(
        p, _set(["attributes", "dtype"], "float64")), "dtype float32"),
    ("unknown parameter", lambda p: _edit_config(p, _set(["params", "colour"], 1)),
     "params.colour"),
    ("unknown top-level field", lambda p: _edit_config(p, _set(["colour"], 1)), "'colour'"),
    ("bad parameter", lambda p: _edit_config(p, _set(["params", "l1_coef"], -3)), "l1_coef"),
    ("boolean n_components", lambda p: _edit_config(p, _set(["params", "n_components"], True)),
     "n_components"),
    ("bad device", lambda p: _edit_config(p, _set(["params", "device"], "gpu")), "device"),
    ("unknown output container", lambda p: _edit_config(
        p, _set(["attributes", "set_output"], "arrow")), "attributes.set_output"),
    ("feature names of the wrong length", lambda p: _edit_config(
        p, _set(["attributes", "feature_names_in_"], ["a"])), "feature_names_in_"),
    ("not an object", lambda p: (p / CONFIG).write_text("[1, 2]"), "JSON object"),
    ("not JSON", lambda p: (p / CONFIG).write_text("{not json"), "not valid JSON"),
    ("not UTF-8", lambda p: (p / CONFIG).write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    ("NaN weights", lambda p: _edit_tensors(
        p, lambda t: t["components"].__setitem__((0, 0), np.nan)), "'components'"),
    ("missing tensor", lambda p: _edit_tensors(p, lambda t: t.pop("encoder_bias")),
     "'encoder_bias'"),
    ("extra tensor", lambda p: _edit_tensors(
        p, lambda t: t.__setitem__("extra", np.zeros(2, np.float32))), "'extra'"),
    ("tensor of the wrong shape", lambda p: _edit_tensors(
        p, lambda t: t.__setitem__("decoder_bias", np.zeros(5, np.float32))), "'decoder_bias'"),
    ("tensor of int8", lambda p: _edit_tensors(
        p, lambda t: t.__setitem__("components", t["components"].astype(np.int8))),
     "'components'"),
    ("frequency above 1", lambda p: _edit_tensors(
        p, lambda t: t["feature_frequencies"].__setitem__(0, 2.0)), "'feature_frequencies'"),
    ("truncated weights", lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:100]),
     WEIGHTS),
    ("weights missing", lambda p: (p / WEIGHTS).unlink(), WEIGHTS),
    ("config a folder", lambda p: ((p / CONFIG).unlink(), (p / CONFIG).mkdir()), CONFIG),
    ("edited by hand, checksum kept", lambda p: (p / CONFIG).write_text(
        (p / CONFIG).read_text().replace('"n_iter_": 2', '"n_iter_": 3')), "checksum"),
    ("weights changed, checksum kept", lambda p: (p / WEIGHTS).write_bytes(
        (p / WEIGHTS).read_bytes()[:-4] + b"\x00\x00\x80\x3f"), "checksum"),
]


@pytest.mark.parametrize("what,damage,words", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_folder_gives_a_clear_error(saved, tmp_path, what, damage, words):
    path = _copy(saved, tmp_path)
    damage(path)
    with pytest.raises(ValueError) as info:
        SparseAutoencoderDictionary.load(path)
    message = str(info.value)
    assert words in message, message
    assert str(path) in message, message  # names the file (or the folder)


def test_checksums_deleted_from_a_folder_of_this_format_are_refused(saved, tmp_path):
    # Only format 1 folders were saved without checksums
    # (test_format_1_folders_load_and_are_checked); deleting them from a
    # newer folder skipped every check, and an edited config loaded.
    path = _copy(saved, tmp_path)
    config = json.loads((path / CONFIG).read_text())
    del config["sha256"]
    config["params"]["l1_coef"] = 0.5
    (path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"integrity record \(field 'sha256'\) is missing, "
                                         r"though every folder of format 2 has one"):
        SparseAutoencoderDictionary.load(path)


@pytest.mark.parametrize("release,upgrade", [("next major", True), ("next minor", True),
                                             ("this", False), ("0.0.1", False)])
def test_a_newer_release_s_fields_ask_for_an_upgrade(saved, tmp_path, release, upgrade):
    # Parameters were added within format 2 (dict_init, sparse_step): a
    # folder with one this release lacks said only "unexpected field".
    from sparse_dict._version import __version__

    major, minor = (int(p) for p in __version__.split(".")[:2])
    version = {"next major": f"{major + 1}.0", "next minor": f"{major}.{minor + 1}.0",
               "this": __version__}.get(release, release)
    for where, edit in (("params.new_param", _set(["params", "new_param"], 1)),
                        ("attributes.new_", _set(["attributes", "new_"], 1))):
        path = _copy(saved, tmp_path / where)
        _edit_config(path, lambda c: (edit(c), _set(["sparse_dict_version"], version)(c)))
        with pytest.raises(ValueError, match=f"unexpected field '{where}'") as info:
            SparseAutoencoderDictionary.load(path)
        said = "upgrade sparse_dict to load it" in str(info.value)
        assert said == upgrade, str(info.value)


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseAutoencoderDictionary.load(tmp_path / "nope")


def test_cuda_save_loads_on_the_cpu(fitted, tmp_path, X, monkeypatch):
    if torch.cuda.is_available():
        # Fitted on the GPU for real, then loaded as on a host without one.
        gpu = clone(fitted).set_params(device="cuda").fit(X)
    else:
        gpu = pickle.loads(pickle.dumps(fitted)).set_params(device="cuda")
    expected = (gpu if torch.cuda.is_available() else fitted).transform(X)
    path = gpu.save(tmp_path / "d")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        loaded = SparseAutoencoderDictionary.load(path)
    assert loaded.device == "cpu"
    # The GPU's arithmetic differs from the CPU's in the last bits.
    np.testing.assert_allclose(loaded.transform(X), expected, rtol=1e-4, atol=1e-5)
    # An explicit device wins, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SparseAutoencoderDictionary.load(path, device="cpu").device == "cpu"


# --------------------------------------------------------------------------
# Random damage
# --------------------------------------------------------------------------


def _json_paths(node, prefix=()):
    """Every key path in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _json_paths(value, (*prefix, i))


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                             st.integers(), max_size=2),
)

damage = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from([CONFIG, WEIGHTS]), st.integers(0, 10**6),
              st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.sampled_from([CONFIG, WEIGHTS]), st.integers(0, 10**6)),
    st.tuples(st.just("delete file"), st.sampled_from([CONFIG, WEIGHTS])),
    st.tuples(st.just("delete key"), st.integers(0, 10**6)),
    st.tuples(st.just("change type"), st.integers(0, 10**6), json_values),
    st.tuples(st.just("delete tensor"), st.integers(0, 5)),
    st.tuples(st.just("change tensor"), st.integers(0, 5),
              st.sampled_from(["float16", "int32", "float64", "bool", "shape", "nan"])),
)


def _apply(path, how, sign):
    kind = how[0]
    if kind in ("flip", "truncate"):
        file = path / how[1]
        data = bytearray(file.read_bytes())
        if kind == "flip":
            data[how[2] % len(data)] ^= 1 << how[3]
        else:
            del data[how[2] % len(data):]
        file.write_bytes(bytes(data))
    elif kind == "delete file":
        (path / how[1]).unlink()
    elif kind in ("delete key", "change type"):
        config = json.loads((path / CONFIG).read_text())
        paths = list(_json_paths({k: v for k, v in config.items() if k != "sha256"}))
        keys = paths[how[1] % len(paths)]
        node = config
        for key in keys[:-1]:
            node = node[key]
        if kind == "delete key":
            del node[keys[-1]]
        else:
            node[keys[-1]] = how[2]
        if sign:
            (path / CONFIG).write_text(json.dumps(config))
        else:
            _write_signed(path, config)
    else:
        tensors = dict(load_file(str(path / WEIGHTS)))
        name = sorted(tensors)[how[1] % len(tensors)]
        if kind == "delete tensor":
            del tensors[name]
        elif how[2] == "shape":
            tensors[name] = np.concatenate([tensors[name], tensors[name][:1]])
        elif how[2] == "nan":
            tensors[name] = tensors[name].copy()
            tensors[name].flat[0] = np.nan
        else:
            tensors[name] = tensors[name].astype(how[2])
        save_file(tensors, str(path / WEIGHTS))
        if not sign:
            _edit_config(path, lambda c: None)


def _load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a device changed to "cuda" warns on a CPU host
        return SparseAutoencoderDictionary.load(path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=damage)
def test_damage_loads_the_original_or_raises_value_error(saved, how):
    # The folders keep their checksums: any change is caught, or it changed
    # nothing that matters (a flip of "e" to "E" in a number, say).
    original = SparseAutoencoderDictionary.load(saved)
    with tempfile.TemporaryDirectory() as folder:
        path = _copy(saved, folder)
        _apply(path, how, sign=True)
        try:
            loaded = _load_quietly(path)
        except ValueError:
            return
        assert equal(loaded, original), how


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=damage)
def test_unchecked_damage_loads_a_working_model_or_raises_value_error(saved, X, how):
    # As in folders saved before checksums: validation alone must catch every
    # damage that would break the model; what it lets through must work.
    with tempfile.TemporaryDirectory() as folder:
        path = _copy(saved, folder)
        _apply(path, how, sign=False)
        try:
            loaded = _load_quietly(path)
        except ValueError:
            return
        codes = loaded.transform(X)
        assert codes.shape == (X.shape[0], loaded.n_components_)
        assert np.isfinite(codes).all()
        assert loaded.components_.dtype in (np.float32, np.float64)


_V1_PARAMS = {
    "n_components", "l1_coef", "learning_rate", "batch_size", "max_iter", "max_steps",
    "warmup_fraction", "decay_fraction", "resample_dead", "resample_interval",
    "decoder_bias_init", "bf16", "device", "callback", "random_state", "verbose",
}


def _as_format_1(path):
    """Rewrite a saved folder as sparse_dict wrote it before format 2 and checksums."""
    def edit(config):
        config["format_version"] = 1
        config["params"] = {k: v for k, v in config["params"].items() if k in _V1_PARAMS}
        for key in ("train_l0_", "transform_l0_"):
            config["attributes"].pop(key, None)

    _edit_config(path, edit)
    tensors = dict(load_file(str(path / WEIGHTS)))
    tensors["history"] = np.ascontiguousarray(tensors["history"][:, :4])
    save_file(tensors, str(path / WEIGHTS))


def test_format_1_folders_load_and_are_checked(saved, fitted, tmp_path, X):
    path = _copy(saved, tmp_path)
    _as_format_1(path)
    loaded = SparseAutoencoderDictionary.load(path)
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    # The same checks apply to old folders.
    _edit_config(path, _set(["attributes", "dtype"], "int8"))
    with pytest.raises(ValueError, match="attributes.dtype"):
        SparseAutoencoderDictionary.load(path)


@pytest.mark.parametrize("activation,tensor", [("jumprelu", "threshold"),
                                               ("topk", "selection_scale")])
def test_a_mechanism_s_state_out_of_its_range_is_refused(X, tmp_path, activation, tensor):
    # A negative threshold loaded, and gave negative codes; a negative
    # selection scale gave codes that were all zero.
    sae = SparseAutoencoderDictionary(n_components=8, activation=activation, k=2, max_iter=2,
                                      device="cpu", random_state=0).fit(X)
    path = sae.save(tmp_path / "d")
    _edit_tensors(path, lambda t: t[tensor].__setitem__(0, -1.0))
    with pytest.raises(ValueError, match=f"'{tensor}'"):
        SparseAutoencoderDictionary.load(path)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_in_place_of_the_weights_is_named_as_one(saved, tmp_path, how):
    import pickle

    import torch

    path = _copy(saved, tmp_path)
    if how == "pickle":
        (path / WEIGHTS).write_bytes(pickle.dumps({"components": np.zeros(3)}))
    else:
        torch.save({"components": torch.zeros(3)}, path / WEIGHTS)
    _edit_config(path, lambda c: None)  # signed anew: only the format stands guard
    with pytest.raises(ValueError, match="not a readable safetensors file .*never read here: "
                                         "pickles can run code"):
        SparseAutoencoderDictionary.load(path)


def test_a_save_in_one_thread_silences_no_warning_of_another(tmp_path):
    # Its check that the folder loads back ran under a filter that ignored
    # every warning, and Python's filters are the process's: a thread's
    # transform of rows at another scale was not warned in 3 to 7% of calls
    # while another thread saved.
    import threading

    rng = np.random.default_rng(0)
    X = rng.exponential(size=(3000, 32)).astype(np.float32)
    far = 100 * rng.exponential(size=(200, 32)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SparseAutoencoderDictionary(n_components=64, max_iter=1, random_state=0).fit(X)
    stop, saves = threading.Event(), []

    def save_again_and_again():
        while not stop.is_set():
            saves.append(sae.save(tmp_path / f"saved{len(saves)}"))

    saver = threading.Thread(target=save_again_and_again)
    warned = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saver.start()
        try:
            for _ in range(300):
                try:
                    sae.transform(far)
                except UserWarning:
                    warned += 1
        finally:
            stop.set()
            saver.join()
    assert len(saves) > 10 and warned == 300
