"""Encoding speed at matched sparsity, and the amortisation gap.

An SAE is fitted on ``make_superposition`` data; then the same dictionary
(its ``components_`` with its decoder bias as offset) codes held-out rows
three ways:

* the SAE's own encoder (``transform``: one matrix product and a ReLU);
* ``LassoCoder(algorithm="lasso_lars", positive=True)``, with ``alpha``
  chosen by bisection so that its mean L0 matches the SAE's;
* non-negative OMP (``LassoCoder(algorithm="omp")``) and scikit-learn's
  ``sparse_encode(algorithm="omp")`` (signed codes) with
  ``n_nonzero_coefs`` equal to the SAE's L0, rounded.

Figures: rows per second of each, the ratio SAE / LARS (target >= 100x) and
the explained variance of each code. The amortisation gap is
:func:`sparse_dict.coding.amortisation_gap`: the EV of the non-negative OMP
code of the SAE's dictionary at the SAE's L0 minus the EV of its encoder.
"""

import numpy as np
from sklearn.decomposition import sparse_encode

from benchmarks._common import best_time, sae_params, target
from sparse_dict import LassoCoder, SparseAutoencoderDictionary
from sparse_dict.coding import amortisation_gap
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import explained_variance, l0

SIZES = {
    "tiny": dict(n_features=16, n_atoms=32, n_rows=1000, n_sae=2000, n_slow=50,
                 n_match=40, epochs=5),
    "quick": dict(n_features=256, n_atoms=512, n_rows=10_000, n_sae=20_000, n_slow=300,
                  n_match=100, epochs=20),
    "full": dict(n_features=256, n_atoms=1024, n_rows=20_000, n_sae=100_000, n_slow=1000,
                 n_match=200, epochs=20),
}
SPEEDUP_TARGET = 100.0


def _match_alpha(coder, X, target_l0, iterations=10):
    """Geometric bisection on Lasso's alpha until its L0 is near ``target_l0``."""
    lo, hi = 1e-5, 10.0
    best = None
    for _ in range(iterations):
        alpha = float(np.sqrt(lo * hi))
        found = l0(coder.set_params(alpha=alpha).transform(X))
        if best is None or abs(found - target_l0) < abs(best[1] - target_l0):
            best = (alpha, found)
        if abs(found - target_l0) <= 0.1 * target_l0:
            break
        if found > target_l0:
            lo = alpha  # too dense: more penalty
        else:
            hi = alpha
    return best[0]


def run(mode="quick", device="cpu"):
    """Time the SAE's encoder against per-row optimal coders of its dictionary.

    Returns
    -------
    result : dict
        ``"coders"``: rows/s, L0 and EV of each coder; ``"speedup_vs_lars"``;
        ``"amortisation_gap"``; ``"targets"``.
    """
    s = SIZES[mode]
    n_eval = max(s["n_sae"], s["n_slow"])
    X, _, _ = make_superposition(
        s["n_rows"] + n_eval, s["n_features"], s["n_atoms"], random_state=1,
        dtype=np.float32,
    )
    X_train, X_eval = X[: s["n_rows"]], X[s["n_rows"]:]
    X_slow = X_eval[: s["n_slow"]]
    sae = SparseAutoencoderDictionary(
        s["n_atoms"], device=device, random_state=0, **sae_params(max_iter=s["epochs"])
    ).fit(X_train)

    X_sae = X_eval[: s["n_sae"]]
    sae.transform(X_sae[:1000])  # warm-up: first calls allocate
    t_sae = best_time(lambda: sae.transform(X_sae), 5)
    codes = sae.transform(X_slow)
    sae_l0 = l0(codes)
    k = max(1, int(round(sae_l0)))
    coders = [{
        "coder": "SAE encoder",
        "rows_per_s": s["n_sae"] / t_sae,
        "l0": sae_l0,
        "explained_variance": explained_variance(X_slow, sae.inverse_transform(codes)),
    }]

    offset = sae.decoder_bias_
    lars = LassoCoder(sae, algorithm="lasso_lars", offset=offset).fit(X_slow)
    alpha = _match_alpha(lars, X_slow[: s["n_match"]], sae_l0)
    lars.set_params(alpha=alpha)
    omp = LassoCoder(sae, algorithm="omp", n_nonzero_coefs=k, offset=offset).fit(X_slow)
    atoms = sae.components_
    centred = X_slow - offset

    def sk_omp():
        return sparse_encode(centred, atoms, algorithm="omp", n_nonzero_coefs=k)

    for name, encode, decode in [
        (f"LassoCoder lasso_lars (alpha={alpha:.3g})", lars.transform, lars.inverse_transform),
        (f"LassoCoder non-negative OMP (k={k})", omp.transform, omp.inverse_transform),
        (f"sklearn sparse_encode OMP, signed (k={k})", lambda _: sk_omp(),
         lambda c: c @ atoms + offset),
    ]:
        seconds = best_time(lambda: encode(X_slow), 1)
        c = encode(X_slow)
        coders.append({
            "coder": name,
            "rows_per_s": s["n_slow"] / seconds,
            "l0": l0(c),
            "explained_variance": explained_variance(X_slow, decode(c)),
        })

    gap = amortisation_gap(sae, X_slow)
    speedup = coders[0]["rows_per_s"] / coders[1]["rows_per_s"]
    return {
        "case": {k_: s[k_] for k_ in ("n_features", "n_atoms", "n_rows", "n_sae", "n_slow")},
        "sae_settings": sae_params(max_iter=s["epochs"]),
        "coders": coders,
        "lars_alpha": alpha,
        "speedup_vs_lars": speedup,
        "speedup_vs_nonneg_omp": coders[0]["rows_per_s"] / coders[2]["rows_per_s"],
        "amortisation_gap": gap,
        "targets": [
            target("encoding_speedup_vs_lars",
                   "SAE transform rows/s / LassoCoder (LARS) rows/s at matched L0",
                   speedup, SPEEDUP_TARGET),
        ],
    }
