"""The training loop: schedules, the unit-norm constraint, dead-feature resampling.

With :class:`~sparse_dict._torch.distributed.Replicas` the same loop trains
data-parallel: see :mod:`sparse_dict._torch.distributed` for how the ranks
share rows, gradients and decisions.
"""

import collections
import contextlib
import dataclasses
import math

import numpy as np
import torch

from sparse_dict._torch.data import (
    HOST_WORK_BYTES,
    geometric_median,
    iter_batches,
    median_squared_distance,
    rows_at,
    sample_index,
    sample_moments,
    sample_rows,
    to_device,
)
from sparse_dict._torch import fused
from sparse_dict._torch.distributed import fingerprint
from sparse_dict._torch.memory import training_bytes
from sparse_dict._torch.model import (
    STAT_NAMES,
    UNSCALED_TENSORS,
    SparseAutoencoder,
    _uses_kernel,
)
from sparse_dict._torch.pipeline import (
    BatchFeed,
    CudaRegistrar,
    HostCopy,
    PinnedRead,
    TouchedArrays,
    default_workers,
    resident_fits,
    to_host,
)

# Rows used to estimate the input scale and the decoder bias's start.
_N_INIT_ROWS = 8192
# A weight matrix from this size up goes into host arrays touched while
# training runs (Trainer.prepare_export).
_TOUCHED_EXPORT_BYTES = HOST_WORK_BYTES


def _export_registrar(device, dtype):
    """What page-locks the export's arrays for a GPU's copy into them: on a GPU, for float32."""
    if device.type == "cuda" and np.dtype(dtype) == np.float32:
        return CudaRegistrar()
    return None


class DivergenceError(FloatingPointError):
    """Training diverged: the loss became NaN or infinite, or ended far above its start.

    The message says what to change (usually a smaller learning rate). The
    estimator whose fit raised it is left as it was before the call.
    Import it from ``sparse_dict.estimator``.
    """


def _rows(t):
    """``t`` as a 2-D tensor of rows (a vector: one value per row)."""
    return t.view(-1, 1) if t.dim() == 1 else t


