"""Warnings that point at the user's own line."""

import sys
import warnings

# Frames of these packages are skipped: a warning raised inside fit points
# at the line that called fit (or the Pipeline or search that did), not at
# scikit-learn's wrapper around it, at joblib's loop that runs a search's
# fits in this process, at torch's decorators (``torch.no_grad()`` wraps
# some of this package's methods: on a GPU, four warnings pointed at
# torch/utils/_contextlib.py), or at this package's own modules.
# The standard library's pickle, copy and copyreg too: a pickled dictionary
# warns as it loads, whether through pickle.loads, joblib.load or deepcopy;
# and contextlib, whose __exit__ runs this package's context managers.
_SKIPPED = ("sparse_dict", "sklearn", "joblib", "torch", "pickle", "copy", "copyreg",
            "contextlib")


def _skipped(frame):
    name = frame.f_globals.get("__name__") or ""
    return name.partition(".")[0] in _SKIPPED


def warn_at_caller(message, category=UserWarning):
    """``warnings.warn`` at the first frame outside this package and scikit-learn.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_at_caller("careful")
    >>> str(caught[0].message)
    'careful'
    """
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and _skipped(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
