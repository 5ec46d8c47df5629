"""Tests for sparse_dict.coding: LassoCoder and amortisation_gap."""

import pickle
import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks

from sparse_dict import LassoCoder
from sparse_dict.coding import amortisation_gap
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import explained_variance
from memory_peak import peak_bytes


def _random_dictionary(n_features, n_components=5, seed=0):
    atoms = np.random.RandomState(seed).normal(size=(n_components, n_features))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


# The coder's width is fixed by its dictionary, while scikit-learn's common
# checks draw data of several widths; as scikit-learn does for its own
# SparseCoder, each check gets a dictionary of the width its data has.
_CHECK_WIDTHS = {
    "check_fit2d_1feature": 1,
    "check_estimators_overwrite_params": 2,
    "check_estimators_fit_returns_self": 2,
    "check_readonly_memmap_input": 2,
    "check_fit_idempotent": 2,
    "check_fit_check_is_fitted": 2,
    "check_n_features_in": 2,
    "check_n_features_in_after_fitting": 4,
    "check_positive_only_tag_during_fit": 4,
    "check_estimators_dtypes": 5,
    "check_dtype_object": 10,
    "check_fit2d_1sample": 10,
    "check_array_api_input": 10,
}


@parametrize_with_checks([LassoCoder(_random_dictionary(3))])
def test_sklearn_compatible(estimator, check):
    name = check.func.__name__
    estimator.set_params(dictionary=_random_dictionary(_CHECK_WIDTHS.get(name, 3)))
    check(estimator)


@pytest.fixture(scope="module")
def superposition():
    # Random atoms in 64 dimensions are nearly orthogonal (coherence ~0.4),
    # and magnitudes bounded away from 0 make every active feature visible.
    return make_superposition(
        n_samples=300,
        n_features=64,
        n_components=96,
        n_active=3,
        magnitude_range=(0.5, 1.0),
        random_state=0,
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(algorithm="lasso_cd", alpha=0.05),
        dict(algorithm="lasso_lars", alpha=0.05),
        dict(algorithm="omp", n_nonzero_coefs=10),
    ],
)
def test_recovers_true_support(superposition, params):
    X, true_atoms, true_codes = superposition
    codes = LassoCoder(true_atoms, **params).fit_transform(X)
    found = codes > 1e-3
    true = true_codes > 0
    assert np.mean((found == true).all(axis=1)) >= 0.95
    assert (found & true).sum() / true.sum() >= 0.99
    assert (codes >= 0).all()


def test_omp_exact_codes_on_noise_free_data(superposition):
    X, true_atoms, true_codes = superposition
    codes = LassoCoder(true_atoms, algorithm="omp", n_nonzero_coefs=10).fit_transform(X)
    np.testing.assert_allclose(codes, true_codes, atol=1e-8)
    # In float32 too: the same supports, without atoms for the rounding.
    codes32 = LassoCoder(true_atoms.astype(np.float32), algorithm="omp",
                         n_nonzero_coefs=10).fit_transform(X.astype(np.float32))
    np.testing.assert_array_equal(codes32 > 0, true_codes > 0)
    np.testing.assert_allclose(codes32, true_codes, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-150, 1e160, 1e300])
