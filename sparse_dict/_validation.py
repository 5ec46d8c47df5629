"""Parameter constraints shared by the package's estimators."""

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval


class IntegerInterval(Interval):
    """``Interval(Integral, ...)`` that refuses booleans (``True`` is not a count of 1).

    Examples
    --------
    >>> IntegerInterval(1, None, closed="left").is_satisfied_by(True)
    False
    >>> IntegerInterval(1, None, closed="left").is_satisfied_by(3)
    True
    """

    def __init__(self, left, right, *, closed):
        super().__init__(Integral, left, right, closed=closed)

    def is_satisfied_by(self, val):
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)
