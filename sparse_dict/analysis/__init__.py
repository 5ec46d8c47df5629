"""Analyses of learned dictionaries: features as actions, and comparisons.

:func:`logit_effects` gives the tokens each feature promotes and suppresses
when it is written at the hook point of a language model; :func:`steer` and
:func:`steering_distributions` add a feature to the model's activations while
it generates, and measure how its next-token distribution moves.
:func:`check_compatible` tells whether a dictionary belongs to an
extractor's model and hook point, from the dictionary's ``provenance_``.
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
from sparse_dict.analysis._effects import (
    REFERENCE_TEXTS,
    LogitEffects,
    NoDirectPathError,
    logit_effects,
)
from sparse_dict.extraction._provenance import check_compatible
from sparse_dict.analysis._steering import (
    SteeringDistributions,
    steer,
    steering_distributions,
)

__all__ = [
    "REFERENCE_TEXTS",
    "FeatureMatching",
    "LogitEffects",
    "NoDirectPathError",
    "SteeringDistributions",
    "check_compatible",
    "dictionary_similarity",
    "feature_splitting",
    "logit_effects",
    "match_features",
    "steer",
    "steering_distributions",
]