class _DeadFeatures:
    """AuxK's dead features, as device indices, read ``lag`` steps late.

    Which features are dead is known on the device; their indices set the
    shapes of AuxK's tensors, which the host must know before it queues the
    step. With ``lag=0`` the host reads them at the step that uses them, and
    waits for the device to finish the step before. With a lag, each step's
    dead mask is copied to pinned host memory without waiting and read
    ``lag`` steps later, by which time the copy has long run: the host
    queues steps ahead of the device. A feature is dead after a window of
    hundreds of steps, so a two-step lag changes nothing that matters.
    """

    def __init__(self, lag):
        self.lag = int(lag)
        self._queue = collections.deque()

    def current(self, dead_mask):
        """The indices to use now, given this step's mask of dead features."""
        if self.lag == 0:
            return torch.nonzero(dead_mask).flatten()
        device = dead_mask.device
        host = torch.empty(dead_mask.shape, dtype=torch.bool,
                           pin_memory=device.type == "cuda")
        host.copy_(dead_mask, non_blocking=True)
        event = torch.cuda.Event() if device.type == "cuda" else None
        if event is not None:
            event.record(torch.cuda.current_stream(device))
        self._queue.append((host, event))
        if len(self._queue) <= self.lag:
            return torch.zeros(0, dtype=torch.long, device=device)
        host, event = self._queue.popleft()
        if event is not None:
            event.synchronize()
        index = torch.from_numpy(np.flatnonzero(host.numpy()))
        if device.type == "cuda":
            return index.pin_memory().to(device, non_blocking=True)
        return index


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run, in steps.

    Attributes
    ----------
    coef : float
        Weight of the activation's sparsity term (``l1_coef`` or
        ``l0_coef``), for inputs scaled to a mean squared distance from the
        decoder bias's starting point equal to their width.
    learning_rate : float
        Adam's peak learning rate.
    batch_size : int
    total_steps : int or None
        Planned length of the run; ``None`` for open-ended training
        (``partial_fit``), which has no final decay.
    warmup_steps : int
        Steps over which the learning rate and ``l1_coef`` ramp up linearly.
    decay_steps : int
        Final steps over which the learning rate decays linearly to zero.
    resample_dead : bool
    resample_interval : int
        Steps between checks for dead features; a feature that fired on no
        row during the last interval is resampled.
    resample_until : int or None
        No resampling at or after this step (to let resampled features
        settle before the run ends).
    auxk_coef : float
        Weight of the AuxK term (0 turns it off).
    k_aux : int
        Dead features each row may use in the AuxK term.
    dead_window : int
        A feature that fired on no row during this many steps is dead, for
        AuxK.
    bf16 : bool
        Run the matrix products in bfloat16 (for GPUs).
    sparse_step : bool or "auto"
        The top-k family's sparse training step: forced on, off, or where it
        is faster (:meth:`SparseAutoencoder.uses_sparse_step`).
    device_data_budget : float
        On a GPU, the training rows are copied there once (and each batch is
        gathered on the GPU) when, as float32, they take at most this share
        of the GPU's free memory; otherwise they are streamed from the host
        (:mod:`sparse_dict._torch.pipeline`). 0 always streams.
    data_on_device : bool or "auto"
        Force the rows onto the device (True, also on the CPU), force
        streaming (False), or decide by ``device_data_budget``.
    gather_workers : int or "auto"
        Host threads that gather streamed batches ahead of the step;
        "auto": none on the CPU, up to four on a GPU.
    fused_update : bool or "auto"
        Update each weight matrix in one pass (Adam, the unit-norm
        constraint: :mod:`sparse_dict._torch.fused`) where it can run (a CUDA
        GPU with Triton), or always take the plain torch operations (False).
    fused_codes : bool or "auto"
        Form the codes' mask (as bits) and firing counts (and ReLU's codes)
        in one pass, and mask the codes' gradient in one more
        (:func:`sparse_dict._torch.fused.codes_bits_count_`): "auto" on a
        CUDA GPU where the first step measures it faster than the plain
        operations, with the same values; True forces it (a GPU, or
        Triton's interpreter); False never.
    fused_residual : bool or "auto"
        Form the residual, its gradient and their sums in one pass
        (:func:`sparse_dict._torch.fused.residual_`), with the same values
        up to the order of the sums' additions; "auto", True and False as
        for ``fused_codes``.
    fused_product : bool or "auto"
        For ReLU, add the encoder's bias and take the ReLU in the encoder
        product's epilogue (:func:`sparse_dict._torch.fused.product_relu_`),
        with the same values up to the products' rounding; "auto", True and
        False as for ``fused_codes``.
    fused_stats : bool or "auto"
        Form the step's statistics and the codes' penalty bias in one small
        kernel (:func:`sparse_dict._torch.fused.penalty_stats_`), with the
        same values up to the order of the sums' additions; "auto", True
        and False as for ``fused_codes``.
    fused_centre : bool or "auto"
        Centre the rows (``x - b_dec``, into the products' operand) in one
        plain pass (:func:`sparse_dict._torch.fused.centre_`), with the same
        values; "auto", True and False as for ``fused_codes``.
    fused_tally : bool or "auto"
        Add each step's firing counts to the trainer's in one small kernel
        (:func:`sparse_dict._torch.fused.tally_`), with the same values;
        "auto", True and False as for ``fused_codes``.
    """

    coef: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 1024
    total_steps: int | None = None
    warmup_steps: int = 0
    decay_steps: int = 0
    resample_dead: bool = True
    resample_interval: int = 1000
    resample_until: int | None = None
    auxk_coef: float = 0.0
    k_aux: int = 0
    dead_window: int = 1000
    bf16: bool = False
    sparse_step: bool | str = "auto"
    device_data_budget: float = 0.5
    data_on_device: bool | str = "auto"
    gather_workers: int | str = "auto"
    fused_update: bool | str = "auto"
    fused_codes: bool | str = "auto"
    fused_residual: bool | str = "auto"
    fused_product: bool | str = "auto"
    fused_stats: bool | str = "auto"
    fused_centre: bool | str = "auto"
    fused_tally: bool | str = "auto"

    def step_kernels(self, device):
        """The ``fused_*`` choices by the names the model's step gives its kernels.

        Where no kernel may run on ``device``
        (:func:`sparse_dict._torch.fused.may_run`: a CPU outside Triton's
        interpreter), ``"auto"`` is settled here as False, once for a
        training call, rather than asked again by every step (reading the
        environment each time cost a CPU step of a small model 35 us).
        """
        kernels = {"codes": self.fused_codes, "residual": self.fused_residual,
                   "product": self.fused_product, "stats": self.fused_stats,
                   "centre": self.fused_centre, "tally": self.fused_tally}
        if not fused.may_run(torch.device(device)):
            kernels = {name: use if use != "auto" else False for name, use in kernels.items()}
        return kernels

    def lr_factor(self, step):
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.total_steps is not None and self.decay_steps:
            remaining = self.total_steps - step
            factor = min(factor, max(remaining, 0) / self.decay_steps)
        return factor

    def coef_factor(self, step):
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def resample_due(self, step, checked=0):
        """Whether step ``step`` checks for dead features; the last check ended at ``checked``.

        A check is due an interval after the last one, at the first step
        allowed: ``partial_fit`` calls of 2, 4 or 8 batches put every
        multiple of the interval in a call's last 30%, where none may run,
        so that a check due at a fixed multiple never ran (none in 6,000
        steps, with 113 of 256 features dead).
        """
        if not self.resample_dead or self.resample_interval <= 0:
            return False
        if self.resample_until is not None and step >= self.resample_until:
            return False
        return step + 1 - checked >= self.resample_interval


def _input_scale(n_features, spread, msn):
    """The factor that gives the rows a mean squared distance ``n_features`` from the centre.

    ``spread`` is that distance, ``E||x - c||^2`` (:func:`_spreads`), where
    ``c`` is where the decoder bias starts, so the part of each row the
    codes must explain has a mean squared norm equal to the width, whatever
    the data's offset: one ``l1_coef`` then means about the same pressure on
    any data. (Scaling the raw norm instead, rows of standard normal noise
    shifted by 3 in every coordinate were left a residual of a tenth of
    their norm, which ReLU's default penalty outweighed: every feature died.)
    Where the spread is lost in rounding (rows all alike), the raw mean
    squared norm ``msn`` sets the scale.

    Examples
    --------
    >>> _input_scale(2, spread=2.0, msn=20000.0)   # rows (101, 99) and (99, 101)
    1.0
    """
    if not spread > _ALIKE * msn:
        spread = msn
    return math.sqrt(n_features / spread) if spread > 0 else 1.0


# Rows whose spread about their centre is below this share of their mean
# squared norm are all alike: float32 rows that differ at all differ by
# more (a unit in the last place of a coordinate is 6e-8 of it), and the
# exact sums of _spreads leave about 1e-32 of it (the centre's rounding).
_ALIKE = 1e-24
# A spread below this share of the mean squared norm is computed from the
# rows themselves, not from the moments: E||x||^2 - ||E x||^2 loses about as
# many of float64's 16 digits as the offset is larger than the spread (rows
# of spread 0.2 around an offset of 2e5 were fitted at the raw norm's
# scale, 2e5 times too small, and explained none of the data).
_CANCELLING = 1e-3


def _alike(seen):
    """Whether rows of these moments, ``(count, mean, variance)`` or None, are all the same.

    Such rows leave a dictionary nothing to explain: the decoder bias
    reproduces them, and the errors that training moves between are the
    optimiser's steps around it (1e-8 to 2e-6 of a mean squared norm of 32
    in a TopK fit), which no judgement of a run can read.
    """
    if seen is None:
        return False
    _, mean, variance = seen
    return not variance > _ALIKE * (variance + float(mean @ mean))


def _row_spreads(sample, point, rows=256):
    """Each row's squared distance from ``point``, in float64 from float64 copies of the rows."""
    point = np.asarray(point, dtype=np.float64)
    out = np.empty(len(sample))
    for start in range(0, len(sample), rows):
        part = sample[start:start + rows].astype(np.float64) - point
        np.einsum("ij,ij->i", part, part, out=out[start:start + len(part)])
    return out


def _spreads(sample, msn, mean, norms, centre):
    """The data's variance and each row's squared distance from ``centre``, in X's units.

    From the sample's moments (``msn``, ``mean`` and the rows' squared
    ``norms``) where the offset is moderate; from the rows themselves where
    it is so large against the spread that the moments cancel (see
    ``_CANCELLING``).

    Returns
    -------
    variance : float
        ``E||x - E x||^2``, the error of reconstructing every row by the mean.
    spread : float
        ``E||x - centre||^2``.
    row_spreads : ndarray of shape (n_rows,)
        ``||x - centre||^2`` for each row of ``sample``.

    Examples
    --------
    >>> import numpy as np
    >>> rows = np.array([[1e6 + 1, 1e6], [1e6 - 1, 1e6]], dtype=np.float32)
    >>> msn, mean = (rows.astype(float) ** 2).sum(axis=1).mean(), rows.mean(axis=0, dtype=float)
    >>> norms = (rows.astype(float) ** 2).sum(axis=1)
    >>> variance, spread, row_spreads = _spreads(rows, msn, mean, norms, centre=mean)
    >>> variance, spread, row_spreads.tolist()
    (1.0, 1.0, [1.0, 1.0])
    """
    centre = np.asarray(centre, dtype=np.float64)
    variance = float(msn - mean @ mean)
    if variance < _CANCELLING * msn:
        row_spreads = _row_spreads(sample, centre)
        spread = float(row_spreads.mean())
        # E||x - c||^2 = E||x - m||^2 + ||m - c||^2: the variance without a
        # second pass over the rows (m - c is small beside the offset, and
        # exact enough in float64).
        gap = mean - centre
        return max(spread - float(gap @ gap), 0.0), spread, row_spreads
    spread = float(msn - 2.0 * (centre @ mean) + centre @ centre)
    return variance, spread, norms - 2.0 * (sample @ centre.astype(sample.dtype)) + centre @ centre


# A sample of at least this many rows whose largest thousandth (one row or
# more) holds more than this share of the spread around the centre is
# dominated by a few rows of outsized norm. Measured: the project's data
# (built-in and MiniLM activations, make_superposition, the clustered
# generator) has its largest thousandth at about 0.5% of the spread; one row
# of 250 times the median norm in 5,000 rows held 85% of it, and scaling by
# the mean shrank every other row so far that ReLU's penalty silenced most
# of them (held-out explained variance 0.02 instead of 0.69).
_DOMINANT_MIN_ROWS = 1000
_DOMINANT_SHARE = 0.25
# Rows whose spread is beyond this multiple of the median (10 times the
# median distance from the centre), up to this share of the rows, count
# among the few too: the largest thousandth alone left 8 of 10 rows of a
# thousand times the norm in 2,000 to set the scale, and a ReLU fit then
# explained -0.02 of held-out normal rows. Measured on ten generators at
# 3,000 rows, ReLU's held-out explained variance rose where this changed
# anything (10 outliers in 2,000: -0.02 to 0.40; a first row a hundred times
# the norm in every hundred: 0.01 to 0.29; heavy-tailed magnitudes 0.94 to
# 0.98; Student t, 2 dof, 0.76 to 0.80) and was the same on the six others;
# TopK's moved by -0.02 to +0.01.
_OUTSIZED_SPREAD = 100.0
_OUTSIZED_MAX_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class DominantRows:
    """A few rows that hold most of a sample's spread, and the spread of the others."""

    n_rows: int
    n_sampled: int
    share: float
    rest_spread: float


# The rows over which a stream of partial_fit calls counts firings, at least
# (Trainer.carry_counts_).
_STREAM_FREQUENCY_ROWS = 8192
# Outsized rows that hold more than this share of the spread are blamed for
# a divergence (1 - 1e-9: a row 1e4.5 times the others' norm among 1e4).
_OVERFLOWING_SHARE = 1 - 1e-9


def _dominant_rows(spread):
    """:class:`DominantRows` of rows of these spreads, or None when no few rows dominate.

    The spread of a row is its squared distance from the centre
    (:func:`_spreads`); the largest thousandth of the rows (at least one)
    dominate when they hold more than ``_DOMINANT_SHARE`` of the total. The
    rows beyond ``_OUTSIZED_SPREAD`` times the median spread count among
    them, up to ``_OUTSIZED_MAX_SHARE`` of the rows. The input scale is then
    set from the other rows' mean spread.
    """
    n = len(spread)
    if n < _DOMINANT_MIN_ROWS:
        return None
    k = max(1, n // 1000)
    median = float(np.median(spread))
    if median > 0:
        outsized = int(np.count_nonzero(spread > _OUTSIZED_SPREAD * median))
        k = max(k, min(outsized, int(n * _OUTSIZED_MAX_SHARE)))
    order = np.argpartition(spread, n - k)
    largest = float(spread[order[n - k:]].sum())
    # The others' sum summed, not the total less the largest: beside a row
    # of spread 1e22 the difference lost every digit of theirs, and the
    # scale was then set from the outlier (held-out EV -4,200 at 1e11).
    others = float(spread[order[:n - k]].sum())
    total = largest + others
    share = largest / total if total > 0 else 0.0
    if not share > _DOMINANT_SHARE:
        return None
    rest = others / (n - k)
    if not rest > 0:
        return None
    return DominantRows(k, n, share, rest)


# Rows of the initial sample that are looked at for repeats first (a product
# and a sort of this many numbers: about a millisecond); where they repeat,
# all of the sample is counted (_distinct_rows).
_DISTINCT_PROBE_ROWS = 1024
# Fewer distinct rows than this share of the probe: X repeats its rows.
_REPEATED_SHARE = 0.9


# The rows farthest from the mean that Tail describes, and the fewest rows
# of a sample for which it does.
_TAIL_SHARE = 0.01
_TAIL_MIN_ROWS = 500


@dataclasses.dataclass(frozen=True)
class Tail:
    """How a fit fares on the rows farthest from the mean, and on the others.

    ``share``: the part of the rows' variance that the farthest
    ``_TAIL_SHARE`` of them hold; ``explained``: the explained variance of
    every row; ``explained_rest``: that of the other rows.
    """

    n_rows: int
    share: float
    explained: float
    explained_rest: float

    @classmethod
    def of(cls, errors, spreads):
        """From each row's squared error and squared distance from the mean (None if too few)."""
        n = len(spreads)
        if n < _TAIL_MIN_ROWS or not spreads.sum() > 0:
            return None
        k = max(1, int(n * _TAIL_SHARE))
        order = np.argsort(spreads)
        rest, tail = order[: n - k], order[n - k:]
        rest_spread = float(spreads[rest].sum())
        if not rest_spread > 0:
            return None
        return cls(k, float(spreads[tail].sum() / spreads.sum()),
                   1.0 - float(errors.sum() / spreads.sum()),
                   1.0 - float(errors[rest].sum()) / rest_spread)


def _distinct_rows(sample, n_samples):
    """An estimate of how many distinct rows X has, or None when the sample shows no repeats.

    A fixed random subset of the sample's rows is compared by their
    projections on one random direction. Where many repeat, X is taken to
    be ``D`` equally frequent distinct rows drawn with replacement, which
    shows ``D * (1 - exp(-m / D))`` distinct ones in ``m`` draws; ``D`` is
    solved for (by bisection). Chao's estimator from the rows seen once and
    twice bounds it from below, for repeats of unequal frequency.
    """
    # Less the first row: rows that share a large offset differ in digits
    # that a projection of the rows themselves rounds away (rows of spread
    # 0.2 and offset 1e4 read as 337 distinct among 2,000 distinct ones).
    # The difference of two nearby floats is exact, and equal rows stay
    # equal, in float64 as in float32, where rows near float32's largest
    # values overflowed (2,000 distinct rows read as 2).
    if len(sample) < 2:
        return None
    # Rows drawn across the sample, which is in X's order: its first rows
    # come from the start of X only, and the estimate assumes uniform draws
    # (X repeated row by row read as 643 distinct rows among 4,000; X
    # repeated block by block showed no repeats at all).
    chosen = np.random.RandomState(0).choice(len(sample), len(sample), replace=False)
    first = sample[chosen[0]].astype(np.float64)
    # Each row projected on a fixed random direction: far cheaper than
    # sorting the rows' bytes. Distinct rows practically never project
    # alike; equal rows do, up to the rounding of a product that could sum
    # two positions differently, which would only hide a few repeats.
    direction = np.random.RandomState(0).standard_normal(sample.shape[1])
    # A first look at a few rows, one product (a millisecond): most data
    # shows no repeats there, and is done.
    m = min(len(sample), _DISTINCT_PROBE_ROWS)
    probe = (sample[chosen[:m]].astype(np.float64) - first) @ direction
    if len(np.unique(probe)) >= _REPEATED_SHARE * m:
        return None
    # Then all of the sample, in blocks: a float64 copy of all its rows at
    # once would be twice the sample (50 MB at d=768), and each row's sum is
    # reduced alike wherever it lies in its block (a product's kernels sum
    # by position: copies in two blocks projected apart). From 1,024 rows,
    # counts with a long tail of rare rows (bag-of-words counts) read as
    # about 3,400 distinct rows among 48,000 or 200,000, of 11,456 and
    # 37,316; from 8,192, 14,064 and 15,491 (ample for 256 atoms).
    m = len(chosen)
    projections = np.concatenate([
        ((sample[block].astype(np.float64) - first) * direction).sum(axis=1)
        for block in np.array_split(chosen, max(1, m // 1024))])
    counts = np.unique(projections, return_counts=True)[1]
    seen = len(counts)
    if seen >= _REPEATED_SHARE * m:
        return None
    if n_samples <= m:
        return seen  # the probe is all of X
    # Chao's lower bound from the rows seen once and twice: where repeats
    # pile up on a few rows (a BOS token's, padding's) among distinct ones,
    # the rows seen once say that many more are unseen, which the model of
    # equally frequent rows below misses (it read 40,000 rows, a fifth of
    # them one repeated row, as about 2,130 distinct, of 31,784).
    once, twice = int(np.sum(counts == 1)), int(np.sum(counts == 2))
    chao = seen + once * (once - 1) / (2.0 * (twice + 1))
    low, high = float(seen), float(n_samples)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if mid * -math.expm1(-m / mid) < seen:
            low = mid
        else:
            high = mid
    # Repeats concentrated on a few rows (all-zero rows among distinct ones)
    # fit the model of equally frequent rows badly, which then finds nearly
    # every row distinct: "about 2,000 distinct rows among its 2,000 (its rows
    # repeat)", of 1,769. Such an estimate says nothing of repeats.
    high = max(high, chao)
    if high >= _REPEATED_SHARE * n_samples:
        return None
    return int(round(min(high, n_samples)))


def _centre_on(points, device):
    """The geometric median of the host rows ``points``, computed on ``device``; a host array.

    On the model's device: Weiszfeld's iterations are a few passes over
    2048 rows each, tens of milliseconds on a host, one on a GPU. The rows
    cross in float32 (half the bytes) and are widened there. A function of
    its own so that the GPU benchmark can time the round trip: the set-up
    of a short fit on an H200 spent about 25 ms outside its timed parts
    (2026-11-27), ending about when the upload of ``X`` ended.
    """
    return geometric_median(torch.from_numpy(points).to(device)).cpu().numpy()


def _stops(callback, info):
    """Whether ``callback`` asks to stop after a pass: it returned True.

    Only True: a logging callback that returns what it was given (a dict,
    truthy) must not end training after the first pass.
    """
    if callback is None:
        return False
    result = callback(info)
    return isinstance(result, (bool, np.bool_)) and bool(result)


class _PassEnd:
    """A pass's figures on their way to the host (a :class:`~sparse_dict._torch.pipeline.PinnedRead`), read when needed.

    At a pass's end the trainer needs the pass's statistics (one row a
    step), its firing counts, and whether every parameter is finite.
    Reading them at once left an H200 idle for about 2.3 ms a pass (bf16,
    d=768, N=24576, 16 steps a pass, 8% of the steady time; 2026-11-27):
    they are read after the next pass instead, where nothing asks sooner
    (:meth:`Trainer.train`).
    """

    def __init__(self, stats_list, rows_list, fired_total, rows_seen, named_parameters, step):
        self.rows_list, self.rows_seen = rows_list, rows_seen
        self.first_step, self.last_step = step - len(stats_list), step - 1
        self.parameter_names = [name for name, _ in named_parameters]
        self.read = False
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named_parameters])
        self._copy = PinnedRead([fired_total, finite]
                               + ([torch.stack(stats_list)] if stats_list else []))

    def values(self):
        """The pass's figures on the host, once their copies have landed.

        Returns
        -------
        fired : ndarray of shape (n_components,), float64
            Each feature's firing count over the pass.
        finite : ndarray of shape (n_parameters,), bool
            Whether each parameter is finite, in ``parameter_names``' order.
        stats : ndarray of shape (n_steps, n_stats), float64, or None
            One row a step (None for a pass of no step).
        """
        fired, finite, *stats = self._copy.arrays()
        return (fired.astype(np.float64), finite,
                stats[0].astype(np.float64) if stats else None)


def _solve_gram(gram, rhs):
    """``gram^-1 rhs`` for a batch of symmetric positive (semi)definite ``gram``.

    By Cholesky, not LU: torch's batched LU on the CPU through oneMKL fails
    on systems of about 150 unknowns or more when it runs on two threads or
    more ("Pivots given to lu_solve must all be greater or equal to 1", after
    "Parameter 6 was incorrect on entry to DLASWP"), even on well-conditioned
    ones; a row with 151 active atoms made a fit fail so. A system Cholesky
    finds singular (more active atoms than dimensions, in float64) is solved
    again with a ridge a millionth of its mean diagonal.

    Examples
    --------
    >>> gram = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    >>> _solve_gram(gram, torch.tensor([[[2.0], [2.0]]], dtype=torch.float64)).flatten()
    tensor([1.0000, 0.5000], dtype=torch.float64)
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    failed = info != 0
    if bool(failed.any()):
        bump = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1) * failed
        gram = gram + torch.diag_embed(bump[:, None].expand(-1, gram.shape[1]))
        factor, _ = torch.linalg.cholesky_ex(gram)
    return torch.cholesky_solve(rhs, factor)


class _Grown:
    """An array appended to in place, its capacity doubled as it fills.

    ``np.concatenate`` of the record of steps with each pass's rows copied
    every step so far at every pass: a ``partial_fit`` stream of 1.1 million
    steps spent 18 ms of a 77 ms call on it. Here appending costs in
    proportion to what is appended (amortised). :meth:`view` is the filled
    part; an entry once written is never written again (a record replaced,
    or rolled back, is a new object), so a view handed out stays as it was
    while more is appended behind it.

    Parameters
    ----------
    values : array-like
        The first entries, copied; the first axis is the one that grows.
    """

    __slots__ = ("buffer", "size")

    def __init__(self, values):
        self.buffer = np.array(values, copy=True)
        self.size = len(self.buffer)

    def view(self):
        """The entries appended so far (a view of the buffer, never written again)."""
        return self.buffer[:self.size]

    def extend(self, values):
        """Append ``values`` along the first axis (of the same trailing shape)."""
        values = np.asarray(values)
        if values.shape[1:] != self.buffer.shape[1:]:
            # As np.concatenate would refuse them (assignment would broadcast).
            raise ValueError(f"cannot append entries of shape {values.shape[1:]} to a record "
                             f"of entries of shape {self.buffer.shape[1:]}")
        end = self.size + len(values)
        # The type np.concatenate gave (integer counts join float64 rows).
        dtype = np.result_type(self.buffer, values)
        if end > len(self.buffer) or dtype != self.buffer.dtype:
            grown = np.empty((max(end, 2 * len(self.buffer), 64),) + self.buffer.shape[1:],
                             dtype=dtype)
            grown[:self.size] = self.buffer[:self.size]
            self.buffer = grown
        self.buffer[self.size:end] = values
        self.size = end


class Trainer:
    """Owns an autoencoder, its optimiser and its running statistics.

    The trainer works in scaled units: inputs are multiplied by ``scale`` so
    that their mean squared distance from the decoder bias's starting point
    equals their width (see :func:`_input_scale`), which makes one
    ``l1_coef`` mean the same on any data set. :meth:`export` folds the scale
    back into the parameters.

    Parameters
    ----------
    n_features, n_components : int
    device : torch.device
    seed : int
        Seeds the initial atoms and the resampling draws.
    activation : Activation, optional
        The sparsity mechanism; ReLU when None.
    atoms : array-like of shape (n_components, n_features), optional
        Initial atoms instead of random ones (see :class:`SparseAutoencoder`).
    """

    def __init__(self, n_features, n_components, device, seed, activation=None, atoms=None):
        self.device = torch.device(device)
        self.seed = int(seed)
        # Drawn where the model lives: on a GPU, 20 million normal draws on
        # the host cost about 0.2 s, more than a short fit's training. The
        # GPU's generator draws other numbers than the CPU's, so the same
        # seed starts another model on each kind of device.
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.model = SparseAutoencoder(n_features, n_components, activation, generator,
                                       device=self.device, atoms=atoms)
        self._resample_generator = torch.Generator().manual_seed(self.seed + 1)
        self.optimizer = self._make_optimizer()
        self.scale = None
        self.variance = None
        # The rows trained on so far, as (count, mean, variance) in scaled
        # units (see_rows): the spread that a run's error is judged
        # against, where partial_fit's first call saw only a few rows.
        self.seen = None
        # Whether the last train call ended because its callback asked.
        self.stopped_by_callback = False
        # Set by initialize when a few rows hold most of the data's spread,
        # and when its rows repeat (an estimate of how many are distinct).
        self.dominant_rows = None
        self.distinct_rows = None
        # False during a data-parallel run, whose steps sum .grad over the
        # ranks and whose broadcasts write parameters without torch's version
        # counts: no low-precision gradients, no operand copies written by the
        # update (see apply_gradients).
        self._one_process = True
        # The last step's mean squared error (a device scalar), which
        # normalises the next step's AuxK term; None before any step.
        self._residual_power = None
        self.run_start = 0
        self.step = 0
        # Where the last check for dead features ended (Config.resample_due).
        self.resample_checked = 0
        self.steps_since_fired = torch.zeros(n_components, dtype=torch.long, device=self.device)
        self.n_resampled = 0
        # One row of STAT_NAMES a step (see the history property).
        self.history = np.zeros((0, len(STAT_NAMES)))
        # Rows of each step's batch (a pass's last batch may be small), to
        # weigh the steps' statistics when a run is judged.
        self.history_rows = np.zeros(0)
        self.pass_fired = np.zeros(n_components)
        self.pass_rows = 0
        # Host arrays for the next export, their pages touched while
        # training runs (prepare_export), and the weights' copy into them
        # once started (start_export); not part of the state.
        self._export_into = None
        self._export_started = None
        # A caller's checks of the data that run beside the first steps
        # (train's verdict), while they are pending.
        self._verdict = self._carried = None

    @property
    def history(self):
        """The record of steps: one row of ``STAT_NAMES`` a step, float64.

        A view of a buffer appended to in place (:class:`_Grown`): its rows
        are never written again, so it may be kept; assigning an array
        replaces the record with a copy of it.
        """
        return self._history.view()

    @history.setter
    def history(self, value):
        self._history = _Grown(value)
        self._figures = None  # they were of the record replaced

    @property
    def history_rows(self):
        """Rows of each step's batch, as :attr:`history` is kept (a view; assigning copies)."""
        return self._history_rows.view()

    @history_rows.setter
    def history_rows(self, value):
        self._history_rows = _Grown(value)
        self._figures = None

    def record_figures(self):
        """The whole record's figures that :func:`assess_training` reads, brought up to date.

        Kept from one call to the next and extended by the steps since
        (:class:`_RecordFigures`), so that judging a ``partial_fit`` call
        costs in proportion to its own steps, not to the stream's.
        """
        figures = getattr(self, "_figures", None)
        if figures is None:
            figures = self._figures = _RecordFigures()
        figures.update(self.history, self.history_rows)
        return figures

    @property
    def dead_lag(self):
        """Steps by which AuxK's list of dead features lags (see :class:`_DeadFeatures`).

        0 on the CPU. On a GPU, 2: reading the list at the step that uses it
        would make the host wait for the device every step.
        """
        return getattr(self, "_dead_lag", 2 if self.device.type == "cuda" else 0)

    @dead_lag.setter
    def dead_lag(self, value):
        self._dead_lag = int(value)

    def _make_optimizer(self):
        # Adam's fused kernel makes one pass over each parameter instead of
        # several: on one CPU thread, 46 ms instead of 267 ms a step for two
        # 16384 x 512 weights, as much as a sparse top-k step's own gradients.
        # CPUs have it from torch 2.4; an older torch refuses it there.
        params = list(self.model.parameters())
        # The fused update's host-side count of each weight's Adam steps,
        # read from the new optimiser's state when first needed.
        self._fused_steps = {}
        try:
            return torch.optim.Adam(params, lr=1e-3, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.Adam(params, lr=1e-3)

    # ------------------------------------------------------------------ set-up
    def initialize(self, X, rng, decoder_bias_init="geometric_median", replicas=None):
        """Estimate the input scale and start the decoder bias from ``X``.

        With ``replicas``, every rank computes the same estimates from the
        same sample, and rank 0's (scale, data variance, initial parameters)
        are then broadcast, so that the ranks start identical even where
        their arithmetic differs in the last bit (another CPU, another BLAS).
        """
        if replicas is None:
            self._initialize(X, rng, decoder_bias_init)
            return
        # Before any tensor crosses: parameters of other shapes would fail
        # inside the collective (gloo aborts the process) instead of here.
        # The activation and its settings too: a k of 4 against 8 trained
        # one dictionary of both silently, and TopK against BatchTopK (one
        # more buffer to broadcast) made gloo abort a process unexplained.
        replicas.check_same(
            {"n_features": self.model.n_features, "n_components": self.model.n_components,
             "activation": self.model.activation.describe()},
            "the model (its shape and activation)")
        with replicas.together("initialising the model"):
            self._initialize(X, rng, decoder_bias_init)
        # seen (its mean and variance scaled by the scale) goes with them: the
        # ranks judge the run from the same figures.
        self.scale, self.variance, self.seen = replicas.broadcast_value(
            (self.scale, self.variance, self.seen))
        replicas.broadcast_(list(self.model.parameters()) + list(self.model.buffers()))

    def _initialize(self, X, rng, decoder_bias_init):
        n_features = self.model.n_features
        # Kept in float32 and summed in float64: a float64 copy of the whole
        # sample (50 MB at d=768) cost more in page faults than the sums.
        sample = sample_rows(X, _N_INIT_ROWS, rng, dtype=np.float32)
        msn, mean, norms = sample_moments(sample, row_norms=True)
        if decoder_bias_init == "zeros":
            centre = np.zeros(n_features)
        elif decoder_bias_init == "mean":
            centre = mean
        else:
            # Every fourth row: the sample's indices are sorted, so a prefix
            # would come from the start of X only.
            centre = _centre_on(sample[:: max(1, len(sample) // 2048)], self.device)
        variance, spread, row_spreads = _spreads(sample, msn, mean, norms, centre)
        self.dominant_rows = _dominant_rows(row_spreads)
        self.distinct_rows = _distinct_rows(sample, X.shape[0])
        # A few rows that dominate the spread do not set the scale.
        self.scale = (_input_scale(n_features, spread, msn)
                      if self.dominant_rows is None
                      else math.sqrt(n_features / self.dominant_rows.rest_spread))
        # The error of reconstructing every row by the mean, in scaled units
        # (a run that ends far above it has diverged).
        self.variance = max(self.scale ** 2 * variance, 0.0)
        self.seen = (float(X.shape[0]), mean * self.scale, self.variance)
        with torch.no_grad():
            self.model.b_dec.copy_(torch.as_tensor(centre * self.scale, dtype=torch.float32))

    # ------------------------------------------------------ after training
    def calibration_sample(self, X, n_rows, rng, feed=None):
        """Scaled rows of ``X`` on the device, for calibration and statistics.

        At most ``n_rows`` rows, and fewer for wide dictionaries, so that
        their (rows, n_components) pre-activations stay near 128 MB. With a
        ``feed`` (still open) whose resident copy is on the device, the rows
        are gathered there (:meth:`BatchFeed.rows`): the same values, and no
        copy from the host, which on a GPU queued behind the export's.
        """
        n_rows = min(n_rows, max(1024, (1 << 25) // self.model.n_components))
        index = sample_index(X.shape[0], n_rows, rng)
        rows = None if feed is None else feed.rows(index)
        if rows is not None:
            return rows
        return to_device(rows_at(X, index, np.float32), self.device).mul_(self.scale)

    @torch.no_grad()
    def see_rows(self, sample, n_rows):
        """Add ``n_rows`` rows, of which ``sample`` (scaled) is a sample, to :attr:`seen`.

        ``seen`` is (rows, their mean, their variance), merged with the
        sample's by the parallel formula: no ``E||x||^2 - ||E x||^2``, whose
        digits a large offset would cancel.

        Examples
        --------
        >>> t = Trainer(2, 4, "cpu", seed=0)
        >>> t.seen = (1.0, np.zeros(2), 0.0)
        >>> t.see_rows(torch.tensor([[2.0, 0.0], [4.0, 0.0]]), 3)
        >>> t.seen[0], t.seen[1].tolist(), t.seen[2]
        (4.0, [2.25, 0.0], 2.4375)
        """
        if not sample.shape[0]:
            return
        wide = sample.double()
        centre = wide.mean(dim=0)
        variance = float(((wide - centre) ** 2).sum(dim=1).mean())
        mean = centre.cpu().numpy()
        if self.seen is None:
            self.seen = (float(n_rows), mean, variance)
            return
        count, seen_mean, seen_variance = self.seen
        share = n_rows / (count + n_rows)
        gap = mean - seen_mean
        self.seen = (count + n_rows, seen_mean + share * gap,
                     (1 - share) * seen_variance + share * variance
                     + share * (1 - share) * float(gap @ gap))

    def rows_alike(self):
        """Whether every row trained on is the same, up to float32's rounding (:func:`_alike`)."""
        return _alike(self.seen)

    @staticmethod
    @torch.no_grad()
    def mean_error(sample):
        """The error of reconstructing each row of ``sample`` by their mean, per row.

        Examples
        --------
        >>> Trainer.mean_error(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
        2.0
        """
        if not sample.shape[0]:
            return 0.0
        return float(((sample - sample.mean(dim=0)) ** 2).sum(dim=1).mean())

    @torch.no_grad()
    def calibrate(self, sample, min_rows=1):
        """Let the activation fit its inference state on the final model.

        A ``sample`` of fewer than ``min_rows`` rows leaves the state that
        training keeps (BatchTopK's running threshold) as it is: a
        ``partial_fit`` call of a few rows would otherwise set the threshold
        from them alone.
        """
        calibrate = getattr(self.model.activation, "calibrate_", None)
        if calibrate is not None and sample.shape[0] >= max(1, min_rows):
            calibrate(self.model, self.model.pre_activations(sample))

    @torch.no_grad()
    def median_distance(self, sample, n_rows=2048):
        """The median squared distance of ``sample``'s rows from the decoder bias.

        ``sample``: scaled rows, as for :meth:`sample_stats`; the figure is in
        the input's units (divided by ``scale ** 2``), reduced on the device,
        one number read by the host.

        Examples
        --------
        >>> t = Trainer(2, 2, "cpu", seed=0, atoms=np.eye(2))
        >>> t.scale = 2.0
        >>> t.median_distance(torch.tensor([[2.0, 0.0], [0.0, 4.0], [6.0, 0.0]]))
        4.0
        """
        # At most n_rows rows, spread over the sample (8,192 rows of 768 in
        # float64 throughout took 56 ms on a CPU).
        sample = sample[::max(1, sample.shape[0] // n_rows)][:n_rows]
        return median_squared_distance(sample, self.model.b_dec.detach()) / self.scale ** 2

    def refit_gain(self, sample, n_rows=256, chunk_bytes=1 << 26):
        """How much more of ``sample``'s variance its codes' own features explain refitted.

        Each row's active features are kept and their magnitudes fitted
        anew by least squares (the decoder bias kept): what the same
        support would explain without a penalty's shrinkage. On ``n_rows``
        rows spread evenly over ``sample`` (scaled rows, as for
        :meth:`sample_stats`), on the model's device: each row's active
        atoms are gathered (padded to the widest support, in chunks of rows
        of about ``chunk_bytes``) and their normal equations solved in
        float64; the host reads two numbers.

        Returns
        -------
        explained, refitted : float
            The explained variance of the model's reconstructions and of the
            refitted ones, over the same rows; NaN for fewer than two rows
            or rows without spread.

        Examples
        --------
        >>> t = Trainer(2, 2, "cpu", seed=0, atoms=np.eye(2))
        >>> with torch.no_grad():
        ...     _ = t.model.W_enc.copy_(0.5 * torch.eye(2))  # codes half the rows' size
        >>> ev, refit = t.refit_gain(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
        >>> round(ev, 3), round(refit, 3)
        (0.5, 1.0)
        """
        # Spread over the sample, which keeps the rows' order: its first rows
        # were the first of X (the shrinkage warning said -0.09 against 0.27
        # where the small rows came first, and nothing where the large did).
        rows = sample[::max(1, sample.shape[0] // n_rows)][:n_rows]
        if rows.shape[0] < 2:
            return float("nan"), float("nan")
        atoms = self.model.W_dec.detach()
        b_dec = self.model.b_dec.detach().double()
        width = int(atoms.shape[1])
        sums = torch.zeros(3, dtype=torch.float64, device=rows.device)
        mean = rows.mean(dim=0, dtype=torch.float64)
        made_all, codes_all = self.model(rows)
        widest_all = max(1, int((codes_all > 0).sum(dim=1).max()))
        step = max(1, chunk_bytes // (8 * width * widest_all))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step]
            made, codes = made_all[start:start + step], codes_all[start:start + step]
            wide = chunk.double()
            centred = wide - b_dec
            active = codes > 0
            widest = int(active.sum(dim=1).max())
            refit = torch.zeros_like(centred)
            if widest:
                # Each row's active atoms first, then padding of zero atoms.
                real, index = torch.topk(active.to(torch.float32), widest, dim=1)
                gathered = (atoms[index] * real[..., None]).double()  # (rows, widest, d)
                gram = gathered @ gathered.transpose(1, 2)
                # Padding's equations are c = 0; a ridge far below any real
                # atom's scale keeps (nearly) parallel atoms solvable.
                gram += torch.diag_embed(1.0 - real.double() + 1e-9)
                magnitudes = _solve_gram(gram, gathered @ centred[..., None])
                refit = (magnitudes.transpose(1, 2) @ gathered).squeeze(1)
            sums += torch.stack([(centred - (made.double() - b_dec)).pow(2).sum(),
                                 (centred - refit).pow(2).sum(),
                                 (wide - mean).pow(2).sum()])
        error, refit_error, variance = sums.tolist()
        if variance <= 0:
            return float("nan"), float("nan")
        return 1.0 - error / variance, 1.0 - refit_error / variance

    @torch.no_grad()
    def sample_stats(self, sample):
        """Mean L0, mean squared error per row and shrinkage of ``sample``, at inference.

        The error is the final model's, in scaled units: training's history
        records each step's error before its update, so a last step that
        ruins the model shows only here. The shrinkage is the relative
        reconstruction bias of Wright and Sharkey (2024): the factor ``g``
        by which the reconstructions (relative to the decoder bias) would
        best be scaled, ``<x - b, x_hat - b> / ||x_hat - b||^2`` over the
        sample; 1 without shrinkage, above 1 when a penalty shrinks the
        codes.

        Also the figures of the rows farthest from the mean (:class:`Tail`):
        where the share of the variance those hold is large, the error over
        all rows hides how the others fare.

        Returns
        -------
        l0, error, shrinkage : float
        tail : Tail or None
            None for a sample of fewer than ``_TAIL_MIN_ROWS`` rows.
        """
        if not sample.shape[0]:
            return float("nan"), float("nan"), float("nan"), None
        # Computed on the device and read once: one synchronisation, not
        # several a chunk. Per row: its squared error and its squared distance
        # from the mean (for the tail).
        sums = torch.zeros(3, dtype=torch.float64, device=sample.device)
        b_dec = self.model.b_dec.detach().double()
        mean = sample.mean(dim=0, dtype=torch.float64)
        per_row = []
        for chunk in sample.split(4096):
            recon, codes = self.model(chunk)
            # Each (rows, d) operand widened once.
            rows = chunk.double()
            centred, made = rows - b_dec, recon.double() - b_dec
            per_row.append(torch.stack([(centred - made).pow(2).sum(dim=1),
                                        (rows - mean).pow(2).sum(dim=1)]))
            sums += torch.stack([(codes > 0).sum().double(), (centred * made).sum(),
                                 made.pow(2).sum()])
        n = sample.shape[0]
        read = torch.cat([sums, torch.cat(per_row, dim=1).flatten()]).cpu().numpy()
        (active, inner, made), (errors, spreads) = read[:3], read[3:].reshape(2, n)
        return (float(active) / n, float(errors.sum()) / n,
                float(inner / made) if made > 0 else float("nan"), Tail.of(errors, spreads))

    @classmethod
    def from_parameters(cls, params, scale, device, seed, activation=None):
        """Rebuild a trainer (with a fresh optimiser) from exported parameters."""
        n_components, n_features = params["components"].shape
        trainer = cls(n_features, n_components, torch.device("cpu"), seed, activation)
        trainer.load_parameters_(params, scale)
        return trainer.to(device)

    def load_parameters_(self, params, scale):
        """Set the model from exported ``params`` (the caller's units), with a fresh optimiser.

        Adam's moments belong to the values they were gathered on; for
        values set another way they would push on as before the change.
        """
        self.scale = float(scale)
        scaled = {
            name: np.asarray(value) * (1.0 if name in UNSCALED_TENSORS else self.scale)
            for name, value in params.items()
        }
        self.model.load_fitted_tensors_(scaled)
        self.optimizer = self._make_optimizer()

    @torch.no_grad()
    def differs_from(self, params, scale):
        """Whether exported ``params`` and ``scale`` are no longer this model's.

        ``params`` as :meth:`export` gave them, in any float dtype, compare
        equal: the comparison is in float32, as the model keeps them (a
        change below float32's resolution would train the same).
        """
        if float(scale) != self.scale:
            return True
        for name, tensor in self.model.fitted_tensors().items():
            value = torch.as_tensor(np.asarray(params[name]), dtype=torch.float32)
            # As export computes it, on the device it computes it on.
            expected = tensor.float()
            if name not in UNSCALED_TENSORS:
                expected = expected / np.float32(self.scale)
            if value.shape != expected.shape or not torch.equal(value.to(self.device), expected):
                return True
        return False

    def to(self, device):
        """Move the model and the optimiser's state to ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        self._flush_fused_steps()
        old_state = self.optimizer.state_dict()
        self.model.to(device)
        self.steps_since_fired = self.steps_since_fired.to(device)
        if self._residual_power is not None:
            self._residual_power = self._residual_power.to(device)
        self.device = device
        # Whether Adam's fused kernel exists depends on the device, so the
        # optimiser is rebuilt for the new device; load_state_dict moves its
        # moments to the parameters' device.
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(old_state)
        return self

    # ---------------------------------------------------------------- training
    def train(self, X, n_passes, config, rng, callback=None, progress=None, replicas=None,
              rollback=True, feed=None, verdict=None, carried=None):
        """Train for ``n_passes`` shuffled passes over ``X`` (or until the step budget).

        On divergence the trainer is put back as it was before the call and
        :class:`DivergenceError` is raised; any other exception (an
        interruption, a bad batch) also puts it back before propagating.
        ``rollback=False`` skips the snapshot this takes (a copy of the model
        and of Adam's state), for a caller that keeps its own or discards a
        failed trainer. ``feed``: the :meth:`open_feed` of ``X`` and
        ``config`` that the caller opened before (so that a resident copy
        was already on its way while the model was initialised), and closes;
        without it the call opens and closes its own.

        ``verdict``: checks of ``X`` that the caller runs beside the first
        steps (an object with a future's ``done()`` and ``result()``, such
        as the scan of its values, which on a GPU need not hold the steps
        up). Its ``result()`` is taken once: as soon as a step finds it
        done, at the latest before the first pass's statistics are read
        (and so before the callback), or before any error of the steps is
        raised. A verdict that refuses ``X`` raises its own error in place
        of what the steps on refused rows gave (a divergence); the caller
        discards such a trainer.

        ``carried``: an earlier ``partial_fit`` call's firing counts and
        rows, joined to the first pass's (:meth:`carry_counts_`) as soon as
        it is read, so that its callback's ``dead`` counts the stream's
        recent rows, not this call's alone (a healthy stream of 256-row calls
        told it of 1,022 of 2,048 features dead, its progress bar of none).

        A pass's figures (its statistics, firing counts and the parameters'
        finiteness, :class:`_PassEnd`) are read as it ends where a
        ``callback``, a ``progress`` bar or ``replicas`` need them, and
        otherwise after the next pass, so that a GPU has the next pass's
        steps queued meanwhile; all are read before the call returns, and a
        divergence found late is raised at the step it happened, as one
        found at once.

        The step's (batch, n_components) buffers stay allocated after the
        call, for the next one: allocating them again costs page faults on
        a CPU (about 10 ms per 64 MB here) at every call. The caller frees
        them with ``model.release_workspace()`` once training is over (the
        estimator does when a fit ends); pickling never includes them.

        With ``replicas`` (data-parallel training), every rank must call this
        with the same ``X``, ``config`` and random state, and each trains on
        its share of every batch; the ranks end with identical parameters.
        An exception on one rank puts every rank back and raises on all of
        them (:class:`~sparse_dict._torch.distributed.RankFailedError` on the
        others). Rank 0's ``callback`` decides when to stop.

        Returns
        -------
        n_passes_done : int
        """
        snapshot = self._snapshot() if rollback else None
        self._one_process = replicas is None
        self._step_kernels = config.step_kernels(self.device)
        # The weights may have been changed since the last call.
        self.model.operands_stale_()
        self.run_start = len(self.history)
        passes_done = 0
        self.stopped_by_callback = False
        own_feed = feed is None
        self._verdict = verdict
        self._carried = carried
        # No kernel is chosen on rows the verdict may yet refuse.
        deciding = (fused.decisions_wait_for(self._settle_verdict) if verdict is not None
                    else contextlib.nullcontext())
        try:
            with deciding:
                if replicas is not None:
                    self._check_replicas(X, config, replicas, "the training data and settings")
                if own_feed:
                    feed = self.open_feed(X, config)
                feed.set_scale(self.scale)
                # One for the whole call: its queue of late reads carries from
                # one pass to the next (a pass of two steps would see none).
                dead_features = _DeadFeatures(self.dead_lag) if config.auxk_coef > 0 else None
                full_pass, unread = None, None
                for _ in range(n_passes):
                    if config.total_steps is not None and self.step >= config.total_steps:
                        break
                    stop, end = self._train_pass(X, feed, dead_features, config, rng,
                                                 progress, replicas)
                    passes_done += 1
                    if unread is not None:
                        full_pass = self._count_read_pass(unread, X.shape[0], full_pass)
                        unread = None
                    if callback is None and not stop and not end.read:
                        # Nothing asks for this pass's figures before the
                        # next pass ends: they are read then, and the GPU
                        # goes on with the next pass's steps meanwhile.
                        unread = end
                        continue
                    full_pass = self._count_read_pass(end, X.shape[0], full_pass)
                    info = self.pass_info(passes_done, config)
                    if replicas is None:
                        stopped = _stops(callback, info)
                    else:
                        with replicas.together("running the callback"):
                            stopped = _stops(callback, info)
                        stopped = replicas.broadcast_value(stopped, "deciding to stop")
                    # The caller's choice: no run to call unconverged.
                    self.stopped_by_callback = bool(stopped)
                    if stopped or stop:
                        break
                if unread is not None:
                    self._count_read_pass(unread, X.shape[0], full_pass)
                self._settle_verdict()  # a call that took no step
        except BaseException as exc:
            if snapshot is not None:
                self._restore(snapshot)
            if not isinstance(exc, KeyboardInterrupt):
                # A refusal of the rows replaces what the steps on them gave.
                self._settle_verdict()
            raise
        finally:
            self._verdict = self._carried = None
            if own_feed and feed is not None:
                feed.close()
            self._flush_fused_steps()
        return passes_done

    def _settle_verdict(self):
        """Take the pending verdict's result, once (see :meth:`train`'s ``verdict``).

        A refusal is raised without context: where an error of the steps
        propagates, that context (steps on refused rows) would only mislead.
        """
        verdict, self._verdict = self._verdict, None
        if verdict is None:
            return
        try:
            verdict.result()
        except BaseException as refused:  # noqa: BLE001 - raised as it is, its context dropped
            raise refused from None

    def _count_read_pass(self, end, n_samples, full_pass):
        """:meth:`_read_pass`, then :meth:`_count_whole_pass`: a pass's figures, in pass order."""
        self._read_pass(end)
        full_pass = self._count_whole_pass(n_samples, full_pass)
        carried, self._carried = self._carried, None
        if carried is not None:
            self.carry_counts_(*carried)
        return full_pass

    def _count_whole_pass(self, n_samples, full_pass):
        """Firing counts over at least a pass's worth of rows.

        A step budget usually ends a fit inside a pass, and a short last
        pass (24 steps of 256 rows where a pass is 194 steps) would show
        every feature rarer than one row in 6,000 as dead. A partial pass's
        counts are therefore added to those of the whole pass before it in
        the same call. Returns this pass's own counts when it was whole, for
        the next one, else ``full_pass`` unchanged.
        """
        if self.pass_rows >= n_samples:
            return self.pass_fired.copy(), self.pass_rows
        if full_pass is not None:
            self.pass_fired = self.pass_fired + full_pass[0]
            self.pass_rows += full_pass[1]
        return full_pass

    def carry_counts_(self, fired, rows):
        """Add earlier ``partial_fit`` calls' firing counts to this call's, fading as rows come in.

        Each call counted its own rows only: after 118 calls of 256 rows, 49
        of 256 features read as never firing that all fire, and after a
        one-row call every frequency was 0 or 1. The earlier counts weigh
        ``1 - rows / _STREAM_FREQUENCY_ROWS`` of this call's rows: about the
        latest ``_STREAM_FREQUENCY_ROWS`` rows are counted, recent ones most.
        """
        keep = max(0.0, 1.0 - self.pass_rows / _STREAM_FREQUENCY_ROWS)
        if keep > 0 and rows > 0:
            self.pass_fired = _forgotten(self.pass_fired + keep * fired)
            self.pass_rows = self.pass_rows + keep * rows

    def resume_counts_(self, frequencies, rows):
        """Start the firing counts from fitted ``frequencies`` over ``rows`` rows.

        For a trainer rebuilt from a dictionary's attributes (after ``load``):
        the next ``partial_fit`` call's counts join them as
        :meth:`carry_counts_` joins a stream's (a one-row call after a load
        read every frequency as 0 or 1). At most a stream's
        ``_STREAM_FREQUENCY_ROWS`` rows are assumed.
        """
        rows = float(min(max(rows, 0), _STREAM_FREQUENCY_ROWS))
        frequencies = np.clip(np.nan_to_num(np.asarray(frequencies, dtype=np.float64)), 0, 1)
        # A feature that fired counts as one firing at least: rarer than one
        # in these rows, it was counted 0 (dead) after a load, where the
        # dictionary in memory kept it.
        self.pass_fired = np.where(frequencies > 0, np.maximum(frequencies * rows, 1.0), 0.0)
        self.pass_rows = rows

    def _parameter_digest(self):
        """One float64 sum per parameter and buffer: equal on ranks that agree."""
        return [float(t.detach().double().sum())
                for t in list(self.model.parameters()) + list(self.model.buffers())]

    def _check_replicas(self, X, config, replicas, what, error=ValueError):
        replicas.check_same(
            {"data (shape, sum of three rows)": fingerprint(X), **dataclasses.asdict(config),
             "activation": self.model.activation.describe(), "step": self.step,
             "parameters (sums)": self._parameter_digest()}, what, error)

    def open_feed(self, X, config):
        """The :class:`BatchFeed` that brings ``X``'s batches to the device; the caller closes it.

        When the rows are to be resident on the device, their copy starts
        now, in the background: a caller that opens the feed before
        :meth:`initialize` overlaps the two, and the first steps stream
        their batches until the copy has landed. The feed takes the input
        scale when :meth:`train` starts.
        """
        resident = config.data_on_device
        if resident == "auto":
            # The step's workspace and Adam's moments are still to come.
            n_features, n_components = self.model.n_features, self.model.n_components
            reserved = (training_bytes(n_features, n_components)
                        + 4 * 4 * config.batch_size * n_components)
            resident = resident_fits(X.shape[0], X.shape[1], self.device,
                                     config.device_data_budget, reserved)
        workers = config.gather_workers
        if workers == "auto":
            workers = default_workers(self.device)
        return BatchFeed(X, self.device, None, config.batch_size, resident=bool(resident),
                         workers=workers, depth=max(2, workers + 1))

    def _train_pass(self, X, feed, dead_features, config, rng, progress, replicas=None):
        model, optimizer = self.model, self.optimizer
        device = self.device
        autocast = torch.bfloat16 if config.bf16 else None
        activation = model.activation
        n_components = model.n_components
        params = list(model.parameters())
        fired_total = torch.zeros(n_components, dtype=torch.float64, device=device)
        stats_list, rows_list, pool = [], [], []
        if self.resample_checked is None:
            # A pickle of a trainer older than the record: it checked at
            # multiples of the interval.
            self.resample_checked = self.step - self.step % max(config.resample_interval, 1)
        pool_rows, rows_in_pool = max(8192, config.batch_size), 0
        # The last in-pass finiteness check, read at the next (_check_finite_late).
        self._finite_check = None
        rows_seen = 0
        stop = False
        select = None if replicas is None else replicas.local_rows
        batches = feed.batches(iter_batches(X, config.batch_size, rng), select)
        while True:
            try:
                index, x = next(batches)
            except StopIteration:
                break
            except Exception as exc:
                if replicas is None:
                    raise
                # A batch this rank could not read: the others must stop too.
                self._replica_step(None, 1, 0.0, None, None, config, params, replicas, exc)
                raise
            if config.total_steps is not None and self.step >= config.total_steps:
                stop = True
                break
            n_rows = len(index) if not isinstance(index, slice) else index.stop - index.start
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * config.lr_factor(self.step)
            coef = config.coef * config.coef_factor(self.step)
            dead = None
            if dead_features is not None:
                dead = dead_features.current(self.steps_since_fired >= config.dead_window)
            if replicas is None:
                stats, fired = self._local_step(x, coef, autocast, dead, config)
            else:
                x, stats, fired = self._replica_step(
                    x, n_rows, coef, autocast, dead, config, params, replicas)
            self.apply_gradients(config)
            activation.after_step_(model, self.step)

            # Summed over the ranks, so the same on each; no host read.
            self._residual_power = stats[1]
            self._tally(fired, fired_total)
            stats_list.append(stats)
            rows_list.append(n_rows)
            rows_seen += n_rows
            if config.resample_dead:
                # The latest batches (references, not copies) are the inputs
                # that resampling draws from; with replicas, this rank's share
                # of each, and the batch's global size.
                pool.append((x, n_rows))
                rows_in_pool += n_rows
                while rows_in_pool - pool[0][1] >= pool_rows:
                    rows_in_pool -= pool.pop(0)[1]
            if config.resample_due(self.step, self.resample_checked):
                self._resample(pool, config.resample_interval, replicas)
                self.resample_checked = self.step + 1
                # Drawn from: a check soon after (in a call that started
                # late on its interval) would restart copies of them.
                pool.clear()
                rows_in_pool = 0
            self.step += 1
            if self._verdict is not None and self._verdict.done():
                self._settle_verdict()
            if self.step % 100 == 0:
                self._check_finite_late(stats)
            if progress is not None:
                progress.update(1)
                if self.step % 20 == 0:
                    self._show_figures(progress, stats.tolist(), config)
        # Ends the feed's read-ahead of this pass (after an early stop).
        batches.close()
        self._finite_check = None  # the pass's own read covers its steps
        # Statistics of rows the caller's checks refuse are not read.
        self._settle_verdict()
        end = _PassEnd(stats_list, rows_list, fired_total, rows_seen,
                       list(model.named_parameters()), self.step)
        if replicas is not None or progress is not None:
            # Read now: the ranks compare their parameters next, and a
            # progress bar shows the pass's figures. Otherwise the caller
            # reads them when it needs them, on every device alike (on the
            # CPU it costs nothing either way).
            self._read_pass(end, progress, config)
        if replicas is not None:
            # Running statistics that each rank kept from its own share
            # (BatchTopK's threshold): their mean is what one process would
            # have kept from the mean of the shares' values, as they are
            # linear averages.
            replicas.average_(list(model.buffers()))
            self._check_replicas(X, config, replicas, "the parameters after a pass (a bug)",
                                 error=RuntimeError)
        return stop, end

    def _tally(self, fired, fired_total):
        """Add a step's firing counts to the pass's, and count the steps since each fired.

        Three torch operations (four launches), or on a GPU one kernel
        (:func:`sparse_dict._torch.fused.tally_`, the same values) where the
        first step measures it faster (``TrainConfig.fused_tally``).
        """
        def plain(total, since):
            total += fired
            since += 1
            since.masked_fill_(fired > 0, 0)

        since = self.steps_since_fired
        if (fired.dtype == torch.float32 and fired.is_contiguous()
                and _uses_kernel(self._step_kernels, "tally", fired.device,
                                 lambda: fused.tally_pays(fired, fired_total, since, plain))):
            fused.tally_(fired, fired_total, since)
        else:
            plain(fired_total, since)

    @torch.no_grad()
    def apply_gradients(self, config):
        """Adam's step from the gradients in ``.grad``, keeping atoms at unit norm.

        The decoder gradient's radial part is dropped, Adam steps, and the
        atoms are renormalised (the small drift that remains). On a GPU
        every parameter takes one fused pass
        (:func:`sparse_dict._torch.fused.adam_rows_`: the two weight
        matrices row by row, the vectors element by element), which also
        saves torch's optimiser its host time per step; elsewhere, or with
        ``config.fused_update=False``, all of it is torch's operations.
        """
        model = self.model
        if not self._uses_fused_update(config):
            self._flush_fused_steps()
            model.grads_to_float32_()
            model.operands_stale_()
            W, g = model.W_dec, model.W_dec.grad
            g.addcmul_((g * W).sum(dim=1, keepdim=True), W, value=-1.0)
            self.optimizer.step()
            model.normalize_atoms_()
            return
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        # The next step's copies of the weights are written in the same pass
        # (see SparseAutoencoder.operand_views).
        views = model.operand_views() if self._one_process else {}
        low_grads = dict(model.low_grads)
        model.low_grads.clear()
        written = []
        for name, p in model.named_parameters():
            grad = low_grads.get(name, p.grad)
            if grad is None:
                continue  # as torch's Adam: no gradient, no step
            state = self.optimizer.state[p]
            if not state:
                # The state torch's fused Adam would make, so that either
                # path can take over.
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = self._fused_steps
            if id(p) not in steps:
                steps[id(p)] = [p, int(state["step"])]  # one read per training call
            steps[id(p)][1] += 1
            is_atoms = p is model.W_dec
            if grad.dim() == 1 or grad.stride(-1) != 1:
                # A vector as rows of one value; a safeguard for other layouts.
                grad = grad.contiguous()
            low = views.get(name)
            norms = views.get("W_dec_norms") if is_atoms else None
            fused.adam_rows_(_rows(p), _rows(grad), _rows(state["exp_avg"]),
                             _rows(state["exp_avg_sq"]), lr=group["lr"], beta1=beta1,
                             beta2=beta2, eps=group["eps"], step=steps[id(p)][1],
                             project=is_atoms, unit=is_atoms,
                             low=None if low is None else _rows(low), norms=norms)
            if low is not None:
                written.append(name)
            if norms is not None:
                written.append("W_dec_norms")
        # Only the views this update wrote (a weight without a gradient
        # keeps its old copy, which the next step must not read as new).
        model.operands_written_(written)

    def _uses_fused_update(self, config):
        """Whether :meth:`apply_gradients` takes the one-pass update."""
        use_fused = config.fused_update
        if use_fused == "auto":
            # Only on a GPU: Triton's interpreter would also run it on a CPU,
            # a thousand times slower.
            use_fused = self.device.type == "cuda" and fused.available(self.device)
        return bool(use_fused)

    def _flush_fused_steps(self):
        """Write the fused update's step counts into the optimiser's state.

        They are counted on the host while training, so that no step
        launches a kernel to count; anything that reads, replaces or steps
        the optimiser's state another way calls this first. The counts are
        then read again from the state when the fused update next runs.
        """
        for p, count in self._fused_steps.values():
            state = self.optimizer.state.get(p)
            if state and "step" in state:
                state["step"].fill_(float(count))
        self._fused_steps = {}

    def _local_step(self, x, coef, autocast, dead, config):
        """The loss and gradients of the (scaled) rows ``x``."""
        return self.model.loss_and_gradients(
            x, coef, autocast, dead=dead, auxk_coef=self._auxk_weight(config), k_aux=config.k_aux,
            sparse_step=config.sparse_step, kernels=self._step_kernels,
            residual_power=self._residual_power,
            low_grads=self._one_process and self._uses_fused_update(config),
        )

    def _auxk_weight(self, config):
        """AuxK's coefficient in the loss's units.

        The AuxK term is relative to the residual's power (as OpenAI
        normalises it) and the reconstruction term is in the scaled inputs'
        units, where reconstructing every row by the mean leaves
        ``self.variance``; OpenAI divides the latter by that variance.
        Multiplying the coefficient by it keeps ``auxk_coef`` on the paper's
        scale (1/32) whatever the data.
        """
        variance = self.variance if self.variance else float(self.model.n_features)
        return config.auxk_coef * variance

    def _replica_step(self, x, n_rows, coef, autocast, dead, config, params, replicas,
                      error=None):
        """This rank's share of one step, summed with the other ranks'.

        Every term of the loss and its gradients is a mean over the batch's
        rows, so each rank's mean over its share, weighted by the share's
        fraction of the batch and summed over ranks, is the whole batch's.
        The firing counts are summed as they are. ``error``: this rank
        could not read its share of the batch (every rank then raises).
        """
        model = self.model
        stats = torch.zeros(len(STAT_NAMES), device=self.device)
        fired = torch.zeros(model.n_components, device=self.device)
        try:
            if error is not None:
                x = torch.zeros((0, model.n_features), device=self.device)
            elif x is not None:
                stats, fired = self._local_step(x, coef, autocast, dead, config)
                weight = x.shape[0] / n_rows
                stats = stats * weight
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(weight)
            else:
                # A last batch of fewer rows than ranks leaves some ranks none.
                x = torch.zeros((0, model.n_features), device=self.device)
                for p in params:
                    p.grad = torch.zeros_like(p)
        except BaseException as exc:  # an interruption must stop the others too
            error = exc
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        replicas.sum_(grads + [stats, fired], error, f"taking step {self.step}")
        for p, g in zip(params, grads):
            p.grad = g
        return x, stats, fired

    @torch.no_grad()
    def _resample(self, pool, window, replicas=None):
        """Restart dead features on inputs the model reconstructs badly.

        As in Anthropic's "Towards Monosemanticity": inputs are drawn with
        probability proportional to their squared reconstruction loss; a dead
        feature's atom becomes the direction of its input (relative to the
        decoder bias), its encoder row the same direction at a fifth of the
        live features' mean encoder norm, its bias zero, and its optimiser
        moments are cleared.

        With ``replicas``, the ranks first gather the pool (each holds its
        share of the latest batches) in the order one process would hold it,
        so every rank draws from the same inputs with the same generator;
        rank 0's result is then broadcast, the one decision all ranks keep.
        """
        dead = torch.nonzero(self.steps_since_fired >= window).flatten()
        if dead.numel() == 0 or not pool:
            return
        model = self.model
        if replicas is None:
            inputs = torch.cat([x for x, _ in pool])
        else:
            inputs = self._gather_pool(pool, replicas)
        x_hat, _ = model(inputs)
        loss = (inputs - x_hat).pow(2).sum(dim=1).double().cpu()
        weights = loss.pow(2)
        if not torch.isfinite(weights).all():
            weights = torch.ones_like(weights)
        # An input at the decoder bias has no direction to give an atom, and
        # one reconstructed exactly nothing left to explain: on rows all the
        # same, every feature restarted as a zero atom. Without any other
        # input, no feature restarts at this check.
        offsets = (inputs - model.b_dec).norm(dim=1).double().cpu()
        weights = torch.where(offsets > 0, weights, torch.zeros_like(weights))
        if not weights.sum() > 0:
            return
        # One input for each restarted feature: with fewer inputs than dead
        # features (a partial_fit of a few rows) the rest wait for the next
        # check, instead of restarting as copies of one direction.
        dead = dead[: int((weights > 0).sum())]
        n_dead = dead.numel()
        chosen = torch.multinomial(
            weights, n_dead, replacement=False, generator=self._resample_generator,
        ).to(inputs.device)
        directions = inputs[chosen] - model.b_dec
        distances = directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        directions /= distances
        alive = torch.ones(model.n_components, dtype=torch.bool, device=dead.device)
        alive[dead] = False
        enc_norm = model.W_enc[alive].norm(dim=1).mean() if alive.any() else 1.0
        enc_norm = enc_norm * model.activation.restart_encoder_share
        model.operands_stale_()
        model.W_dec[dead] = directions
        model.W_enc[dead] = directions * enc_norm
        model.b_enc[dead] = 0.0
        # The mechanism's own state of those features (a JumpReLU threshold),
        # given each one's new pre-activation on the input it restarts on.
        own = tuple(model.activation.resample_(model, dead, enc_norm * distances.flatten()))
        if replicas is not None:
            replicas.broadcast_([model.W_dec, model.W_enc, model.b_enc, *own],
                                "resampling dead features")
        for param in (model.W_dec, model.W_enc, model.b_enc, *own):
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0.0
        self.steps_since_fired[dead] = 0
        self.n_resampled += n_dead

    @staticmethod
    def _gather_pool(pool, replicas):
        """The pool's batches whole, from every rank's shares, in batch order."""
        shares = [np.diff(replicas.bounds(n)) for _, n in pool]
        local = torch.cat([x for x, _ in pool])
        sizes = [int(sum(s[r] for s in shares)) for r in range(replicas.world_size)]
        per_rank = [part.split([int(s[r]) for s in shares])
                    for r, part in enumerate(replicas.gather_rows(local, sizes))]
        return torch.cat([per_rank[r][j] for j in range(len(pool))
                          for r in range(replicas.world_size)])

    # ------------------------------------------------------------ statistics
    def _show_figures(self, progress, stats, config):
        """The progress bar's loss, L0 and count of dead features, from a step's ``stats``."""
        window = min(self.step, config.resample_interval)
        dead = int((self.steps_since_fired >= window).sum())
        progress.set_postfix(loss=f"{stats[0]:.4g}", l0=f"{stats[3]:.1f}", dead=dead)

    def pass_info(self, epoch, config):
        """A summary of the last pass, given to callbacks."""
        last = self.history[-1] if len(self.history) else np.full(len(STAT_NAMES), np.nan)
        return {
            "epoch": epoch,
            "step": self.step,
            **{name: float(value) for name, value in zip(STAT_NAMES, last)},
            "dead": int((self.pass_fired == 0).sum()),
            "learning_rate": config.learning_rate * config.lr_factor(max(self.step - 1, 0)),
        }

    def _check_finite_late(self, stats):
        """Raise for the statistics checked 100 steps ago if they were not finite; check ``stats``.

        Inside a long pass, every 100 steps, so that a divergence is found
        before the pass ends. The check's flag is copied behind the step
        (:class:`~sparse_dict._torch.pipeline.PinnedRead`) and read at the next check, by when it has long
        landed: reading it at once made the host wait for every queued step.
        The pass's own read (:meth:`_read_pass`) checks every step's figures.
        """
        earlier = self._finite_check
        self._finite_check = (PinnedRead([torch.isfinite(stats).all()]), self.step - 1)
        if earlier is not None and not earlier[0].arrays()[0]:
            self._raise_divergence(earlier[1])

    def _read_pass(self, end, progress=None, config=None):
        """Take a pass's figures (a :class:`_PassEnd`) into the history, once.

        Raises :class:`DivergenceError` for a NaN or infinite statistic or
        parameter, at the step it was seen.
        """
        if end.read:
            return
        end.read = True
        fired, finite, stacked = end.values()
        if stacked is not None:
            if not np.isfinite(stacked).all():
                bad = int(np.argmin(np.isfinite(stacked).all(axis=1)))
                self._raise_divergence(end.first_step + bad)
            self._history.extend(stacked)
            self._history_rows.extend(end.rows_list)
            if progress is not None:
                # Also for a pass shorter than the 20 steps between updates
                # (a partial_fit of a few batches showed no figures at all).
                self._show_figures(progress, stacked[-1].tolist(), config)
        self.pass_fired = fired
        self.pass_rows = end.rows_seen
        # NaN parameters are a divergence (and, between ranks, NaN != NaN).
        for name, ok in zip(end.parameter_names, finite):
            if not ok:
                self._raise_divergence(end.last_step, what=f"parameter {name}")

    def _raise_divergence(self, step, what="loss"):
        # A trainer made from saved parameters has no record of its data.
        dominant = getattr(self, "dominant_rows", None)
        if dominant is not None and dominant.share > _OVERFLOWING_SHARE:
            # Rows of entries around 1e15 beside rows of order one: their
            # squares overflow float32 whatever the learning rate.
            raise DivergenceError(
                f"Training diverged: the {what} became NaN or infinite at step {step}. "
                f"The largest {dominant.n_rows:,} of {dominant.n_sampled:,} rows sampled "
                f"from X hold all but {1 - dominant.share:.2g} of its spread: rows that far "
                "beyond the others overflow the arithmetic whatever the learning rate. Remove "
                "or clip them (they are likely corrupted).")
        raise DivergenceError(
            f"Training diverged: the {what} became NaN or infinite at step {step}. "
            "Lower learning_rate (for example by a factor of 10), or lower the "
            "sparsity coefficient (l1_coef or l0_coef)."
        )

    # ---------------------------------------------------------------- export
    def prepare_export(self, dtype=np.float32):
        """Start making the host arrays that :meth:`export` will fill with the weight matrices.

        Called as training starts: a background thread touches the new
        arrays' pages (:class:`~sparse_dict._torch.pipeline.TouchedArrays`)
        while the steps run, so that the export only copies into them. On a
        GPU the two matrices' copy into new memory was the largest fixed cost
        of a short fit (19 ms of a 50-step bf16 fit at d=768, N=24576 on an
        H200, most of it page faults). Matrices under 16 MB are left alone
        (their faults cost little, and a thread more than it saves).

        On a GPU, arrays of the weights' own dtype (float32) are also
        page-locked once touched (:class:`~sparse_dict._torch.pipeline.CudaRegistrar`),
        so that the GPU copies straight into them: 1.5 ms for such a matrix
        instead of 4.5 through a pinned buffer.

        Parameters
        ----------
        dtype : numpy float dtype or None
            The dtype :meth:`export` will be asked for; another gets new
            arrays. None drops the arrays made before (a training that failed).
        """
        self._drop_export_arrays()
        self._export_started = None
        if dtype is None:
            return
        n_bytes = self.model.n_components * self.model.n_features * np.dtype(dtype).itemsize
        if n_bytes >= _TOUCHED_EXPORT_BYTES:
            shape = (self.model.n_components, self.model.n_features)
            self._export_into = TouchedArrays({"components": shape, "encoder_weights": shape},
                                              dtype, _export_registrar(self.device, dtype))

    def _drop_export_arrays(self):
        """Let go of :meth:`prepare_export`'s arrays, unregistering what it registered."""
        prepared, self._export_into = self._export_into, None
        if prepared is not None:
            prepared.release()

    def start_export(self, dtype=np.float32):
        """Start the weight matrices' copy to the host; :meth:`export` takes it up.

        On a GPU their copy (through pinned buffers, into the arrays
        :meth:`prepare_export` made for this ``dtype``) then runs on a stream
        and a host thread of its own (:class:`~sparse_dict._torch.pipeline.HostCopy`)
        while the caller does what must come before the export and leaves the
        weights as they are: a fit's calibration, which sets the activation's
        inference state only.
        """
        dtype = np.dtype(dtype)
        into, registered, registrar = None, (), None
        prepared, self._export_into = self._export_into, None
        if prepared is not None and prepared.dtype == dtype:
            # The copy unregisters what it takes.
            (into, registered), registrar = prepared.take(), prepared.registrar
        elif prepared is not None:
            prepared.release()
        weights = {"components": self.model.W_dec.detach(),
                   "encoder_weights": self.model.W_enc.detach()}
        self._export_started = (dtype, HostCopy(weights, into, ahead=True, registered=registered,
                                                registrar=registrar))

    def export(self, dtype=np.float32):
        """The fitted tensors in the caller's units, as numpy arrays of ``dtype``.

        Training sees ``x * scale``. Codes in the caller's units are the
        trained codes divided by ``scale`` (every activation commutes with a
        positive factor once its thresholds are scaled alike), so the biases
        and thresholds are divided by ``scale`` and the weights are
        unchanged. The weight matrices come from :meth:`start_export`'s copy
        when it was started for this ``dtype`` (else they are copied now,
        into the arrays :meth:`prepare_export` made for it).
        """
        started, self._export_started = self._export_started, None
        if started is None or started[0] != np.dtype(dtype):
            # (A copy started for another dtype gives its buffers back itself.)
            self.start_export(dtype)
            started, self._export_started = self._export_started, None
        arrays = started[1].result()
        tensors, rest = self.model.fitted_tensors(), {}
        for name, tensor in tensors.items():
            if name in arrays:
                continue
            # Scaled where it lives (the scaled ones are vectors).
            tensor = tensor.float()
            if name not in UNSCALED_TENSORS:
                tensor = tensor / np.float32(self.scale)
            rest[name] = tensor
        arrays.update(to_host(rest))
        return {name: arrays[name].astype(dtype, copy=False) for name in tensors}

    # ------------------------------------------------ snapshots and pickling
    def _snapshot(self):
        """A copy of the whole state, to put back if training fails.

        On a GPU with room for it the copy stays on the device (a device
        copy of a GPT-2-sized dictionary and its Adam state takes about a
        millisecond, a copy to host memory a quarter of a second).
        """
        on_device = False
        if self.device.type == "cuda":
            n_features, n_components = self.model.n_features, self.model.n_components
            free = torch.cuda.mem_get_info(self.device)[0]
            on_device = free > 2 * training_bytes(n_features, n_components)
        return self._state(on_device)

    def _restore(self, state):
        device, verdict = self.device, self._verdict
        self._drop_export_arrays()
        self.__setstate__(state)
        self.to(device)
        self._verdict = verdict  # a pending check of the data outlives the rollback

    def __getstate__(self):
        # Tensors go to the CPU, so a trainer pickled on a GPU machine loads
        # on one without.
        return self._state(on_device=False)

    def _state(self, on_device):
        self._flush_fused_steps()
        if on_device:
            cpu = lambda t: t.detach().clone()  # noqa: E731
        else:
            cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        optim_state = self.optimizer.state_dict()
        optim_state = {
            "state": {
                k: {kk: cpu(vv) if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                for k, v in optim_state["state"].items()
            },
            "param_groups": [dict(g) for g in optim_state["param_groups"]],
        }
        return {
            "seed": self.seed,
            "activation": self.model.activation,
            "n_features": self.model.n_features,
            "n_components": self.model.n_components,
            "model_state": {k: cpu(v) for k, v in self.model.state_dict().items()},
            "optim_state": optim_state,
            "resample_generator": self._resample_generator.get_state(),
            "scale": self.scale,
            "variance": self.variance,
            "seen": self.seen,
            "run_start": self.run_start,
            "step": self.step,
            "steps_since_fired": cpu(self.steps_since_fired),
            "n_resampled": self.n_resampled,
            # Views, not copies: their rows are never written again (_Grown),
            # and copying them cost every partial_fit call (two snapshots a
            # call) time in proportion to the whole stream.
            "history": self.history,
            "history_rows": self.history_rows,
            "pass_fired": self.pass_fired.copy(),
            "pass_rows": self.pass_rows,
            # Without these a resumed stream (a pickle, a rolled-back call)
            # checked for dead features at other steps, and its first AuxK
            # step was scaled by its own error, not the last step's.
            "resample_checked": self.resample_checked,
            "residual_power": (None if self._residual_power is None
                               else cpu(self._residual_power)),
        }

    def __setstate__(self, state):
        self.device = torch.device("cpu")
        self._export_into = self._export_started = self._verdict = self._carried = None
        self.seed = state["seed"]
        self.model = SparseAutoencoder(
            state["n_features"], state["n_components"], state["activation"], initialize=False
        )
        self.model.load_state_dict(state["model_state"])
        self.optimizer = self._make_optimizer()
        if state["optim_state"] is not None:  # None: the caller loads Adam's state itself
            self.optimizer.load_state_dict(state["optim_state"])
        self._resample_generator = torch.Generator()
        self._resample_generator.set_state(state["resample_generator"])
        self.scale = state["scale"]
        self.variance = state.get("variance")
        self.seen = state.get("seen")
        self.stopped_by_callback = False
        self._residual_power = state.get("residual_power")
        self._one_process = True
        self.run_start = state.get("run_start", 0)
        self.step = state["step"]
        self.steps_since_fired = state["steps_since_fired"].clone()
        self.n_resampled = state["n_resampled"]
        self.history = state["history"]  # copied (the setter)
        # Pickles from before the rows were kept: every step counts alike.
        self.history_rows = np.asarray(state.get("history_rows", np.ones(len(self.history))),
                                       dtype=np.float64)
        self.pass_fired = state["pass_fired"].copy()
        self.pass_rows = state["pass_rows"]
        # None in a pickle older than the record: train() then takes the
        # multiples of the interval at which such a trainer checked.
        self.resample_checked = state.get("resample_checked")


def _forgotten(counts):
    """Faded firing counts, those under half a firing set to 0.

    A feature that stopped firing kept a faded count forever (2e-12 after
    400 calls), so a stream's ``feature_frequencies_`` never showed it dead.
    A feature that fired in the latest call has a count of 1 or more.
    """
    return np.where(counts < 0.5, 0.0, counts)


# A run is unconverged when, before the final decay, its loss fell by more
# than this fraction over the last fifth of the run, or its L0 moved by more
# than _L0_DRIFT (penalised activations only). Loss curves fall like power
# laws, so a drop over a fixed fraction of the run is the same for any run
# length until the curve flattens. Measured on 40,000 rows of 128-d data
# made of 512 atoms (benchmarks/defaults.py): ReLU's L0 drift was 0.093,
# 0.144 and 0.029 (EV 0.47, 0.74, 0.78). TopK's drop is why no threshold
# tells its quarter-budget fits (750 steps) from its default ones (3,000):
# on the four generators of benchmarks/defaults.py it was 0.051 to 0.075 at
# 750 steps (MMCS 0.87 to 0.97), 0.024 to 0.051 at 3,000 (0.93 to 0.997) and
# -0.001 to 0.013 at 7,500; a threshold low enough for the first would warn
# the clustered mixtures' default fit (0.051; EV 0.868, 0.872 at 7,500).
_LOSS_DROP = 0.08
_L0_DRIFT = 0.08
_L0_MOVE_MIN = 0.1
# How far above its lowest earlier level (a mean over a tenth of the run)
# the loss may be at the start of the last fifth before it counts as risen.
_LOSS_RISE = 3.0
# ... and only to a loss above this share of the mean's error.
_RISE_FLOOR = 0.01
# A loss still falling by less than this share of the mean's error over
# the last fifth (the rest of the fall would change the explained variance
# by about as little) is not called unconverged. At a thousandth, default
# TopK and BatchTopK fits of rows of 8 and 24 columns (k=32, as wide as the
# rows), explaining 0.988 to 0.995 of held-out rows, were told to train
# longer (63 such fits of 91 with held-out EV of 0.98 or more, on data no
# test uses); at half a hundredth they are not, while fits at a learning
# rate too small (TopK at 1e-5: EV 0.43; at 3e-4 on ReLU-MLP rows: 0.91)
# still are.
_DROP_FLOOR = 5e-3
# A loss whose fall over the last fifth before the decay is this share or
# more of its fall since the run's first tenth is still falling as it was at
# the start: steps too small, which the drop relative to the loss's level
# misses where that level is high. TopK at learning_rate 1e-5 and 1e-4 gave
# 0.20 and 0.07 to 0.12 (EV 0.28 and 0.57 to 0.77, 0.90 to 0.98 at the
# default 3e-3), ReLU at 1e-4 0.15 to 0.17; on 7 data sets (superposition,
# heavy-tailed, dense, Student t, the built-in model's activations), fits at
# the default rate gave 0.013 at most where no other rule called them
# unconverged, and up to 0.04 where one did; a 300-step TopK fit at the
# default rate (16-d rows, explaining 0.74), 0.050.
_STEADY_SHARE = 0.065
# Fewer steps than this are too few to judge the curve, and too few to
# converge: always unconverged.
_MIN_ASSESSED_STEPS = 50
_MIN_TAIL_STEPS = 10
# ... and of at least this many rows, where steps are of a few rows each:
# one row's error can be ten times another's (partial_fit on a stream of
# one row a call read as diverged where the model explained 0.3-0.5 of the
# data and was improving).
_MIN_TAIL_ROWS = 256
# Reconstruction error at the end above this multiple of the larger of the
# first step's and the data's variance: diverged.
_DIVERGED = 2.0
# Errors below this share of the rows' mean squared norm are float32's
# rounding of them (its relative precision is 6e-8, squared 4e-15, and a
# product sums it over the width), not a fit: rows all alike rose from
# 8.5e-15 to 8.9e-11 in a fit of 200 steps, scaled units, where the mean
# squared norm is 32, and read as diverged.
_ROUNDING = 1e-10
# Before that many steps, only a rise of this factor is judged (a blow-up,
# not the noise of a few small batches).
_EXPLODED = 1e3
# A lowest error above this share of the first ten steps' error: training
# barely moved.
_BARELY_MOVED = 0.9
# ... while the error is still above this share of the mean's: the fit is
# poor because it barely trained (a start at good atoms barely moves too,
# from an error far below this).
_STILL_LARGE = 0.3


class _RecordFigures:
    """Figures of a trainer's whole record of steps, extended as steps are appended.

    :func:`assess_training` judges a run against the whole record: the
    median rows a step, running sums of the error weighed by rows (the
    means over every window of steps), and whether every error is finite.
    Recomputed from the record at every call, they made a ``partial_fit``
    stream's calls cost in proportion to every step before (11 ms of a
    77 ms call after 1.1 million steps). Each is kept here and extended by
    the steps appended since the last :meth:`update`; every figure is the
    one the whole record gives, bit for bit (a cumulative sum is sequential,
    a median and an extreme exact).

    The record must only grow between updates (:class:`_Grown`); a trainer
    whose record is replaced starts new figures.
    """

    def __init__(self):
        self.n = 0
        # The steps' rows as assess_training weighs them (at least 1e-12).
        self.rows = _Grown(np.zeros(0))
        # Cumulative sums of error times rows, and of rows, from a leading
        # 0: a window's mean is a difference of two of each.
        self.sums = _Grown(np.zeros(1))
        self.weights = _Grown(np.zeros(1))
        # The distinct rows a step, sorted, and how many steps had each
        # (a median without sorting the record); NaN rows apart.
        self.values = np.zeros(0)
        self.counts = np.zeros(0, dtype=np.int64)
        self.nan_rows = 0
        self.all_finite = True
        # Per window width: [windows covered, least mean, largest mean,
        # whether any mean is finite], NaN means ignored.
        self._extremes = {}

    def update(self, history, history_rows):
        """Take in the steps of ``history`` (and their rows) appended since the last call."""
        start, n = self.n, len(history)
        if n == start:
            return
        mse = history[start:, 1]
        rows = np.maximum(history_rows[start:], 1e-12)
        self.rows.extend(rows)
        self.sums.extend(self._summed(self.sums, mse * rows, start))
        self.weights.extend(self._summed(self.weights, rows, start))
        nan = np.isnan(rows)
        self.nan_rows += int(nan.sum())
        values, counts = np.unique(rows[~nan], return_counts=True)
        values, where = np.unique(np.concatenate([self.values, values]), return_inverse=True)
        self.counts = np.bincount(where, weights=np.concatenate([self.counts, counts]),
                                  minlength=len(values)).astype(np.int64)
        self.values = values
        self.all_finite = self.all_finite and bool(np.isfinite(mse).all())
        self.n = n

    @staticmethod
    def _summed(sums, values, start):
        """The cumulative sums of ``values`` continued from ``sums``' last, as np.cumsum's."""
        if start == 0:
            return np.cumsum(values)
        # np.cumsum over the whole record adds one step at a time: from the
        # last sum on, the same additions.
        return np.cumsum(np.concatenate([sums.view()[-1:], values]))[1:]

    def median_rows(self):
        """``np.median`` of the steps' rows (as weighed), from the counts of each."""
        if self.nan_rows:
            return float("nan")
        total = int(self.counts.sum())
        ends = np.cumsum(self.counts)
        # The middle of the sorted rows: one step, or the mean of two.
        middle = [total // 2] if total % 2 else [total // 2 - 1, total // 2]
        return float(np.mean(self.values[np.searchsorted(ends, middle, side="right")]))

    def window_means(self, window, first=0, stop=None):
        """The mean error per row over each ``window`` steps, of the windows ``first:stop``."""
        sums, weights = self.sums.view(), self.weights.view()
        stop = self.n - window + 1 if stop is None else stop
        return ((sums[first + window:stop + window] - sums[first:stop])
                / (weights[first + window:stop + window] - weights[first:stop]))

    def extremes(self, window):
        """The least and largest windows' means, NaN ignored, and whether any is finite.

        As ``np.nanmin``, ``np.nanmax`` and ``np.isfinite(...).any()`` of
        every window's mean (all NaN: both NaN), kept per width and extended
        by the windows the record has gained since.
        """
        count = self.n - window + 1
        if count <= 1:
            # A window of the whole record (a short one): nothing to keep.
            means = self.window_means(window)
            return (float(np.fmin.reduce(means)), float(np.fmax.reduce(means)),
                    bool(np.isfinite(means).any()))
        kept = self._extremes.get(window)
        if kept is None:
            kept = [0, np.nan, np.nan, False]
            if len(self._extremes) >= 8:
                # The width follows the median rows a step, which seldom moves.
                self._extremes.pop(next(iter(self._extremes)))
            self._extremes[window] = kept
        if kept[0] < count:
            means = self.window_means(window, kept[0], count)
            # fmin and fmax ignore NaN, as nanmin and nanmax, without warning.
            kept[1] = float(np.fmin(kept[1], np.fmin.reduce(means)))
            kept[2] = float(np.fmax(kept[2], np.fmax.reduce(means)))
            kept[3] = kept[3] or bool(np.isfinite(means).any())
            kept[0] = count
        return kept[1], kept[2], kept[3]


# A last window within this factor of the lowest window's error is still falling.
_STILL_FALLING = 1.02


def _poor_fit_message(trainer, config, end, mean_error, start, lowest, l0, last=None):
    """What to say of a fit that ends above the mean's error without diverging.

    The dictionary explains nothing. Steps too large do this without a
    blow-up (features knocked dead or into noise), and so does a penalty
    that silences the features before the decoder bias has learnt the mean;
    an error that never fell from its start means steps too small or too few,
    and one that fell and was at its lowest in the ``last`` window (its mean
    error), too few.
    """
    penalty = trainer.model.activation.penalty_name
    lr = f"learning_rate, now {config.learning_rate:g}"
    # An error that ended above its start rose: steps too large, however
    # little it fell first (at learning_rate 1 on a GPU it never fell).
    if lowest > _BARELY_MOVED * start and end <= start:
        causes = (f"steps too small or too few: the error barely fell from its start "
                  f"({start:.4g}); raise {lr}, or train for more steps")
    elif last is not None and last <= _STILL_FALLING * lowest:
        # Fallen and still at its lowest at the end: no sign of steps too
        # large. Rows with an offset 25 times their spread, the decoder bias
        # started at zero, fell from 151 to 61 and were told to lower the
        # learning rate, which left them worse (a score of -387 for -86).
        causes = (f"too few steps: the error fell from its start ({start:.4g}) and was at "
                  f"its lowest at the end, so train for more steps; where the rows share an "
                  f"offset far larger than their spread, start the decoder bias there "
                  f"(decoder_bias_init='geometric_median', the default)")
    else:
        causes = f"steps too large (lower {lr}), for example by a factor of 10"
        # Only where the features are silent: at an L0 of 31 the message
        # blamed a penalty that silences them.
        if penalty is not None and l0 < 1:
            causes = (f"a sparsity penalty that silences the features (lower {penalty}, now "
                      f"{config.coef:g}; L0 is {l0:.3g} at the end), or " + causes)
    return (f"The fit explains none of the data: its reconstruction error at the end "
            f"({end:.4g}, scaled units) is above that of reconstructing every row by the "
            f"mean ({mean_error:.4g}). Its likely causes: {causes}.")


def _figures_of(trainer):
    """``trainer``'s :class:`_RecordFigures`, up to date (made anew for a plain record)."""
    kept = getattr(trainer, "record_figures", None)
    if kept is not None:
        return kept()
    figures = _RecordFigures()
    figures.update(trainer.history, trainer.history_rows)
    return figures


def assess_training(trainer, config, check_convergence=True, data_variance=None,
                    final_error=None, final_rows=None):
    """Judge the last training run from its step history.

    Parameters
    ----------
    trainer : Trainer
    config : TrainConfig
        The run's settings (its length and final decay).
    check_convergence : bool
        Also look for an unconverged run (``fit``; ``partial_fit`` cannot
        know whether more calls will follow).
    data_variance : float or None
        The error of reconstructing the rows just trained on by their mean,
        in scaled units (from a sample of them): where a ``partial_fit``
        call meets data of a larger spread than the rows before it, an
        error that rises with it is not a divergence. Judged beside that of
        every row trained on (:attr:`Trainer.seen`).
    final_error : float or None
        The final model's reconstruction error on such a sample, scaled
        units; judged as the end of the run beside the last steps' errors
        (each recorded before its step's update, so blind to the last
        update).
    final_rows : int or None
        The rows of that sample: its error and the last steps' are
        averaged, each weighed by its rows (None: the final error alone).
        A ``partial_fit`` call of one row has a sample of that row only,
        whose error can be several times the model's on the data.

    Returns
    -------
    problems : list of (kind, message)
        ``kind`` is ``"diverged"``, ``"poor"`` (no better than the rows'
        mean, yet not diverged), ``"rose"`` (better than the mean, but the
        error ended above where it started: a sentence for another warning
        to add, as steps too large do this) or ``"unconverged"``.
    """
    history = trainer.history[trainer.run_start:]
    n = len(history)
    if n == 0:
        return []
    figures = _figures_of(trainer)
    if _alike(trainer.seen):
        if figures.all_finite:
            return []
        return [("diverged", "Training diverged: the reconstruction error became infinite "
                             "or NaN. Lower learning_rate (now "
                             f"{config.learning_rate:g}), for example by a factor of 10.")]
    loss, l0 = history[:, 0], history[:, 3]
    problems = []
    # Divergence is judged on the trainer's whole history: a partial_fit
    # call is often too short to judge alone, and damage spread over calls
    # shows only against where training started. The end is the mean error
    # per row of this run's last twentieth, and of at least ten steps and
    # about _MIN_TAIL_ROWS rows (from earlier calls where this one has
    # fewer), each step weighed by its rows.
    # A rise is judged only on histories long enough to judge (a NaN or an
    # infinity always counts): one step's error on a batch of a few rows, or
    # of rows of very few features, can be several times the mean
    # (hypothesis found fits of 4 and 6 steps on one feature, with last
    # batches of 1 and 3 rows, that read as divergences).
    # The whole record's figures come from `figures`, kept from call to call:
    # only the windows read here are sliced from the record.
    mse, rows = trainer.history[:, 1], figures.rows.view()
    # Windows of at least ten steps and of about _MIN_TAIL_ROWS rows.
    full_window = max(_MIN_TAIL_STEPS, math.ceil(_MIN_TAIL_ROWS / figures.median_rows()))
    window = min(len(mse), full_window)
    # Where the start and the end are judged, they must be two windows
    # apart; with fewer steps the end's window holds the first steps too.
    # partial_fit on a stream of one row a call otherwise read the first
    # 50 steps (52 rows seen) as a fit that explains nothing, then warned
    # at each call until the window moved past them: 5 random_states in 8
    # (50 to 77 calls each), a GPU's too, where the model went on to
    # explain half of the data.
    judged = len(mse) >= max(_MIN_ASSESSED_STEPS, 2 * full_window)
    tail = max(n // 20, window)
    end = float(np.average(mse[-tail:], weights=rows[-tail:]))
    if final_error is not None and not np.isnan(final_error):
        # An error of several times the rest's from a sample of a row or
        # two is that row's distance, not a divergence: 511 of 1,498 calls
        # of partial_fit on one row each read as one where the model
        # explained a rising 0.3-0.5 of the data.
        end = float(final_error) if final_rows is None else float(np.average(
            np.append(mse[-tail:], final_error), weights=np.append(rows[-tail:], final_rows)))
    # A rise from the first step of training, or from the mean's error if
    # that is larger. Not from the lowest error reached: a penalty that
    # silences the features while the decoder bias is still far from the
    # mean (decoder_bias_init="zeros") raises the error far above its
    # lowest, up to the first step's (codes of zero, the bias as it began).
    seen = trainer.seen
    mean_error = max((trainer.variance or 0.0) if seen is None else seen[2], data_variance or 0.0)
    # float32's rounding of rows of this mean squared norm (scaled units).
    rounding = 0.0 if seen is None else _ROUNDING * (seen[2] + float(seen[1] @ seen[1]))
    base = max(float(mse[0]), mean_error)
    # Before two full windows only a blow-up counts: a stream of one row a
    # call (partial_fit's documented minimum) had seen 52 rows at step 50,
    # errors 3 to 7 times the mean's from a start no batch had yet moved,
    # and raised DivergenceError in 3 to 6 runs of 10, runs that went on to
    # explain 0.45 to 0.77 of held-out rows (a lower learning rate, as the
    # message advised, raised it sooner). Batches of 40 rows or more judge
    # at 50 steps, as before.
    rose = end > max(base * (_DIVERGED if judged else _EXPLODED), rounding)
    # Means over such windows: where the error started, its lowest and its
    # highest (NaN means ignored).
    first = figures.window_means(window, 0, 1)[0]
    lowest, highest, finite = figures.extremes(window)
    if not finite:
        lowest = float("inf")
    # Nor is a fit "poor" before its end window lies past the warm-up of
    # the learning rate and the penalty: a partial_fit stream of 50-row
    # calls was told so at 13 calls in a row inside its 100 warm-up steps,
    # then explained 0.70 of held-out rows (a tenth of the learning rate,
    # as the message advised, left it at -0.22).
    warmed = len(trainer.history) >= config.warmup_steps + window  # steps so far
    if np.isfinite(end) and not rose and judged and warmed and (
            mean_error > 0 and end > max(mean_error, rounding)):
        l0_end = float(np.average(trainer.history[-tail:, 3], weights=rows[-tail:]))
        last = figures.window_means(window, len(mse) - window, len(mse) - window + 1)[0]
        problems.append(("poor", _poor_fit_message(
            trainer, config, end, mean_error, start=first, lowest=lowest, l0=l0_end,
            last=float(last))))
    if not np.isfinite(end) or rose:
        problems.append((
            "diverged",
            f"Training diverged: the reconstruction error rose from {mse[0]:.4g} at the "
            f"first step to {end:.4g} at the end (scaled units; reconstructing "
            f"every row by the mean gives {mean_error:.4g}). Lower learning_rate (now "
            f"{config.learning_rate:g}), for example by a factor of 10.",
        ))
        return problems
    if not problems and judged and np.isfinite(end) and end > first:
        problems.append(("rose", f"Its reconstruction error also ended above where it "
                                 f"started ({first:.4g} over the first {window} steps, "
                                 f"{end:.4g} at the end; scaled units)"))
    if not check_convergence:
        return problems
    # Rows a step: the batch, or all the rows where there are fewer.
    batch = int(max(rows[trainer.run_start:].max(), 1))
    more_steps = ("raise max_steps or max_iter; where you set either, leaving both None "
                  "gives the default budget")
    if n < _MIN_ASSESSED_STEPS:
        problems.append((
            "unconverged",
            f"The fit stopped after only {n} steps of {batch} rows, too few for any "
            f"dictionary to converge. Train for more steps ({more_steps}).",
        ))
        return problems
    # Compare the two windows that end where the final decay starts: the
    # decay itself lowers the loss, converged or not.
    stop = n - min(config.decay_steps, n // 2) if config.total_steps is not None else n
    width = max(1, stop // 10)
    if stop < 3 * width + width:
        return problems
    early = slice(stop - 3 * width, stop - 2 * width)
    late = slice(stop - width, stop)
    fall = loss[early].mean() - loss[late].mean()
    drop = fall / max(abs(loss[late].mean()), 1e-12)
    # A fall worth telling: on rows of rank 5 a TopK fit's loss fell 48%,
    # from 0.014 to 0.007 where the mean's error is 64 (held-out EV 1.000).
    # (steady: the share of the run's fall that its last fifth holds.)
    run_fall = loss[:width].mean() - loss[late].mean()
    if fall > max(_DROP_FLOOR * mean_error, rounding):
        # A run that ends above its first tenth fell late only: no share.
        steady = fall / run_fall if run_fall > 0 else 0.0
    else:
        drop = steady = 0.0
    penalised = trainer.model.activation.penalty_name is not None
    moved = abs(l0[early].mean() - l0[late].mean())
    # Relative, and of at least a tenth of a code a row: an L0 near zero
    # (a penalty that silences the features, which a warning of its own
    # names) moves by large factors while nothing changes ("0.0 -> 0.0").
    drift = moved / max(l0[late].mean(), 1e-12) if moved >= _L0_MOVE_MIN else 0.0
    # A loss that rose mid-run and was coming back down is an unstable run,
    # not a slow one: its "drop" measures the recovery, and more steps at
    # the same rate only give it more room to rise again. Measured on rows
    # with one constant column and one of 100 times the others' scale: the
    # loss rose 7-fold, the advice to train longer collapsed the fit (every
    # feature dead), and scaling the columns took the other columns' EV
    # from -26 to 0.67.
    before = loss[: stop - 3 * width]
    blocks = before[: before.size // width * width].reshape(-1, width).mean(axis=1)
    low = float(np.min(blocks)) if blocks.size else float("nan")
    risen = float(loss[early].mean()) / low if low > 0 else float("nan")
    # To a level that matters: on rows of rank 5 a TopK fit's loss went from
    # 0.006 to 0.03, where the mean's error is 64 (a held-out EV of 1.000),
    # and was called unstable in three fits of three. And a run that ended
    # there is no concern: a JumpReLU fit of rows with columns at 100 times
    # the others' scale rose 5-fold, ended explaining 0.993 of held-out rows,
    # and was told to lower learning_rate, which gave 0.861.
    floor = max(_RISE_FLOOR * mean_error, rounding)
    if risen > _LOSS_RISE and float(loss[early].mean()) > floor and end > floor:
        problems.append((
            "unconverged",
            f"The loss rose mid-run to {risen:.0f} times its lowest earlier level and was "
            f"still coming back down over the last fifth of the run before the final decay "
            f"(a fit of {n} steps of {batch} rows): training is unstable on this data, and "
            "the dictionary is probably not converged. If the data's columns differ in "
            "scale by orders of magnitude, scale them first (for example with "
            "sklearn.preprocessing.StandardScaler); otherwise lower learning_rate (now "
            f"{config.learning_rate:g}), for example by a factor of 3.",
        ))
        return problems
    # Flat: never far below its start, nor above it (a rise and a fall back,
    # or a rise to the end, is said otherwise).
    flat = lowest > _BARELY_MOVED * first and highest * _BARELY_MOVED <= first
    if judged and flat and not problems and end > _STILL_LARGE * mean_error:
        # Below the "fall worth telling" of the rules next: a TopK fit at
        # learning_rate 1e-6 went from 10.09 to 10.03 in 3,000 steps (a
        # held-out EV of 0.37, against 0.91 at the default) and was taken for
        # converged, silently, where more movement drew a warning.
        problems.append((
            "unconverged",
            f"The fit stopped after {n} steps of {batch} rows while its reconstruction error "
            f"had barely fallen from its start ({first:.4g} over the first {window} steps, "
            f"at best {lowest:.4g}; reconstructing every row by the mean gives "
            f"{mean_error:.4g}): the dictionary is barely trained. Raise learning_rate (now "
            f"{config.learning_rate:g}) if you lowered it, or train for more steps "
            f"({more_steps}).",
        ))
        return problems
    reasons = []
    if drop > _LOSS_DROP:
        # (Judged against the later level, told as a share of the earlier:
        # "125% lower" would be a fall from 0.0685 to 0.0305.)
        reasons.append(f"the loss was still falling ({loss[early].mean():.4g} -> "
                       f"{loss[late].mean():.4g}, {100 * fall / loss[early].mean():.0f}% lower, "
                       "over the last fifth of the run before the final decay)")
    elif steady > _STEADY_SHARE:
        reasons.append(f"the loss was still falling steadily ({loss[:width].mean():.4g} over "
                       f"the first tenth of the run, {loss[early].mean():.4g} -> "
                       f"{loss[late].mean():.4g} over its last fifth before the final decay, "
                       f"{100 * steady:.0f}% of the fall in a fifth of the run; learning_rate, "
                       f"now {config.learning_rate:g}, may be too small)")
    if penalised and drift > _L0_DRIFT:
        reasons.append(f"L0 was still moving ({l0[early].mean():.1f} -> {l0[late].mean():.1f} "
                       "over the last fifth of the run before the final decay)")
    if reasons:
        problems.append((
            "unconverged",
            f"The fit stopped after {n} steps of {batch} rows while "
            + " and ".join(reasons)
            + ": the dictionary is probably not converged. Train for more steps "
            f"({more_steps}) or use a smaller batch_size for more steps on the same rows.",
        ))
    return problems
