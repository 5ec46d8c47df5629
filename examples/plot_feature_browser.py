"""
Reading the features of a language model
========================================

A dictionary of the built-in model's MLP activations: which tokens does each
feature fire on? :func:`~sparse_dict.browser.top_activating_examples` finds,
for every feature, the tokens it fires on most strongly with their context;
:func:`~sparse_dict.browser.write_feature_browser` writes the same as one
self-contained HTML page (what ``sparse-dict report`` and ``sparse-dict
demo`` write as ``features.html``). Here we print a few features as text and
plot how often the features fire.
"""

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
from sparse_dict.browser import (
    plot_feature_density,
    top_activating_examples,
    write_feature_browser,
)
from sparse_dict.datasets import load_corpus

extractor = TransformerActivationExtractor(max_length=64)
train = load_corpus("train", n_texts=200, random_state=0)
held_out = load_corpus("test", n_texts=40, random_state=0)
X_train = extractor.fit(train).transform(train)
sae = SparseAutoencoderDictionary(n_components=512, max_iter=5, batch_size=256,
                                  random_state=0).fit(X_train)

# %%
# Top-activating tokens on held-out works
# ---------------------------------------
X, where = extractor.transform_with_tokens(held_out)
codes = sae.transform(X)
index = np.column_stack([where.text_index, where.position])
examples = top_activating_examples(codes, where.token, index, k=5, context=4)
frequencies = (codes > 0).mean(axis=0)


def show(feature):
    print(f"feature {feature}: fires on {frequencies[feature]:.2%} of tokens")
    for row, context in zip(examples.rows[feature], examples.context_rows[feature]):
        if row < 0:
            break
        text = "".join(
            f"[{where.token[r]}]" if r == row else where.token[r] for r in context if r >= 0
        )
        print(f"   {codes[row, feature]:6.2f}  {text!r}")


# The three features that fire most strongly on any held-out token:
for feature in np.argsort(-codes.max(axis=0))[:3]:
    show(int(feature))

# %%
# The browser page, and the density of firing frequencies
# -------------------------------------------------------
out = Path(tempfile.mkdtemp())
page = write_feature_browser(out / "features.html", frequencies, examples,
                             title="Features of the built-in model")
print("wrote", Path(page).name, f"({Path(page).stat().st_size:,} bytes)")

# The density plot, as the command line writes it to density.png:
plot_feature_density(frequencies, out / "density.png")
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
ax.imshow(plt.imread(out / "density.png"))
ax.set_axis_off()
plt.show()
