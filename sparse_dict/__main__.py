"""``python -m sparse_dict``: the same command line as ``sparse-dict``."""

import sys

from sparse_dict.cli import main

if __name__ == "__main__":
    sys.exit(main())
