"""Moving rows of numpy, memmap or CSR arrays onto a device, batch by batch.

Nothing here copies a whole input: every function reads the rows it needs,
so a ``np.memmap`` larger than memory can be fitted and encoded.
"""

import concurrent.futures
import math
import os
import threading

import numpy as np
import scipy.sparse as sp
import torch


def take_rows(X, index):
    """Rows ``index`` of ``X`` as a dense, C-contiguous numpy array.

    ``index`` is a slice or a sorted integer array; sorted indices keep reads
    from a memmap sequential.
    """
    rows = X[index]
    if sp.issparse(rows):
        rows = rows.toarray()
    return np.ascontiguousarray(rows)


def take_rows_into(X, index, out):
    """Rows ``index`` of ``X`` written into ``out``, in one copy where ``X`` is an array.

    ``index`` must be in range (it comes from :func:`iter_batches` or
    :func:`sample_rows`): ``np.take``'s "clip" then spares the buffered
    copy of the output that "raise" makes. Other inputs (memmaps of
    another dtype, sparse matrices) go through :func:`take_rows`.

    Examples
    --------
    >>> import numpy as np
    >>> out = np.empty((2, 2), dtype=np.float32)
    >>> take_rows_into(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 2]), out)
    >>> out.tolist()
    [[0.0, 1.0], [4.0, 5.0]]
    """
    if isinstance(X, np.ndarray) and X.dtype == out.dtype:
        np.take(X, index, axis=0, out=out, mode="clip")
    else:
        out[...] = take_rows(X, index)


def to_device(rows, device, dtype=torch.float32):
    """A host array as a tensor on ``device``, through pinned memory on a GPU.

    On the CPU the tensor may share memory with ``rows``; callers must not
    write into it.
    """
    if not rows.flags.writeable:
        # torch cannot wrap read-only memory (a read-only memmap's rows).
        rows = rows.copy()
    tensor = torch.from_numpy(rows)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, dtype=dtype, non_blocking=True)
    return tensor.to(dtype=dtype)


