"""Use an SAE saved in SAELens' format, then send it back (run by the docs build).

The docs build has no network, so instead of downloading a Gemma Scope SAE
this script writes a small folder in exactly the layout SAELens' ``save_model``
writes (``cfg.json`` and ``sae_weights.safetensors``): a JumpReLU SAE with
decoder rows of any norm and ``apply_b_dec_to_input`` false, as Gemma Scope's
are. A real folder is used in the same way.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.cli import main

rng = np.random.default_rng(0)
d_in, d_sae = 16, 64
work = Path(tempfile.mkdtemp())

# 1. A folder as SAELens writes it.
folder = work / "gemma-scope-like"
folder.mkdir()
weights = {
    "W_enc": rng.normal(size=(d_in, d_sae)),
    "W_dec": rng.normal(size=(d_sae, d_in)) * rng.uniform(0.5, 2.0, size=(d_sae, 1)),
    "b_enc": rng.normal(size=d_sae) * 0.1,
    "b_dec": rng.normal(size=d_in) * 0.1,
    "threshold": rng.uniform(0.5, 1.5, size=d_sae),
}
save_file({k: v.astype(np.float32) for k, v in weights.items()},
          str(folder / "sae_weights.safetensors"))
cfg = {
    "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
    "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": {"sae_lens_version": "6.5.0", "model_name": "gemma-2-2b",
                 "hook_name": "blocks.12.hook_resid_post", "hook_layer": 12},
}
(folder / "cfg.json").write_text(json.dumps(cfg, indent=2))

# 2. Open it as a fitted scikit-learn estimator.
sae = SparseAutoencoderDictionary.from_saelens(folder)
print(sae.activation, sae.components_.shape)
print("model:", sae.provenance_["metadata"]["model_name"],
      "| hook:", sae.provenance_["metadata"]["hook_name"])
print("folded:", *sae.provenance_["folded"], sep="\n  ")

# 3. It encodes as SAELens does (its equations written out), in the units of
#    unit-norm atoms: each code is SAELens' code times its atom's norm.
acts = rng.normal(size=(5, d_in))
h = acts @ weights["W_enc"] + weights["b_enc"]          # apply_b_dec_to_input=False
saelens_codes = np.maximum(h, 0) * (h > weights["threshold"])
norms = np.linalg.norm(weights["W_dec"], axis=1)
codes = sae.transform(acts)
print("codes match SAELens:", np.allclose(codes, saelens_codes * norms, atol=1e-4))
print("reconstructions match SAELens:",
      np.allclose(sae.inverse_transform(codes),
                  saelens_codes @ weights["W_dec"] + weights["b_dec"], atol=1e-4))

# 4. Back to SAELens' format, and between the formats on the command line.
out = sae.to_saelens(work / "for-saelens")
print(sorted(p.name for p in out.iterdir()))
print("exit status:", main(["convert", "--from", "saelens", str(folder),
                            "-o", str(work / "as-sparse-dict"), "-q"]))
shutil.rmtree(work)  # the example's folders were only for the example
