"""The CPU float32 matrix product: torch's, or numpy's OpenBLAS where asked for.

torch's CPU products go through the BLAS it was built with (MKL on x86).
numpy brings its own OpenBLAS, which picks a kernel for the CPU it runs on.
Which is faster depends on the CPU: on AMD EPYC processors with AVX-512,
OpenBLAS ran a 4096x512 @ 512x4096 float32 product at about 460 GFLOP/s
against about 210 for torch's MKL; on another 2-core AMD EPYC the two ran
at 100 and 94 GFLOP/s; on Intel processors MKL is usually at least as fast.

The two libraries round differently, so a fit's result depends on which
one computed it. torch's is used unless another is asked for, so that a
fit with an integer ``random_state`` gives the same bits in every process
(as scikit-learn's estimators do). ``SPARSE_DICT_CPU_PRODUCT=openblas``
(read when the first product is needed) or :func:`set_backend` fixes
OpenBLAS instead; ``auto`` times both on a short representative product
the first time one is needed and keeps the clearly faster one for the
process: the speed where OpenBLAS wins by far, at the cost of repeatability
across processes where the two are close (they then win in turn with the
machine's noise), as ``torch.backends.cudnn.benchmark`` trades it on a GPU.

Nothing here changes a thread count or an environment variable. ``auto``
chooses OpenBLAS only where it runs on one thread (``OPENBLAS_NUM_THREADS=1``,
or ``threadpoolctl``), and ``openblas`` is for that setting too (it is
used as it is set; its rounding then also depends on its thread count, so
repeatable fits need the same one): with threads of its own beside torch's OpenMP
threads, the two libraries' waiting threads fight for the cores between
products, which made whole fits twenty times slower where a timing of
products alone chose OpenBLAS. Any failure of the measurement or of an
OpenBLAS call leaves torch's product in use. GPU tensors, other dtypes and
tensors that autograd is recording always take torch's product.
"""

import os
import threading
import time

import numpy as np
import torch

__all__ = ["backend", "mm", "set_backend"]

BACKENDS = ("torch", "openblas")
# What set_backend and the environment variable accept: a backend, or the
# measurement that picks one.
CHOICES = (*BACKENDS, "auto")
# The probe's product: the shape of a training step's products at a small
# batch, large enough for BLAS to reach its steady rate, about 1 ms each.
_PROBE_SHAPE = (512, 512, 1024)
_PROBE_REPEATS = 5
# OpenBLAS must beat torch by this factor to be chosen. On a near tie the
# choice could flip from one process to the next with machine noise, and
# fits with the same random_state would then differ by rounding; the wins
# worth having are large (about 2x on AMD EPYC), so only a clear one counts.
_MARGIN = 1.25

_forced = None
# The choice (set_backend's, else the environment's, else torch's), read at
# the first product and kept: backend() runs at every product of a step.
_chosen = None
_probed = {}
# Two fits starting at once in threads measured each on its own, and could
# pick different winners mid-fit.
_probe_lock = threading.Lock()


def set_backend(name):
    """Fix the CPU float32 product to ``name``, or return to the default with None.

    Parameters
    ----------
    name : {"torch", "openblas", "auto"} or None
        The backend to use from now on in this process; ``"auto"`` measures
        both on the first product and keeps the clearly faster one (fits
        may then differ by rounding between processes); ``None`` returns to
        what ``SPARSE_DICT_CPU_PRODUCT`` says, else torch's (and forgets any
        measurement).

    Examples
    --------
    >>> set_backend("openblas"); backend()
    'openblas'
    >>> set_backend(None)
    """
    global _forced, _chosen
    if name is not None and name not in CHOICES:
        raise ValueError(f"Unknown matrix-product backend {name!r}; expected one of {CHOICES} "
                         "or None.")
    with _probe_lock:
        _forced, _chosen = name, None
        _probed.clear()


def backend():
    """The backend that CPU float32 products use in this process.

    :func:`set_backend`'s, else the one ``SPARSE_DICT_CPU_PRODUCT`` names
    (read on the first call, and again after ``set_backend``), else torch's.
    With ``"auto"`` both are timed on the first call (a few milliseconds) and
    the answer cached, per torch thread count.

    Returns
    -------
    name : {"torch", "openblas"}
    """
    global _chosen
    if _chosen is None:
        _chosen = _forced or _from_environment() or "torch"
    if _chosen != "auto":
        return _chosen
    threads = torch.get_num_threads()
    with _probe_lock:
        if threads not in _probed:
            try:
                _probed[threads] = _probe(threads)
            except Exception:  # noqa: BLE001 - any failure keeps torch's product
                _probed[threads] = "torch"
        return _probed[threads]


