"""Shared pieces of the benchmark suite: timing, machine description, targets.

Every benchmark module exposes ``run(mode, device) -> dict``; ``mode`` is one
of ``"tiny"`` (seconds, for the smoke test), ``"quick"`` (minutes on two CPU
cores) or ``"full"`` (the issue's sizes). The sizes of each mode live next to
the code that uses them, in a ``SIZES`` dict keyed by mode.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

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


_COMPARE = {">=": np.greater_equal, ">": np.greater, "<": np.less, "<=": np.less_equal}


def target(name, description, value, threshold, *, higher_is_better=True, comparison=None,
           note=""):
    """A target record: the figure, the threshold and whether it is met.

    ``comparison`` (``">="``, ``">"``, ``"<"``, ``"<="``) overrides
    ``higher_is_better`` (``">="`` when true, ``"<"`` otherwise). A missing
    figure (``None`` or NaN, e.g. a quality never reached) is recorded as not
    met rather than dropped, so the report always shows it.
    """
    comparison = comparison or (">=" if higher_is_better else "<")
    ok = value is not None and np.isfinite(value)
    met = bool(_COMPARE[comparison](value, threshold)) if ok else False
    return {
        "name": name,
        "description": description,
        "value": float(value) if ok else None,
        "threshold": float(threshold),
        "comparison": comparison,
        "met": met,
        "note": note,
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
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
        "blas": blas_info(),
        "blas_isolated": _child_blas(),
        "load_average_at_start": _load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _child_blas():
    # The kernel a child process with the clean environment gets: what the
    # sklearn side of the comparisons ran on.
    code = "import json; from benchmarks._common import blas_info; print(json.dumps(blas_info()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=clean_blas_env(),
                              capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
        return json.loads(proc.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def read_status_kb(field, pid="self"):
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``RssAnon``), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
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


# The four sparsity mechanisms, and the parameter that sets each one's sparsity.
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")
KNOB = {"relu": "l1_coef", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coef"}
# The setting used where a section names none (l1_coef=3 is the value that
# recovers make_superposition's atoms well).
DEFAULT_KNOB = {"relu": 3.0, "topk": 32, "batchtopk": 32, "jumprelu": 0.005}


def sae_params(activation="relu", knob=None, **overrides):
    """The SAE settings the benchmarks use unless a section says otherwise.

    Every parameter that matters is passed explicitly (learning rate, batch
    size, budget, AuxK and resampling), so that the benchmark does not move
    when the estimator's defaults are tuned. ``knob`` is the value of the
    activation's sparsity parameter (:data:`KNOB`): ``k`` for the top-k
    family, ``l1_coef`` for ReLU, ``l0_coef`` for JumpReLU.

    ``knob=None`` takes :data:`DEFAULT_KNOB`. ``learning_rate=3e-3`` and
    ``batch_size=256`` recover the true atoms of
    ``make_superposition`` data well. AuxK is on for the top-k family
    (``auxk_coef=1/32``, the value of Gao et al.) and off otherwise;
    dead-feature resampling is on for ReLU and JumpReLU only, the pairing the
    estimator's ``"auto"`` makes.
    """
    params = dict(activation=activation, learning_rate=3e-3, batch_size=256, max_iter=20,
                  warmup_fraction=0.05, decay_fraction=0.2, jumprelu_bandwidth=0.05,
                  auxk_coef=1 / 32 if activation in TOPK_FAMILY else 0.0,
                  resample_dead=activation not in TOPK_FAMILY)
    knob = DEFAULT_KNOB[activation] if knob is None else knob
    params[KNOB[activation]] = int(knob) if KNOB[activation] == "k" else float(knob)
    params.update(overrides)
    return params


def warm_up_sae(device, n_features=16):
    """Fit a throwaway SAE once, so that the first timed fit pays no start-up.

    torch's first use in a process (thread pools, allocator, lazy imports)
    costs up to seconds, which would otherwise be charged to whichever SAE
    fit comes first in a section.
    """
    from sparse_dict import SparseAutoencoderDictionary

    X = np.abs(np.random.RandomState(0).standard_normal((256, n_features))).astype(np.float32)
    for activation in ACTIVATIONS:
        SparseAutoencoderDictionary(2 * n_features, device=device, random_state=0,
                                    **sae_params(activation, 2 if activation in TOPK_FAMILY
                                                 else 1.0, max_steps=3)).fit(X)


def knob_label(activation, value):
    """``"topk k=8"``: an activation and its sparsity setting, for tables."""
    return f"{activation} {KNOB[activation]}={value:g}"


# ----------------------------------------------------------------- BLAS
# This machine's environment sets OPENBLAS_CORETYPE (and a small L2 size),
# which makes OpenBLAS pick an older kernel than the CPU supports and about
# halves the speed of the numpy/scipy products that scikit-learn relies on.
# torch brings its own BLAS, so only the classical side would be slowed: the
# comparisons run in child processes without these variables.
BLAS_ENV_REMOVED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def blas_info():
    """The BLAS libraries loaded in this process, from threadpoolctl.

    Returns
    -------
    info : list of dict
        One entry per BLAS library (``internal_api``, ``architecture``: the
        kernel in use, ``num_threads``, ``version``, ``filepath``), plus the
        values of the OpenBLAS variables in this process's environment.
    """
    # numpy and scipy load their BLAS on import; import them so that the
    # report describes the libraries scikit-learn's code actually uses.
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info

    libs = [
        {k: lib.get(k) for k in ("internal_api", "architecture", "num_threads", "version",
                                  "filepath")}
        for lib in threadpool_info() if lib.get("user_api") == "blas"
    ]
    return {
        "libraries": libs,
        "env": {name: os.environ.get(name) for name in BLAS_ENV_REMOVED},
    }


def blas_summary(info):
    """One line: ``openblas SkylakeX (2 threads); OPENBLAS_CORETYPE unset``."""
    if not info:
        return "unknown"
    libs = sorted({f"{lib['internal_api']} {lib['architecture']} ({lib['num_threads']} threads)"
                   for lib in info.get("libraries", [])})
    env = ", ".join(f"{k}={v}" if v is not None else f"{k} unset"
                    for k, v in info.get("env", {}).items())
    return "; ".join(libs + ([env] if env else []))


def clean_blas_env(environ=None):
    """A copy of ``environ`` without :data:`BLAS_ENV_REMOVED`."""
    env = dict(os.environ if environ is None else environ)
    for name in BLAS_ENV_REMOVED:
        env.pop(name, None)
    return env


def run_isolated(names, mode, device, out_dir):
    """Run sections ``names`` in one child process with the clean BLAS environment.

    The child (``python -m benchmarks._section``) inherits everything else,
    ``PYTHONPATH`` and thread limits included, and runs each section's
    ``run(mode, device)`` in turn. Both methods of a comparison run in that
    one process, so their ratios are measured side by side; one child for
    all the sections pays the start-up (importing torch and scikit-learn)
    once.

    Returns
    -------
    results : dict
        Section name to its figures (with ``"wall_s"`` and ``"blas"``), or
        to ``{"error": ...}`` when it wrote nothing.
    """
    root = Path(__file__).resolve().parent.parent
    # Absolute: the sections' process runs from the repository's root, and a
    # path relative to another folder would be written there and read here.
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        # A file left by an earlier run must not pass for this run's figures.
        (out_dir / f"{name}.json").unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._section", mode, device, str(out_dir), *names],
        cwd=root, env=clean_blas_env(),
    )
    results = {}
    for name in names:
        path = out_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            results[name] = {"error": f"the child process exited with status "
                                      f"{proc.returncode} before section {name} ended "
                                      "(its traceback is on stderr above)",
                             "wall_s": 0.0}
    return results
