"""The batch feed: every way of bringing batches to the device trains on the same rows."""

import os
import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import scipy.sparse as sp
import torch

from sparse_dict import SparseAutoencoderDictionary
from sparse_dict._torch import TrainConfig, Trainer
from sparse_dict._torch.activations import make_activation
from sparse_dict._torch.data import iter_batches
from sparse_dict._torch import pipeline as pipeline_module
from sparse_dict._torch import train as train_module
from sparse_dict._torch.pipeline import (
    _POOL,
    BatchFeed,
    CudaRegistrar,
    HostCopy,
    TouchedArrays,
    default_workers,
    page_aligned_empty,
    resident_fits,
    to_host,
    unregister_later,
)
from sparse_dict._torch.train import _DeadFeatures

CPU = torch.device("cpu")
MODES = [dict(resident=False, workers=0), dict(resident=False, workers=1),
         dict(resident=False, workers=3, depth=2), dict(resident=True, workers=0)]


def _inputs(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.randn(103, 7)
    path = tmp_path / "x.npy"
    np.save(path, X.astype(np.float32))
    sparse = X.copy()
    sparse[sparse < 0.5] = 0
    return {
        "float32": X.astype(np.float32),
        "float64": X,
        "memmap": np.load(path, mmap_mode="r"),
        "csr": sp.csr_matrix(sparse),
    }


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)


@pytest.mark.parametrize("mode", MODES, ids=["caller", "one-worker", "three-workers", "resident"])
def test_every_mode_yields_the_scaled_rows_of_each_batch(tmp_path, mode):
    for name, X in _inputs(tmp_path).items():
        indices = list(iter_batches(X, 16, np.random.RandomState(1)))
        with BatchFeed(X, CPU, 0.5, batch_size=16, **mode) as feed:
            got = list(feed.batches(iter(indices)))
        assert len(got) == len(indices), name
        for (index, x), expected in zip(got, indices):
            assert np.array_equal(index, expected)
            assert x.dtype == torch.float32
            np.testing.assert_allclose(x.numpy(), 0.5 * _dense(X)[expected], rtol=1e-6,
                                       err_msg=name)


@pytest.mark.parametrize("mode", MODES[1:], ids=["one-worker", "three-workers", "resident"])
def test_a_share_and_an_empty_share(mode):
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    indices = [np.array([0, 3, 5, 9]), np.array([1]), np.array([2, 4, 6, 8])]
    select = lambda index: index[1:]  # noqa: E731 - the first row belongs to another rank
    with BatchFeed(X, CPU, 1.0, batch_size=4, **mode) as feed:
        got = list(feed.batches(indices, select))
    assert got[1][1] is None
    np.testing.assert_array_equal(got[0][1].numpy(), X[[3, 5, 9]])
    np.testing.assert_array_equal(got[2][1].numpy(), X[[4, 6, 8]])


def test_batches_stay_valid_while_later_ones_are_gathered():
    # The training loop keeps the latest batches for resampling: a buffer
    # refilled by a worker must not change a batch already handed out.
    X = np.random.RandomState(0).randn(64, 5).astype(np.float32)
    indices = list(iter_batches(X, 8, np.random.RandomState(0)))
    with BatchFeed(X, CPU, 1.0, batch_size=8, workers=2, depth=2) as feed:
        kept = [x for _, x in feed.batches(indices)]
    for index, x in zip(indices, kept):
        np.testing.assert_array_equal(x.numpy(), X[index])


def test_the_feed_reads_at_most_depth_plus_workers_batches_ahead():
    X = np.zeros((100, 3), dtype=np.float32)
    asked = []

    def indices():
        for i in range(10):
            asked.append(i)
            yield np.array([i])

    with BatchFeed(X, CPU, 1.0, batch_size=1, workers=2, depth=2) as feed:
        batches = feed.batches(indices())
        next(batches)
        assert len(asked) == 1 + 2 + 2
        batches.close()


def test_a_failing_read_reaches_the_caller_and_leaves_no_thread():
    class Broken(np.ndarray):
        pass

    X = np.zeros((10, 3)).view(Broken)  # not float32: read through take_rows

    def take(*_):
        raise OSError("disk gone")

    import sparse_dict._torch.data as data

    # The workers read through data.take_rows_into, which reads a non-float32
    # array through take_rows.
    real, data.take_rows = data.take_rows, take
    try:
        with BatchFeed(X, CPU, 1.0, batch_size=2, workers=2) as feed:
            with pytest.raises(OSError, match="disk gone"):
                list(feed.batches([np.array([0, 1]), np.array([2, 3])]))
    finally:
        data.take_rows = real
    assert not [t for t in threading.enumerate() if t.name.startswith("sparse_dict-feed")]


@pytest.mark.parametrize("mode", MODES[1:], ids=["one-worker", "three-workers", "resident"])
def test_every_pass_reuses_the_feed_s_buffers(mode):
    # A fit of many passes must not take a new ring of (pinned) buffers each pass.
    X = np.random.RandomState(0).randn(40, 3).astype(np.float32)
    with BatchFeed(X, CPU, 1.0, batch_size=8, **mode) as feed:
        if feed.resident:
            # Every pass gathers from the copy (a pass before it lands would
            # stream, and take the streamed ring instead).
            feed._uploaded.wait(10)
        taken = []
        for seed in range(4):
            got = list(feed.batches(iter_batches(X, 8, np.random.RandomState(seed))))
            assert len(got) == 5
            taken.append([id(b) for b in feed._taken])
    assert taken[0] and all(t == taken[0] for t in taken)