# The environment variable that fixes the backend for a process.
ENVIRONMENT_VARIABLE = "SPARSE_DICT_CPU_PRODUCT"


def _from_environment():
    """The backend ``SPARSE_DICT_CPU_PRODUCT`` names, None when it is unset or empty.

    Raises
    ------
    ValueError
        For another value, which names the variable and what it accepts.
    """
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not "
                         f"a CPU matrix-product backend; use one of {CHOICES}, or unset it "
                         "for torch's.")
    return value


def _openblas_threads():
    """numpy's BLAS thread count, or None when it is not OpenBLAS."""
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in str(lib.get("filepath", "")):
            return lib["num_threads"] if lib.get("internal_api") == "openblas" else None
    return None


def _best_time(fn):
    fn()
    best = float("inf")
    for _ in range(_PROBE_REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _probe(threads):
    n_blas = _openblas_threads()
    # OpenBLAS on threads of its own, beside torch's OpenMP threads, makes
    # the two libraries' idle threads spin against each other for the cores
    # between products: the probe of products alone chose OpenBLAS on a
    # 2-core AMD EPYC, where a fit (2,000 steps at 64 x 256, 2 threads each)
    # then took 70 s against 3.3 s with torch's product. On one thread it
    # cannot contend.
    if n_blas is None or n_blas > 1:
        return "torch"
    m, k, n = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator, dtype=torch.float32)
    b = torch.randn(k, n, generator=generator, dtype=torch.float32)
    out = torch.empty(m, n, dtype=torch.float32)
    a_np, b_np, out_np = a.numpy(), b.numpy(), out.numpy()
    t_torch = _best_time(lambda: torch.mm(a, b, out=out))
    t_blas = _best_time(lambda: np.matmul(a_np, b_np, out=out_np))
    if not torch.allclose(out, a @ b, rtol=1e-3, atol=1e-3):
        return "torch"
    return "openblas" if t_blas * _MARGIN < t_torch else "torch"


def _blas_layout(t):
    # A matrix BLAS reads in place: unit stride along one axis, and a
    # leading dimension at least that axis's length (a column slice of a
    # wider buffer qualifies). numpy copies anything else first.
    rows, cols = t.shape
    s0, s1 = t.stride()
    return (s1 == 1 and s0 >= max(cols, 1)) or (s0 == 1 and s1 >= max(rows, 1))


def _openblas_ok(a, b, out):
    tensors = (a, b) if out is None else (a, b, out)
    recording = torch.is_grad_enabled()
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2
        and not (recording and t.requires_grad)
        and _blas_layout(t)
        for t in tensors
    ) and a.shape[1] == b.shape[0] and (
        out is None or (out.is_contiguous() and out.shape == (a.shape[0], b.shape[1])))


def mm(a, b, out=None):
    """``a @ b`` for 2-D tensors, through the faster BLAS for CPU float32.

    Parameters
    ----------
    a : torch.Tensor of shape (m, k)
    b : torch.Tensor of shape (k, n)
        Either may be a transposed view (BLAS reads it as it lies).
    out : torch.Tensor of shape (m, n), optional
        Written in place when given (C-contiguous for OpenBLAS to write it
        directly).

    Returns
    -------
    product : torch.Tensor of shape (m, n)
        ``out`` when given.

    Examples
    --------
    >>> import torch
    >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
    >>> mm(a, b).tolist()[0]
    [3.0, 3.0, 3.0, 3.0]
    """
    # The device first: on a GPU the layout checks would cost a few
    # microseconds of host time per product for nothing.
    if a.device.type == "cpu" and backend() == "openblas" and _openblas_ok(a, b, out):
        if out is None:
            out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
        # The numpy arrays share the tensors' memory: the product lands in out.
        # As torch's product: an overflow gives inf and NaN silently, which
        # the trainer's divergence check reports (numpy would warn first).
        with np.errstate(all="ignore"):
            np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.numpy())
        return out
    return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
