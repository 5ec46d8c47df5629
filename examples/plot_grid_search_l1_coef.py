"""
Choosing ``l1_coef`` by grid search on texts
============================================

The sparsity penalty trades reconstruction for sparsity, and held-out
reconstruction alone always prefers the weakest penalty. So the search
records several metrics at once (:data:`~sparse_dict.model_selection.sparse_coding_scorer`)
and refits the candidate that reconstructs best among those whose L0 (active
features per token) stays within a budget
(:func:`~sparse_dict.model_selection.best_under_l0`).

The pipeline goes from texts to activations of the built-in model to codes;
``Pipeline(memory=...)`` computes the activations of each training fold once,
not once per candidate. Sizes are small so that it runs in seconds.
"""

# %%
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from joblib import Memory
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
from sparse_dict.datasets import load_corpus
from sparse_dict.model_selection import best_under_l0, sparse_coding_scorer

texts = load_corpus(n_texts=100, random_state=0)
pipe = Pipeline(
    [
        ("acts", TransformerActivationExtractor(max_length=64)),  # MLP of layer 0
        ("sae", SparseAutoencoderDictionary(n_components=512, max_iter=5, batch_size=128,
                                            random_state=0)),
    ],
    memory=Memory(tempfile.mkdtemp(), verbose=0),
)
search = GridSearchCV(
    pipe,
    {"sae__l1_coef": [1, 3, 10]},
    scoring=sparse_coding_scorer,
    refit=best_under_l0(max_l0=50),
    cv=2,
    verbose=1,
)
search.fit(texts)
print("chosen:", search.best_params_)

# %%
# The trade-off the refit rule chooses on
# ---------------------------------------
results = search.cv_results_
l0 = results["mean_test_l0"]
ev = results["mean_test_explained_variance"]
fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.plot(l0, ev, "o-", color="#1b6ca8")
for coef, x, y in zip(results["param_sae__l1_coef"], l0, ev):
    ax.annotate(f"l1_coef={coef}", (x, y), textcoords="offset points", xytext=(5, -12))
ax.axvline(50, color="grey", linestyle="--", label="L0 budget")
ax.scatter(l0[search.best_index_], ev[search.best_index_], s=150, facecolors="none",
           edgecolors="#c0392b", label="refitted")
ax.set_xscale("log")
ax.set_xlabel("L0 (active features per token), held out")
ax.set_ylabel("explained variance, held out")
ax.legend()
plt.show()
print(np.round(ev, 3), np.round(l0, 1))
