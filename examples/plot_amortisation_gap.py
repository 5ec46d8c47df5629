"""
The amortisation gap
====================

An autoencoder codes a row with one matrix product and a ReLU. With its
dictionary held fixed, how much better would the best sparse codes of the
same sparsity do? :func:`~sparse_dict.coding.amortisation_gap` codes the data
with the encoder, then again against the same atoms by non-negative
orthogonal matching pursuit with as many atoms per row as the encoder uses,
and compares the explained variances. A small gap means the encoder is nearly
as good as per-row optimisation, at a fraction of the cost. The gap is
measured on rows the autoencoder did not train on: on its own training rows
an encoder that overfits them looks better than it is.
"""

# %%
import matplotlib.pyplot as plt

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.coding import amortisation_gap
from sparse_dict.datasets import make_superposition

X, _, _ = make_superposition(n_samples=4_500, n_features=32, n_components=64,
                             random_state=0, dtype="float32")
X_train, X_test = X[:4_000], X[4_000:]
results = []
for l1_coef in (0.3, 1, 3):
    sae = SparseAutoencoderDictionary(n_components=128, l1_coef=l1_coef, batch_size=256,
                                      random_state=0).fit(X_train)
    gap = amortisation_gap(sae, X_test)
    results.append(gap)
    print(f"l1_coef={l1_coef:<4} L0 {gap['l0']:3d}  encoder {gap['encoder']:.3f}  "
          f"OMP {gap['optimal']:.3f}  gap {gap['gap']:+.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
ax.plot([r["l0"] for r in results], [r["encoder"] for r in results], "o-",
        label="autoencoder's encoder")
ax.plot([r["l0"] for r in results], [r["optimal"] for r in results], "s--",
        label="OMP against the same atoms")
ax.set_xlabel("L0 (atoms per row)")
ax.set_ylabel("explained variance")
ax.legend()
plt.show()
