"""Data-parallel training: several gloo processes on the CPU against one process.

Each test starts real processes (the worker in tests/distributed_worker.py,
or the command line under torchrun) and reads what every rank wrote.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict._cli_common import free_port
from sparse_dict._torch.distributed import replicas_for

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# Generous for two processes on two shared cores; a hang would exceed it.
TIMEOUT_S = 180


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _launch(mode, out, world_size=2, wait_for=None):
    """Start ``world_size`` ranks of the worker with torchrun's variables.

    Wait for every rank, or for the ranks in ``wait_for`` only (the others
    are then killed).
    """
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(out)],
            env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world_size)
    ]
    waited = range(world_size) if wait_for is None else wait_for
    try:
        outputs = [procs[r].communicate(timeout=TIMEOUT_S)[0] for r in waited]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
    return [procs[r].returncode for r in waited], outputs


def _one_process(name, X):
    params = {**worker.PARAMS[name], **worker.COMMON, "distributed": False}
    return SparseAutoencoderDictionary(**params)


def test_two_ranks_match_one_process(tmp_path):
    codes, outputs = _launch("fit", tmp_path)
    assert codes == [0, 0], outputs
    X = worker.make_data()
    for name in worker.PARAMS:
        rank0 = np.load(tmp_path / f"{name}_rank0.npz")
        rank1 = np.load(tmp_path / f"{name}_rank1.npz")
        alone = worker.fitted(_one_process(name, X).fit(X))
        for key, value in alone.items():
            # Every rank holds the same model, bit for bit ...
            np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=f"{name} {key}")
            # ... which is the one-process model up to the order of float sums.
            np.testing.assert_allclose(rank0[key], value, rtol=1e-4, atol=2e-5,
                                       err_msg=f"{name} {key}")
        # Rank 0 wrote the folder that every rank asked to save.
        saved = SparseAutoencoderDictionary.load(tmp_path / f"saved_{name}")
        np.testing.assert_array_equal(saved.components_, rank0["components_"])
    # The ReLU run resampled dead features, the same ones as one process did.
    assert int(np.load(tmp_path / "relu_rank0.npz")["n_resampled_"]) > 0
    partial = np.load(tmp_path / "partial_rank0.npz")
    alone = _one_process("topk", X).partial_fit(X)
    np.testing.assert_allclose(partial["components_"], alone.components_, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(partial["components_"],
                                  np.load(tmp_path / "partial_rank1.npz")["components_"])


def test_a_rank_that_raises_stops_every_rank(tmp_path):
    codes, outputs = _launch("raise", tmp_path)
    assert codes == [3, 3], outputs
    failed = (tmp_path / "error_rank1.txt").read_text()
    other = (tmp_path / "error_rank0.txt").read_text()
    assert failed.startswith("OSError: bad batch on purpose")
    assert other.startswith("RankFailedError:")
    assert "rank 1 of 2 failed with OSError: bad batch on purpose" in other
    # Both estimators were left unfitted, and nothing was saved.
    assert "fitted: False" in failed and "fitted: False" in other
    assert not (tmp_path / "saved").exists()
    # Then a run that diverges stops every rank with the same error.
    for rank in (0, 1):
        diverged = (tmp_path / f"diverged_rank{rank}.txt").read_text()
        assert diverged.startswith("DivergenceError: Training diverged"), diverged


def test_ranks_that_disagree_are_refused_by_name_on_every_rank(tmp_path):
    # Other widths (which gloo would abort on), a NaN on one rank's rows,
    # and another seed (which would silently train on no real batch).
    codes, outputs = _launch("mismatch", tmp_path)
    assert codes == [0, 0], outputs
    for rank in (0, 1):
        width = (tmp_path / f"width_rank{rank}.txt").read_text()
        assert width.startswith("ValueError: The ranks of a data-parallel fit disagree on "
                                "the model (its shape and activation): rank 0 has "
                                "n_features=16, rank 1 has n_features=8"), width
        k = (tmp_path / f"k_rank{rank}.txt").read_text()
        assert k.startswith("ValueError: The ranks of a data-parallel fit disagree on the "
                            "model (its shape and activation): rank 0 has activation="
                            "{'name': 'topk', 'k': 4}, rank 1 has activation={'name': "
                            "'topk', 'k': 8}"), k
        activation = (tmp_path / f"activation_rank{rank}.txt").read_text()
        assert activation.startswith("ValueError: The ranks of a data-parallel fit disagree "
                                     "on the model (its shape and activation): rank 0 has "
                                     "activation={'name': 'topk'"), activation
        rate = (tmp_path / f"rate_rank{rank}.txt").read_text()
        assert rate.startswith("ValueError: The ranks of a data-parallel fit disagree on ")
        assert "rank 0 has learning_rate=0.003, rank 1 has learning_rate=0.006." in rate, rate
        seed = (tmp_path / f"seed_rank{rank}.txt").read_text()
        assert seed.startswith("ValueError: The ranks of a data-parallel fit disagree on "
                               "random_state: rank 0 has 0, rank 1 has 1"), seed
    assert (tmp_path / "nan_rank1.txt").read_text().startswith("ValueError: Input X contains NaN")
    other = (tmp_path / "nan_rank0.txt").read_text()
    assert other.startswith("RankFailedError:") and "rank 1 of 2 failed with ValueError: " \
        "Input X contains NaN" in other, other


def test_a_killed_rank_stops_the_others(tmp_path):
    codes, outputs = _launch("die", tmp_path)
    assert codes == [3, 7], outputs
    other = (tmp_path / "error_rank0.txt").read_text()
    assert other.startswith("RankFailedError:")
    assert "another rank exited, was killed or did not answer" in other
    assert "fitted: False" in other
    assert not (tmp_path / "saved").exists()


def test_a_silent_rank_stops_the_others_within_the_timeout(tmp_path):
    # Rank 1 sleeps for ten minutes; rank 0 must end by itself, through the
    # group's timeout of a few seconds, well within _launch's TIMEOUT_S.
    codes, outputs = _launch("hang", tmp_path, wait_for=[0])
    assert codes == [3], outputs
    other = (tmp_path / "error_rank0.txt").read_text()
    assert other.startswith("RankFailedError:")
    assert "did not answer within the process group's timeout" in other
    assert "fitted: False" in other
    assert not (tmp_path / "saved").exists()


def test_cli_fit_nproc(tmp_path):
    X = worker.make_data()
    np.save(tmp_path / "acts.npy", X)
    out = tmp_path / "dictionary"
    run = subprocess.run(
        [sys.executable, "-m", "sparse_dict", "fit", str(tmp_path / "acts.npy"), "-o", str(out),
         "--nproc", "2", "--device", "cpu", "--activation", "topk", "--k", "4",
         "--n-components", "48", "--batch-size", "256", "--max-steps", "60", "-q"],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr
    saved = SparseAutoencoderDictionary.load(out)
    alone = _one_process("topk", X).fit(X)
    np.testing.assert_allclose(saved.components_, alone.components_, rtol=1e-4, atol=2e-5)


def test_cli_nproc_checks_before_launching(tmp_path, capsys):
    from sparse_dict.cli import main

    # A bad input fails at once, in the launching process, with one line.
    status = main(["fit", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "d"),
                   "--nproc", "2"])
    assert status == 2
    assert capsys.readouterr().err.strip().endswith("does not exist")
    # More processes than cores (a typo) start none.
    np.save(tmp_path / "a.npy", worker.make_data()[:100])
    status = main(["fit", str(tmp_path / "a.npy"), "-o", str(tmp_path / "d"),
                   "--nproc", "5000", "--device", "cpu"])
    assert status == 2
    assert "--nproc 5000 is more processes than the" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    # A GPU asked for where there is none is named as such, not as "more
    # processes than this machine's 0 GPUs".
    if not __import__("torch").cuda.is_available():
        status = main(["fit", str(tmp_path / "a.npy"), "-o", str(tmp_path / "d"),
                       "--nproc", "2", "--device", "cuda"])
        assert status == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_distributed_true_needs_a_launcher(monkeypatch):
    import torch

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="start the script with torchrun"):
        replicas_for(True, torch.device("cpu"))
    assert replicas_for("auto", torch.device("cpu")) is None
    X = worker.make_data()[:300]
    sae = SparseAutoencoderDictionary(n_components=8, max_steps=2, distributed=True)
    with pytest.raises(ValueError, match="distributed=True"):
        sae.fit(X)
    assert not hasattr(sae, "components_")


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    X = worker.make_data()[:300]
    sae = SparseAutoencoderDictionary(n_components=8, max_steps=5, random_state=0,
                                      distributed=False, device="cpu")
    with pytest.warns(Warning):
        sae.fit(X)
    # A rank other than 0 under a launcher returns the path without writing.
    monkeypatch.setenv("RANK", "1")
    sae.set_params(distributed="auto")
    assert sae.save(tmp_path / "d") == tmp_path / "d"
    assert not (tmp_path / "d").exists()
    # distributed=False: every process is on its own, and writes.
    sae.set_params(distributed=False)
    sae.save(tmp_path / "d")
    assert (tmp_path / "d" / "config.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    # SIGKILL (the out-of-memory killer) gives the launcher no chance to stop
    # its ranks: they trained on, and rank 0 wrote the output after the
    # command had ended. A child started as the launcher starts its ranks
    # now dies with it.
    import signal
    import time

    script = tmp_path / "launcher.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "from sparse_dict._cli_common import _stops_with\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         preexec_fn=_stops_with(os.getpid()))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = int(launcher.stdout.readline())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as stat:  # a zombie of init's is gone too
            if stat.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed launcher")
