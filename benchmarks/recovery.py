"""Ground-truth recovery on synthetic data in superposition.

``make_superposition`` draws data from known true atoms (256 features, more
atoms than features). Each method learns a dictionary of as many atoms as
there are true ones and is scored by how well it finds them (mean max cosine
similarity, MMCS, and the share recovered at cosine 0.9) and by how well its
codes reconstruct held-out rows (explained variance at its L0):

* ``SparseAutoencoderDictionary``;
* scikit-learn's ``MiniBatchDictionaryLearning`` (LARS coding, one pass at
  the quick sizes: a pass already costs seconds per batch of 256 rows);
* scikit-learn's ``DictionaryLearning`` on the small case only (it codes
  every row at every iteration);
* ``LassoCoder`` on the true atoms: the oracle coder, whose reconstruction is
  the best a per-row Lasso can do with the right dictionary.

Target: SAE MMCS at least 0.95 and at least MiniBatchDictionaryLearning's on
the default case (the first case with 256 features).
"""

import warnings

import numpy as np
from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import Timer, best_time, sae_params, target
from sparse_dict import LassoCoder, SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import (
    dead_fraction,
    explained_variance,
    l0,
    mean_max_cosine_similarity,
    recovery_rate,
)

# (n_features, n_true_atoms, n_train_rows, run DictionaryLearning)
SIZES = {
    "tiny": dict(
        cases=[(16, 32, 600, True)], n_eval=100, sae_steps=100, mbdl_epochs=1, dl_iter=3,
    ),
    "quick": dict(
        cases=[(256, 512, 10_000, False), (32, 64, 1_000, True)],
        n_eval=400, sae_steps=2000, mbdl_epochs=1, dl_iter=5,
    ),
    "full": dict(
        cases=[
            (256, 512, 20_000, False),
            (256, 1024, 20_000, False),
            (256, 2048, 20_000, False),
            (64, 128, 4_000, True),
        ],
        n_eval=1000, sae_steps=5000, mbdl_epochs=1, dl_iter=30,
    ),
}

# Lasso penalty of the classical coders, in the data's units (atoms have unit
# norm and active magnitudes are uniform on (0, 1]).
MBDL_ALPHA = 0.1
ORACLE_ALPHA = 0.05


def _sae_settings(sizes):
    # A budget of steps rather than epochs, so that small and large cases
    # get the same amount of training.
    return sae_params(max_iter=10_000, max_steps=sizes["sae_steps"])


def _score(name, est, X_eval, true_atoms, fit_s, encode, decode, repeats):
    codes = encode(X_eval)
    transform_s = best_time(lambda: encode(X_eval), repeats)
    return {
        "method": name,
        "mmcs": mean_max_cosine_similarity(est.components_, true_atoms),
        "recovery_0.9": recovery_rate(est.components_, true_atoms, threshold=0.9),
        "explained_variance": explained_variance(X_eval, decode(codes)),
        "l0": l0(codes),
        "dead_fraction": dead_fraction(codes),
        "fit_s": fit_s,
        "transform_rows_per_s": X_eval.shape[0] / transform_s,
    }


def run_case(n_features, n_atoms, n_rows, with_dl, sizes, device, seed=0):
    """Fit and score every method on one synthetic data set."""
    n_eval = sizes["n_eval"]
    X, true_atoms, _ = make_superposition(
        n_rows + n_eval, n_features, n_atoms, random_state=seed, dtype=np.float32
    )
    X_train, X_eval = X[:n_rows], X[n_rows:]
    rows = []

    sae = SparseAutoencoderDictionary(
        n_atoms, device=device, random_state=seed, **_sae_settings(sizes)
    )
    with Timer() as t:
        sae.fit(X_train)
    rows.append(_score("SAE", sae, X_eval, true_atoms, t.seconds,
                       sae.transform, sae.inverse_transform, 5))

    with warnings.catch_warnings():
        # LARS warns on every early stop of a path; the fit is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mbdl = MiniBatchDictionaryLearning(
            n_components=n_atoms, alpha=MBDL_ALPHA, batch_size=256,
            max_iter=sizes["mbdl_epochs"], transform_algorithm="lasso_lars",
            transform_alpha=MBDL_ALPHA, random_state=seed,
        )
        with Timer() as t:
            mbdl.fit(X_train)
        rows.append(_score("MiniBatchDictionaryLearning", mbdl, X_eval, true_atoms,
                           t.seconds, mbdl.transform, lambda c: c @ mbdl.components_, 1))

        if with_dl:
            dl = DictionaryLearning(
                n_components=n_atoms, alpha=MBDL_ALPHA, max_iter=sizes["dl_iter"],
                transform_algorithm="lasso_lars", transform_alpha=MBDL_ALPHA,
                random_state=seed,
            )
            with Timer() as t:
                dl.fit(X_train)
            rows.append(_score("DictionaryLearning", dl, X_eval, true_atoms, t.seconds,
                               dl.transform, lambda c: c @ dl.components_, 1))

        oracle = LassoCoder(true_atoms, algorithm="lasso_lars", alpha=ORACLE_ALPHA)
        with Timer() as t:
            oracle.fit(X_train)
        rows.append(_score("LassoCoder on true atoms (oracle)", oracle, X_eval, true_atoms,
                           t.seconds, oracle.transform, oracle.inverse_transform, 1))
    return {
        "n_features": n_features,
        "n_true_atoms": n_atoms,
        "n_train_rows": n_rows,
        "n_eval_rows": n_eval,
        "methods": rows,
    }


def run(mode="quick", device="cpu"):
    """Run every recovery case of ``mode``; return the figures and the target.

    Returns
    -------
    result : dict
        ``"cases"``: one entry per data set with a row of figures per method;
        ``"settings"``; ``"targets"``.
    """
    sizes = SIZES[mode]
    cases = [run_case(*case, sizes, device) for case in sizes["cases"]]
    default = cases[0]
    by_name = {row["method"]: row for row in default["methods"]}
    sae_mmcs = by_name["SAE"]["mmcs"]
    mbdl_mmcs = by_name["MiniBatchDictionaryLearning"]["mmcs"]
    case_name = f"{default['n_features']} features, {default['n_true_atoms']} atoms"
    return {
        "settings": {
            "sae": _sae_settings(sizes),
            "mbdl": {"alpha": MBDL_ALPHA, "batch_size": 256, "epochs": sizes["mbdl_epochs"],
                     "fit_algorithm": "lars", "transform_algorithm": "lasso_lars"},
            "dictionary_learning": {"alpha": MBDL_ALPHA, "max_iter": sizes["dl_iter"]},
            "oracle": {"algorithm": "lasso_lars", "alpha": ORACLE_ALPHA, "positive": True},
            "data": "make_superposition(n_active=5, magnitudes U(0,1], no noise), float32",
        },
        "cases": cases,
        "targets": [
            target("recovery_sae_mmcs", f"SAE MMCS on the default case ({case_name})",
                   sae_mmcs, 0.95),
            target("recovery_sae_vs_mbdl",
                   "SAE MMCS minus MiniBatchDictionaryLearning's (default case)",
                   sae_mmcs - mbdl_mmcs, 0.0),
        ],
    }
