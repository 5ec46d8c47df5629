"""The CPU float32 matrix product: torch's by default, OpenBLAS or the faster where asked."""

import numpy as np
import pytest
import torch

from sparse_dict._torch import SparseAutoencoder, make_activation, matmul


@pytest.fixture(autouse=True)
def _measured_choice_afterwards(monkeypatch):
    # These tests choose or measure the backend themselves, without the
    # suite's fixed one (conftest.py).
    monkeypatch.delenv(matmul.ENVIRONMENT_VARIABLE, raising=False)
    matmul.set_backend(None)
    yield
    matmul.set_backend(None)


@pytest.mark.parametrize("value", ["torch", "openblas", " OpenBLAS "])
def test_the_environment_variable_fixes_the_backend_without_measuring(monkeypatch, value):
    def no_probe(threads):
        raise AssertionError("measured although the environment named the backend")

    monkeypatch.setattr(matmul, "_probe", no_probe)
    monkeypatch.setenv(matmul.ENVIRONMENT_VARIABLE, value)
    matmul.set_backend(None)
    assert matmul.backend() == value.strip().lower()
    # set_backend in Python wins over it.
    matmul.set_backend("torch")
    assert matmul.backend() == "torch"


def test_a_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv(matmul.ENVIRONMENT_VARIABLE, "mkl")
    matmul.set_backend(None)
    with pytest.raises(ValueError, match="SPARSE_DICT_CPU_PRODUCT='mkl' is not a CPU"):
        matmul.backend()
    # Empty: torch's, as when unset.
    monkeypatch.setenv(matmul.ENVIRONMENT_VARIABLE, "")
    matmul.set_backend(None)
    assert matmul.backend() == "torch"


def test_by_default_nothing_is_measured(monkeypatch):
    # A measurement that OpenBLAS won in some processes and not in others
    # (100 and 94 GFLOP/s on a 2-core AMD EPYC) made fits with the same
    # random_state differ between processes, 4 runs in 8.
    probes = []
    monkeypatch.setattr(matmul, "_probe", lambda threads: probes.append(threads) or "openblas")
    assert matmul.backend() == "torch" and probes == []
    monkeypatch.setenv(matmul.ENVIRONMENT_VARIABLE, "auto")
    matmul.set_backend(None)  # the environment is read again
    assert matmul.backend() == "openblas" and len(probes) == 1


def test_fits_repeat_across_processes_by_default():
    # Each process measured its BLAS; on a near tie half of them chose
    # OpenBLAS, and the same random_state gave other atoms there. On the
    # CPU, as the repeatability is promised (a GPU's atomics are not
    # deterministic: on an H200 two processes' fits differed).
    import os
    import subprocess
    import sys

    script = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from sparse_dict import SparseAutoencoderDictionary\n"
        "from sparse_dict.datasets import make_superposition\n"
        "from sparse_dict._torch import matmul\n"
        "X, _, _ = make_superposition(n_samples=400, n_features=16, n_components=32, "
        "random_state=0)\n"
        "s = SparseAutoencoderDictionary(n_components=32, batch_size=64, max_iter=3, "
        "random_state=0, device='cpu').fit(X)\n"
        "print(matmul.backend(), s.components_.tobytes().hex()[:4096])\n")
    env = {k: v for k, v in os.environ.items() if k != matmul.ENVIRONMENT_VARIABLE}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    runs = {subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, check=True, timeout=300).stdout for _ in range(3)}
    assert len(runs) == 1 and runs.pop().startswith("torch ")


def test_threads_starting_at_once_share_one_measurement(monkeypatch):
    # Unlocked, two fits starting together each measured, and could pick
    # different winners, one replacing the other's mid-fit.
    import threading
    import time

    probes = []

    def slow_probe(threads):
        probes.append(threads)
        time.sleep(0.2)
        return "openblas" if len(probes) == 1 else "torch"

    monkeypatch.setattr(matmul, "_probe", slow_probe)
    matmul.set_backend("auto")
    answers = []
    workers = [threading.Thread(target=lambda: answers.append(matmul.backend()))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answers == ["openblas"] * 4 and len(probes) == 1


@pytest.fixture
def numpy_calls(monkeypatch):
    """Count the products that went through numpy's matmul."""
    calls = []
    real = np.matmul

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(matmul.np, "matmul", counting)
    return calls


def _step(name, backend, sparse_step=False):
    matmul.set_backend(backend)
    model = SparseAutoencoder(24, 160, make_activation(name, k=4),
                              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        model.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(3))
    stats, fired = model.loss_and_gradients(x, 0.4, sparse_step=sparse_step)
    return stats, fired, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["relu", "topk", "jumprelu"])
