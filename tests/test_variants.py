"""SparseAutoencoderDictionary with each sparsity mechanism, end to end."""

import pickle
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks
import torch

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.estimator import _dead_features_message, _paired_share
from sparse_dict.datasets import make_superposition
from sparse_dict.estimator import DivergenceError
from sparse_dict.metrics import mean_max_cosine_similarity
from sparse_dict.model_selection import best_under_l0, sparse_coding_scorer

ACTIVATIONS = ["relu", "topk", "batchtopk", "jumprelu"]
# Each mechanism at a setting that suits the recovery data below (about 4
# active features per row).
SETTINGS = {
    "relu": dict(l1_coef=3.0),
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(l0_coef=0.01),
}


@pytest.fixture(scope="module")
def superposition():
    return make_superposition(n_samples=8000, n_features=32, n_components=48, n_active=4,
                              random_state=0, dtype=np.float32)


@pytest.fixture(scope="module")
def fitted(superposition):
    X, _, _ = superposition
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return {
            name: SparseAutoencoderDictionary(
                n_components=64, activation=name, batch_size=256, max_steps=1500,
                device="cpu", random_state=0, **SETTINGS[name],
            ).fit(X)
            for name in ACTIVATIONS
        }


@parametrize_with_checks(
    [SparseAutoencoderDictionary(device="cpu", max_iter=5, activation=a, k=3)
     for a in ("topk", "batchtopk", "jumprelu")],
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_recovers_known_atoms(fitted, superposition, name):
    X, true_atoms, _ = superposition
    sae = fitted[name]
    # A broken mechanism (random atoms: about 0.45 here) fails this by far.
    assert mean_max_cosine_similarity(sae.components_, true_atoms) > 0.9
    assert sae.score(X) > 0.6
    codes = sae.transform(X)
    assert codes.min() >= 0
    assert 2.0 < (codes > 0).sum(1).mean() < 8.0


def test_topk_transform_has_exactly_k_codes_at_most(fitted, superposition):
    X, _, _ = superposition
    codes = fitted["topk"].transform(X)
    assert int((codes > 0).sum(1).max()) <= 4


def test_batchtopk_threshold_is_fitted_and_batch_independent(fitted, superposition):
    X, _, _ = superposition
    sae = fitted["batchtopk"]
    assert sae.threshold_.shape == (64,)
    assert np.all(sae.threshold_ == sae.threshold_[0]) and sae.threshold_[0] > 0
    whole = sae.transform(X[:500])
    rows = np.vstack([sae.transform(X[i : i + 2]) for i in range(0, 500, 2)])
    np.testing.assert_allclose(rows, whole, rtol=1e-5, atol=1e-6)
    # The single threshold reproduces the training selection's sparsity.
    assert sae.transform_l0_ == pytest.approx(4.0, rel=0.1)
    assert sae.train_l0_ == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("n_rows, k, dtype", [(2, 5, np.float32), (40, 1, np.float64),
                                             (40, 1, np.float32), (500, 4, np.float32)])
def test_batchtopk_threshold_keeps_k_codes_a_row_on_its_sample(n_rows, k, dtype):
    # The threshold was the (k * n)-th largest pre-activation itself, which
    # inference (pre > threshold) leaves out: transform_l0_ read k - 1/n, and
    # transform kept the boundary code or not by the threshold's rounding.
    from sparse_dict import SparseAutoencoderDictionary

    X = np.random.RandomState(0).standard_normal((n_rows, 16)).astype(dtype)
    sae = SparseAutoencoderDictionary(n_components=32, activation="batchtopk", k=k,
                                      batch_size=64, max_steps=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.fit(X)
    assert sae.transform_l0_ == k
    assert np.count_nonzero(sae.transform(X)) == k * n_rows
    # In float64, from the fitted arrays, as a reader of them computes it.
    pre = ((X.astype(np.float64) - sae.decoder_bias_) @ sae.encoder_weights_.T.astype(np.float64)
           + sae.encoder_bias_)
    assert np.count_nonzero(pre > sae.threshold_) == k * n_rows


def test_batchtopk_on_batches_of_one_row_warns():
    # It trains as TopK, step for step, but codes with a threshold: 0.72 of
    # the variance where the same weights coded by top-k explained 0.89, and
    # transform_l0_ looked as it should.
    X = np.random.default_rng(0).exponential(size=(300, 8)).astype(np.float32)
    said = {}
    for batch_size in (1, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SparseAutoencoderDictionary(n_components=32, activation="batchtopk", k=3,
                                        batch_size=batch_size, max_steps=50,
                                        random_state=0).fit(X)
        said[batch_size] = [str(w.message) for w in caught if "batch_size=1" in str(w.message)]
    assert len(said[1]) == 1 and "use activation='topk'" in said[1][0]
    assert not said[4]


def test_batchtopk_partial_fit_of_a_few_rows_keeps_the_threshold(fitted, superposition):
    # A call of a few rows set the inference threshold from them alone: after
    # a one-row call the held-out L0 was anywhere from 0.4 to 26 for k=4.
    import copy

    X, _, _ = superposition
    held_out = X[-2000:]
    for rows in (X[:1], X[100:104], X[200:216]):
        sae = copy.deepcopy(fitted["batchtopk"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae.partial_fit(rows)
        l0 = float((sae.transform(held_out) > 0).sum(axis=1).mean())
        assert l0 == pytest.approx(4.0, rel=0.15), (len(rows), l0)
    # A call of enough rows re-estimates it on the model as it now is.
    sae = copy.deepcopy(fitted["batchtopk"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.partial_fit(X[:4000])
    assert float((sae.transform(held_out) > 0).sum(axis=1).mean()) == pytest.approx(4.0,
                                                                                   rel=0.1)


def test_jumprelu_thresholds_are_learned_per_feature(fitted, superposition):
    X, _, _ = superposition
    sae = fitted["jumprelu"]
    theta = sae.threshold_
    assert theta.shape == (64,) and np.all(theta > 0)
    assert theta.std() > 0  # moved away from the common starting value
    pre = (X - sae.decoder_bias_) @ sae.encoder_weights_.T + sae.encoder_bias_
    np.testing.assert_allclose(sae.transform(X), pre * (pre > theta), rtol=1e-4, atol=1e-4)


def test_threshold_only_where_it_applies(fitted):
    assert not hasattr(fitted["relu"], "threshold_")
    assert not hasattr(fitted["topk"], "threshold_")


def test_auxk_revives_dead_features():
    # A trained TopK dictionary loses a quarter of its features: their
    # encoder rows shrink to almost nothing (they lose every top-k
    # selection) and their atoms become random. Training on, AuxK lets them
    # learn what the live features miss; without it they mostly stay lost.
    X, true_atoms, _ = make_superposition(n_samples=20000, n_features=32, n_components=64,
                                          n_active=3, random_state=1, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        base = SparseAutoencoderDictionary(
            n_components=64, activation="topk", k=3, batch_size=256, max_steps=1500,
            resample_interval=50, k_aux=16, device="cpu", random_state=0,
        ).fit(X)
    rng = np.random.RandomState(0)
    killed = rng.choice(64, 16, replace=False)
    random_atoms = rng.randn(16, 32).astype(np.float32)
    random_atoms /= np.linalg.norm(random_atoms, axis=1, keepdims=True)
    results = {}
    for auxk_coef in (0.0, 1 / 32):
        sae = SparseAutoencoderDictionary.load(base.save(Path(tempfile.mkdtemp()) / "d"))
        sae.encoder_weights_[killed] *= 0.01
        sae.encoder_bias_[killed] = 0.0
        sae.components_[killed] = random_atoms
        sae.set_params(auxk_coef=auxk_coef)
        for _ in range(6):
            sae.partial_fit(X)
        match = np.abs(sae.components_[killed] @ true_atoms.T).max(axis=1).mean()
        # The steps since the load (the history goes on from the saved one).
        results[auxk_coef] = (match, sae.score(X), sae.history_["auxk"][base.n_steps_:].max())
    (match_off, ev_off, aux_off), (match_on, ev_on, aux_on) = results[0.0], results[1 / 32]
    assert aux_off == 0 and aux_on > 0
    assert match_on > 0.85 and match_on > match_off + 0.1, (match_on, match_off)
    assert ev_on > ev_off + 0.02


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_partial_fit_pickle_and_save_for_each_activation(fitted, superposition, name, tmp_path):
    X, _, _ = superposition
    sae = fitted[name]
    expected = sae.transform(X[:200])
    again = pickle.loads(pickle.dumps(sae))
    np.testing.assert_array_equal(again.transform(X[:200]), expected)
    loaded = SparseAutoencoderDictionary.load(sae.save(tmp_path / name))
    np.testing.assert_allclose(loaded.transform(X[:200]), expected, rtol=1e-6, atol=1e-6)
    assert loaded.activation == name
    steps = again.n_steps_
    again.partial_fit(X[:1024])
    assert again.n_steps_ == steps + 4
    loaded.partial_fit(X[:1024])
    assert np.all(np.isfinite(loaded.components_))


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_partial_fit_trains_at_the_k_set_since(fitted, superposition, name, tmp_path):
    # The kept trainer was built with the fit's k: in memory the call trained
    # at k=4 (and transform_l0_ said 4 where transform gave 8), while the
    # same dictionary saved and loaded trained at the new k.
    X, _, _ = superposition
    loaded = SparseAutoencoderDictionary.load(fitted[name].save(tmp_path / name))
    in_memory = pickle.loads(pickle.dumps(fitted[name]))
    for sae in (in_memory, loaded):
        sae.set_params(k=8).partial_fit(X[:2048])
        assert 6 < sae.history_["l0"][-1] <= 8  # at k=4 it was at most 4
        actual = float((sae.transform(X) > 0).sum(axis=1).mean())
        assert sae.transform_l0_ == pytest.approx(actual, abs=0.5)


def test_batchtopk_threshold_follows_a_new_k_through_short_calls(fitted, superposition,
                                                                 tmp_path):
    # Calls under 1,024 rows are not recalibrated: the running threshold,
    # kept from k=4 with its full weight, went on selecting about 5 codes a
    # row for a thousand steps while training selected 8.
    X, _, _ = superposition
    loaded = SparseAutoencoderDictionary.load(fitted["batchtopk"].save(tmp_path / "saved"))
    in_memory = pickle.loads(pickle.dumps(fitted["batchtopk"]))
    before = float((in_memory.transform(X) > 0).sum(axis=1).mean())
    for sae in (in_memory, loaded):
        sae.set_params(k=8)
        # Until it trains at the new k, transform keeps the fitted threshold.
        assert float((sae.transform(X) > 0).sum(axis=1).mean()) == pytest.approx(before)
        for start in range(0, 1024, 256):
            sae.partial_fit(X[start:start + 256])
        actual = float((sae.transform(X) > 0).sum(axis=1).mean())
        assert actual == pytest.approx(8, abs=1.5), actual


def test_partial_fit_trains_at_the_bandwidth_set_since(fitted):
    sae = pickle.loads(pickle.dumps(fitted["jumprelu"]))
    sae.set_params(jumprelu_bandwidth=0.5)._get_trainer()
    assert sae._get_trainer().model.activation.bandwidth == 0.5


def test_imported_zero_thresholds_can_be_trained(fitted, superposition):
    # A threshold of 0 (SAELens' file, or a BatchTopK written as JumpReLU)
    # was stored as log(1e-12) = -27.6: Adam moves it by about the learning
    # rate a step, so those features trained without L0 pressure for
    # thousands of steps.
    X, _, _ = superposition
    sae = pickle.loads(pickle.dumps(fitted["jumprelu"]))
    sae.threshold_ = sae.threshold_.copy()
    sae.threshold_[:8] = 0.0
    theta = sae._get_trainer().model.log_threshold.detach().exp()
    floor = 0.5 * sae.jumprelu_bandwidth
    assert float(theta[:8].min()) == pytest.approx(floor, rel=1e-5)
    assert float(theta[8:].min()) > floor  # trained thresholds are left as they are


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_memmap_and_bf16_for_each_activation(superposition, name, tmp_path):
    X, _, _ = superposition
    path = tmp_path / "x.npy"
    np.save(path, X[:2000])
    mm = np.load(path, mmap_mode="r")
    params = dict(n_components=32, activation=name, batch_size=256, max_steps=40,
                  device="cpu", random_state=0, **SETTINGS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SparseAutoencoderDictionary(**params).fit(mm)
        b = SparseAutoencoderDictionary(**params).fit(X[:2000])
        c = SparseAutoencoderDictionary(bf16=True, **params).fit(X[:2000])
    np.testing.assert_array_equal(a.components_, b.components_)
    # bf16 products: the same training, to bf16's precision.
    assert mean_max_cosine_similarity(c.components_, b.components_) > 0.9


@pytest.mark.parametrize("algorithm", ["omp", "lasso_lars", "lasso_cd", "threshold"])
def test_transform_algorithm_codes_against_the_atoms(fitted, superposition, algorithm):
    X, _, _ = superposition
    sae = fitted["topk"]
    coder = SparseAutoencoderDictionary(**sae.get_params())
    coder.__dict__.update({k: v for k, v in sae.__dict__.items() if k.endswith("_")})
    coder.set_params(transform_algorithm=algorithm, transform_alpha=0.05)
    codes = coder.transform(X[:300])
    assert codes.shape == (300, 64) and codes.dtype == np.float32 and codes.min() >= 0
    if algorithm == "omp":
        assert int((codes > 0).sum(1).max()) <= 4  # k atoms, as the encoder
        # Optimal codes of the same sparsity reconstruct at least as well.
        assert coder.score(X[:300]) >= sae.score(X[:300]) - 1e-3


def test_transform_n_nonzero_coefs_overrides_k(fitted, superposition):
    X, _, _ = superposition
    sae = pickle.loads(pickle.dumps(fitted["relu"]))
    sae.set_params(transform_algorithm="omp", transform_n_nonzero_coefs=2)
    assert int((sae.transform(X[:100]) > 0).sum(1).max()) <= 2


def test_a_short_fit_warns_and_a_sufficient_one_does_not():
    X, _, _ = make_superposition(n_samples=5000, n_features=32, n_components=64, n_active=3,
                                 random_state=2, dtype=np.float32)
    params = dict(n_components=64, activation="topk", k=3, batch_size=256, device="cpu",
                  random_state=0)
    with pytest.warns(ConvergenceWarning, match="not converged.*max_steps"):
        SparseAutoencoderDictionary(max_steps=120, **params).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        SparseAutoencoderDictionary(max_steps=4000, **params).fit(X)


def test_steps_too_small_to_train_warn():
    # At learning_rate 1e-5 a TopK fit explained 0.28 of held-out rows (0.92
    # at the default) and said nothing: its loss fell too slowly, from a
    # high level, for the relative drop over the last fifth to show it.
    X, _, _ = make_superposition(n_samples=3000, n_features=32, n_components=64, n_active=4,
                                 random_state=0, dtype=np.float32)
    params = dict(n_components=128, activation="topk", k=8, batch_size=256, max_steps=1500,
                  device="cpu", random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"still falling steadily .* learning_rate, "
                                                r"now 1e-05, may be too small"):
        SparseAutoencoderDictionary(learning_rate=1e-5, **params).fit(X)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("times", [3.0, 2e6])
def test_an_offset_shared_by_every_row_leaves_the_sparsity_alone(superposition, activation,
                                                                   times):
    # The penalised mechanisms weigh the penalty against what the codes must
    # explain, the rows' spread around the decoder bias: shifting every row
    # by three times its root mean squared norm changes neither L0 nor EV
    # much. (When the raw norm set the scale, such a shift left ReLU no
    # feature firing at all.) Nor does a shift of two million times it, in
    # float64 (float32 keeps a few digits of the spread there): the moments
    # E||x||^2 - ||E x||^2 lost the spread in rounding, the raw norm set the
    # scale, and the fit explained none of the rows or diverged.
    X, _, _ = superposition
    X = X[:4000].astype(np.float64)
    shift = times * np.sqrt(np.mean((X ** 2).sum(1)) / X.shape[1])
    fits = {}
    for name, data in (("plain", X), ("shifted", X + shift)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sae = SparseAutoencoderDictionary(
                n_components=64, activation=activation, batch_size=256, max_steps=800,
                random_state=0, **SETTINGS[activation]).fit(data)
        fits[name] = (sae.score(data), sae.transform_l0_)
    (ev, l0), (ev_shifted, l0_shifted) = fits["plain"], fits["shifted"]
    assert l0 > 2.0
    assert l0_shifted == pytest.approx(l0, rel=0.25)
    assert ev_shifted == pytest.approx(ev, abs=0.05)


def test_a_penalty_that_leaves_the_features_silent_warns(superposition):
    X, _, _ = superposition
    params = dict(n_components=64, batch_size=256, max_steps=300, random_state=0)
    silent = r"fire on almost no row: L0 is 0\.0.*l1_coef=3000.*lower it"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SparseAutoencoderDictionary(l1_coef=3000.0, **params).fit(X[:4000])
    assert any(re.search(silent, str(w.message)) for w in caught)
    assert sae.transform_l0_ < 0.1
    # An L0 near zero moving by a large factor is not "still moving"
    # ("0.0 -> 0.0" was reported beside the warning that says why).
    assert not [w for w in caught if "L0 was still moving" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(l1_coef=3.0, **params).fit(X[:4000])
    assert not [w for w in caught if "almost no row" in str(w.message)]


def test_codes_shrunk_by_the_penalty_warn_and_say_what_helps():
    # Narrow data (8 wide, 2 active features of 32): the defaults explained
    # about half the variance, TopK nine tenths, with no warning at all.
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((32, 8))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((6000, 32))
    for row in codes:
        row[rng.choice(32, 2, replace=False)] = rng.uniform(0.5, 1.5, 2)
    X = (codes @ atoms).astype(np.float32)
    train, held_out = X[:5000], X[5000:]
    scores = {}
    for name, params in (("default", {}), ("lower", {"l1_coef": 1.0}),
                         ("topk", {"activation": "topk", "k": 2})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae = SparseAutoencoderDictionary(n_components=64, max_steps=2000, random_state=0,
                                              **params).fit(train)
        shrunk = [str(w.message) for w in caught if "codes are shrunk" in str(w.message)]
        scores[name] = (sae.score(held_out), shrunk)
    ev, shrunk = scores["default"]
    assert shrunk and "l1_coef=3" in shrunk[0] and "activation='topk'" in shrunk[0], shrunk
    # The advice, followed, helps, and the warning goes.
    for name in ("lower", "topk"):
        assert scores[name][0] > ev + 0.2 and not scores[name][1], (name, scores)


def test_codes_shrunk_half_again_warn_and_well_fitted_ones_do_not():
    # Features that fire on half the rows: the defaults explained 0.62 of the
    # held-out variance, shrunk by 1.55, and said nothing (TopK: 0.96).
    # Clustered rows shrunk by 1.36 and explained 0.92.
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((24, 32))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = (rng.random((3000, 24)) < 0.5) * rng.exponential(1.0, (3000, 24))
    dense = (codes @ atoms + 0.01 * rng.standard_normal((3000, 32))).astype(np.float32)
    r = np.random.RandomState(0)
    centres = r.randn(8, 32) * 3
    clusters = (centres[r.randint(8, size=3000)] + 0.3 * r.randn(3000, 32)).astype(np.float32)
    said = {}
    for name, X in (("dense", dense), ("clusters", clusters)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SparseAutoencoderDictionary(n_components=64, max_steps=2000, random_state=0).fit(X)
        said[name] = [str(w.message) for w in caught if "codes are shrunk" in str(w.message)]
    assert len(said["dense"]) == 1 and re.search(r"(scaled by|bias is) 1\.[56]",
                                                 said["dense"][0])
    assert not said["clusters"]


def test_codes_shrunk_unevenly_warn_though_their_bias_is_low():
    # Random ReLU-MLP activations: the defaults explained 0.74 of the held-out
    # rows at L0 6 (TopK at k=6: 0.91), with a relative reconstruction bias
    # of 1.42, under the bias's limit: nothing was said. The same features
    # with least-squares magnitudes explain about 0.91.
    rng = np.random.default_rng(0)
    Z, W = rng.standard_normal((3200, 8)), rng.standard_normal((8, 32)) / np.sqrt(8)
    X = np.maximum(Z @ W - 0.5, 0).astype(np.float32)
    train, held_out = X[:2560], X[2560:]
    scores = {}
    for name, params in (("default", {}), ("lower", {"l1_coef": 1.0})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae = SparseAutoencoderDictionary(n_components=128, random_state=0,
                                              **params).fit(train)
        scores[name] = (sae.score(held_out),
                        [str(w.message) for w in caught if "codes are shrunk" in str(w.message)])
    ev, shrunk = scores["default"]
    assert len(shrunk) == 1, shrunk
    assert re.search(r"magnitudes fitted by least squares would explain 0\.9\d of a sample "
                     r"of the training rows' variance, against the codes' 0\.[67]\d", shrunk[0])
    assert "lower l1_coef" in shrunk[0] and "activation='topk'" in shrunk[0]
    # The advice helps, and the better fit says nothing of shrinkage.
    assert scores["lower"][0] > ev + 0.1 and not scores["lower"][1]


def test_an_unconverged_fit_shrunk_far_says_so_too():
    # Exponential rows: the default fit explained 0.47 (TopK 0.88), shrunk by
    # 2.1, and only the convergence warning spoke, whose advice (more steps)
    # left it at 0.53 after eight times the steps. lower l1_coef is the cure.
    X = np.random.default_rng(0).exponential(size=(800, 16)).astype(np.float32)
    said = {}
    for name, params in (("default", {}), ("lower", {"l1_coef": 1.0})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sae = SparseAutoencoderDictionary(n_components=64, random_state=0, **params).fit(X)
        said[name] = ([type(w.message).__name__ for w in caught],
                      [str(w.message) for w in caught if "codes are shrunk" in str(w.message)],
                      sae.score(X))
    kinds, shrunk, ev = said["default"]
    assert "ConvergenceWarning" in kinds and len(shrunk) == 1 and "lower l1_coef" in shrunk[0]
    assert said["lower"][2] > ev + 0.2 and not said["lower"][1]


@pytest.mark.parametrize("product", ["torch", "openblas"])
def test_features_killed_by_steps_too_large_name_the_learning_rate(monkeypatch, product):
    # TopK at a learning rate of 1: half the features dead or more, and
    # little explained. The dead-features warning must not only blame the data.
    from sparse_dict._torch import matmul

    # The CPU's product (which a process's probe picks) changes where this
    # chaotic run ends: with torch's it explains 0.06 of the rows, with
    # OpenBLAS's 0.18, its error ending above where it started (CI failed
    # on the second before the warning looked at that). Both are run.
    monkeypatch.setattr(matmul, "_forced", product)
    X, _, _ = make_superposition(3000, 16, 32, random_state=0, dtype=np.float32)
    params = dict(n_components=32, activation="topk", k=3, max_steps=300, batch_size=256,
                  random_state=0)
    # On a CPU the fit explains a little (the dead-features warning names
    # the learning rate); on a GPU, whose generator starts another model,
    # it explained nothing (the poor-fit warning named it) or, on an H200
    # (2026-11-27), its features fired on almost no row (that warning named
    # it). Either way the
    # warning says to lower it, and blames neither the data nor small steps.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(learning_rate=1.0, **params).fit(X)
    named = [str(w.message) for w in caught if re.search(
        r"(fired on none.*(explains little of its training rows|error also ended above "
        r"where it started)|explains none of the data.*steps too large|fire on almost no "
        r"row.*steps too large).*lower "
        r"learning_rate,? \(?now 1\)?", str(w.message))]
    assert named, [str(w.message) for w in caught]
    assert not [w for w in caught if "too small" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(**params).fit(X)
    assert not [w for w in caught if "learning_rate" in str(w.message)]


def test_a_fit_that_leaves_many_features_dead_warns(superposition):
    # Rows of rank 2 have no use for 64 features: most die, and the fit
    # says so. The superposition rows (48 true features) use them all.
    rng = np.random.RandomState(0)
    low_rank = (rng.standard_normal((3000, 2)) @ rng.standard_normal((2, 16))).astype(np.float32)
    params = dict(n_components=64, batch_size=256, max_steps=800, random_state=0)
    dead = r"of 64 features \(\d+%\) fired on none of the last [\d,]+ training rows"
    with pytest.warns(UserWarning, match=dead + ".*smaller n_components") as record:
        sae = SparseAutoencoderDictionary(**params).fit(low_rank)
    assert (sae.feature_frequencies_ == 0).mean() >= 0.25
    assert not [w for w in record if "l0_coef" in str(w.message)]  # JumpReLU's hint only
    # The data's rank, not the steps: no advice on the learning rate.
    assert not [w for w in record if "learning_rate" in str(w.message)]
    X, _, _ = superposition
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SparseAutoencoderDictionary(**params).fit(X[:4000])
    assert (sae.feature_frequencies_ == 0).mean() < 0.25
    assert not [w for w in caught if "fired on none" in str(w.message)]


def _dead_features_warnings(X, **params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseAutoencoderDictionary(**{"activation": "jumprelu", "max_steps": 2000,
                                       "random_state": 0, **params}).fit(X)
    return [str(w.message) for w in caught
            if re.search("fired on none|dense regime", str(w.message))]


@pytest.mark.parametrize("random_state", [0, 5])
def test_the_dead_features_warning_points_jumprelu_at_its_dense_regime_only_there(random_state):
    # Normal noise has no sparse structure: below some l0_coef JumpReLU
    # pairs atoms of opposite signs into a dense code, and the rest die:
    # with random_state=0, 32% of them. With 5, 21% died, below the
    # dead-features warning's share, and the dense regime went unsaid (as on
    # an H200 with 0); it is said whether or not many died.
    noise = np.random.RandomState(0).standard_normal((3000, 32)).astype(np.float32)
    (message,) = _dead_features_warnings(noise, n_components=128, l0_coef=0.01,
                                         random_state=random_state)
    assert re.search(r"an L0 of [\d.]+ and \d+% of the features (left )?in pairs of atoms "
                     r"of opposite signs, this is its dense regime: raise l0_coef", message)
    # 64 correlated features, about 4 a row, fitted well (held-out EV 0.97 at
    # an L0 of 3.7 when this was written) by the 86 features left alive:
    # fewer features than atoms, no pairs, and no advice to raise l0_coef,
    # which fitted worse.
    rng = np.random.default_rng(1)
    base = rng.standard_normal((8, 32))
    atoms = np.repeat(base / np.linalg.norm(base, axis=1, keepdims=True), 8, axis=0)
    spread = rng.standard_normal((64, 32))
    atoms += 0.6 * spread / np.linalg.norm(spread, axis=1, keepdims=True)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    group = rng.integers(0, 8, 3000)
    codes = np.zeros((3000, 64))
    for j in range(8):
        codes[np.arange(3000), group * 8 + j] = (rng.random(3000) < 0.4) * rng.exponential(size=3000)
    codes[np.arange(3000), rng.integers(0, 64, 3000)] += rng.exponential(size=3000)
    X = (codes @ atoms + 0.01 * rng.standard_normal((3000, 32))).astype(np.float32)
    messages = _dead_features_warnings(X)
    assert not [m for m in messages if "l0_coef" in m]
    assert all("smaller n_components" in m for m in messages)
    # On the CPU a quarter of the features or more die (the warning is
    # given); on an H200 (2026-11-27) fewer died, and nothing was said.
    if not torch.cuda.is_available():
        assert len(messages) == 1
    assert "l0_coef" not in _dead_features_message("relu", 64, 128, 6800, 21.3, paired=1.0)


def test_relu_s_dead_features_warning_names_the_penalty_as_a_cause():
    # Features of strengths from 0.03 to 30: the default fit left a third of
    # its atoms dead, and the warning advised only fewer atoms (which
    # explained 0.906 of held-out rows against 0.907); a lower l1_coef
    # explained 0.978 with 1% dead.
    message = _dead_features_message("relu", 32, 96, 5000, 1.57)
    assert "smaller n_components" in message
    assert "a lower l1_coef (for example by a factor of 3), or activation='topk'" in message
    for activation in ("topk", "batchtopk", "jumprelu"):
        assert "l1_coef" not in _dead_features_message(activation, 32, 96, 5000, 1.57)


def test_signed_codes_fitted_sparsely_are_not_told_of_the_dense_regime():
    # Data whose codes are signed needs atoms in opposite-sign pairs at any
    # L0: fitted at L0 1.85 of 32 dimensions (about 80% paired), it was told
    # "this is its dense regime: raise l0_coef", which only made the code
    # sparser and the fit worse. The dense regime is a dense code too.
    from sklearn.datasets import make_sparse_coded_signal

    signal, _, _ = make_sparse_coded_signal(n_samples=2560, n_components=64, n_features=32,
                                            n_nonzero_coefs=4, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SparseAutoencoderDictionary(n_components=128, activation="jumprelu",
                                          l0_coef=0.02, random_state=0).fit(
            signal.astype(np.float32))
    assert sae.transform_l0_ < 8  # a quarter of the width
    live = sae.feature_frequencies_ > 0
    assert _paired_share(sae.components_, live) >= 0.5  # paired, as the data's signs ask
    assert not [w for w in caught if "dense regime" in str(w.message)]


def test_default_budget_counts_steps_not_passes():
    assert SparseAutoencoderDictionary(batch_size=1000)._total_steps(20_000) == 8000  # relu
    sae = SparseAutoencoderDictionary(batch_size=1000, activation="topk")
    # Small data: the minimum number of steps, many passes.
    assert sae._total_steps(5_000) == 3000
    # Medium data: two passes.
    assert sae._total_steps(2_000_000) == 4_000
    # Large data: a fixed number of rows.
    assert sae._total_steps(50_000_000) == 10_000
    # Tiny data: capped in passes.
    assert sae._total_steps(500) == 1000
    assert sae.set_params(max_iter=2)._total_steps(5_000) == 10
    assert sae.set_params(max_iter=None, max_steps=7)._total_steps(5_000) == 7


def test_a_diverging_fit_raises_and_keeps_the_fitted_state(fitted, superposition):
    X, _, _ = superposition
    sae = pickle.loads(pickle.dumps(fitted["topk"]))
    before = sae.components_.copy()
    sae.set_params(learning_rate=10.0)
    with pytest.raises(DivergenceError, match="Lower learning_rate"):
        sae.fit(X)
    np.testing.assert_array_equal(sae.components_, before)


def test_grid_search_over_k_and_activation_in_a_pipeline(superposition):
    X, _, _ = superposition
    pipe = Pipeline([
        ("scale", FunctionTransformer(lambda a: 2.0 * a)),
        ("sae", SparseAutoencoderDictionary(n_components=32, batch_size=256, max_steps=100,
                                            device="cpu", random_state=0)),
    ])
    grid = [
        {"sae__activation": ["topk", "batchtopk"], "sae__k": [2, 6]},
        {"sae__activation": ["relu"], "sae__l1_coef": [1.0, 10.0]},
        {"sae__activation": ["jumprelu"], "sae__l0_coef": [0.003, 0.03]},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search = GridSearchCV(pipe, grid, scoring=sparse_coding_scorer,
                              refit=best_under_l0(max_l0=3), cv=2, n_jobs=2)
        search.fit(X[:3000])
    l0 = search.cv_results_["mean_test_l0"]
    assert len(l0) == 8 and np.all(np.isfinite(l0))
    best = search.best_index_
    assert l0[best] <= 3
    # k=2 keeps at most two codes per row whatever the batch.
    params = search.cv_results_["params"]
    for p, value in zip(params, l0):
        if p.get("sae__activation") == "topk" and p["sae__k"] == 2:
            assert value <= 2.0
    assert search.best_estimator_.named_steps["sae"].transform(2.0 * X[:5]).shape == (5, 32)


def _superposition_at_rates(n_atoms, width, active, n_rows=2500, seed=0):
    """Rows of random unit atoms firing at rates spread over a decade and a half.

    About ``active`` atoms a row, each with an exponential magnitude; float32.
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, width))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rates = np.exp(rng.uniform(0, np.log(30), n_atoms))
    rates = np.minimum(rates / rates.sum() * active, 1.0)
    codes = (rng.random((n_rows, n_atoms)) < rates) * rng.exponential(1.0, (n_rows, n_atoms))
    return (codes @ atoms).astype(np.float32)


def test_codes_shrunk_at_a_third_of_the_width_warn_too():
    # A superposition of 96 features in 24 dimensions (about 3 a row, firing
    # at rates over a decade and a half, exponential magnitudes), fitted with
    # 16 atoms a dimension: the defaults explained 0.56 of held-out rows at L0
    # 7.4, a third of the width, where TopK at k=7 explained 0.89. Its bias
    # was under the limit of an unconverged run and the refit, then asked only
    # below a quarter of the width, was not asked: nothing was said of it.
    X = _superposition_at_rates(n_atoms=96, width=24, active=3)
    train, held_out = X[:2000], X[2000:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SparseAutoencoderDictionary(n_components=384, random_state=0).fit(train)
    shrunk = [str(w.message) for w in caught if "codes are shrunk" in str(w.message)]
    assert 6 <= sae.transform_l0_ < 12, sae.transform_l0_  # from a quarter to half the width
    assert len(shrunk) == 1 and "magnitudes fitted by least squares" in shrunk[0]
    topk = SparseAutoencoderDictionary(n_components=384, activation="topk",
                                       k=round(sae.transform_l0_), random_state=0).fit(train)
    assert topk.score(held_out) > sae.score(held_out) + 0.15


def test_a_fit_explaining_nearly_everything_is_not_told_to_train_longer():
    # Default TopK (k=32, as wide as these rows of 8 columns) explained 0.994
    # of held-out rows and was told its loss was still falling (0.065 ->
    # 0.045, a quarter of a hundredth of the mean's error): so were 63 of 91
    # such fits of data no test uses.
    X = _superposition_at_rates(n_atoms=32, width=8, active=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae = SparseAutoencoderDictionary(activation="topk", random_state=0).fit(X[:2000])
    assert sae.score(X[2000:]) > 0.98
    assert not [w for w in caught if "still falling" in str(w.message)], \
        [str(w.message) for w in caught]