def value_range(X, block_bytes=1 << 22):
    """The smallest and largest value of ``X``, in one pass over blocks of rows.

    NaN anywhere makes both NaN; an infinity shows as one of the two. Blocks
    keep a memmap from being read whole into memory; each is read from
    memory once (its maximum is taken while it is still in the cache from
    its minimum). numpy's reductions run on the calling thread alone: a fit
    scans ``X`` in a thread of its own beside its set-up and, on a GPU, its
    first steps, where torch's (an OpenMP team of every core, spinning
    between blocks) took the cores that the upload and the steps' host
    work need.

    Parameters
    ----------
    X : ndarray, np.memmap or scipy.sparse matrix of floats
        A sparse matrix's stored values only (its implicit zeros are not
        counted).
    block_bytes : int
        About how many bytes each block reads.

    Returns
    -------
    low, high : float
        ``nan, nan`` for an empty ``X``.

    Examples
    --------
    >>> import numpy as np
    >>> value_range(np.array([[1.0, -2.0], [3.0, 0.5]]))
    (-2.0, 3.0)
    """
    values = X.data if sp.issparse(X) else X
    if values.size == 0:
        return float("nan"), float("nan")
    values = values.reshape(values.shape[0], -1)
    step = max(1, block_bytes // max(1, values.itemsize * values.shape[1]))
    low, high = float("inf"), float("-inf")
    for start in range(0, values.shape[0], step):
        block = values[start:start + step]
        with np.errstate(invalid="ignore"):
            lo, hi = float(block.min()), float(block.max())
        if math.isnan(lo) or math.isnan(hi):
            return float("nan"), float("nan")
        low, high = min(low, lo), max(high, hi)
    return low, high


# Up to this many rows, an epoch is one exact random permutation. Beyond, the
# permutation itself (8 bytes a row) would grow with the data, so rows are
# shuffled within windows of randomly chosen blocks instead.
_EXACT_SHUFFLE_ROWS = 1 << 20
_BLOCKS_PER_WINDOW = 16


def batch_bounds(n_rows, batch_size):
    """The (start, stop) of each batch of ``n_rows`` rows, ``batch_size`` at most each.

    Batches are full but for the last two, which share their rows evenly
    when the last would hold under half a batch: Adam steps as far on one
    row as on a full batch, and where a third of the steps were of one row
    (2,049 rows in batches of 1,024), a ReLU dictionary explained 0.85 of
    held-out rows instead of 0.89, with twice the L0.
    """
    starts = list(range(0, n_rows, batch_size)) + [n_rows]
    if len(starts) > 2 and n_rows - starts[-2] < batch_size / 2:
        starts[-2] = (starts[-3] + n_rows + 1) // 2
    return list(zip(starts[:-1], starts[1:]))


def iter_batches(X, batch_size, rng=None):
    """Yield the row indices of each batch of one pass over ``X``.

    With ``rng``, batches are drawn in random order (each batch's indices
    sorted, for sequential memmap reads) and sized by :func:`batch_bounds`;
    without, in order, full but for the last. Every row is visited exactly
    once either way. Above ``_EXACT_SHUFFLE_ROWS`` rows the shuffle is
    two-level, contiguous blocks in random order and rows shuffled within a
    window of 16 blocks, so that memory does not grow with the data.
    """
    n_samples = X.shape[0]
    if rng is None:
        for start in range(0, n_samples, batch_size):
            yield slice(start, min(start + batch_size, n_samples))
        return
    if n_samples <= _EXACT_SHUFFLE_ROWS:
        order = rng.permutation(n_samples)
        for start, stop in batch_bounds(n_samples, batch_size):
            yield np.sort(order[start:stop])
        return
    block = 4 * batch_size
    n_blocks = -(-n_samples // block)
    block_order = rng.permutation(n_blocks)
    for w in range(0, n_blocks, _BLOCKS_PER_WINDOW):
        window = np.concatenate(
            [
                np.arange(b * block, min((b + 1) * block, n_samples))
                for b in block_order[w : w + _BLOCKS_PER_WINDOW]
            ]
        )
        rng.shuffle(window)
        for start, stop in batch_bounds(len(window), batch_size):
            yield np.sort(window[start:stop])


def sample_rows(X, n_rows, rng, dtype=np.float64):
    """A random subset of at most ``n_rows`` rows of ``X``, as a new ``dtype`` array.

    The array never shares memory with ``X``: callers scale it in place.
    """
    return rows_at(X, sample_index(X.shape[0], n_rows, rng), dtype)


def rows_at(X, index, dtype=np.float64):
    """Rows ``index`` of ``X`` (sorted indices; None for every row) as a new ``dtype`` array.

    The array never shares memory with ``X``.
    """
    if index is None:
        return take_rows(X, slice(None)).astype(dtype)
    # Rows picked by an index array are a copy already (of an array, a
    # memmap or a sparse matrix's dense rows); a second one, when the dtype
    # matches, would only cost page faults on fresh memory.
    return _gather_rows(X, index).astype(dtype, copy=False)


def sample_index(n_samples, n_rows, rng):
    """The sorted indices of :func:`sample_rows`' random subset; None for every row.

    Examples
    --------
    >>> import numpy as np
    >>> sample_index(5, 8, np.random.RandomState(0)) is None
    True
    >>> sample_index(10, 3, np.random.RandomState(0)).tolist()
    [2, 4, 8]
    """
    if n_samples <= n_rows:
        return None
    if n_samples > 16 * n_rows:
        # Drawing with replacement and dropping repeats avoids the full
        # permutation that choice(replace=False) builds.
        return np.unique(rng.randint(0, n_samples, size=n_rows))
    return np.sort(rng.choice(n_samples, size=n_rows, replace=False))


def _gather_rows(X, index):
    """``take_rows(X, index)``, the rows of an array gathered by several host threads when many.

    A gather writes new memory, whose page faults and copies divide across
    cores as the export's copies do (:func:`host_threads`).
    """
    threads = host_threads(len(index) * X.shape[1] * X.dtype.itemsize)
    if threads <= 1 or not isinstance(X, np.ndarray) or len(index) < threads:
        return take_rows(X, index)
    out = np.empty((len(index), X.shape[1]), dtype=X.dtype)
    host_map(lambda rows: take_rows_into(X, index[rows], out[rows]),
             row_blocks(len(index), threads))
    return out


# Host threads for large copies and sums (numpy lets go of the GIL while it
# copies plain numbers or sums them), up to this many and half the cores;
# two pools of them (foreground, background), each with the process that
# made it (a forked child inherits an executor but not its threads).
_HOST_THREADS = 8
_HOST_EXECUTORS = {}
_HOST_LOCK = threading.Lock()


# From this many bytes up, host work on arrays is worth more than one thread
# (and a weight matrix's export is worth host arrays touched ahead of it).
HOST_WORK_BYTES = 1 << 24


def host_threads(n_bytes, least_bytes=HOST_WORK_BYTES):
    """How many host threads to share work on ``n_bytes`` of arrays: 1 below ``least_bytes``."""
    if n_bytes < least_bytes:
        return 1
    return max(1, min(_HOST_THREADS, (os.cpu_count() or 1) // 2))


def row_blocks(n_rows, threads):
    """``threads`` slices that split ``n_rows`` rows into blocks of near-equal size.

    Examples
    --------
    >>> row_blocks(10, 3)
    [slice(0, 3, None), slice(3, 6, None), slice(6, 10, None)]
    """
    bounds = np.linspace(0, n_rows, threads + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def host_map(fn, items, background=False):
    """``[fn(item) for item in items]``, run by the shared host threads.

    ``background`` work (the resident copy's upload, which goes on beside a
    fit's set-up and first steps) has a pool of threads of its own. With
    one pool, the threads take tasks in the order given: a fit's initial
    sample, gathered and summed while the upload runs, could have its tasks
    queued behind the upload's copy of a 64 MB chunk, twice, on the fit's
    critical path. With two, each waits only for its own.

    Examples
    --------
    >>> host_map(lambda x: x * x, range(4))
    [0, 1, 4, 9]
    """
    key = ("background" if background else "foreground", os.getpid())
    with _HOST_LOCK:
        executor = _HOST_EXECUTORS.get(key)
        if executor is None:
            executor = _HOST_EXECUTORS[key] = concurrent.futures.ThreadPoolExecutor(
                _HOST_THREADS, thread_name_prefix=f"sparse_dict-{key[0]}")
    return list(executor.map(fn, items))


def sample_moments(sample, row_norms=False):
    """The mean squared row norm and the mean row of a sample, summed in float64.

    Blocks of rows are summed by several host threads when the sample is
    large (each product and sum in float64, without a float64 copy of the
    sample).

    Parameters
    ----------
    sample : ndarray of shape (n_rows, n_features)

    row_norms : bool, default=False
        Also return each row's squared norm (float64), which the sums are
        made of.

    Returns
    -------
    msn : float
    mean : ndarray of shape (n_features,), float64
    norms : ndarray of shape (n_rows,), float64
        Only with ``row_norms``.

    Examples
    --------
    >>> import numpy as np
    >>> msn, mean = sample_moments(np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32))
    >>> msn, mean.tolist()
    (13.0, [2.0, 2.0])
    """
    threads = min(host_threads(sample.nbytes), len(sample))
    if threads <= 1:
        norms, column_sums = _moment_sums(sample)
        moments = (float(np.mean(norms)), column_sums / len(sample))
        return moments + (norms,) if row_norms else moments

    def sums(block):
        norms, column_sums = _moment_sums(block)
        return norms.sum(), column_sums, norms

    parts = host_map(lambda rows: sums(sample[rows]), row_blocks(len(sample), threads))
    moments = (float(sum(p[0] for p in parts)) / len(sample),
               sum(p[1] for p in parts) / len(sample))
    return moments + (np.concatenate([p[2] for p in parts]),) if row_norms else moments


def _moment_sums(block, rows=256):
    """Each row's squared norm and the column sums of ``block``, in float64.

    From float64 copies of ``rows`` rows at a time (in the cache), whose
    sums run at float64's full speed: numpy's einsum casting each element
    took twice as long for a 8192 x 768 float32 sample on one core
    (11.9 ms against 5.7), for the same values.
    """
    n_rows, width = block.shape
    norms = np.empty(n_rows)
    column_sums = np.zeros(width)
    buf = np.empty((min(rows, n_rows), width))
    for start in range(0, n_rows, rows):
        part = buf[:min(rows, n_rows - start)]
        part[...] = block[start:start + rows]
        np.einsum("ij,ij->i", part, part, out=norms[start:start + len(part)])
        column_sums += part.sum(axis=0)
    return norms, column_sums


def geometric_median(points, n_iter=100, tol=1e-6):
    """Geometric median of the rows of ``points`` by Weiszfeld's iteration.

    Parameters
    ----------
    points : ndarray or torch.Tensor of shape (n_points, n_features)
        A tensor is worked on where it lies (a GPU), in float64.
    n_iter : int
    tol : float
        Stop once the estimate moves less than ``tol`` times the data's
        scale: the median over rows of a row's largest deviation from the
        coordinate-wise median, where the iteration starts.

    Returns
    -------
    median : ndarray or torch.Tensor of shape (n_features,)
        Of the kind of ``points``.

    Examples
    --------
    >>> import numpy as np
    >>> pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> bool(np.linalg.norm(geometric_median(pts)) < 1.0)  # robust to the outlier
    True
    """
    if not isinstance(points, torch.Tensor):
        return geometric_median(torch.from_numpy(np.asarray(points, dtype=np.float64)),
                                n_iter, tol).numpy()
    points = points.double()
    # Started from the coordinate-wise median and stopped on a scale of the
    # typical row, both robust: from the mean, with a scale of the largest
    # entry, one entry of 1e11 in 3,000 rows left the estimate 3.7 from
    # the others' centre (the tolerance was the outlier's), and 3.7e4 at 1e15.
    median = points.median(dim=0).values
    scale = float((points - median).abs().amax(dim=1).median())
    if not scale > 0:  # most rows equal: the largest entry's scale, or any
        scale = max(float(points.abs().max()), 1e-12)
    for _ in range(n_iter):
        dist = torch.linalg.vector_norm(points - median, dim=1)
        # A point sitting on the estimate would get infinite weight.
        weights = 1.0 / dist.clamp_min(1e-12 * scale)
        new = weights @ points / weights.sum()
        moved = float(torch.linalg.vector_norm(new - median))
        median = new
        if moved < tol * scale:
            break
    return median


def _map_rows(fn, X, width, batch_size, device, out_dtype):
    """Apply ``fn`` to ``X`` batch by batch on ``device``; collect into numpy.

    ``fn(batch, out)`` maps a (batch, n) tensor to a (batch, width) tensor,
    written into (and returned as) ``out`` where that is not None. It runs in ``out_dtype``
    (float32 or float64), and the results go into one preallocated numpy
    array, so only one batch is ever on the device. On the CPU each batch's
    results are computed in that array's own rows: made apart and copied
    in, they cost ``transform`` 1.3 to 1.5 times a plain torch computation
    of the same codes (20,000 rows of 512, 4,096 atoms, one thread).
    """
    dtype = torch.float64 if out_dtype == np.float64 else torch.float32
    out = np.empty((X.shape[0], width), dtype=out_dtype)
    in_place = torch.device(device).type == "cpu"
    with torch.inference_mode():
        for index in iter_batches(X, batch_size):
            rows = torch.from_numpy(out[index]) if in_place else None
            result = fn(to_device(take_rows(X, index), device, dtype), rows)
            if not in_place:
                out[index] = result.cpu().numpy()
    return out


def _tensors(arrays, device, out_dtype):
    dtype = torch.float64 if out_dtype == np.float64 else torch.float32
    return [torch.as_tensor(a).to(device=device, dtype=dtype) for a in arrays]


def _encoder(tensors, activation, device, out_dtype):
    """The encoder as a function of a (batch, n) tensor, and its width; its tensors
    are moved to ``device`` once, here."""
    names = ("encoder_weights", "encoder_bias", "decoder_bias") + tuple(activation.state_names)
    W, b, c, *extra = _tensors([tensors[n] for n in names], device, out_dtype)
    state = dict(zip(activation.state_names, extra))

    def encode(x, out=None):
        # The pre-activations are the codes' memory: the activation works in place.
        return activation.encode_(torch.addmm(b, x - c, W.t(), out=out), state)

    return encode, W.shape[0]


def _decoder(atoms, bias, device, out_dtype):
    """The decoder as a function of a (batch, n_components) tensor, and its width."""
    A, b = _tensors((atoms, bias), device, out_dtype)

    return (lambda f, out=None: torch.addmm(b, f, A, out=out)), A.shape[1]


def encode_array(tensors, activation, X, batch_size, device, out_dtype):
    """Codes ``activation((X - decoder_bias) @ encoder_weights.T + encoder_bias)``.

    ``tensors`` maps the fitted tensors' names (``encoder_weights``,
    ``encoder_bias``, ``decoder_bias`` and the activation's own state, such
    as ``threshold``) to numpy arrays in the caller's units.
    """
    encode, width = _encoder(tensors, activation, device, out_dtype)
    return _map_rows(encode, X, width, batch_size, device, out_dtype)


def median_squared_distance(rows, centre):
    """The median over ``rows`` (a 2-D tensor) of their squared distance from ``centre``.

    The difference in the rows' dtype (float32, as training takes it),
    squared and summed in float64 (squared in float32, rows of 1e20
    overflowed); torch's median, the lower middle of an even count. For the
    training rows on the device and for rows given to ``transform`` alike.

    Examples
    --------
    >>> rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    >>> median_squared_distance(rows, torch.zeros(2))
    4.0
    """
    centred = rows - centre.to(device=rows.device, dtype=rows.dtype)
    return float(centred.double().pow(2).sum(dim=1).median())


def decode_array(atoms, bias, codes, batch_size, device, out_dtype):
    """Reconstructions ``codes @ atoms + bias`` of every row of ``codes``.

    Sparse ``codes`` are decoded on the host by scipy, whatever ``device``:
    their product costs their non-zeros times the width, where densified a
    batch at a time it cost every atom's (15 times as long at an L0 of 32
    in 4,096 atoms, with an 8,192 x 4,096 dense batch on the way).
    """
    if sp.issparse(codes):
        return _decode_sparse(atoms, bias, codes.tocsr(), batch_size, out_dtype)
    decode, width = _decoder(atoms, bias, device, out_dtype)
    return _map_rows(decode, codes, width, batch_size, device, out_dtype)


def _decode_sparse(atoms, bias, codes, batch_size, out_dtype):
    atoms = np.asarray(atoms, dtype=out_dtype)
    bias = np.asarray(bias, dtype=out_dtype)
    out = np.empty((codes.shape[0], atoms.shape[1]), dtype=out_dtype)
    for index in iter_batches(codes, batch_size):
        block = out[index]
        block[...] = codes[index].astype(out_dtype, copy=False) @ atoms
        block += bias
    return out


def reconstructor(tensors, activation, batch_size, device, out_dtype):
    """A function of rows giving their reconstructions, ``decode(encode(X))``.

    For scoring data a block of rows at a time: the fitted tensors are moved
    to ``device`` once for every call (not once a block), and the codes of a
    batch go from the encoder to the decoder on the device, never to the
    host. ``tensors`` are as :func:`encode_array` takes them, with
    ``components``.
    """
    encode, _ = _encoder(tensors, activation, device, out_dtype)
    decode, width = _decoder(tensors["components"], tensors["decoder_bias"], device, out_dtype)
    return lambda X: _map_rows(lambda x, out: decode(encode(x), out), X, width, batch_size,
                               device, out_dtype)
