"""The package's version, in a module of its own so that any module may import it
without importing the package's public names."""

import re

__version__ = "0.1.0"


def version_tuple(text):
    """The first three numbers of a release string, as a tuple of ints; None if it has none.

    For comparing releases (of this package, SAELens, transformers) without
    a dependency on ``packaging``: ``"4.56.0.dev0"`` gives ``(4, 56, 0)``.

    >>> version_tuple("4.56.0.dev0"), version_tuple("0.2+local"), version_tuple("x")
    ((4, 56, 0), (0, 2), None)
    """
    parts = re.findall(r"\d+", str(text).split("+")[0])[:3]
    return tuple(int(p) for p in parts) if parts else None
