"""The seed's findings, measured on the built-in model: size, universality, splitting.

Three measurements on the MLP activations of the built-in 1-layer model
(``layer0.mlp_post``, 512 neurons), read from the bundled corpus with
:class:`~sparse_dict.TransformerActivationExtractor`:

1. **Size curve.** Top-k SAEs of growing size (``n_components`` from 512 to
   8192 and more) at one fixed L0 budget (``k``), the same training rows,
   batch and learning rate, and a step budget that grows as the square root
   of the size above 2048 features (a larger dictionary needs more steps to
   converge; at a fixed budget the 8192-feature SAE stopped short, with EV
   0.944 after 2000 steps of 512 rows and 0.950 after 4000). Each is scored
   on held-out texts (the test split holds whole works out): explained variance, and the share of the
   language-model loss recovered when its reconstruction replaces the MLP
   activations (:func:`~sparse_dict.extraction.splice_evaluation`, zero
   ablation as the baseline). Target: loss recovered rises with size.
2. **Universality.** A second SAE of one size, trained with another seed, is
   matched atom for atom to the first
   (:func:`~sparse_dict.analysis.dictionary_similarity`), beside two
   baselines: random unit atoms (as many, Gaussian directions) and the
   model's own neuron basis (the 512 standard basis vectors of the hooked
   activations: neuron ``i`` is the direction of activation ``i``). The
   neuron basis has only as many atoms as the model has neurons (512), so
   its one-to-one matching pairs 512 of the SAE's atoms, the ones that suit
   it best, where another seed's or random atoms pair all of them: a mean
   over 512 chosen pairs and one over every pair are not comparable. Every
   comparison therefore also reports the mean of its 512 best pairs (the
   512 highest cosines of its one-to-one matching, which the best matching
   of 512 pairs can only beat), beside the mean over all pairs. Target: the
   two seeds' one-to-one similarity over all pairs is well above random's
   (the same number of pairs).
3. **Feature splitting.** The 512-feature SAE against each larger one
   (:func:`~sparse_dict.analysis.feature_splitting`: children with cosine
   >= 0.5 that co-fire with their parent on at least half of their tokens,
   at least two per parent), with worked examples: the top-activating token
   contexts (:func:`~sparse_dict.browser.top_activating_examples`) of a
   parent and of its children.

Every SAE is a top-k SAE with AuxK, so that L0 is the same at every size
and no sparsity coefficient has to be retuned as the dictionary grows.
"""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import Timer, sae_params, target, warm_up_sae
from benchmarks.extraction_speed import builtin_extractor
from sparse_dict import SparseAutoencoderDictionary
from sparse_dict._corpus import load_corpus
from sparse_dict.analysis import dictionary_similarity, feature_splitting, match_features
from sparse_dict.browser import top_activating_examples
from sparse_dict.extraction import splice_evaluation
from sparse_dict.metrics import explained_variance, l0

SIZES = {
    "tiny": dict(n_train_texts=12, n_eval_texts=4, max_length=32, sizes=[32, 64, 128],
                 k=4, steps=40, batch_size=128, universality_size=64, split_small=32,
                 n_split_tokens=1000, n_examples=3, top_k=3, child_top_k=2, context=3),
    "quick": dict(n_train_texts=3000, n_eval_texts=40, max_length=128,
                  sizes=[512, 1024, 2048, 4096, 8192], k=32, steps=2000, batch_size=512,
                  universality_size=2048, split_small=512, n_split_tokens=30_000,
                  n_examples=3, top_k=5, child_top_k=3, context=6),
    "full": dict(n_train_texts=6000, n_eval_texts=200, max_length=128,
                 sizes=[512, 1024, 2048, 4096, 8192, 16384], k=32, steps=6000,
                 batch_size=512, universality_size=4096, split_small=512,
                 n_split_tokens=100_000, n_examples=3, top_k=8, child_top_k=4, context=6),
}
# Measured on the quick mode's 370,000 training tokens (one thread, k=32):
# batches of 512 rows kept the large dictionaries alive where 128-row batches
# did not (4096 features: 5% dead and EV 0.945 against 57% dead and EV 0.907
# with 2000 steps of 128 rows on 123,000 tokens), and a lower learning rate
# (1e-3) kept every feature alive but reconstructed worse (EV 0.909).
# Sizes above this many features get sqrt(size / it) times the steps.
STEPS_REFERENCE_SIZE = 2048


