"""The GPU at its limit: training against the device's dense matrix-product rate.

One ReLU SAE training step on a batch of B rows, d features and N atoms
costs about ``10 * B * d * N`` floating-point operations (two forward
matrix products, three backward ones). For each size below, in float32 and
in bfloat16 (the estimator's ``bf16=True``), this section measures in one
process:

1. the dense ``(B x d) @ (d x N)`` matrix-product rate in that dtype, the
   ceiling every other figure is a fraction of;
2. the fused training step alone, the batch already on the device: the
   trainer's own loss and gradients, the unit-norm projection of the
   decoder's gradient, Adam and the atoms' renormalisation (the pieces
   :class:`sparse_dict._torch.Trainer` runs each step, called here one by
   one);
3. the whole :meth:`SparseAutoencoderDictionary.fit
   <sparse_dict.SparseAutoencoderDictionary.fit>` from a numpy array:
   a short and a long fit, whose difference gives the steady-state time of
   a step (initialisation, calibration and the first steps' start-up cancel
   out) and whose ratio to it gives the short fit's overhead; one more
   short fit is timed phase by phase (:func:`fit_phase_seconds`), one
   step by step (:func:`fit_step_timeline`), and more with each piece of
   the fit's work beside its steps left out in turn
   (:func:`fit_short_without`), to show where that overhead goes. The
   first fit
   of the section, before anything else, is timed on its own: what torch's
   start-up (kernels, allocator, cuBLAS handles) adds to a user's first fit;
4. a plain hand-written autograd loop of the same model (Adam, unit-norm
   atoms, ``torch.autocast`` for bfloat16 on a GPU), its batches (a)
   gathered from the numpy array in shuffled order and copied to the device
   every step, as a user writes it, and (b) indexed from a copy of the data
   made on the device once.

At the reference size it also times ways to bring one fitted (N, d)
matrix back to the host (:func:`export_paths_ms`), for the short fit's
largest fixed cost: information, not a target.

Sizes: ``reference`` (d=768, N=24576: a GPT-2 MLP dictionary), ``small``
(d=512, N=4096), ``wide`` (d=768, N=65536) and ``deep`` (d=2048, N=16384),
batch 4096. On a GPU, a torch.profiler summary of one short bfloat16 fit at
the reference size is written to ``gpu_profile.txt`` in the output folder.

Every figure is printed as soon as it is measured, and the figures so far
are written to ``gpu_partial.json`` in the output folder after each size,
so that a run stopped by a time limit keeps what it measured. A size that
runs out of memory (or fails otherwise) is recorded with its error and the
next size still runs.

Run ``python -m benchmarks.gpu [--device cuda] [--tiny | --full] [--out DIR]
[--sizes SIZE ...]``, or as a section: ``python -m benchmarks --device cuda
--only gpu``. ``--sizes reference`` measures the reference size alone (about
45 s on an H200), for a short session that tries a change.
"""

import argparse
import gc
import json
import platform
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import target
from benchmarks._plain import PlainSAE, sync as _sync
from sparse_dict import SparseAutoencoderDictionary
from sparse_dict import estimator as _estimator_module
from sparse_dict._torch import TrainConfig, Trainer, fused, resolve_device
from sparse_dict._torch import pipeline as _pipeline_module
from sparse_dict._torch import train as _train_module

DTYPES = {"float32": False, "bf16": True}
# The estimator's default sparsity coefficient, used by the step and the plain loop.
L1_COEF = 3.0
# The targets, all at the reference size unless said otherwise.
FIT_FRACTION_TARGET = {"float32": 0.75, "bf16": 0.5}
STEP_FRACTION_TARGET_BF16 = 0.6
OVER_PLAIN_GATHER_TARGET_BF16 = 1.5
SHORT_FIT_OVERHEAD_TARGET = 1.3
SMALL_OVER_PLAIN_DEVICE_TARGET = 1.0

_SHAPES = {
    "reference": dict(d=768, n=24576),
    "small": dict(d=512, n=4096),
    "wide": dict(d=768, n=65536),
    "deep": dict(d=2048, n=16384),
}
# Per mode: the sizes (name -> d, n); the batch; the data (n_batches batches
# of rows); the short and long fits' steps (long_steps_by_size overrides the
# long fit of a size, to keep the quick mode within about three minutes on
# an H100); repeats of each fit (the fastest is kept); calls per timing and
# timings (the median is kept) of the matrix product and the step; the plain
# loop's timed and warm-up steps.
SIZES = {
    # Seconds on a CPU: the two sizes that carry targets, at toy shapes.
    "tiny": dict(shapes={"reference": dict(d=32, n=128), "small": dict(d=16, n=64)},
                 batch=256, n_batches=16, short_steps=10, long_steps=200,
                 long_steps_by_size={}, fit_repeats=3, calls=5, repeats=3,
                 plain_steps=10, plain_warmup=2),
    "quick": dict(shapes=_SHAPES, batch=4096, n_batches=16, short_steps=50, long_steps=300,
                  long_steps_by_size={"wide": 150, "deep": 150}, fit_repeats=2, calls=10,
                  repeats=3, plain_steps=40, plain_warmup=3),
    "full": dict(shapes=_SHAPES, batch=4096, n_batches=16, short_steps=50, long_steps=300,
                 long_steps_by_size={}, fit_repeats=3, calls=20, repeats=5,
                 plain_steps=100, plain_warmup=5),
}


