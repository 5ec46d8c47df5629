"""Time to quality: wall time for each method to reach the same reconstruction.

A quality level is a pair (explained variance EV*, L0*): a fitted model
reaches it when its codes of held-out rows explain at least EV* of the
variance with a mean L0 of at most L0*. Both methods learn the same number
of atoms from the same training rows (``make_superposition`` data) in the
same process.

* MiniBatchDictionaryLearning is trained batch by batch with ``partial_fit``
  for its pass over the data, once for each ``alpha`` of :data:`MBDL_ALPHAS`;
  at checkpoints (powers of two of the batch count, and the end) it is
  scored on held-out rows. The scoring is not counted in its wall time. Its
  time to any level is the fastest over its alphas (its best setting for
  that level): a larger alpha reaches a low L0 in a fraction of the time
  alpha 0.1 needs to bring its L0 down. The final (EV, L0) at alpha 0.1
  (:data:`MBDL_ALPHA`, the setting the issue's level was defined with, and
  the one of highest EV) is the *primary level*.
* The SAE is fitted from scratch, for each activation and sparsity setting
  (``k`` = the data's mean number of active features, and the largest
  ``k`` not above MBDL's final L0, for the top-k family; the recovery
  section's ``l1_coef`` and ``l0_coef`` for ReLU and JumpReLU), with a
  ladder of step budgets (each fit a complete run with its learning-rate
  schedule). Its time to a level is the wall time of the cheapest complete
  fit that reaches it. A rung is skipped when it cannot beat the best time
  already found.

Target: the fastest SAE reaches the primary level at least 20x sooner than
MiniBatchDictionaryLearning took (issue size: 256 features, 1024 atoms,
20,000 rows in ``--full``; smaller in quick mode so that it stays within
minutes). The per-activation times are reported as well.

When no SAE reaches the primary level, the *common level* is also reported:
the best (EV, L0) of an SAE fit that MiniBatchDictionaryLearning also
reaches at one of its checkpoints (at any of its alphas), and the time each
method needs to get there. The time each method needs to reach
MiniBatchDictionaryLearning's final MMCS at alpha 0.1 (dictionary quality
rather than coding quality) is reported too, MiniBatchDictionaryLearning's
again the fastest over its alphas.
"""

import warnings

import numpy as np
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import (
    ACTIVATIONS,
    TOPK_FAMILY,
    Timer,
    knob_label,
    sae_params,
    target,
    warm_up_sae,
)
from benchmarks.recovery import KNOBS
from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import explained_variance, l0, mean_max_cosine_similarity

SIZES = {
    "tiny": dict(n_features=16, n_atoms=32, n_rows=1024, n_eval=100, n_active=3,
                 step_ladder=[20, 60]),
    "quick": dict(n_features=64, n_atoms=256, n_rows=6000, n_eval=300, n_active=5,
                  step_ladder=[100, 250, 500, 1000, 2000]),
    "full": dict(n_features=256, n_atoms=1024, n_rows=20_000, n_eval=1000, n_active=5,
                 step_ladder=[100, 250, 500, 1000, 2000, 5000]),
}
# The alpha whose final point defines the primary level (as the issue set it).
MBDL_ALPHA = 0.1
# MiniBatchDictionaryLearning's alphas: its time to a level is the fastest of
# them. On the quick case alpha 0.1 ends at L0 24, 0.3 at L0 4.4 (near the
# data's 5) and 1.0 codes almost nothing (L0 0.1, EV < 0): the grid spans
# its useful range.
MBDL_ALPHAS = (0.1, 0.2, 0.3, 1.0)
BATCH = 256
SPEEDUP_TARGET = 20.0


def _reaches(point, level):
    return point["explained_variance"] >= level[0] and point["l0"] <= level[1]


