"""Data-parallel training: N gloo processes against one process on this machine.

The same fit (same data, seed, global batch and number of steps) runs once
in one process that uses every core, and once data-parallel in
``n_processes`` processes that share the cores equally (each started with
the variables torchrun sets, each reading its share of every batch of one
``np.memmap`` file). Each process times its own ``fit`` call only, after a
barrier, so that interpreter start-up and imports are left out; the
data-parallel run's time is its slowest rank's. Reported per activation:

* rows per second of each run (training steps times the global batch,
  over the fit's time) and their ratio (> 1: data-parallel is faster);
* how well the results match: the largest absolute difference between the
  two runs' atoms, and the explained variance of each on the training rows.
  They differ only by the order of floating-point sums, so the atoms agree
  to about 1e-5 after a short run and drift apart slowly on long ones (the
  optimisation amplifies rounding), while the explained variances stay
  equal.

On one machine the processes share its cores and memory bandwidth, so the
figure shows the cost of the communication (one ``all_reduce`` of the
gradients per step) rather than a speed-up; across machines each rank
brings its own cores.

Run ``python -m benchmarks.distributed [--tiny|--full] [--processes N]``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparse_dict._cli_common import free_port

SIZES = {
    "tiny": dict(n_samples=4096, n_features=32, n_components=128, batch_size=256, steps=16),
    "quick": dict(n_samples=65536, n_features=128, n_components=1024, batch_size=1024,
                  steps=200),
    "full": dict(n_samples=262144, n_features=512, n_components=4096, batch_size=1024,
                 steps=500),
}
ACTIVATIONS = {"relu": {"l1_coef": 3.0}, "topk": {"k": 32}}


def _worker(spec_path):
    """One process's fit (run in a child): time it and write its atoms and EV."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(spec["threads"])
    import torch.distributed as dist

    from sparse_dict import SparseAutoencoderDictionary

    X = np.load(spec["data"], mmap_mode="r")
    sae = SparseAutoencoderDictionary(
        spec["n_components"], **spec["params"], batch_size=spec["batch_size"],
        max_steps=spec["steps"], device="cpu", random_state=0,
        distributed="auto" if spec["n_processes"] > 1 else False,
    )
    if spec["n_processes"] > 1:
        dist.init_process_group("gloo")
        dist.barrier()
    start = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        np.save(Path(spec["out"]) / "components.npy", sae.components_)
        result = {"seconds": seconds, "steps": int(sae.n_steps_),
                  "ev": float(sae.score(X[: min(len(X), 16384)]))}
        Path(spec["out"], "result.json").write_text(json.dumps(result), encoding="utf-8")
    if dist.is_initialized():
        # Every rank's time: the run takes as long as its slowest rank.
        times = [None] * dist.get_world_size()
        dist.all_gather_object(times, seconds)
        if rank == 0:
            result["seconds"] = max(times)
            Path(spec["out"], "result.json").write_text(json.dumps(result), encoding="utf-8")
        # Left to the interpreter's exit, gloo's threads can abort the process
        # (status -6, seen even after destroying the group): the results are
        # written, so leave without the teardown.
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


def _launch(spec, folder, timeout):
    """Run the worker in ``spec["n_processes"]`` processes; return rank 0's result."""
    folder.mkdir()
    spec = dict(spec, out=str(folder))
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    n = spec["n_processes"]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(n), PYTHONWARNINGS="ignore")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.distributed", "--worker",
                               str(spec_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if n > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(n)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError("a benchmark process failed:\n" + "\n".join(outputs))
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    result["components"] = np.load(folder / "components.npy")
    return result


def run(mode="quick", device="cpu", n_processes=2):
    """Figures of one process against ``n_processes`` data-parallel ones, per activation."""
    if device != "cpu":
        # The comparison is of gloo processes sharing this machine's cores.
        device = "cpu"
    from sparse_dict.datasets import make_superposition

    size = SIZES[mode]
    cores = os.cpu_count() or 1
    out = {"mode": mode, "device": device, "cores": cores, "n_processes": n_processes,
           "shape": size, "activations": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        X = make_superposition(n_samples=size["n_samples"], n_features=size["n_features"],
                               n_components=size["n_components"], random_state=0)[0]
        np.save(tmp / "X.npy", X.astype(np.float32))
        for name, params in ACTIVATIONS.items():
            spec = dict(data=str(tmp / "X.npy"), params=dict(activation=name, **params),
                        n_components=size["n_components"], batch_size=size["batch_size"],
                        steps=size["steps"])
            one = _launch(dict(spec, n_processes=1, threads=cores), tmp / f"{name}_1", 3600)
            many = _launch(dict(spec, n_processes=n_processes,
                                threads=max(1, cores // n_processes)),
                           tmp / f"{name}_{n_processes}", 3600)
            rows = size["steps"] * size["batch_size"]
            out["activations"][name] = {
                "one_process_rows_per_s": rows / one["seconds"],
                "data_parallel_rows_per_s": rows / many["seconds"],
                "speedup": one["seconds"] / many["seconds"],
                "steps": many["steps"],
                "max_abs_diff_components": float(
                    np.abs(one["components"] - many["components"]).max()),
                "one_process_ev": one["ev"],
                "data_parallel_ev": many["ev"],
            }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny")
    size.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.add_argument("--processes", type=int, default=2,
                        help="data-parallel processes to compare with one (at least 2)")
    args = parser.parse_args(argv)
    if args.processes < 2:
        parser.error(f"--processes must be at least 2, got {args.processes}")
    if args.worker:
        _worker(args.worker)
        return 0
    print(json.dumps(run(args.mode or "quick", n_processes=args.processes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