def test_a_pass_stopped_early_is_closed_by_the_next_and_by_close():
    X = np.random.RandomState(0).randn(64, 3).astype(np.float32)
    with BatchFeed(X, CPU, 1.0, batch_size=8, workers=2) as feed:
        first = feed.batches(iter_batches(X, 8, np.random.RandomState(0)))
        next(first)
        second = feed.batches(iter_batches(X, 8, np.random.RandomState(1)))
        with pytest.raises(StopIteration):
            next(first)  # closed when the next pass began
        next(second)
    with pytest.raises(StopIteration):
        next(second)  # closed by close()
    assert not [t for t in threading.enumerate() if t.name.startswith("sparse_dict-feed")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_buffers_are_reused_across_feeds():
    X = np.zeros((10, 3), dtype=np.float32)
    device = torch.device("cuda")
    with BatchFeed(X, device, 1.0, batch_size=4, workers=1) as feed:
        list(feed.batches([np.array([0, 1])]))
        first = {id(b) for b in feed._taken}
    with BatchFeed(X, device, 1.0, batch_size=4, workers=1) as feed:
        list(feed.batches([np.array([0, 1])]))
        second = {id(b) for b in feed._taken}
    assert first and first == second
    assert len(_POOL._free) >= 1


def test_unpinned_buffers_are_not_kept():
    from sparse_dict._torch.pipeline import _PinnedPool

    pool = _PinnedPool()
    buf = pool.take((4, 3), torch.float32, pin=False)
    pool.give_back([buf])
    assert pool.take((4, 3), torch.float32, pin=False) is not buf


def test_defaults_keep_the_cpu_path_as_it_was():
    assert default_workers(CPU) == 0
    assert not resident_fits(10, 10, CPU, 1.0)


def _train(X, activation, **config):
    trainer = Trainer(X.shape[1], 48, "cpu", seed=3, activation=make_activation(activation, k=4))
    trainer.initialize(X, np.random.RandomState(0))
    # A large step and penalty kill features early, so resampling (which
    # draws from the batches the feed handed out) runs.
    settings = dict(batch_size=32, total_steps=40, resample_interval=10, dead_window=5,
                    coef=3.0, learning_rate=0.03,
                    auxk_coef=1 / 32 if activation == "topk" else 0.0, k_aux=6)
    settings.update(config)
    trainer.train(X, 10, TrainConfig(**settings), np.random.RandomState(5))
    return trainer


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_training_is_the_same_in_every_mode(activation):
    X = np.random.RandomState(2).randn(200, 12).astype(np.float32)
    reference = _train(X, activation)
    assert reference.n_resampled > 0 or activation == "topk"
    for config in (dict(data_on_device=True), dict(gather_workers=2)):
        other = _train(X, activation, **config)
        for name, value in reference.model.state_dict().items():
            torch.testing.assert_close(other.model.state_dict()[name], value, rtol=0, atol=0,
                                       msg=f"{name} with {config}")
        np.testing.assert_array_equal(other.history, reference.history)


def test_an_early_stop_leaves_no_feed_thread():
    X = np.random.RandomState(2).randn(400, 6).astype(np.float32)
    trainer = _train(X, "relu", total_steps=3, gather_workers=2)
    assert trainer.step == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("sparse_dict-feed")]


def test_dead_features_read_late_are_the_ones_of_lag_steps_before():
    dead = _DeadFeatures(lag=2)
    masks = [torch.tensor(m, dtype=torch.bool) for m in
             ([0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0])]
    got = [dead.current(m).tolist() for m in masks]
    assert got == [[], [], [2], [0], [1, 2]]
    assert _DeadFeatures(lag=0).current(masks[2]).tolist() == [1, 2]


def _lagged_auxk_run(n_rows, n_passes):
    """60 steps of a TopK trainer whose dead list is read two steps late."""
    X = np.random.RandomState(2).randn(n_rows, 12).astype(np.float32)
    trainer = Trainer(12, 96, "cpu", seed=3, activation=make_activation("topk", k=2))
    trainer.dead_lag = 2
    trainer.initialize(X, np.random.RandomState(0))
    config = TrainConfig(batch_size=40, total_steps=60, dead_window=5, auxk_coef=0.5, k_aux=6,
                         resample_dead=False)
    trainer.train(X, n_passes, config, np.random.RandomState(5))
    return trainer


def test_auxk_with_a_lag_still_revives_dead_features():
    trainer = _lagged_auxk_run(400, 10)
    history = trainer.history
    assert np.isfinite(history).all()
    # AuxK's term is non-zero once features die: the lagged list reached the step.
    assert (history[:, 4] > 0).any()


def test_rollback_false_keeps_what_was_trained_before_the_failure():
    X = np.random.RandomState(2).randn(100, 6).astype(np.float32)

    def stop_after_first_pass(info):
        raise KeyboardInterrupt

    for rollback, moved in ((True, False), (False, True)):
        trainer = Trainer(6, 12, "cpu", seed=0)
        trainer.initialize(X, np.random.RandomState(0))
        before = trainer.model.W_dec.detach().clone()
        with pytest.raises(KeyboardInterrupt):
            trainer.train(X, 3, TrainConfig(batch_size=20), np.random.RandomState(0),
                          callback=stop_after_first_pass, rollback=rollback)
        assert (not torch.equal(trainer.model.W_dec, before)) is moved


