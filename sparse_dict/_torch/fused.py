"""One pass over each weight matrix per step on a GPU: Adam, the unit-norm constraint, the bf16 copy.

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
import warnings

import torch

__all__ = ["adam_rows_", "available"]


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adam_rows(W, G, M, V, LOW, n_rows, d, stride_w, stride_g, stride_low,
                  step_size, beta1, beta2, eps, bc2_sqrt,
                  PROJECT: tl.constexpr, UNIT: tl.constexpr, WRITE_LOW: tl.constexpr,
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
        w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if UNIT:
            norm = tl.sqrt(tl.sum(w * w, axis=1))
            w = w / tl.maximum(norm, 1e-12)[:, None]
        tl.store(W + at, w, mask=inside)
        tl.store(M + at, m, mask=inside)
        tl.store(V + at, v, mask=inside)
        if WRITE_LOW:
            low = LOW + rows64 * stride_low + cols[None, :]
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
    if os.environ.get("SPARSE_DICT_FUSED", "1") == "0":
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _probe(str(device))


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
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if block_d <= 1024 else 8,
    )
