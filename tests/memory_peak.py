"""The peak of the Python allocations (numpy's included) during one call.

For tests of memory, never of time: tracemalloc counts what numpy allocates,
not torch's own allocator.
"""

import tracemalloc


def peak_bytes(call, *args, **kwargs):
    """``call(*args, **kwargs)``'s result, and the peak bytes traced while it ran.

    Examples
    --------
    >>> import numpy as np
    >>> result, peak = peak_bytes(np.zeros, 1_000_000)
    >>> peak >= result.nbytes
    True
    """
    tracemalloc.start()
    try:
        result = call(*args, **kwargs)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