def mbdl_trajectory(X, X_eval, n_atoms, true_atoms, seed=0, alpha=MBDL_ALPHA):
    """One pass of MiniBatchDictionaryLearning at ``alpha``, scored at checkpoints."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(X.shape[0])
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    checkpoints = {2**k for k in range(1, 30) if 2**k < len(batches)} | {len(batches)}
    est = MiniBatchDictionaryLearning(
        n_components=n_atoms, alpha=alpha, batch_size=BATCH,
        transform_algorithm="lasso_lars", transform_alpha=alpha, random_state=seed,
    )
    elapsed, points = 0.0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for step, index in enumerate(batches, start=1):
            with Timer() as t:
                est.partial_fit(X[index])
            elapsed += t.seconds
            if step in checkpoints:
                codes = est.transform(X_eval)
                points.append({
                    "alpha": alpha,
                    "steps": step,
                    "fit_s": elapsed,
                    "explained_variance": explained_variance(X_eval, codes @ est.components_),
                    "l0": l0(codes),
                    "mmcs": mean_max_cosine_similarity(est.components_, true_atoms),
                })
    return points


def sae_grid(n_active, mbdl_l0):
    """(activation, knob) pairs to try: top-k at the true L0 and at MBDL's, the others."""
    ks = sorted({int(n_active), max(1, int(np.floor(mbdl_l0)))})
    return ([(a, k) for a in TOPK_FAMILY for k in ks]
            + [(a, KNOBS[a]) for a in ACTIVATIONS if a not in TOPK_FAMILY])


def sae_ladder(X, X_eval, n_atoms, true_atoms, grid, ladder, level, device, seed=0):
    """SAE fits over ``grid`` and step budgets; the cheapest that reaches ``level``."""
    points, best = [], np.inf
    for activation, knob in grid:
        per_step = None
        for steps in ladder:
            if per_step is not None and per_step * steps > best:
                break  # cannot beat the fastest fit that already reached the level
            sae = SparseAutoencoderDictionary(
                n_atoms, device=device, random_state=seed,
                **sae_params(activation, knob, max_iter=100_000, max_steps=steps),
            )
            with Timer() as t:
                sae.fit(X)
            per_step = t.seconds / steps
            codes = sae.transform(X_eval)
            point = {
                "activation": activation,
                "setting": knob_label(activation, knob),
                "steps": int(sae.n_steps_),
                "fit_s": t.seconds,
                "explained_variance": explained_variance(X_eval, sae.inverse_transform(codes)),
                "l0": l0(codes),
                "mmcs": mean_max_cosine_similarity(sae.components_, true_atoms),
            }
            point["reaches_primary"] = _reaches(point, level)
            points.append(point)
            if point["reaches_primary"]:
                best = min(best, t.seconds)
                break  # longer budgets at this setting can only be slower
    return points


def _first_time(points, level):
    times = [p["fit_s"] for p in points if _reaches(p, level)]
    return min(times) if times else None


def _first_point(points, level):
    """The earliest point (least wall time) of ``points`` that reaches ``level``."""
    return min((p for p in points if _reaches(p, level)), key=lambda p: p["fit_s"],
               default=None)