def test_the_budget_is_a_validated_parameter():
    X = np.random.RandomState(0).randn(50, 4)
    with pytest.raises(ValueError, match="device_data_budget"):
        SparseAutoencoderDictionary(n_components=8, device_data_budget=1.5).fit(X)


# ---------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_train(X, activation="relu", **config):
    trainer = Trainer(X.shape[1], 64, "cuda", seed=3, activation=make_activation(activation, k=4))
    trainer.initialize(X, np.random.RandomState(0))
    settings = dict(batch_size=32, total_steps=len(X) // 32, resample_dead=False,
                    auxk_coef=1 / 32 if activation == "topk" else 0.0, k_aux=6, dead_window=5)
    settings.update(config)
    trainer.train(X, 1, TrainConfig(**settings), np.random.RandomState(5))
    return trainer


@needs_cuda
def test_cuda_feeds_train_alike():
    X = np.random.RandomState(2).randn(640, 12).astype(np.float32)
    reference = _cuda_train(X, data_on_device=True)
    for config in (dict(data_on_device=False, gather_workers=0),
                   dict(data_on_device=False, gather_workers=3)):
        other = _cuda_train(X, **config)
        for name, value in reference.model.state_dict().items():
            torch.testing.assert_close(other.model.state_dict()[name], value, rtol=1e-5,
                                       atol=1e-6, msg=f"{name} with {config}")


@needs_cuda
@pytest.mark.parametrize("activation", ["relu", "topk"])
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_steps_never_wait_for_the_device(activation, resident):
    # A host synchronisation per step would add one warning per step: a run
    # with 40 more steps must warn about as often (the first run of a kind
    # may pay a one-off, seen on an H200 with the rows on the device).
    X = np.random.RandomState(2).randn(2560, 12).astype(np.float32)
    _cuda_train(X, activation, total_steps=5, data_on_device=resident)  # warm-up

    def syncs(steps):
        torch.cuda.synchronize()
        with pytest.warns() as record:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _cuda_train(X, activation, total_steps=steps, data_on_device=resident)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            import warnings
            warnings.warn("marker")  # pytest.warns needs at least one
        return sum("synchroniz" in str(w.message) for w in record)

    short, long = syncs(20), syncs(60)
    assert long - short < 10, (short, long)


def test_the_lagged_dead_list_carries_across_short_passes():
    # Passes of two steps: a list rebuilt each pass would never reach AuxK.
    trainer = _lagged_auxk_run(80, 30)
    assert (trainer.history[:, 4] > 0).sum() > 10


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_parallel_copy_is_a_new_equal_array(threads):
    from sparse_dict._torch.pipeline import _parallel_copy

    src = np.arange(13 * 5, dtype=np.float32).reshape(13, 5)[:, :4]  # not contiguous
    dst = _parallel_copy(src, threads=threads)
    assert dst.flags.c_contiguous and not np.shares_memory(src, dst)
    np.testing.assert_array_equal(dst, src)
    dst[:] = -1.0
    assert src.min() >= 0.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_parallel_copy_works_in_a_forked_child():
    # The parent's copying threads do not survive a fork; the child makes its own.
    from sparse_dict._torch import data
    from sparse_dict._torch.pipeline import _parallel_copy

    src = np.arange(40.0).reshape(8, 5)
    _parallel_copy(src, threads=2)
    # Every thread of the pool started and idle, as after a large export:
    # a child that reused the pool would then wait for threads it lacks.
    executor = data._HOST_EXECUTORS[("foreground", os.getpid())]
    list(executor.map(time.sleep, [0.05] * data._HOST_THREADS))
    time.sleep(0.1)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the copy finishes and is right
        ok = False
        try:
            ok = bool((_parallel_copy(src, threads=2) == src).all())
        finally:
            os._exit(0 if ok else 1)
    waited = 0.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if waited > 30:
            os.kill(pid, 9)
            pytest.fail("the copy hung in the forked child")
        time.sleep(0.05)
        waited += 0.05
    assert os.waitstatus_to_exitcode(status) == 0


def test_foreground_host_work_does_not_queue_behind_background_copies():
    # Every background thread busy (an upload's chunk): a fit's sampling,
    # on the foreground threads, still runs at once.
    from sparse_dict._torch import data

    release = threading.Event()
    busy = threading.Thread(target=data.host_map, daemon=True, args=(
        lambda _: release.wait(10), range(2 * data._HOST_THREADS)), kwargs={"background": True})
    busy.start()
    try:
        start = time.perf_counter()
        assert data.host_map(lambda x: x + 1, range(3)) == [1, 2, 3]
        assert time.perf_counter() - start < 5
        assert busy.is_alive()  # the background work was still holding its threads
    finally:
        release.set()
        busy.join(10)


# ------------------------------------------- the resident copy in the background


def _gate_upload(monkeypatch, until):
    """Hold every resident copy back until ``until(feed)`` is true (or 10 s pass)."""
    real = BatchFeed._upload

    def late(self, *args):
        deadline = time.monotonic() + 10
        while not until(self) and time.monotonic() < deadline:
            time.sleep(0.001)
        real(self, *args)

    monkeypatch.setattr(BatchFeed, "_upload", late)


