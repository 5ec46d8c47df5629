"""Ground-truth recovery on synthetic data with known atoms, per activation.

Two generators, each with uniform and power-law feature frequencies:

* ``make_superposition`` (:mod:`sparse_dict.datasets`): independent random
  atoms, uniform magnitudes;
* ``make_clustered_mixtures`` (:mod:`benchmarks.generators`, used by no
  test): clustered, correlated atoms that fire together, log-normal
  magnitudes, a little noise. Its largest case is the issue's new-user
  trial: 512 atoms in 128 dimensions, 40,000 rows, about 8 active per row.

Every method learns exactly as many atoms as there are true ones, from the
same training rows, and is scored on the same held-out rows: MMCS (mean max
cosine similarity to the true atoms), the share recovered at cosine 0.9,
explained variance and L0 of its codes, dead features and wall time.

* ``SparseAutoencoderDictionary`` with each activation: ``topk`` and
  ``batchtopk`` at ``k`` = the generator's mean number of active features
  (AuxK on), ``relu`` at ``l1_coef`` and ``jumprelu`` at ``l0_coef`` from
  :data:`KNOBS`, all with the same step budget, learning rate and batch;
* scikit-learn's ``MiniBatchDictionaryLearning`` (LARS coding, trained
  until its own early stopping, scikit-learn's default: one pass had left it
  short by up to 0.055 of MMCS), at each ``alpha`` of :data:`MBDL_ALPHAS`;
  its best MMCS over them is the one compared (its best setting: 0.3 codes
  about the true L0 on make_superposition's cases, 0.6 on the clustered
  ones, whose magnitudes are larger; 0.1, in earlier runs, coded four
  times the true L0 and was never the best). Its codes are signed, so an atom learned as
  the negative of a true one is an exact solution: its MMCS and recovery
  rate are scored sign-agnostically (on ``|cosine|``), the SAEs' (whose
  codes are non-negative, so that an atom and its negative are different
  features) with the sign. Where it would take too long on every row
  (``mbdl_rows``), it sees the first ``mbdl_rows`` training rows: the table
  says so, and the best top-k-family SAE is fitted on those same rows too;
* ``LassoCoder`` on the true atoms (the oracle coder);
* the two together: the top-k SAE started from MiniBatchDictionaryLearning's
  dictionary (``dict_init``; that of its best alpha) and trained like the others, shown beside
  them and left out of the targets, which judge the SAE alone;
* an optimisation reference: a plain top-k SAE loop (autograd and Adam,
  ``k`` = the mean number of active features, the SAEs' learning rate,
  batch and steps), once from random atoms and once from the true atoms.
  Where the start at the truth keeps the atoms (MMCS near 1) and
  reconstructs the held-out rows better than the random start, the top-k
  objective has a better optimum near the truth than the one training
  finds from a random start: an SAE's shortfall against the MMCS target is
  then one of optimisation, not of the objective.

Targets, on every case: the best top-k-family SAE reaches MMCS >= 0.95, and
beats MiniBatchDictionaryLearning's MMCS when both see the same rows.
"""

import warnings

import numpy as np
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import (
    ACTIVATIONS,
    TOPK_FAMILY,
    Timer,
    best_time,
    knob_label,
    sae_params,
    target,
    warm_up_sae,
)
from benchmarks._plain import PlainSAE
from benchmarks.generators import make_clustered_mixtures
from sparse_dict import LassoCoder, SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import (
    dead_fraction,
    explained_variance,
    l0,
    mean_max_cosine_similarity,
    recovery_rate,
)

POWER_LAW = 0.5  # frequency_decay of the power-law cases


def _case(generator, frequencies, d, n, rows, active, mbdl_rows=None, steps=None):
    return dict(generator=generator, frequencies=frequencies, n_features=d, n_atoms=n,
                n_rows=rows, n_active=active, mbdl_rows=mbdl_rows or rows, sae_steps=steps)


