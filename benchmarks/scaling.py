"""Scaling: fit time against data size and dictionary size; memory from memmaps.

1. Fit time against ``n_samples`` (fixed dictionary) and against
   ``n_components`` (fixed data) for the SAE (a fixed number of epochs) and
   MiniBatchDictionaryLearning (one pass), on ``make_superposition`` data.
   The slope of log(time) against log(size) is reported: 1 means linear.
   MiniBatchDictionaryLearning runs over a shorter range of sizes (its
   LARS coding is slow), so the SAE's slope over that same range is
   reported too: the two slopes side by side are those of equal ranges.
2. Peak memory while fitting the SAE (one epoch) from ``np.memmap`` files of
   growing size. Each fit runs in its own subprocess, which samples its
   ``RssAnon`` (anonymous resident memory, from ``/proc/self/status``) in a
   thread every 5 ms. File-backed pages of the memmap are resident too, but
   they are page cache that the kernel can drop, so they are excluded;
   ``VmHWM`` (peak resident set including them) is reported alongside.
   One file of the largest size is written and the smaller sizes are
   prefixes of it. Target: peak anonymous memory grows by less than 10% from
   the smallest to the largest file (the issue's 1 GB to 8 GB in the full
   mode; 64 MB to 512 MB in the quick mode).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning

from benchmarks._common import PeakSampler, Timer, read_status_kb, sae_params, target
from sparse_dict import SparseAutoencoderDictionary
from sparse_dict.datasets import make_superposition

SIZES = {
    "tiny": dict(n_features=16, n_components=32, samples=[500, 1000],
                 mbdl_samples=[256, 512], fixed_samples=500, mbdl_fixed_samples=256,
                 components=[16, 32], mbdl_components=[16, 32], epochs=2, memmap_mb=[2, 4],
                 memmap_features=64, memmap_components=64),
    "quick": dict(n_features=64, n_components=256,
                  samples=[1000, 2000, 4000, 8000, 16000, 32000],
                  mbdl_samples=[1000, 2000, 4000], fixed_samples=4096, mbdl_fixed_samples=1024,
                  components=[64, 128, 256, 512, 1024, 2048],
                  mbdl_components=[64, 128, 256],
                  epochs=10, memmap_mb=[64, 128, 256, 512],
                  memmap_features=256, memmap_components=256),
    "full": dict(n_features=64, n_components=256,
                 samples=[2000, 4000, 8000, 16000, 32000, 64000, 128000],
                 mbdl_samples=[1000, 2000, 4000, 8000, 16000], fixed_samples=8192,
                 mbdl_fixed_samples=4096,
                 components=[64, 128, 256, 512, 1024, 2048, 4096],
                 mbdl_components=[64, 128, 256, 512, 1024],
                 epochs=10, memmap_mb=[1024, 2048, 4096, 8192],
                 memmap_features=256, memmap_components=256),
}
MEMMAP_BATCH = 4096
MEMORY_GROWTH_TARGET = 0.10


def _fit_sae(X, n_components, epochs, device):
    sae = SparseAutoencoderDictionary(
        n_components, device=device, random_state=0, **sae_params(max_iter=epochs)
    )
    with Timer() as t:
        sae.fit(X)
    return t.seconds


def _fit_mbdl(X, n_components):
    est = MiniBatchDictionaryLearning(
        n_components=n_components, alpha=0.1, batch_size=256, max_iter=1, random_state=0
    )
    with warnings.catch_warnings(), Timer() as t:
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    return t.seconds


def _slope(sizes, seconds):
    """Least-squares slope of log(seconds) against log(size)."""
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def _range_slope(sizes, seconds, other_sizes):
    """The slope over the sizes within the range of ``other_sizes`` (MBDL's)."""
    lo, hi = min(other_sizes), max(other_sizes)
    kept = [(n, t) for n, t in zip(sizes, seconds) if lo <= n <= hi]
    return _slope([n for n, _ in kept], [t for _, t in kept])


def time_scaling(s, device):
    """Fit times against n_samples and n_components."""
    d = s["n_features"]
    n_max = max(s["samples"])
    X, _, _ = make_superposition(n_max, d, s["n_components"], random_state=0,
                                 dtype=np.float32)
    # Warm-up: the first fit of a process pays for thread pools and lazy
    # imports, which would otherwise land on the smallest size.
    _fit_sae(X[:512], 16, 1, device)
    _fit_mbdl(X[:256], 16)
    vs_samples = {"n_samples": s["samples"], "sae_s": [], "mbdl_n_samples": s["mbdl_samples"],
                  "mbdl_s": []}
    for n in s["samples"]:
        vs_samples["sae_s"].append(_fit_sae(X[:n], s["n_components"], s["epochs"], device))
    for n in s["mbdl_samples"]:
        vs_samples["mbdl_s"].append(_fit_mbdl(X[:n], s["n_components"]))
    vs_samples["sae_slope"] = _slope(s["samples"], vs_samples["sae_s"])
    vs_samples["mbdl_slope"] = _slope(s["mbdl_samples"], vs_samples["mbdl_s"])
    vs_samples["sae_slope_mbdl_range"] = _range_slope(s["samples"], vs_samples["sae_s"],
                                                      s["mbdl_samples"])

    vs_comp = {"n_components": s["components"], "sae_s": [],
               "mbdl_n_components": s["mbdl_components"], "mbdl_s": []}
    for n in s["components"]:
        vs_comp["sae_s"].append(_fit_sae(X[: s["fixed_samples"]], n, s["epochs"], device))
    for n in s["mbdl_components"]:
        vs_comp["mbdl_s"].append(_fit_mbdl(X[: s["mbdl_fixed_samples"]], n))
    vs_comp["sae_slope"] = _slope(s["components"], vs_comp["sae_s"])
    vs_comp["mbdl_slope"] = _slope(s["mbdl_components"], vs_comp["mbdl_s"])
    vs_comp["sae_slope_mbdl_range"] = _range_slope(s["components"], vs_comp["sae_s"],
                                                   s["mbdl_components"])
    return {
        "n_features": d,
        "vs_n_samples": dict(vs_samples, n_components=s["n_components"]),
        "vs_n_components": dict(vs_comp, n_samples=s["fixed_samples"],
                                mbdl_n_samples=s["mbdl_fixed_samples"]),
        "sae_epochs": s["epochs"],
        "mbdl_epochs": 1,
    }


def _write_memmap(path, n_rows, n_features, seed=0):
    """Write ``n_rows`` non-negative float32 rows in chunks (never all in memory)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(n_rows, n_features))
    chunk = 1 << 16
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        out[start:stop] = rng.exponential(size=(stop - start, n_features)).astype(np.float32)
    out.flush()
    del out


def memmap_child(path, n_rows, n_components, device):
    """Fit one epoch from the first ``n_rows`` of the file; return memory figures.

    Runs in a fresh process so that its peak memory is its own.
    """
    data = np.load(path, mmap_mode="r")
    X = data[:n_rows]
    baseline = read_status_kb("RssAnon")
    sae = SparseAutoencoderDictionary(
        n_components, device=device, random_state=0,
        **sae_params(batch_size=MEMMAP_BATCH, max_iter=1),
    )
    with PeakSampler("RssAnon") as sampler, Timer() as t:
        sae.fit(X)
    return {
        "n_rows": int(n_rows),
        "file_mb": X.nbytes / 2**20,
        "fit_s": t.seconds,
        "rss_anon_before_fit_mb": (baseline or 0) / 1024,
        "peak_rss_anon_mb": sampler.peak_kb / 1024,
        "vm_hwm_mb": (read_status_kb("VmHWM") or 0) / 1024,
        "is_memmap": isinstance(X, np.memmap),
    }


def memory_scaling(s, device):
    """Peak memory of SAE fits from memmaps of growing size, one subprocess each."""
    d = s["memmap_features"]
    rows = [int(mb * 2**20 // (4 * d)) for mb in s["memmap_mb"]]
    tmp = tempfile.mkdtemp(prefix="sparse_dict_bench_")
    try:
        path = os.path.join(tmp, "acts.npy")
        with Timer() as t:
            _write_memmap(path, max(rows), d)
        runs = []
        for n in rows:
            code = (
                "import json, sys; from benchmarks.scaling import memmap_child; "
                f"print(json.dumps(memmap_child({path!r}, {n}, "
                f"{s['memmap_components']}, {device!r})))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first, last = runs[0]["peak_rss_anon_mb"], runs[-1]["peak_rss_anon_mb"]
    return {
        "measure": "peak RssAnon of a fresh subprocess (anonymous memory; memmap pages "
                   "excluded), sampled every 5 ms; VmHWM includes file pages",
        "n_features": d,
        "n_components": s["memmap_components"],
        "batch_size": MEMMAP_BATCH,
        "epochs": 1,
        "write_s": t.seconds,
        "runs": runs,
        "growth": (last - first) / first,
    }


def run(mode="quick", device="cpu"):
    """Fit-time scaling and memmap memory; return the figures and the target."""
    s = SIZES[mode]
    timing = time_scaling(s, device)
    memory = memory_scaling(s, device)
    sizes = f"{s['memmap_mb'][0]} MB to {s['memmap_mb'][-1]} MB"
    note = "" if mode == "full" else f"{mode} mode: {sizes}; --full runs 1 GB to 8 GB"
    return {
        "time": timing,
        "memory": memory,
        "targets": [
            target("memmap_memory_growth",
                   f"growth of peak anonymous memory fitting from a memmap, {sizes}",
                   memory["growth"], MEMORY_GROWTH_TARGET, higher_is_better=False,
                   note=note),
        ],
    }
