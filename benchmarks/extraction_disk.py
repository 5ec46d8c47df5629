"""Extraction to disk: peak memory against the size of the corpus (issue 11).

The built-in model's activations (layer 0's MLP post-activation, 512 float32
a token) of corpora of growing size are written to an activation store by
``TransformerActivationExtractor.transform_to_disk``. The texts come from a
generator (the bundled training corpus, cycled until the size is reached),
so neither texts nor activations are ever held whole. Each size runs in a
fresh subprocess, so that its peak memory is its own:

- ``VmHWM`` is the peak resident set of the whole process. The store is
  written with ``write`` calls, never through a memory map, so the pages
  written are the kernel's page cache and are not counted: this is the
  memory the extraction needs.
- Peak ``RssAnon`` (anonymous memory, sampled every 5 ms) is reported
  alongside.

Target: ``VmHWM`` grows by at most 10% from the smallest corpus to the
largest (the issue's 10^5 to 10^7 tokens in the full mode; 10^5 to 10^6 in
the quick mode, which writes 2 GB; the largest full size writes 20 GB).

Run ``python -m benchmarks --only extraction_disk``; ``run(mode)`` returns the
figures as a dict.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks._common import PeakSampler, Timer, read_status_kb, target

SIZES = {
    "tiny": [5_000, 20_000],
    "quick": [100_000, 1_000_000],
    "full": [100_000, 1_000_000, 10_000_000],
}
GROWTH_TARGET = 0.10
CHUNK_TEXTS = 256


def _texts(n_tokens, lengths, corpus):
    """Texts of the corpus, cycled, until they hold ``n_tokens`` tokens."""
    total = 0
    while True:
        for text, n in zip(corpus, lengths):
            if total >= n_tokens:
                return
            yield text
            total += n


def child(n_tokens, path, device):
    """Extract ``n_tokens`` tokens' activations into a store at ``path``; memory figures.

    Runs in a fresh process so that its peak memory is its own.
    """
    from sparse_dict._corpus import load_corpus
    from sparse_dict.extraction import TransformerActivationExtractor

    corpus = load_corpus("train")
    extractor = TransformerActivationExtractor(device=device).fit(corpus[:1])
    # The lengths decide where the generator stops; counted once, in chunks,
    # before the measurement (the same work at every size).
    lengths = []
    for start in range(0, len(corpus), 1024):
        lengths += [len(s) for s in extractor.token_ids(corpus[start:start + 1024])]
    before = read_status_kb("VmRSS")
    with PeakSampler("RssAnon") as sampler, Timer() as t:
        store = extractor.transform_to_disk(_texts(n_tokens, lengths, corpus), path,
                                            chunk_texts=CHUNK_TEXTS, corpus="bundled corpus")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {
        "n_tokens": int(store.manifest["n_tokens"]),
        "n_texts": int(store.n_texts),
        "store_mb": size / 2**20,
        "extract_s": t.seconds,
        "tokens_per_s": store.manifest["n_tokens"] / t.seconds,
        "rss_before_mb": (before or 0) / 1024,
        "vm_hwm_mb": (read_status_kb("VmHWM") or 0) / 1024,
        "peak_rss_anon_mb": sampler.peak_kb / 1024,
    }


def run(mode="quick", device="cpu"):
    """Peak memory of extractions to disk of growing size; the figures and the target."""
    sizes = SIZES[mode]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for n in sizes:
        tmp = tempfile.mkdtemp(prefix="sparse_dict_bench_store_")
        try:
            path = os.path.join(tmp, "store")
            code = ("import json; from benchmarks.extraction_disk import child; "
                    f"print(json.dumps(child({n}, {path!r}, {device!r})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, cwd=root)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    first, last = runs[0]["vm_hwm_mb"], runs[-1]["vm_hwm_mb"]
    span = f"{sizes[0]:.0e} to {sizes[-1]:.0e} tokens".replace("e+0", "e")
    note = "" if mode == "full" else f"{mode} mode: {span}; --full runs 1e5 to 1e7 tokens"
    return {
        "measure": "VmHWM (peak resident set) of a fresh subprocess per size; peak RssAnon "
                   "sampled every 5 ms",
        "model": "builtin, layer 0 mlp_post (512 float32 a token)",
        "device": device,
        "chunk_texts": CHUNK_TEXTS,
        "runs": runs,
        "growth": (last - first) / first,
        "targets": [
            target("extraction_disk_memory_growth",
                   f"growth of peak memory extracting to disk, {span} (issue 11)",
                   (last - first) / first, GROWTH_TARGET, comparison="<=", note=note),
        ],
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "quick"), indent=2))
