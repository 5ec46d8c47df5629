"""Fewer passes over a GPU's memory per training step: one Triton kernel where torch takes several.

After the matrix products, a step updates its two (n_components, d) weight
matrices. Written as torch operations that is several passes over each:
the decoder gradient's radial part is projected out (two passes), Adam
reads the weight, its gradient and both moments and writes three of them
back, the atoms are renormalised (two passes), and the next step's products
copy each weight to bfloat16 (one more). Each pass over a GPT-2-sized
dictionary's weights moves about 75 MB, so on a GPU these passes cost a
third as much as the step's five matrix products in bfloat16.

:func:`adam_rows_` does all of it in one kernel that reads each row of the
weight, gradient and moments once and writes the weight, the moments and
(optionally) the weight's low-precision copy once. Its arithmetic is
torch's Adam (no weight decay, no AMSGrad), checked against torch's own
optimiser by the tests; the state it keeps is torch's, so a trainer can
move between this path and the plain one at any step.

Between the products, the step's element-wise work has two more:

* :func:`codes_bits_count_` and :func:`mask_by_bits_`: the codes (ReLU's
  in place), the mask of active codes and the firing counts in one pass
  over the (batch, n_components) codes, the mask kept as bits, and the
  gradient's product with that mask in one more;
* :func:`residual_`: the residual, its gradient, the squared error and the
  gradient's column sums in one pass over the (batch, d) batch;
* :func:`penalty_stats_`: the step's statistics and the codes' penalty bias
  from the (n_components,) vectors, in one small kernel.

Before them, for ReLU, the encoder's bias and the ReLU can run in the
product's own epilogue (:func:`product_relu_`, cuBLASLt's), which spares
the codes kernel its write of the codes.

These are used where the first step measures them faster
(:func:`kernel_pays`); they give the plain operations' values (sums up to
their order of addition).

The kernels (:mod:`sparse_dict._torch._kernels`) run only on CUDA devices
with Triton installed (torch's CUDA builds bring it), or in Triton's
interpreter for the tests; elsewhere :func:`available` is False and the
trainer takes the plain path. Setting ``SPARSE_DICT_FUSED=0`` turns them
off.
"""

import contextlib
import functools
import os
import threading
import time
import warnings
from typing import NamedTuple

import torch

__all__ = ["MaskLaunch", "ResidualLaunch", "adam_rows_", "available", "bits_columns", "choices",
           "codes_bits_count_", "codes_kernel_pays", "kernel_pays", "mask_by_bits_",
           "penalty_stats_", "may_run", "penalty_stats_pays", "product_relu_",
           "product_relu_pays", "residual_", "residual_pays", "timings", "unpack_bits"]


