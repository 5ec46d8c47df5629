"""Activations of transformer models, as a scikit-learn transformer, and splicing.

:class:`TransformerActivationExtractor` turns texts into the activations of a
transformer at one point of one layer (by default the MLP post-activation),
one row per real token or one pooled row per text, so that a sparse
dictionary can be learned on them inside a :class:`~sklearn.pipeline.Pipeline`.

:func:`splice_evaluation` runs the model again with those activations replaced
by a fitted dictionary's reconstruction and reports how much of the model's
behaviour survives ("loss recovered").

:meth:`TransformerActivationExtractor.transform_to_disk` writes the
activations of a corpus of any size to an on-disk store, resumably;
:func:`open_store` opens one as an :class:`ActivationStore`.
"""

from sparse_dict.extraction._extractor import TokenIndex, TransformerActivationExtractor
from sparse_dict.extraction._hook import HOOK_POINTS  # noqa: F401
from sparse_dict.extraction._loading import _MODEL_CACHE  # noqa: F401
from sparse_dict.extraction._splicing import SpliceResult, splice_evaluation
from sparse_dict.extraction._store import ActivationStore, open_store



__all__ = [
    "ActivationStore",
    "TokenIndex",
    "SpliceResult",
    "TransformerActivationExtractor",
    "open_store",
    "splice_evaluation",
]
