"""Training throughput against the machine's dense matrix-product rate.

One SAE training step on a batch of B rows, d features and N atoms costs
about ``10 * B * d * N`` floating-point operations (two forward matrix
products, three backward ones). This script measures, side by side in one
process and interleaved so that machine noise hits all of them alike:

* the dense float32 matrix-product rate (a ``B x d @ d x N`` product) of
  torch and, on a CPU, of numpy's OpenBLAS; the faster is the reference,
* sparse_dict's training step alone (loss and gradients of one batch: the
  five products and the work between them; the issue's target), whose
  products go through the faster BLAS that :mod:`sparse_dict._torch.matmul`
  measured,
* sparse_dict's training loop (the real :class:`sparse_dict._torch.Trainer`
  pass over an in-memory array, as ``fit`` runs it: batch gathering, the
  step, Adam, the unit-norm constraint and firing statistics),
* a plain hand-written torch loop of the same model (autograd, Adam, the
  same constraint),

and reports each as GFLOP/s and as a fraction of the matrix-product rate:
the median over rounds of each round's loop rate over the faster product
of that round (``sae_fraction_of_median_matmul`` keeps the ratio of the
medians).

In the same rounds, the training loop with each other activation (top-k and
batch top-k at ``k=32`` with AuxK on, JumpReLU) runs on the same batches,
and its rows per second are reported against the ReLU loop's: the step cost
of each activation relative to ReLU (the ratio is > 1 when it is faster).
A run this short leaves no feature dead, so AuxK's own product is not part
of the top-k figures.

Then the top-k family's sparse training step against the dense ReLU step
at a wide dictionary (d=512, N=16384, k=32, B=4096 by default): rows per
second of the step alone (loss and gradients, the target's figure) and of
the whole training loop (with Adam, the unit-norm constraint and batch
gathering, the same for both), in the same rounds; the top-k family's
dense step is shown too.

The suite runs this section in a child process without the OpenBLAS
overrides of this machine's environment (``OPENBLAS_CORETYPE``,
``OPENBLAS_L2_SIZE``), and records the kernel in use.

Run ``python -m benchmarks.throughput [--device cuda] [--full]``.
"""

import argparse
import json
import platform
import time

import numpy as np
import torch

from benchmarks._common import blas_info, blas_summary, target
from benchmarks._plain import PlainSAE, sync as _sync
from sparse_dict._torch import TrainConfig, Trainer, resolve_device
from sparse_dict._torch import matmul
from sparse_dict._torch.activations import make_activation

# Activations timed against the ReLU loop, with their sparsity setting.
OTHER_ACTIVATIONS = {"topk": 32, "batchtopk": 32, "jumprelu": None}
# The targets: the ReLU loop's rate against the faster dense
# product, and the sparse top-k step's rows/s against the dense ReLU step's.
FRACTION_TARGET = 0.8
SPARSE_TARGET = 2.5
SIZES = {
    "tiny": dict(batch=256, d=32, n=128, sparse_n=512, k=8, rounds=1, steps=2),
    "quick": dict(batch=4096, d=512, n=4096, sparse_n=16384, k=32, rounds=3, steps=6),
    "full": dict(batch=4096, d=512, n=4096, sparse_n=16384, k=32, rounds=5, steps=6),
}


# Seconds for OpenBLAS's spinning threads to go to sleep (its default
# timeout is 2**28 cycles, about 0.1 s).
_OPENBLAS_IDLE_S = 0.5


def matmul_rate(batch, d, n, device, repeats, dtype=torch.float32, library="torch"):
    """GFLOP/s of a dense ``(batch, d) @ (d, n)`` product.

    ``library="openblas"``: numpy's ``matmul`` on the same (CPU) memory,
    through the OpenBLAS that numpy loaded.
    """
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    out = torch.empty(batch, n, device=device, dtype=dtype)
    if library == "openblas":
        a_np, b_np, out_np = a.numpy(), b.numpy(), out.numpy()
        product = lambda: np.matmul(a_np, b_np, out=out_np)  # noqa: E731
    else:
        product = lambda: torch.mm(a, b, out=out)  # noqa: E731
    product()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        product()
    _sync(device)
    seconds = time.perf_counter() - start
    if library == "openblas":
        # OpenBLAS's threads spin for a while after a call before they
        # sleep; on a 2-core machine that takes the cores from whatever is
        # timed next (measured: the ReLU loop timed right after ran 4%
        # slower than after a pause). Let them go idle first.
        time.sleep(_OPENBLAS_IDLE_S)
    return 2.0 * batch * d * n * repeats / seconds / 1e9


