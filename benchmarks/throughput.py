"""Training throughput against the machine's dense matrix-product rate.

One SAE training step on a batch of B rows, d features and N atoms costs
about ``10 * B * d * N`` floating-point operations (two forward matrix
products, three backward ones). This script measures, side by side in one
process and interleaved so that machine noise hits all of them alike:

* the dense float32 matrix-product rate (a ``B x d @ d x N`` product),
* sparse_dict's training loop (the real :class:`sparse_dict._torch.Trainer`
  pass over an in-memory array: batch gathering, the step, Adam, the
  unit-norm constraint and firing statistics),
* a plain hand-written torch loop of the same model (autograd, Adam, the
  same constraint),

and reports each as GFLOP/s and as a fraction of the matrix-product rate.

In the same rounds, the training loop with each other activation (top-k and
batch top-k at ``k=32`` with AuxK on, JumpReLU) runs on the same batches,
and its rows per second are reported against the ReLU loop's: the step cost
of each activation relative to ReLU (the ratio is > 1 when it is faster).
A run this short leaves no feature dead, so AuxK's own product is not part
of the top-k figures.

Run ``python -m benchmarks.throughput [--device cuda] [--full]``.
"""

import argparse
import json
import platform
import time

import numpy as np
import torch

from sparse_dict._torch import TrainConfig, Trainer, resolve_device
from sparse_dict._torch.activations import make_activation

# Activations timed against the ReLU loop, with their sparsity setting.
OTHER_ACTIVATIONS = {"topk": 32, "batchtopk": 32, "jumprelu": None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(batch, d, n, device, repeats, dtype=torch.float32):
    """GFLOP/s of a dense ``(batch, d) @ (d, n)`` product."""
    a = torch.randn(batch, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    out = torch.empty(batch, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    _sync(device)
    return 2.0 * batch * d * n * repeats / (time.perf_counter() - start) / 1e9


class PlainLoop:
    """The same SAE trained the obvious way: autograd, Adam, renormalised atoms."""

    def __init__(self, d, n, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n, d, generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        self.W_dec = atoms.to(device).clone().requires_grad_()
        self.W_enc = atoms.to(device).clone().requires_grad_()
        self.b_enc = torch.zeros(n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        params = [self.W_dec, self.W_enc, self.b_enc, self.b_dec]
        self.opt = torch.optim.Adam(params, lr=1e-4)

    def step(self, x, l1_coef):
        f = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x - x_hat).pow(2).sum(dim=1).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(dim=1).mean()
        loss = mse + l1_coef * l1
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(dim=1, keepdim=True) * W
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return loss.detach()


def _activation_trainer(name, k, X, d, n, dev, batch):
    trainer = Trainer(d, n, dev, seed=0, activation=make_activation(name, k=k))
    trainer.initialize(X, np.random.RandomState(0), "mean")
    topk = k is not None
    config = TrainConfig(coef=0.0 if topk else 1.0, learning_rate=1e-4, batch_size=batch,
                         resample_dead=False, auxk_coef=1 / 32 if topk else 0.0,
                         k_aux=d // 2 if topk else 0)
    trainer.train(X[: batch * 2], 1, config, np.random.RandomState(1))  # warm-up
    return trainer, config


def run(quick=True, device="cpu", batch=4096, d=512, n=4096, rounds=None, steps=None):
    """Measure training throughput; return a dict of every figure.

    Parameters
    ----------
    quick : bool
        Fewer rounds and steps.
    device : str
    batch, d, n : int
        The step's shape (defaults: the issue's B=4096, d=512, N=4096).
    rounds, steps : int, optional
        Interleaved measurement rounds and training steps per round.
    """
    dev = resolve_device(device)
    rounds = rounds or (3 if quick else 5)
    steps = steps or (4 if quick else 10)
    flops_per_step = 10.0 * batch * d * n
    rng = np.random.RandomState(0)
    # Enough rows for every timed pass to be a full set of batches.
    X = np.abs(rng.standard_normal((batch * steps, d))).astype(np.float32)

    trainer = Trainer(d, n, dev, seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    plain = PlainLoop(d, n, dev)
    x_plain = torch.as_tensor(X[:batch], device=dev) * trainer.scale

    # Warm-up: allocator, thread pools, kernels.
    config = TrainConfig(coef=1.0, learning_rate=1e-4, batch_size=batch, resample_dead=False)
    trainer.train(X[: batch * 2], 1, config, np.random.RandomState(1))
    for _ in range(2):
        plain.step(x_plain, 1.0)
    matmul_rate(batch, d, n, dev, 3)
    others = {name: _activation_trainer(name, k, X, d, n, dev, batch)
              for name, k in OTHER_ACTIVATIONS.items()}
    other_rates = {name: [] for name in others}

    mm, ours, base = [], [], []
    for r in range(rounds):
        mm.append(matmul_rate(batch, d, n, dev, steps * 3))
        _sync(dev)
        start = time.perf_counter()
        trainer.train(X, 1, config, np.random.RandomState(r))
        _sync(dev)
        ours.append(flops_per_step * steps / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        for _ in range(steps):
            plain.step(x_plain, 1.0)
        _sync(dev)
        base.append(flops_per_step * steps / (time.perf_counter() - start) / 1e9)
        for name, (tr, cfg) in others.items():
            start = time.perf_counter()
            tr.train(X, 1, cfg, np.random.RandomState(r))
            _sync(dev)
            other_rates[name].append(batch * steps / (time.perf_counter() - start))

    mm_rate, ours_rate, plain_rate = (float(np.median(v)) for v in (mm, ours, base))
    relu_rows = ours_rate * 1e9 / flops_per_step * batch
    activations = {"relu": {"k": None, "rows_per_s": relu_rows, "over_relu": 1.0}}
    for name, rates in other_rates.items():
        rows = float(np.median(rates))
        activations[name] = {"k": OTHER_ACTIVATIONS[name], "rows_per_s": rows,
                             "over_relu": rows / relu_rows}
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "shape": {"batch": batch, "d": d, "n": n},
        "flops_per_step": flops_per_step,
        "matmul_gflops": mm_rate,
        "sae_gflops": ours_rate,
        "plain_loop_gflops": plain_rate,
        "sae_fraction_of_matmul": ours_rate / mm_rate,
        "plain_fraction_of_matmul": plain_rate / mm_rate,
        "sae_over_plain": ours_rate / plain_rate,
        "sae_steps_per_second": ours_rate * 1e9 / flops_per_step,
        "activations": activations,
        "rounds": {"matmul": mm, "sae": ours, "plain": base, **other_rates},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    result = run(quick=not args.full, device=args.device)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