def test_batches_are_streamed_until_the_resident_copy_has_landed(tmp_path, monkeypatch):
    gate = threading.Event()
    _gate_upload(monkeypatch, lambda feed: gate.is_set())
    for name, X in _inputs(tmp_path).items():
        gate.clear()
        indices = list(iter_batches(X, 8, np.random.RandomState(1)))
        with BatchFeed(X, CPU, None, batch_size=8, resident=True) as feed:
            with pytest.raises(RuntimeError, match="set_scale"):
                feed.batches(iter(indices))
            feed.set_scale(0.5)
            batches = feed.batches(iter(indices))
            got = [next(batches) for _ in range(3)]
            assert feed.streamed_batches == 3 and not feed._uploaded.is_set(), name
            gate.set()
            feed._uploaded.wait(10)
            got += list(batches)
            # The handover served the rest from the copy, in the same order.
            assert feed.streamed_batches == 3, name
            again = list(feed.batches(iter(indices)))
            assert feed.streamed_batches == 3, name
        for run in (got, again):
            assert [i.tolist() for i, _ in run] == [i.tolist() for i in indices], name
            for (index, x), expected in zip(run, indices):
                # Exactly the streamed values: the same float32 rows times the
                # same float32 scale.
                assert torch.equal(x, torch.from_numpy(_dense(X)[expected]).float() * 0.5), name


def test_the_calibration_sample_comes_from_the_resident_copy_with_the_same_values(
        tmp_path, monkeypatch):
    # A fit's calibration rows are gathered from the resident copy on the
    # device when it has landed (no copy from the host), else from X: the
    # same rows and values either way.
    gate = threading.Event()
    _gate_upload(monkeypatch, lambda feed: gate.is_set())
    served = []
    real_rows = BatchFeed.rows
    monkeypatch.setattr(BatchFeed, "rows", lambda self, index: (
        served.append(real_rows(self, index)) or served[-1]))
    for name, X in _inputs(tmp_path).items():
        for n_rows in (40, 1000):  # a sample, and every row
            gate.clear()
            trainer = Trainer(X.shape[1], 8, CPU, seed=0)
            trainer.scale = 0.5
            expected = trainer.calibration_sample(X, n_rows, np.random.RandomState(3))
            with BatchFeed(X, CPU, 0.5, batch_size=8, resident=True) as feed:
                early = trainer.calibration_sample(X, n_rows, np.random.RandomState(3), feed)
                assert served[-1] is None, name  # still on its way: from X
                gate.set()
                assert feed._uploaded.wait(10)
                got = trainer.calibration_sample(X, n_rows, np.random.RandomState(3), feed)
                assert served[-1] is got, name
                assert not got.data_ptr() == feed._data.data_ptr()
            assert torch.equal(early, expected) and torch.equal(got, expected), (name, n_rows)


def test_a_fit_calibrates_with_its_open_feed(monkeypatch):
    feeds = []
    real = Trainer.calibration_sample

    def record(self, X, n_rows, rng, feed=None):
        feeds.append(feed is not None and feed._data is not None)
        return real(self, X, n_rows, rng, feed)

    monkeypatch.setattr(Trainer, "calibration_sample", record)
    monkeypatch.setattr(pipeline_module, "resident_fits", lambda *a, **k: True)
    monkeypatch.setattr(train_module, "resident_fits", lambda *a, **k: True)
    X = np.random.RandomState(0).randn(300, 6).astype(np.float32)
    SparseAutoencoderDictionary(n_components=12, max_steps=20, batch_size=50,
                                random_state=0).fit(X)
    assert feeds == [True]


def test_the_scale_cannot_change_once_given():
    feed = BatchFeed(np.ones((4, 2), np.float32), CPU, 2.0, batch_size=2, resident=True)
    feed.set_scale(2.0)
    with pytest.raises(ValueError, match="cannot become 3.0"):
        feed.set_scale(3.0)
    feed.close()


def test_training_through_the_handover_gives_the_streamed_model(monkeypatch):
    # Held back until three batches were streamed: the fit trains on the
    # host's batches first, then on the device copy's, and ends where a fit
    # that streamed every batch ends.
    _gate_upload(monkeypatch, lambda feed: feed.streamed_batches >= 3)
    X = np.random.RandomState(0).randn(200, 12).astype(np.float32)
    models = []
    for on_device in (False, True):
        trainer = Trainer(12, 24, CPU, seed=1)
        config = TrainConfig(batch_size=20, total_steps=60, learning_rate=0.01,
                             data_on_device=on_device, resample_interval=10)
        with trainer.open_feed(X, config) as feed:
            trainer.initialize(X, np.random.RandomState(2))
            trainer.train(X, 6, config, np.random.RandomState(3), feed=feed)
        models.append((trainer, feed.streamed_batches))
    (a, _), (b, streamed) = models
    # (Released after three batches, the copy lands within a few steps; the
    # margin is for a loaded machine.)
    assert 3 <= streamed < 60
    for name, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[name], value), name
    assert np.array_equal(a.history, b.history)


def test_a_copy_that_fails_raises_at_the_handover(monkeypatch):
    from sparse_dict._torch import pipeline

    def broken(src, dst=None, threads=None, background=False):
        raise OSError("the disk went away")

    monkeypatch.setattr(pipeline, "_parallel_copy", broken)
    X = np.ones((40, 3), np.float32)
    with BatchFeed(X, CPU, 1.0, batch_size=4, resident=True) as feed:
        feed._uploaded.wait(10)
        with pytest.raises(OSError, match="disk went away"):
            list(feed.batches(iter_batches(X, 4, np.random.RandomState(0))))
    assert feed._uploader is None  # closed, the thread joined