def _steps(s, n_components):
    """The step budget of a dictionary of ``n_components`` features."""
    return int(round(s["steps"] * max(1.0, n_components / STEPS_REFERENCE_SIZE) ** 0.5))


# Splitting criteria: the defaults of feature_splitting, stated here so that
# the report can print them. The tiny mode's barely trained SAEs split only
# at looser ones, which still exercise the worked examples.
SPLIT_THRESHOLDS = {"tiny": (0.3, 0.3), "quick": (0.5, 0.5), "full": (0.5, 0.5)}
# Two dictionaries "match well" at this cosine (the share reported beside the means).
GOOD_MATCH = 0.7
# The two seeds' one-to-one similarity must exceed random atoms' by this much.
UNIVERSALITY_MARGIN = 0.3


def _fit(n_components, s, X, device, seed):
    """A top-k SAE, its fit time, and whether the fit warned it had not converged."""
    sae = SparseAutoencoderDictionary(
        n_components, device=device, random_state=seed,
        **sae_params("topk", s["k"], max_iter=100_000, max_steps=_steps(s, n_components),
                     batch_size=s["batch_size"]),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        with Timer() as t:
            sae.fit(X)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return sae, t.seconds, converged


def _size_point(sae, fit_s, converged, X_eval, ext, held_out):
    codes = sae.transform(X_eval)
    splice = splice_evaluation(ext, sae, held_out)
    return {
        "n_components": int(sae.n_components),
        "fit_s": fit_s,
        "steps": int(sae.n_steps_),
        # False when the estimator warned that the loss was still falling.
        "converged": converged,
        "l0": l0(codes),
        "explained_variance": explained_variance(X_eval, sae.inverse_transform(codes)),
        "loss_recovered": splice.loss_recovered,
        "kl_divergence": splice.kl_divergence,
        "train_dead_fraction": float(np.mean(sae.feature_frequencies_ == 0)),
    }


def _rises(values):
    """Whether each value is above the one before (strictly increasing)."""
    return bool(np.all(np.diff(values) > 0))


def _comparison(a, b, n_best):
    """Hungarian (over all pairs and over the ``n_best`` best) and max similarity."""
    hungarian = match_features(a, b).similarities
    hungarian = hungarian[np.isfinite(hungarian)]
    best = np.sort(hungarian)[::-1][:n_best]
    return {
        "hungarian": dictionary_similarity(a, b),
        # The mean of the n_best highest cosines of the one-to-one matching: a
        # lower bound on the best matching of n_best pairs, and, where the
        # other basis has n_best atoms (the neurons), the matching itself.
        "hungarian_best": float(np.mean(best)),
        "n_best": int(best.size),
        "max": dictionary_similarity(a, b, method="max"),
        "n_pairs": int(hungarian.size),
        f"share_above_{GOOD_MATCH:g}": float(np.mean(hungarian >= GOOD_MATCH)),
    }


def _universality(first, s, X, device, n_features):
    second, fit_s, _ = _fit(s["universality_size"], s, X, device, seed=1)
    rng = np.random.default_rng(0)
    random_atoms = rng.standard_normal((s["universality_size"], n_features))
    random_atoms /= np.linalg.norm(random_atoms, axis=1, keepdims=True)
    # Every comparison's best pairs are as many as the neuron basis can give.
    n_best = min(s["universality_size"], n_features)
    return {
        "n_components": s["universality_size"],
        "n_best_pairs": n_best,
        "seed_fit_s": fit_s,
        "two_seeds": _comparison(first, second, n_best),
        "random": _comparison(first, random_atoms, n_best),
        "neurons": _comparison(first, np.eye(n_features), n_best),
        # The baselines' own similarity: what two unrelated bases score.
        "random_vs_neurons": _comparison(random_atoms, np.eye(n_features), n_best),
    }


def _context_text(examples, feature, j):
    """One example as text: the tokens around it, the example marked «so».

    The corpus's stage directions use square brackets, hence the guillemets.
    """
    rows = examples.context_rows[feature, j]
    middle = len(rows) // 2
    parts = []
    for i, row in enumerate(rows):
        if row < 0:
            continue
        token = str(examples.tokens[row]).replace("\n", "\u21b5")
        if i == middle:
            stripped = token.lstrip()
            token = token[: len(token) - len(stripped)] + f"\u00ab{stripped}\u00bb"
        parts.append(token)
    return "".join(parts).strip()


def _codes(sae, X, features, block=4096):
    """Codes of ``features`` only, coded a block of rows at a time.

    The full code matrix of a large dictionary on many tokens would not fit
    in memory (100,000 tokens x 16,384 features is 6.5 GB of float32).
    """
    return np.concatenate([sae.transform(X[i:i + block])[:, features]
                           for i in range(0, X.shape[0], block)])


def _top_contexts(sae, X, tokens, index, features, k, context):
    examples = top_activating_examples(_codes(sae, X, features), tokens, index, k=k,
                                       context=context)
    out = []
    for f in range(len(features)):
        out.append([{"activation": float(examples.values[f, j]),
                     "text": _context_text(examples, f, j)}
                    for j in range(k) if examples.rows[f, j] >= 0])
    return out


def _pick_examples(table, n):
    """Parents with two to four children, the closest (mean child cosine) first."""
    parents, starts, counts = np.unique(table["parent"], return_index=True,
                                        return_counts=True)
    candidates = []
    for parent, start, count in zip(parents, starts, counts):
        if 2 <= count <= 4:
            candidates.append((-float(np.mean(table["cosine"][start:start + count])),
                               int(parent), int(start), int(count)))
    return [c[1:] for c in sorted(candidates)[:n]]


def _splitting(saes, s, X_split, tokens, index, thresholds):
    threshold, co_firing_threshold = thresholds
    small = saes[s["split_small"]]
    by_size = []
    tables = {}
    for n, large in saes.items():
        if n <= s["split_small"]:
            continue
        table = feature_splitting(small, large, threshold, X=X_split,
                                  co_firing_threshold=co_firing_threshold)
        tables[n] = table
        n_split = int(np.unique(table["parent"]).size)
        by_size.append({
            "large": int(n),
            "n_split": n_split,
            "share_split": n_split / s["split_small"],
            "mean_children": float(len(table["parent"]) / n_split) if n_split else None,
        })
    largest = max(tables)
    table = tables[largest]
    alive = int(np.count_nonzero(_codes(small, X_split, slice(None)).any(axis=0)))
    examples = []
    for parent, start, count in _pick_examples(table, s["n_examples"]):
        rows = slice(start, start + count)
        children = table["child"][rows].tolist()
        parent_ctx = _top_contexts(small, X_split, tokens, index, [parent], s["top_k"],
                                   s["context"])[0]
        child_ctx = _top_contexts(saes[largest], X_split, tokens, index, children,
                                  s["child_top_k"], s["context"])
        examples.append({
            "parent": parent,
            "parent_frequency": float(table["parent_frequency"][start]),
            "parent_contexts": parent_ctx,
            "children": [
                {"child": c, "cosine": float(cos), "co_firing": float(co),
                 "frequency": float(freq), "contexts": ctx}
                for c, cos, co, freq, ctx in zip(
                    children, table["cosine"][rows], table["co_firing"][rows],
                    table["child_frequency"][rows], child_ctx)
            ],
        })
    return {
        "small": s["split_small"],
        "large": int(largest),
        "threshold": threshold,
        "co_firing_threshold": co_firing_threshold,
        "n_tokens": int(X_split.shape[0]),
        "small_alive": alive,
        "by_size": by_size,
        "examples": examples,
    }


def _targets(out, mode):
    notes = []
    if mode != "full":
        notes.append(f"{mode} sizes: {out['steps']:,} steps of {out['batch_size']} rows "
                     f"up to {STEPS_REFERENCE_SIZE:,} features, sqrt(size) more above")
    note = "; ".join(notes)
    curve = out["size_curve"]
    lr = [p["loss_recovered"] for p in curve]
    first, last = curve[0], curve[-1]
    u = out["universality"]
    return [
        target("size_curve_rises",
               f"loss recovered rises at every step of the size curve "
               f"({first['n_components']:,} to {last['n_components']:,} features, "
               f"k={out['k']}); value: 1 if it does",
               float(_rises(lr)), 1.0,
               note=(note + "; " if note else "")
               + f"loss recovered {lr[0]:.3f} -> {lr[-1]:.3f}"),
        target("universality_vs_random",
               f"one-to-one similarity of two seeds' {u['n_components']:,}-feature SAEs "
               "minus that of the SAE and random unit atoms",
               u["two_seeds"]["hungarian"] - u["random"]["hungarian"], UNIVERSALITY_MARGIN,
               note=(note + "; " if note else "")
               + f"over all {u['two_seeds']['n_pairs']:,} pairs: two seeds "
                 f"{u['two_seeds']['hungarian']:.3f}, random {u['random']['hungarian']:.3f}; "
                 f"over the best {u['n_best_pairs']:,} pairs (all the neuron basis has): "
                 f"two seeds {u['two_seeds']['hungarian_best']:.3f}, random "
                 f"{u['random']['hungarian_best']:.3f}, neurons "
                 f"{u['neurons']['hungarian_best']:.3f}"),
    ]


def run(mode="quick", device="cpu"):
    """Size curve, universality and feature splitting on the built-in model.

    Returns
    -------
    result : dict
        ``"size_curve"`` (one point per size), ``"universality"``,
        ``"splitting"`` (with worked examples), the settings and
        ``"targets"``.
    """
    s = SIZES[mode]
    warm_up_sae(device)
    ext = builtin_extractor(s["max_length"])
    train = load_corpus("train", n_texts=s["n_train_texts"], random_state=0)
    held_out = load_corpus("test", n_texts=s["n_eval_texts"], random_state=0)
    with Timer() as t:
        X, where = ext.fit(train).transform_with_tokens(train)
        X_eval = ext.transform(held_out)
    saes, curve = {}, []
    for n in s["sizes"]:
        sae, fit_s, converged = _fit(n, s, X, device, seed=0)
        saes[n] = sae
        curve.append(_size_point(sae, fit_s, converged, X_eval, ext, held_out))
        print(f"[benchmarks]   findings: {n:,} features, {fit_s:.0f} s, loss recovered "
              f"{curve[-1]['loss_recovered']:.3f}", flush=True)
    out = {
        "model": "builtin",
        "hook": ext.hook_name_,
        "n_features": int(X.shape[1]),
        "n_train_tokens": int(X.shape[0]),
        "n_eval_tokens": int(X_eval.shape[0]),
        "n_eval_texts": len(held_out),
        "k": s["k"],
        "steps": s["steps"],
        "steps_reference_size": STEPS_REFERENCE_SIZE,
        "batch_size": s["batch_size"],
        "extract_s": t.seconds,
        "size_curve": curve,
    }
    out["size_curve_rises"] = {
        "loss_recovered": _rises([p["loss_recovered"] for p in curve]),
        "explained_variance": _rises([p["explained_variance"] for p in curve]),
    }
    out["universality"] = _universality(saes[s["universality_size"]], s, X, device,
                                        X.shape[1])
    # Co-firing and examples on the first training texts' tokens, with
    # their strings and places for the contexts.
    n = min(s["n_split_tokens"], X.shape[0])
    index = np.column_stack([where.text_index[:n], where.position[:n]])
    out["splitting"] = _splitting(saes, s, X[:n], where.token[:n], index,
                                  SPLIT_THRESHOLDS[mode])
    out["targets"] = _targets(out, mode)
    return out
