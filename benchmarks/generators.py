"""A second generator of data with known atoms, unlike ``make_superposition``.

``make_superposition`` (in :mod:`sparse_dict.datasets`, which the tests use)
draws independent random atoms and uniform magnitudes. The generator here
makes the harder kind of data that the issue's new-user trial used, and that
no test of the package sees, so that the benchmark cannot be tuned to the
data the tests use:

* atoms come in clusters: each is a shared random direction plus its own
  random part, so atoms of one cluster have cosine similarity about
  ``1 / (1 + spread**2)`` with each other (0.5 by default);
* features of one cluster tend to fire together: each row draws a
  log-normal gain per cluster that scales its features' firing
  probabilities (mean gain 1, so the expected number of active features is
  about ``n_active``);
* active magnitudes are log-normal (heavy-tailed, always positive), and a
  little isotropic noise is added.
"""

import numpy as np


def make_clustered_mixtures(n_samples, n_features, n_components, *, n_active=8.0,
                            n_clusters=None, spread=1.0, co_firing=1.0,
                            magnitude_sigma=0.5, frequency_decay=0.0, noise=0.01,
                            random_state=None, dtype=np.float32):
    """Non-negative mixes of clustered atoms with log-normal magnitudes.

    Parameters
    ----------
    n_samples, n_features, n_components : int
        Rows, dimension and number of true atoms.
    n_active : float, default=8.0
        Expected number of active features per row (before the cap of a
        firing probability at 1).
    n_clusters : int or None, default=None
        Number of atom clusters; ``None`` gives ``n_components // 8``.
    spread : float, default=1.0
        Size of each atom's own part relative to its cluster's direction.
    co_firing : float, default=1.0
        Standard deviation of the log of each row's per-cluster gain; 0
        makes features fire independently.
    magnitude_sigma : float, default=0.5
        Standard deviation of the log of an active feature's magnitude.
    frequency_decay : float, default=0.0
        Exponent of the power law of firing frequencies (0: uniform).
    noise : float, default=0.01
        Standard deviation of the Gaussian noise per coordinate.
    random_state : int or None
    dtype : numpy dtype, default=np.float32

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    atoms : ndarray of shape (n_components, n_features)
        Unit-norm true atoms.
    codes : ndarray of shape (n_samples, n_components)
    """
    rng = np.random.RandomState(random_state)
    n_clusters = n_clusters or max(1, n_components // 8)
    centres = rng.standard_normal((n_clusters, n_features))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.randint(n_clusters, size=n_components)
    own = rng.standard_normal((n_components, n_features)) / np.sqrt(n_features)
    atoms = centres[cluster] + spread * own
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)

    weights = (np.arange(n_components) + 1.0) ** -frequency_decay
    # Which features are frequent should not follow the cluster labels.
    weights = weights[rng.permutation(n_components)]
    p = n_active * weights / weights.sum()
    # exp(N(-s^2/2, s^2)) has mean 1, so the gains leave mean firing as it is.
    gain = np.exp(co_firing * rng.standard_normal((n_samples, n_clusters))
                  - co_firing**2 / 2)
    prob = np.minimum(1.0, p[None, :] * gain[:, cluster])
    active = rng.random_sample((n_samples, n_components)) < prob
    magnitudes = np.exp(magnitude_sigma * rng.standard_normal((n_samples, n_components)))
    codes = np.where(active, magnitudes, 0.0)
    X = codes @ atoms + noise * rng.standard_normal((n_samples, n_features))
    return X.astype(dtype), atoms.astype(dtype), codes.astype(dtype)
