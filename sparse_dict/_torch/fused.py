"""One pass over each weight matrix per step on a GPU: Adam, the unit-norm constraint, the bf16 copy.

(And one pass over the step's (batch, n_components) codes for their mask
and firing counts: :func:`codes_mask_count_`, at the end.)

After the matrix products, a step updates its two (n_components, d) weight
matrices. Written as torch operations that is several passes over each:
the decoder gradient's radial part is projected out (two passes), Adam
reads the weight, its gradient and both moments and writes three of them
back, the atoms are renormalised (two passes), and the next step's products
copy each weight to bfloat16 (one more). Each pass over a GPT-2-sized
dictionary's weights moves about 75 MB, so on a GPU these passes cost a
third as much as the step's five matrix products in bfloat16.

:func:`adam_rows_` does all of it in one Triton kernel that reads each row
of the weight, gradient and moments once and writes the weight, the
moments and (optionally) the weight's low-precision copy once. Its
arithmetic is torch's Adam (no weight decay, no AMSGrad), checked against
torch's own optimiser by the tests; the state it keeps is torch's, so a
trainer can move between this path and the plain one at any step.

It runs only on CUDA devices with Triton installed (torch's CUDA builds
bring it); elsewhere :func:`available` is False and the trainer takes the
plain path. Setting ``SPARSE_DICT_FUSED=0`` turns it off.
"""

import functools
import os
import time
import warnings

import torch

__all__ = ["adam_rows_", "available", "codes_mask_count_", "elementwise_choices",
           "elementwise_pays"]


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adam_rows(W, G, M, V, LOW, n_rows, d, stride_w, stride_g, stride_low,
                  step_size, beta1, beta2, eps, bc2_sqrt,
                  PROJECT: tl.constexpr, UNIT: tl.constexpr, WRITE_LOW: tl.constexpr,
                  LOW_BF16: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < d)
        rows64 = rows.to(tl.int64)[:, None]
        at = rows64 * stride_w + cols[None, :]
        w = tl.load(W + at, mask=inside, other=0.0)
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if PROJECT:
            # The gradient's component along the (unit) atom would only
            # change its norm, which the constraint undoes.
            g = g - tl.sum(g * w, axis=1)[:, None] * w
        m = tl.load(M + at, mask=inside, other=0.0)
        v = tl.load(V + at, mask=inside, other=0.0)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        # A GPU's fast division and square root (within 2 ulp), not the
        # correctly rounded ones torch's Adam uses: with tl.div_rn and
        # tl.sqrt_rn this kernel took 3 times as long on an H200 (853
        # against 283 us for a bf16 step's four calls at the reference
        # size). The last-bit differences grow over a run at a high learning
        # rate (1.5e-4 in W_dec after 30 steps at 0.1 there), which the GPU
        # test allows.
        w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if UNIT:
            norm = tl.sqrt(tl.sum(w * w, axis=1))
            w = w / tl.maximum(norm, 1e-12)[:, None]
        tl.store(W + at, w, mask=inside)
        tl.store(M + at, m, mask=inside)
        tl.store(V + at, v, mask=inside)
        if WRITE_LOW:
            low = LOW + rows64 * stride_low + cols[None, :]
            if LOW_BF16:
                # Rounded to nearest even by hand, as torch converts: a GPU's
                # conversion does too, but Triton's interpreter (the CPU
                # tests) truncates. NaN stays NaN.
                bits = w.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                near = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                tl.store(low, tl.where(w == w, near, w.to(tl.bfloat16)), mask=inside)
            else:
                tl.store(low, w.to(LOW.dtype.element_ty), mask=inside)

    return adam_rows


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
    return _may_run(device) and _probe(str(device))