def test_both_backends_give_the_same_step(name, numpy_calls):
    stats_t, fired_t, grads_t = _step(name, "torch")
    assert numpy_calls == []
    stats_b, fired_b, grads_b = _step(name, "openblas")
    assert len(numpy_calls) == 5  # every product of the dense step went through OpenBLAS
    torch.testing.assert_close(stats_b, stats_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(fired_b, fired_t)
    for pname, grad in grads_t.items():
        assert grad.abs().max() > 0, pname
        torch.testing.assert_close(grads_b[pname], grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_the_sparse_step_uses_the_backend_for_its_one_dense_product(numpy_calls):
    _step("topk", "openblas", sparse_step=True)
    assert len(numpy_calls) == 1


def test_the_choice_is_measured_once_and_cached(monkeypatch):
    probes = []
    monkeypatch.setattr(matmul, "_probe", lambda threads: probes.append(threads) or "openblas")
    matmul.set_backend("auto")
    assert matmul.backend() == "openblas" and matmul.backend() == "openblas"
    assert len(probes) == 1
    matmul.set_backend("torch")  # forcing needs no measurement
    assert matmul.backend() == "torch" and len(probes) == 1


def test_a_failing_probe_keeps_torch(monkeypatch):
    def broken(threads):
        raise OSError("no threadpoolctl")

    monkeypatch.setattr(matmul, "_probe", broken)
    matmul.set_backend("auto")
    assert matmul.backend() == "torch"


def test_the_real_probe_answers_a_backend():
    matmul.set_backend(None)
    assert matmul._probe(torch.get_num_threads()) in matmul.BACKENDS


@pytest.mark.parametrize("blas_threads,candidate", [(2, False), (4, False), (1, True),
                                                    (None, False)])
def test_openblas_is_a_candidate_only_on_one_thread(monkeypatch, blas_threads, candidate):
    # On threads of its own beside torch's, OpenBLAS and torch's idle threads
    # fought for the cores: a fit took 70 s against 3.3 s where the probe of
    # products alone had chosen OpenBLAS. Here OpenBLAS is made to win every
    # timing: it is chosen only where it runs on one thread.
    monkeypatch.setattr(matmul, "_openblas_threads", lambda: blas_threads)
    timings = iter([1.0, 0.1] * 10)
    monkeypatch.setattr(matmul, "_best_time", lambda fn: (fn(), next(timings))[1])
    for threads in (1, 2, 8):
        expected = "openblas" if candidate else "torch"
        assert matmul._probe(threads) == expected, (threads, blas_threads)


def test_only_cpu_float32_products_outside_autograd_use_openblas(numpy_calls):
    matmul.set_backend("openblas")
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    torch.testing.assert_close(matmul.mm(a, b), a @ b)
    torch.testing.assert_close(matmul.mm(b.t(), a.t()), (a @ b).t())  # transposed views
    wide = torch.randn(5, 9)
    torch.testing.assert_close(matmul.mm(a, wide[:, :4]), a @ wide[:, :4])  # a column slice
    assert len(numpy_calls) == 3
    matmul.mm(a.double(), b.double())
    w = torch.randn(5, 4, requires_grad=True)
    product = matmul.mm(a, w)  # autograd is recording: torch keeps the graph
    assert product.requires_grad
    assert len(numpy_calls) == 3
    with pytest.raises(RuntimeError):
        matmul.mm(a, a)  # torch's own error for mismatched shapes


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown matrix-product backend 'mkl'"):
        matmul.set_backend("mkl")


def test_an_overflow_in_openblas_s_product_is_silent_as_in_torch_s():
    # numpy warned "overflow encountered in matmul" before the trainer's
    # divergence error, where torch's product gives inf silently: the
    # command line then printed three lines for one error.
    import warnings

    matmul.set_backend("openblas")
    try:
        a = torch.full((4, 3), 1e30)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = matmul.mm(a, a.t().contiguous())
        assert torch.isinf(out).all()
    finally:
        matmul.set_backend(None)
