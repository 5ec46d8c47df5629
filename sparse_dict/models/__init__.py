"""Language models that ship with sparse_dict.

:mod:`sparse_dict.models.builtin` holds the built-in 1-layer transformer, its
tokenizer and :func:`~sparse_dict.models.builtin.load_builtin_model`.
"""

from sparse_dict.models.builtin import (
    BuiltinTokenizer,
    TinyTransformer,
    TinyTransformerConfig,
    load_builtin_model,
)

__all__ = ["BuiltinTokenizer", "TinyTransformer", "TinyTransformerConfig", "load_builtin_model"]
