"""Features as actions, and comparisons between dictionaries.

:func:`logit_effects` gives the tokens each feature promotes and suppresses
when it is written at the hook point of a language model; :func:`steer` and
:func:`steering_distributions` add a feature to the model's activations while
it generates, and measure how its next-token distribution moves.
:func:`check_compatible` tells whether a dictionary belongs to an
extractor's model and hook point, from the dictionary's ``provenance_``.
"""

from sparse_dict.analysis._effects import (
    REFERENCE_TEXTS,
    LogitEffects,
    NoDirectPathError,
    logit_effects,
)
from sparse_dict.analysis._provenance import check_compatible
from sparse_dict.analysis._steering import (
    SteeringDistributions,
    steer,
    steering_distributions,
)

__all__ = [
    "REFERENCE_TEXTS",
    "LogitEffects",
    "NoDirectPathError",
    "SteeringDistributions",
    "check_compatible",
    "logit_effects",
    "steer",
    "steering_distributions",
]