def run(mode="quick", device="cpu"):
    """Measure the time to quality of ``mode``'s case.

    Returns
    -------
    result : dict
        The MiniBatchDictionaryLearning trajectory, the SAE fits, the
        primary and common levels with each method's time, and the target.
    """
    s = SIZES[mode]
    X, true_atoms, _ = make_superposition(
        s["n_rows"] + s["n_eval"], s["n_features"], s["n_atoms"], n_active=s["n_active"],
        random_state=0, dtype=np.float32,
    )
    X_train, X_eval = X[: s["n_rows"]], X[s["n_rows"]:]
    # Every alpha's trajectory; the primary level is alpha 0.1's final point.
    mbdl = [p for alpha in MBDL_ALPHAS
            for p in mbdl_trajectory(X_train, X_eval, s["n_atoms"], true_atoms, alpha=alpha)]
    final = [p for p in mbdl if p["alpha"] == MBDL_ALPHA][-1]
    level = (final["explained_variance"], final["l0"])
    # MBDL's time to the primary level: the fastest of its alphas (alpha
    # 0.1's full pass unless another alpha gets there sooner).
    mbdl_first = _first_point(mbdl, level)
    mbdl_s = mbdl_first["fit_s"]
    warm_up_sae(device)
    grid = sae_grid(s["n_active"], final["l0"])
    sae = sae_ladder(X_train, X_eval, s["n_atoms"], true_atoms, grid, s["step_ladder"], level,
                     device)
    per_activation = {}
    for activation in ACTIVATIONS:
        t = _first_time([p for p in sae if p["activation"] == activation], level)
        per_activation[activation] = {"sae_s": t,
                                      "speedup": mbdl_s / t if t else None}

    sae_time = _first_time(sae, level)
    speedup = mbdl_s / sae_time if sae_time else None
    fastest = min((p for p in sae if p["reaches_primary"]), key=lambda p: p["fit_s"],
                  default=None)
    primary = {
        "explained_variance": level[0], "l0": level[1], "defined_by_alpha": MBDL_ALPHA,
        "mbdl_s": mbdl_s, "mbdl_alpha": mbdl_first["alpha"], "sae_s": sae_time,
        "sae_reached": sae_time is not None, "speedup": speedup,
        "fastest_sae": fastest["setting"] if fastest else None,
        "per_activation": per_activation,
    }

    # The best SAE quality that MBDL also reaches (at equal or lower L0), and
    # the time each method needs to reach it.
    common = None
    shared = [p for p in sae if _first_time(mbdl, (p["explained_variance"], p["l0"]))]
    if shared:
        best = max(shared, key=lambda p: p["explained_variance"])
        common_level = (best["explained_variance"], best["l0"])
        t_sae, first = _first_time(sae, common_level), _first_point(mbdl, common_level)
        common = {
            "explained_variance": common_level[0], "l0": common_level[1],
            "setting": best["setting"], "sae_steps": best["steps"],
            "mbdl_s": first["fit_s"], "mbdl_alpha": first["alpha"], "sae_s": t_sae,
            "speedup": first["fit_s"] / t_sae,
        }

    # Dictionary quality, which the ground truth makes measurable: the time
    # each method needs to find the true atoms as well as MBDL's final fit.
    mmcs_sae = [p["fit_s"] for p in sae if p["mmcs"] >= final["mmcs"]]
    mmcs_mbdl = min((p for p in mbdl if p["mmcs"] >= final["mmcs"]), key=lambda p: p["fit_s"])
    dictionary = {
        "mmcs": final["mmcs"], "defined_by_alpha": MBDL_ALPHA,
        "mbdl_s": mmcs_mbdl["fit_s"], "mbdl_alpha": mmcs_mbdl["alpha"],
        "sae_s": min(mmcs_sae) if mmcs_sae else None,
        "speedup": mmcs_mbdl["fit_s"] / min(mmcs_sae) if mmcs_sae else None,
    }

    note = "" if sae_time else (
        "no SAE fit of the step ladder (at most "
        f"{max(s['step_ladder']):,} steps) reached MiniBatchDictionaryLearning's EV at its "
        "L0; a longer budget may (BatchTopK k=23 did at 5,000 steps, 12.4 s against MBDL's "
        "12.8 s, in a check of 2026-11-27); see the common level"
    )
    if common:
        note = (note + "; " if note else "") + (
            f"common level (EV >= {common['explained_variance']:.3f}, L0 <= "
            f"{common['l0']:.1f}): MBDL {common['mbdl_s']:.2f} s (alpha "
            f"{common['mbdl_alpha']:g}), SAE {common['sae_s']:.2f} s, "
            f"{common['speedup']:.1f}x")
    if mode != "full":
        note = (note + "; " if note else "") + (
            f"measured at {s['n_features']} features, {s['n_atoms']} atoms, "
            f"{s['n_rows']:,} rows ({mode} mode); "
            "--full runs the issue's 1024 atoms, 20,000 rows"
        )
    return {
        "case": {k: s[k] for k in ("n_features", "n_atoms", "n_rows", "n_eval", "n_active")},
        "settings": {"mbdl_alpha": MBDL_ALPHA, "mbdl_alphas": list(MBDL_ALPHAS),
                     "batch_size": BATCH,
                     "sae": sae_params("topk"),
                     "grid": [knob_label(a, k) for a, k in grid],
                     "step_ladder": s["step_ladder"]},
        "mbdl_trajectory": mbdl,
        "sae_fits": sae,
        "primary_level": primary,
        "common_level": common,
        "dictionary_level": dictionary,
        "targets": [
            target("time_to_quality_speedup",
                   "MiniBatchDictionaryLearning's time to its final (EV, L0) at alpha "
                   f"{MBDL_ALPHA:g} (the fastest of alphas "
                   f"{', '.join(f'{a:g}' for a in MBDL_ALPHAS)}) / the fastest SAE's time to "
                   "reach that EV at equal or lower L0 (same rows, same atoms)",
                   speedup, SPEEDUP_TARGET, note=note),
        ],
    }