SIZES = {
    "tiny": dict(
        cases=[_case("superposition", "uniform", 16, 32, 600, 3),
               _case("clustered", "power-law", 16, 32, 600, 3, mbdl_rows=300)],
        n_eval=100, sae_steps=60,
    ),
    "quick": dict(
        cases=[_case("superposition", "uniform", 32, 128, 4000, 4),
               _case("superposition", "power-law", 32, 128, 4000, 4),
               _case("clustered", "uniform", 32, 128, 4000, 4),
               _case("clustered", "power-law", 128, 512, 40_000, 8, mbdl_rows=5000,
                     steps=2500)],
        n_eval=500, sae_steps=3000,
    ),
    "full": dict(
        cases=[_case("superposition", "uniform", 256, 1024, 20_000, 5),
               _case("superposition", "power-law", 256, 1024, 20_000, 5),
               _case("clustered", "uniform", 128, 512, 40_000, 8),
               _case("clustered", "power-law", 128, 512, 40_000, 8),
               _case("clustered", "power-law", 256, 2048, 100_000, 16, mbdl_rows=20_000)],
        n_eval=1000, sae_steps=5000,
    ),
}

# Sparsity settings of the activations without a k. l1_coef=3 is the value
# that recovers make_superposition's atoms well; l0_coef=0.01 (a feature
# fires when it removes 1% of the inputs' mean squared norm) gives about the
# true L0 on these generators (measured on make_superposition, 32-d).
KNOBS = {"relu": 3.0, "jumprelu": 0.01}
# MiniBatchDictionaryLearning's alphas; its best MMCS over them is compared.
MBDL_ALPHAS = (0.3, 0.6, 1.0)
ORACLE_ALPHA = 0.05
MMCS_TARGET = 0.95


def make_data(case, n_eval, seed=0):
    """Training and held-out rows and the true atoms of ``case``."""
    n = case["n_rows"] + n_eval
    decay = POWER_LAW if case["frequencies"] == "power-law" else 0.0
    if case["generator"] == "superposition":
        X, atoms, _ = make_superposition(
            n, case["n_features"], case["n_atoms"], n_active=case["n_active"],
            frequency_decay=decay, random_state=seed, dtype=np.float32)
    else:
        X, atoms, _ = make_clustered_mixtures(
            n, case["n_features"], case["n_atoms"], n_active=case["n_active"],
            frequency_decay=decay, random_state=seed)
    return X[: case["n_rows"]], X[case["n_rows"]:], atoms


def _knob(activation, case):
    return case["n_active"] if activation in TOPK_FAMILY else KNOBS[activation]


def _score(name, est, X_eval, true_atoms, fit_s, n_rows, encode, decode, repeats,
           signed=True, **extra):
    """A method's row of figures; its transform time is the best of ``repeats`` calls
    (3 for every method: the SAEs' alone had three).

    ``signed=False`` scores the atoms sign-agnostically (``|cosine|``), for a
    method with signed codes, to which an atom and its negative are the same
    feature: the metrics take the better of each learned atom and its
    negative, by scoring the dictionary with every atom's negative added.
    """
    codes = encode(X_eval)
    transform_s = best_time(lambda: encode(X_eval), repeats)
    atoms = est.components_ if signed else np.vstack([est.components_, -est.components_])
    row = {
        "method": name,
        "n_rows": n_rows,
        "mmcs": mean_max_cosine_similarity(atoms, true_atoms),
        "recovery_0.9": recovery_rate(atoms, true_atoms, threshold=0.9),
        "cosine": "signed" if signed else "absolute cosine (signed codes)",
        "explained_variance": explained_variance(X_eval, decode(codes)),
        "l0": l0(codes),
        "dead_fraction": dead_fraction(codes),
        "fit_s": fit_s,
        "transform_rows_per_s": X_eval.shape[0] / transform_s,
    }
    row.update(extra)
    return row


def _fit_sae(activation, knob, X, X_eval, true_atoms, steps, device, seed, label=None,
             warm_start=None):
    """An SAE's row; ``warm_start=(name, atoms)`` starts it from those atoms.

    A warm-started row is marked ``"warm_start"`` instead of ``"activation"``,
    so that the targets, which judge the SAEs alone, do not read it.
    """
    name, atoms = warm_start or ("", None)
    sae = SparseAutoencoderDictionary(
        true_atoms.shape[0], device=device, random_state=seed, dict_init=atoms,
        **sae_params(activation, knob, max_iter=100_000, max_steps=steps))
    with Timer() as t:
        sae.fit(X)
    tag = {"warm_start": name} if warm_start else {"activation": activation}
    return _score(label or f"SAE {knob_label(activation, knob)}", sae, X_eval, true_atoms,
                  t.seconds, X.shape[0], sae.transform, sae.inverse_transform, 3,
                  knob=knob, steps=int(sae.n_steps_),
                  train_dead_fraction=float(np.mean(sae.feature_frequencies_ == 0)), **tag)


