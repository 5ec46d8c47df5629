"""Shared pieces of the benchmark suite: timing, machine description, targets.

Every benchmark module exposes ``run(mode, device) -> dict``; ``mode`` is one
of ``"tiny"`` (seconds, for the smoke test), ``"quick"`` (minutes on two CPU
cores) or ``"full"`` (the issue's sizes). The sizes of each mode live next to
the code that uses them, in a ``SIZES`` dict keyed by mode.
"""

import datetime
import os
import platform
import threading
import time

import numpy as np

MODES = ("tiny", "quick", "full")


class Timer:
    """Wall-clock time of a ``with`` block, in seconds (``.seconds``)."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False


def best_time(fn, repeats):
    """Fastest of ``repeats`` calls of ``fn``, in seconds.

    On a shared machine the fastest call is the one least disturbed by other
    work, so the minimum is the most repeatable estimate of the cost.
    """
    best = float("inf")
    for _ in range(max(1, repeats)):
        with Timer() as t:
            fn()
        best = min(best, t.seconds)
    return best


def target(name, description, value, threshold, *, higher_is_better=True, note=""):
    """A target record: the figure, the threshold and whether it is met.

    A missing figure (``None`` or NaN, e.g. a quality never reached) is
    recorded as not met rather than dropped, so the report always shows it.
    """
    ok = value is not None and np.isfinite(value)
    if ok:
        met = bool(value >= threshold) if higher_is_better else bool(value < threshold)
    else:
        met = False
    return {
        "name": name,
        "description": description,
        "value": float(value) if ok else None,
        "threshold": float(threshold),
        "comparison": ">=" if higher_is_better else "<",
        "met": met,
        "note": note,
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average():
    try:
        return [float(v) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device):
    """The machine, library versions and date, for the results' header."""
    import scipy
    import sklearn
    import torch

    import sparse_dict

    dev = str(device)
    card = None
    if dev.startswith("cuda") and torch.cuda.is_available():
        card = torch.cuda.get_device_name(torch.device(dev))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "sparse_dict": getattr(sparse_dict, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": dev,
        "card": card,
        "load_average_at_start": _load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_status_kb(field, pid="self"):
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``RssAnon``), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakSampler:
    """Samples a ``/proc/self/status`` field in a thread and keeps the maximum.

    Used for ``RssAnon``: the anonymous (heap) part of the resident set. The
    pages of a memory-mapped file that were read are also resident, but they
    belong to the page cache and the kernel drops them under pressure, so
    they are not memory the fit needs; ``VmHWM`` counts them and is reported
    alongside for comparison.
    """

    def __init__(self, field="RssAnon", interval=0.005):
        self.field = field
        self.interval = interval
        self.peak_kb = read_status_kb(field) or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            value = read_status_kb(self.field)
            if value is not None and value > self.peak_kb:
                self.peak_kb = value
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        value = read_status_kb(self.field)
        if value is not None:
            self.peak_kb = max(self.peak_kb, value)
        return False


def sae_params(**overrides):
    """The SAE settings the benchmarks use unless a section says otherwise.

    ``l1_coef=3``, ``learning_rate=3e-3`` and ``batch_size=256`` recover the
    true atoms of ``make_superposition`` data well; they are passed
    explicitly so that the benchmark does not move when the estimator's
    defaults are tuned.
    """
    params = dict(l1_coef=3.0, learning_rate=3e-3, batch_size=256, max_iter=20)
    params.update(overrides)
    return params
