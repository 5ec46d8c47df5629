"""Feeding training batches to the device ahead of the step that uses them.

A training step on a GPU takes a few milliseconds; gathering a batch of
shuffled rows from a numpy array and copying it to the GPU takes as long
again if it is done in the step's thread, between steps, and the GPU idles
while it happens. :class:`BatchFeed` takes that work off the step's path in
one of two ways:

* **resident**: the rows (scaled, float32) are copied to the device once,
  and each batch is gathered there by index (the indices of a batch are a
  few kilobytes, copied from pinned memory without waiting). The copy runs
  in a background thread, on its own CUDA stream, from the moment the feed
  is made: the batches asked for before it has landed are streamed (below),
  so that a short fit trains while its data moves instead of waiting for
  it, until no more than the read-ahead's rows are left to send, when the
  steps wait for the copy instead;
* **streamed**: host threads gather each batch's rows into pinned buffers
  allocated once (and reused by later fits), and the copy to the device runs
  on a side CUDA stream, batches ahead of the step; the step's stream waits
  for its batch's copy on the device, never on the host.

The batch order is the one :func:`~sparse_dict._torch.data.iter_batches`
draws on the host, so every mode trains on the same batches in the same
order and gives the same model. On the CPU the defaults gather in the
caller's thread, as before; the resident and threaded modes run there too
(for tests and for the CPU device's users who ask for them).
"""

import collections
import concurrent.futures
import contextlib
import os
import threading
import time

import numpy as np
import torch

from sparse_dict._torch.data import (
    host_map,
    host_threads,
    row_blocks,
    take_rows,
    take_rows_into,
    to_device,
)

# Rows copied to the device at a time when the data moves there once: the
# pinned staging buffer stays near 64 MB whatever the width.
_UPLOAD_BYTES = 1 << 26
# Index buffers in flight for the resident mode; the oldest is reused only
# once its copy has run, which this many steps later it always has.
_INDEX_RING = 8


def default_workers(device):
    """Host threads that gather rows ahead of the step: none on the CPU.

    On the CPU the step's own matrix products use every core and a batch's
    gather is a small share of a step; on a GPU the gather is the host's
    whole share of the work, and up to four threads keep a fast step fed.
    """
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def resident_fits(n_rows, n_features, device, budget, reserved_bytes=0):
    """Whether ``n_rows x n_features`` float32 rows fit ``budget`` of the device's free memory.

    Parameters
    ----------
    n_rows, n_features : int
    device : torch.device
    budget : float
        Share of the device's free memory (after ``reserved_bytes``) that
        the rows may take; 0 never moves them.
    reserved_bytes : int
        Memory the training step will still allocate (its workspace).

    Returns
    -------
    bool
        Always False on the CPU, where the rows already are in the host's
        memory.

    Examples
    --------
    >>> import torch
    >>> resident_fits(1000, 16, torch.device("cpu"), 0.5)
    False
    """
    if device.type != "cuda" or budget <= 0:
        return False
    free = torch.cuda.mem_get_info(device)[0]
    return n_rows * n_features * 4 <= budget * max(free - reserved_bytes, 0)


class _PinnedPool:
    """Host buffers kept between fits, so that pinning (slow) happens once.

    Buffers are taken for the length of one feed and given back when it
    closes; two fits running at once in threads take different buffers. At
    most ``max_bytes`` are kept (pinned memory cannot be swapped out).
    """

    def __init__(self, max_bytes=1 << 30):
        self._lock = threading.Lock()
        self._free = collections.defaultdict(list)
        self._max_bytes = max_bytes
        self._kept_bytes = 0

    def take(self, shape, dtype, pin):
        key = (tuple(shape), dtype, pin)
        with self._lock:
            if self._free[key]:
                buf = self._free[key].pop()
                self._kept_bytes -= _nbytes(buf)
                return buf
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def give_back(self, buffers):
        with self._lock:
            for buf in buffers:
                # Only pinned memory is slow to make; other buffers go.
                if buf.is_pinned() and self._kept_bytes + _nbytes(buf) <= self._max_bytes:
                    self._free[(tuple(buf.shape), buf.dtype, buf.is_pinned())].append(buf)
                    self._kept_bytes += _nbytes(buf)


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