def test_omp_codes_scale_with_the_rows(superposition, scale):
    # Rows of 1e155 and above failed with "OverflowError: (34, 'Numerical
    # result out of range')", the residual's norm squared as a Python float.
    X, true_atoms, _ = superposition
    coder = LassoCoder(true_atoms, algorithm="omp", n_nonzero_coefs=10).fit(X)
    rows = np.vstack([X[:20], np.zeros(X.shape[1])])
    np.testing.assert_allclose(coder.transform(rows * scale) / scale, coder.transform(rows),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("params", [dict(algorithm="lasso_lars", alpha=0.1),
                                    dict(algorithm="lasso_lars", alpha=0.1, positive=False),
                                    dict(algorithm="omp", positive=False, n_nonzero_coefs=5),
                                    dict(algorithm="lasso_cd", alpha=0.1)])
@pytest.mark.parametrize("scale", [1e-8, 1e-5, 1e6])
def test_solver_codes_scale_with_the_rows_and_alpha(superposition, params, scale):
    # scikit-learn's LARS and signed OMP stop on absolute tolerances: at rows
    # of 1e-8 LARS coded nothing and signed OMP stopped early ("OMP ended
    # prematurely"). The lasso is homogeneous: c(tX, t alpha) = t c(X, alpha).
    X, true_atoms, _ = superposition
    rows = X[:30]
    coder = LassoCoder(true_atoms, **params).fit(X)
    codes = coder.transform(rows)
    assert np.count_nonzero(codes) > rows.shape[0]
    scaled = coder.set_params(alpha=params.get("alpha", 1.0) * scale).transform(rows * scale)
    np.testing.assert_allclose(scaled / scale, codes, rtol=1e-4,
                               atol=1e-5 * np.abs(codes).max())


@pytest.mark.parametrize("positive", [True, False])
def test_omp_chooses_atoms_by_direction_whatever_their_norms(positive):
    # Greedy selection by raw correlation let long atoms win: atoms of norms
    # 0.2 to 5 explained 0.70 (0.73 signed) of the rows where the same
    # directions of unit norm explained 0.93; amortisation_gap understated
    # NMF's optimum by 0.02 (its atoms have norms of 40 to 5,000).
    X, atoms, _ = make_superposition(400, 16, 48, n_active=3, noise=0.05, random_state=0)
    norms = np.random.default_rng(1).uniform(0.2, 5.0, size=48)
    norms[7] = 0.0  # an atom of norm 0 is never chosen
    unit = LassoCoder(atoms * (norms > 0)[:, None], algorithm="omp", n_nonzero_coefs=3,
                      positive=positive).fit(X)
    scaled = LassoCoder(atoms * norms[:, None], algorithm="omp", n_nonzero_coefs=3,
                        positive=positive).fit(X)
    codes = scaled.transform(X)
    np.testing.assert_array_equal(codes != 0, unit.transform(X) != 0)
    np.testing.assert_allclose(codes * norms, unit.transform(X), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(scaled.inverse_transform(codes),
                               unit.inverse_transform(unit.transform(X)), atol=1e-9)
    assert not codes[:, 7].any()


def test_threshold_is_relu_of_projection(superposition):
    X, true_atoms, _ = superposition
    codes = LassoCoder(true_atoms, algorithm="threshold", alpha=0.3).fit_transform(X)
    np.testing.assert_allclose(codes, np.maximum(X @ true_atoms.T - 0.3, 0))


@pytest.mark.parametrize("algorithm", ["lasso_cd", "lasso_lars", "omp", "threshold"])
def test_positive_flag(algorithm):
    rng = np.random.RandomState(1)
    atoms = _random_dictionary(16, n_components=24)
    X = rng.normal(size=(30, 16))
    params = dict(algorithm=algorithm, alpha=0.3, n_nonzero_coefs=3)
    positive = LassoCoder(atoms, **params).fit_transform(X)
    signed = LassoCoder(atoms, positive=False, **params).fit_transform(X)
    assert (positive >= 0).all()
    assert (signed < 0).any()


def test_dictionary_from_fitted_estimator(superposition):
    X = superposition[0][:100]
    learner = MiniBatchDictionaryLearning(n_components=8, random_state=0).fit(X)
    coder = LassoCoder(learner).fit(X)
    np.testing.assert_array_equal(coder.components_, learner.components_)
    assert coder.transform(X).shape == (100, 8)

    # clone() unfits a plain estimator; the error says what to do instead.
    with pytest.raises(NotFittedError, match="FrozenEstimator"):
        clone(LassoCoder(learner)).fit(X)
    frozen = clone(LassoCoder(FrozenEstimator(learner))).fit(X)
    np.testing.assert_array_equal(frozen.components_, learner.components_)


def test_dictionary_from_sparse_coder(superposition):
    from sklearn.decomposition import SparseCoder

    X, true_atoms, _ = superposition
    coder = LassoCoder(SparseCoder(true_atoms)).fit(X)
    np.testing.assert_array_equal(coder.components_, true_atoms)


def test_offset_round_trip():
    rng = np.random.RandomState(1)
    atoms = _random_dictionary(16, n_components=24)
    codes = np.zeros((20, 24))
    codes[np.arange(20), rng.randint(24, size=20)] = 1.0
    offset = rng.normal(size=16)
    X = codes @ atoms + offset
    coder = LassoCoder(atoms, algorithm="omp", n_nonzero_coefs=1, offset=offset)
    found = coder.fit_transform(X)
    np.testing.assert_allclose(found, codes, atol=1e-10)
    np.testing.assert_allclose(coder.inverse_transform(found), X, atol=1e-10)
    # Without the offset the same data is no longer one atom per row.
    plain = LassoCoder(atoms, algorithm="omp", n_nonzero_coefs=1).fit(X)
    assert explained_variance(X, plain.inverse_transform(plain.transform(X))) < 0.99


def test_algorithm_changed_after_fit(superposition):
    # Fitted for thresholding (no Gram matrix kept), then asked for OMP.
    X, true_atoms, true_codes = superposition
    coder = LassoCoder(true_atoms, algorithm="threshold").fit(X)
    coder.set_params(algorithm="omp", n_nonzero_coefs=10)
    np.testing.assert_allclose(coder.transform(X), true_codes, atol=1e-8)


def test_inverse_transform_accepts_sparse_codes(superposition):
    X, true_atoms, true_codes = superposition
    coder = LassoCoder(true_atoms).fit(X)
    dense = coder.inverse_transform(true_codes)
    np.testing.assert_allclose(dense, X)
    from_sparse = coder.inverse_transform(sp.csr_matrix(true_codes))
    np.testing.assert_allclose(from_sparse, dense)


def test_float32_stays_float32(superposition):
    X, true_atoms, _ = superposition
    coder = LassoCoder(true_atoms, algorithm="omp", n_nonzero_coefs=5)
    codes = coder.fit_transform(X.astype(np.float32))
    assert codes.dtype == np.float32
    assert coder.inverse_transform(codes).dtype == np.float32


@pytest.mark.parametrize("algorithm", ["omp", "lasso_cd", "lasso_lars", "threshold"])
def test_float16_gives_float32(superposition, algorithm):
    # float32 holds every float16 exactly; scikit-learn's own conversion
    # would copy the data whole into float64.
    X, true_atoms, _ = superposition
    half = X[:20].astype(np.float16)
    coder = LassoCoder(true_atoms, algorithm=algorithm, alpha=0.05, n_nonzero_coefs=5)
    codes = coder.fit(half).transform(half)
    assert codes.dtype == np.float32
    np.testing.assert_array_equal(codes, coder.transform(half.astype(np.float32)))
    assert coder.inverse_transform(codes.astype(np.float16)).dtype == np.float32


def test_a_failed_fit_leaves_the_coder_as_it_was():
    names = [f"b{i}" for i in range(3)]
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(np.random.RandomState(0).normal(size=(4, 3)), columns=names)
    coder = LassoCoder(_random_dictionary(3)).fit(X)
    before = {k: v for k, v in vars(coder).items()}
    wide = pd.DataFrame(np.zeros((4, 8)), columns=[f"c{i}" for i in range(8)])
    with pytest.raises(ValueError, match="X has 8 features"):
        coder.fit(wide)
    coder.set_params(offset=np.zeros(5))
    with pytest.raises(ValueError, match="offset must have shape"):
        coder.fit(wide.iloc[:, :3])
    assert set(vars(coder)) == set(before)
    assert coder.n_features_in_ == 3 and list(coder.feature_names_in_) == names
    coder.set_params(offset=None)
    assert coder.transform(X).shape == (4, 5)
    # A first fit that fails leaves the coder unfitted.
    fresh = LassoCoder(_random_dictionary(3))
    with pytest.raises(ValueError, match="X has 8 features"):
        fresh.fit(wide)
    with pytest.raises(NotFittedError):
        fresh.transform(X)


@pytest.mark.parametrize(
    "params", [dict(algorithm="omp", n_nonzero_coefs=5), dict(algorithm="lasso_cd")]
)
def test_n_jobs_gives_same_codes(superposition, params):
    X, true_atoms, _ = superposition
    one = LassoCoder(true_atoms, alpha=0.05, **params).fit_transform(X[:60])
    two = LassoCoder(true_atoms, alpha=0.05, n_jobs=2, **params).fit_transform(X[:60])
    np.testing.assert_allclose(one, two, atol=1e-12)


def test_pickle_round_trip(superposition):
    X, true_atoms, _ = superposition
    coder = LassoCoder(true_atoms, alpha=0.05).fit(X)
    restored = pickle.loads(pickle.dumps(coder))
    np.testing.assert_array_equal(restored.transform(X[:10]), coder.transform(X[:10]))


def test_feature_names_out():
    coder = LassoCoder(_random_dictionary(3)).fit(np.zeros((2, 3)))
    assert list(coder.get_feature_names_out()) == [f"lassocoder{i}" for i in range(5)]


def test_errors():
    atoms = _random_dictionary(3)
    X = np.random.RandomState(0).normal(size=(4, 3))
    msg = "X has 4 features, but the dictionary has atoms of width 3"
    with pytest.raises(ValueError, match=msg):
        LassoCoder(atoms).fit(np.zeros((4, 4)))
    coder = LassoCoder(atoms).fit(X)
    msg = "X has 4 features, but LassoCoder is expecting 3"
    with pytest.raises(ValueError, match=msg):
        coder.transform(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=re.escape("X has 4 components per row, but")):
        coder.inverse_transform(np.zeros((2, 4)))
    bad = X.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        coder.transform(bad)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        LassoCoder(atoms).fit(bad)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        coder.inverse_transform(np.full((1, 5), np.nan))
    bad_atoms = atoms.copy()
    bad_atoms[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input dictionary contains infinity"):
        LassoCoder(bad_atoms).fit(X)
    with pytest.raises(ValueError, match="0 sample"):
        coder.transform(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="Expected 2D array"):
        coder.transform(np.zeros(3))
    with pytest.raises(ValueError, match=re.escape("offset must have shape (3,)")):
        LassoCoder(atoms, offset=np.zeros(4)).fit(X)
    with pytest.raises(ValueError, match="'algorithm' parameter"):
        LassoCoder(atoms, algorithm="lars").fit(X)


def test_amortisation_gap_of_a_thresholding_encoder(superposition):
    X, true_atoms, _ = superposition
    # A tied-weight ReLU encoder of the true atoms: crude, but its dictionary
    # is exact, so optimal codes at the same L0 must reconstruct better.
    encoder = LassoCoder(true_atoms, algorithm="threshold", alpha=0.2).fit(X)
    result = amortisation_gap(encoder, X)
    assert result["l0"] > 3
    assert result["optimal"] > 0.999
    assert result["encoder"] < 0.99
    assert result["gap"] == pytest.approx(result["optimal"] - result["encoder"])
    assert result["positive"] is True


def test_amortisation_gap_of_signed_codes_is_not_negative(superposition):
    # scikit-learn's dictionary learning codes with signed values by
    # default: non-negative OMP would search fewer codes than the encoder
    # and could come out below it.
    X = superposition[0]
    est = MiniBatchDictionaryLearning(n_components=64, max_iter=5, random_state=0).fit(X)
    assert np.any(est.transform(X) < 0)
    result = amortisation_gap(est, X)
    assert result["positive"] is False
    assert result["gap"] >= 0
    nonneg = LassoCoder(est, algorithm="omp", n_nonzero_coefs=result["l0"]).fit(X)
    assert result["optimal"] > explained_variance(X, nonneg.inverse_transform(nonneg.transform(X)))
    # The same codes split in two non-negative halves are signed all the same.
    split = MiniBatchDictionaryLearning(n_components=64, max_iter=5, random_state=0,
                                        split_sign=True).fit(X)
    assert not np.any(split.transform(X) < 0)
    split_result = amortisation_gap(split, X)
    assert split_result["positive"] is False
    assert split_result["gap"] == pytest.approx(result["gap"], abs=1e-6)


def test_amortisation_gap_of_a_sparse_autoencoder(superposition):
    torch = pytest.importorskip("torch")
    from sparse_dict import SparseAutoencoderDictionary

    X = superposition[0]
    threads = torch.get_num_threads()
    # One thread: tiny products on a shared machine are far slower with more.
    torch.set_num_threads(1)
    try:
        sae = SparseAutoencoderDictionary(
            n_components=96, batch_size=50, max_iter=20, learning_rate=1e-2,
            l1_coef=1.0, resample_dead=False, decoder_bias_init="mean",
            device="cpu", random_state=0,
        ).fit(X)
    finally:
        torch.set_num_threads(threads)
    result = amortisation_gap(sae, X)
    # "auto" takes the decoder bias: the same as passing it, not as none.
    explicit = amortisation_gap(sae, X, offset=sae.decoder_bias_)
    assert result == explicit
    assert amortisation_gap(sae, X, offset=None)["optimal"] != result["optimal"]
    assert result["encoder"] == pytest.approx(sae.score(X))
    assert result["optimal"] > result["encoder"]


def test_amortisation_gap_passes_a_data_frame_on_as_given():
    # An estimator fitted on named columns warned "X does not have valid
    # feature names" when the gap handed it the checked array instead.
    pd = pytest.importorskip("pandas")
    from sparse_dict import SparseAutoencoderDictionary

    rows = np.random.RandomState(0).exponential(size=(300, 6))
    frame = pd.DataFrame(rows, columns=[f"neuron_{i}" for i in range(6)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SparseAutoencoderDictionary(n_components=12, max_steps=60, random_state=0).fit(frame)
    sae.set_output(transform="pandas")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_frame = amortisation_gap(sae, frame)
    assert from_frame == amortisation_gap(sae.set_output(transform="default"), rows)



def test_amortisation_gap_of_a_lasso_coder_codes_against_its_offset():
    # "auto" took decoder_bias_ only: a LassoCoder's offset_ was left out of
    # the optimal side, which then explained -0.97 against the encoder's 0.59.
    X, atoms, _ = make_superposition(200, 8, 12, n_active=2, random_state=0)
    bias = np.linspace(-1, 1, 8)
    coder = LassoCoder(atoms, algorithm="threshold", alpha=0.1, offset=bias).fit(X + bias)
    auto = amortisation_gap(coder, X + bias)
    assert auto == amortisation_gap(coder, X + bias, offset=bias)
    assert auto["optimal"] > 0.99 and auto["gap"] > 0


def test_amortisation_gap_of_sparse_pca_codes_against_its_mean():
    # SparsePCA codes X - mean_ and adds mean_ back: "auto" left it out,
    # and the optimal side explained -34.8 on data offset by 3.
    from sklearn.decomposition import SparsePCA

    X, _, _ = make_superposition(300, 16, 32, n_active=3, random_state=0)
    pca = SparsePCA(n_components=8, alpha=0.1, random_state=0, max_iter=20).fit(X + 3)
    auto = amortisation_gap(pca, X + 3)
    assert auto == amortisation_gap(pca, X + 3, offset=pca.mean_)
    assert auto["optimal"] > 0.5


def test_a_fitted_estimator_without_atoms_is_named_as_such():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.random.RandomState(0).rand(20, 4)
    with pytest.raises(TypeError, match="Pipeline passed as dictionary is fitted but holds "
                                        "no dictionary"):
        LassoCoder(make_pipeline(StandardScaler()).fit(X)).fit(X)
    with pytest.raises(NotFittedError, match="has no components_: fit it first"):
        LassoCoder(MiniBatchDictionaryLearning(3)).fit(X)


@pytest.mark.parametrize("dictionary", [None, np.ones(3), np.ones((2, 2, 2))])
def test_a_dictionary_that_is_not_atoms_is_named(dictionary):
    # LassoCoder(None).fit(X) said "Expected 2D array, got scalar array
    # instead: array=nan", naming neither the dictionary nor None.
    with pytest.raises(ValueError, match=r"dictionary must be the atoms, an array of shape "
                                         r"\(n_components, n_features\)"):
        LassoCoder(dictionary).fit(np.ones((3, 2)))


def test_a_dictionary_estimator_s_column_names_are_checked():
    # The estimator's atoms follow the columns it was fitted on; LassoCoder
    # coded a frame with them reordered against the wrong entries (EV -2.7)
    # where the estimator's own transform refuses it.
    pd = pytest.importorskip("pandas")
    rng = np.random.RandomState(0)
    frame = pd.DataFrame(rng.normal(size=(60, 4)), columns=["a", "b", "c", "d"])
    learner = MiniBatchDictionaryLearning(n_components=3, random_state=0, max_iter=2).fit(frame)
    for dictionary in (learner, FrozenEstimator(learner)):
        LassoCoder(dictionary).fit(frame)
        with pytest.raises(ValueError, match=r"The feature names of X differ from those the "
                                             r"\w+ passed as dictionary was fitted with "
                                             r"\(column 0: 'd' in X, 'a' there\)"):
            LassoCoder(dictionary).fit(frame[["d", "c", "b", "a"]])
        with pytest.warns(UserWarning, match="X has no feature names, but the"):
            LassoCoder(dictionary).fit(frame.to_numpy())
    # Atoms given as an array carry no names: any frame of their width goes.
    LassoCoder(learner.components_).fit(frame[["d", "c", "b", "a"]])


@pytest.mark.parametrize("params", [dict(algorithm="threshold", alpha=0.1),
                                    dict(algorithm="omp", n_nonzero_coefs=5),
                                    dict(algorithm="omp", n_nonzero_coefs=5, positive=False),
                                    dict(algorithm="lasso_lars", alpha=0.1),
                                    dict(algorithm="lasso_cd", alpha=0.1)])
def test_rows_are_coded_in_blocks_with_the_codes_of_one_call(superposition, monkeypatch,
                                                             params):
    from sparse_dict import coding

    X, true_atoms, _ = superposition
    rows = X[:50] * 1e-6  # coded at unit size: a power of two, whatever the block
    coder = LassoCoder(true_atoms, **params).fit(X)
    whole = coder.transform(rows)
    monkeypatch.setattr(coding, "_BLOCK_BYTES", 8 * true_atoms.shape[0] * 7)  # 7 rows
    # Equal but for BLAS's summation order, which may change with the rows' count.
    np.testing.assert_allclose(coder.transform(rows), whole, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(coder.transform(rows[:7]), whole[:7], rtol=1e-5, atol=1e-12)


def test_transform_s_memory_is_about_its_codes():
    # 100,000 rows of 1,024 atoms coded at once peaked at 4.5 to 5.6 times
    # the codes' memory (the solvers' float64 arrays of every row).
    rng = np.random.RandomState(0)
    atoms = rng.standard_normal((1024, 32)).astype(np.float32)
    X = rng.standard_normal((24_000, 32)).astype(np.float32)
    coder = LassoCoder(atoms, algorithm="threshold", alpha=0.5).fit(X[:10])
    codes, peak = peak_bytes(coder.transform, X)
    assert peak < 1.8 * codes.nbytes


def test_the_feature_names_warning_points_at_the_caller_s_line(superposition):
    # It pointed at scikit-learn's fit wrapper (sklearn/base.py).
    import pandas as pd

    X, true_atoms, _ = superposition
    frame = pd.DataFrame(X, columns=[f"c{i}" for i in range(X.shape[1])])
    learned = MiniBatchDictionaryLearning(n_components=8, max_iter=2, random_state=0).fit(frame)
    with pytest.warns(UserWarning, match="X has no feature names") as record:
        LassoCoder(learned).fit(X)
    assert __file__ in {w.filename for w in record}


def test_a_row_s_solver_codes_do_not_depend_on_the_rows_beside_it(superposition):
    # One size for a whole block: a row of 1e-6 among rows of 1 was coded
    # as nothing by LARS, and alone with 10 atoms.
    X, true_atoms, _ = superposition
    rows = np.vstack([X[:1] * 1e-6, X[1:50]])
    for params in (dict(algorithm="lasso_lars", alpha=1e-9), dict(algorithm="omp",
                                                                  positive=False)):
        coder = LassoCoder(true_atoms, **params).fit(X)
        alone = coder.transform(rows[:1])
        assert np.count_nonzero(alone) > 0
        np.testing.assert_allclose(coder.transform(rows)[:1], alone, rtol=1e-6, atol=1e-18)


def test_lars_s_own_warnings_are_not_called_coordinate_descent_s():
    # Every ConvergenceWarning was counted as a row stopped at max_iter by
    # coordinate descent, LARS's "Regressors in active set degenerate" too.
    rng = np.random.RandomState(0)
    atoms = rng.standard_normal((8, 6))
    atoms = np.vstack([atoms, atoms + 1e-9 * rng.standard_normal(atoms.shape)])
    X = np.abs(rng.standard_normal((100, 8))) @ atoms[:8]
    coder = LassoCoder(atoms, algorithm="lasso_lars", alpha=1e-6).fit(X)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        coder.transform(X)
    assert not [w for w in record if "Coordinate descent" in str(w.message)]


def test_unconverged_rows_of_several_workers_are_said_once(superposition):
    # With n_jobs=2 scikit-learn's workers printed one warning a row in
    # their own processes, and none reached the caller.
    X, true_atoms, _ = superposition
    params = dict(algorithm="lasso_cd", alpha=0.01, transform_max_iter=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        codes = LassoCoder(true_atoms, n_jobs=2, **params).fit(X).transform(X[:100])
    said = [str(w.message) for w in record if "Coordinate descent" in str(w.message)]
    assert len(said) == 1 and "of 100 rows" in said[0], said
    np.testing.assert_allclose(codes, LassoCoder(true_atoms, **params).fit(X).transform(X[:100]),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["omp", "lasso_cd"])
def test_transform_from_several_threads_leaves_the_warning_machinery_as_it_was(algorithm):
    # Each transform recorded warnings with catch_warnings, whose state is
    # the process's: three threads' blocks interleaved and left an "always"
    # filter ahead of the application's "error" (most runs), or every later
    # warning of the process going into a finished block's list, unseen.
    import threading

    from sparse_dict import SparseAutoencoderDictionary

    rng = np.random.default_rng(0)
    X = rng.exponential(size=(3000, 32)).astype(np.float32)
    rows = rng.exponential(size=(200, 32)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SparseAutoencoderDictionary(n_components=64, max_iter=1, random_state=0,
                                          transform_algorithm=algorithm).fit(X)
    alone = sae.transform(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filters, show = list(warnings.filters), warnings._showwarnmsg_impl
        results, failures = [], []

        def work():
            try:
                for _ in range(30):
                    results.append(sae.transform(rows))
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures and len(results) == 90
        assert warnings.filters == filters and warnings._showwarnmsg_impl is show
        with pytest.raises(UserWarning):
            warnings.warn("still an error", UserWarning)
    for codes in results:
        np.testing.assert_array_equal(codes, alone)