def _plain_topk(X, X_eval, true_atoms, k, steps, device, seed, start):
    """The optimisation reference: a plain top-k SAE loop, started at ``start``'s atoms.

    The same loop (autograd, Adam at the SAE's learning rate, its batch size
    and step budget) from the true atoms and from random ones: where the
    first keeps the true atoms and reconstructs better than the second, the
    objective has a better optimum near the truth than the one a random
    start finds, and a shortfall of the SAE's MMCS is one of optimisation.
    """
    params = sae_params("topk")
    sae = PlainSAE(X.shape[1], true_atoms.shape[0], device, seed=seed,
                   learning_rate=params["learning_rate"], k=k,
                   atoms=true_atoms if start == "true" else None)
    with Timer() as t:
        sae.train(X, steps, params["batch_size"], seed)
    label = "the true atoms" if start == "true" else "random atoms"
    return _score(f"plain top-k loop (k={k}) from {label}", sae, X_eval, true_atoms,
                  t.seconds, X.shape[0], sae.transform, sae.inverse_transform, 3,
                  reference=start, steps=steps)


def run_case(case, sizes, device, seed=0):
    """Fit and score every method on one synthetic data set."""
    X_train, X_eval, true_atoms = make_data(case, sizes["n_eval"], seed)
    n_atoms = case["n_atoms"]
    steps = case["sae_steps"] or sizes["sae_steps"]
    rows = [_fit_sae(a, _knob(a, case), X_train, X_eval, true_atoms, steps, device, seed)
            for a in ACTIVATIONS]

    X_mbdl = X_train[: case["mbdl_rows"]]
    if X_mbdl.shape[0] < X_train.shape[0]:
        # Equal footing where MBDL cannot see every row: the best top-k-family
        # SAE on exactly the rows MBDL sees.
        best = max((r for r in rows if r["activation"] in TOPK_FAMILY), key=lambda r: r["mmcs"])
        rows.append(_fit_sae(
            best["activation"], best["knob"], X_mbdl, X_eval, true_atoms, steps, device, seed,
            label=f"SAE {knob_label(best['activation'], best['knob'])} "
                  f"({X_mbdl.shape[0]:,} rows, as MBDL)"))

    with warnings.catch_warnings():
        # LARS warns on every early stop of a path; the fit is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = []
        for alpha in MBDL_ALPHAS:
            est = MiniBatchDictionaryLearning(
                n_components=n_atoms, alpha=alpha, batch_size=256,
                transform_algorithm="lasso_lars", transform_alpha=alpha, random_state=seed,
            )
            with Timer() as t:
                est.fit(X_mbdl)
            row = _score(f"MiniBatchDictionaryLearning alpha={alpha:g}", est, X_eval,
                         true_atoms, t.seconds, X_mbdl.shape[0], est.transform,
                         lambda c, est=est: c @ est.components_, 3, signed=False,
                         mbdl_alpha=alpha)
            rows.append(row)
            fitted.append((row["mmcs"], est))
        mbdl = max(fitted, key=lambda f: f[0])[1]

        oracle = LassoCoder(true_atoms, algorithm="lasso_lars", alpha=ORACLE_ALPHA)
        oracle.fit(X_eval)
        rows.append(_score("LassoCoder on true atoms (oracle)", oracle, X_eval, true_atoms, 0.0,
                           0, oracle.transform, oracle.inverse_transform, 3))
    # The two together: the top-k SAE started from MBDL's dictionary
    # (dict_init), trained as the others on every training row. Its fit time
    # leaves out MBDL's (in MBDL's row), and the targets leave it out.
    rows.append(_fit_sae("topk", case["n_active"], X_train, X_eval, true_atoms, steps, device,
                         seed, label=f"SAE topk k={case['n_active']} from MBDL's dictionary",
                         warm_start=("mbdl", mbdl.components_)))
    rows += [_plain_topk(X_train, X_eval, true_atoms, case["n_active"], steps, device, seed, start)
             for start in ("random", "true")]
    return dict(case, sae_steps=steps, n_eval_rows=sizes["n_eval"], methods=rows,
                **_verdict(rows))


