"""Warnings that point at the user's own line."""

import contextlib
import sys
import threading
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


# Python's catch_warnings swaps process-wide state (the filters, and the
# hook that shows a warning) on entry and puts back what it saw on exit:
# two threads' blocks that interleave leave one's state in place for good.
# transform with a solver from three threads at once left an "always"
# filter ahead of the application's own "error" (in 4 to 6 runs of 6), or
# the hook pointing at a finished block's record list, after which every
# warning of the process went into that list, unseen (4 runs of 8). The
# package's blocks take this lock, so they never interleave.
_RECORDING = threading.RLock()


@contextlib.contextmanager
def recording(wait=True):
    """Every warning given in the block, recorded (``catch_warnings(record=True)``).

    One thread's block at a time: see ``_RECORDING``. A warning another
    thread gives meanwhile is recorded too (Python's filters are the
    process's, not a thread's); the callers give again what is not theirs.
    With ``wait=False``, where another thread's block is open the block
    runs at once and gives None: that thread records its warnings (a
    joblib worker thread whose caller records them waits for nothing).

    Examples
    --------
    >>> with recording() as caught:
    ...     warnings.warn("careful")
    >>> [str(w.message) for w in caught]
    ['careful']
    """
    if not _RECORDING.acquire(blocking=wait):
        yield None
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        _RECORDING.release()