def test_closing_stops_a_copy_on_its_way(monkeypatch):
    from sparse_dict._torch import pipeline

    real, chunks = pipeline._parallel_copy, []

    def slow(src, dst=None, threads=None, background=False):
        chunks.append(len(src))
        time.sleep(0.02)
        return real(src, dst, threads, background)

    monkeypatch.setattr(pipeline, "_parallel_copy", slow)
    monkeypatch.setattr(pipeline, "_UPLOAD_BYTES", 8 * 4 * 3)  # 8 rows a chunk
    X = np.ones((800, 3), np.float32)  # 100 chunks
    feed = BatchFeed(X, CPU, 1.0, batch_size=4, resident=True)
    time.sleep(0.1)
    feed.close()
    copied = len(chunks)
    time.sleep(0.1)
    # The copy stopped at its next chunk and its thread has ended.
    assert 0 < copied < 100 and len(chunks) == copied
    assert feed._uploader is None and feed._data is None


def test_a_fit_opens_its_feed_before_initialising(monkeypatch):
    # The resident copy starts before the model is initialised, so that the
    # two overlap; the estimator's fit is otherwise unchanged.
    order = []
    real_open, real_init = Trainer.open_feed, Trainer.initialize
    monkeypatch.setattr(Trainer, "open_feed",
                        lambda self, *a: order.append("feed") or real_open(self, *a))
    monkeypatch.setattr(Trainer, "initialize",
                        lambda self, *a, **k: order.append("init") or real_init(self, *a, **k))
    X = np.random.RandomState(0).randn(300, 8)
    est = SparseAutoencoderDictionary(n_components=16, max_steps=20, batch_size=50,
                                      random_state=0).fit(X)
    assert order == ["feed", "init"]
    assert est.n_steps_ == 20


@needs_cuda
def test_cuda_handover_from_streamed_to_resident_trains_alike(monkeypatch):
    # The copy held back until three batches were streamed from the host:
    # the steps then change to the device copy's batches mid-pass.
    X = np.random.RandomState(2).randn(640, 12).astype(np.float32)
    reference = _cuda_train(X, data_on_device=False, gather_workers=2)
    _gate_upload(monkeypatch, lambda feed: feed.streamed_batches >= 3)
    feeds = []
    real_open = Trainer.open_feed
    monkeypatch.setattr(Trainer, "open_feed",
                        lambda self, *a: feeds.append(real_open(self, *a)) or feeds[-1])
    other = _cuda_train(X, data_on_device=True)
    assert feeds and 3 <= feeds[0].streamed_batches < len(X) // 32
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[name], value, rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_a_pass_that_ends_before_the_copy_lands_does_not_wait_for_it(monkeypatch):
    gate = threading.Event()
    _gate_upload(monkeypatch, lambda feed: gate.is_set())
    X = np.arange(64, dtype=np.float32).reshape(16, 4)
    with BatchFeed(X, CPU, 1.0, batch_size=4, resident=True) as feed:
        first = list(feed.batches(iter_batches(X, 4, np.random.RandomState(0))))
        # Every batch of the pass came from the host, and the pass ended
        # with the copy still held back.
        assert len(first) == 4 and feed.streamed_batches == 4
        assert not feed._uploaded.is_set()
        gate.set()
        feed._uploaded.wait(10)
        second = list(feed.batches(iter_batches(X, 4, np.random.RandomState(0))))
        assert feed.streamed_batches == 4  # the next pass gathered on the device
    for (i, a), (j, b) in zip(first, second):
        assert np.array_equal(i, j) and torch.equal(a, b)


def _hold_last_chunk(monkeypatch, chunk_rows, n_features):
    """Copy in chunks of ``chunk_rows``, and hold the copy's last chunk until the event is set."""
    real, calls, release = pipeline_module._parallel_copy, [], threading.Event()

    def held(src, dst=None, threads=None, background=False):
        calls.append(len(src))
        if len(calls) == held.n_chunks:
            release.wait(10)
        return real(src, dst, threads, background)

    monkeypatch.setattr(pipeline_module, "_parallel_copy", held)
    monkeypatch.setattr(pipeline_module, "_UPLOAD_BYTES", chunk_rows * 4 * n_features)
    return held, release


