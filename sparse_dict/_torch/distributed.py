"""Data-parallel training across processes on ``torch.distributed``.

Every process (rank) holds the whole model and is given the same rows ``X``
(an array, or a memmap of the same file). The batches are drawn from one
global permutation that every rank computes alike, and each rank reads only
its share of each global batch: the union of the shares is the batch a single
process would have drawn. Each rank's gradients, step statistics and firing
counts are weighted by its share of the rows and summed across ranks in one
``all_reduce`` per step, which gives every rank the gradient of the whole
batch (BatchTopK excepted: each rank selects among its own share's
pre-activations, see docs/scaling.rst); identical gradients through
identical optimisers keep the parameters identical. Decisions that depend
on chance or on timing (resampling dead features, stopping early) are
taken on rank 0 and broadcast.

A failure on one rank stops every rank with an error that says which rank
failed and why: the failure travels in the same ``all_reduce`` as the
gradients (a flag), and a rank that dies outright (killed, out of memory)
shows as a lost connection or a timeout of the process group.

Nothing here knows about scikit-learn; :class:`Replicas` is the only type the
trainer sees.
"""

import atexit
import contextlib
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S", "RankFailedError", "Replicas", "is_writer", "replicas_for",
]

# How long a rank waits for the others in one collective before giving up,
# when this module initialises the process group. A step takes well under a
# second; the slowest collective is the first one, which waits for every
# rank to finish reading its data and building its model.
DEFAULT_TIMEOUT_S = 300

# The variables torchrun (and torch.distributed.launch) set for each process.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailedError(RuntimeError):
    """Another process of a data-parallel fit failed, so this one stopped too.

    Raised on every rank but the one that failed (which raises its own
    error), or on every surviving rank when a process died or stopped
    answering.
    """


def _first_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def replicas_for(distributed, device):
    """The processes to train with, or None to train in this process alone.

    Parameters
    ----------
    distributed : {"auto", True, False}
        ``"auto"``: join the default process group if the script initialised
        one, else initialise it from the variables that ``torchrun`` sets
        (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), else
        train alone. ``True``: the same, but training alone is an error.
        ``False``: always train alone (each rank fits its own model).
    device : torch.device
        Where this rank trains, as the user named it; it picks the backend
        when this function initialises the group: NCCL for a GPU, gloo for
        the CPU. A GPU without an index (``"cuda"``, or ``"auto"`` on a GPU
        machine) becomes the GPU of this rank's ``LOCAL_RANK``.

    Returns
    -------
    Replicas or None
        None when there is one process (a group of size one included).
        Its ``device`` is where this rank trains.

    Raises
    ------
    ValueError
        If ``distributed=True`` and there is neither a process group nor a
        launcher's environment, if the group's backend cannot carry tensors
        of ``device``, or if a machine runs more GPU processes than it has
        GPUs.

    Examples
    --------
    >>> import torch
    >>> replicas_for(False, torch.device("cpu")) is None
    True
    """
    if distributed is False:
        return None
    if not dist.is_available():
        if distributed is True:
            raise ValueError("distributed=True, but this build of torch has no "
                             "torch.distributed.")
        return None
    if not dist.is_initialized():
        missing = [name for name in _LAUNCHER_VARIABLES if name not in os.environ]
        if missing:
            if distributed is True:
                raise ValueError(
                    "distributed=True, but no process group is initialised and the "
                    f"launcher's variables {', '.join(missing)} are not set; start the "
                    "script with torchrun (for example 'torchrun --nproc_per_node 2 "
                    "script.py') or call torch.distributed.init_process_group first."
                )
            return None
        if int(os.environ["WORLD_SIZE"]) <= 1 and distributed == "auto":
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
        # The group lives as long as the script; closing it at exit avoids
        # torch's warning about a group that was never destroyed.
        atexit.register(_destroy)
    if dist.get_world_size() <= 1:
        return None
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            "The process group uses NCCL, which carries GPU tensors only, but this rank "
            f"trains on {device}. Use device='cuda' (or 'auto'), or a gloo process group."
        )
    if device.type == "cuda":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if device.index is None and per_machine > torch.cuda.device_count():
            raise ValueError(
                f"{per_machine} processes on this machine but {torch.cuda.device_count()} "
                "GPU(s): each process needs a GPU of its own. Start at most one process "
                "per GPU, or train on the CPU (device='cpu')."
            )
        if device.index is None:
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            device = torch.device("cuda", local % torch.cuda.device_count())
        # NCCL's object collectives place their tensors on the current GPU:
        # each rank must have its own.
        torch.cuda.set_device(device)
    return Replicas(device)


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()


