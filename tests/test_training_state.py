"""``save(training_state=True)``: a stream saved and loaded goes on exactly as unsaved.

Without the training state a loaded dictionary trains on from its weights with
a fresh optimiser and takes another course; with it, every further
``partial_fit`` gives bit for bit what the unsaved estimator's would. Damage to
the third file is a ValueError naming it, as for the other two.
"""

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from memory_peak import peak_bytes
from sparse_dict import SparseAutoencoderDictionary, _persist

STATE = "training_state.safetensors"
FITTED = ("components_", "encoder_weights_", "encoder_bias_", "decoder_bias_",
          "feature_frequencies_")


@pytest.fixture(scope="module")
def X():
    # Rows of rank 3 in 12 dimensions: most of 48 atoms go dead, so that the
    # penalised mechanisms resample and the top-k family uses AuxK, whose
    # counts the state must carry too.
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1536, 3)) @ rng.standard_normal((3, 12))).astype(np.float32)


def _stream(activation, **params):
    return SparseAutoencoderDictionary(
        n_components=48, activation=activation, k=3, batch_size=16, resample_interval=5,
        device="cpu", random_state=0, **params)


def _same(a, b):
    return (all(np.array_equal(getattr(a, n), getattr(b, n)) for n in FITTED)
            and a.n_steps_ == b.n_steps_ and a.n_resampled_ == b.n_resampled_
            and np.array_equal(a._history_array(), b._history_array()))


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def _saved_and_loaded(estimator, path, **save):
    estimator.save(path, **save)
    return SparseAutoencoderDictionary.load(path)


def _go_on_alike(a, b, rows):
    """Whether ``a`` and ``b`` give the same dictionary after one partial_fit of ``rows``."""
    for each in (a, b):
        _quiet(each.partial_fit, rows)
    return _same(a, b)


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_a_stream_saved_with_its_training_state_goes_on_exactly(X, activation, tmp_path):
    unsaved, kept, afresh = _stream(activation), _stream(activation), _stream(activation)
    for i, chunk in enumerate(np.array_split(X, 6)):
        for estimator in (unsaved, kept, afresh):
            _quiet(estimator.partial_fit, chunk)
        if i in (1, 3):
            kept = _saved_and_loaded(kept, tmp_path / f"kept{i}", training_state=True)
            afresh = _saved_and_loaded(afresh, tmp_path / f"afresh{i}")
    assert _same(kept, unsaved)
    # Without the state the stream goes on otherwise: the check can fail.
    assert not np.array_equal(afresh.components_, unsaved.components_)
    if activation in ("relu", "jumprelu"):
        assert unsaved.n_resampled_ > 0  # the resampling draws were carried too


def test_training_state_after_fit_carries_on_into_partial_fit(X, tmp_path):
    fitted = _quiet(_stream("jumprelu", max_steps=60).fit, X[:768])
    loaded = _saved_and_loaded(fitted, tmp_path / "d", training_state=True)
    assert _go_on_alike(loaded, fitted, X[768:])


def test_edited_atoms_train_afresh_after_load_as_before_it(X, tmp_path):
    # Attributes set after the last call are trained from with a fresh
    # optimiser; the saved state is of that fresh start, so load changes
    # nothing.
    estimator = _stream("relu")
    _quiet(estimator.partial_fit, X[:768])
    estimator.components_ = estimator.components_[::-1].copy()
    loaded = _saved_and_loaded(estimator, tmp_path / "d", training_state=True)
    assert _go_on_alike(loaded, estimator, X[768:])


def test_the_third_file_and_its_size(X, tmp_path):
    estimator = _stream("topk")
    _quiet(estimator.partial_fit, X)
    path = estimator.save(tmp_path / "d", training_state=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", STATE,
                                                      "weights.safetensors"]
    # The model twice (its weights and in training units) and Adam's two moments.
    ratio = (path / STATE).stat().st_size / (path / "weights.safetensors").stat().st_size
    assert 2.0 < ratio < 4.0
    plain = estimator.save(tmp_path / "plain")
    assert STATE not in {p.name for p in plain.iterdir()}
    assert "training_state" not in json.loads((plain / "config.json").read_text())


def test_a_folder_shared_without_the_state_loads_as_saved_without_it(X, tmp_path):
    estimator = _stream("relu")
    _quiet(estimator.partial_fit, X[:768])
    with_state = estimator.save(tmp_path / "with", training_state=True)
    (with_state / STATE).unlink()
    shared = SparseAutoencoderDictionary.load(with_state)
    without = _saved_and_loaded(estimator, tmp_path / "without")
    assert _go_on_alike(shared, without, X[768:])


