"""``python -m sparse_dict``: the same command line as ``sparse-dict``."""

import os
import sys

from sparse_dict.cli import main


def _leave(status):
    """Exit with ``status``; in a process of ``fit --nproc``, without teardown.

    gloo's threads can abort a process at the interpreter's exit ("terminate
    called without an active exception", status -6) even after the group is
    destroyed, which would report a finished, saved fit as failed. The
    command's outputs are written and closed by now, so the process leaves
    at once once its output is flushed.
    """
    from sparse_dict._cli_common import RANK_PROCESS_ENV

    if os.environ.get(RANK_PROCESS_ENV) != "1":
        sys.exit(status)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    _leave(main())
