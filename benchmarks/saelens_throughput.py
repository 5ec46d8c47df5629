"""The top-k family's training throughput against SAELens' TopK SAE, in one run.

SAELens is not a dependency of sparse_dict, nor of its benchmarks: it lives
in a virtual environment of its own, made once with::

    python -m venv .venv-saelens
    .venv-saelens/bin/pip install -c benchmarks/requirements-saelens.txt \\
        -r benchmarks/requirements-saelens.txt

(``SAELENS_PYTHON`` names another interpreter). This module, run by the
suite, times sparse_dict's TopK training loop here and starts that
interpreter on this same file with ``--worker``; the worker imports only
torch and SAELens and times SAELens' own training step on the same
configuration: its ``TopKTrainingSAE`` (``training_forward_pass`` with its
AuxK term, the backward pass, gradient clipping, its Adam step and learning
rate schedule, and its firing statistics), through ``SAETrainer._train_step``,
on batches held in memory, with its codes dense and sparse
(``use_sparse_activations``, where the version has it; the faster counts).
Both sides use the same number of torch threads
and the same d, N, k and batch; the two measurements alternate (ours, then
SAELens', then ours again) so that slow drift of the machine hits both.
Without the environment the section records why it was skipped.
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"
TARGET = 1.5
SIZES = {
    "tiny": dict(batch=256, d=32, n=256, k=8, steps=3),
    "quick": dict(batch=4096, d=512, n=16384, k=32, steps=3),
    "full": dict(batch=4096, d=512, n=16384, k=32, steps=8),
}


# ------------------------------------------------------------------ worker
def _worker(batch, d, n, k, steps, threads):
    """SAELens' TopK training step; rows/s as JSON on stdout."""
    import torch
    from sae_lens import __version__
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    import dataclasses

    torch.set_num_threads(threads)
    # SAELens at its best setting: its TopK config's use_sparse_activations
    # (where the version has it) stores the codes sparse, which its docs
    # recommend for float32 and a small k, this case; both are timed and the
    # faster counts (runs before 2026-11-27 timed the dense default alone).
    fields = {f.name for f in dataclasses.fields(TopKTrainingSAEConfig)}
    settings = [False, True] if "use_sparse_activations" in fields else [None]
    rates = {}
    for sparse in settings:
        torch.manual_seed(0)
        extra = {} if sparse is None else {"use_sparse_activations": sparse}
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32",
                                                    device="cpu", aux_loss_coefficient=1 / 32,
                                                    **extra))
        total = batch * (steps + 2)
        cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=batch,
                               lr=1e-4, lr_end=1e-5, device="cpu")
        data = torch.randn(steps + 2, batch, d).abs_()
        trainer = SAETrainer(cfg, sae, data_provider=iter(data))
        for i in range(2):  # warm-up: allocator, thread pools
            trainer._train_step(sae, data[i])
        start = time.perf_counter()
        for i in range(2, steps + 2):
            trainer._train_step(sae, data[i])
        rates[str(sparse)] = batch * steps / (time.perf_counter() - start)
    best = max(rates, key=rates.get)
    print(json.dumps({"rows_per_s": rates[best], "use_sparse_activations": best,
                      "rows_per_s_by_setting": rates, "saelens_version": __version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------ parent
def _python():
    return Path(os.environ.get("SAELENS_PYTHON", DEFAULT_PYTHON))


def _ours(batch, d, n, k, steps):
    import numpy as np

    from benchmarks.throughput import _activation_trainer, _rows_per_s
    from sparse_dict._torch import resolve_device

    dev = resolve_device("cpu")
    X = np.abs(np.random.RandomState(0).standard_normal((batch * steps, d))).astype(np.float32)
    trainer, config = _activation_trainer("topk", k, X, d, n, dev, batch)
    return lambda seed: _rows_per_s(trainer, config, X, seed, dev)


def run(mode="quick", device="cpu"):
    """Both loops' rows/s and their ratio, or the reason the section was skipped."""
    import torch

    from benchmarks._common import clean_blas_env, target

    sizes = SIZES[mode]
    python = _python()
    result = {"sizes": sizes, "python": str(python)}
    skip = None
    if device != "cpu":
        skip = "measured on the CPU only"
    elif not python.is_file():
        skip = (f"no SAELens environment at {python} (see benchmarks/requirements-saelens.txt "
                "for how to make one, or set SAELENS_PYTHON)")
    if skip is not None:
        result["skipped"] = skip
        result["targets"] = [target("saelens_topk_speedup", "sparse_dict TopK training "
                                    "rows/s / SAELens TopK training rows/s", None, TARGET,
                                    note=f"skipped: {skip}")]
        print(f"[saelens] skipped: {skip}", flush=True)
        return result
    ours = _ours(**sizes)
    ours(0)  # the first timed pass pays the start-up
    ours_rates = [ours(0)]
    threads = torch.get_num_threads()
    args = [str(python), str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
            *[f"--{key}={value}" for key, value in sizes.items()]]
    proc = subprocess.run(args, capture_output=True, text=True, env=clean_blas_env(),
                          cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the SAELens worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours_rates.append(ours(1))
    # The mean of the passes before and after SAELens' run, which is timed
    # over all its steps: slow drift of the machine cancels.
    mine = sum(ours_rates) / len(ours_rates)
    result.update({
        "sparse_dict_rows_per_s": mine,
        "sparse_dict_rounds": ours_rates,
        "saelens_rows_per_s": theirs["rows_per_s"],
        "saelens_use_sparse_activations": theirs.get("use_sparse_activations"),
        "saelens_rows_per_s_by_setting": theirs.get("rows_per_s_by_setting"),
        "saelens_version": theirs["saelens_version"],
        "saelens_torch": theirs["torch"],
        "threads": threads,
        "speedup": mine / theirs["rows_per_s"],
    })
    result["targets"] = [target(
        "saelens_topk_speedup",
        "sparse_dict TopK training rows/s / SAELens TopK training rows/s "
        f"(d={sizes['d']}, N={sizes['n']}, k={sizes['k']}, B={sizes['batch']})",
        result["speedup"], TARGET, note="tiny shapes" if mode == "tiny" else "")]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", default="quick", choices=list(SIZES))
    for key in ("batch", "d", "n", "k", "steps", "threads"):
        parser.add_argument(f"--{key}", type=int, default=1)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.batch, args.d, args.n, args.k, args.steps, args.threads)
    else:
        print(json.dumps(run(args.mode), indent=2))


if __name__ == "__main__":
    main()