def test_overwrite_replaces_a_folder_with_a_training_state(X, tmp_path):
    first, second = _stream("relu"), _stream("relu", l1_coef=1.0)
    _quiet(first.partial_fit, X)
    _quiet(second.partial_fit, X)
    path = first.save(tmp_path / "d", training_state=True)
    second.save(path, overwrite=True)
    assert not (path / STATE).exists()
    assert np.array_equal(SparseAutoencoderDictionary.load(path).components_,
                          second.components_)
    # Still, a file of somebody else's is never replaced.
    first.save(path, overwrite=True, training_state=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        second.save(path, overwrite=True)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_training_state_must_be_true_or_false(X, tmp_path, value):
    estimator = _stream("relu")
    _quiet(estimator.partial_fit, X)
    with pytest.raises(TypeError, match="training_state must be True or False"):
        estimator.save(tmp_path / "d", training_state=value)
    assert not (tmp_path / "d").exists()


def test_a_loaded_state_pickles_and_goes_on(X, tmp_path):
    estimator = _stream("batchtopk")
    _quiet(estimator.partial_fit, X[:768])
    loaded = pickle.loads(pickle.dumps(
        _saved_and_loaded(estimator, tmp_path / "d", training_state=True)))
    assert _go_on_alike(loaded, estimator, X[768:])


@pytest.fixture(scope="module")
def saved_state(X, tmp_path_factory):
    estimator = _stream("jumprelu")
    _quiet(estimator.partial_fit, X[:768])
    return estimator.save(tmp_path_factory.mktemp("state") / "d", training_state=True)


def _resigned(path):
    """Record the checksums of the folder as it is now, so that validation alone stands guard."""
    config = json.loads((path / "config.json").read_text())
    record = config.pop("sha256")
    record["files"] = {STATE: _persist._digest_file(path / STATE)}
    record["config"] = _persist._digest_bytes(_persist._canonical(config).encode())
    config["sha256"] = record
    (path / "config.json").write_text(json.dumps(config))


def _edit_state_tensors(path, edit):
    tensors = dict(load_file(str(path / STATE)))
    edit(tensors)
    save_file(tensors, str(path / STATE))


def _edit_state_numbers(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["training_state"])
    (path / "config.json").write_text(json.dumps(config))


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _reshape(name):
    return lambda tensors: tensors.update({name: np.concatenate([tensors[name]] * 2)})


def _nan(name):
    def edit(tensors):
        tensors[name] = tensors[name].astype(np.float32)
        tensors[name].flat[0] = np.nan
    return edit


def _negative(name):
    return lambda tensors: tensors.update({name: -np.abs(tensors[name]) - 1})


def _retyped(name, dtype):
    return lambda tensors: tensors.update({name: tensors[name].astype(dtype)})


def _extra(tensors):
    tensors["momentum"] = np.zeros(3, np.float32)


@pytest.mark.parametrize("edit, words", [
    (_drop("model.W_enc"), "'model.W_enc' is missing"),
    (_drop("adam.W_enc.exp_avg"), "Adam's state is incomplete"),
    (_reshape("adam.b_dec.exp_avg"), "'adam.b_dec.exp_avg' has shape"),
    (_nan("adam.W_dec.exp_avg"), "'adam.W_dec.exp_avg' contains NaN"),
    (_negative("adam.W_dec.exp_avg_sq"), "'adam.W_dec.exp_avg_sq' has values outside"),
    (_retyped("steps_since_fired", np.float64), "'steps_since_fired' has dtype float64"),
    (_drop("history_rows"), "'history_rows' is missing"),
    (lambda t: t.update(history_rows=t["history_rows"][:-1]), "record of rows"),
    (lambda t: t.update(resample_generator=t["resample_generator"][:9]), "generator"),
    (_retyped("batch_order_key", np.int64), "'batch_order_key' has dtype int64"),
    (_extra, "unexpected tensor 'momentum'"),
])
def test_a_damaged_training_state_file_is_refused_by_name(saved_state, tmp_path, edit, words):
    path = shutil.copytree(saved_state, tmp_path / "copy")
    _edit_state_tensors(path, edit)
    with pytest.raises(ValueError, match="changed after it was saved"):
        SparseAutoencoderDictionary.load(path)
    _resigned(path)  # as if saved so: the checks of the values themselves
    with pytest.raises(ValueError, match=STATE) as caught:
        SparseAutoencoderDictionary.load(path)
    assert words in str(caught.value)


@pytest.mark.parametrize("edit, words", [
    (lambda n: n.update(step=-1), "'training_state.step' must be an integer >= 0"),
    (lambda n: n.update(scale=0), "'training_state.scale' must be a finite number > 0"),
    (lambda n: n.update(seed=None), "'training_state.seed' must be an integer"),
    (lambda n: n.pop("pass_rows"), "'training_state.pass_rows' is missing"),
    (lambda n: n.update(momentum=1), "unexpected field 'training_state.momentum'"),
    (lambda n: n["batch_order"].update(position=625), "holds no state of a RandomState"),
    (lambda n: n["batch_order"].pop("has_gauss"), "must hold exactly"),
    (lambda n: n.pop("batch_order"), "'batch_order_key' is not described"),
    (lambda n: n.update(seen_count=None), "recorded in part only"),
])
def test_damaged_training_state_numbers_are_refused_by_name(saved_state, tmp_path, edit,
                                                            words):
    path = shutil.copytree(saved_state, tmp_path / "copy")
    _edit_state_numbers(path, edit)
    _resigned(path)
    with pytest.raises(ValueError, match="config.json|training_state.safetensors") as caught:
        SparseAutoencoderDictionary.load(path)
    assert words in str(caught.value)


def test_a_k_set_before_the_save_restarts_the_threshold_after_load_too(X, tmp_path):
    # Loaded, the BatchTopK threshold of the old k was kept: L0 3.8 where
    # the unsaved estimator's was 7.7 at the new k.
    unsaved = _stream("batchtopk").set_params(k=2)
    _quiet(unsaved.partial_fit, X[:768])
    unsaved.set_params(k=6)
    loaded = _saved_and_loaded(unsaved, tmp_path / "d", training_state=True)
    assert _go_on_alike(loaded, unsaved, X[768:])
    assert np.array_equal(loaded.threshold_, unsaved.threshold_)


def test_saving_leaves_the_caller_s_random_state_where_it_was(X, tmp_path):
    # A trainer rebuilt from the attributes for the save drew its seed from
    # the caller's RandomState, and the saving estimator then trained
    # otherwise than a twin never saved.
    saved, twin = (_stream("batchtopk").set_params(k=2, random_state=np.random.RandomState(5))
                   for _ in range(2))
    for each in (saved, twin):
        _quiet(each.partial_fit, X[:768])
        each.set_params(k=3)
    _quiet(saved.save, tmp_path / "d", training_state=True)
    assert saved.random_state.get_state()[2] == twin.random_state.get_state()[2]
    # And the loaded one goes on in the batch order that follows the seed
    # the saving drew (it started one draw early).
    loaded = SparseAutoencoderDictionary.load(tmp_path / "d")
    for each in (saved, twin, loaded):
        _quiet(each.partial_fit, X[768:])
    assert _same(saved, twin)
    assert _same(loaded, twin)


def test_a_state_without_its_checksum_or_of_another_save_is_refused(X, tmp_path, saved_state):
    path = shutil.copytree(saved_state, tmp_path / "copy")
    config = json.loads((path / "config.json").read_text())
    del config["sha256"]["files"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no checksum of training_state.safetensors"):
        SparseAutoencoderDictionary.load(path)
    # Another stream's state at the same step, re-signed as if saved so.
    other = _stream("jumprelu", l0_coef=0.05)
    _quiet(other.partial_fit, X[:768])
    other.save(tmp_path / "other", training_state=True)
    path = shutil.copytree(saved_state, tmp_path / "mixed")
    shutil.copyfile(tmp_path / "other" / STATE, path / STATE)
    _resigned(path)
    with pytest.raises(ValueError, match="not the dictionary in weights.safetensors"):
        SparseAutoencoderDictionary.load(path)


def test_a_number_beyond_any_float_is_a_value_error(saved_state, tmp_path):
    path = shutil.copytree(saved_state, tmp_path / "copy")
    _edit_state_numbers(path, lambda n: n.update(variance=10 ** 400))
    _resigned(path)
    with pytest.raises(ValueError, match="'training_state.variance' must be a finite number"):
        SparseAutoencoderDictionary.load(path)


def test_saving_and_loading_a_training_state_holds_few_copies_of_it(tmp_path):
    # The state was serialised into memory before it was written, and the
    # check that it holds the saved weights compared float64 copies of both
    # matrices: a save peaked at 24 times one matrix's bytes in numpy's
    # allocations (a state is 6 of them, the weights file 2), a load at 18.
    # (Torch's own allocations are not counted: the bounds are loose.)
    rows = np.random.default_rng(0).normal(size=(512, 256)).astype(np.float32)
    sae = SparseAutoencoderDictionary(n_components=4096, max_steps=3, batch_size=256,
                                      random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(rows)
    matrix = sae.components_.nbytes
    _, peak = peak_bytes(sae.save, tmp_path / "saved", training_state=True)
    assert peak < 18 * matrix
    loaded, peak = peak_bytes(SparseAutoencoderDictionary.load, tmp_path / "saved")
    assert peak < 16 * matrix
    np.testing.assert_array_equal(loaded.components_, sae.components_)