@pytest.mark.parametrize("batch_size, streams", [(4, True), (8, False)])
def test_a_copy_nearly_landed_is_waited_for_instead_of_streaming(monkeypatch, batch_size,
                                                                 streams):
    # Every chunk of the copy but the last (8 rows) has been sent. With
    # batches of 4 rows, those 8 rows are two batches, more than the one
    # batch a feed without workers reads ahead: the steps go on with
    # streamed batches. With batches of 8, the copy's rest is no more than
    # the read-ahead: a batch streamed from the host would cost more than
    # the copy's last chunk, and the steps wait for it instead.
    X = np.arange(240, dtype=np.float32).reshape(80, 3)
    held, release = _hold_last_chunk(monkeypatch, chunk_rows=8, n_features=3)
    held.n_chunks = 10
    indices = list(iter_batches(X, batch_size, np.random.RandomState(0)))
    with BatchFeed(X, CPU, 2.0, batch_size=batch_size, resident=True) as feed:
        deadline = time.monotonic() + 10
        while feed._rows_sent < 72 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert feed._rows_sent == 72 and not feed._uploaded.is_set()
        batches = feed.batches(iter(indices))
        if streams:
            got = [next(batches) for _ in range(2)]
            assert feed.streamed_batches == 2 and not feed._uploaded.is_set()
            release.set()
            assert feed._uploaded.wait(10)
        else:
            # Released while the first batch waits for the copy.
            threading.Timer(0.05, release.set).start()
            got = [next(batches)]
            assert feed._uploaded.is_set() and feed.upload_wait_s > 0
            assert feed.streamed_batches == 0
        got += list(batches)
        assert feed.streamed_batches == (2 if streams else 0)
    assert [i.tolist() for i, _ in got] == [i.tolist() for i in indices]
    for (index, x), expected in zip(got, indices):
        assert torch.equal(x, torch.from_numpy(X[expected]) * 2.0)


def test_a_copy_that_fails_in_its_last_rows_raises_to_the_waiting_steps(monkeypatch):
    real = pipeline_module._parallel_copy
    calls = []

    def failing(src, dst=None, threads=None, background=False):
        calls.append(len(src))
        if len(calls) == 10:
            time.sleep(0.05)
            raise OSError("the disk went away")
        return real(src, dst, threads, background)

    monkeypatch.setattr(pipeline_module, "_parallel_copy", failing)
    monkeypatch.setattr(pipeline_module, "_UPLOAD_BYTES", 8 * 4 * 3)
    X = np.ones((80, 3), np.float32)
    with BatchFeed(X, CPU, 1.0, batch_size=8, resident=True) as feed:
        deadline = time.monotonic() + 10
        while feed._rows_sent < 72 and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(OSError, match="disk went away"):
            list(feed.batches(iter_batches(X, 8, np.random.RandomState(0))))
        assert feed.streamed_batches == 0


# ---------------------------------------------------------------------------
# The export's host arrays, their pages touched while training runs
# ---------------------------------------------------------------------------


def test_to_host_copies_into_given_arrays_of_the_right_shape_only():
    w, b = torch.randn(5, 3), torch.randn(3)
    into = {"w": np.empty((5, 3), dtype=np.float64), "b": np.empty(4)}
    out = to_host({"w": w, "b": b}, into=into)
    assert out["w"] is into["w"] and out["w"].dtype == np.float64
    np.testing.assert_array_equal(out["w"], w.numpy().astype(np.float64))
    # Another shape is not used: b gets a new array of its own dtype.
    assert out["b"] is not into["b"] and out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["b"], b.numpy())
    # A new array never shares the tensor's memory (callers keep it).
    assert not np.shares_memory(to_host({"w": w})["w"], w.numpy())


