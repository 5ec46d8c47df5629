"""
A sparse autoencoder against MiniBatchDictionaryLearning
========================================================

Both learn a dictionary; they differ in how they code. scikit-learn's
:class:`~sklearn.decomposition.MiniBatchDictionaryLearning` solves a Lasso
problem per row, the autoencoder amortises the coding into one matrix
product. Each traces a frontier of reconstruction against sparsity as its
penalty varies; the better method sits up and to the left. Both are fitted
on the same synthetic activations, whose true features are known.
"""

# %%
import time
import warnings

import matplotlib.pyplot as plt
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition
from sparse_dict.model_selection import sparse_coding_scorer

X, true_atoms, _ = make_superposition(n_samples=4_000, n_features=32, n_components=64,
                                      random_state=0, dtype="float32")
X_train, X_test = X[:3_000], X[3_000:]

frontier = {"SparseAutoencoderDictionary": [], "MiniBatchDictionaryLearning": []}
for l1_coef in (0.3, 1, 3):
    sae = SparseAutoencoderDictionary(n_components=128, l1_coef=l1_coef, batch_size=256,
                                      random_state=0)
    start = time.perf_counter()
    sae.fit(X_train)
    frontier["SparseAutoencoderDictionary"].append(
        {**sparse_coding_scorer(sae, X_test), "seconds": time.perf_counter() - start})
for alpha in (0.1, 0.3, 1.0):
    mbdl = MiniBatchDictionaryLearning(n_components=128, alpha=alpha, batch_size=256,
                                       max_iter=3, fit_algorithm="cd",
                                       transform_algorithm="lasso_cd", transform_alpha=alpha,
                                       positive_code=True, positive_dict=False,
                                       random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mbdl.fit(X_train)
        scores = sparse_coding_scorer(mbdl, X_test)
    frontier["MiniBatchDictionaryLearning"].append(
        {**scores, "seconds": time.perf_counter() - start})

# %%
# The frontier: explained variance against L0 on held-out rows
# ------------------------------------------------------------
fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
for (name, points), color in zip(frontier.items(), ("#1b6ca8", "#c0392b")):
    ax.plot([p["l0"] for p in points], [p["explained_variance"] for p in points], "o-",
            color=color, label=name)
ax.set_xlabel("L0 (active features per row)")
ax.set_ylabel("explained variance")
ax.legend()
plt.show()

for name, points in frontier.items():
    seconds = sum(p["seconds"] for p in points)
    print(f"{name}: {len(points)} fits in {seconds:.1f} s")
