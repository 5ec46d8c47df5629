"""Steering: does adding a feature's atom raise the tokens its logit effects name?

A ReLU SAE is fitted on the built-in model's MLP activations (layer 0,
``mlp_post``) over training texts of the bundled corpus. Of the features
that fired in training, the 20 with the largest logit effect (the largest
logit increase of any token, :func:`sparse_dict.analysis.logit_effects`)
are taken. For each, on held-out texts (works never seen in training), the
model reads every position twice, plainly and with ``strength`` times the
feature's unit atom added to the activations at every position
(:func:`sparse_dict.analysis.steering_distributions`), and the mean increase
of the log-probability of the feature's own top-10 promoted tokens is
measured. The baseline adds, at the same strength, a random direction of the
same (unit) norm, one per feature, and measures the same tokens.

The strength is ``STRENGTH_SHARE`` (a quarter) of the root mean squared norm
of the held-out activations at the hook: a push the size of a modest part
of a token's activations, well below where every direction saturates the
final LayerNorm. Figure: mean increase with the features / mean increase
with random directions (target >= 3).
"""

import numpy as np

from benchmarks._common import Timer, target
from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
from sparse_dict.analysis import logit_effects, steering_distributions
from sparse_dict.datasets import load_corpus

SIZES = {
    "tiny": dict(n_train=40, n_eval=6, max_length=32, n_components=128, steps=60,
                 n_features=4),
    "quick": dict(n_train=600, n_eval=40, max_length=64, n_components=1024, steps=1500,
                  n_features=20),
    "full": dict(n_train=3000, n_eval=200, max_length=128, n_components=2048, steps=6000,
                 n_features=20),
}
STRENGTH_SHARE = 0.25
TOP_TOKENS = 10
RATIO_TARGET = 3.0


def run(mode="quick", device="cpu"):
    """The steering figures of one mode, with the target."""
    size = SIZES[mode]
    train = load_corpus("train", n_texts=size["n_train"], random_state=0)
    held_out = load_corpus("test", n_texts=size["n_eval"], random_state=0)
    extractor = TransformerActivationExtractor("builtin", device=device,
                                               max_length=size["max_length"]).fit(train)
    X = extractor.transform(train)
    sae = SparseAutoencoderDictionary(n_components=size["n_components"], l1_coef=3.0,
                                      max_steps=size["steps"], batch_size=512,
                                      device=device, random_state=0)
    with Timer() as fit:
        sae.fit(X, provenance=extractor.provenance(corpus="bundled corpus, train split"))
    effects = logit_effects(extractor, sae, top_k=TOP_TOKENS)
    alive = sae.feature_frequencies_ > 0
    size_of_effect = np.where(alive, effects.promoted_logits[:, 0], -np.inf)
    chosen = np.argsort(-size_of_effect)[: size["n_features"]]
    chosen = chosen[np.isfinite(size_of_effect[chosen])]

    X_eval = extractor.transform(held_out)
    rms = float(np.sqrt(np.mean(np.sum(X_eval.astype(np.float64) ** 2, axis=1))))
    strength = STRENGTH_SHARE * rms
    rng = np.random.default_rng(0)
    rows = []
    with Timer() as measure:
        for f in chosen:
            f = int(f)
            tokens = effects.promoted_ids[f]
            own = steering_distributions(extractor, sae, held_out, f, strength,
                                         positions="all")
            direction = rng.normal(size=sae.n_features_in_)
            direction /= np.linalg.norm(direction)
            random = steering_distributions(extractor, sae, held_out, None, strength,
                                            direction=direction, positions="all")
            rows.append({
                "feature": f,
                "largest_logit_effect": float(effects.promoted_logits[f, 0]),
                "promoted": [str(t) for t in effects.promoted_tokens[f]],
                "feature_increase": own.log_prob_increase(tokens),
                "random_increase": random.log_prob_increase(tokens),
                "feature_kl": own.kl_divergence(),
                "random_kl": random.kl_divergence(),
            })
    feature_mean = float(np.mean([r["feature_increase"] for r in rows]))
    random_mean = float(np.mean([r["random_increase"] for r in rows]))
    # A ratio is meaningful only over a positive baseline; otherwise it is
    # recorded as missing (and the target as not met) rather than as a
    # huge or negative number.
    ratio = feature_mean / random_mean if random_mean > 0 else None
    n_positions = int(sum(len(s) for s in extractor.token_ids(held_out)))
    return {
        "n_train_tokens": int(X.shape[0]),
        "n_eval_texts": len(held_out),
        "n_eval_positions": n_positions,
        "n_components": int(sae.n_components_),
        "steps": int(sae.n_steps_),
        "fit_s": fit.seconds,
        "measure_s": measure.seconds,
        "train_l0": float(sae.train_l0_),
        "activation_rms_norm": rms,
        "strength": strength,
        "strength_share": STRENGTH_SHARE,
        "norm_scale": effects.norm_scale,
        "features": rows,
        "feature_mean_increase": feature_mean,
        "random_mean_increase": random_mean,
        "ratio": ratio,
        "targets": [target(
            "steering_ratio",
            "mean log-prob increase of a feature's top-10 promoted tokens when steering "
            "with it / with a random direction of equal norm (held-out texts)",
            ratio, RATIO_TARGET,
            note=f"{len(rows)} features, strength {strength:.2f} "
                 f"({STRENGTH_SHARE:g} x activation RMS norm)")],
    }