def _verdict(rows):
    """The case's best top-k-family SAE and its margin over MBDL at equal rows."""
    # MBDL at its best alpha (highest MMCS).
    mbdl = max((r for r in rows if "mbdl_alpha" in r), key=lambda r: r["mmcs"])
    family = [r for r in rows if r.get("activation") in TOPK_FAMILY]
    full = [r for r in family if "as MBDL" not in r["method"]]
    best = max(full, key=lambda r: r["mmcs"])
    same_rows = [r for r in family if r["n_rows"] == mbdl["n_rows"]]
    best_same = max(same_rows, key=lambda r: r["mmcs"])
    return {
        "best_topk_family": best["method"],
        "best_topk_family_mmcs": best["mmcs"],
        "best_topk_family_same_rows_mmcs": best_same["mmcs"],
        "mbdl_mmcs": mbdl["mmcs"],
        "mbdl_best_alpha": mbdl["mbdl_alpha"],
        "margin_over_mbdl": best_same["mmcs"] - mbdl["mmcs"],
        "mbdl_rows_fewer": mbdl["n_rows"] < max(r["n_rows"] for r in full),
    }


def case_name(case):
    """``"clustered, power-law, 128 x 512, 40,000 rows"``."""
    return (f"{case['generator']}, {case['frequencies']}, {case['n_features']} x "
            f"{case['n_atoms']}, {case['n_rows']:,} rows")


def run(mode="quick", device="cpu"):
    """Run every recovery case of ``mode``; return the figures and the targets.

    Returns
    -------
    result : dict
        ``"cases"``: one entry per data set with a row of figures per method
        and the best top-k-family SAE; ``"settings"``; ``"targets"``.
    """
    sizes = SIZES[mode]
    warm_up_sae(device)
    cases = []
    for case in sizes["cases"]:
        with Timer() as t:
            cases.append(run_case(case, sizes, device))
        # Progress: a quick run of this section takes minutes.
        print(f"[benchmarks]   recovery, {case_name(case)}: {t.seconds:.0f} s", flush=True)
    worst_mmcs = min(cases, key=lambda c: c["best_topk_family_mmcs"])
    worst_margin = min(cases, key=lambda c: c["margin_over_mbdl"])
    note = "" if mode != "tiny" else "tiny sizes"
    return {
        "settings": {
            "sae": sae_params("topk"),
            "sae_knobs": {"topk": "k = n_active", "batchtopk": "k = n_active", **KNOBS},
            "sae_steps": sizes["sae_steps"],
            "mbdl": {"alpha": list(MBDL_ALPHAS), "batch_size": 256,
                     "max_iter": "scikit-learn's default (1,000 passes at most, early stopping)",
                     "fit_algorithm": "lars", "transform_algorithm": "lasso_lars",
                     "best_of_alphas": "highest MMCS", "cosine": "absolute cosine (signed codes)"},
            "oracle": {"algorithm": "lasso_lars", "alpha": ORACLE_ALPHA, "positive": True},
            "power_law_decay": POWER_LAW,
        },
        "cases": cases,
        "targets": [
            target("recovery_topk_family_mmcs",
                   "lowest, over every case, of the best top-k-family SAE's MMCS",
                   worst_mmcs["best_topk_family_mmcs"], MMCS_TARGET,
                   note=(note + "; " if note else "") + f"worst case: {case_name(worst_mmcs)}"),
            target("recovery_topk_family_vs_mbdl",
                   "lowest, over every case, of best top-k-family SAE MMCS minus "
                   "MiniBatchDictionaryLearning's at its best alpha (of "
                   f"{', '.join(f'{a:g}' for a in MBDL_ALPHAS)}; scored on the absolute cosine, its "
                   "codes being signed), on the rows MBDL saw",
                   worst_margin["margin_over_mbdl"], 0.0,
                   note=(note + "; " if note else "") + f"worst case: {case_name(worst_margin)}"),
        ],
    }