def share_bounds(n_rows, world_size):
    """Where each of ``world_size`` ranks' shares of ``n_rows`` rows starts and ends.

    Shares differ by at most one row and the first ranks take the larger
    ones, so a batch of fewer rows than ranks leaves the last ranks empty.
    Each rank takes a contiguous slice of the batch's sorted row indices,
    so the shares, concatenated in rank order, are the batch itself.

    Examples
    --------
    >>> share_bounds(10, 3).tolist()
    [0, 4, 7, 10]
    >>> share_bounds(1, 2).tolist()
    [0, 1, 1]
    """
    base, extra = divmod(int(n_rows), int(world_size))
    sizes = np.full(world_size, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


class Replicas:
    """The ranks of the default process group, training one model together.

    Parameters
    ----------
    device : torch.device
        Where this rank trains.

    Attributes
    ----------
    rank : int
    world_size : int
    device : torch.device
    """

    def __init__(self, device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)

    @property
    def is_writer(self):
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    def __repr__(self):
        return f"Replicas(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------ sharing rows
    def bounds(self, n_rows):
        """Where each rank's share of ``n_rows`` rows starts and ends (:func:`share_bounds`)."""
        return share_bounds(n_rows, self.world_size)

    def local_rows(self, index):
        """This rank's share of a global batch's row indices (an integer array)."""
        bounds = self.bounds(len(index))
        return index[bounds[self.rank]:bounds[self.rank + 1]]

    # ------------------------------------------------------------- collectives
    def _collective(self, what, fn, *args, **kwargs):
        """Run one collective; a lost or silent rank becomes a RankFailedError."""
        try:
            return fn(*args, **kwargs)
        except RankFailedError:
            raise
        except (RuntimeError, ConnectionError) as exc:
            # gloo reports a peer that exited as a closed connection, NCCL
            # and gloo report a peer that stopped answering as a timeout
            # (DistBackendError, a RuntimeError).
            raise RankFailedError(
                f"Data-parallel training stopped while {what} (rank {self.rank} of "
                f"{self.world_size}): another rank exited, was killed or did not answer "
                f"within the process group's timeout ({_first_line(exc)})."
            ) from exc

    def sum_(self, tensors, error=None, what="averaging a training step"):
        """Sum ``tensors`` across ranks in place, in one ``all_reduce``.

        A rank whose local work raised passes its exception as ``error`` (its
        tensors are then ignored); every rank then raises: the failed one
        its own exception, the others :class:`RankFailedError` naming it.
        """
        flat = torch.cat([t.reshape(-1) for t in tensors]
                         + [torch.full((1,), float(error is not None), dtype=tensors[0].dtype,
                                       device=tensors[0].device)])
        self._collective(what, dist.all_reduce, flat)
        if float(flat[-1]) > 0:
            self._raise_failure(error, what)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def agree(self, error, what):
        """Raise on every rank if ``error`` is set on any rank (see :meth:`sum_`)."""
        flag = torch.tensor([float(error is not None)], device=self._device(),
                            dtype=torch.float32)
        self._collective(what, dist.all_reduce, flag)
        if float(flag[0]) > 0:
            self._raise_failure(error, what)

    @contextlib.contextmanager
    def together(self, what):
        """Run the body on every rank; if it raises on any, raise on all."""
        error = None
        try:
            yield
        except BaseException as exc:  # an interruption must stop the others too
            error = exc
        self.agree(error, what)

    def _raise_failure(self, error, what):
        described = None if error is None else _first_line(error)
        reports = [None] * self.world_size
        self._collective(what, dist.all_gather_object, reports, described)
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        rank, text = failed[0]
        raise RankFailedError(
            f"Data-parallel training stopped while {what}: rank {rank} of "
            f"{self.world_size} failed with {text}. Every rank stopped and left its "
            "estimator as it was before the call."
        )

    def broadcast_(self, tensors, what="sharing the model"):
        """Overwrite ``tensors`` on every rank with rank 0's."""
        for t in tensors:
            self._collective(what, dist.broadcast, t.data, src=0)

    def broadcast_value(self, value, what="sharing a decision"):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        box = [value]
        self._collective(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def average_(self, tensors, what="averaging running statistics"):
        """Replace each tensor by its mean over the ranks (summed in float64)."""
        for t in tensors:
            total = t.detach().double()
            self._collective(what, dist.all_reduce, total)
            with torch.no_grad():
                t.copy_(total / self.world_size)

    def gather_rows(self, local, sizes, what="gathering inputs"):
        """Every rank's rows, concatenated in rank order.

        Parameters
        ----------
        local : torch.Tensor of shape (sizes[rank], n_features)
        sizes : sequence of int
            Every rank's number of rows (known to all without asking).
        """
        width = max(int(max(sizes)), 1)
        padded = local.new_zeros((width,) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(what, dist.all_gather, parts, padded)
        return [part[: int(n)] for part, n in zip(parts, sizes)]

    def check_same(self, values, what, error=ValueError):
        """Raise ``error`` on every rank unless ``values`` are equal on all ranks.

        A dict of named values is reported by the names that differ (a
        learning rate of 0.003 against 0.006 was one figure among two
        1,400-character dumps of every setting).
        """
        everyone = [None] * self.world_size
        self._collective(f"comparing {what}", dist.all_gather_object, everyone, values)
        for rank, theirs in enumerate(everyone):
            if theirs == everyone[0]:
                continue
            ours = everyone[0]
            if isinstance(ours, dict) and isinstance(theirs, dict):
                names = [k for k in ours if ours[k] != theirs.get(k)] or sorted(theirs)
                ours = ", ".join(f"{k}={ours.get(k)!r}" for k in names)
                theirs = ", ".join(f"{k}={theirs.get(k)!r}" for k in names)
            raise error(
                f"The ranks of a data-parallel fit disagree on {what}: rank 0 has "
                f"{ours}, rank {rank} has {theirs}."
            )

    def _device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def fingerprint(X):
    """A cheap summary of ``X`` (its shape and three of its rows) to compare across ranks."""
    n = X.shape[0]
    rows = sorted({0, n // 2, n - 1})
    picked = X[rows]
    picked = picked.toarray() if hasattr(picked, "toarray") else np.asarray(picked)
    return (tuple(int(s) for s in X.shape), float(np.asarray(picked, dtype=np.float64).sum()))


def is_writer(distributed):
    """Whether this process writes files: rank 0, or any process when training alone.

    Under a launcher whose process group is not initialised yet, ``RANK``
    decides, so that ranks that only load and save a dictionary do not race
    to write the same folder.

    Examples
    --------
    >>> is_writer(False)
    True
    """
    if distributed is False:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