def _say(text):
    print(f"[gpu] {text}", flush=True)


def time_calls(fn, device, calls, repeats, warmup=2):
    """Median seconds per call of ``fn``, over ``repeats`` timings of ``calls`` calls.

    ``warmup`` calls run first, untimed, and the device is synchronised.

    On a GPU the calls are timed with CUDA events around the whole group, so
    the figure is the device's time per call with the host free to queue
    ahead; the group ends with a synchronisation before it is read.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def make_data(n_rows, d, seed=0):
    """``n_rows`` correlated float32 rows: standard normal times a random d x d mixing."""
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((n_rows, d), dtype=np.float32))
    mixing = torch.from_numpy(rng.standard_normal((d, d), dtype=np.float32)) / np.sqrt(d)
    # torch's product: numpy's may run on a single-threaded BLAS.
    return (z @ mixing).numpy()


# ------------------------------------------------------------ the measurements
def matmul_tflops(batch, d, n, device, bf16, calls, repeats):
    """TFLOP/s of a dense ``(batch, d) @ (d, n)`` product in float32 or bfloat16."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(batch, d, device=device, dtype=dtype, generator=g)
    b = torch.randn(d, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(batch, n, device=device, dtype=dtype)
    product = lambda: torch.mm(a, b, out=out)  # noqa: E731
    seconds = time_calls(product, device, calls, repeats)
    return 2.0 * batch * d * n / seconds / 1e12


# The five products of a dense step, as SparseAutoencoder.loss_and_gradients
# issues them (operand -> operand), each with the same product written the
# other way round: C = A @ B as (B^T @ A^T)^T, which cuBLAS runs with other
# kernels. (name, A, B, the transposed form's inputs.)
_STEP_PRODUCTS = (
    ("pre: xc @ enc^T", "xc", "enc^T"),
    ("x_hat: codes @ W_dec", "codes", "dec"),
    ("W_dec grad: codes^T @ gx", "codes^T", "gx"),
    ("codes grad: gx @ dec^T", "gx", "dec^T"),
    ("W_enc grad: grad^T @ xc", "grad^T", "xc"),
)


def step_products_ms(d, n, batch, device, bf16, calls, repeats):
    """Milliseconds of each of a dense step's five products, as issued and transposed.

    The operands have the step's shapes and layouts: the (batch, d + pad)
    buffers with a column of ones, the (n, d + pad) weight copies, the
    (batch, n) codes and gradient; the decoder's weights a slice of its
    padded buffer. Each product is timed as the step writes it and as its
    transpose (the same numbers from another cuBLAS kernel), to show where
    a step's matrix time goes and which layout runs faster on the card.

    Returns
    -------
    dict
        ``{name: {"as_issued": ms, "transposed": ms, "tflops": as issued}}``.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    width = -(-(d + 1) // 16) * 16
    ops = {
        "xc": torch.randn(batch, width, device=device, dtype=dtype, generator=g),
        "gx": torch.randn(batch, width, device=device, dtype=dtype, generator=g),
        "codes": torch.randn(batch, n, device=device, dtype=dtype, generator=g),
        "grad": torch.randn(batch, n, device=device, dtype=dtype, generator=g),
    }
    for name in ("enc", "dec_full"):
        ops[name] = torch.randn(n, width, device=device, dtype=dtype, generator=g)
    ops["dec"] = ops["dec_full"][:, :d]
    ops["dec^T"] = ops["dec_full"].t()
    ops["enc^T"] = ops["enc"].t()
    ops["codes^T"] = ops["codes"].t()
    ops["grad^T"] = ops["grad"].t()
    out = {}
    for name, a_name, b_name in _STEP_PRODUCTS:
        a, b = ops[a_name], ops[b_name]
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        ways = {"as_issued": lambda a=a, b=b: torch.mm(a, b),
                "transposed": lambda a=a, b=b: torch.mm(b.t(), a.t())}
        out[name] = {}
        for way, fn in ways.items():
            out[name][way] = 1e3 * time_calls(fn, device, calls, repeats)
        out[name]["tflops"] = flops / (out[name]["as_issued"] / 1e3) / 1e12
    return out


def fused_step_seconds(X, d, n, batch, device, bf16, calls, repeats, fused_update="auto",
                       kernels=None, trainer=None):
    """Seconds of one training step of the sparse_dict core, the batch on the device.

    The two calls that :class:`~sparse_dict._torch.Trainer` makes for each
    batch, on the trainer's own model and optimiser: the loss and gradients
    (``loss_and_gradients``), then ``apply_gradients`` (the projection of
    the decoder gradient's radial part, Adam, the atoms' renormalisation:
    one fused pass per weight matrix where ``fused_update`` allows, torch's
    operations with ``fused_update=False``); the codes' mask and counts in
    one pass, the residual's operations in one, ReLU's bias and ReLU in the
    encoder product's epilogue, and the statistics in one small kernel,
    where the first step measured them faster (``kernels``, as
    ``loss_and_gradients`` takes it, forces any of them either way).

    On a freshly drawn model with ``scale`` 1 (the data's scale does not
    change the work), or on ``trainer``, a fitted one, and its scale: the
    products are the same, but the codes of a trained model are sparse,
    and a card may run products of mostly zero operands faster (they draw
    less power).
    """
    if trainer is None:
        trainer = Trainer(d, n, device, seed=0)
        trainer.scale = 1.0
    model = trainer.model
    autocast = torch.bfloat16 if bf16 else None
    config = TrainConfig(fused_update=fused_update)
    x = torch.as_tensor(X[:batch], device=device) * trainer.scale

    def step():
        model.loss_and_gradients(x, L1_COEF, autocast, kernels=kernels)
        trainer.apply_gradients(config)

    try:
        return time_calls(step, device, calls, repeats, warmup=3)
    finally:
        model.release_workspace()


def _way_label(way):
    """A way of :func:`sparse_dict._torch.fused.timings` as a short label.

    Examples
    --------
    >>> from sparse_dict._torch import fused
    >>> _way_label(False), _way_label(fused.MaskLaunch(None, 32, 4))
    ('plain', 'default/32/4')
    """
    if way is False:
        return "plain"
    if way is True:
        return "kernel"
    return "/".join("default" if value is None else str(value) for value in way)


def fit_seconds(X, n, batch, steps, device, bf16, keep=False):
    """Wall seconds of one ``SparseAutoencoderDictionary.fit`` of ``steps`` steps.

    With ``keep``, ``(seconds, the fitted estimator)``.
    """
    est = SparseAutoencoderDictionary(n_components=n, device=str(device), batch_size=batch,
                                      max_steps=steps, random_state=0, bf16=bf16)
    _sync(device)
    with warnings.catch_warnings():
        # A 50-step fit is unconverged by design; the warning is not the point.
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        est.fit(X)
        _sync(device)
        seconds = time.perf_counter() - t0
    return (seconds, est) if keep else seconds


# The phases of a fit that fit_phase_seconds times: (name, owner, method).
_PHASES = (
    ("validate", SparseAutoencoderDictionary, "_validate_train_data"),
    ("feed", Trainer, "open_feed"),
    ("initialise", Trainer, "initialize"),
    ("train", SparseAutoencoderDictionary, "_train"),
    ("finish", SparseAutoencoderDictionary, "_finish"),
)


# Parts of the phases, timed inside them (not counted again in "other"):
# (name, owner, attribute). The module-level functions are patched where
# the trainer looks them up.
_PARTS = (
    ("initialise: sample_rows", _train_module, "sample_rows"),
    ("initialise: sample_moments", _train_module, "sample_moments"),
    ("initialise: geometric_median", _train_module, "geometric_median"),
    ("initialise: the median's round trip (rows to the device, the median, back)",
     _train_module, "_centre_on"),
    ("initialise: the spreads", _train_module, "_spreads"),
    ("initialise: the distinct rows' estimate", _train_module, "_distinct_rows"),
    ("finish: calibration_sample", Trainer, "calibration_sample"),
    ("finish: sample_stats (L0, the final error, the shrinkage)", Trainer, "sample_stats"),
    ("finish: start_export (the weights' copy started)", Trainer, "start_export"),
    ("finish: export", Trainer, "export"),
    ("other: the trainer's construction", Trainer, "__init__"),
)


# Work a fit runs in threads of its own, beside its phases: (name, owner,
# attribute). Timed without waiting for the GPU (which would hold the
# thread up for the main thread's steps), each as its thread's wall time
# and as when it ended, counted from the start of the fit: whether it ends
# before the phase that needs it, or that phase waits for it.
_BESIDE = (
    ("the value scan", _estimator_module, "_check_values"),
    ("the upload of X to the GPU", _pipeline_module.BatchFeed, "_upload"),
    ("the touching of the export's arrays", _pipeline_module.TouchedArrays, "_touch"),
    ("the weights' copy to the host", _pipeline_module.HostCopy, "_drain_or_keep_error"),
)


def _sync_stream(device):
    """Wait for the work queued on the current stream only (not the background copy's)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def fit_phase_seconds(X, n, batch, steps, device, bf16):
    """Wall seconds of one fit, and of each of its phases, to see a short fit's fixed costs.

    ``validate``: the checks of ``X``; ``feed``: opening the batches' feed
    (with rows bound for the GPU, starting their copy there, which goes on
    in the background); ``initialise``: the scale, the variance and the
    decoder bias from a sample of rows; ``train``: the steps (the first
    ones streamed while the copy is on its way); ``finish``: calibration,
    the run's assessment and the export of the fitted tensors. Each phase
    waits for the work it queued on the step's stream, not for the
    background copy (which would undo the overlap being measured); ``other``
    is the rest (the fit's own bookkeeping, the model's construction).

    Some parts of the phases are timed inside them too (``_PARTS``), and
    the work of the fit's own threads beside them (``_BESIDE``).

    Returns
    -------
    seconds : dict
        ``total`` and each phase's seconds.
    parts : dict
        Each part's seconds (within its phase's); for each thread's work,
        ``"beside: <work>"`` its seconds and ``"beside: <work>, ended at"``
        when it ended, from the start of the fit.
    streamed_batches : int
        The batches served from the host while the copy was on its way.
    """
    timings = _PHASES + _PARTS
    seconds = {name: 0.0 for name, _, _ in timings}
    saved = [(owner, method, getattr(owner, method)) for _, owner, method in timings + _BESIDE]
    feeds = []
    beside = {}
    fit_start = [0.0]

    def in_thread(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                beside[f"beside: {name}"] = beside.get(f"beside: {name}", 0.0) + end - t0
                beside[f"beside: {name}, ended at"] = end - fit_start[0]
        return wrapper

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            _sync_stream(device)
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                if name == "feed":
                    feeds.append(result)
                return result
            finally:
                _sync_stream(device)
                seconds[name] += time.perf_counter() - t0
        return wrapper

    try:
        for (name, _, _), (owner, method, fn) in zip(timings + _BESIDE, saved):
            wrap = in_thread if (name, owner, method) in _BESIDE else timed
            setattr(owner, method, wrap(name, fn))
        fit_start[0] = time.perf_counter()
        seconds["total"] = fit_seconds(X, n, batch, steps, device, bf16)
    finally:
        for owner, method, fn in saved:
            setattr(owner, method, fn)
    parts = {name: seconds.pop(name) for name, _, _ in _PARTS}
    parts.update(beside)
    # Within training: the steps that waited for the copy's last rows
    # instead of streaming a batch (BatchFeed._nearly_landed).
    parts["train: the wait for the copy's last rows"] = sum(
        feed.upload_wait_s for feed in feeds)
    seconds["other"] = seconds["total"] - sum(seconds[name] for name, _, _ in _PHASES)
    return seconds, parts, sum(feed.streamed_batches for feed in feeds)


def fit_step_timeline(X, n, batch, steps, device, bf16):
    """Where a short fit's training time goes, step by step: the device's and the host's.

    One more fit, with a mark after each step's update: on a GPU a CUDA
    event (the device's time from the previous mark, idle time included)
    and the host's clock (its time to queue the step). Information for the
    short-fit target, whose training took 119 ms for 50 steady steps of
    96 ms on the H200 (2026-11-26): whether that excess lies in the first
    steps (a warm-up, the batches streamed while the data was copied) or
    all along (the fit's threads beside the steps taking the host's time).

    Returns
    -------
    dict
        ``device_ms`` and ``host_ms``, one value a step (the first from the
        start of training); ``median_device_ms``; ``excess_first_10_ms`` and
        ``excess_ms``, the device's time beyond the median in the first ten
        steps and in all.
    """
    cuda = device.type == "cuda"
    marks = []
    real_train, real_apply = Trainer.train, Trainer.apply_gradients

    def mark():
        event = None
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((time.perf_counter(), event))

    def train(self, *args, **kwargs):
        mark()
        return real_train(self, *args, **kwargs)

    def apply_gradients(self, config):
        real_apply(self, config)
        mark()

    try:
        Trainer.train, Trainer.apply_gradients = train, apply_gradients
        fit_seconds(X, n, batch, steps, device, bf16)
    finally:
        Trainer.train, Trainer.apply_gradients = real_train, real_apply
    _sync(device)
    host = [1e3 * (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    dev = ([a[1].elapsed_time(b[1]) for a, b in zip(marks, marks[1:])] if cuda else host)
    median = float(np.median(dev)) if dev else float("nan")
    return {
        "device_ms": dev,
        "host_ms": host,
        "median_device_ms": median,
        "excess_first_10_ms": float(sum(max(0.0, t - median) for t in dev[:10])),
        "excess_ms": float(sum(max(0.0, t - median) for t in dev)),
    }


def _upload_at_train():
    """Stand-ins that start a resident copy of ``X`` when training starts.

    As :meth:`BatchFeed.set_scale` is called (by ``Trainer.train``), not as
    the feed opens before the set-up: the set-up then runs alone. On the
    H200 (2026-11-27) the set-up took 42 ms, of which its timed parts were
    15.5, and it ended about when the copy ended; a set-up that shrinks by
    most of the rest when the copy waits for it shares the host (its
    threads, memory bandwidth) or the link with the copy.
    """
    Feed = _pipeline_module.BatchFeed
    real_start, real_set_scale = Feed._start_upload, Feed.set_scale

    def start_later(self):
        self._upload_deferred = True

    def set_scale(self, scale):
        if getattr(self, "_upload_deferred", False):
            self._upload_deferred = False
            self.scale = float(scale)
            real_start(self)
            return
        real_set_scale(self, scale)

    return [(Feed, "_start_upload", start_later), (Feed, "set_scale", set_scale)]


# The fit's work beside its steps, each left out in turn by
# fit_short_without (name -> [(owner, attribute, stand-in), ...]).
_LEFT_OUT = {
    # X is the benchmark's own finite data: the verdict is known.
    "the value scan": [(_estimator_module, "_check_values", lambda X: None)],
    # The export then copies into untouched, unlocked memory, faulting its
    # pages in.
    "the touching and page-locking of the export's arrays": [
        (_pipeline_module.TouchedArrays, "_touch", lambda self: None)],
    # The steps stream batches until the copy lands (as before 817395a).
    "the wait for the copy's last rows": [(_pipeline_module.BatchFeed, "_nearly_landed",
                                           lambda self: False)],
    # Not left out but moved: the copy starts when training does.
    "the copy of X during the set-up (it starts with training)": _upload_at_train(),
}


def fit_short_without(X, n, batch, steps, device, bf16, repeats):
    """A short fit's seconds with each piece of its work beside the steps left out.

    Information for the short-fit target: what each costs the fit in the
    host's time and the link's, where timing the pieces alone cannot tell
    (they run in threads beside the set-up and the first steps). Each
    figure is the fastest of ``repeats`` fits, as ``fit_short_s``. No piece
    left out or moved changes a fitted value (streamed and resident batches
    hold the same values).

    Returns
    -------
    dict
        Seconds of the fit without each piece of :data:`_LEFT_OUT`.
    """
    seconds = {}
    for name, patches in _LEFT_OUT.items():
        reals = [(owner, attribute, getattr(owner, attribute))
                 for owner, attribute, _ in patches]
        try:
            for owner, attribute, stand_in in patches:
                setattr(owner, attribute, stand_in)
            seconds[name] = min(fit_seconds(X, n, batch, steps, device, bf16)
                                for _ in range(repeats))
        finally:
            for owner, attribute, real in reals:
                setattr(owner, attribute, real)
    return seconds


def plain_loop_seconds(X, n, batch, device, bf16, steps, warmup, repeats=1):
    """Seconds per step of :class:`PlainSAE`, batches gathered on the host or on the device.

    Each is the fastest of ``repeats`` timings, as the fits are.

    Returns
    -------
    gather, on_device : float
        (a) each batch taken from the numpy array in shuffled order and
        copied to the device every step; (b) the data copied to the device
        once and each batch indexed there.
    """
    plain = PlainSAE(X.shape[1], n, device, autocast=bf16 and device.type == "cuda")
    rng = np.random.default_rng(1)

    def host_batches():
        while True:
            order = rng.permutation(X.shape[0])
            for start in range(0, X.shape[0] - batch + 1, batch):
                yield torch.from_numpy(X[order[start:start + batch]]).to(device)

    X_dev = torch.from_numpy(X).to(device)
    g = torch.Generator(device=device).manual_seed(1)

    def device_batches():
        while True:
            order = torch.randperm(X_dev.shape[0], device=device, generator=g)
            for start in range(0, X_dev.shape[0] - batch + 1, batch):
                yield X_dev[order[start:start + batch]]

    seconds = []
    for batches in (host_batches(), device_batches()):
        for _ in range(warmup):
            plain.step(next(batches), L1_COEF)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                plain.step(next(batches), L1_COEF)
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / steps)
        seconds.append(best)
    return tuple(seconds)


def measure_dtype(X, d, n, batch, device, bf16, sizes, long_steps, dtype_name, label):
    """Every figure of one size in one dtype; each is printed when measured."""
    flops = 10.0 * batch * d * n
    r = {}
    r["matmul_tflops"] = matmul_tflops(batch, d, n, device, bf16, sizes["calls"],
                                       sizes["repeats"])
    _say(f"{label} {dtype_name}: matmul {r['matmul_tflops']:.3g} TFLOP/s")

    r["step_products_ms"] = step_products_ms(d, n, batch, device, bf16, sizes["calls"],
                                             sizes["repeats"])
    _say(f"{label} {dtype_name}: the step's products (ms as issued / transposed): " + "; ".join(
        f"{k} {v['as_issued']:.3g} / {v['transposed']:.3g}"
        for k, v in r["step_products_ms"].items()))

    step = fused_step_seconds(X, d, n, batch, device, bf16, sizes["calls"], sizes["repeats"])
    r["step_ms"] = 1e3 * step
    r["step_tflops"] = flops / step / 1e12
    r["step_fraction_of_matmul"] = r["step_tflops"] / r["matmul_tflops"]
    r["fused_update"] = fused.available(device)
    _say(f"{label} {dtype_name}: fused step {r['step_ms']:.3g} ms, "
         f"{r['step_tflops']:.3g} TFLOP/s, {r['step_fraction_of_matmul']:.3f} of matmul"
         f" (one-pass weight update: {r['fused_update']})")
    if r["fused_update"]:
        # The same step with the weights updated by torch's operations: the
        # fallback, measured beside the fused pass.
        plain = fused_step_seconds(X, d, n, batch, device, bf16, sizes["calls"],
                                   sizes["repeats"], fused_update=False)
        r["step_plain_update_ms"] = 1e3 * plain
        r["fused_update_speedup"] = plain / step
        _say(f"{label} {dtype_name}: step with torch's weight update {1e3 * plain:.3g} ms "
             f"(fused pass {r['fused_update_speedup']:.3g}x)")
    if device.type == "cuda":
        # The kernels between the products: whether the first step chose
        # each, and the step with the plain operations in its place, beside.
        low = torch.bfloat16 if bf16 else torch.float32
        for kernel, option, shape in (("codes", "codes", (batch, n)),
                                      ("residual", "residual", (batch, d)),
                                      ("product_relu", "product", (batch, n)),
                                      ("penalty_stats", "stats", (n,)),
                                      ("centre", "centre", (batch, d))):
            chosen = [choice for (name, _, dtype, key_shape, _), choice in fused.choices().items()
                      if name == kernel and key_shape == shape and dtype == low and choice]
            r[f"{kernel}_kernel"] = bool(chosen)
            if kernel in ("codes", "residual"):
                # Which of the launches the first step timed won
                # (fused.MaskLaunch, fused.ResidualLaunch).
                r[f"{kernel}_launch"] = _way_label(chosen[0]) if chosen else "-"
                # What the first step measured of each way, a call (us).
                for (name, _, dtype, key_shape, _), ways in fused.timings().items():
                    if name == kernel and key_shape == shape and dtype == low:
                        r[f"{kernel}_ways_us"] = {_way_label(way): 1e6 * seconds
                                                  for way, seconds in ways.items()}
            plain = fused_step_seconds(X, d, n, batch, device, bf16, sizes["calls"],
                                       sizes["repeats"], kernels={option: False})
            r[f"step_plain_{kernel}_ms"] = 1e3 * plain
            r[f"{kernel}_kernel_speedup"] = plain / step
            _say(f"{label} {dtype_name}: step with the plain {kernel} operations "
                 f"{1e3 * plain:.3g} ms ({kernel} kernel chosen: {r[f'{kernel}_kernel']}; "
                 f"{r[f'{kernel}_kernel_speedup']:.3g}x)")

    short = sizes["short_steps"]
    r["short_steps"], r["long_steps"] = short, long_steps
    r["fit_short_s"] = min(fit_seconds(X, n, batch, short, device, bf16)
                           for _ in range(sizes["fit_repeats"]))
    _say(f"{label} {dtype_name}: fit of {short} steps {r['fit_short_s']:.3g} s")
    (r["fit_short_phases_s"], r["fit_short_parts_s"],
     r["fit_short_streamed_batches"]) = fit_phase_seconds(X, n, batch, short, device, bf16)
    _say(f"{label} {dtype_name}: phases of a {short}-step fit (s): " + ", ".join(
        f"{k} {v:.3g}" for k, v in r["fit_short_phases_s"].items())
        + f"; {r['fit_short_streamed_batches']} batches streamed while the data was copied")
    if label == "reference":
        # The size of the short-fit target only: each piece costs the section
        # fit_repeats more short fits.
        r["fit_short_without_s"] = fit_short_without(X, n, batch, short, device, bf16,
                                                     sizes["fit_repeats"])
        _say(f"{label} {dtype_name}: fit of {short} steps without " + "; ".join(
            f"{k} {v:.3g} s" for k, v in r["fit_short_without_s"].items()))
    timeline = r["fit_short_timeline"] = fit_step_timeline(X, n, batch, short, device, bf16)
    _say(f"{label} {dtype_name}: steps of a {short}-step fit: median "
         f"{timeline['median_device_ms']:.3g} ms on the device, beyond it "
         f"{timeline['excess_first_10_ms']:.3g} ms in the first ten and "
         f"{timeline['excess_ms']:.3g} ms in all; the first five "
         + ", ".join(f"{t:.3g}" for t in timeline["device_ms"][:5]) + " ms")
    r["fit_long_s"], trained = float("inf"), None
    for _ in range(sizes["fit_repeats"]):
        trained = None  # one fitted model on the device at a time
        seconds, trained = fit_seconds(X, n, batch, long_steps, device, bf16, keep=True)
        r["fit_long_s"] = min(r["fit_long_s"], seconds)
    steady = (r["fit_long_s"] - r["fit_short_s"]) / (long_steps - short)
    if steady <= 0:
        # Noise larger than the extra steps' cost: no steady-state figure.
        _say(f"{label} {dtype_name}: the long fit was not slower than the short one")
        steady = float("nan")
    r["steady_ms_per_step"] = 1e3 * steady
    r["fit_tflops"] = flops / steady / 1e12
    r["fit_fraction_of_matmul"] = r["fit_tflops"] / r["matmul_tflops"]
    r["short_fit_overhead"] = r["fit_short_s"] / (short * steady)
    _say(f"{label} {dtype_name}: fit of {long_steps} steps {r['fit_long_s']:.3g} s; "
         f"steady {r['steady_ms_per_step']:.3g} ms/step, "
         f"{r['fit_fraction_of_matmul']:.3f} of matmul; "
         f"short-fit overhead {r['short_fit_overhead']:.3g}")
    # The step alone again, on the state the long fit ended in (sparse
    # codes): information beside the target, which is the fresh model's.
    step = fused_step_seconds(X, d, n, batch, device, bf16, sizes["calls"], sizes["repeats"],
                              trainer=trained._trainer)
    del trained
    r["step_trained_ms"] = 1e3 * step
    r["step_trained_fraction_of_matmul"] = flops / step / 1e12 / r["matmul_tflops"]
    _say(f"{label} {dtype_name}: fused step on the long fit's final state "
         f"{r['step_trained_ms']:.3g} ms, {r['step_trained_fraction_of_matmul']:.3f} of matmul")

    gather, on_device = plain_loop_seconds(X, n, batch, device, bf16, sizes["plain_steps"],
                                           sizes["plain_warmup"], sizes["fit_repeats"])
    r["plain_autocast"] = bf16 and device.type == "cuda"
    r["plain_gather_ms_per_step"] = 1e3 * gather
    r["plain_gather_rows_per_s"] = batch / gather
    r["plain_device_ms_per_step"] = 1e3 * on_device
    r["plain_device_rows_per_s"] = batch / on_device
    r["fit_rows_per_s"] = batch / steady
    r["over_plain_gather"] = gather / steady
    r["over_plain_device"] = on_device / steady
    _say(f"{label} {dtype_name}: plain loop (a) host batches {r['plain_gather_ms_per_step']:.3g}"
         f" ms/step, (b) device batches {r['plain_device_ms_per_step']:.3g} ms/step; "
         f"sparse_dict / (a) {r['over_plain_gather']:.3g}, / (b) {r['over_plain_device']:.3g}")
    return r


def _first_fit(X, n, batch, steps, device):
    cuda_ready = device.type == "cuda" and torch.cuda.is_initialized()
    seconds = fit_seconds(X, n, batch, steps, device, False)
    _say(f"warm-up (first fit in process), float32, {steps} steps: {seconds:.3g} s")
    return {"seconds": seconds, "steps": steps, "dtype": "float32",
            "cuda_initialised_before": cuda_ready,
            "note": "the first fit of this section; the first of the process only when "
                    "the section runs first (--only gpu)"}


def _profile(X, n, batch, steps, device, path):
    """Write a torch.profiler summary of one bfloat16 fit to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # torch warns, on leaving the profiler, that it keeps one cycle's
        # events: one cycle (the fit) is all there is.
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fit_seconds(X, n, batch, steps, device, True)
    averages = prof.key_averages()
    tables = []
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=30, max_name_column_width=160)
        except (AttributeError, KeyError, ValueError):
            # Newer torch names the device's column "device" rather than "cuda".
            key = key.replace("cuda", "device")
            table = averages.table(sort_by=key, row_limit=30, max_name_column_width=160)
        tables.append(f"sorted by {key}\n{table}")
    Path(path).write_text(f"torch.profiler: one {steps}-step bfloat16 fit, "
                          f"B={batch}, d={X.shape[1]}, N={n}\n\n" + "\n\n".join(tables) + "\n",
                          encoding="utf-8")


def _write_partial(result, out_dir):
    if out_dir is None:
        return
    from benchmarks.report import _clean

    Path(out_dir, "gpu_partial.json").write_text(
        json.dumps(_clean(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def export_paths_ms(shape, device, repeats=3):
    """Ways to bring one fitted matrix back into a new host array, each its best of ``repeats`` (ms).

    Information for the short-fit target, where the export of two such
    matrices is the largest fixed cost (19 ms of a 50-step bf16 fit on the
    H200, 2026-11-26), not a target:

    * ``to_host``: the export into new memory
      (:func:`sparse_dict._torch.pipeline.to_host`: on a GPU through a
      reused pinned buffer, then into a new array by host threads);
      ``to_host_touched``: the same into an array whose pages a thread
      touched before (:class:`~sparse_dict._torch.pipeline.TouchedArrays`),
      as a fit now does, the touching done while it trains;
    * ``touch``: touching every page of a new array of that size, alone
      (what a thread could do while training runs);
    * ``copy_fresh`` and ``copy_touched``: the host's copy from an array
      like the pinned buffer into a new array, and into one whose pages were
      touched, to tell the page faults from the copy;
    * on a GPU, ``registered``: the device's copy straight into a touched
      array registered with CUDA (page-locked where it is), no host copy;
      ``register`` and ``unregister`` what registering it costs.
    """
    from sparse_dict._torch.pipeline import TouchedArrays, _parallel_copy, to_host, touch_pages

    source = torch.randn(shape, device=device)
    host = source.cpu().numpy()  # stands for the pinned buffer's contents
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = {}

    def timed(name, fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = 1e3 * (time.perf_counter() - start)
        times[name] = min(times.get(name, elapsed), elapsed)

    def touched():
        return touch_pages(np.empty(shape, dtype=np.float32))

    for _ in range(repeats):
        timed("to_host", lambda: to_host({"w": source}))
        into = TouchedArrays({"w": shape}, np.float32).arrays()
        timed("to_host_touched", lambda: to_host({"w": source}, into))
        timed("touch", touched)
        timed("copy_fresh", lambda: _parallel_copy(host))
        dst = touched()
        timed("copy_touched", lambda: _parallel_copy(host, dst))
        if device.type == "cuda":
            _time_registered(touched(), source, host, timed)
    return times


def _time_registered(dst, source, host, timed):
    """``export_paths_ms``'s copy straight into ``dst`` registered with CUDA."""
    cudart = torch.cuda.cudart()

    def check(what, err):
        # A failed registration would leave a pageable copy timed as a pinned one.
        if int(err) != 0:
            raise RuntimeError(f"{what} failed with CUDA error {int(err)}")

    timed("register", lambda: check("cudaHostRegister",
                                    cudart.cudaHostRegister(dst.ctypes.data, dst.nbytes, 0)))
    try:
        timed("registered", lambda: torch.from_numpy(dst).copy_(source, non_blocking=True))
        if not np.array_equal(dst, host):
            raise RuntimeError("the copy into a registered array came back wrong")
    finally:
        timed("unregister", lambda: check("cudaHostUnregister",
                                          cudart.cudaHostUnregister(dst.ctypes.data)))


def measure(mode="quick", device="cpu", out_dir=None, only_sizes=None):
    """Measure every size of ``mode``; return the figures (see the module's docstring).

    Parameters
    ----------
    mode : {"tiny", "quick", "full"}
    device : str
    out_dir : path or None
        Where ``gpu_partial.json`` (after each size) and, on a GPU,
        ``gpu_profile.txt`` are written; None writes nothing.
    only_sizes : list of str or None
        Measure these of the mode's sizes alone (``["reference"]``: about
        45 s on an H200, for a short session that tries a change); None
        measures every size.
    """
    sizes = SIZES[mode]
    if only_sizes is not None:
        unknown = sorted(set(only_sizes) - set(sizes["shapes"]))
        if unknown:
            raise ValueError(f"Unknown sizes {unknown}; {mode!r} has "
                             f"{sorted(sizes['shapes'])}.")
        sizes = dict(sizes, shapes={k: v for k, v in sizes["shapes"].items()
                                    if k in only_sizes})
    dev = resolve_device(device)
    batch = sizes["batch"]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = {
        "device": str(dev),
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (
            platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "n_rows": batch * sizes["n_batches"],
        "flops_per_step": "10 * batch * d * n",
        "sizes": {},
    }
    _say(f"{result['card']} ({dev}), torch {result['torch']}, CUDA {result['cuda']}")
    for i, (label, shape) in enumerate(sizes["shapes"].items()):
        d, n = shape["d"], shape["n"]
        long_steps = sizes["long_steps_by_size"].get(label, sizes["long_steps"])
        entry = {"d": d, "n": n, "batch": batch}
        if long_steps != sizes["long_steps"]:
            entry["note"] = (f"long fits of {long_steps} steps instead of "
                             f"{sizes['long_steps']}, to fit the mode's time budget")
        result["sizes"][label] = entry
        try:
            X = make_data(result["n_rows"], d, seed=0)
            if i == 0:
                result["first_fit"] = _first_fit(X, n, batch, sizes["short_steps"], dev)
            for dtype_name, bf16 in DTYPES.items():
                entry[dtype_name] = measure_dtype(X, d, n, batch, dev, bf16, sizes,
                                                  long_steps, dtype_name, label)
                _write_partial(result, out_dir)
            if label == "reference":
                try:
                    result["export_paths_ms"] = dict(
                        shape=[n, d], **export_paths_ms((n, d), dev))
                    _say("export of one (N, d) matrix (ms): " + ", ".join(
                        f"{k} {v:.3g}" for k, v in result["export_paths_ms"].items()
                        if k != "shape"))
                except Exception:  # noqa: BLE001 - information only
                    result["export_paths_error"] = traceback.format_exc()
                    _say("the export measurement failed:\n" + result["export_paths_error"])
            if label == "reference" and dev.type == "cuda" and out_dir is not None:
                try:
                    _profile(X, n, batch, sizes["short_steps"], dev,
                             Path(out_dir) / "gpu_profile.txt")
                    result["profile"] = "gpu_profile.txt"
                except Exception:  # noqa: BLE001 - the figures matter more than the trace
                    result["profile_error"] = traceback.format_exc()
                    _say("the profiler failed:\n" + result["profile_error"])
        except Exception as exc:  # noqa: BLE001 - record and go on with the next size
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            entry["error"] = ("out of memory: " if oom else "") + traceback.format_exc()
            _say(f"{label} failed:\n{entry['error']}")
        finally:
            X = None
            _free(dev)
        _write_partial(result, out_dir)
    return result


def _figure(result, size, dtype, key):
    return result["sizes"].get(size, {}).get(dtype, {}).get(key)


def run(mode="quick", device="cpu", out_dir=None, only_sizes=None):
    """The section's figures and targets at the sizes of ``mode`` (or ``only_sizes`` of them)."""
    result = measure(mode, device, out_dir, only_sizes)
    note = "tiny shapes on the CPU" if mode == "tiny" else ""
    ref = "reference size"
    targets = [
        target(f"gpu_fit_fraction_of_matmul_{dtype}",
               f"whole fit's steady TFLOP/s / the {dtype} matrix product's, {ref}",
               _figure(result, "reference", dtype, "fit_fraction_of_matmul"), threshold,
               note=note)
        for dtype, threshold in FIT_FRACTION_TARGET.items()
    ]
    targets += [
        target("gpu_fit_over_plain_gather_bf16",
               f"whole fit's steady steps/s / the plain loop's with host batches, bf16, {ref}",
               _figure(result, "reference", "bf16", "over_plain_gather"),
               OVER_PLAIN_GATHER_TARGET_BF16, note=note),
        target("gpu_step_fraction_of_matmul_bf16",
               f"fused step's TFLOP/s / the bf16 matrix product's, {ref}",
               _figure(result, "reference", "bf16", "step_fraction_of_matmul"),
               STEP_FRACTION_TARGET_BF16, note=note),
    ]
    targets += [
        target(f"gpu_short_fit_overhead_{dtype}",
               f"{SIZES[mode]['short_steps']}-step fit's time / as many steady steps, "
               f"{dtype}, {ref} (first fit excluded)",
               _figure(result, "reference", dtype, "short_fit_overhead"),
               SHORT_FIT_OVERHEAD_TARGET, comparison="<=", note=note)
        for dtype in DTYPES
    ]
    targets += [
        target(f"gpu_small_fit_over_plain_device_{dtype}",
               f"whole fit's steady steps/s / the plain loop's with device batches, "
               f"{dtype}, small size",
               _figure(result, "small", dtype, "over_plain_device"),
               SMALL_OVER_PLAIN_DEVICE_TARGET, note=note)
        for dtype in DTYPES
    ]
    result["targets"] = targets
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny")
    size.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_partial.json and gpu_profile.txt")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="SIZE",
                        help="measure only these sizes (reference, small, wide, deep)")
    args = parser.parse_args(argv)
    result = run(args.mode or "quick", device=args.device, out_dir=args.out,
                 only_sizes=args.sizes)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