_POOL = _PinnedPool()


class BatchFeed:
    """The scaled training batches of ``X`` on ``device``, gathered ahead.

    Parameters
    ----------
    X : ndarray, memmap or CSR matrix of shape (n_samples, n_features)
    device : torch.device
    scale : float or None
        Every row is multiplied by it (the trainer's input scale); None
        until :meth:`set_scale` gives it, which must happen before the
        first pass.
    batch_size : int
        The largest batch that will be asked for (the buffers' size).
    resident : bool
        Copy the rows to the device once, scaled and in float32, and gather
        each batch there.
    workers : int
        Host threads that gather streamed batches ahead of the step; 0
        gathers in the caller's thread when the batch is asked for.
    depth : int
        Batches in flight ahead of the one being used (streamed mode with
        workers).

    Examples
    --------
    >>> import numpy as np, torch
    >>> X = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> feed = BatchFeed(X, torch.device("cpu"), scale=2.0, batch_size=2, workers=1)
    >>> batches = [x for _, x in feed.batches([np.array([0, 5]), np.array([1])])]
    >>> feed.close()
    >>> batches[0].tolist(), batches[1].tolist()
    ([[0.0, 2.0], [20.0, 22.0]], [[4.0, 6.0]])
    """

    def __init__(self, X, device, scale, batch_size, resident=False, workers=0, depth=2):
        self.X = X
        self._largest = int(batch_size)
        self.device = torch.device(device)
        self.scale = None if scale is None else float(scale)
        self.workers = int(workers)
        self.depth = max(1, int(depth))
        self._cuda = self.device.type == "cuda"
        self._taken = []
        self._rings = {}
        self._copy_stream = None
        self._executor = None
        self._live = None  # the generator of the current pass
        self.resident = resident
        # Batches served from the host while the resident copy was on its way.
        self.streamed_batches = 0
        # Seconds the steps waited for the copy's last rows instead.
        self.upload_wait_s = 0.0
        self._rows_sent = 0  # rows whose copy to the device has been issued
        self._data = self._uploader = None
        if resident:
            self._start_upload()

    def set_scale(self, scale):
        """Give the input scale, when the feed was made before it was known.

        The resident copy is multiplied by it once its rows have landed;
        streamed batches, as they are gathered. It cannot change afterwards.
        """
        scale = float(scale)
        if self.scale is not None and self.scale != scale:
            raise ValueError(f"The feed's scale is {self.scale}; it cannot become {scale}.")
        self.scale = scale
        if self._uploader is not None:
            self._scale_given.set()

    # ------------------------------------------------------------- resident
    def _start_upload(self):
        """Start copying ``X`` to the device in a background thread (see :meth:`_upload`)."""
        n_rows, n_features = self.X.shape
        self._data = torch.empty((n_rows, n_features), dtype=torch.float32, device=self.device)
        chunk = max(1, min(n_rows, _UPLOAD_BYTES // (4 * n_features)))
        staging = ([self._take((chunk, n_features), torch.float32) for _ in range(2)]
                   if self._cuda else None)
        self._upload_stream = torch.cuda.Stream(self.device) if self._cuda else None
        if self._cuda:
            # self._data comes from the main stream's pool: work queued there
            # on a block the allocator handed back comes before the copy.
            self._upload_stream.wait_stream(torch.cuda.current_stream(self.device))
        self._uploaded = threading.Event()
        self._scale_given = threading.Event()
        if self.scale is not None:
            self._scale_given.set()
        self._cancelled = False
        self._upload_error = None
        self._uploader = threading.Thread(target=self._upload, args=(chunk, staging),
                                          name="sparse_dict-upload", daemon=True)
        self._uploader.start()

    def _upload(self, chunk, staging):
        """``X * scale`` into ``self._data``, in chunks; sets ``_uploaded`` when it has landed.

        On a GPU each chunk is copied by several host threads into one of
        two pinned staging buffers and from there to the device on the
        upload stream, so that the host copies one chunk while the link
        carries the other. The scale is applied on the device once every row
        is there and the scale is known. Whatever happens, the stream's work
        is finished before ``_uploaded`` is set, so that nothing still
        writes into memory that :meth:`close` frees.
        """
        data, X = self._data, self.X
        n_rows = X.shape[0]
        try:
            with contextlib.ExitStack() as stack:
                if self._cuda:
                    stack.enter_context(torch.cuda.device(self.device))
                    stack.enter_context(torch.cuda.stream(self._upload_stream))
                done = [None, None]
                for i, start in enumerate(range(0, n_rows, chunk)):
                    if self._cancelled:
                        return
                    rows = take_rows(X, slice(start, min(start + chunk, n_rows)))
                    if not self._cuda:
                        _parallel_copy(rows, data[start:start + len(rows)].numpy(),
                                       background=True)
                        self._rows_sent = start + len(rows)
                        continue
                    buf = staging[i % 2]
                    if done[i % 2] is not None:
                        # The copy out of this buffer two chunks ago must have
                        # run before the buffer is written again.
                        done[i % 2].synchronize()
                    _parallel_copy(rows, buf[: len(rows)].numpy(), background=True)
                    data[start:start + len(rows)].copy_(buf[: len(rows)], non_blocking=True)
                    done[i % 2] = torch.cuda.Event()
                    done[i % 2].record(self._upload_stream)
                    self._rows_sent = start + len(rows)
                self._scale_given.wait()
                if not self._cancelled:
                    data.mul_(self.scale)
        except BaseException as exc:  # noqa: BLE001 - given to the caller at the handover
            self._upload_error = exc
        finally:
            if self._cuda:
                self._upload_stream.synchronize()
            self._uploaded.set()

    def _landed(self):
        """Whether the resident copy is ready to gather from (raises its error if it failed)."""
        if not self._uploaded.is_set():
            return False
        if self._upload_error is not None:
            raise self._upload_error
        return True

    def rows(self, index):
        """Rows ``index`` of the resident copy (scaled, on the device), as a new tensor.

        ``index``: sorted row indices, or None for every row. None when the
        feed has no resident copy ready (a streamed feed, a copy still on
        its way or failed): the caller then gathers the rows from ``X``.
        Equal to ``X``'s rows in float32 times the scale, as the steps see
        them; a fit's calibration sample comes from here, which spares it
        a copy to the device that would queue behind the export's.
        """
        # (A failed copy's error is the batches' to raise.)
        if (self._data is None or not self._uploaded.is_set()
                or self._upload_error is not None):
            return None
        if index is None:
            return self._data.clone()
        return self._data.index_select(0, torch.as_tensor(index, device=self.device))

    def _read_ahead(self):
        """Streamed batches gathered ahead of the one in use (see :meth:`_streamed_batches`)."""
        return self.depth + self.workers if self.workers else 1

    def _nearly_landed(self):
        """Whether the copy on its way has no more than the read-ahead's rows left to send.

        Streaming a batch then costs more than waiting for the copy: its
        rows are gathered one by one on the host, beside the copy's own
        host threads, and cross the same link. On the H200 machine a 50-step
        bf16 fit streamed 3 batches at 7 to 10.6 ms a step while the last
        fifth of its copy (about 9 ms) was on its way; its resident steps
        took 1.7 ms. Before any row is sent the copy's pace is unknown (it
        may not have started), and the batches are streamed.
        """
        sent = self._rows_sent
        return sent > 0 and self.X.shape[0] - sent <= self._read_ahead() * self._largest

    def _handover_batches(self, items):
        """Streamed batches until the resident copy has landed, resident ones after.

        Once the copy is nearly done (:meth:`_nearly_landed`), no further
        batch is streamed: the batches already gathered are used, and the
        next waits for the copy (:attr:`upload_wait_s`). The order of the
        batches is the caller's either way, and so are their values (the
        same float32 rows times the same float32 scale).
        """
        items = iter(items)
        if not self._landed():
            waiting = False

            def until_landed():
                nonlocal waiting
                while not self._uploaded.is_set():
                    if self._nearly_landed():
                        waiting = True
                        return
                    item = next(items, None)
                    if item is None:
                        return
                    yield item

            for batch in self._streamed_batches(until_landed()):
                if batch[1] is not None:
                    self.streamed_batches += 1
                yield batch
            if not waiting and not self._landed():
                return  # the pass ended first; the next one looks again
            if not self._uploaded.is_set():
                start = time.perf_counter()
                self._uploaded.wait()
                self.upload_wait_s += time.perf_counter() - start
            self._landed()  # raises the copy's error, if it failed
        yield from self._resident_batches(items)

    def _ring(self, name, n_buffers, shape, dtype):
        """A ring of host buffers and their last copies' events, made once per feed.

        Every pass reuses it: a buffer is written again only once the copy
        out of it (in this pass or an earlier one) has run. A resident feed
        has two: the streamed rows' (while its copy is on its way) and the
        indices'.
        """
        if name not in self._rings:
            self._rings[name] = ([self._take(shape, dtype) for _ in range(n_buffers)],
                                 [None] * n_buffers)
        return self._rings[name]

    def _resident_batches(self, items):
        ring, events = self._ring("indices", _INDEX_RING, (self._largest,), torch.int64)
        for i, (index, local) in enumerate(items):
            if local is None or len(local) == 0:
                yield index, None
                continue
            slot = i % _INDEX_RING
            n = len(local)
            if events[slot] is not None:
                events[slot].synchronize()
            host = ring[slot][:n]
            host.numpy()[...] = local
            if self._cuda:
                index_t = host.to(self.device, non_blocking=True)
                events[slot] = torch.cuda.Event()
                # On the fit's device's stream, which need not be the current one.
                events[slot].record(torch.cuda.current_stream(self.device))
            else:
                index_t = host
            yield index, self._data.index_select(0, index_t)

    # ------------------------------------------------------------- streamed
    def _fill(self, buf, local, ready):
        """Gather rows ``local`` of ``X`` into ``buf`` (a worker's job)."""
        if ready is not None:
            # The copy to the device out of this buffer, batches ago.
            ready.synchronize()
        # One copy, straight into the (pinned) buffer, for a float32 array.
        take_rows_into(self.X, local, buf[: len(local)].numpy())
        return len(local)

    def _streamed_batches(self, items):
        if self.workers == 0:
            for index, local in items:
                if local is None or len(local) == 0:
                    yield index, None
                    continue
                x = to_device(take_rows(self.X, local), self.device)
                # Not in place on the CPU: the tensor may share memory with X.
                yield index, x.mul_(self.scale) if self._cuda else x.mul(self.scale)
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="sparse_dict-feed")
        n_buffers = self._read_ahead() + 1
        ring, ready = self._ring("rows", n_buffers, (self._largest, self.X.shape[1]),
                                 torch.float32)
        if self._cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        copy_stream = self._copy_stream
        pending = collections.deque()
        items = iter(items)
        count = 0

        def submit():
            nonlocal count
            item = next(items, None)
            if item is None:
                return
            index, local = item
            if local is None or len(local) == 0:
                pending.append((index, None, None))
                return
            slot = count % n_buffers
            count += 1
            job = self._executor.submit(self._fill, ring[slot], local, ready[slot])
            pending.append((index, slot, job))

        for _ in range(self._read_ahead()):
            submit()
        try:
            while pending:
                index, slot, job = pending.popleft()
                submit()
                if job is None:
                    yield index, None
                    continue
                n = job.result()
                if not self._cuda:
                    # A copy: the buffer is refilled while the step runs.
                    yield index, ring[slot][:n].mul(self.scale)
                    continue
                main = torch.cuda.current_stream(self.device)
                with torch.cuda.stream(copy_stream):
                    x = ring[slot][:n].to(self.device, non_blocking=True)
                    ready[slot] = torch.cuda.Event()
                    ready[slot].record(copy_stream)
                main.wait_event(ready[slot])
                # x was allocated on the copy stream and is used on the main one.
                x.record_stream(main)
                yield index, x.mul_(self.scale)
        finally:
            for _, _, job in pending:
                if job is not None:
                    job.cancel()
            for _, _, job in pending:
                if job is not None and not job.cancelled():
                    concurrent.futures.wait([job])
            for event in ready:
                if event is not None:
                    event.synchronize()

    # ----------------------------------------------------------------- API
    def batches(self, indices, select=None):
        """Yield ``(index, x)`` for each row index of ``indices``, in order.

        Parameters
        ----------
        indices : iterable of ndarray or slice
            Row indices of each batch (from :func:`iter_batches`).
        select : callable, optional
            Maps a batch's indices to the rows this process trains on (its
            share in a data-parallel fit); ``x`` is None when the share is
            empty.

        Yields
        ------
        index : ndarray or slice
            The batch's indices, as given.
        x : torch.Tensor of shape (n_rows, n_features) or None
            The selected rows times ``scale``, float32, on the device.
            Gathering runs ahead: batches after the one being used may
            already be read when the caller stops early.
        """
        def items():
            for index in indices:
                local = index
                if isinstance(local, slice):
                    local = np.arange(*local.indices(self.X.shape[0]))
                if select is not None:
                    local = select(local)
                yield index, np.asarray(local, dtype=np.int64)

        if self.scale is None:
            raise RuntimeError("BatchFeed.batches needs the scale: call set_scale first.")
        if self._live is not None:
            self._live.close()  # the previous pass's read-ahead, if it stopped early
        make = self._handover_batches if self.resident else self._streamed_batches
        self._live = make(items())
        return self._live

    def _take(self, shape, dtype):
        buf = _POOL.take(shape, dtype, pin=self._cuda)
        self._taken.append(buf)
        return buf

    def close(self):
        """Stop the workers and give the pinned buffers back for later fits."""
        if self._live is not None:
            # Even after an exception in the caller's loop: its read-ahead
            # is cancelled and its copies waited for here, not when it is
            # collected.
            self._live.close()
            self._live = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._uploader is not None:
            # A copy still on its way stops at its next chunk; its stream's
            # work is finished before the thread ends.
            self._cancelled = True
            self._scale_given.set()
            self._uploader.join()
            self._uploader = None
        if self._cuda:
            # No copy out of a buffer may still be running once it is reused.
            torch.cuda.current_stream(self.device).synchronize()
        _POOL.give_back(self._taken)
        self._taken = []
        self._rings = {}
        self._data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# A host page: touching one value in each makes the kernel map it.
_PAGE_BYTES = 4096


def touch_pages(array):
    """Write one value into each page of a new ``array`` (C-contiguous), so that its pages exist.

    A copy into new host memory pays, besides the copy, a page fault for
    every page (the kernel maps and zeroes it): for a 75 MB weight matrix on
    the H200 machine's host, most of the 17 ms its copy out of a pinned
    buffer took with one thread. Touched ahead of time (by a thread that has
    nothing else to do, while a GPU trains), the array costs the copy only.
    Its values are then zeros where touched and undefined elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> a = touch_pages(np.empty((3, 4096), dtype=np.float32))
    >>> a.shape, float(a[0, 0]), float(a[0, 1024])
    ((3, 4096), 0.0, 0.0)
    """
    flat = array.reshape(-1)
    flat[:: max(1, _PAGE_BYTES // array.itemsize)] = 0
    return array


# cudaHostRegisterPortable.
_HOST_REGISTER_PORTABLE = 1


class CudaRegistrar:
    """Page-locks host arrays in place for a GPU's copies (``cudaHostRegister``), and unlocks them.

    A GPU copies into page-locked memory by DMA at the link's speed; into
    ordinary memory the driver stages the copy, at a fraction of it. On the
    H200 machine a 75 MB weight matrix crossed into a registered array in
    1.5 ms, against 4.5 ms through a pinned buffer and a host copy into an
    array touched before (6.6 ms into new memory); registering it took 3.4
    ms and unregistering 1.8 ms, which a thread pays beside the training
    and after the copy. Memory stays locked only between the two.
    """

    def register(self, array):
        """Lock ``array`` (C-contiguous); False where CUDA refuses (the array is as before)."""
        try:
            # Portable: pinned for every device's context, not only the one
            # current on the registering thread (device 0 by default, where
            # the fit may run on another).
            err = torch.cuda.cudart().cudaHostRegister(array.ctypes.data, array.nbytes,
                                                      _HOST_REGISTER_PORTABLE)
        except Exception:  # noqa: BLE001 - no CUDA runtime: the plain copy serves
            return False
        # A refusal sets this thread's last CUDA error only (the caller's
        # thread is its own), which no torch call of the training reads.
        return int(err) == 0

    def unregister(self, array):
        torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)


def page_aligned_empty(shape, dtype):
    """A new C-contiguous array that starts on a page and alone fills every page it touches.

    Registering memory with CUDA locks whole pages; an array that shared a
    page with other memory would lock that too, and a second registration
    of the page would fail.

    Examples
    --------
    >>> a = page_aligned_empty((3, 5), np.float32)
    >>> a.shape, a.dtype.name, a.ctypes.data % 4096, a.flags.c_contiguous
    ((3, 5), 'float32', 0, True)
    """
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pages = -(-n_bytes // _PAGE_BYTES)
    raw = np.empty((pages + 1) * _PAGE_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % _PAGE_BYTES
    return raw[start:start + n_bytes].view(dtype).reshape(shape)


class TouchedArrays:
    """New host arrays, their pages touched by a background thread, for a later copy into them.

    Made when a fit's training starts, for the weight matrices it will
    export (:meth:`sparse_dict._torch.Trainer.prepare_export`): the thread
    pays their page faults (:func:`touch_pages`) while the GPU trains, and
    the export only copies. Holding them costs the host memory the export
    takes anyway. With a ``registrar`` (on a GPU, a :class:`CudaRegistrar`),
    the thread then page-locks each array, so that the GPU copies straight
    into it; it stops registering once :meth:`take` is called, and whoever
    holds a registered array unregisters it (:meth:`take`'s caller, or
    :meth:`release`).

    Parameters
    ----------
    shapes : dict of str to tuple
    dtype : numpy dtype
    registrar : CudaRegistrar or None

    Examples
    --------
    >>> import numpy as np
    >>> into = TouchedArrays({"w": (2, 3)}, np.float64)
    >>> arrays = into.arrays()
    >>> arrays["w"].shape, arrays["w"].dtype.name
    ((2, 3), 'float64')
    """

    def __init__(self, shapes, dtype, registrar=None):
        self.dtype = np.dtype(dtype)
        new = np.empty if registrar is None else page_aligned_empty
        self._arrays = {name: new(shape, dtype=self.dtype) for name, shape in shapes.items()}
        self.registrar = registrar
        self._registered = {}
        self._lock = threading.Lock()
        self._taken = False
        # A thread of its own, not the shared host threads: those copy the
        # first batches and the upload at the same time, which must not wait.
        self._thread = threading.Thread(target=self._touch, name="sparse_dict-touch",
                                        daemon=True)
        self._thread.start()

    def _touch(self):
        for name, array in self._arrays.items():
            touch_pages(array)
            if self.registrar is None:
                continue
            with self._lock:
                # Once taken, a registration more would only hold the export up.
                if self._taken:
                    return
                if self.registrar.register(array):
                    self._registered[name] = array

    def arrays(self):
        """The arrays, once their pages are touched (waits for the thread)."""
        self._thread.join()
        return self._arrays

    def take(self):
        """The arrays, and the names of those registered, which the caller now unregisters.

        Stops the thread's registering, then waits for it.
        """
        with self._lock:
            self._taken = True
        self._thread.join()
        registered, self._registered = set(self._registered), {}
        return self._arrays, registered

    def release(self):
        """Unregister the arrays still registered here, in a thread of its own (not waited for).

        For arrays no copy will use: a training that failed, an export of
        another dtype.
        """
        with self._lock:
            self._taken = True
        self._thread.join()
        registered, self._registered = self._registered, {}
        unregister_later(self.registrar, registered.values())

    def __del__(self):
        # A safety net: memory must not be freed while CUDA has it locked.
        registered = getattr(self, "_registered", None)
        if registered:
            for array in registered.values():
                self.registrar.unregister(array)


def unregister_later(registrar, arrays):
    """Unregister ``arrays`` in a thread of its own, which holds them until it has.

    Unregistering a 75 MB array took 1.8 ms on the H200 machine, which the
    caller (a fit returning its arrays) need not wait for.
    """
    arrays = list(arrays)
    if not arrays:
        return None

    def run():
        for array in arrays:
            registrar.unregister(array)

    thread = threading.Thread(target=run, name="sparse_dict-unregister", daemon=True)
    thread.start()
    return thread


def to_host(tensors, into=None):
    """Each tensor as a new numpy array; from a GPU through reused pinned buffers.

    A copy from a GPU into ordinary (pageable) host memory is staged by the
    driver and runs at a fraction of the link's speed: in a profile of a
    50-step bf16 fit on an H200, 12 such copies took 109 ms of the GPU's
    time, most of it the two weight matrices at the end of the fit. Into
    pinned memory the copy runs at the link's speed, and one host copy makes
    the array the caller owns. Every tensor's copy to the host is queued
    first, so that the host copies one array out of its buffer while the
    link carries the next. If pinned memory cannot be had, the plain copy
    is used. :class:`HostCopy` starts such a copy and lets the caller work
    while it runs.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
    into : dict of str to ndarray, optional
        Arrays to copy some of the tensors into instead of new ones
        (C-contiguous, of the tensor's shape, any float dtype: the copy
        converts), such as :class:`TouchedArrays`'. One of another shape is
        not used.

    Returns
    -------
    dict of str to ndarray

    Examples
    --------
    >>> import numpy as np, torch
    >>> to_host({"a": torch.arange(3.0)})["a"].tolist()
    [0.0, 1.0, 2.0]
    >>> out = np.empty(3)
    >>> to_host({"a": torch.arange(3.0)}, into={"a": out})["a"] is out
    True
    """
    return HostCopy(tensors, into).result()


class HostCopy:
    """:func:`to_host`'s copy, started now and finished by :meth:`result`.

    With ``ahead``, a GPU's tensors are copied into pinned buffers on a
    stream of their own, after the work queued so far, and a thread copies
    each out of its buffer as it lands: the caller meanwhile queues and runs
    other work, which must leave the tensors as they are (a fit calibrates
    its activation while its weights cross to the host). Without, or for
    tensors on the host, the copies are made at once.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
    into : dict of str to ndarray, optional
        As for :func:`to_host`.
    ahead : bool
    registered : set of str, optional
        Names of ``into``'s arrays that are page-locked for the GPU
        (:meth:`TouchedArrays.take`): the GPU copies straight into those of
        the tensor's dtype, with no pinned buffer and no host copy. The
        copy unregisters them all (by ``registrar``) once it is done.
    registrar : CudaRegistrar, optional

    Examples
    --------
    >>> import torch
    >>> copy = HostCopy({"a": torch.arange(3.0)}, ahead=True)
    >>> copy.result()["a"].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, tensors, into=None, ahead=False, registered=(), registrar=None):
        self._names = list(tensors)
        self._into = {k: a for k, a in (into or {}).items()
                      if k in tensors and a.shape == tuple(tensors[k].shape)
                      and a.flags.c_contiguous}
        self._registered = [into[k] for k in registered]
        self._registrar = registrar
        self._direct = {k for k in registered if k in self._into
                        and torch.from_numpy(self._into[k][:0]).dtype == tensors[k].dtype}
        on_gpu = {k: t for k, t in tensors.items() if t.device.type == "cuda"}
        self._arrays, self._taken, self._queued = {}, [], {}
        self._thread, self._error = None, None
        try:
            for k, t in tensors.items():
                if k not in on_gpu:
                    self._arrays[k] = _parallel_copy(t.detach().cpu().numpy(), self._into.get(k))
            self._queue(on_gpu, ahead)
        except BaseException:
            self._release()
            raise
        if ahead and self._queued:
            self._thread = threading.Thread(target=self._drain_or_keep_error,
                                            name="sparse_dict-export", daemon=True)
            self._thread.start()
        else:
            self._drain()

    def _queue(self, on_gpu, ahead):
        """Queue every GPU tensor's copy into a pinned buffer (the plain copy without one)."""
        streams = {}
        for name, tensor in on_gpu.items():
            if name in self._direct:
                # Page-locked: the GPU's copy lands in the caller's array itself.
                buf = torch.from_numpy(self._into[name])
            else:
                try:
                    buf = _POOL.take(tuple(tensor.shape), tensor.dtype, pin=True)
                except RuntimeError:
                    host = tensor.detach().cpu().numpy()
                    self._arrays[name] = (host if name not in self._into
                                          else _parallel_copy(host, self._into[name]))
                    continue
                self._taken.append(buf)
            current = torch.cuda.current_stream(tensor.device)
            stream = current
            if ahead:
                stream = streams.get(tensor.device)
                if stream is None:
                    stream = streams[tensor.device] = torch.cuda.Stream(tensor.device)
                    stream.wait_stream(current)  # after the work queued so far
                # Its memory must outlive the copy on the other stream.
                tensor.record_stream(stream)
            with torch.cuda.stream(stream):
                buf.copy_(tensor.detach(), non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            self._queued[name] = (buf, done)

    def _drain(self):
        """Copy each queued buffer out as it lands, then give the buffers back."""
        try:
            for name, (buf, done) in self._queued.items():
                done.synchronize()
                self._arrays[name] = (self._into[name] if name in self._direct
                                      else _parallel_copy(buf.numpy(), self._into.get(name)))
        finally:
            self._release()

    def _drain_or_keep_error(self):
        try:
            self._drain()
        except BaseException as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def _release(self):
        for _, done in self._queued.values():
            done.synchronize()  # nothing still writes a buffer given back
        _POOL.give_back(self._taken)
        self._taken = []
        registered, self._registered = self._registered, []
        unregister_later(self._registrar, registered)

    def result(self):
        """The arrays, by the tensors' names (waits for the copies)."""
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        return {name: self._arrays[name] for name in self._names}


class PinnedRead:
    """Small device tensors copied to the host behind the work queued so far, read later.

    Reading a GPU tensor at once (``.cpu()``, ``bool()``) makes the host
    wait for every step it has queued, and the GPU then waits for the
    host's next launches. Here each tensor is copied into pinned memory on
    the current stream, and :meth:`arrays` waits for those copies only: a
    trainer's figures of a pass, read after the next pass has been queued.
    Unlike :class:`HostCopy` (large arrays the caller keeps: a pool's
    buffers, a thread that copies each out), the result is a view of the
    pinned copy itself. On the CPU the tensors are kept as they are.

    Examples
    --------
    >>> import torch
    >>> PinnedRead([torch.arange(3.0)]).arrays()[0].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, tensors):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            device = tensors[0].device
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            tensors = host
            self._event = torch.cuda.Event()
            # On the device's stream, named before `tensors` became the host copies.
            self._event.record(torch.cuda.current_stream(device))
        self._tensors = tensors

    def arrays(self):
        """The tensors as numpy arrays (views of the host copies), once the copies have landed."""
        if self._event is not None:
            self._event.synchronize()
        return [t.numpy() for t in self._tensors]


def _parallel_copy(src, dst=None, threads=None, background=False):
    """Copy ``src`` into ``dst`` (a new C-contiguous array when None), by threads when large.

    Writing new memory costs the host a page fault per page as well as the
    copy, and both divide across cores: on the H200 machine's 16-core host,
    a 75 MB weight matrix left a pinned buffer for new memory in 8.4 ms
    with four threads (the GPU's copy into the pinned buffer included)
    against 17.4 ms with one, twice per fit at the end of training. The
    upload of a resident copy fills its pinned staging buffers the same way.
    ``dst`` may have another float dtype (the copy converts). ``background``:
    by the background pool of host threads (:func:`~sparse_dict._torch.data.host_map`).

    Returns
    -------
    ndarray
        ``dst``.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(12.0).reshape(4, 3)
    >>> b = _parallel_copy(a, threads=2)
    >>> bool((a == b).all()), np.shares_memory(a, b)
    (True, False)
    """
    if dst is None:
        dst = np.empty_like(src, order="C")
    if threads is None:
        threads = host_threads(src.nbytes)
    if threads <= 1 or src.ndim == 0 or src.shape[0] < threads:
        dst[...] = src
        return dst

    def part(rows):
        dst[rows] = src[rows]

    host_map(part, row_blocks(src.shape[0], threads), background=background)
    return dst