def _on(device):
    """The device a Triton kernel is launched on made current for the launch.

    Triton launches on the current CUDA device and its stream, whatever
    device the tensors are on: a fit on ``cuda:1`` with ``cuda:0`` current
    would otherwise run its kernels from the other GPU, unordered with the
    fit's own stream (or be refused there).
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _kernels():
    """The module of Triton kernels, imported on first use (Triton may be absent)."""
    from sparse_dict._torch import _kernels

    return _kernels


def available(device):
    """Whether the fused update runs, and runs right, on ``device``.

    True only on a CUDA GPU (or in Triton's interpreter) where the kernel
    builds and, on a small problem, gives what torch's operations give: a
    probe run once per process and device. A failure warns once and leaves
    the plain path.

    Examples
    --------
    >>> import torch
    >>> available(torch.device("cpu"))
    False
    """
    return may_run(device) and _probe(str(device))


def may_run(device):
    """Whether a Triton kernel may be tried on ``device`` at all.

    On a CUDA GPU, or anywhere in Triton's interpreter (the tests), unless
    ``SPARSE_DICT_FUSED=0`` turns every kernel of this module off. Read when
    a choice is made (the first step of a shape, :func:`kernel_pays`): set
    it before a process's first fit.
    """
    if os.environ.get("SPARSE_DICT_FUSED", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _probe(device):
    try:
        gap = _probe_gap(torch.device(device))
    except Exception as exc:  # noqa: BLE001 - no Triton, or a kernel that cannot build
        warnings.warn(f"The fused weight update cannot run on {device} ({type(exc).__name__}: "
                      f"{exc}); training uses torch's operations instead.", RuntimeWarning,
                      stacklevel=3)
        return False
    if not gap < 1e-4:
        warnings.warn(f"The fused weight update differs from torch's operations on {device} "
                      f"(by {gap:.3g}); training uses torch's operations instead.",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _probe_gap(device):
    """Largest difference between the kernel and torch's arithmetic on a small problem."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(19, 40, generator=g, device=device)
    w /= w.norm(dim=1, keepdim=True)
    grad = torch.randn(19, 40, generator=g, device=device)
    m = torch.randn(19, 40, generator=g, device=device) * 0.1
    v = torch.rand(19, 40, generator=g, device=device) * 0.1
    lr, beta1, beta2, eps, step = 1e-2, 0.9, 0.999, 1e-8, 3
    # torch's Adam, written out (its documented update).
    g_ref = grad - (grad * w).sum(1, keepdim=True) * w
    m_ref = m.lerp(g_ref, 1 - beta1)
    v_ref = v * beta2 + (1 - beta2) * g_ref * g_ref
    denom = v_ref.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
    w_ref = w - lr / (1 - beta1 ** step) * m_ref / denom
    w_ref /= w_ref.norm(dim=1, keepdim=True)
    # With the atoms' norms written too, as training asks (a variant of the
    # kernel of its own, built here rather than at the first step).
    norms = torch.zeros(19, device=device)
    adam_rows_(w, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
               project=True, unit=True, norms=norms)
    pairs = [(w, w_ref), (m, m_ref), (v, v_ref), (norms, w_ref.norm(dim=1))]
    # A vector (a bias), one value per row, with neither projection nor norm.
    b, gb = (torch.randn(23, 1, generator=g, device=device) for _ in range(2))
    mb, vb = torch.zeros(23, 1, device=device), torch.zeros(23, 1, device=device)
    b_ref = b - lr * ((1 - beta1) * gb / (1 - beta1)) / (
        ((1 - beta2) * gb * gb).sqrt() / (1 - beta2) ** 0.5 + eps)
    adam_rows_(b, gb, mb, vb, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=1)
    pairs.append((b, b_ref))
    return max(float((a - c).abs().max()) for a, c in pairs)


def adam_rows_(weight, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, step,
               project=False, unit=False, low=None, norms=None):
    """One Adam step of a (rows, d) float32 weight, in place, one pass over its rows.

    Parameters
    ----------
    weight, exp_avg, exp_avg_sq : torch.Tensor of shape (rows, d), float32, contiguous
        Updated in place.
    grad : torch.Tensor of shape (rows, d)
        Any float dtype; rows may be strided (a slice of a wider buffer),
        columns contiguous. Left unchanged.
    lr, beta1, beta2, eps : float
        Adam's settings (torch's names and meaning).
    step : int
        The step's number, counted from 1 (for the bias corrections).
    project : bool
        First remove each gradient row's component along its weight row
        (the weight rows must have unit norm).
    unit : bool
        Rescale each updated weight row to unit norm.
    low : torch.Tensor of shape (rows, >= d), optional
        Also write the updated weight into ``low[:, :d]`` in its dtype
        (the next step's bfloat16 operand).
    norms : torch.Tensor of shape (rows,), float32, optional
        Also write each updated row's norm (after ``unit``'s rescaling).
    """
    n_rows, d = weight.shape
    if not (weight.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("adam_rows_ needs contiguous weight and moments.")
    if grad.stride(1) != 1 or (low is not None and low.stride(1) != 1):
        raise ValueError("adam_rows_ needs rows with contiguous columns.")
    if norms is not None and (norms.shape != (n_rows,) or norms.dtype != torch.float32
                              or not norms.is_contiguous()):
        raise ValueError("adam_rows_ needs norms as a contiguous float32 vector, one per row.")
    block_d = 1 << max(4, (d - 1).bit_length())
    # About 4096 values per program: rows of a wide input get a program each.
    block_r = max(1, 4096 // block_d)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    grid = (-(-n_rows // block_r),)
    with _on(weight.device):
        _kernels().adam_rows[grid](
            weight, grad, exp_avg, exp_avg_sq, weight if low is None else low,
            weight if norms is None else norms, n_rows, d, weight.stride(0), grad.stride(0),
            0 if low is None else low.stride(0),
            lr / bc1, beta1, beta2, eps, bc2_sqrt,
            PROJECT=bool(project), UNIT=bool(unit), WRITE_LOW=low is not None,
            LOW_BF16=low is not None and low.dtype == torch.bfloat16,
            WRITE_NORMS=norms is not None, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4 if block_d <= 1024 else 8,
        )


# ------------------------------------------------------- the codes' pass


def bits_columns(n_cols):
    """Bytes a row of a packed mask of ``n_cols`` columns takes (eight columns a byte)."""
    return -(-n_cols // 8)


def unpack_bits(bits, n_cols, dtype=torch.float32):
    """A packed mask (:func:`codes_bits_count_`) as a (rows, ``n_cols``) 0/1 tensor.

    Examples
    --------
    >>> import torch
    >>> unpack_bits(torch.tensor([[5, 1]], dtype=torch.uint8), 10).int().tolist()
    [[1, 0, 1, 0, 0, 0, 0, 0, 1, 0]]
    """
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    unpacked = (bits.to(torch.int32)[:, :, None] >> shifts) & 1
    return unpacked.reshape(bits.shape[0], -1)[:, :n_cols].to(dtype)


def _check_bits(values, bits, needs):
    """Refuse a (batch, n) tensor and its packed mask in layouts the kernels cannot read.

    Returns the bytes a row of the mask takes.
    """
    n_rows, n_cols = values.shape
    n_bytes = bits_columns(n_cols)
    if (values.stride(1) != 1 or bits.dtype != torch.uint8 or bits.stride(1) != 1
            or bits.shape[0] != n_rows or bits.shape[1] < n_bytes):
        raise ValueError(f"{needs} with contiguous columns and a uint8 bits tensor of at "
                         f"least ({n_rows}, {n_bytes}).")
    return n_bytes


def _column_blocks(n_cols):
    """Bytes (eight columns each) a program of the two mask kernels takes."""
    return min(32, 1 << max(1, (bits_columns(n_cols) - 1).bit_length()))


# About how many programs the two summing kernels launch (the tests lower
# them, to run many tiles per program on small inputs).
_PROGRAMS = {"codes": 4096, "residual": 512}


class MaskLaunch(NamedTuple):
    """How :func:`codes_bits_count_` and :func:`mask_by_bits_` are launched.

    Attributes
    ----------
    programs : int or None
        About how many programs the codes kernel launches (None: the
        default, ``_PROGRAMS["codes"]``; 0: one tile of rows each, the most).
    rows : int
        Rows a program of the mask kernel takes (a power of two).
    warps : int
        The mask kernel's warps a program.
    """

    programs: int | None = None
    rows: int = 16
    warps: int = 4


# The launches the first step times on a GPU (codes_kernel_pays), every
# codes kernel's with every mask kernel's. Both kernels move the
# (batch, n_components) codes or gradient through memory, and on an H200
# they ran at 2.1 and 3.2 TB/s of its 4.8 (the default launches, 101 and
# 131 us a bf16 step at the reference size): which grid and block reach
# the memory's rate depends on the card (its multiprocessors, how many
# programs each holds), so the card decides, as Triton's autotuning does.
# For the codes kernel, about 4096 programs of 8 tiles (1.5 waves of an
# H200 if 16 fit a multiprocessor), fewer programs of many tiles (one
# wave, no tail), and one tile each (many short waves, more atomic adds);
# for the mask kernel, 16, 32 and 64 rows a program.
_CODES_PROGRAMS = (None, 1024, 0)
_MASK_BLOCKS = ((16, 4), (32, 4), (64, 8))


def _launches():
    """Every :class:`MaskLaunch` the first step may time, the default first."""
    return [MaskLaunch(programs, rows, warps)
            for programs in _CODES_PROGRAMS for rows, warps in _MASK_BLOCKS]


def _tiles(n_rows, block_r, col_blocks, programs):
    """Tiles of ``block_r`` rows per program, and the grid, for about ``programs`` programs.

    Each program takes a power of two of tiles (few distinct compilations)
    down its block of columns, and sums what it accumulates once, at the
    end: the fewer programs, the fewer atomic adds. ``programs=0``: one
    tile each.
    """
    row_tiles = -(-n_rows // block_r)
    if programs == 0:
        return 1, (col_blocks, row_tiles)
    tiles = 1 << max(0, (-(-row_tiles * col_blocks // programs) - 1).bit_length())
    tiles = min(tiles, 1 << max(0, (row_tiles - 1).bit_length()))
    return tiles, (col_blocks, -(-row_tiles // tiles))


def codes_bits_count_(codes, bits, relu=False, launch=None):
    """The codes' mask, packed, and their firing counts in one pass, after an optional ReLU.

    What ``codes.relu_()`` (with ``relu``), ``mask = codes > 0`` and the
    mask's column sums do in three passes over a (batch, n_components)
    array, in one: each value is read once, the codes (with ``relu``)
    written once, and the mask written as bits, eight columns a byte (bit
    ``j`` of byte ``i`` of a row is column ``8 i + j``), a sixteenth of the
    bytes of a bfloat16 mask. :func:`mask_by_bits_` applies it. Exactly the
    plain operations' values for finite codes (0/1 counts below 2**24 are
    exact in float32, whatever the order of their sums).

    Parameters
    ----------
    codes : torch.Tensor of shape (batch, n_components)
        Columns contiguous; float32 or bfloat16. With ``relu``, overwritten
        by ``max(codes, 0)``.
    bits : torch.Tensor of uint8, shape (batch, >= bits_columns(n_components))
        Overwritten with the packed mask (columns contiguous).
    relu : bool
    launch : MaskLaunch, optional
        The grid (its ``programs``); the same values whatever it is.

    Returns
    -------
    fired : torch.Tensor of shape (n_components,), float32
        How many rows fired each feature.
    """
    n_rows, n_cols = codes.shape
    n_bytes = _check_bits(codes, bits, "codes_bits_count_ needs codes")
    fired = torch.zeros(n_cols, dtype=torch.float32, device=codes.device)
    if n_rows == 0 or n_cols == 0:
        return fired
    programs = (launch or MaskLaunch()).programs
    block_b, block_r = _column_blocks(n_cols), 16
    # By default about 4096 programs, enough to fill a GPU, so that a wide
    # batch pays one atomic add per column for every 16 * tiles rows.
    tiles, grid = _tiles(n_rows, block_r, -(-n_bytes // block_b),
                         _PROGRAMS["codes"] if programs is None else programs)
    with _on(codes.device):
        _kernels().codes_bits_count[grid](
            codes, bits, fired, n_rows, n_cols, n_bytes, codes.stride(0), bits.stride(0),
            RELU=bool(relu), BLOCK_R=block_r, BYTES=block_b, TILES=tiles, num_warps=4,
        )
    return fired


def mask_by_bits_(grad, bits, launch=None):
    """``grad *= mask`` in place, the mask packed as :func:`codes_bits_count_` writes it.

    The same values as ``grad.mul_(mask)`` with a 0/1 mask of ``grad``'s
    dtype (a NaN stays NaN), reading one bit per value instead of two bytes.

    Parameters
    ----------
    grad : torch.Tensor of shape (batch, n_components)
        Columns contiguous; float32 or bfloat16.
    bits : torch.Tensor of uint8, shape (batch, >= bits_columns(n_components))
    launch : MaskLaunch, optional
        The block (its ``rows`` and ``warps``); the same values whatever it is.
    """
    n_rows, n_cols = grad.shape
    n_bytes = _check_bits(grad, bits, "mask_by_bits_ needs a gradient")
    if n_rows == 0 or n_cols == 0:
        return
    launch = launch or MaskLaunch()
    block_b = _column_blocks(n_cols)
    grid = (-(-n_bytes // block_b), -(-n_rows // launch.rows))
    with _on(grad.device):
        _kernels().mask_by_bits[grid](grad, bits, n_rows, n_cols, n_bytes, grad.stride(0),
                                      bits.stride(0), BLOCK_R=launch.rows, BYTES=block_b,
                                      num_warps=launch.warps)


# ---------------------------------------------------------- the residual


class ResidualLaunch(NamedTuple):
    """How :func:`residual_` is launched.

    Attributes
    ----------
    programs : int or None
        About how many programs (None: the default, ``_PROGRAMS["residual"]``;
        0: one tile of rows each, the most).
    rows : int or None
        Rows a tile (None: the default, 4096 values a tile).
    """

    programs: int | None = None
    rows: int | None = None


# The launches the first step times on a GPU (residual_pays). By default
# about 512 programs of 8 tiles of 8 rows: at d=768 that is 3 programs a
# multiprocessor of an H200, each waiting on one tile's loads at a time,
# and the kernel was no faster than torch's five passes in one of two runs.
# More programs (2048, or one tile each) keep more loads in flight; larger
# tiles (32 rows) do so within a program.
_RESIDUAL_LAUNCHES = tuple(ResidualLaunch(programs, rows)
                           for programs in (None, 2048, 0) for rows in (None, 32))


def residual_(y, bias, x, gx, err, scale, launch=None):
    """The residual, its gradient and their sums in one pass over a (batch, d) batch.

    Writes ``err = (y + bias) - x`` (float32) and ``gx = err * scale`` (in
    ``gx``'s dtype, rounded to nearest even), and returns the sum of
    ``err ** 2`` and the column sums of ``gx`` as written: the values of
    the plain operations ``err.copy_(y).add_(bias).sub_(x)``,
    ``torch.mul(err, scale, out=gx)``, ``err.square().sum()`` and
    ``gx.sum(0, dtype=torch.float32)``; the two sums up to their order of
    addition. Five passes over the batch and their launches become one.

    Parameters
    ----------
    y : torch.Tensor of shape (batch, d)
        The decoder's product, float32 or bfloat16; may be ``err`` itself.
    bias : torch.Tensor of shape (d,), float32, contiguous
    x : torch.Tensor of shape (batch, d), float32
    gx : torch.Tensor of shape (batch, d)
        float32 or bfloat16, rows may be strided (a slice of a wider buffer).
    err : torch.Tensor of shape (batch, d), float32
    scale : float
    launch : ResidualLaunch, optional
        The grid and tiles; the same values whatever it is (the sums up to
        their order of addition).

    Returns
    -------
    sse : torch.Tensor of shape (), float32
    gx_sums : torch.Tensor of shape (d,), float32
    """
    n_rows, d = x.shape
    for t in (y, x, gx, err):
        if t.shape != (n_rows, d) or t.stride(1) != 1:
            raise ValueError("residual_ needs (batch, d) tensors with contiguous columns.")
    if x.dtype != torch.float32 or err.dtype != torch.float32 or not bias.is_contiguous():
        raise ValueError("residual_ needs float32 x and err, and a contiguous bias.")
    # Both sums in one buffer: one launch to clear them.
    sums = torch.zeros(d + 1, dtype=torch.float32, device=x.device)
    sse, gx_sums = sums[d], sums[:d]
    if n_rows == 0 or d == 0:
        return sse, gx_sums
    launch = launch or ResidualLaunch()
    block_d = min(128, 1 << max(4, (d - 1).bit_length()))
    block_r = launch.rows or (4096 // (4 * block_d) if block_d >= 32 else 32)
    # By default enough programs to fill a GPU (about 512), so that the
    # atomic adds stay few.
    tiles, grid = _tiles(n_rows, block_r, -(-d // block_d),
                         _PROGRAMS["residual"] if launch.programs is None else launch.programs)
    with _on(y.device):
        _kernels().residual[grid](
            y, bias, x, gx, err, sums[d:], gx_sums, n_rows, d, y.stride(0), x.stride(0),
            gx.stride(0), err.stride(0), float(scale), GX_BF16=gx.dtype == torch.bfloat16,
            BLOCK_R=block_r,
            BLOCK_D=block_d, TILES=tiles, num_warps=4,
        )
    return sse, gx_sums


# ------------------------------------------- choosing kernels on a first step

# Per (kernel, device, dtype, shape, variant): whether the kernel is faster
# there than the plain operations, and gives their values; and where the
# choice was timed, each way's best seconds a call.
_choices = {}
_timings = {}


# The calling thread's wait before a new choice (see decisions_wait_for).
_gate = threading.local()


@contextlib.contextmanager
def decisions_wait_for(settle):
    """Within the block, a new choice of :func:`kernel_pays` first calls ``settle()``.

    A trainer whose first steps run before the checks of its data have
    ended (on a GPU, beside the scan of ``X``'s values) settles them so
    before any choice: a choice made on rows the checks then refuse (NaN)
    would find the kernel differing from torch's operations, warn so, and
    keep torch's operations for the rest of the process. ``settle`` raises
    the checks' error, which the step's caller then reports. Choices made
    already cost nothing more.
    """
    previous = getattr(_gate, "settle", None)
    _gate.settle = settle
    try:
        yield
    finally:
        _gate.settle = previous


def kernel_pays(key, device, prepare, repeats=5):
    """Whether a kernel should replace the plain operations, and how: decided once per ``key``.

    Every step asks, and gets the decision made the first time at the cost
    of a dictionary lookup. That first time, on the first step's own data,
    ``prepare()`` sets the comparison up (copies of the step's buffers,
    which later steps must not pay for) and returns ``(agrees, plain,
    fused)``: ``agrees()`` runs both ways and says whether the kernel gives
    the plain operations' values (a failure or a disagreement warns once
    and keeps the plain operations); on a GPU every way is then timed, each
    ``repeats`` calls at a time, three times in turn (:func:`_fastest`),
    and the fastest kept. In Triton's interpreter (the tests) there is
    nothing to time and an agreeing kernel is taken. Never anywhere a
    kernel may not run (:func:`available`'s conditions).

    Parameters
    ----------
    key : tuple
        What the choice is for: the kernel's name, then what its speed
        depends on (device, dtype, shape, variant).
    device : torch.device
    prepare : callable
        ``prepare() -> (agrees, plain, fused)`` or ``(agrees, plain, fused,
        restore)``; ``plain`` and ``fused`` are one run each way, repeatable
        on the same buffers. ``fused`` may be a dict of several ways to run
        the kernel (launches), keyed by what the caller then passes it,
        the first the one the interpreter takes; ``agrees()`` checks them
        all. ``restore()``, for operations that overwrite their own input,
        puts that input back after the decision, whatever its outcome (a
        failed kernel too): the caller then runs the way chosen on it.

    Returns
    -------
    choice : bool or a key of ``fused``
        False for the plain operations; True, or the chosen key of a dict
        ``fused``, for the kernel.
    """
    # A decided choice first: every step asks, and reading the environment
    # (may_run) at each would cost a step microseconds for nothing.
    choice = _choices.get(key)
    if choice is not None:
        return choice
    if not may_run(device):
        return False
    settle = getattr(_gate, "settle", None)
    if settle is not None:
        settle()
    restore = None
    try:
        agrees, plain, fused, *rest = prepare()
        restore = rest[0] if rest else None
        ways = fused if isinstance(fused, dict) else {True: fused}
        choice = agrees()
        if not choice:
            warnings.warn(f"The {key[0]} kernel differs from torch's operations on "
                          f"{device}; training uses torch's operations instead.",
                          RuntimeWarning, stacklevel=3)
        elif device.type == "cuda":
            best = {}
            choice = _fastest({False: plain, **ways},
                              lambda: torch.cuda.synchronize(device), repeats, best=best)
            _timings[key] = {way: seconds / repeats for way, seconds in best.items()}
        else:
            choice = next(iter(ways))
    except Exception as exc:  # noqa: BLE001 - no Triton, or a kernel that cannot build
        warnings.warn(f"The {key[0]} kernel cannot run on {device} ({type(exc).__name__}: "
                      f"{exc}); training uses torch's operations instead.", RuntimeWarning,
                      stacklevel=3)
        choice = False
    finally:
        if restore is not None:
            restore()
    _choices[key] = choice or False
    return _choices[key]


def _fastest(ways, sync, repeats, trials=3, best=None):
    """The key of the fastest of ``ways`` (a dict of runs): each one's best of ``trials`` timings.

    A timing is the wall-clock time of ``repeats`` back-to-back calls
    between two ``sync()`` calls, from the host: the GPU's time where the GPU
    is the bound, the host's time to launch where it is (a Triton launch
    costs the host more than a torch operation's, which decides at small
    sizes). One timing of each way was too noisy for the close choices: the
    residual kernel's (a step 1.04 against 1.01 times as fast) went
    different ways in two H200 runs of the same code. Timing the ways in
    turn spreads a slow spell of the machine over all of them, and the best
    timing of each is its least disturbed. A tie goes to the way listed
    first (the plain operations, where the caller lists them first).
    ``best``, a dict, receives each way's best timing (seconds for
    ``repeats`` calls).
    """
    for run in ways.values():
        run()  # the first call of each way may compile or allocate
    best = {} if best is None else best
    for _ in range(trials):
        for name, run in ways.items():
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            sync()
            elapsed = time.perf_counter() - start
            best[name] = min(best.get(name, elapsed), elapsed)
    return min(best, key=best.get)


def timings():
    """What the timed choices of :func:`kernel_pays` measured in this process (on a GPU).

    Returns
    -------
    dict
        ``key -> {way: seconds a call}``, the key as in :func:`choices`, a
        way False (the plain operations), True or a launch.
    """
    return {key: dict(ways) for key, ways in _timings.items()}


def choices():
    """The choices :func:`kernel_pays` made in this process.

    Returns
    -------
    dict
        ``key -> choice`` (False: the plain operations; True or a launch
        such as :class:`MaskLaunch`: the kernel), the key as the caller gave
        it: ``(kernel, device, dtype, shape, variant)``.
    """
    return dict(_choices)


def codes_kernel_pays(codes, mask, scratch, bits, plain, relu):
    """Whether :func:`codes_bits_count_` and :func:`mask_by_bits_` replace ``plain``, and how.

    Decided by :func:`kernel_pays` on the first step's codes: the plain way
    is ``plain`` (the codes, the mask in ``mask`` and the counts) and the
    gradient's product with the mask, the kernels' way the packed mask and
    its product, in each of the launches (:class:`MaskLaunch`) a GPU times;
    ``scratch`` stands for both the codes and the gradient. ``codes`` is
    left as it was; ``mask``, ``scratch`` and ``bits`` are overwritten (the
    step writes them later).

    Parameters
    ----------
    codes, mask, scratch : torch.Tensor of shape (batch, n_components)
    bits : torch.Tensor of uint8, shape (batch, bits_columns(n_components))
    plain : callable
        ``plain(codes, mask) -> fired``: the plain operations, in place.
    relu : bool

    Returns
    -------
    MaskLaunch or False
        The launch to run the kernels with, or False for the plain way.
    """
    # Every launch is checked, in Triton's interpreter too (the tests),
    # which then takes the first, the default, having nothing to time.
    launches = _launches()

    def prepare():
        def agrees():
            scratch.copy_(codes)
            fired_plain = plain(scratch, mask)
            codes_ref, mask_ref = scratch.clone(), mask.clone()
            # A gradient to mask that is not zero where the mask is (the
            # codes themselves would be, and hide a mask not applied).
            probe = codes_ref - 1
            masked_ref = probe * mask_ref
            same = True
            # Every launch, each kernel's: the grids differ, the values must not.
            for launch in {MaskLaunch(programs=p) for p, _, _ in launches}:
                scratch.copy_(codes)
                fired = codes_bits_count_(scratch, bits, relu=relu, launch=launch)
                # Compared as values: a -0.0 code gives a -0.0 mask through
                # sign; both mask alike.
                same = (same and torch.equal(scratch, codes_ref)
                        and torch.equal(fired, fired_plain)
                        and torch.equal(unpack_bits(bits, codes.shape[1], mask.dtype),
                                        mask_ref))
            for launch in {MaskLaunch(rows=r, warps=w) for _, r, w in launches}:
                scratch.copy_(probe)
                mask_by_bits_(scratch, bits, launch)
                same = same and torch.equal(scratch, masked_ref)
            # Repeating a run repeats its work: the ReLU of codes already
            # through it reads and writes them again.
            scratch.copy_(codes)
            return same

        def plain_run():
            plain(scratch, mask)
            scratch.mul_(mask)

        def fused_run(launch):
            def run():
                codes_bits_count_(scratch, bits, relu=relu, launch=launch)
                mask_by_bits_(scratch, bits, launch)
            return run

        return agrees, plain_run, {launch: fused_run(launch) for launch in launches}

    key = ("codes", str(codes.device), codes.dtype, tuple(codes.shape), bool(relu))
    return kernel_pays(key, codes.device, prepare)


def residual_pays(y, bias, x, gx, err, scale, plain):
    """Whether :func:`residual_` should replace ``plain`` for this batch's shape, and how.

    Decided by :func:`kernel_pays` on the first step's own residual:
    ``plain() -> (sse, gx_sums)`` writes ``err`` and ``gx`` with torch's
    operations; the kernel, in each of the launches (:class:`ResidualLaunch`)
    a GPU times, must write the same values, and sums within float32
    rounding of the plain ones. ``y`` is left as it was, also when it is
    ``err`` itself (float32 products), which both ways overwrite with the
    residual: it is copied first and put back after the decision, for the
    caller's run. Otherwise ``err`` and ``gx`` are overwritten.

    Returns
    -------
    ResidualLaunch or False
    """
    def prepare():
        aliased = y.data_ptr() == err.data_ptr()
        source = y.clone() if aliased else y

        def run_plain():
            if source is not y:
                err.copy_(source)
            return plain()

        def run_fused(launch):
            return lambda: residual_(source, bias, x, gx, err, scale, launch)

        def agrees():
            sse_plain, sums_plain = run_plain()
            expected = (err.clone(), gx.clone(), float(sse_plain), sums_plain.clone())
            # Sums of the same values in another order: float32 rounding,
            # about 1e-7 of their magnitudes times the rows.
            tol = 1e-5 * (1.0 + float(expected[3].abs().max())
                          + float(gx.float().abs().sum(0).max()))
            same = True
            for launch in _RESIDUAL_LAUNCHES:
                err.fill_(float("nan"))  # each launch must write every value
                sse, sums = run_fused(launch)()
                same = (same and torch.equal(err, expected[0]) and torch.equal(gx, expected[1])
                        and abs(float(sse) - expected[2]) <= 1e-5 * max(expected[2], 1e-30)
                        and float((sums - expected[3]).abs().max()) <= tol)
            return same

        # Without the restore, the step after the decision took the residual
        # for the decoder's product (a wrong first step of every float32 fit
        # that decided, seen on an H200 as fits that differed by their feed).
        return (agrees, run_plain,
                {launch: run_fused(launch) for launch in _RESIDUAL_LAUNCHES},
                (lambda: err.copy_(source)) if aliased else None)

    key = ("residual", str(x.device), gx.dtype, tuple(x.shape), y.dtype)
    return kernel_pays(key, x.device, prepare)


# ------------------------------------------------------ the centred rows


def centre_(x, bias, out):
    """``out = x - bias`` (each row minus a vector), rounded once to ``out``'s dtype.

    The value of ``torch.sub(x, bias, out=out)``. Into the step's operand
    buffer (bfloat16 under autocast, a slice of rows with a column of ones
    beside them) torch's subtraction takes its generic, unvectorised path,
    which took 15 us of a 1.96 ms bf16 step at the reference size on an
    H200, about three times what its bytes need; this kernel is one plain
    pass.

    Parameters
    ----------
    x : torch.Tensor of shape (batch, d), float32, columns contiguous
    bias : torch.Tensor of shape (d,), float32, contiguous
    out : torch.Tensor of shape (batch, d), float32 or bfloat16
        Columns contiguous; its rows may be strided (a slice of a wider
        buffer), whose other columns are left as they are.
    """
    n_rows, d = x.shape
    if (out.shape != (n_rows, d) or x.stride(1) != 1 or out.stride(1) != 1
            or x.dtype != torch.float32 or bias.dtype != torch.float32
            or bias.shape != (d,) or not bias.is_contiguous()):
        raise ValueError("centre_ needs float32 (batch, d) rows and a contiguous (d,) bias, "
                         "and an output of their shape, all with contiguous columns.")
    if n_rows == 0 or d == 0:
        return out
    block_d = min(128, 1 << max(4, (d - 1).bit_length()))
    block_r = max(1, 4096 // block_d)
    grid = (-(-d // block_d), -(-n_rows // block_r))
    with _on(x.device):
        _kernels().centre[grid](x, bias, out, n_rows, d, x.stride(0), out.stride(0),
                                OUT_BF16=out.dtype == torch.bfloat16, BLOCK_R=block_r,
                                BLOCK_D=block_d, num_warps=4)
    return out


def centre_pays(x, bias, out, plain):
    """Whether :func:`centre_` should replace ``plain`` (``torch.sub(x, bias, out=out)``).

    Decided by :func:`kernel_pays` on the first step's own rows: the kernel
    must write exactly the plain operation's values. ``out`` is overwritten;
    the caller then runs the way chosen.
    """
    def prepare():
        def agrees():
            plain()
            expected = out.clone()
            out.fill_(float("nan"))  # the kernel must write every value
            centre_(x, bias, out)
            # NaN where the rows hold NaN, and every other value equal.
            return torch.allclose(out, expected, rtol=0.0, atol=0.0, equal_nan=True)

        return agrees, plain, lambda: centre_(x, bias, out)

    key = ("centre", str(x.device), out.dtype, tuple(x.shape), out.stride(0))
    return kernel_pays(key, x.device, prepare)


# ------------------------------------------------- the trainer's counts


def tally_(fired, total, since):
    """A step's firing counts into the trainer's: ``total += fired``, ``since`` reset or counted.

    What ``total += fired``, ``since += 1`` and ``since.masked_fill_(fired
    > 0, 0)`` do (four launches, with the comparison's), in one: the same
    values.

    Parameters
    ----------
    fired : torch.Tensor of shape (n,), float32, contiguous
        The step's firing counts.
    total : torch.Tensor of shape (n,), float64, contiguous
        The pass's counts so far, added to.
    since : torch.Tensor of shape (n,), int64, contiguous
        Steps since each feature last fired: 0 where it fired, else one
        more.
    """
    n = fired.shape[0]
    if (fired.dtype != torch.float32 or total.dtype != torch.float64
            or since.dtype != torch.int64 or total.shape != (n,) or since.shape != (n,)
            or not (fired.is_contiguous() and total.is_contiguous() and since.is_contiguous())):
        raise ValueError("tally_ needs contiguous (n,) vectors: float32 counts, a float64 "
                         "total and int64 steps.")
    if n == 0:
        return
    block = min(1024, 1 << max(4, (n - 1).bit_length()))
    with _on(fired.device):
        _kernels().tally[(-(-n // block),)](fired, total, since, n, BLOCK=block, num_warps=4)


def tally_pays(fired, total, since, plain):
    """Whether :func:`tally_` should replace ``plain`` (the three torch operations).

    Decided by :func:`kernel_pays` on copies of the first step's counts
    (both ways add into their buffers, so each runs on its own copies,
    which the timings then add to at will); the kernel must give the plain
    operations' values exactly. The caller then runs the way chosen on its
    own buffers.
    """
    def prepare():
        copies = {way: (total.clone(), since.clone()) for way in ("plain", "fused")}

        def run_plain():
            plain(*copies["plain"])

        def run_fused():
            tally_(fired, *copies["fused"])

        def agrees():
            run_plain()
            run_fused()
            return all(torch.equal(a, b) for a, b in zip(copies["plain"], copies["fused"]))

        return agrees, run_plain, run_fused

    key = ("tally", str(fired.device), fired.dtype, tuple(fired.shape), None)
    return kernel_pays(key, fired.device, prepare)


# ------------------------------------------ the ReLU in the encoder's product


def product_relu_(bias, a, b, out):
    """``out = relu(a @ b + bias)``, the bias and the ReLU in the product's epilogue.

    torch's ``_addmm_activation``: on a CUDA GPU cuBLASLt adds the bias and
    takes the ReLU as it writes each tile of the product, sparing a pass
    over the (batch, n_components) result; elsewhere it is the product, then
    the ReLU. ``bias`` is a contiguous vector of the operands' dtype.
    """
    return torch._addmm_activation(bias, a, b, out=out)


def product_relu_pays(bias_of, a, b, out, scratch, plain):
    """Whether :func:`product_relu_` should replace ``plain`` and a ReLU for these operands.

    ``bias_of()`` gives the bias (called for the first decision only).

    Decided by :func:`kernel_pays` on the first step's own product: the
    plain way is ``plain(scratch)`` (the encoder's product with its bias
    through a column of ones) and a ReLU in place; the fused way must agree
    with it to the products' rounding (their sums run in another order, and
    the bias is added at the end rather than with the terms): a relative
    difference, over the whole result, within four of the dtype's epsilon.
    ``out`` and ``scratch`` are overwritten; the caller then runs the way
    chosen.
    """
    def prepare():
        bias, eps = bias_of(), torch.finfo(out.dtype).eps

        def agrees():
            expected = plain(scratch).relu_()
            got = product_relu_(bias, a, b, out)
            scale = float(torch.linalg.vector_norm(expected.float()))
            gap = float(torch.linalg.vector_norm((got.float() - expected.float())))
            return gap <= 4 * eps * max(scale, 1e-30)

        return (agrees, lambda: plain(scratch).relu_(),
                lambda: product_relu_(bias, a, b, out))

    key = ("product_relu", str(out.device), out.dtype, tuple(out.shape), a.shape[1])
    return kernel_pays(key, out.device, prepare)


# ------------------------------------------------- the step's small numbers


def penalty_stats_(code_sums, fired, sse, weights, l0_factor, coef, batch, bias_out):
    """The step's statistics and the codes' penalty bias in one small kernel.

    With ``penalty = code_sums @ weights / batch + l0_factor * l0`` (the
    activation's closed form, :meth:`~sparse_dict._torch.activations.Activation.penalty_terms`):
    returns ``[mse + coef * penalty, mse, l1, l0, 0]`` (``mse = sse / batch``,
    ``l1 = sum(code_sums) / batch``, ``l0 = sum(fired) / batch``) and writes
    ``bias_out = weights * (coef / batch)`` (0 without weights) in its
    dtype: what a dozen torch operations on (n_components,) vectors do, each
    a launch and a trip through the GPU's memory, in one. The sums are the
    plain ones up to their order of addition; the bias is exactly theirs.

    Parameters
    ----------
    code_sums : torch.Tensor of shape (n,)
        Any float dtype; may be strided (a column of a product).
    fired : torch.Tensor of shape (n,), float32, contiguous
    sse : torch.Tensor of shape (), float32
    weights : torch.Tensor of shape (n,), float32, contiguous, or None
    l0_factor, coef : float
    batch : int
    bias_out : torch.Tensor of shape (n,)
        float32 or bfloat16; may be strided.

    Returns
    -------
    stats : torch.Tensor of shape (5,), float32
    """
    n = code_sums.shape[0]
    if (fired.shape != (n,) or bias_out.shape != (n,) or not fired.is_contiguous()
            or (weights is not None and (weights.shape != (n,) or not weights.is_contiguous()))):
        raise ValueError("penalty_stats_ needs (n,) vectors, fired and weights contiguous.")
    # Zeroed: each program adds its block's share of every statistic.
    stats = torch.zeros(5, dtype=torch.float32, device=fired.device)
    block = min(256, 1 << max(4, (n - 1).bit_length()))
    with _on(code_sums.device):
        _kernels().penalty_stats[(-(-n // block),)](
            code_sums, fired, fired if weights is None else weights, sse, stats, bias_out, n,
            code_sums.stride(0), bias_out.stride(0), float(batch), float(coef), coef / batch,
            float(l0_factor), HAS_W=weights is not None,
            BIAS_BF16=bias_out.dtype == torch.bfloat16, BLOCK=block, num_warps=4,
        )
    return stats


def penalty_stats_pays(code_sums, fired, sse, weights, l0_factor, coef, batch, bias_out,
                       plain):
    """Whether :func:`penalty_stats_` should replace ``plain`` for this shape.

    Decided by :func:`kernel_pays` on the first step's own numbers: ``plain()
    -> stats`` writes ``bias_out`` with torch's operations; the kernel must
    write the same bias and statistics within float32 rounding of theirs.
    """
    def fused():
        return penalty_stats_(code_sums, fired, sse, weights, l0_factor, coef, batch, bias_out)

    def prepare():
        def agrees():
            expected = plain().clone()
            bias = bias_out.clone()
            got = fused()
            close = torch.allclose(got, expected, rtol=1e-5,
                                   atol=1e-6 * float(expected.abs().max()))
            return close and torch.equal(bias_out, bias)

        return agrees, plain, fused

    key = ("penalty_stats", str(fired.device), bias_out.dtype, tuple(fired.shape),
           weights is not None)
    return kernel_pays(key, fired.device, prepare)