def _may_run(device):
    """Whether a Triton kernel may be tried on ``device`` at all.

    On a CUDA GPU, or anywhere in Triton's interpreter (the tests), unless
    ``SPARSE_DICT_FUSED=0`` turns every kernel of this module off.
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
    adam_rows_(w, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
               project=True, unit=True)
    pairs = [(w, w_ref), (m, m_ref), (v, v_ref)]
    # A vector (a bias), one value per row, with neither projection nor norm.
    b, gb = (torch.randn(23, 1, generator=g, device=device) for _ in range(2))
    mb, vb = torch.zeros(23, 1, device=device), torch.zeros(23, 1, device=device)
    b_ref = b - lr * ((1 - beta1) * gb / (1 - beta1)) / (
        ((1 - beta2) * gb * gb).sqrt() / (1 - beta2) ** 0.5 + eps)
    adam_rows_(b, gb, mb, vb, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=1)
    pairs.append((b, b_ref))
    return max(float((a - c).abs().max()) for a, c in pairs)


def adam_rows_(weight, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, step,
               project=False, unit=False, low=None):
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
    """
    n_rows, d = weight.shape
    if not (weight.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("adam_rows_ needs contiguous weight and moments.")
    if grad.stride(1) != 1 or (low is not None and low.stride(1) != 1):
        raise ValueError("adam_rows_ needs rows with contiguous columns.")
    block_d = 1 << max(4, (d - 1).bit_length())
    # About 4096 values per program: rows of a wide input get a program each.
    block_r = max(1, 4096 // block_d)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    grid = (-(-n_rows // block_r),)
    _kernel()[grid](
        weight, grad, exp_avg, exp_avg_sq, weight if low is None else low,
        n_rows, d, weight.stride(0), grad.stride(0), 0 if low is None else low.stride(0),
        lr / bc1, beta1, beta2, eps, bc2_sqrt,
        PROJECT=bool(project), UNIT=bool(unit), WRITE_LOW=low is not None,
        LOW_BF16=low is not None and low.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if block_d <= 1024 else 8,
    )


# ------------------------------------------------------- the codes' pass


@functools.lru_cache(maxsize=None)
def _codes_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def codes_mask_count(C, MASK, FIRED, n_rows, n_cols, stride_c, stride_m,
                         RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         TILES: tl.constexpr):
        # Each program takes TILES tiles of BLOCK_R rows down one block of
        # columns. The counts accumulate element-wise in registers and are
        # summed down the rows once, at the end, before one atomic add per
        # column: a sum across threads in every tile (the first version)
        # cost the kernel its lead over torch's three passes in bfloat16 on
        # an H200.
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        first = tl.program_id(1) * (TILES * BLOCK_R)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for tile in range(TILES):
            rows = first + tile * BLOCK_R + tl.arange(0, BLOCK_R)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            rows64 = rows.to(tl.int64)[:, None]
            at = rows64 * stride_c + cols[None, :]
            c = tl.load(C + at, mask=inside, other=0.0)
            if RELU:
                # NaN stays NaN, as in torch's relu, so that a diverging
                # step still shows in its loss.
                c = tl.where(c < 0.0, 0.0, c)
                tl.store(C + at, c, mask=inside)
            ones = tl.where(c > 0.0, 1.0, 0.0)  # float32
            tl.store(MASK + rows64 * stride_m + cols[None, :],
                     ones.to(MASK.dtype.element_ty), mask=inside)
            acc += ones
        tl.atomic_add(FIRED + cols, tl.sum(acc, axis=0), mask=cols < n_cols)

    return codes_mask_count


def codes_mask_count_(codes, mask, relu=False):
    """The codes' mask and firing counts in one pass, after an optional ReLU in place.

    What ``codes.relu_()`` (with ``relu``), ``mask = codes > 0`` and the
    mask's column sums do in three passes over a (batch, n_components)
    array, in one: each value is read once, and the mask (and, with
    ``relu``, the codes) written once. Exactly the plain operations' values
    for finite codes (0/1 counts below 2**24 are exact in float32, whatever
    the order of their sums).

    Parameters
    ----------
    codes : torch.Tensor of shape (batch, n_components)
        Columns contiguous; float32 or bfloat16. With ``relu``, overwritten
        by ``max(codes, 0)``.
    mask : torch.Tensor of the same shape
        Overwritten with 1 where the code is positive, else 0, in its dtype.
    relu : bool

    Returns
    -------
    fired : torch.Tensor of shape (n_components,), float32
        How many rows fired each feature.
    """
    n_rows, n_cols = codes.shape
    if codes.stride(1) != 1 or mask.stride(1) != 1 or mask.shape != codes.shape:
        raise ValueError("codes_mask_count_ needs same-shaped codes and mask with "
                         "contiguous columns.")
    fired = torch.zeros(n_cols, dtype=torch.float32, device=codes.device)
    if n_rows == 0 or n_cols == 0:
        return fired
    block_c = min(256, 1 << max(4, (n_cols - 1).bit_length()))
    block_r = 16
    # About 4096 programs, enough to fill a GPU, each over a power of two of
    # tiles (few distinct compilations), so that a wide batch pays one
    # atomic add per column for every 16 * tiles rows.
    col_blocks = -(-n_cols // block_c)
    row_tiles = -(-n_rows // block_r)
    tiles = 1 << max(0, (-(-row_tiles * col_blocks // 4096) - 1).bit_length())
    tiles = min(tiles, 1 << max(0, (row_tiles - 1).bit_length()))
    grid = (col_blocks, -(-row_tiles // tiles))
    _codes_kernel()[grid](
        codes, mask, fired, n_rows, n_cols, codes.stride(0), mask.stride(0),
        RELU=bool(relu), BLOCK_R=block_r, BLOCK_C=block_c, TILES=tiles, num_warps=4,
    )
    return fired


# Per (device, dtype, shape, relu): whether the one-pass kernel is faster
# there than the plain operations, and gives their values.
_elementwise_choice = {}


def elementwise_pays(codes, mask, scratch, plain, relu):
    """Whether :func:`codes_mask_count_` should replace ``plain`` for these codes.

    Measured once per process, device, dtype, shape and ``relu``, on the
    first step's own codes: both ways run on copies of them in ``scratch``
    (a buffer of the same shape the step has not used yet), their results
    must agree exactly, and the faster is kept. A failure or a disagreement
    warns once and keeps the plain operations. ``codes`` is left as it was;
    ``mask`` and ``scratch`` are overwritten (the step writes both later).

    Parameters
    ----------
    codes, mask, scratch : torch.Tensor of shape (batch, n_components)
    plain : callable
        ``plain(codes, mask) -> fired``: the plain operations, in place.
    relu : bool
    """
    device = codes.device
    if not _may_run(device):
        return False
    key = (str(device), codes.dtype, tuple(codes.shape), bool(relu))
    if key not in _elementwise_choice:
        try:
            _elementwise_choice[key] = _measure_elementwise(codes, mask, scratch, plain, relu)
        except Exception as exc:  # noqa: BLE001 - no Triton, or a kernel that cannot build
            warnings.warn(f"The one-pass codes kernel cannot run on {device} "
                          f"({type(exc).__name__}: {exc}); training uses torch's operations "
                          "instead.", RuntimeWarning, stacklevel=3)
            _elementwise_choice[key] = False
    return _elementwise_choice[key]


def elementwise_choices():
    """The choices :func:`elementwise_pays` made in this process.

    Returns
    -------
    dict
        ``(device, dtype, shape, relu) -> bool`` (True: the one-pass kernel).
    """
    return dict(_elementwise_choice)


def _measure_elementwise(codes, mask, scratch, plain, relu, repeats=5):
    scratch.copy_(codes)
    fired_plain = plain(scratch, mask)
    expected = (scratch.clone(), mask.clone(), fired_plain.clone())
    scratch.copy_(codes)
    fired = codes_mask_count_(scratch, mask, relu=relu)
    # Compared as values: a -0.0 code gives a -0.0 mask through sign, a 0.0
    # one here; both mask alike.
    same = (torch.equal(scratch, expected[0]) and torch.equal(mask, expected[1])
            and torch.equal(fired, expected[2]))
    if not same:
        warnings.warn(f"The one-pass codes kernel differs from torch's operations on "
                      f"{codes.device}; training uses torch's operations instead.",
                      RuntimeWarning, stacklevel=4)
        return False
    if codes.device.type != "cuda":
        return True  # Triton's interpreter, in the tests: nothing to time
    # Wall-clock time of back-to-back calls, from the host: the GPU's time
    # where the GPU is the bound, the host's time to launch where it is (a
    # Triton launch costs the host more than a torch operation's, which
    # decides at small sizes). Repeating a call repeats its work: the ReLU
    # of codes already through it reads and writes them again.
    times = {}
    for name, run in (("plain", lambda: plain(scratch, mask)),
                      ("fused", lambda: codes_mask_count_(scratch, mask, relu=relu))):
        scratch.copy_(codes)
        run()
        torch.cuda.synchronize(codes.device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize(codes.device)
        times[name] = time.perf_counter() - start
    return times["fused"] < times["plain"]
