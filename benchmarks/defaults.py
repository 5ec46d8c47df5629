"""Measurements behind the estimator's default training budget and its convergence check.

``python -m benchmarks.defaults [--quick|--full] [--out DIR]`` fits each
activation on several data generators and sizes at a ladder of training
lengths around the default budget (a quarter of it, the default, and two and
a half times it) and records, for each fit, the quality reached (explained
variance, and MMCS against the true atoms), the L0, the dead fraction, and
whether :class:`~sklearn.exceptions.ConvergenceWarning` was raised. A good
default reaches nearly the quality of the longest run; a good check warns on
the quarter-length runs and stays quiet on the default ones.

``--full`` (the committed table) fits all four activations on four
generators: ``make_superposition`` with uniform frequencies at 40,000 and
5,000 rows, with power-law frequencies, correlation and noise, and the
benchmarks' own clustered mixtures
(:func:`benchmarks.generators.make_clustered_mixtures`: clustered atoms,
co-firing, log-normal magnitudes), which no test uses. ``--quick`` fits
TopK and ReLU on the two uniform sets at a quarter and the whole budget.

Writes ``defaults.json`` and ``defaults.md`` to ``--out`` (default
``benchmarks/results/``).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.metrics import mean_max_cosine_similarity

from benchmarks.generators import make_clustered_mixtures

# name -> (generator, its arguments, n_components, k for the top-k family)
GENERATORS = {
    "uniform-128d": (make_superposition,
                     dict(n_samples=40_000, n_features=128, n_components=512, n_active=8),
                     512, 8),
    "powerlaw-64d": (make_superposition,
                     dict(n_samples=40_000, n_features=64, n_components=256, n_active=5,
                          frequency_decay=1.0, correlation=0.3, noise=0.05), 256, 5),
    "clustered-96d": (make_clustered_mixtures,
                      dict(n_samples=40_000, n_features=96, n_components=384, n_active=6),
                      384, 6),
    "small-5k": (make_superposition,
                 dict(n_samples=5_000, n_features=64, n_components=256, n_active=4), 256, 4),
}
SETTINGS = {"relu": {}, "topk": {}, "batchtopk": {}, "jumprelu": dict(l0_coef=0.01)}


def _fit(X, true_atoms, params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        sae = SparseAutoencoderDictionary(device="cpu", random_state=0, **params).fit(X)
        seconds = time.perf_counter() - start
    codes = sae.transform(X)
    return {
        "params": {k: v for k, v in params.items()},
        "steps": sae.n_steps_,
        "fit_s": seconds,
        "explained_variance": sae.score(X),
        "l0": float((codes > 0).sum(axis=1).mean()),
        "dead_fraction": float((sae.feature_frequencies_ == 0).mean()),
        "mmcs": float(mean_max_cosine_similarity(sae.components_, true_atoms)),
        "convergence_warning": any(issubclass(w.category, ConvergenceWarning) for w in caught),
    }


def run(quick=True):
    results = []
    activations = ["topk", "relu"] if quick else list(SETTINGS)
    generators = ("uniform-128d", "small-5k") if quick else tuple(GENERATORS)
    for name in generators:
        make, gen, n_components, k = GENERATORS[name]
        X, true_atoms, _ = make(random_state=1, dtype=np.float32, **gen)
        for activation in activations:
            steps = SparseAutoencoderDictionary(activation=activation)._total_steps(X.shape[0])
            for factor in (0.25, 1.0) if quick else (0.25, 1.0, 2.5):
                params = dict(n_components=n_components, activation=activation, k=k,
                              max_steps=int(steps * factor), **SETTINGS[activation])
                record = _fit(X, true_atoms, params)
                record.update(generator=name, budget_factor=factor, default_steps=steps)
                results.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "params"}), flush=True)
    return results


def _markdown(results):
    lines = ["| generator | activation | budget | steps | EV | MMCS | L0 | dead | warned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['generator']} | {r['params']['activation']} | {r['budget_factor']:g}x | "
            f"{r['steps']} | {r['explained_variance']:.3f} | {r['mmcs']:.3f} | {r['l0']:.1f} | "
            f"{r['dead_fraction']:.3f} | {'yes' if r['convergence_warning'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.defaults", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the default: a subset of the generators and activations")
    size.add_argument("--full", action="store_true",
                      help="every generator and activation, 2.5x budgets too")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    # Checked before the minutes of fits: a file of these names that this
    # benchmark did not write is the user's, and is not replaced.
    for name, recognise in (("defaults.json", _is_results), ("defaults.md", _is_table)):
        path = args.out / name
        if path.exists() or path.is_symlink():
            if path.is_symlink() or not path.is_file() or not recognise(path):
                parser.error(f"{path} exists and is not this benchmark's output: "
                             "choose another --out, or move it")
    results = run(quick=not args.full)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "defaults.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (args.out / "defaults.md").write_text(_markdown(results), encoding="utf-8")
    return 0


def _is_results(path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, list) and all(isinstance(r, dict) and "generator" in r for r in data)


def _is_table(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith("| generator | activation | budget |")
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
