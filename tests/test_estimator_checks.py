"""scikit-learn's own API checks on the estimators."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sparse_dict import SparseAutoencoderDictionary


@parametrize_with_checks(
    [
        SparseAutoencoderDictionary(device="cpu", max_iter=5),
        # transform by a classical coder, built once per fit and settings:
        # transform must still leave the estimator's attributes as they were.
        SparseAutoencoderDictionary(device="cpu", max_iter=5, transform_algorithm="omp"),
    ],
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
