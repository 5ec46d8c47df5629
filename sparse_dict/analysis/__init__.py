"""Analyses of learned dictionaries: comparisons between dictionaries.

:func:`match_features` pairs the atoms of two dictionaries,
:func:`dictionary_similarity` says how alike they are, and
:func:`feature_splitting` finds the features of a smaller dictionary that
split into several features of a larger one.
"""

from sparse_dict.analysis._comparison import (
    FeatureMatching,
    dictionary_similarity,
    feature_splitting,
    match_features,
)

__all__ = ["FeatureMatching", "dictionary_similarity", "feature_splitting", "match_features"]
