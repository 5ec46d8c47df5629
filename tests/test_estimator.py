"""SparseAutoencoderDictionary: behaviour, conventions and bad input."""

import copy
import pickle
import re
import threading
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.estimator import DivergenceError
from sparse_dict.metrics import explained_variance, mean_max_cosine_similarity
from memory_peak import peak_bytes


def small_sae(**kwargs):
    params = dict(n_components=16, max_iter=3, batch_size=64, device="cpu", random_state=0)
    params.update(kwargs)
    return SparseAutoencoderDictionary(**params)


@pytest.fixture(scope="module")
def X():
    rng = np.random.RandomState(0)
    return rng.exponential(size=(300, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(X):
    return small_sae().fit(X)


# --------------------------------------------------------------- the model


def test_recovers_known_atoms():
    # Sharkey et al.'s set-up, small: 64-d data built from 128 true atoms,
    # about 5 active per row; a 2x over-complete SAE should find them.
    X, true_atoms, _ = make_superposition(
        n_samples=20_000, n_features=64, n_components=128, random_state=0, dtype=np.float32
    )
    sae = SparseAutoencoderDictionary(
        n_components=256, l1_coef=3.0, learning_rate=3e-3, max_iter=20,
        batch_size=256, device="cpu", random_state=0,
    ).fit(X)
    assert mean_max_cosine_similarity(sae.components_, true_atoms) >= 0.9
    assert sae.score(X) > 0.6


def test_atoms_unit_norm_and_codes_nonnegative(fitted, X):
    np.testing.assert_allclose(np.linalg.norm(fitted.components_, axis=1), 1.0, atol=1e-5)
    codes = fitted.transform(X)
    assert codes.min() >= 0
    assert codes.shape == (X.shape[0], 16)


def test_transform_matches_formula(fitted, X):
    expected = np.maximum(
        (X - fitted.decoder_bias_) @ fitted.encoder_weights_.T + fitted.encoder_bias_, 0
    )
    np.testing.assert_allclose(fitted.transform(X), expected, rtol=1e-4, atol=1e-5)
    codes = fitted.transform(X)
    np.testing.assert_allclose(
        fitted.inverse_transform(codes),
        codes @ fitted.components_ + fitted.decoder_bias_,
        rtol=1e-4, atol=1e-5,
    )


def test_scale_is_folded_back():
    # The same data in other units gives the same codes up to that factor:
    # the training scale makes the fit unit-free.
    rng = np.random.RandomState(1)
    X = rng.exponential(size=(256, 6))
    a = small_sae().fit(X)
    b = small_sae().fit(X * 1000.0)
    np.testing.assert_allclose(b.components_, a.components_, rtol=1e-4, atol=1e-5)
    # atol in the units of X * 1000: a code at ReLU's edge (0.03 there) may
    # differ in its third digit after a dozen steps of rounding.
    np.testing.assert_allclose(b.transform(X * 1000.0), a.transform(X) * 1000.0,
                               rtol=1e-3, atol=1e-3)
    assert a.scale_ == pytest.approx(b.scale_ * 1000.0)


def test_default_n_components_is_a_multiple_of_features(X):
    sae = SparseAutoencoderDictionary(max_iter=1, device="cpu", random_state=0).fit(X)
    assert sae.components_.shape == (4 * X.shape[1], X.shape[1])


def test_fitted_attributes(fitted, X):
    assert fitted.n_features_in_ == 8
    assert fitted.n_components_ == 16
    assert fitted.n_iter_ == 3
    assert fitted.n_steps_ == 3 * int(np.ceil(300 / 64))
    assert fitted.loss_curve_.shape == (fitted.n_steps_,)
    assert set(fitted.history_) == {"loss", "mse", "l1", "l0", "auxk"}
    assert np.isfinite(fitted.loss_curve_).all()
    assert fitted.feature_frequencies_.shape == (16,)
    assert ((fitted.feature_frequencies_ >= 0) & (fitted.feature_frequencies_ <= 1)).all()
    # The firing frequencies agree with the codes of the training data.
    codes = fitted.transform(X)
    assert np.abs((codes > 0).mean(axis=0) - fitted.feature_frequencies_).max() < 0.2
    names = fitted.get_feature_names_out()
    assert list(names[:2]) == ["sparseautoencoderdictionary0", "sparseautoencoderdictionary1"]


@pytest.mark.parametrize("max_steps, rows", [(5, 300), (7, 300 + 2 * 64), (12, 300 + 2 * 64)])
def test_feature_frequencies_count_a_whole_pass(X, max_steps, rows):
    # A pass of X is 5 steps of 64 rows (the last 44); a budget that ends the
    # run inside a pass counts that partial pass and the whole one before it.
    sae = small_sae(max_iter=None, max_steps=max_steps).fit(X)
    counts = sae.feature_frequencies_ * rows
    assert (counts > 0).any()
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert (counts <= rows).all()


def test_loss_decreases():
    X, _, _ = make_superposition(n_samples=4000, n_features=32, n_components=64, random_state=0)
    sae = small_sae(n_components=64, max_iter=10, l1_coef=1.0).fit(X)
    mse = sae.history_["mse"]
    assert mse[-10:].mean() < 0.5 * mse[:10].mean()


def test_same_random_state_is_bit_identical(X):
    a = small_sae(random_state=3).fit(X)
    b = small_sae(random_state=3).fit(X)
    assert np.array_equal(a.components_, b.components_)
    assert np.array_equal(a.encoder_weights_, b.encoder_weights_)
    c = small_sae(random_state=4).fit(X)
    assert not np.array_equal(a.components_, c.components_)


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_torch_s_global_modes_do_not_change_a_fit(X, activation):
    # A float64 default dtype made the parameters float64 and the fit fail
    # assigning float32 gradients; inside inference_mode a top-k fit failed
    # ("Inference tensors do not track version counter").
    reference = small_sae(activation=activation, random_state=0).fit(X)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        under_float64 = small_sae(activation=activation, random_state=0).fit(X)
    finally:
        torch.set_default_dtype(default)
    np.testing.assert_array_equal(under_float64.components_, reference.components_)
    with torch.inference_mode():
        inside = small_sae(activation=activation, random_state=0).fit(X)
        inside.partial_fit(X)
        assert torch.is_inference_mode_enabled()
    np.testing.assert_array_equal(inside.components_,
                                  clone(reference).fit(X).partial_fit(X).components_)


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_a_caller_s_autocast_does_not_change_a_fit_or_its_codes(X, activation):
    # Inside torch.autocast("cpu", dtype=torch.bfloat16) fit failed ("addmv
    # input tensors must have the same dtype") and transform, inverse_transform
    # and score failed ("Got unsupported ScalarType BFloat16").
    reference = small_sae(activation=activation, random_state=0).fit(X)
    codes = reference.transform(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = small_sae(activation=activation, random_state=0).fit(X)
        inside_codes = inside.transform(X)
        decoded = inside.inverse_transform(inside_codes)
        score = inside.score(X)
        assert torch.is_autocast_enabled("cpu")
    np.testing.assert_array_equal(inside.components_, reference.components_)
    np.testing.assert_array_equal(inside_codes, codes)
    np.testing.assert_array_equal(decoded, reference.inverse_transform(codes))
    assert score == reference.score(X)


def test_inverse_transform_takes_the_tensors_transform_takes(X):
    # Float32 tensor codes decoded in float64 (numpy float32 codes: float32),
    # and bfloat16 ones failed ("Got unsupported ScalarType BFloat16").
    sae = small_sae(random_state=0).fit(X)
    codes = sae.transform(X)
    expected = sae.inverse_transform(codes)
    got = sae.inverse_transform(torch.from_numpy(codes))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    halved = sae.inverse_transform(torch.from_numpy(codes).bfloat16())
    assert halved.dtype == np.float32
    np.testing.assert_allclose(halved, expected, rtol=0.02, atol=0.02 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_codes_decode_without_a_dense_batch(dtype):
    # Sparse codes were densified 8,192 rows at a time and multiplied by
    # every atom: 15 times as long as their own product at an L0 of 32 in
    # 4,096 atoms, and a (8,192, n_components) array on the way.
    rng = np.random.default_rng(0)
    sae = SparseAutoencoderDictionary(n_components=2048, activation="topk", k=4, max_steps=2,
                                      device="cpu", random_state=0)
    sae.fit(rng.standard_normal((512, 8)).astype(dtype))
    codes = sp.random(8192, 2048, density=4 / 2048, format="csr", dtype=dtype,
                      random_state=0)
    dense = sae.inverse_transform(codes.toarray())
    decoded, peak = peak_bytes(sae.inverse_transform, codes)
    assert decoded.dtype == dtype
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(decoded, dense, rtol=tolerance, atol=tolerance)
    assert peak < 4 * decoded.nbytes + codes.data.nbytes * 4


def test_float64_rows_that_float32_rounds_away_warn():
    # 1e8 plus a spread of 1: rounded to float32 the spread was gone, the fit
    # explained -0.003 (0.85 centred) and nothing said why.
    X = np.random.default_rng(0).exponential(size=(400, 8))
    for offset, warned in ((0.0, False), (1e5, False), (1e8, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small_sae(activation="topk", k=2, random_state=0).fit(X + offset)
        said = [str(w.message) for w in caught if "rounding error" in str(w.message)]
        assert bool(said) == warned, (offset, said)
    assert "about 100% of their variance" in said[0] and "X - X.mean(axis=0)" in said[0]


def test_dtype_follows_input(X):
    for dtype in (np.float32, np.float64):
        sae = small_sae().fit(X.astype(dtype))
        assert sae.components_.dtype == dtype
        assert sae.transform(X.astype(dtype)).dtype == dtype
        codes = sae.transform(X.astype(dtype))
        assert sae.inverse_transform(codes).dtype == dtype


def test_sparse_input_matches_dense(X):
    Xs = X.copy()
    Xs[Xs < 1.0] = 0.0
    dense = small_sae().fit(Xs)
    sparse = small_sae().fit(sp.csr_matrix(Xs))
    assert np.array_equal(dense.components_, sparse.components_)
    np.testing.assert_allclose(sparse.transform(sp.csr_matrix(Xs)), dense.transform(Xs), rtol=1e-6)


def test_memmap_is_read_in_batches(tmp_path):
    n, d = 120_000, 32  # 15 MB of float32
    path = tmp_path / "acts.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    rng = np.random.RandomState(0)
    for start in range(0, n, 20_000):
        mm[start : start + 20_000] = rng.exponential(size=(20_000, d))
    mm.flush()
    del mm
    X = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    # A first fit imports what fitting needs, which tracemalloc would count.
    small_sae(n_components=32, max_iter=1).fit(X[:1000])
    sae, peak = peak_bytes(small_sae(n_components=32, max_iter=1, batch_size=512).fit, X)
    assert sae.n_steps_ == int(np.ceil(n / 512))
    # A copy of the data would be 15 MB; batches and statistics are far less.
    assert peak < 0.3 * X.nbytes, peak


def test_a_float16_memmap_is_read_in_float32_batches(tmp_path):
    n, d = 120_000, 32  # 7.7 MB of float16; scikit-learn's float64 copy would be 31 MB
    values = np.random.RandomState(0).exponential(size=(n, d)).astype(np.float16)
    np.save(tmp_path / "acts.npy", values)
    X = np.load(tmp_path / "acts.npy", mmap_mode="r")
    small_sae(n_components=32, max_iter=1).fit(X[:1000])
    sae, peak = peak_bytes(small_sae(n_components=32, max_iter=1, batch_size=512).fit, X)
    assert peak < 0.5 * X.nbytes, peak
    # The same model as from the float32 values, and float32 results.
    same = small_sae(n_components=32, max_iter=1, batch_size=512).fit(values.astype(np.float32))
    np.testing.assert_array_equal(sae.components_, same.components_)
    assert sae.components_.dtype == np.float32 and sae.transform(X[:5]).dtype == np.float32
    for bad in (np.nan, np.inf):
        broken = values[:2000].copy()
        broken[7, 3] = bad
        with pytest.raises(ValueError, match="NaN" if np.isnan(bad) else "infinity"):
            small_sae(n_components=8).fit(broken)


def test_float16_in_any_container_gives_float32(X):
    pd = pytest.importorskip("pandas")
    sae = small_sae().fit(X)
    frame = pd.DataFrame(X.astype(np.float16))
    codes = sae.transform(frame)
    assert codes.dtype == np.float32
    np.testing.assert_array_equal(codes, sae.transform(X.astype(np.float16)))
    decoded = sae.inverse_transform(codes.astype(np.float16))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, sae.inverse_transform(
        codes.astype(np.float16).astype(np.float32)))
    # Codes solved against the atoms too (a LassoCoder inside).
    sae.set_params(transform_algorithm="omp")
    assert sae.transform(frame).dtype == np.float32


def test_partial_fit_continues(X):
    sae = small_sae()
    sae.partial_fit(X)
    first_steps = sae.n_steps_
    components = sae.components_.copy()
    sae.partial_fit(X)
    assert sae.n_iter_ == 2
    assert sae.n_steps_ == 2 * first_steps
    assert len(sae.loss_curve_) == sae.n_steps_
    assert not np.array_equal(components, sae.components_)
    with pytest.raises(ValueError, match="X has 3 features"):
        sae.partial_fit(X[:, :3])


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_partial_fit_goes_on_from_the_fitted_attributes(X, activation, dtype):
    X = X.astype(dtype)
    sae = small_sae(activation=activation, k=3).fit(X)
    # Values unchanged (here reassigned as copies) keep the optimiser's state:
    # the same as an untouched copy, to the bit.
    untouched = pickle.loads(pickle.dumps(sae))
    for name in ("components_", "encoder_weights_", "encoder_bias_", "decoder_bias_"):
        setattr(sae, name, getattr(sae, name).copy())
    sae.partial_fit(X[:64])
    untouched.partial_fit(X[:64])
    np.testing.assert_array_equal(sae.components_, untouched.components_)
    np.testing.assert_array_equal(sae.encoder_weights_, untouched.encoder_weights_)

    # Values set by hand are what transform uses, and partial_fit goes on
    # from them (as scikit-learn's does from components_), not from the
    # values they replaced.
    atoms = np.random.RandomState(1).normal(size=sae.components_.shape).astype(dtype)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    sae.components_ = atoms
    sae.decoder_bias_ = np.zeros_like(sae.decoder_bias_)
    sae.partial_fit(X[:64])  # one step
    assert np.abs(sae.components_ - atoms).max() < 0.05
    assert np.abs(sae.decoder_bias_).max() < 0.05


def test_a_partial_fit_call_copies_its_own_steps_not_the_whole_record(X):
    # Every call copied the trainer's whole record of steps into history_
    # (and the trainer concatenated, summed and sorted all of it): a stream's
    # calls cost in proportion to every step before them. After a record of
    # 200,000 steps, a call now allocates far less than one column of it.
    from sparse_dict._torch.model import STAT_NAMES

    steps, sae = 200_000, small_sae(n_components=8, batch_size=16).partial_fit(X)
    X = X[:32]  # two steps a call
    trainer = sae._trainer
    trainer.history = np.concatenate([np.tile(trainer.history[-1:], (steps, 1)),
                                      trainer.history])
    trainer.history_rows = np.concatenate([np.full(steps, 16.0), trainer.history_rows])
    for _ in range(2):  # the record set by hand is taken in whole, once
        sae.partial_fit(X)
    held = sae.history_
    kept = {name: column.copy() for name, column in held.items()}
    _, peak = peak_bytes(lambda: [sae.partial_fit(X) for _ in range(3)])
    assert peak < steps * 8 // 4, peak  # a column is steps * 8 bytes
    # The arrays a user kept stayed as they were; the new ones go on from them.
    for name, column in held.items():
        np.testing.assert_array_equal(column, kept[name])
        assert len(sae.history_[name]) == len(column) + 6
        np.testing.assert_array_equal(sae.history_[name][:len(column)], column)
    np.testing.assert_array_equal(np.stack([sae.history_[name] for name in STAT_NAMES], 1),
                                  trainer.history)
    assert sae.loss_curve_ is sae.history_["loss"]
    tail = sae.history_["l0"][-(len(trainer.history) // 10):]
    assert sae.train_l0_ == float(np.copy(tail).mean())
    # A pickle holds history_ as it is.
    copy = pickle.loads(pickle.dumps(sae))
    for name in STAT_NAMES:
        np.testing.assert_array_equal(copy.history_[name], sae.history_[name])
    for twin in (sae, copy):
        twin.partial_fit(X)
    for name in STAT_NAMES:
        np.testing.assert_array_equal(copy.history_[name], sae.history_[name])


def test_partial_fit_refuses_fitted_attributes_of_another_shape(X):
    sae = small_sae().fit(X)
    before = sae.encoder_bias_.copy()
    sae.components_ = sae.components_[:, :4]
    with pytest.raises(ValueError, match=r"components_ has shape \(16, 4\).*\(16, 8\)"):
        sae.partial_fit(X)
    np.testing.assert_array_equal(sae.encoder_bias_, before)


def test_partial_fit_then_fit_resets(X):
    sae = small_sae()
    sae.partial_fit(X)
    sae.partial_fit(X)
    sae.fit(X)
    assert sae.n_iter_ == 3
    assert len(sae.loss_curve_) == sae.n_steps_


def test_max_steps_budget(X):
    sae = small_sae(max_iter=100, max_steps=7).fit(X)
    assert sae.n_steps_ == 7
    assert sae.n_iter_ == 2


def test_counts_given_as_small_numpy_ints_are_counts(X):
    # numpy keeps an int8's dtype in arithmetic: max_iter=np.int8(100) wrapped
    # round to 0 steps (an untrained dictionary), np.uint8 to 188 steps of
    # 700, and batch_size=np.int8(64) made fit fail with an OverflowError.
    reference = small_sae(max_iter=60, batch_size=64, n_components=16).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow
        for cast in (np.int8, np.uint8):
            sae = small_sae(max_iter=cast(60), batch_size=cast(64),
                            n_components=cast(16), transform_algorithm="omp",
                            transform_n_nonzero_coefs=cast(2)).fit(X)
            assert sae.n_steps_ == reference.n_steps_ == 300
            np.testing.assert_array_equal(sae.components_, reference.components_)
            assert sae.transform(X[:5]).shape == (5, 16)
            sae.partial_fit(X)


def test_callback_sees_progress_and_can_stop(X):
    seen = []

    def callback(info):
        seen.append(info)
        return info["epoch"] >= 2

    sae = small_sae(max_iter=10, callback=callback).fit(X)
    assert [i["epoch"] for i in seen] == [1, 2]
    assert sae.n_iter_ == 2
    assert {"loss", "l0", "dead", "step", "learning_rate"} <= set(seen[0])


@pytest.mark.parametrize("verbose", [0, 2])
def test_only_true_from_the_callback_stops_and_partial_fit_counts_its_passes(X, verbose):
    # A logging callback that returns what it is given (truthy) stopped a fit
    # after its first pass; numpy's True stops as Python's does.
    epochs = []
    sae = small_sae(max_iter=3, verbose=verbose,
                    callback=lambda info: epochs.append(info["epoch"]) or info).fit(X)
    assert sae.n_iter_ == 3 and epochs == [1, 2, 3]
    assert small_sae(max_iter=3, callback=lambda info: np.True_).fit(X).n_iter_ == 1
    # partial_fit's passes count across calls, as n_iter_ does.
    epochs.clear()
    stream = small_sae(verbose=verbose, callback=lambda info: epochs.append(info["epoch"]))
    for _ in range(3):
        stream.partial_fit(X)
    assert epochs == [1, 2, 3] and stream.n_iter_ == 3


def test_verbose_shows_progress(X, capsys):
    small_sae(verbose=1).fit(X)
    err = capsys.readouterr().err
    assert "SparseAutoencoderDictionary" in err
    # A pass of fewer steps than between updates (5 here) shows its figures too.
    small_sae(verbose=1).partial_fit(X)
    err = capsys.readouterr().err
    assert all(re.search(rf"{name}=[\d.e+-]+", err) for name in ("loss", "l0", "dead")), err
    small_sae(verbose=0).fit(X)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_resampling_revives_dead_features(activation):
    # Kill a quarter of the features of a fitted model by hand (a very
    # negative encoder bias), then keep training: with resampling they are
    # restarted on badly reconstructed inputs and fire again; without, they
    # stay dead. BatchTopK's restart failed on a TopK buffer it lacks.
    X, _, _ = make_superposition(n_samples=3000, n_features=16, n_components=32, random_state=0)

    def trained(resample):
        sae = small_sae(n_components=64, max_iter=2, batch_size=128, activation=activation,
                        k=4, resample_dead=resample, resample_interval=5).fit(X)
        sae.encoder_bias_[:16] = -1e4
        return sae.partial_fit(X).partial_fit(X)

    off, on = trained(False), trained(True)
    assert off.n_resampled_ == 0
    assert ((off.transform(X) > 0).sum(axis=0)[:16] == 0).all()
    assert on.n_resampled_ >= 16
    assert ((on.transform(X) > 0).sum(axis=0)[:16] > 0).sum() >= 12
    assert np.isfinite(on.components_).all()
    np.testing.assert_allclose(np.linalg.norm(on.components_, axis=1), 1.0, atol=1e-5)


def test_partial_fit_resamples_only_where_the_call_trains_on():
    # A stream of one-batch calls resampled on a call's last step: the call
    # returned fresh atoms that fired on most rows (held-out EV 0.96 fell to
    # 0.60). Calls of a few rows restarted many features on one row, as
    # copies of one direction.
    X, _, _ = make_superposition(n_samples=3000, n_features=16, n_components=32, random_state=0)
    sae = small_sae(n_components=64, max_iter=2, batch_size=128, resample_dead=True,
                    resample_interval=5).fit(X)
    sae.encoder_bias_[:16] = -1e4
    for start in range(0, 12 * 128, 128):
        sae.partial_fit(X[start:start + 128])  # one step a call, past two resample checks
    assert sae.n_resampled_ == 0
    sae.set_params(batch_size=2).partial_fit(X[:20])  # 10 steps: checks at 1 and 6
    assert 1 <= sae.n_resampled_ <= 14  # the 2 + 12 inputs of the batches before them
    atoms = sae.components_ / np.linalg.norm(sae.components_, axis=1, keepdims=True)
    cosines = atoms @ atoms.T - 2 * np.eye(len(atoms))
    assert cosines.max() < 0.999


def test_partial_fit_calls_of_a_few_batches_still_resample():
    # A check was due at each multiple of the interval only: calls of 8
    # steps put every multiple in a call's last 30%, where none may run, and
    # dead features were never restarted (113 of 256 after 6,000 steps).
    X, _, _ = make_superposition(n_samples=3000, n_features=16, n_components=32, random_state=0)
    sae = small_sae(n_components=64, max_iter=None, max_steps=192, batch_size=32,
                    resample_dead=True, resample_interval=16).fit(X)
    sae.encoder_bias_[:16] = -1e4
    for start in range(0, 10 * 256, 256):
        sae.partial_fit(X[start:start + 256])  # 8 steps: multiples of 16 fall on the 8th
    assert sae.n_resampled_ >= 16
    assert ((sae.transform(X) > 0).sum(axis=0)[:16] > 0).sum() >= 12


def test_a_stream_s_frequencies_count_more_than_its_last_call():
    # Each call counted its own rows: after a one-row call every frequency
    # was 0 or 1, and after calls of 256 rows features that fire read 0.
    X, _, _ = make_superposition(n_samples=6000, n_features=16, n_components=48, n_active=3,
                                 random_state=0, dtype=np.float32)
    sae = small_sae(n_components=64, activation="topk", k=3, batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, 5120, 256):
            sae.partial_fit(X[start:start + 256])
        sae.partial_fit(X[5120:5121])
    frequencies = sae.feature_frequencies_
    assert np.all((frequencies >= 0) & (frequencies <= 1))
    assert np.count_nonzero((frequencies > 0) & (frequencies < 1)) >= 32
    fired = (sae.transform(X[:5120]) > 0).mean(axis=0)
    # Over the stream's latest rows: close to the firing on those rows.
    assert np.abs(frequencies - fired).mean() < 0.02


def test_training_after_load_keeps_the_record(tmp_path):
    # The loaded dictionary's trainer started its history and its count of
    # restarts empty: after one partial_fit, history_ held that call's steps
    # alone while n_steps_ went on, and a second save lost the first run's.
    X, _, _ = make_superposition(n_samples=2000, n_features=16, n_components=32, random_state=0)
    sae = small_sae(n_components=64, max_iter=2, batch_size=128, resample_dead=True,
                    resample_interval=5).fit(X)
    sae.encoder_bias_[:16] = -1e4
    sae.partial_fit(X)
    assert sae.n_resampled_ > 0
    loaded = SparseAutoencoderDictionary.load(sae.save(tmp_path / "d"))
    loaded.set_params(resample_dead=False).partial_fit(X[:512])
    sae.set_params(resample_dead=False).partial_fit(X[:512])
    assert loaded.n_steps_ == sae.n_steps_ == len(sae.loss_curve_)
    assert len(loaded.loss_curve_) == loaded.n_steps_
    np.testing.assert_array_equal(loaded.loss_curve_[:-4], sae.loss_curve_[:-4])
    assert loaded.n_resampled_ == sae.n_resampled_


def test_sparse_entries_stored_twice_are_checked_as_summed(fitted, X):
    # CSR may store an entry twice; rows are their sums. The checks read the
    # stored values: two of 2e38 passed, and fit then "diverged at step 0"
    # while transform returned non-finite codes.
    import scipy.sparse as sp

    dense = np.asarray(X[:50], dtype=np.float32)
    plain = sp.csr_matrix(dense)
    start = plain.indptr[0]
    data = np.r_[np.float32(2e38), np.float32(2e38), plain.data[start + 1:]].astype(np.float32)
    indices = np.r_[plain.indices[start], plain.indices[start:]]
    twice = sp.csr_matrix((data, indices, np.r_[0, plain.indptr[1:] + 1]), shape=dense.shape)
    assert not np.isfinite(twice[0].toarray()).all()
    for call in (small_sae().fit, fitted.transform):
        with pytest.raises(ValueError, match="infinity"):
            call(twice)
    # Finite duplicates are summed as the rows have them, the user's matrix untouched.
    halves = sp.csr_matrix((np.r_[plain.data[start] / 2, plain.data[start] / 2,
                                  plain.data[start + 1:]].astype(np.float32), indices,
                            np.r_[0, plain.indptr[1:] + 1]), shape=dense.shape)
    np.testing.assert_allclose(fitted.transform(halves), fitted.transform(dense), rtol=1e-5,
                               atol=1e-6)
    assert not halves.has_canonical_format


def test_torch_tensors_are_read_as_arrays(fitted, X):
    # bfloat16 failed in scikit-learn's conversion ("Got unsupported
    # ScalarType BFloat16"); float32 gave float64 codes.
    import torch

    rows = np.asarray(X[:40], dtype=np.float32)
    codes = fitted.transform(torch.from_numpy(rows))
    assert codes.dtype == np.float32
    np.testing.assert_array_equal(codes, fitted.transform(rows))
    half = torch.from_numpy(rows).bfloat16()
    np.testing.assert_array_equal(fitted.transform(half), fitted.transform(half.float().numpy()))
    small_sae().fit(half)


def test_a_tail_of_outsized_rows_that_hides_a_poor_fit_warns():
    # 1% of the rows, isotropic at 10 times the others' norm, hold half the
    # variance: the fit explained 0.57 of all rows, 0.16 of the others (0.55
    # without those rows), and said nothing.
    rng = np.random.RandomState(0)
    X, _, _ = make_superposition(n_samples=4000, n_features=32, n_components=128, n_active=4,
                                 random_state=0)
    norm = np.median(np.linalg.norm(X - X.mean(0), axis=1))
    noisy = X.copy()
    rows = rng.choice(len(X), 40, replace=False)
    noise = rng.standard_normal((40, 32))
    noisy[rows] = 10 * norm * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    params = dict(n_components=128, random_state=0, max_steps=1500, device="cpu")
    with pytest.warns(UserWarning, match=r"The 40 rows of the sample farthest from the mean "
                                         r"\(1%\) hold \d+% of its variance") as record:
        SparseAutoencoderDictionary(**params).fit(noisy)
    message = next(str(w.message) for w in record if "farthest" in str(w.message))
    explained, rest = map(float, re.findall(r"explains (\S+) of the variance of all rows but "
                                            r"(\S+) of", message)[0])
    assert rest < explained - 0.2
    with warnings.catch_warnings(record=True) as clean:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(**params).fit(X)
    assert not [w for w in clean if "farthest" in str(w.message)]


def test_set_output_pandas(fitted, X):
    pd = pytest.importorskip("pandas")
    sae = clone(fitted).set_output(transform="pandas").fit(X)
    out = sae.transform(X)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(sae.get_feature_names_out())


# ---------------------------------------------------------- saving, pickling


def test_pickle_round_trip(fitted, X):
    loaded = pickle.loads(pickle.dumps(fitted))
    assert np.array_equal(loaded.transform(X), fitted.transform(X))
    # The optimiser state travels too: training continues from where it was.
    a = pickle.loads(pickle.dumps(fitted)).partial_fit(X)
    b = pickle.loads(pickle.dumps(fitted)).partial_fit(X)
    assert np.array_equal(a.components_, b.components_)


def test_gpu_model_unpickles_on_cpu(fitted, X, monkeypatch):
    if torch.cuda.is_available():
        # Fitted on the GPU for real, then unpickled as on a host without one.
        source = clone(fitted).set_params(device="cuda").fit(X)
    else:
        source = pickle.loads(pickle.dumps(fitted))  # not the shared fixture
    expected = source.transform(X)
    state = pickle.dumps(source.set_params(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        loaded = pickle.loads(state)
    assert loaded.device == "cpu"
    np.testing.assert_allclose(loaded.transform(X), expected, rtol=1e-4, atol=1e-5)


def test_an_unfitted_estimator_keeps_its_device_through_pickle_and_deepcopy(X, monkeypatch):
    # joblib pickles the clones it sends to worker processes: unpickled as
    # "cpu", cross_validate(n_jobs=2) trained device="cuda" on the CPU (with
    # a warning about a model "saved" with it) where n_jobs=1 raised fit's
    # error, and GridSearchCV failed only at its refit, its search lost.
    import copy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sae = SparseAutoencoderDictionary(n_components=8, device="cuda", max_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for copied in (pickle.loads(pickle.dumps(sae)), copy.deepcopy(sae)):
            assert copied.device == "cuda"
            with pytest.raises(ValueError, match="CUDA is not available"):
                copied.fit(X)


@pytest.mark.parametrize("how", ["joblib", "deepcopy"])
def test_the_cpu_fallback_warning_points_at_the_caller_s_line(fitted, monkeypatch, tmp_path,
                                                             how):
    # joblib.load pointed it at pickle.py, copy.deepcopy at copy.py.
    import copy

    import joblib

    source = pickle.loads(pickle.dumps(fitted)).set_params(device="cuda")
    joblib.dump(source, tmp_path / "d.joblib")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA is not available") as record:
        if how == "joblib":
            joblib.load(tmp_path / "d.joblib")
        else:
            copy.deepcopy(source)
    assert {w.filename for w in record} == {__file__}


def test_save_load_round_trip(fitted, X, tmp_path):
    path = fitted.save(tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    loaded = SparseAutoencoderDictionary.load(path)
    assert np.array_equal(loaded.transform(X), fitted.transform(X))
    assert loaded.get_params() == {**fitted.get_params(), "callback": None}
    assert loaded.n_steps_ == fitted.n_steps_
    np.testing.assert_array_equal(loaded.feature_frequencies_, fitted.feature_frequencies_)
    # A loaded dictionary can keep training (with a fresh optimiser).
    loaded.partial_fit(X)
    assert loaded.n_steps_ > fitted.n_steps_


def test_save_never_clobbers_by_accident(fitted, X, tmp_path):
    path = fitted.save(tmp_path / "sae")
    other = small_sae(random_state=9).fit(X)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(path)
    assert np.array_equal(SparseAutoencoderDictionary.load(path).components_, fitted.components_)
    other.save(path, overwrite=True)
    assert np.array_equal(SparseAutoencoderDictionary.load(path).components_, other.components_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_load_errors(tmp_path, fitted):
    with pytest.raises(FileNotFoundError, match="not a saved dictionary"):
        SparseAutoencoderDictionary.load(tmp_path / "missing")
    path = fitted.save(tmp_path / "sae")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparseAutoencoderDictionary.load(path)
    (path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="does not describe"):
        SparseAutoencoderDictionary.load(path)
    # A device asked for by name is checked at load, not at the first transform.
    good = fitted.save(tmp_path / "good")
    for device, words in (("cuda:7", "cuda"), ("tpu", "device")):
        with pytest.raises(ValueError, match=words):
            SparseAutoencoderDictionary.load(good, device=device)
    assert SparseAutoencoderDictionary.load(good, device="cpu").device == "cpu"


def test_save_unfitted_raises(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        small_sae().save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("nan", lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), "NaN"),
    ("inf", lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), "infinity"),
    ("1-D", lambda X: X[:, 0], "Expected 2D array"),
    ("empty", lambda X: X[:0], "0 sample"),
    ("one row", lambda X: X[:1], "1 sample"),
    ("strings", lambda X: X.astype(str).astype(object) + "x", "could not convert|string"),
    ("complex", lambda X: X.astype(np.complex128), "Complex data not supported"),
]


@pytest.mark.parametrize("name,make_bad,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_fit_input_leaves_estimator_unchanged(fitted, X, name, make_bad, message):
    sae = pickle.loads(pickle.dumps(fitted))
    before = sae.transform(X)
    with pytest.raises((ValueError, TypeError), match=message):
        sae.fit(make_bad(X.astype(np.float64)))
    assert np.array_equal(sae.transform(X), before)
    assert sae.n_steps_ == fitted.n_steps_


@pytest.mark.parametrize("value,message", [(np.nan, "Input X contains NaN"),
                                           (-np.inf, "Input X contains infinity")])
def test_bad_value_past_the_first_block_is_refused(value, message):
    # Over 4 MB: the values are checked in several blocks, and the last one
    # holds the bad value.
    X = np.ones((2100, 512), dtype=np.float32)
    X[-1, -1] = value
    sae = small_sae()
    with pytest.raises(ValueError, match=message):
        sae.fit(X)
    assert not hasattr(sae, "components_")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_bad_value_is_refused_without_a_numpy_warning_first(X, value):
    # The scan of X's values runs beside the initialisation, whose sums of a
    # sample holding the bad value must not warn before the scan refuses it
    # (an infinity gave "invalid value encountered in scalar subtract").
    bad = X.astype(np.float64)
    bad[3, 2] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="NaN|infinity"):
            small_sae().fit(bad)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_values_near_float32_s_largest_give_no_numpy_warning(X, method):
    # partial_fit's set-up let numpy's "overflow encountered in matmul" out,
    # where fit's kept it in.
    big = np.random.RandomState(0).rand(500, 8).astype(np.float32)
    big[5, 5] = 1e30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(SparseAutoencoderDictionary(n_components=16, max_steps=50, random_state=0),
                method)(big)
    assert not [w for w in caught if w.category is RuntimeWarning]


def test_the_value_scan_runs_beside_the_set_up_and_refuses_before_any_step(monkeypatch):
    # The scan of X's values runs in its own thread while the model is made
    # and initialised; a bad value still stops the fit before its first step.
    from sparse_dict import estimator
    from sparse_dict._torch import Trainer

    threads, trained = [], []
    real_check = estimator._check_values
    monkeypatch.setattr(estimator, "_check_values", lambda X: (
        threads.append(threading.current_thread().name), real_check(X))[-1])
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: trained.append(1))
    X = np.ones((300, 8), dtype=np.float32)
    X[5, 3] = np.nan
    sae = small_sae()
    with pytest.raises(ValueError, match="Input X contains NaN"):
        sae.fit(X)
    assert len(threads) == 1 and threads[0].startswith("sparse_dict-check") and not trained
    assert not hasattr(sae, "components_")
    # partial_fit scans in the caller's thread, as before.
    with pytest.raises(ValueError, match="Input X contains NaN"):
        sae.partial_fit(X)
    assert threads[-1] == threading.current_thread().name


def test_the_value_scan_s_thread_has_ended_when_training_starts(monkeypatch):
    # An idle thread that ran torch's operations slowed CPU training twice
    # over while it lived: it must be gone before the first step.
    from sparse_dict._torch import Trainer

    alive_at_training = []
    real_train = Trainer.train

    def train(self, *args, **kwargs):
        alive_at_training.extend(t.name for t in threading.enumerate()
                                 if t.name.startswith("sparse_dict-check"))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    small_sae().fit(np.random.RandomState(0).randn(300, 8))
    assert alive_at_training == []


def test_an_earlier_error_wins_over_the_scan_s(monkeypatch):
    # A fit refused during its set-up (here: the model cannot be made)
    # reports that, and the scan's thread has ended when fit returns.
    from sparse_dict import estimator

    scanned = []
    real_check = estimator._check_values

    def slow_check(X):
        time.sleep(0.2)  # still scanning when the set-up fails
        try:
            real_check(X)
        finally:
            scanned.append(threading.current_thread())

    def refuse(*args, **kwargs):
        raise MemoryError("no room for the model")

    monkeypatch.setattr(estimator, "_check_values", slow_check)
    monkeypatch.setattr(estimator.SparseAutoencoderDictionary, "_new_trainer", refuse)
    X = np.ones((300, 8), dtype=np.float32)
    X[0, 0] = np.inf
    with pytest.raises(MemoryError, match="no room"):
        small_sae().fit(X)
    assert scanned and not scanned[0].is_alive()


def _scan_after_the_first_step(monkeypatch):
    """On a GPU's terms (the scan beside the steps), a scan that ends only once a step ran.

    Returns the list of steps taken when the scan gave its verdict.
    """
    from sparse_dict import estimator
    from sparse_dict._torch import Trainer

    stepped, steps_at_verdict = threading.Event(), []
    real_check, real_apply = estimator._check_values, Trainer.apply_gradients

    def apply_gradients(self, config):
        real_apply(self, config)
        stepped.set()

    def check(X):
        assert stepped.wait(30), "no step ran beside the scan"
        steps_at_verdict.append(1)
        real_check(X)

    monkeypatch.setattr(estimator, "_scan_beside_steps", lambda device: True)
    monkeypatch.setattr(estimator, "_check_values", check)
    monkeypatch.setattr(Trainer, "apply_gradients", apply_gradients)
    return steps_at_verdict


def test_beside_the_steps_the_scan_s_refusal_wins_and_nothing_warns_first(monkeypatch):
    # On a GPU the first steps run while the values are scanned. Steps on
    # NaN rows diverge; the error is still the scan's, and the warning of a
    # shape (too few rows an atom) is not given for rows that are refused.
    steps_at_verdict = _scan_after_the_first_step(monkeypatch)
    X = np.random.RandomState(0).randn(300, 8).astype(np.float32)
    X[7, 2] = np.nan
    sae = small_sae(n_components=64, max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="Input X contains NaN") as caught:
            sae.fit(X)
    assert steps_at_verdict == [1]
    assert caught.value.__context__ is None  # no divergence behind it
    assert not hasattr(sae, "components_")


def test_beside_the_steps_a_clean_fit_is_the_same_and_warns_once(monkeypatch, X):
    rows = X[:300].astype(np.float32)
    with pytest.warns(UserWarning, match="rows an atom") as before:
        reference = small_sae(n_components=64).fit(rows)
    steps_at_verdict = _scan_after_the_first_step(monkeypatch)
    with pytest.warns(UserWarning, match="rows an atom") as after:
        sae = small_sae(n_components=64).fit(rows)
    assert steps_at_verdict == [1]
    assert np.array_equal(sae.components_, reference.components_)
    assert [str(w.message) for w in after] == [str(w.message) for w in before]


def test_transform_wrong_width(fitted, X):
    with pytest.raises(ValueError, match="X has 5 features, but SparseAutoencoderDictionary is expecting 8"):
        fitted.transform(X[:, :5])
    with pytest.raises(ValueError, match="expecting 16 codes"):
        fitted.inverse_transform(np.zeros((3, 5)))


@pytest.mark.parametrize(
    "param,value,message",
    [
        ("n_components", 0, "n_components"),
        ("l1_coef", -1.0, "l1_coef"),
        ("learning_rate", 0.0, "learning_rate"),
        ("batch_size", 0, "batch_size"),
        ("decoder_bias_init", "median", "decoder_bias_init"),
        ("device", "gpu", "device must be"),
        ("device", "cuda:7", "CUDA"),
    ],
)
def test_invalid_parameters(fitted, X, param, value, message):
    sae = pickle.loads(pickle.dumps(fitted)).set_params(**{param: value})
    with pytest.raises(ValueError, match=message):
        sae.fit(X)
    assert sae.n_steps_ == fitted.n_steps_


def test_divergence_is_reported_and_nothing_is_lost(fitted, X):
    sae = pickle.loads(pickle.dumps(fitted)).set_params(learning_rate=1e30, l1_coef=0.0)
    before = sae.components_.copy()
    with pytest.raises(DivergenceError, match=re.escape("Lower learning_rate")):
        sae.fit(X * 1e30)
    assert np.array_equal(sae.components_, before)
    with pytest.raises(DivergenceError):
        sae.partial_fit(X * 1e30)
    assert np.array_equal(sae.components_, before)
    assert np.isfinite(sae.transform(X)).all()
    # The trainer was rolled back too: training continues normally.
    sae.set_params(learning_rate=1e-3).partial_fit(X)
    assert np.isfinite(sae.components_).all()


def test_a_last_step_that_ruins_the_model_is_caught():
    # The history records each step's error before its update: a fit of one
    # step, or a last step, that blows the model up shows only in the final
    # model's error (on the calibration sample).
    X = np.random.RandomState(0).exponential(size=(600, 16)).astype(np.float32)
    sae = SparseAutoencoderDictionary(64, learning_rate=1e6, max_iter=1, random_state=0)
    with pytest.raises(DivergenceError, match="Lower learning_rate"):
        sae.fit(X)
    assert not hasattr(sae, "components_")


def test_partial_fit_calls_too_short_to_judge_alone_are_judged_together():
    # Steps too large spoil the model a little in each call of 8 steps;
    # judged call by call none is long enough, and the damage went unseen.
    X, _, _ = make_superposition(18000, 16, 32, random_state=0, dtype=np.float32)
    chunks = np.array_split(X, 9)
    sae = SparseAutoencoderDictionary(32, learning_rate=10.0, batch_size=256, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DivergenceError, match="Lower learning_rate"):
            for i, chunk in enumerate(chunks):
                before = getattr(sae, "components_", None)
                before = None if before is None else before.copy()
                sae.partial_fit(chunk)
    assert i < len(chunks) - 1
    np.testing.assert_array_equal(sae.components_, before)
    # The same stream at the default rate, and one whose later chunks have
    # five times the spread, train on without an error.
    for factor in (1.0, 5.0):
        sae = SparseAutoencoderDictionary(32, batch_size=256, random_state=0)
        for i, chunk in enumerate(chunks):
            sae.partial_fit(chunk * (factor if i >= 4 else 1.0))
        assert sae.score(X * factor) > 0.5


@pytest.mark.parametrize("random_state", [0, 3])
def test_partial_fit_on_a_stream_of_one_row_a_call_trains_without_false_alarms(random_state):
    # One row a call, as a stream gives them. The spread the error was judged
    # against came from the first call's two rows alone, and one row's error
    # can be ten times another's: a third of the calls raised a divergence
    # while the model explained a rising 0.3-0.5 of the data. Later, with
    # random_state=3 (and on a GPU with 0), calls 50 to 99 said the fit
    # explained none of the data: its end was judged on a window of steps
    # that still held the first ones.
    X, _, _ = make_superposition(n_samples=1000, n_features=32, n_components=64, n_active=4,
                                 random_state=0, dtype=np.float32)
    sae = SparseAutoencoderDictionary(n_components=64,
                                      random_state=random_state).partial_fit(X[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2, 400):
            sae.partial_fit(X[i:i + 1])
    assert sae.score(X) > 0.4
    # Every row trained on counts: 400 of them, with their spread.
    count, _, variance = sae._trainer.seen
    assert count == 400
    scaled = X[:400].astype(np.float64) * sae.scale_
    assert variance == pytest.approx(((scaled - scaled.mean(0)) ** 2).sum(1).mean(), rel=1e-5)


@pytest.mark.parametrize("activation, random_state", [("relu", 6), ("jumprelu", 1)])
def test_a_one_row_stream_is_not_judged_diverged_on_its_first_rows(activation, random_state):
    # At step 50 such a stream has seen 52 rows, and no step has yet moved
    # the model far from its start: errors 3 to 7 times the mean's read as a
    # divergence (DivergenceError at call 50 in 3 to 6 streams of 10), in
    # runs that went on to explain 0.45 to 0.77 of held-out rows.
    rng = np.random.default_rng(0)
    A = rng.normal(size=(48, 16))
    X = ((rng.exponential(size=(200, 48)) * (rng.random((200, 48)) < 0.08)) @ A
         + 0.3).astype(np.float32)
    sae = SparseAutoencoderDictionary(activation=activation, random_state=random_state)
    sae.partial_fit(X[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2, 120):
            sae.partial_fit(X[i:i + 1])
    assert sae.n_steps_ == 119


def test_a_partial_fit_that_diverges_leaves_the_rows_seen_as_they_were(X):
    sae = small_sae().partial_fit(X)
    seen = sae._trainer.seen
    sae.set_params(learning_rate=1e30, l1_coef=0.0)
    with pytest.raises(DivergenceError):
        sae.partial_fit(X * 1e30)
    assert sae._trainer.seen[0] == seen[0] and sae._trainer.seen[2] == seen[2]


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_rows_all_alike_get_one_warning_that_says_so(activation):
    # Nothing to explain: the optimiser's steps around the decoder bias moved
    # the error between 1e-8 and 2e-6 of the rows' norm, which read as a
    # divergence ("Lower learning_rate"), or as an unstable run.
    row = np.random.RandomState(0).standard_normal(32)
    X = np.tile(row, (2000, 1))
    sae = SparseAutoencoderDictionary(n_components=16, activation=activation, k=2,
                                      max_steps=200, random_state=0)
    with pytest.warns(UserWarning) as caught:
        sae.fit(X)
    assert [str(w.message)[:37] for w in caught] == ["Every row of X is the same (its 2,000"]
    np.testing.assert_allclose(sae.inverse_transform(sae.transform(X[:3])), X[:3], atol=2e-3)
    # A stream whose rows all match says so at its first call, and a later
    # call of other rows makes the rows judged as any others.
    stream = SparseAutoencoderDictionary(n_components=16, random_state=0)
    with pytest.warns(UserWarning, match="Every row of X is the same"):
        stream.partial_fit(X[:50])
    assert stream._trainer.rows_alike()
    stream.partial_fit(np.random.RandomState(1).standard_normal((200, 32)))
    assert not stream._trainer.rows_alike()


def test_rows_that_share_a_large_offset_are_counted_as_distinct():
    # A float32 projection of rows of spread 0.2 around 1e4 rounded them
    # together: "X has about 337 distinct rows among its 2,000".
    from sparse_dict._torch.train import _distinct_rows

    X, _, _ = make_superposition(n_samples=2000, n_features=32, n_components=64, n_active=4,
                                 random_state=0)
    assert _distinct_rows((X + 1e4).astype(np.float32), 2000) is None
    assert _distinct_rows(np.repeat(X[:100] + 1e4, 20, axis=0).astype(np.float32), 2000) < 150


def test_rows_that_repeat_only_as_zeros_are_not_said_to_repeat():
    # 12% all-zero rows among distinct ones fit the model of equally frequent
    # rows badly: on other such data (1,769 distinct of 2,000), "X has about
    # 2,000 distinct rows among its 2,000 (its rows repeat)". An estimate
    # within a tenth of the row count is no evidence of repeats, and the
    # warning counts rows. (Where the initial sample is all of X, its rows
    # are counted, not estimated: 1,770 of 2,000 here.)
    from sparse_dict._torch.train import _distinct_rows

    X, _, _ = make_superposition(n_samples=20_000, n_features=32, n_components=64, n_active=4,
                                 random_state=0, dtype=np.float32)
    X[np.random.RandomState(0).permutation(20_000)[:2310]] = 0.0
    assert _distinct_rows(X[::2], 20_000) is None
    assert _distinct_rows(X[:2000], 2000) == len(np.unique(X[:2000], axis=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sae(n_components=1280, max_iter=None, max_steps=3, random_state=0).fit(X)
    said = [str(w.message) for w in caught if "rows for 1,280 atoms" in str(w.message)
            or "distinct rows" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("X has 20,000 rows for 1,280 atoms"), said


def test_one_row_repeated_often_among_distinct_ones_is_not_few_rows():
    # A BOS token's activation on a fifth of the rows: the model of equally
    # frequent rows read 40,000 rows (31,784 distinct) as about 2,130
    # distinct, and warned that 256 atoms could memorise them.
    X, _, _ = make_superposition(n_samples=40_000, n_features=32, n_components=64,
                                 random_state=0, dtype=np.float32)
    X[np.random.RandomState(0).permutation(40_000)[:8000]] = X[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_sae(n_components=256, max_iter=None, max_steps=3, random_state=0).fit(X)
    assert not [w for w in caught if "distinct rows" in str(w.message)
                or "rows an atom" in str(w.message)]


def test_distinct_rows_are_counted_whatever_the_order_and_the_size_of_values():
    # The probe was the sample's first rows, which come from the start of X:
    # X repeated row by row read as 643 distinct rows among 4,000 (so one
    # said to memorise), X repeated block by block as having no repeats, and
    # shuffling either one flipped the verdict. Rows near float32's largest
    # values overflowed the float32 projection: 2,000 distinct rows read as 2.
    from sparse_dict._torch.data import sample_rows
    from sparse_dict._torch.train import _distinct_rows

    X, _, _ = make_superposition(n_samples=4000, n_features=32, n_components=128, n_active=4,
                                 random_state=0, dtype=np.float32)
    shuffle = np.random.RandomState(1).permutation

    def estimate(data):
        sample = sample_rows(data, 8192, np.random.RandomState(0), dtype=np.float32)
        return _distinct_rows(sample, len(data))

    pairs = np.repeat(X, 2, axis=0)
    assert estimate(pairs) == estimate(pairs[shuffle(len(pairs))])
    assert estimate(pairs) is None or estimate(pairs) > 3000
    tiled = np.tile(X[:1500], (5, 1))
    for data in (tiled, tiled[shuffle(len(tiled))]):
        assert 1200 < estimate(data) < 2000
    huge = X * np.float32(1e38 / np.abs(X).max())
    assert estimate(huge[:2000]) is None


def test_a_callback_that_stops_the_fit_gets_no_convergence_warning(X):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sae = small_sae(max_iter=50, callback=lambda info: info["epoch"] >= 2).fit(X)
    assert sae.n_iter_ == 2
    # Without the callback, the same two passes are too short to converge.
    with pytest.warns(ConvergenceWarning, match="too few"):
        small_sae(max_iter=2).fit(X)


def test_warmup_and_decay_that_overlap_are_refused(fitted, X):
    sae = pickle.loads(pickle.dumps(fitted)).set_params(warmup_fraction=0.6, decay_fraction=0.5)
    with pytest.raises(ValueError, match=r"warmup_fraction \(0\.6\) and decay_fraction "
                                         r"\(0\.5\) add up to more than 1"):
        sae.fit(X)
    np.testing.assert_array_equal(sae.components_, fitted.components_)
    small_sae(warmup_fraction=0.5, decay_fraction=0.5).fit(X)  # a sum of 1 is a schedule


def test_a_still_falling_loss_is_told_as_a_share_of_its_earlier_level():
    from sklearn.exceptions import ConvergenceWarning

    X, _, _ = make_superposition(n_samples=2000, n_features=32, n_components=64, n_active=4,
                                 random_state=0, dtype=np.float32)
    with pytest.warns(ConvergenceWarning, match="still falling") as caught:
        SparseAutoencoderDictionary(n_components=64, activation="topk", k=4, max_steps=300,
                                    random_state=0).fit(X)
    message = next(str(w.message) for w in caught if "still falling" in str(w.message))
    early, late, share = re.search(r"still falling \(([\d.e-]+) -> ([\d.e-]+), (\d+)% lower",
                                   message).groups()
    assert float(late) < float(early)
    assert int(share) == round(100 * (1 - float(late) / float(early)))


# --------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_samples=st.integers(2, 40),
    n_features=st.integers(1, 6),
    n_components=st.integers(1, 12),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 1000),
)
def test_properties(tmp_path_factory, n_samples, n_features, n_components, dtype, seed):
    rng = np.random.RandomState(seed)
    X = (rng.standard_normal((n_samples, n_features)) * rng.uniform(0.01, 100)).astype(dtype)
    sae = SparseAutoencoderDictionary(
        n_components=n_components, max_iter=2, batch_size=16, device="cpu", random_state=seed
    ).fit(X)
    codes = sae.transform(X)
    assert codes.shape == (n_samples, n_components)
    assert codes.dtype == dtype
    assert (codes >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1.0, atol=1e-4)
    X_hat = sae.inverse_transform(codes)
    assert X_hat.shape == X.shape and X_hat.dtype == dtype
    assert np.array_equal(pickle.loads(pickle.dumps(sae)).transform(X), codes)
    path = sae.save(tmp_path_factory.mktemp("sae") / "d")
    assert np.array_equal(SparseAutoencoderDictionary.load(path).transform(X), codes)


# ---------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_transform_and_cpu_pickle(X):
    sae = small_sae(device="cuda", bf16=True).fit(X)
    codes = sae.transform(X)
    cpu_copy = pickle.loads(pickle.dumps(sae)).set_params(device="cpu")
    np.testing.assert_allclose(cpu_copy.transform(X), codes, rtol=1e-4, atol=1e-5)
    assert all(not t.is_cuda for t in sae._trainer.__getstate__()["model_state"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_starts_from_a_fortran_ordered_dict_init(known):
    # The GPU's fused update reads the weights row by row: they must be
    # contiguous there too, whatever the layout of the atoms given.
    X, atoms = known
    params = dict(activation="topk", k=3, max_steps=50, batch_size=256, random_state=0)
    start = SparseAutoencoderDictionary(dict_init=np.asfortranarray(atoms), device="cuda",
                                        learning_rate=1e-9, **params).fit(X)
    assert _cosines(start.components_, atoms).min() > 0.9999
    kept = SparseAutoencoderDictionary(dict_init=np.asfortranarray(atoms), device="cuda",
                                       **params).fit(X)
    assert mean_max_cosine_similarity(kept.components_, atoms) > 0.95


def test_bf16_matrix_products_train_like_float32():
    # The bf16 path is meant for GPUs, but its arithmetic runs on the CPU too.
    X, _, _ = make_superposition(n_samples=4000, n_features=32, n_components=64, random_state=0)
    full = small_sae(n_components=128, max_iter=10, batch_size=256).fit(X)
    half = small_sae(n_components=128, max_iter=10, batch_size=256, bf16=True).fit(X)
    assert half.components_.dtype == X.dtype
    assert abs(half.score(X) - full.score(X)) < 0.05
    assert half.score(X) > 0.2  # training happened: an untrained model scores about 0


def test_verbose_2_adds_a_line_per_pass(X, capsys):
    small_sae(verbose=2, max_iter=2).fit(X)
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.startswith("pass ")]
    assert [ln.split(":")[0] for ln in lines] == ["pass 1", "pass 2"]
    small_sae(verbose=1, max_iter=2).fit(X)
    captured = capsys.readouterr()
    assert "pass 1:" not in captured.out + captured.err


def test_sparse_step_parameter():
    X = np.abs(np.random.RandomState(0).standard_normal((300, 16))).astype(np.float32)
    fits = {}
    for sparse_step in (True, False):
        est = SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=5, batch_size=64,
                                          sparse_step=sparse_step, random_state=0)
        with pytest.warns(UserWarning):  # five steps are too few to converge
            fits[sparse_step] = est.fit(X)
    # The two steps give the same gradients up to rounding: the same fit.
    np.testing.assert_allclose(fits[True].components_, fits[False].components_, atol=1e-4)
    with pytest.raises(ValueError, match="sparse_step=True needs activation='topk'"):
        SparseAutoencoderDictionary(64, activation="relu", sparse_step=True, max_steps=2).fit(X)
    with pytest.raises(ValueError, match="sparse_step"):
        SparseAutoencoderDictionary(64, sparse_step="always").fit(X)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_k_as_large_as_the_input_width_warns(method):
    X = np.abs(np.random.RandomState(0).standard_normal((600, 8))).astype(np.float32)
    for activation in ("topk", "batchtopk"):
        sae = SparseAutoencoderDictionary(64, activation=activation, k=16, max_steps=3,
                                          random_state=0)
        with pytest.warns(UserWarning, match=r"k=16 keeps 16 features a row on 8 input") as record:
            getattr(sae, method)(X)
        assert record[0].filename == __file__  # points at the caller's line
    import warnings

    for params in (dict(activation="topk", k=7), dict(activation="relu")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SparseAutoencoderDictionary(max_steps=3, random_state=0, **params).fit(X)
        assert not [w for w in caught if "input features" in str(w.message)]


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_k_not_below_n_components_warns_that_nothing_is_sparse(method):
    X = np.abs(np.random.RandomState(0).standard_normal((600, 12))).astype(np.float32)
    # Fewer atoms than input features: every feature kept, but not an exact
    # reconstruction (8 atoms on 12 dimensions), which the warning must not claim.
    sae = SparseAutoencoderDictionary(8, activation="topk", k=20, max_steps=3, random_state=0)
    with pytest.warns(UserWarning, match=r"k=20 is not below n_components=8: top-k keeps "
                                         r"every feature of every row, so the codes are not "
                                         r"sparse\. Choose") as record:
        getattr(sae, method)(X)
    assert record[0].filename == __file__
    assert not [w for w in record if "input features" in str(w.message)]
    # As many atoms as k, and more than the input width: both said, once.
    sae = SparseAutoencoderDictionary(16, activation="batchtopk", k=16, max_steps=3,
                                      random_state=0)
    with pytest.warns(UserWarning, match=r"not sparse; and 16 active atoms on 12 input "
                                         r"features reconstruct any row exactly") as record:
        getattr(sae, method)(X)
    assert sum("n_components=16" in str(w.message) for w in record) == 1
    assert not [w for w in record if "keeps 16 features a row" in str(w.message)]


def test_a_few_rows_of_outsized_norm_neither_set_the_scale_nor_pass_silently():
    # One row of 300 times the others' norm held 92% of the spread: scaled by
    # the mean, every other row shrank against the penalty, silently.
    X, _, _ = make_superposition(5000, 64, 256, random_state=0, dtype=np.float32)
    params = dict(n_components=256, max_steps=3, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = SparseAutoencoderDictionary(**params).fit(X)
    assert not [w for w in caught if "outsized" in str(w.message)]
    spoiled = X.copy()
    spoiled[0] *= 300
    with pytest.warns(UserWarning, match=r"The largest 5 of 5,000 rows sampled from X hold "
                                         r"9\d% of its spread.*set from the other rows") as record:
        est = SparseAutoencoderDictionary(**params).fit(spoiled)
    assert record[0].filename == __file__
    assert est.scale_ == pytest.approx(plain.scale_, rel=0.01)
    # Ten such rows in 2,000: the largest thousandth alone (2 rows) left 8
    # to set the scale, and a ReLU fit explained -0.02 of the normal rows.
    base = np.random.default_rng(0).exponential(size=(2000, 16)).astype(np.float32)
    clean = SparseAutoencoderDictionary(n_components=64, max_steps=3, random_state=0).fit(base)
    spoiled = base.copy()
    spoiled[:10] *= 1000
    with pytest.warns(UserWarning, match=r"The largest 10 of 2,000 rows sampled from X"):
        est = SparseAutoencoderDictionary(n_components=64, max_steps=3,
                                          random_state=0).fit(spoiled)
    assert est.scale_ == pytest.approx(clean.scale_, rel=0.02)


@pytest.mark.parametrize("big", [1e11, 1e13])
def test_one_corrupted_entry_far_beyond_the_rest_still_sets_no_scale(big):
    # Beside a squared distance of 1e22, the others' total subtracted from
    # the whole lost every digit: no outsized rows were found, the scale
    # came from the outlier, and the other rows' EV was -4,200, unwarned.
    X = np.random.default_rng(0).exponential(size=(2000, 16)).astype(np.float32)
    params = dict(n_components=32, max_steps=3, random_state=0)
    clean = SparseAutoencoderDictionary(**params).fit(X)
    X[7, 3] = big
    with pytest.warns(UserWarning, match=r"The largest 2 of 2,000 rows sampled from X hold "
                                         r"100% of its spread"):
        est = SparseAutoencoderDictionary(**params).fit(X)
    assert est.scale_ == pytest.approx(clean.scale_, rel=0.02)
    np.testing.assert_allclose(est.decoder_bias_, clean.decoder_bias_, atol=0.05)


def test_a_divergence_beside_outsized_rows_blames_them():
    X = np.random.default_rng(0).exponential(size=(2000, 16)).astype(np.float32)
    X[7, 3] = 1e18  # its square overflows float32 whatever the step
    with pytest.raises(DivergenceError, match=r"The largest 2 of 2,000 rows sampled from X "
                                              r"hold all but .* of its spread: rows that far "
                                              r"beyond the others overflow"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SparseAutoencoderDictionary(n_components=32, activation="topk", k=3,
                                        batch_size=256, max_steps=1000, random_state=0).fit(X)


def test_a_fit_that_barely_trained_is_not_taken_for_converged():
    # At learning_rate 1e-6 a TopK fit's loss went from 10.09 to 10.03 in
    # 3,000 steps (held-out EV 0.37 against 0.91): too little fall to be
    # "still falling", so it passed for converged, without a word.
    from sklearn.exceptions import ConvergenceWarning

    X, _, _ = make_superposition(4000, 16, 48, n_active=3, random_state=0, dtype=np.float32)
    params = dict(n_components=64, activation="topk", k=3, batch_size=256, max_steps=3000,
                  random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"had barely fallen from its start .*Raise "
                                                r"learning_rate \(now 1e-06\)"):
        SparseAutoencoderDictionary(learning_rate=1e-6, **params).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        SparseAutoencoderDictionary(**params).fit(X)
    # Started at the truth, a fit barely moves either, from a small error.
    _, atoms, _ = make_superposition(4000, 16, 48, n_active=3, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(dict_init=atoms, **{**params, "n_components": 48}).fit(X)
    assert not [w for w in caught if "barely" in str(w.message)]


def test_advice_to_train_longer_on_few_rows_says_what_it_costs():
    # 200 rows for 128 atoms: the convergence warning said to train for
    # more steps, which took held-out EV from 0.32 to -0.43.
    from sklearn.exceptions import ConvergenceWarning

    X, _, _ = make_superposition(n_samples=200, n_features=32, n_components=64,
                                 random_state=0, dtype=np.float32)
    with pytest.warns(ConvergenceWarning, match=r"But with 1\.6 rows an atom \(see the "
                                                r"warning on few rows\) more steps fit these "
                                                r"rows ever closer and new rows worse"):
        SparseAutoencoderDictionary(n_components=128, random_state=0).fit(X)
    # On ample rows the advice stands alone.
    X, _, _ = make_superposition(n_samples=4000, n_features=16, n_components=32,
                                 random_state=0, dtype=np.float32)
    with pytest.warns(ConvergenceWarning) as record:
        SparseAutoencoderDictionary(n_components=32, max_steps=60, random_state=0).fit(X)
    assert not [w for w in record if "rows an atom" in str(w.message)]


def test_repeated_rows_count_once_for_the_atoms():
    # 500 distinct rows repeated ten times: as easy to memorise as 500.
    rng = np.random.RandomState(0)
    base = rng.exponential(size=(500, 16)).astype(np.float32)
    X = base[rng.randint(0, 500, size=5000)]
    with pytest.warns(UserWarning, match=r"X has about [45]\d\d distinct rows among its "
                                         r"5,000 \(its rows repeat\) for 64 atoms") as record:
        SparseAutoencoderDictionary(n_components=64, max_steps=3, random_state=0).fit(X)
    assert [w.filename for w in record if "distinct rows" in str(w.message)] == [__file__]
    # As many rows, none repeated: nothing to say.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(n_components=64, max_steps=3, random_state=0).fit(
            rng.exponential(size=(5000, 16)).astype(np.float32))
    assert not [w for w in caught if "rows an atom" in str(w.message)]


def test_few_rows_for_the_atoms_warn_before_training():
    X = np.abs(np.random.RandomState(0).standard_normal((200, 8))).astype(np.float32)
    with pytest.warns(UserWarning, match=r"200 rows for 32 atoms \(6\.2 rows an atom\)") as record:
        SparseAutoencoderDictionary(max_steps=3, random_state=0).fit(X)
    message = next(str(w.message) for w in record if "rows an atom" in str(w.message))
    assert "n_components" in message and "score(X_held_out)" in message
    assert "fewer rows than atoms" not in message
    # Fewer rows than atoms (n_components=None at 100 features, 240 rows): such
    # fits explained -2.0 to -0.1 of held-out rows, which "0.55 at 2 rows an
    # atom" understated.
    few = np.abs(np.random.RandomState(0).standard_normal((240, 100))).astype(np.float32)
    with pytest.warns(UserWarning, match=r"240 rows for 400 atoms \(0\.6 rows an atom\)") as record:
        SparseAutoencoderDictionary(max_steps=3, random_state=0).fit(few)
    message = next(str(w.message) for w in record if "rows an atom" in str(w.message))
    assert "fewer rows than atoms it can be worse than predicting the mean" in message
    # Enough rows for the atoms: no such warning.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(n_components=2, max_steps=3, random_state=0).fit(X)
    assert not [w for w in caught if "rows an atom" in str(w.message)]
    # Just below the floor, the count is not rounded up to it ("16 rows an
    # atom ... at least 16 rows an atom").
    X = np.abs(np.random.RandomState(0).standard_normal((500, 8))).astype(np.float32)
    with pytest.warns(UserWarning, match=r"500 rows for 32 atoms \(15\.6 rows an atom\)"):
        SparseAutoencoderDictionary(n_components=32, max_steps=3, random_state=0).fit(X[:500])


def test_warnings_after_training_point_at_the_callers_line():
    # The convergence and unused-features warnings are raised deep inside
    # fit (under scikit-learn's wrapper); they must name the user's line,
    # directly and through a Pipeline, so that module filters match.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline

    from sklearn.model_selection import GridSearchCV

    X, _, _ = make_superposition(2000, 16, 32, n_active=3, random_state=0, dtype=np.float32)
    for fit in (lambda est: est.fit(X), lambda est: make_pipeline(est).fit(X),
                lambda est: GridSearchCV(est, {"k": [2]}, cv=2).fit(X)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(SparseAutoencoderDictionary(1024, activation="topk", k=2, resample_dead=False,
                                            max_steps=100, batch_size=256, random_state=0))
        ours = [w for w in caught if issubclass(w.category, (ConvergenceWarning, UserWarning))]
        assert any(issubclass(w.category, ConvergenceWarning) for w in ours)
        assert any("fired on none of the last" in str(w.message) for w in ours)
        assert {w.filename for w in ours} == {__file__}


def test_a_warning_raised_under_a_torch_decorator_points_at_the_caller():
    # On a GPU, fit reached the warnings through a method wrapped by
    # torch.no_grad(): four warnings named torch/utils/_contextlib.py.
    import torch

    from sparse_dict._warn import warn_at_caller

    with pytest.warns(UserWarning, match="careful") as record:
        torch.no_grad()(warn_at_caller)("careful")
    assert [w.filename for w in record] == [__file__]


def test_a_changed_activation_is_refused_until_fit(tmp_path):
    # The weights were fitted for one mechanism: reading them through
    # another (or continuing to train them with another's penalty) is refused
    # by name, and nothing fitted is lost; fit trains the new one.
    X, _, _ = make_superposition(1500, 16, 32, n_active=3, random_state=0, dtype=np.float32)
    sae = SparseAutoencoderDictionary(32, max_steps=40, random_state=0)
    with pytest.warns(Warning):
        sae.fit(X)
    before, codes = sae.components_.copy(), sae.transform(X)
    for activation in ("topk", "jumprelu", "batchtopk"):
        sae.set_params(activation=activation)
        for call in (lambda: sae.transform(X), lambda: sae.partial_fit(X),
                     lambda: sae.save(tmp_path / activation),
                     lambda: sae.set_params(transform_algorithm="omp").transform(X)):
            with pytest.raises(ValueError, match=rf"fitted with activation='relu', but "
                                                 rf"activation is now '{activation}'"):
                call()
            sae.set_params(transform_algorithm="encoder")
        np.testing.assert_array_equal(sae.components_, before)
        assert not (tmp_path / activation).exists()
    sae.set_params(activation="relu")
    np.testing.assert_array_equal(sae.transform(X), codes)
    # The same of a loaded or imported dictionary (it read the weights
    # through the new mechanism, and saved them as fitted by it).
    loaded = [SparseAutoencoderDictionary.load(sae.save(tmp_path / "saved")),
              SparseAutoencoderDictionary.from_saelens(sae.to_saelens(tmp_path / "lens"))]
    for other in loaded:
        other.set_params(activation="jumprelu")
        with pytest.raises(ValueError, match="fitted with activation='relu', but activation "
                                             "is now 'jumprelu'"):
            other.transform(X)
    sae.set_params(activation="topk", k=3)
    with pytest.warns(Warning):
        sae.fit(X)
    assert (sae.transform(X) > 0).sum(axis=1).max() == 3
    # k is read at each call, and OMP's budget follows it as the encoder's does.
    sae.set_params(k=5)
    assert (sae.transform(X) > 0).sum(axis=1).max() == 5
    sae.set_params(transform_algorithm="omp")
    assert (sae.transform(X) > 0).sum(axis=1).max() == 5


def _fresh_fit(X, **params):
    sae = small_sae(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sae.fit(X)


@pytest.mark.parametrize("param,value", [("learning_rate", -0.01), ("l1_coef", -1.0),
                                         ("batch_size", 0), ("batch_size", 2.5),
                                         ("warmup_fraction", 5.0)])
def test_partial_fit_checks_parameters_set_after_a_fit(X, param, value):
    # scikit-learn checks them at the first call only: a negative learning
    # rate trained by gradient ascent, a zero batch size divided by zero.
    sae = _fresh_fit(X)
    before = sae.components_.copy()
    sae.set_params(**{param: value})
    with pytest.raises(ValueError, match=f"The '{param}' parameter of "
                                         "SparseAutoencoderDictionary must be"):
        sae.partial_fit(X)
    np.testing.assert_array_equal(sae.components_, before)


@pytest.mark.parametrize("param,value", [("k", 0), ("k", 2.5), ("k", True), ("k", -1),
                                         ("transform_algorithm", "foo"),
                                         ("transform_alpha", -1.0),
                                         ("transform_n_nonzero_coefs", 0)])
def test_parameters_read_at_each_transform_are_checked_by_name(X, param, value):
    # k and transform_* may change after a fit; a value fit would refuse was
    # used as it was (k=0: all-zero codes), or refused by torch or by
    # LassoCoder under its own names.
    sae = _fresh_fit(X, activation="topk", k=3)
    sae.set_params(**{param: value})
    for call in (sae.transform, sae.score, lambda X: sae.inverse_transform(
            np.zeros((2, sae.n_components_)))):
        with pytest.raises(ValueError, match=f"The '{param}' parameter of "
                                             "SparseAutoencoderDictionary must be"):
            call(X)


def test_save_refuses_parameters_that_load_would_refuse(X, tmp_path):
    sae = _fresh_fit(X)
    folder = sae.save(tmp_path / "d")
    codes = sae.transform(X)
    for param, value in (("l1_coef", -1.0), ("transform_algorithm", "foo"),
                         ("device", "gpu")):
        bad = clone(sae).set_params(**{param: value})
        bad.__dict__.update({k: v for k, v in sae.__dict__.items() if k.endswith("_")})
        with pytest.raises(ValueError, match=param if param != "device" else "device must be"):
            bad.save(folder, overwrite=True)
        np.testing.assert_array_equal(SparseAutoencoderDictionary.load(folder).transform(X),
                                      codes)
    # n_components set after the fit is the next fit's: saved, and loaded as a
    # pickle keeps it (the folder was refused at load before).
    sae.set_params(n_components=32)
    sae.save(folder, overwrite=True)
    loaded = SparseAutoencoderDictionary.load(folder)
    assert (loaded.n_components, loaded.n_components_) == (32, sae.n_components_)
    np.testing.assert_array_equal(loaded.transform(X), codes)


def test_an_interrupted_partial_fit_leaves_the_stream_as_it_was(X):
    # After a call that was interrupted (its state restored), the stream goes
    # on exactly as if the call had never been made: the batch order too.
    def interrupted(info):
        if info["step"] > 2:
            raise KeyboardInterrupt

    runs = []
    for interrupt in (False, True):
        sae = small_sae(max_iter=None, random_state=np.random.RandomState(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae.partial_fit(X[:150])
            if interrupt:
                sae.set_params(callback=interrupted)
                with pytest.raises(KeyboardInterrupt):
                    sae.partial_fit(X[150:])
                sae.set_params(callback=None)
            sae.partial_fit(X[150:])
        runs.append(sae)
    assert runs[0].n_steps_ == runs[1].n_steps_
    np.testing.assert_array_equal(runs[0].components_, runs[1].components_)


def test_a_refused_or_interrupted_fit_leaves_the_caller_s_random_state(X):
    # fit draws its seed and batches from a RandomState given as
    # random_state; a fit refused for NaN rows, or interrupted, moved it, so
    # fitting again differed from a fresh fit (partial_fit kept it).
    def interrupted(info):
        if info["step"] > 2:
            raise KeyboardInterrupt

    bad = X.copy()
    bad[200, 3] = np.nan
    fresh = small_sae(random_state=np.random.RandomState(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.fit(X)
    for failure, error in ((lambda sae: sae.fit(bad), ValueError),
                           (lambda sae: sae.set_params(callback=interrupted).fit(X),
                            KeyboardInterrupt)):
        generator = np.random.RandomState(3)
        sae = small_sae(random_state=generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(error):
                failure(sae)
            assert generator.get_state()[2] == np.random.RandomState(3).get_state()[2]
            sae.set_params(callback=None).fit(X)
        np.testing.assert_array_equal(sae.components_, fresh.components_)
    # A fit that succeeds draws from it, as scikit-learn's estimators do.
    assert generator.get_state()[2] != np.random.RandomState(3).get_state()[2]


def test_fit_forgets_what_partial_fit_left(X):
    # "Reset, then train": the batch order partial_fit draws from is not kept.
    a = _fresh_fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.partial_fit(X)
        b = small_sae()
        b.partial_fit(X)
        b.partial_fit(X)
        b.fit(X)
        b.partial_fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)


def test_scikit_learn_machinery_a_search_combines_it_with(tmp_path):
    import sklearn
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sparse_dict.model_selection import explained_variance_scorer

    X, _, _ = make_superposition(600, 8, 16, n_active=2, random_state=0, dtype=np.float32)
    params = dict(n_components=16, max_steps=20, batch_size=64, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A global pandas output leaves score's own codes arrays (OMP's codes
        # were a DataFrame inside score, which failed).
        omp = SparseAutoencoderDictionary(transform_algorithm="omp", **params).fit(X)
        with sklearn.config_context(transform_output="pandas"):
            assert hasattr(omp.transform(X[:3]), "columns")
            assert np.isfinite(omp.score(X))
        # A grid of numpy integers saves (JSON has no int64).
        search = GridSearchCV(SparseAutoencoderDictionary(activation="topk", **params),
                              {"k": np.arange(2, 4)}, cv=2,
                              scoring=explained_variance_scorer).fit(X)
        assert isinstance(search.best_estimator_.k, np.integer)
        saved = search.best_estimator_.save(tmp_path / "best")
        assert SparseAutoencoderDictionary.load(saved).k == search.best_estimator_.k
        # With metadata routing on, provenance is requested as any fit
        # argument is (SLEP006).
        provenance = {"model": "test", "n_features": 8}
        with sklearn.config_context(enable_metadata_routing=True):
            sae = SparseAutoencoderDictionary(**params).set_fit_request(provenance=True)
            pipe = make_pipeline(StandardScaler(), sae).fit(X, provenance=provenance)
            assert pipe[-1].provenance_["model"] == "test"
            with pytest.raises(Exception, match="provenance"):
                make_pipeline(SparseAutoencoderDictionary(**params)).fit(
                    X, provenance=provenance)
        # A stream's last chunk may be one row, once the model is set up.
        stream = SparseAutoencoderDictionary(**params)
        stream.partial_fit(X[:300])
        stream.partial_fit(X[300:301])
        assert stream.n_iter_ == 2
        # n_components changed since: partial_fit would go on with the
        # fitted atoms regardless; it says so and changes nothing.
        before = stream.components_.copy()
        stream.set_params(n_components=99)
        with pytest.raises(ValueError, match=r"fitted with 16 atoms, but n_components is "
                                             r"now 99; partial_fit goes on"):
            stream.partial_fit(X[:300])
        assert stream.n_iter_ == 2 and np.array_equal(stream.components_, before)
        # The first call's rows set the scale: one row is refused, and the
        # error says why and how to start a stream.
        for start in (SparseAutoencoderDictionary(**params).partial_fit,
                      SparseAutoencoderDictionary(**params).fit):
            with pytest.raises(ValueError, match=r"X has 1 sample, but the first training "
                                                 r"call needs at least 2: .*input scale"):
                start(X[:1])


# ------------------------------------------------------------- dict_init


@pytest.fixture(scope="module")
def known():
    X, atoms, _ = make_superposition(4000, 16, 32, n_active=3, random_state=0,
                                     dtype=np.float32)
    return X, atoms


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_dict_init_is_where_the_atoms_and_the_encoder_start(known, method):
    X, atoms = known
    # Scaled rows: only their directions count. A learning rate too small to
    # move anything leaves the start to be read off the fitted attributes.
    est = SparseAutoencoderDictionary(dict_init=3.0 * atoms, learning_rate=1e-9, max_steps=2,
                                      batch_size=256, device="cpu", random_state=0)
    getattr(est, method)(X)
    assert est.n_components_ == 32  # taken from dict_init's rows
    assert _cosines(est.components_, atoms).min() > 0.9999
    assert _cosines(est.encoder_weights_, atoms).min() > 0.9999


def test_dict_init_at_the_true_atoms_keeps_them(known):
    X, atoms = known
    params = dict(n_components=32, activation="topk", k=3, max_steps=50, batch_size=256,
                  device="cpu", random_state=0)
    from_random = SparseAutoencoderDictionary(**params).fit(X)
    from_truth = SparseAutoencoderDictionary(dict_init=atoms, **params).fit(X)
    # 50 steps are far too few to find the atoms from a random start
    # (measured 0.61) and enough to keep them from the true ones (0.98).
    assert mean_max_cosine_similarity(from_truth.components_, atoms) > 0.95
    assert mean_max_cosine_similarity(from_random.components_, atoms) < 0.8


@pytest.mark.parametrize("bad, message", [
    (lambda a: a[:10], r"dict_init has shape \(10, 16\); it must be \(n_components, "
                       r"n_features\) = \(32, 16\)"),
    (lambda a: a[:, :5], r"dict_init has shape \(32, 5\); it must be .* = \(32, 16\)"),
    (lambda a: np.vstack([a[:-2], np.zeros((2, 16))]), r"dict_init's row 30 is all zeros "
                                                        r"\(2 all-zero rows in all\)"),
    (lambda a: np.where(a > 0.5, np.nan, a), r"dict_init contains NaN"),
    (lambda a: "atoms", r"'dict_init' parameter .* must be an array-like or None"),
    # A copy and a multiple of earlier rows: they would never separate.
    (lambda a: np.vstack([a[:30], a[3], 2.5 * a[7]]),
     r"dict_init's rows 3 and 30 point the same way \(2 rows repeat"),
    (lambda a: np.ones((32, 16)), r"dict_init's rows 0 and 1 point the same way \(31 rows"),
])
def test_bad_dict_init_is_refused_and_the_fitted_dictionary_kept(known, bad, message):
    X, atoms = known
    est = SparseAutoencoderDictionary(32, max_steps=5, device="cpu", random_state=0).fit(X)
    before = est.components_.copy()
    est.set_params(dict_init=bad(atoms))
    with pytest.raises(ValueError, match=message):
        est.fit(X)
    np.testing.assert_array_equal(est.components_, before)


def test_opposite_atoms_in_dict_init_are_distinct(known):
    X, atoms = known
    start = np.vstack([atoms[:16], -atoms[:16]])
    est = SparseAutoencoderDictionary(dict_init=start, max_steps=2, learning_rate=1e-9,
                                      device="cpu", random_state=0).fit(X)
    np.testing.assert_allclose(est.components_[16:], -est.components_[:16], atol=1e-6)


def test_dict_init_and_n_components_must_agree(known):
    X, atoms = known
    with pytest.raises(ValueError, match=r"must be \(n_components, n_features\) = \(64, 16\)"):
        SparseAutoencoderDictionary(64, dict_init=atoms, max_steps=5, device="cpu").fit(X)


def test_save_keeps_dict_init(known, tmp_path):
    X, atoms = known
    est = SparseAutoencoderDictionary(dict_init=atoms, max_steps=5, device="cpu",
                                      random_state=0).fit(X)
    loaded = SparseAutoencoderDictionary.load(est.save(tmp_path / "with"))
    np.testing.assert_array_equal(loaded.dict_init, atoms)
    # The loaded parameter starts a new fit where the original's did.
    np.testing.assert_array_equal(clone(loaded).fit(X).components_,
                                  clone(est).fit(X).components_)
    plain = SparseAutoencoderDictionary(32, max_steps=5, device="cpu").fit(X)
    assert SparseAutoencoderDictionary.load(plain.save(tmp_path / "without")).dict_init is None


def test_dict_init_in_any_memory_layout_trains_the_same(known):
    # scikit-learn's components_ can be Fortran-ordered; torch's fused CPU
    # Adam stepped parameters of that layout wrongly, and such starts diverged.
    X, atoms = known
    params = dict(activation="topk", k=3, max_steps=100, batch_size=256, device="cpu",
                  random_state=0)
    c_order = SparseAutoencoderDictionary(dict_init=np.ascontiguousarray(atoms), **params)
    f_order = SparseAutoencoderDictionary(dict_init=np.asfortranarray(atoms), **params)
    np.testing.assert_allclose(f_order.fit(X).components_, c_order.fit(X).components_,
                               atol=1e-6)


@pytest.mark.parametrize("algorithm", ["lasso_lars", "lasso_cd", "threshold"])
def test_the_default_transform_alpha_codes_alike_at_any_scale(X, algorithm):
    # 1.0 in X's units coded data of scale 100 with half the atoms and data
    # of scale 0.01 with none (EV -0.01), though the fits were the same.
    params = dict(transform_algorithm=algorithm)
    tiny = small_sae(**params).fit(X * 1e-7)
    small = small_sae(**params).fit(X * 0.01)
    large = small_sae(**params).fit(X * 100)
    codes = small.transform(X * 0.01)
    assert 0 < np.count_nonzero(codes) < codes.size / 2
    np.testing.assert_allclose(large.transform(X * 100), codes * 1e4, rtol=1e-3,
                               atol=1e-3 * np.abs(codes).max() * 1e4)
    assert large.score(X * 100) == pytest.approx(small.score(X * 0.01), abs=1e-3)
    # LARS lost its codes at rows of 1e-6 (scikit-learn's absolute tolerance).
    np.testing.assert_allclose(tiny.transform(X * 1e-7), codes * 1e-5, rtol=1e-3,
                               atol=1e-3 * np.abs(codes).max() * 1e-5)


@pytest.mark.parametrize("algorithm", ["omp", "lasso_lars", "threshold"])
def test_a_solver_s_codes_follow_atoms_and_bias_set_after_a_transform(X, tmp_path, algorithm):
    # The solver built at the first transform was kept by its settings only:
    # a decoder_bias_ or components_ set (or edited in place) afterwards was
    # ignored by transform while inverse_transform used it, and save/load
    # gave other codes (a score of 0.09 in memory, 0.86 once loaded).
    sae = small_sae(random_state=0).fit(X).set_params(transform_algorithm=algorithm)
    before = sae.transform(X)
    sae.decoder_bias_ = np.zeros_like(sae.decoder_bias_)
    after = sae.transform(X)
    assert not np.array_equal(after, before)
    sae.save(tmp_path / "d")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "d")
    np.testing.assert_allclose(loaded.transform(X), after, rtol=1e-5, atol=1e-6)
    assert loaded.score(X) == pytest.approx(sae.score(X), abs=1e-6)
    sae.components_[:2] = sae.components_[[1, 0]]  # edited in place
    edited = sae.transform(X)
    assert not np.array_equal(edited, after)
    np.testing.assert_allclose(edited, _fresh_codes(sae, X), rtol=1e-5, atol=1e-6)


def test_pickles_leave_the_solvers_gram_behind(X):
    # The first solver transform caches a coder holding the atoms' float64
    # Gram matrix; pickles and deep copies carried it (4.3 MB grew to 38 MB
    # at 2,048 atoms), while the copy rebuilds it when it needs it.
    sae = small_sae(random_state=0, transform_algorithm="omp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    empty = len(pickle.dumps(sae))
    codes = sae.transform(X)
    assert sae._coders
    assert len(pickle.dumps(sae)) == empty
    for copied in (pickle.loads(pickle.dumps(sae)), copy.deepcopy(sae)):
        assert copied._coders == {}
        np.testing.assert_array_equal(copied.transform(X), codes)
    assert sae._coders  # the original keeps its own


def _fresh_codes(sae, X):
    """``sae``'s solver codes of ``X``, from a copy that never coded anything."""
    fresh = copy.deepcopy(sae)
    fresh._coders = {}
    return fresh.transform(X)


@pytest.mark.parametrize("sparse", [False, True])
def test_score_reconstructs_a_block_of_rows_at_a_time(monkeypatch, sparse):
    # score held the codes and the reconstruction of every row, and a dense
    # copy of a CSR input: 1.4 GB beside a 1.07 GB memmap that fit streamed
    # in 0.2 GB. It reads blocks as the metric does, with the same result.
    from sparse_dict import metrics

    X, _, _ = make_superposition(3000, 16, 32, random_state=0, dtype=np.float32)
    sae = SparseAutoencoderDictionary(32, max_steps=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    Z = sp.csr_matrix(X) if sparse else X
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 16 * 500)  # blocks of 500 rows
    expected = metrics.explained_variance(X, sae.inverse_transform(sae.transform(Z)))
    from sparse_dict import estimator

    sizes, prepared = [], []
    made = estimator.reconstructor

    def counting(*args, **kwargs):
        prepared.append(1)  # the weights go to the device once a call of score
        reconstruct = made(*args, **kwargs)
        return lambda rows: sizes.append(rows.shape[0]) or reconstruct(rows)

    monkeypatch.setattr(estimator, "reconstructor", counting)
    assert sae.score(Z) == expected
    assert max(sizes) == 500 and sum(sizes) == 3000
    assert len(prepared) == 1


def test_a_small_first_partial_fit_call_warns_that_its_scale_is_kept():
    # The first call's rows set the scale for the whole stream: from 2 rows
    # it was up to 2.8 times that of 10,000, silently.
    X, _, _ = make_superposition(400, 16, 32, random_state=0, dtype=np.float32)
    with pytest.warns(UserWarning, match="The first partial_fit call had 2 rows: the input "
                                         "scale and the decoder bias are set from them"):
        sae = SparseAutoencoderDictionary(32, random_state=0).partial_fit(X[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.partial_fit(X[2:3])  # later calls may bring any number
        SparseAutoencoderDictionary(32, random_state=0).partial_fit(X[:128])


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_the_few_rows_warning_says_new_rows_code_denser(activation):
    # An encoder fitted on too few rows lets more features fire on new ones
    # (BatchTopK at k=32: an L0 of 32 on 300 training rows, 55 to 83 on
    # held-out rows; ReLU 2.8-8.6 against 19-39), which transform_l0_ does
    # not show. TopK codes k features a row whatever the row.
    X, _, _ = make_superposition(400, 16, 32, random_state=0, dtype=np.float32)
    sae = SparseAutoencoderDictionary(128, activation=activation, k=4, max_steps=300,
                                      random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae.fit(X[:200])
    few = [str(w.message) for w in caught if "can memorise them" in str(w.message)]
    assert len(few) == 1
    assert ("New rows also code denser than these" in few[0]) == (activation == "batchtopk")
    if activation == "batchtopk":
        held_out = np.count_nonzero(sae.transform(X[200:]), axis=1).mean()
        assert sae.transform_l0_ == pytest.approx(4, abs=0.5) and held_out > 1.3 * 4


def test_jumprelu_is_warned_of_memorising_below_64_rows_an_atom():
    # At 32 rows an atom JumpReLU explained 0.86 of its training rows and
    # 0.66 of held-out ones, silently; ReLU's gap there is 0.03 to 0.05.
    X, _, _ = make_superposition(1024, 8, 16, random_state=0, dtype=np.float32)
    for activation, warned in (("jumprelu", True), ("relu", False)):
        sae = SparseAutoencoderDictionary(32, activation=activation, max_steps=20,
                                          random_state=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae.fit(X)
        few = [str(w.message) for w in caught if "can memorise them" in str(w.message)]
        assert bool(few) == warned, (activation, few)
        if warned:
            assert "(32 rows an atom)" in few[0] and "64 rows an atom (2,048 here)" in few[0]
            assert "JumpReLU memorises more" in few[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(16, activation="jumprelu", max_steps=20,
                                    random_state=0).fit(X)
    assert not any("can memorise them" in str(w.message) for w in caught)


def _stream_rows():
    rng = np.random.RandomState(0)
    X = (np.abs(rng.standard_t(3, size=(3072, 3))) @ rng.randn(3, 16)).astype(np.float32)
    return np.array_split(X, 12)


# Features die on these rank-3 rows, so the dead-feature checks restart atoms.
_STREAM_PARAMS = {
    "relu": dict(n_components=96, batch_size=64, resample_interval=5, warmup_fraction=0,
                 l1_coef=8.0, device="cpu", random_state=0),
    "topk": dict(n_components=96, batch_size=64, resample_interval=5, warmup_fraction=0,
                 activation="topk", k=3, auxk_coef=1 / 32, device="cpu", random_state=0),
}


def _stream(params, cut=None, interrupt=False):
    sae = SparseAutoencoderDictionary(**params)
    for i, rows in enumerate(_stream_rows()):
        if i == cut and not interrupt:
            sae = pickle.loads(pickle.dumps(sae))
        if i == cut and interrupt:
            def stop(info):
                raise KeyboardInterrupt
            with pytest.raises(KeyboardInterrupt):
                sae.set_params(callback=stop).partial_fit(rows)
            sae.set_params(callback=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae.partial_fit(rows)
    return sae


@pytest.mark.parametrize("activation", ["relu", "topk"])
@pytest.mark.parametrize("interrupt", [False, True])
def test_a_stream_pickled_or_interrupted_midway_goes_on_as_the_whole_one(activation,
                                                                         interrupt):
    # The trainer's state left out when its dead-feature checks were due and
    # the last step's error (AuxK's scale): after a pickle, or a call rolled
    # back by Ctrl-C and retried, atoms were restarted at other steps
    # (components 0.9 apart).
    whole = _stream(_STREAM_PARAMS[activation])
    if activation == "relu":
        assert whole.n_resampled_ > 0
    resumed = _stream(_STREAM_PARAMS[activation], cut=7, interrupt=interrupt)
    np.testing.assert_array_equal(resumed.components_, whole.components_)
    np.testing.assert_array_equal(resumed.feature_frequencies_, whole.feature_frequencies_)
    assert resumed.n_resampled_ == whole.n_resampled_


def test_a_loaded_stream_s_firing_frequencies_go_on(tmp_path):
    # A loaded dictionary's trainer started its counts at zero: after a
    # one-row partial_fit every frequency was 0 or 1.
    sae = _stream(dict(_STREAM_PARAMS["topk"], resample_dead=False))
    sae.save(tmp_path / "d")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "d")
    row = _stream_rows()[0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.partial_fit(row)
        loaded.partial_fit(row)
    frequencies = loaded.feature_frequencies_
    assert np.mean((frequencies > 0) & (frequencies < 1)) > 0.5
    np.testing.assert_allclose(frequencies, sae.feature_frequencies_, atol=0.05)


@pytest.mark.parametrize("algorithm", ["omp", "threshold"])
def test_a_solver_codes_sparse_rows_a_block_at_a_time_as_dense_ones(X, monkeypatch,
                                                                    algorithm):
    from sparse_dict import coding

    sae = small_sae(random_state=0).fit(X).set_params(transform_algorithm=algorithm)
    dense = sae.transform(X)
    monkeypatch.setattr(coding, "_BLOCK_BYTES", 8 * sae.n_components_ * 7)  # 7 rows a block
    codes = sae.transform(sp.csr_matrix(X))
    assert codes.dtype == dense.dtype
    np.testing.assert_allclose(codes, dense, rtol=1e-5, atol=1e-6)


def test_the_outlier_rows_warning_does_not_tell_a_top_k_fit_to_use_top_k():
    X, _, _ = make_superposition(n_samples=3000, n_features=16, n_components=64,
                                 random_state=0)
    X = X.copy()
    X[np.random.RandomState(0).choice(len(X), 18, replace=False)] *= 30
    with pytest.warns(UserWarning, match="farthest from the mean") as record:
        SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=600,
                                    random_state=0).fit(X)
    said = " ".join(str(w.message) for w in record if "farthest" in str(w.message))
    assert "remove them and fit again" in said
    assert "activation='topk'" not in said


def test_a_stream_in_its_warm_up_is_not_called_one_that_explains_nothing():
    # Calls of 50 rows were told "The fit explains none of the data" 13 times
    # in a row (steps 50 to 62, inside the 100 warm-up steps), blaming "a
    # penalty that silences the features" at an L0 of 31; the stream went on
    # to explain 0.70 of held-out rows.
    X, _, _ = make_superposition(n_samples=4000, n_features=16, n_components=64,
                                 random_state=0)
    sae = SparseAutoencoderDictionary(64, random_state=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for start in range(0, 3500, 50):
            sae.partial_fit(X[start:start + 50])
    assert not [w for w in record if "explains none" in str(w.message)]
    assert sae.score(X[3500:]) > 0.2  # it explains the data, as it was told it did not


def test_a_stream_s_callback_and_frequencies_count_its_recent_rows():
    # The callback's "dead" counted one call's rows (1,022 of 2,048 features
    # in a healthy stream of 256-row calls, where its progress bar said 0),
    # and a feature that stopped firing kept a faded frequency forever
    # (2e-12 after 400 calls), so the stream never showed it dead.
    X, _, _ = make_superposition(n_samples=45_056, n_features=32, n_components=256,
                                 random_state=0)
    seen = []
    sae = SparseAutoencoderDictionary(512, activation="topk", k=8, random_state=0,
                                      callback=lambda info: seen.append(info["dead"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, 4096, 64):
            sae.partial_fit(X[start:start + 64])
        assert seen[-1] == int(np.sum(sae.feature_frequencies_ == 0)) < 0.1 * 512
        sae.encoder_bias_[:10] = -1e6  # ten features silenced
        for start in range(4096, 45_056, 4096):  # each call halves the earlier counts
            sae.partial_fit(X[start:start + 4096])
    assert np.all(sae.feature_frequencies_[:10] == 0)
    assert seen[-1] == int(np.sum(sae.feature_frequencies_ == 0)) >= 10


@pytest.mark.parametrize("offset", [1e7, 1e8])
def test_float64_rows_that_float32_rounds_together_are_told_to_be_centred(offset):
    # At 1e8 plus a spread of 1.6 they were called "all the same" (check the
    # hook point), at 1e7 "about 852 distinct rows" of 2,000: both what
    # float32's rounding made of them.
    X, _, _ = make_superposition(n_samples=2000, n_features=16, n_components=64,
                                 random_state=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=50,
                                    random_state=0).fit(X.astype(np.float64) + offset)
    said = [str(w.message) for w in record]
    assert any("rounding error" in m and "X - X.mean(axis=0)" in m for m in said), said
    assert not any("Every row of X is the same" in m or "X has about" in m for m in said), said


def test_features_silenced_by_steps_too_large_name_the_learning_rate():
    # At learning_rate 1 the ReLU fit explained -1.4 of its rows and was told
    # only that l1_coef (the default, 3) outweighs the features; a tenth of
    # it diverged, where a learning rate of 0.1 explains 0.48.
    X, _, _ = make_superposition(n_samples=2000, n_features=16, n_components=64,
                                 random_state=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(64, learning_rate=1.0, random_state=0).fit(X)
    silent = [str(w.message) for w in record if "fire on almost no row" in str(w.message)]
    assert silent and "lower learning_rate (now 1) first" in silent[0], silent


def test_coordinate_descent_s_unconverged_rows_are_said_once_with_the_parameter():
    # One scikit-learn ConvergenceWarning a row (472 for 1,000 rows), each
    # pointing into scikit-learn and at an iteration limit this estimator
    # had no parameter for.
    X, _, _ = make_superposition(n_samples=3000, n_features=16, n_components=64,
                                 random_state=0)
    sae = SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=300,
                                      random_state=0).fit(X[:2000])
    sae.set_params(transform_algorithm="lasso_cd", transform_alpha=0.1 / sae.scale_)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        codes = sae.transform(X[2000:])
    said = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(said) == 1 and "transform_max_iter=1000" in str(said[0].message)
    assert said[0].filename == __file__
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        more = sae.set_params(transform_max_iter=100_000).transform(X[2000:])

    def rows(record):
        found = [re.search(r"converging on ([\d,]+) of", str(w.message)) for w in record]
        return sum(int(m.group(1).replace(",", "")) for m in found if m)

    assert rows(again) < rows(said) / 5
    assert explained_variance(X[2000:], sae.inverse_transform(more)) >= \
        explained_variance(X[2000:], sae.inverse_transform(codes)) - 1e-6


def test_sparse_rows_unconverged_in_several_blocks_are_said_once(monkeypatch):
    # Each 8,192-row block of a sparse X gave its own warning, each naming
    # its block as the whole.
    from sparse_dict import coding

    X, _, _ = make_superposition(n_samples=600, n_features=16, n_components=64,
                                 random_state=0)
    sae = SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=100,
                                      random_state=0).fit(X)
    sae.set_params(transform_algorithm="lasso_cd", transform_alpha=0.01 / sae.scale_,
                   transform_max_iter=2)
    monkeypatch.setattr(coding, "_BLOCK_BYTES", 8 * 64 * 256)  # 256 rows a block
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        codes = sae.transform(sp.csr_matrix(X))
    said = [str(w.message) for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(said) == 1 and "of 600 rows" in said[0], said
    np.testing.assert_allclose(codes, sae.transform(X), rtol=1e-5, atol=1e-6)


def test_a_loaded_dictionary_s_rare_features_stay_alive_in_its_stream(tmp_path):
    # Counts resumed over at most 8,192 rows and those under half a firing
    # set to 0: features rarer than one in 16,384 rows read dead after one
    # partial_fit of the loaded dictionary, alive in memory.
    X, _, _ = make_superposition(n_samples=60_000, n_features=16, n_components=64,
                                 random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SparseAutoencoderDictionary(1024, activation="topk", k=2, max_steps=300,
                                          auxk_coef=0.0, resample_dead=False,
                                          random_state=0).fit(X)
        rare = (sae.feature_frequencies_ > 0) & (sae.feature_frequencies_ < 0.5 / 8192)
        assert rare.any()
        loaded = SparseAutoencoderDictionary.load(sae.save(tmp_path / "d"))
        loaded.partial_fit(X[:1])
    assert np.all(loaded.feature_frequencies_[rare] > 0)


def test_the_shrinkage_message_names_the_bias_only_where_it_agrees():
    # The bias is of the whole sample, which a few outsized rows held at 1.006
    # while the refit's rows were shrunk: "shrunk ... (the relative
    # reconstruction bias is 1; 1 without shrinkage)" contradicted itself.
    from sparse_dict.estimator import _shrinkage_message

    assert "bias" not in _shrinkage_message(1.006, 0.99, 1.0, (0.72, 0.89))
    assert "the relative reconstruction bias is 1.6;" in _shrinkage_message(
        1.6, 0.69, 1.0, (0.69, 0.92))


def test_rows_on_another_scale_than_the_training_rows_warn(tmp_path):
    # The encoder's biases are in the training rows' units: at a tenth of the
    # scale a ReLU fit coded no atom at all (EV -2.7), at ten times 20 atoms a
    # row instead of 5, silently.
    rng = np.random.RandomState(0)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    sae = small_sae(max_iter=2).fit(X)
    distances = np.sort(((X - sae.decoder_bias_) ** 2).sum(axis=1))
    # torch's median of an even count is the lower of the middle two.
    assert sae.train_distance_ == pytest.approx(distances[(len(X) - 1) // 2], rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.transform(X)
        sae.score(X)
        sae.transform(10 * X[:10])  # too few rows to judge a scale by
        sae.set_params(transform_algorithm="omp").transform(10 * X)  # follows the scale
    sae.set_params(transform_algorithm="encoder")
    for factor, said in ((10, r"is \d\d\.?\d* times"), (0.1, r"is 0\.0\d+ times")):
        with pytest.warns(UserWarning, match="another scale than the training rows: .* " + said):
            sae.transform(factor * X)
        with pytest.warns(UserWarning, match="another scale than the training rows"):
            sae.score(factor * X)
    with pytest.warns(UserWarning, match="another scale than the training rows"):
        sae.transform(sp.csr_matrix(10 * X))  # sparse rows, not made dense
    # Kept by save and load.
    sae.save(tmp_path / "d")
    loaded = SparseAutoencoderDictionary.load(tmp_path / "d")
    assert loaded.train_distance_ == sae.train_distance_
    with pytest.warns(UserWarning, match="another scale than the training rows"):
        loaded.transform(10 * X)
    # One outsized row in 64 (a transformer's first token) is no change of
    # scale: a mean of all rows read 240 times.
    rows = X[:64].copy()
    rows[0] *= 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.transform(rows)
    # Unknown (an imported dictionary, an old pickle): nothing is judged.
    sae.train_distance_ = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.transform(10 * X)


@pytest.mark.parametrize("factor", [1e20, 1e-30])
def test_training_rows_at_extreme_scales_are_on_their_own_scale(factor):
    # Squared in float32, rows of 1e20 overflowed: their own training rows
    # read as "inf times" the training rows' distance (and 1e-30, 0 times).
    rng = np.random.RandomState(0)
    X = (factor * rng.normal(size=(400, 8))).astype(np.float32)
    sae = small_sae(max_iter=2).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.transform(X)


def test_score_says_unconverged_rows_once_for_the_call(monkeypatch):
    # A warning a block of rows: hundreds, with other counts, for a large
    # memmap (transform said them once).
    from sparse_dict import metrics

    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 16 * 1000)  # 1,000 rows a block
    X, _, _ = make_superposition(n_samples=9000, n_features=16, n_components=64,
                                 random_state=0, dtype=np.float32)
    sae = SparseAutoencoderDictionary(64, activation="topk", k=3, max_steps=50,
                                      random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    sae.set_params(transform_algorithm="lasso_cd", transform_alpha=0.001 / sae.scale_,
                   transform_max_iter=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sae.score(X)
    said = [str(w.message) for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(said) == 1 and "of 9,000 rows" in said[0], said
    assert record[0].filename == __file__


def test_the_training_rows_are_never_on_another_scale():
    # With decoder_bias_init="zeros" on rows offset by 20 the bias moved far
    # from where the scale was measured: the training rows themselves were
    # said to be at 0.015 times their own scale.
    X = np.random.RandomState(0).normal(size=(500, 8)).astype(np.float32) + 20
    sae = small_sae(max_iter=3, decoder_bias_init="zeros")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae.fit(X).transform(X)
        sae.fit_transform(X)
    assert not [w for w in caught if "another scale" in str(w.message)]


_READ_ONLY_SCRIPT = r"""
import sys, warnings
import joblib
import numpy as np
from sparse_dict import SparseAutoencoderDictionary

# torch says it once a process, so a fresh process and an error at the first.
warnings.filterwarnings("ignore")
warnings.filterwarnings("error", message=".*not writable")
def frozen(a):
    a = np.array(a)
    a.flags.writeable = False
    return a
case, folder = sys.argv[1], sys.argv[2]
rng = np.random.RandomState(0)
X = frozen(rng.standard_normal((300, 16)).astype(case))
sae = SparseAutoencoderDictionary(n_components=32, max_iter=3, batch_size=64, random_state=0,
                                  dict_init=frozen(rng.standard_normal((32, 16))))
sae.fit(X)
sae.transform(X), sae.score(X)
# A fitted estimator read back by joblib as memory maps: read-only weights.
joblib.dump(sae, folder + "/sae.joblib")
mapped = joblib.load(folder + "/sae.joblib", mmap_mode="r")
assert not mapped.components_.flags.writeable
mapped.transform(X), mapped.score(X), mapped.partial_fit(X)
print("ok")
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_read_only_arrays_give_no_torch_warning(tmp_path, dtype):
    # torch warned "The given NumPy array is not writable" out of transform
    # and score (the scale-shift check's sample and the decoder bias), out of
    # fit with a read-only dict_init, and out of every call on weights that
    # joblib mapped read-only; under -W error each raised.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _READ_ONLY_SCRIPT, dtype, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _types_in(value, seen=None):
    """The types of every object reachable through ``value``'s containers."""
    # The objects are kept, not their ids only: a temporary's id is reused.
    seen = {} if seen is None else seen
    if id(value) in seen:
        return set()
    seen[id(value)] = value
    found = {type(value)}
    if isinstance(value, dict):
        for item in [*value.keys(), *value.values()]:
            found |= _types_in(item, seen)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            found |= _types_in(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        found |= _types_in(vars(value), seen)
    return found


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_a_fitted_estimator_pickles_as_plain_arrays(X, activation):
    # The state held the live torch trainer, so skops (which trusts numpy's
    # types, not torch's) could not save a fitted estimator, nor a Pipeline
    # holding one: "Cannot directly construct TensorBase".
    params = {} if activation == "relu" else {"k": 4}
    sae = small_sae(random_state=0, activation=activation, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
        sae.partial_fit(X[:64])
    torch_types = {t for t in _types_in(sae.__getstate__())
                   if t.__module__.split(".")[0] == "torch"}
    assert not torch_types, torch_types
    # It goes on as the original does, and a k set since is the new k's.
    for change in ({}, {"k": 3} if activation != "relu" else {"l1_coef": 0.5}):
        original, copied = copy.deepcopy(sae), pickle.loads(pickle.dumps(sae))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original.set_params(**change).partial_fit(X[64:128])
            copied.set_params(**change).partial_fit(X[64:128])
        np.testing.assert_array_equal(copied.components_, original.components_)
        np.testing.assert_array_equal(copied.transform(X), original.transform(X))


@pytest.mark.parametrize("algorithm", ["omp", "lasso_lars", "threshold"])
def test_a_solver_scores_float16_rows_as_it_transforms_them(algorithm):
    # The solver coded float16 rows into float16 codes, and decoding into
    # them failed in torch ("Expected out tensor to have dtype float").
    X = np.random.RandomState(0).standard_normal((200, 8)).astype(np.float16)
    sae = SparseAutoencoderDictionary(n_components=16, max_steps=20, random_state=0,
                                      transform_algorithm=algorithm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
        codes = sae.transform(X)
        score = sae.score(X)
    assert codes.dtype == np.float32
    expected = explained_variance(X.astype(np.float32), sae.inverse_transform(codes))
    assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_identical_rows_leave_no_zero_atoms():
    # Every row reconstructed exactly, the restart's draw fell back to any
    # row, whose direction from the decoder bias was zero: all 8 atoms (and
    # encoder rows) became zeros, where components_ promises unit norms.
    X = np.tile(np.array([[1.0, 2, 3, 4, 5]], np.float32), (200, 1))
    sae = SparseAutoencoderDictionary(n_components=8, random_state=0, max_steps=200,
                                      resample_interval=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.linalg.norm(sae.encoder_weights_, axis=1) > 0)