def _activation_trainer(name, k, X, d, n, dev, batch, sparse_step="auto"):
    trainer = Trainer(d, n, dev, seed=0, activation=make_activation(name, k=k))
    trainer.initialize(X, np.random.RandomState(0), "mean")
    topk = k is not None
    config = TrainConfig(coef=0.0 if topk else 1.0, learning_rate=1e-4, batch_size=batch,
                         resample_dead=False, auxk_coef=1 / 32 if topk else 0.0,
                         k_aux=d // 2 if topk else 0, sparse_step=sparse_step)
    trainer.train(X[: batch * 2], 1, config, np.random.RandomState(1))  # warm-up
    return trainer, config


def _rows_per_s(trainer, config, X, seed, dev):
    _sync(dev)
    start = time.perf_counter()
    # As fit calls it: no rollback snapshot (fit keeps none).
    trainer.train(X, 1, config, np.random.RandomState(seed), rollback=False)
    _sync(dev)
    return X.shape[0] / (time.perf_counter() - start)


def _step_rows_per_s(trainer, config, x, steps, dev):
    """Rows/s of the training step alone (loss and gradients, no optimiser)."""
    model = trainer.model
    coef = config.coef
    # The kernel choices as the trainer settles them for a training call.
    kernels = config.step_kernels(dev)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        model.loss_and_gradients(x, coef, sparse_step=config.sparse_step, kernels=kernels)
    _sync(dev)
    return x.shape[0] * steps / (time.perf_counter() - start)


def run(mode="quick", device="cpu"):
    """The section's figures and targets at the sizes of ``mode``."""
    sizes = SIZES[mode]
    result = measure(device=device, **sizes)
    result["targets"] = [
        target("throughput_fraction_of_matmul",
               "ReLU training step GFLOP/s (loss and gradients: the five products) / the "
               "faster dense float32 matrix product's GFLOP/s (torch or OpenBLAS, same rounds)",
               result["sae_step_fraction_of_matmul"], FRACTION_TARGET,
               note=f"matmul backend {result['sparse_dict_matmul_backend']}; the whole "
                    "training loop (with Adam, the unit-norm constraint and batch "
                    f"gathering): {result['sae_fraction_of_matmul']:.3f}"
                    + ("; tiny shapes" if mode == "tiny" else "")),
        target("sparse_topk_over_dense_relu",
               "sparse top-k step rows/s / dense ReLU step rows/s "
               f"(d={sizes['d']}, N={sizes['sparse_n']}, k={sizes['k']}, B={sizes['batch']})",
               result["sparse"]["step_topk_sparse_over_relu"], SPARSE_TARGET,
               note="the step (loss and gradients); whole training loops (Adam, "
                    "constraint, batches): "
                    f"{result['sparse']['topk_sparse_over_relu']:.2f}"
                    + ("; tiny shapes" if mode == "tiny" else "")),
    ]
    return result


def measure(device="cpu", batch=4096, d=512, n=4096, sparse_n=16384, k=32, rounds=3, steps=2):
    """Measure training throughput; return a dict of every figure.

    Parameters
    ----------
    device : str
    batch, d, n : int
        The dense comparison's step shape (the issue's B=4096, d=512, N=4096).
    sparse_n, k : int
        Atoms and codes per row of the sparse-step comparison.
    rounds, steps : int
        Interleaved measurement rounds and training steps per round.
    """
    dev = resolve_device(device)
    flops_per_step = 10.0 * batch * d * n
    rng = np.random.RandomState(0)
    # Enough rows for every timed pass to be a full set of batches.
    X = np.abs(rng.standard_normal((batch * steps, d))).astype(np.float32)
    blas = blas_info()
    print(f"[throughput] BLAS: {blas_summary(blas)}; sparse_dict's CPU float32 product: "
          f"{matmul.backend()}", flush=True)

    trainer = Trainer(d, n, dev, seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    plain = PlainSAE(d, n, dev)
    x_plain = torch.as_tensor(X[:batch], device=dev) * trainer.scale

    # Warm-up: allocator, thread pools, kernels.
    config = TrainConfig(coef=1.0, learning_rate=1e-4, batch_size=batch, resample_dead=False)
    trainer.train(X[: batch * 2], 1, config, np.random.RandomState(1))
    for _ in range(2):
        plain.step(x_plain, 1.0)
    libraries = ["torch"] + (["openblas"] if dev.type == "cpu" else [])
    for library in libraries:
        matmul_rate(batch, d, n, dev, 2, library=library)
    others = {name: _activation_trainer(name, k_, X, d, n, dev, batch)
              for name, k_ in OTHER_ACTIVATIONS.items()}
    other_rates = {name: [] for name in others}
    # The sparse step's comparison, at a wide dictionary.
    wide = {
        "relu": _activation_trainer("relu", None, X, d, sparse_n, dev, batch),
        "topk_sparse": _activation_trainer("topk", k, X, d, sparse_n, dev, batch, True),
        "batchtopk_sparse": _activation_trainer("batchtopk", k, X, d, sparse_n, dev, batch,
                                                True),
        "topk_dense": _activation_trainer("topk", k, X, d, sparse_n, dev, batch, False),
    }
    wide_rates = {name: [] for name in wide}
    wide_steps = {name: [] for name in wide}
    x_wide = torch.as_tensor(X[:batch], device=dev) * trainer.scale

    mm = {library: [] for library in libraries}
    ours, base, ours_step = [], [], []
    for r in range(rounds):
        for library in libraries:
            mm[library].append(matmul_rate(batch, d, n, dev, steps * 3, library=library))
        ours.append(flops_per_step * _rows_per_s(trainer, config, X, r, dev) / batch / 1e9)
        ours_step.append(flops_per_step * _step_rows_per_s(trainer, config, x_plain, steps, dev)
                         / batch / 1e9)
        start = time.perf_counter()
        for _ in range(steps):
            plain.step(x_plain, 1.0)
        _sync(dev)
        base.append(flops_per_step * steps / (time.perf_counter() - start) / 1e9)
        for name, (tr, cfg) in others.items():
            other_rates[name].append(_rows_per_s(tr, cfg, X, r, dev))
        for name, (tr, cfg) in wide.items():
            wide_rates[name].append(_rows_per_s(tr, cfg, X, r, dev))
            wide_steps[name].append(_step_rows_per_s(tr, cfg, x_wide, steps, dev))
            tr.model.release_workspace()

    mm_rates = {library: float(np.median(v)) for library, v in mm.items()}
    best = max(mm_rates, key=mm_rates.get)
    mm_rate = mm_rates[best]
    # Each round's loop against the faster product of the same round,
    # measured seconds apart: the machine's slower drifts cancel in the ratio.
    round_best = np.max([mm[library] for library in libraries], axis=0)
    fraction = float(np.median(np.asarray(ours) / round_best))
    plain_fraction = float(np.median(np.asarray(base) / round_best))
    step_fraction = float(np.median(np.asarray(ours_step) / round_best))
    ours_rate, plain_rate = (float(np.median(v)) for v in (ours, base))
    relu_rows = ours_rate * 1e9 / flops_per_step * batch
    activations = {"relu": {"k": None, "rows_per_s": relu_rows, "over_relu": 1.0}}
    for name, rates in other_rates.items():
        rows = float(np.median(rates))
        activations[name] = {"k": OTHER_ACTIVATIONS[name], "rows_per_s": rows,
                             "over_relu": rows / relu_rows}
    wide_rows = {name: float(np.median(v)) for name, v in wide_rates.items()}
    step_rows = {name: float(np.median(v)) for name, v in wide_steps.items()}
    sparse = {
        "shape": {"batch": batch, "d": d, "n": sparse_n, "k": k},
        "step_rows_per_s": step_rows,
        "step_topk_sparse_over_relu": step_rows["topk_sparse"] / step_rows["relu"],
        "step_batchtopk_sparse_over_relu": step_rows["batchtopk_sparse"] / step_rows["relu"],
        "rows_per_s": wide_rows,
        "topk_sparse_over_relu": wide_rows["topk_sparse"] / wide_rows["relu"],
        "batchtopk_sparse_over_relu": wide_rows["batchtopk_sparse"] / wide_rows["relu"],
        "topk_sparse_over_topk_dense": wide_rows["topk_sparse"] / wide_rows["topk_dense"],
        "flop_ratio": 10.0 / 2.0,
    }
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "blas": blas,
        "shape": {"batch": batch, "d": d, "n": n},
        "flops_per_step": flops_per_step,
        "matmul_gflops": mm_rate,
        "matmul_gflops_by_library": mm_rates,
        "matmul_best_library": best,
        "sparse_dict_matmul_backend": matmul.backend() if dev.type == "cpu" else "torch",
        "sae_gflops": ours_rate,
        "plain_loop_gflops": plain_rate,
        "sae_fraction_of_matmul": fraction,
        "sae_step_gflops": float(np.median(ours_step)),
        "sae_step_fraction_of_matmul": step_fraction,
        "sae_fraction_of_median_matmul": ours_rate / mm_rate,
        "plain_fraction_of_matmul": plain_fraction,
        "sae_over_plain": ours_rate / plain_rate,
        "sae_steps_per_second": ours_rate * 1e9 / flops_per_step,
        "activations": activations,
        "activation_ratios": {name: a["over_relu"] for name, a in activations.items()},
        "sparse": sparse,
        "rounds": {"matmul": mm, "sae": ours, "sae_step": ours_step, "plain": base,
                   **other_rates,
                   **{f"wide_{name}": v for name, v in wide_rates.items()}},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true")
    size.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    result = run("full" if args.full else "tiny" if args.tiny else "quick", device=args.device)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