def test_touched_arrays_are_touched_in_a_thread_of_their_own(monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = pipeline_module.touch_pages

    def slow_touch(array):
        started.set()
        release.wait(5)
        return real(array)

    monkeypatch.setattr(pipeline_module, "touch_pages", slow_touch)
    touched = TouchedArrays({"a": (3, 2048), "b": (2, 5)}, np.float32)
    # The caller goes on while the thread touches; arrays() waits for it.
    assert started.wait(5) and touched._thread.is_alive()
    release.set()
    arrays = touched.arrays()
    assert not touched._thread.is_alive()
    assert {k: a.shape for k, a in arrays.items()} == {"a": (3, 2048), "b": (2, 5)}
    assert arrays["a"][0, 0] == 0.0 and arrays["a"][0, 1024] == 0.0


def test_an_export_fills_the_arrays_prepared_for_its_dtype(monkeypatch):
    monkeypatch.setattr(train_module, "_TOUCHED_EXPORT_BYTES", 1)
    X = np.random.RandomState(0).randn(200, 6).astype(np.float32)
    t = Trainer(6, 12, "cpu", seed=0)
    t.initialize(X, np.random.RandomState(0))
    plain = t.export(np.float64)
    t.prepare_export(np.float64)
    prepared = t._export_into.arrays()
    assert set(prepared) == {"components", "encoder_weights"}
    out = t.export(np.float64)
    assert all(out[k] is prepared[k] for k in prepared) and t._export_into is None
    for name, value in plain.items():
        assert out[name].dtype == np.float64
        np.testing.assert_array_equal(out[name], value)
    # Prepared for another dtype: new arrays, the same values.
    t.prepare_export(np.float32)
    other = t._export_into.arrays()
    out = t.export(np.float64)
    assert out["components"] is not other["components"]
    np.testing.assert_array_equal(out["components"], plain["components"])
    # None drops what was prepared; small matrices get none.
    t.prepare_export(np.float32)
    t.prepare_export(None)
    assert t._export_into is None
    monkeypatch.setattr(train_module, "_TOUCHED_EXPORT_BYTES", 1 << 24)
    t.prepare_export(np.float32)
    assert t._export_into is None


def test_a_training_that_fails_drops_its_export_arrays(monkeypatch):
    monkeypatch.setattr(train_module, "_TOUCHED_EXPORT_BYTES", 1)
    X = np.random.RandomState(0).randn(200, 6)
    est = SparseAutoencoderDictionary(n_components=12, max_steps=20, batch_size=50,
                                      random_state=0).fit(X)
    # A float64 fit exports float64 arrays, the ones prepared for it.
    assert est.components_.dtype == np.float64 and est._trainer._export_into is None

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(Trainer, "train", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        est.partial_fit(X)
    assert est._trainer._export_into is None


def test_a_host_copy_started_ahead_gives_what_to_host_gives():
    w, b = torch.randn(6, 4), torch.randn(4)
    into = {"w": np.empty((6, 4))}
    copy = HostCopy({"w": w, "b": b}, into=into, ahead=True)
    out = copy.result()
    assert out["w"] is into["w"] and list(out) == ["w", "b"]
    np.testing.assert_array_equal(out["w"], w.numpy())
    np.testing.assert_array_equal(out["b"], b.numpy())
    assert copy.result()["w"] is out["w"]  # asked again, the same arrays


def test_an_export_takes_up_the_weights_copy_started_before_it(monkeypatch):
    started = []
    real = train_module.HostCopy

    def counting(tensors, into=None, ahead=False, **kwargs):
        started.append((sorted(tensors), ahead))
        return real(tensors, into, ahead, **kwargs)

    monkeypatch.setattr(train_module, "HostCopy", counting)
    X = np.random.RandomState(0).randn(200, 6).astype(np.float32)
    t = Trainer(6, 12, "cpu", seed=0)
    t.initialize(X, np.random.RandomState(0))
    t.start_export(np.float64)
    out = t.export(np.float64)
    # One copy of the two weight matrices, started ahead; the rest after.
    assert started == [(["components", "encoder_weights"], True)]
    assert t._export_started is None
    assert set(out) == set(t.model.fitted_tensors()) and out["components"].dtype == np.float64
    np.testing.assert_array_equal(out["components"], t.model.W_dec.detach().numpy())
    np.testing.assert_array_equal(out["decoder_bias"],
                                  (t.model.b_dec.detach() / np.float32(t.scale)).numpy())
    # Started for another dtype: a new copy for the one asked.
    t.start_export(np.float32)
    out = t.export(np.float64)
    assert len(started) == 3 and out["components"].dtype == np.float64


class _Registrar:
    """Records registrations as CudaRegistrar would make them (by address)."""

    def __init__(self, accept=True):
        self.accept = accept
        self.registered, self.unregistered = [], []
        self._lock = threading.Lock()

    def register(self, array):
        assert array.ctypes.data % 4096 == 0  # whole pages of its own
        with self._lock:
            if self.accept:
                self.registered.append(array.ctypes.data)
            return self.accept

    def unregister(self, array):
        with self._lock:
            self.unregistered.append(array.ctypes.data)

    def settled(self):
        """Wait for the unregistering threads; whether each registration was undone once."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if sorted(self.unregistered) == sorted(self.registered):
                    return True
            time.sleep(0.01)
        return False


def _registering_trainer(monkeypatch, registrar):
    monkeypatch.setattr(train_module, "_TOUCHED_EXPORT_BYTES", 1)
    monkeypatch.setattr(train_module, "_export_registrar", lambda device, dtype: (
        registrar if np.dtype(dtype) == np.float32 else None))
    X = np.random.RandomState(0).randn(200, 6).astype(np.float32)
    t = Trainer(6, 12, "cpu", seed=0)
    t.initialize(X, np.random.RandomState(0))
    return t, X


def test_registered_export_arrays_are_filled_then_unregistered_once(monkeypatch):
    # On a GPU the export's arrays are page-locked while training runs, and
    # the copy lands in them; every registration is undone once, after it.
    registrar = _Registrar()
    t, _ = _registering_trainer(monkeypatch, registrar)
    plain = t.export(np.float32)
    t.prepare_export(np.float32)
    prepared = t._export_into.arrays()
    out = t.export(np.float32)
    assert all(out[k] is prepared[k] for k in prepared)
    assert len(registrar.registered) == 2 and registrar.settled()
    for name, value in plain.items():
        np.testing.assert_array_equal(out[name], value)


@pytest.mark.parametrize("how", ["dropped", "another dtype", "replaced", "training failed"])
def test_export_arrays_not_used_are_unregistered(monkeypatch, how):
    registrar = _Registrar()
    t, X = _registering_trainer(monkeypatch, registrar)
    t.prepare_export(np.float32)
    t._export_into.arrays()
    if how == "dropped":
        t.prepare_export(None)
    elif how == "another dtype":
        out = t.export(np.float64)
        np.testing.assert_array_equal(out["components"], t.model.W_dec.detach().numpy())
    elif how == "replaced":
        t.prepare_export(np.float32)
        t.prepare_export(None)
    else:
        def fail(*args, **kwargs):
            raise RuntimeError("the step failed")

        monkeypatch.setattr(t, "_local_step", fail)
        with pytest.raises(RuntimeError, match="the step failed"):
            t.train(X, 1, TrainConfig(batch_size=50), np.random.RandomState(0))
    assert registrar.registered and registrar.settled()
    assert t._export_into is None


def test_a_refused_registration_leaves_the_plain_copy(monkeypatch):
    registrar = _Registrar(accept=False)
    t, _ = _registering_trainer(monkeypatch, registrar)
    t.prepare_export(np.float32)
    out = t.export(np.float32)
    np.testing.assert_array_equal(out["encoder_weights"], t.model.W_enc.detach().numpy())
    assert registrar.registered == [] and registrar.unregistered == []


def test_taking_the_arrays_stops_the_registering(monkeypatch):
    # The export should not wait for registrations that only pay beside training.
    registrar = _Registrar()
    gate, first_done = threading.Event(), threading.Event()
    real_touch = pipeline_module.touch_pages

    def touch(array):
        if first_done.is_set():
            assert gate.wait(5)
        first_done.set()
        return real_touch(array)

    monkeypatch.setattr(pipeline_module, "touch_pages", touch)
    touched = TouchedArrays({"a": (3, 2048), "b": (3, 2048)}, np.float32, registrar)
    assert first_done.wait(5)
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    arrays, registered = touched.take()
    assert set(arrays) == {"a", "b"}
    assert len(registrar.registered) == len(registered) <= 1
    unregister_later(registrar, [arrays[name] for name in registered])
    assert registrar.settled()


def test_a_page_aligned_array_owns_its_pages():
    a = page_aligned_empty((5, 1000), np.float32)
    assert a.ctypes.data % 4096 == 0 and a.flags.c_contiguous and a.shape == (5, 1000)
    base = a.base
    while getattr(base, "base", None) is not None:
        base = base.base
    end = a.ctypes.data + -(-a.nbytes // 4096) * 4096
    assert base.ctypes.data <= a.ctypes.data and end <= base.ctypes.data + base.nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_registered_export_on_cuda_gives_the_weights_and_unlocks_them(monkeypatch):
    # The real cudaHostRegister: the copy lands in the arrays, whose
    # registration is gone afterwards (registering them again succeeds).
    monkeypatch.setattr(train_module, "_TOUCHED_EXPORT_BYTES", 1)
    X = np.random.RandomState(0).randn(300, 64).astype(np.float32)
    t = Trainer(64, 512, "cuda", seed=0)
    t.initialize(X, np.random.RandomState(0))
    t.prepare_export(np.float32)
    assert isinstance(t._export_into.registrar, CudaRegistrar)
    prepared = t._export_into.arrays()
    out = t.export(np.float32)
    assert out["components"] is prepared["components"]
    np.testing.assert_array_equal(out["components"], t.model.W_dec.detach().cpu().numpy())
    np.testing.assert_array_equal(out["encoder_weights"], t.model.W_enc.detach().cpu().numpy())
    registrar = CudaRegistrar()
    deadline = time.monotonic() + 10
    while not registrar.register(out["components"]):
        assert time.monotonic() < deadline, "the export's array stayed registered"
        time.sleep(0.01)
    registrar.unregister(out["components"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_host_copy_ahead_on_cuda_waits_for_the_work_queued_before_it():
    # The copy runs on a stream of its own: it must see what the current
    # stream wrote before it started, whatever that stream runs after.
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    w = torch.empty(2048, 2048, device=device)
    torch.mm(a, a, out=w)  # queued, likely still running when the copy starts
    copy = HostCopy({"w": w}, ahead=True)
    for _ in range(5):
        a = a @ a / 2048  # more work on the current stream meanwhile
    got = copy.result()["w"]
    np.testing.assert_array_equal(got, w.cpu().numpy())


@settings(max_examples=200, deadline=None)
@given(n_rows=st.integers(1, 5000), batch_size=st.integers(1, 700), big=st.booleans())
def test_a_pass_visits_every_row_once_in_batches_of_at_least_half(n_rows, batch_size, big):
    # A pass of 2,049 rows in batches of 1,024 made a third of its steps on
    # one row each, and Adam steps as far on one row as on a full batch.
    # Above the exact shuffle's size, windows of blocks are batched alike.
    from unittest import mock

    from sparse_dict._torch import data as data_module
    X = np.empty((n_rows, 0))
    with mock.patch.object(data_module, "_EXACT_SHUFFLE_ROWS", 0 if big else 1 << 20):
        batches = list(iter_batches(X, batch_size, np.random.RandomState(0)))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n_rows))
    sizes = [len(b) for b in batches]
    assert max(sizes) <= batch_size
    if not big and len(sizes) > 1:
        assert min(sizes) >= batch_size / 2
        assert sizes.count(batch_size) >= len(sizes) - 2


def test_every_cuda_event_is_recorded_on_a_named_stream():
    # Event.record() with no stream records on the *current* device's stream:
    # for a fit on cuda:1 with cuda:0 current, the host then read pinned
    # buffers before their copies had landed.
    import inspect
    import re

    from sparse_dict._torch import pipeline, train

    for module in (pipeline, train):
        source = inspect.getsource(module)
        assert re.search(r"\.record\(\w", source), module.__name__
        assert not re.search(r"\.record\(\s*\)", source), module.__name__


def test_a_pinned_read_of_gpu_tensors_records_on_their_device_s_stream(monkeypatch):
    # Recorded on current_stream(<the pinned host copy>.device), a CPU
    # device, which raises on a GPU machine: every GPU fit failed (found
    # before any GPU ran it). Simulated here: a tensor that reports cuda:1.
    import torch.cuda._utils as cuda_utils

    from sparse_dict._torch import pipeline

    class OnGpu(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    class Event:
        def record(self, stream=None):
            self.stream = stream

        def synchronize(self):
            pass

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: (
        "stream", cuda_utils._get_device_index(device, optional=True)))
    read = pipeline.PinnedRead([torch.arange(3.0).as_subclass(OnGpu)])
    assert read._event.stream == ("stream", 1)
    np.testing.assert_array_equal(read.arrays()[0], [0.0, 1.0, 2.0])
