"""The torch core on its own: gradients, schedules, device handling."""

import re
import warnings

import numpy as np
import pytest
import torch

from sparse_dict._torch import SparseAutoencoder, TrainConfig, Trainer, resolve_device
from sparse_dict._torch.data import geometric_median, iter_batches


def test_hand_written_gradients_match_autograd():
    torch.manual_seed(0)
    model = SparseAutoencoder(12, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    x = torch.randn(33, 12).abs()
    stats, fired = model.loss_and_gradients(x, 0.7)
    manual = {name: p.grad.clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        x_hat, f = model(x)
        loss = (x - x_hat).pow(2).sum(1).mean() + 0.7 * (f * model.W_dec.norm(dim=1)).sum(1).mean()
        loss.backward()
    loss, f = loss.detach(), f.detach()
    W = model.W_dec.detach()
    for name, p in model.named_parameters():
        a, b = manual[name], p.grad
        if name == "W_dec":
            # The hand-written step leaves out the L1 term's radial part, which
            # the unit-norm projection removes anyway.
            a = a - (a * W).sum(1, keepdim=True) * W
            b = b - (b * W).sum(1, keepdim=True) * W
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(stats[0]) == pytest.approx(loss.item(), rel=1e-5)
    assert torch.equal(fired, (f > 0).sum(0).float())
    assert float(stats[3]) == pytest.approx(float((f > 0).sum(1).float().mean()))


def test_schedule_warmup_and_decay():
    config = TrainConfig(total_steps=100, warmup_steps=10, decay_steps=20)
    assert config.lr_factor(0) == pytest.approx(0.1)
    assert config.lr_factor(9) == 1.0
    assert config.lr_factor(50) == 1.0
    assert config.lr_factor(90) == pytest.approx(0.5)
    assert config.lr_factor(99) == pytest.approx(0.05)
    assert config.coef_factor(4) == pytest.approx(0.5)
    assert config.coef_factor(99) == 1.0
    open_ended = TrainConfig(total_steps=None, warmup_steps=10, decay_steps=20)
    assert open_ended.lr_factor(10_000) == 1.0


def test_resampling_schedule():
    config = TrainConfig(resample_interval=10, resample_until=35)
    due, checked = [], 0
    for step in range(60):
        if config.resample_due(step, checked):
            due.append(step)
            checked = step + 1
    assert due == [9, 19, 29]
    # A check that falls where none may run (a partial_fit call's last 30%)
    # is made at the first step allowed after: the next call's first.
    assert not TrainConfig(resample_interval=10, resample_until=5).resample_due(9, 0)
    assert TrainConfig(resample_interval=10, resample_until=17).resample_due(12, 0)
    assert not any(TrainConfig(resample_dead=False).resample_due(s) for s in range(5000))


@pytest.mark.parametrize("init", ["geometric_median", "mean", "zeros"])
def test_scale_makes_the_distance_from_the_decoder_bias_equal_width(init):
    # Rows far from the origin: the scale is set by their spread around
    # where the decoder bias starts (the origin only with "zeros").
    rng = np.random.RandomState(0)
    X = rng.standard_normal((500, 10)) * 37.0 + 400.0
    trainer = Trainer(10, 20, "cpu", seed=0)
    trainer.initialize(X, rng, init)
    scaled = X * trainer.scale
    b_dec = trainer.model.b_dec.detach().numpy().astype(np.float64)
    assert np.mean(((scaled - b_dec) ** 2).sum(1)) == pytest.approx(10.0, rel=1e-5)
    if init == "mean":
        np.testing.assert_allclose(b_dec, scaled.mean(0), rtol=1e-5)
    elif init == "zeros":
        assert not b_dec.any()
    # Reconstructing every row by the mean, in the scaled units.
    assert trainer.variance == pytest.approx(np.mean(((scaled - scaled.mean(0)) ** 2).sum(1)),
                                             rel=1e-5)


def test_scale_of_identical_rows_falls_back_to_their_norm():
    # No spread at all: the raw norm sets the scale rather than a division
    # by a rounding error.
    X = np.tile(np.array([[3.0, 4.0]]), (50, 1))
    trainer = Trainer(2, 4, "cpu", seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    assert trainer.scale == pytest.approx(np.sqrt(2.0) / 5.0)
    np.testing.assert_allclose(trainer.model.b_dec.detach().numpy(),
                               [3.0 * trainer.scale, 4.0 * trainer.scale], rtol=1e-6)


def test_geometric_median_of_symmetric_points_is_the_centre():
    pts = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]]) + 5.0
    np.testing.assert_allclose(geometric_median(pts), [5.0, 5.0], atol=1e-6)


def test_batches_cover_every_row_once():
    X = np.zeros((103, 2))
    seen = np.concatenate([np.arange(103)[i] for i in iter_batches(X, 10, np.random.RandomState(0))])
    assert sorted(seen.tolist()) == list(range(103))
    assert [i.stop - i.start for i in iter_batches(X, 50)] == [50, 50, 3]


def test_interrupted_training_restores_the_trainer():
    rng = np.random.RandomState(0)
    X = rng.exponential(size=(256, 6)).astype(np.float32)
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, rng, "mean")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def interrupt(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(X, 3, TrainConfig(batch_size=32), rng, callback=interrupt)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert trainer.step == 0


def test_device_strings():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "", 3):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)


def test_large_inputs_are_shuffled_in_blocks_covering_every_row(monkeypatch):
    from sparse_dict._torch import data

    monkeypatch.setattr(data, "_EXACT_SHUFFLE_ROWS", 100)
    X = np.zeros((1003, 2))
    batches = list(iter_batches(X, 10, np.random.RandomState(0)))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1003))
    # Shuffled: the first batch is not the first rows.
    assert batches[0].tolist() != list(range(10))
    # A window holds 16 blocks of 4 batches: a batch mixes several blocks.
    assert len(set(batches[0] // 40)) > 1


def test_sample_rows_of_a_large_input_without_a_full_permutation():
    from sparse_dict._torch.data import sample_rows

    X = np.arange(100_000, dtype=np.float64)[:, None]
    rows = sample_rows(X, 1000, np.random.RandomState(0))
    assert 900 < len(rows) <= 1000
    assert len(np.unique(rows)) == len(rows)


def _judged(mse, rows, run_start=0, data_variance=None, messages=False, l0=5.0):
    from types import SimpleNamespace

    from sparse_dict._torch.activations import ReLU
    from sparse_dict._torch.train import assess_training

    history = np.zeros((len(mse), 5))
    history[:, 0] = history[:, 1] = mse
    history[:, 3] = l0
    trainer = SimpleNamespace(history=history, history_rows=np.asarray(rows, dtype=float),
                              run_start=run_start, variance=1.0, seen=None,
                              model=SimpleNamespace(activation=ReLU()))
    problems = assess_training(trainer, TrainConfig(total_steps=len(mse) - run_start),
                               check_convergence=run_start == 0, data_variance=data_variance)
    return problems if messages else [kind for kind, _ in problems]


def test_a_rise_is_judged_per_row_and_only_on_runs_long_enough():
    # A long run whose error per row triples has diverged.
    assert _judged(np.linspace(1.0, 3.0, 60), [16] * 60) == ["diverged"]
    # Weighed by rows: single-row last batches with large errors do not
    # make it (unweighted, the tail's mean would be above 2).
    mse, rows = np.ones(60), np.tile([16.0, 1.0], 30)
    mse[1::2] = 4.0
    assert "diverged" not in _judged(mse, rows)
    # Too short to judge a rise: only "unconverged" (a NaN is always judged).
    assert _judged([1.0, 4.0, 1.0, 5.0], [16, 1, 16, 1]) == ["unconverged"]
    assert _judged([1.0, np.nan], [16, 16]) == ["diverged"]
    # A blow-up is judged at any length.
    assert _judged([1.0, 1e4, 1e5, 1e6], [16] * 4) == ["diverged"]


def test_an_error_that_ended_above_its_start_is_said_for_another_warning():
    # Below twice its start and below the mean's error (1.0): neither
    # diverged nor poor, but risen, which the dead-features warning adds to
    # (steps too large kill features so). A falling error says nothing.
    risen = np.r_[np.full(10, 0.5), np.linspace(0.5, 0.8, 50)]
    problems = _judged(risen, [32] * 60, messages=True)
    assert [kind for kind, _ in problems] == ["rose"]
    assert re.fullmatch(r"Its reconstruction error also ended above where it started "
                        r"\(0\.5 over the first 10 steps, 0\.7\d+ at the end; scaled units\)",
                        problems[0][1]), problems[0][1]
    assert "rose" not in _judged(risen[::-1], [32] * 60)
    # Steps of fewer rows are judged in windows of about 256 rows.
    problems = _judged(risen, [16] * 60, messages=True)
    assert "over the first 16 steps" in problems[0][1]


def test_divergence_over_several_short_calls_is_judged_on_the_whole_history():
    # partial_fit: 100 good steps, then a call of 8 steps (256 rows) far
    # above the mean's error (1.0) and the first step's (3.0). Alone, 8 steps
    # are too few to judge; against the whole history the rise is plain.
    good = np.concatenate([np.linspace(3.0, 0.3, 60), np.full(40, 0.3)])
    assert _judged(np.concatenate([good, np.full(8, 9.0)]), [32] * 108,
                   run_start=100) == ["diverged"]
    # The same call on rows of a larger spread (a mean's error of 6 on this
    # call's sample) is no divergence: the error rose with the data.
    assert "diverged" not in _judged(np.concatenate([good, np.full(8, 9.0)]), [32] * 108,
                                     run_start=100, data_variance=6.0)
    # A slow climb: each call of 8 steps a little worse than the last, and
    # none twice its own first step; the first step of training was 3.
    slow = np.concatenate([good, np.geomspace(1.0, 7.0, 80)])
    assert all(slow[i + 7] < 2 * slow[i] for i in range(100, 180, 8))
    assert _judged(slow, [32] * 180, run_start=172) == ["diverged"]
    assert "diverged" not in _judged(slow[:150], [32] * 150, run_start=142)


def test_a_fit_no_better_than_the_mean_names_its_likely_causes():
    # Fell from its start, then ended above the mean's error (1.0) without
    # doubling it: too large a step, or too strong a penalty.
    mse = np.concatenate([np.linspace(3.0, 0.5, 30), np.full(40, 1.4)])
    (kind, message), = [p for p in _judged(mse, [16] * 70, messages=True, l0=0.2)
                        if p[0] != "unconverged"]
    assert kind == "poor"
    assert "lower l1_coef" in message and "lower learning_rate" in message
    # With features firing (an L0 of 5) the penalty silences nothing: the
    # message named it at an L0 of 31.
    (kind, message), = [p for p in _judged(mse, [16] * 70, messages=True) if p[0] != "unconverged"]
    assert kind == "poor"
    assert "l1_coef" not in message and "lower learning_rate" in message
    # Never fell from its start: too small a step, or too few.
    (kind, message), = [p for p in _judged(np.full(70, 1.5), [16] * 70, messages=True)
                        if p[0] != "unconverged"]
    assert kind == "poor" and "raise learning_rate" in message
    assert "lower" not in message
    # Below the mean's error: nothing to say.
    assert "poor" not in _judged(np.linspace(3.0, 0.5, 70), [16] * 70)


def test_a_loss_back_at_its_first_tenth_s_level_is_judged_without_dividing_by_zero():
    # Rose mid-run, then fell in the last fifth back to exactly where the run
    # began: the steady-fall share (the last fifth's fall over the run's)
    # divided by zero, a RuntimeWarning (an error under -W error) and an
    # "infinite" share. The fall itself is still said.
    n = 400
    config = TrainConfig(total_steps=n)
    stop = n - min(config.decay_steps, n // 2)
    width = stop // 10
    mse = np.full(n, 0.5)
    mse[width:stop - width] = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problems = _judged(mse, [256] * n, messages=True)
    assert [kind for kind, _ in problems] == ["unconverged"]
    assert "(0.9 -> 0.5, 44% lower" in problems[0][1] and "steadily" not in problems[0][1]


@pytest.mark.parametrize("n_samples, n_components, seed", [(17, 2, 1), (35, 8, 569)])
def test_short_fits_on_one_feature_are_not_called_diverged(n_samples, n_components, seed):
    # The cases hypothesis found (tests/test_estimator.py::test_properties).
    from sparse_dict import SparseAutoencoderDictionary

    rng = np.random.RandomState(seed)
    X = (rng.standard_normal((n_samples, 1)) * rng.uniform(0.01, 100)).astype(np.float32)
    with pytest.warns(Warning, match="too few"):
        SparseAutoencoderDictionary(n_components=n_components, max_iter=2, batch_size=16,
                                    device="cpu", random_state=seed).fit(X)


# ---------------------------------------------------------------- value_range

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from sparse_dict._torch.data import value_range  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    X=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
                 elements=st.floats(allow_nan=True, allow_infinity=True, width=64)),
    block_bytes=st.integers(1, 200),
)
def test_value_range_is_min_and_max_in_any_blocks(X, block_bytes):
    low, high = value_range(X, block_bytes=block_bytes)
    if np.isnan(X).any():
        assert np.isnan(low) and np.isnan(high)
    else:
        assert (low, high) == (X.min(), X.max())


def test_value_range_of_memmap_sparse_and_float32(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.standard_normal((50, 7)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, X)
    # A read-only memmap, read in blocks of a few rows, gives no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert value_range(np.load(path, mmap_mode="r"), block_bytes=64) == (X.min(), X.max())
    import scipy.sparse as sp

    S = sp.csr_matrix(np.where(X > 1, X, 0))
    assert value_range(S) == (S.data.min(), S.data.max())
    X[37, 3] = np.inf
    assert value_range(X, block_bytes=64) == (X[np.isfinite(X)].min(), np.inf)


def test_auxk_is_normalised_by_the_previous_steps_error():
    # The trainer hands each step the last step's mean squared error (the
    # same on every rank of a data-parallel run) and AuxK's coefficient in
    # the data's variance units.
    from sparse_dict._torch.activations import make_activation

    rng = np.random.RandomState(0)
    X = rng.standard_normal((400, 10)).astype(np.float32)
    trainer = Trainer(10, 40, "cpu", seed=0, activation=make_activation("topk", k=2))
    trainer.initialize(X, rng, "mean")
    calls, step = [], trainer.model.loss_and_gradients

    def spy(*args, **kwargs):
        stats, fired = step(*args, **kwargs)
        calls.append((kwargs["residual_power"], kwargs["auxk_coef"], float(stats[1])))
        return stats, fired

    trainer.model.loss_and_gradients = spy
    config = TrainConfig(batch_size=50, total_steps=12, auxk_coef=0.5, k_aux=4, dead_window=2)
    trainer.train(X, 2, config, rng)
    assert len(calls) == 12 and calls[0][0] is None
    for (power, coef, _), (_, _, previous) in zip(calls[1:], calls[:-1]):
        assert float(power) == previous
        assert coef == pytest.approx(0.5 * trainer.variance)
    assert np.count_nonzero(trainer.history[:, 4]) > 0


def _step_case(autocast=None):
    torch.manual_seed(0)
    model = SparseAutoencoder(12, 40, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 12)
    return model, x, dict(coef=0.5, autocast_dtype=autocast)


def _grads(model):
    return [p.grad.clone() for p in (model.W_dec, model.W_enc, model.b_enc, model.b_dec)]


def test_a_step_reads_weights_an_update_wrote_into_its_operands_until_told_otherwise():
    model, x, kw = _step_case()
    stats, _ = model.loss_and_gradients(x, **kw)
    expected = _grads(model)
    views = model.operand_views()
    assert set(views) == {"W_enc", "W_dec", "W_dec_norms"}
    # An update that writes its views and says so: the next step reads the
    # views (here deliberately wrong) instead of copying the weights, and
    # the ReLU penalty reads the norms written (here doubled: the L1 term
    # alone doubles) instead of computing them.
    views["W_dec_norms"].copy_(model.W_dec.norm(dim=1) * 2.0)
    model.operands_written_({"W_dec_norms": views["W_dec_norms"]})
    doubled, _ = model.loss_and_gradients(x, **kw)
    assert float(doubled[0] - doubled[1]) == pytest.approx(2 * float(stats[0] - stats[1]))
    for view in views.values():
        view.mul_(2.0)
    model.operands_written_(views)
    wrong, _ = model.loss_and_gradients(x, **kw)
    assert not torch.allclose(wrong, stats)
    # Every way the weights may change without the update forgets the record.
    for forget in (model.operands_stale_, model.normalize_atoms_,
                   lambda: model.load_fitted_tensors_(model.fitted_tensors())):
        model.operands_written_(views)
        forget()
        again, _ = model.loss_and_gradients(x, **kw)
        torch.testing.assert_close(again, stats)
        for got, want in zip(_grads(model), expected):
            torch.testing.assert_close(got, want)
    # A change through torch that bumps the weight's version is seen too.
    # (The step copied the weights into their views again; the norms it
    # computed and left alone: they are still the doubled ones.)
    model.operands_written_({"W_enc": views["W_enc"], "W_dec_norms": views["W_dec_norms"]})
    with torch.no_grad():
        model.W_enc[0] = model.W_enc[0]
        model.W_dec[0] = model.W_dec[0]
    again, _ = model.loss_and_gradients(x, **kw)
    torch.testing.assert_close(again, stats)


def test_the_epilogue_s_bias_copy_is_read_as_written_until_b_enc_changes():
    # With ReLU's bias in the encoder product's epilogue, an update may
    # write the bias's copy too (operand_views' "b_enc"): the next step reads
    # it (here deliberately wrong) instead of copying b_enc, until b_enc
    # changes another way.
    model, x, kw = _step_case()
    kw = {**kw, "kernels": {"product": True}}
    stats, _ = model.loss_and_gradients(x, **kw)
    views = model.operand_views()
    assert set(views) == {"W_enc", "W_dec", "W_dec_norms", "b_enc"}
    views["b_enc"].add_(5.0)
    model.operands_written_(["b_enc"])
    wrong, _ = model.loss_and_gradients(x, **kw)
    assert not torch.allclose(wrong, stats)
    with torch.no_grad():
        model.b_enc[0] = model.b_enc[0]  # a change torch counts
    again, _ = model.loss_and_gradients(x, **kw)
    torch.testing.assert_close(again, stats)
    # Without the epilogue the bias rides on the operand's column: no copy to write.
    model.loss_and_gradients(x, **{**kw, "kernels": {"product": False}})
    assert "b_enc" not in model.operand_views()


def test_low_precision_gradients_are_the_float32_ones_before_conversion():
    model, x, kw = _step_case(torch.bfloat16)
    model.loss_and_gradients(x, **kw)
    expected = _grads(model)
    model.loss_and_gradients(x, low_grads=True, **kw)
    assert model.W_dec.grad is None and model.W_enc.grad is None
    assert {k: v.dtype for k, v in model.low_grads.items()} == {
        "W_dec": torch.bfloat16, "W_enc": torch.bfloat16}
    model.grads_to_float32_()
    assert model.low_grads == {}
    for got, want in zip(_grads(model), expected):
        assert torch.equal(got, want)
    # AuxK adds to .grad, and float32 products have nothing to spare: both
    # leave every gradient in .grad.
    for case in (dict(dead=torch.tensor([0, 1, 2]), auxk_coef=0.1, k_aux=2),
                 dict(autocast_dtype=None)):
        model.loss_and_gradients(x, low_grads=True, **{**kw, **case})
        assert model.low_grads == {} and model.W_dec.grad.dtype == torch.float32


def test_geometric_median_of_a_tensor_is_the_arrays():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((300, 16)) * 2.0 + 1.0
    points[:10] += 100.0  # outliers pull the mean, not the median
    expected = geometric_median(points)
    got = geometric_median(torch.as_tensor(points, dtype=torch.float32))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert np.linalg.norm(expected - points.mean(axis=0)) > 1.0


@pytest.mark.parametrize("n_rows", [50, 500])
def test_sampled_rows_never_share_memory_with_the_input(n_rows):
    from sparse_dict._torch.data import sample_rows

    X = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
    before = X.copy()
    for dtype in (np.float32, np.float64):
        rows = sample_rows(X, n_rows, np.random.RandomState(0), dtype=dtype)
        rows *= 2.0  # callers scale the sample in place
        assert rows.dtype == dtype and np.array_equal(X, before)


@pytest.mark.parametrize("threads", [1, 3])
def test_sample_moments_in_blocks_are_the_whole_sample_s(monkeypatch, threads):
    from sparse_dict._torch import data

    sample = np.random.RandomState(0).randn(301, 7).astype(np.float32)
    monkeypatch.setattr(data, "host_threads", lambda n_bytes: threads)
    msn, mean = data.sample_moments(sample)
    wide = sample.astype(np.float64)
    assert msn == pytest.approx(float((wide ** 2).sum(axis=1).mean()), rel=1e-13)
    np.testing.assert_allclose(mean, wide.mean(axis=0), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("threads", [1, 3])
def test_sampled_rows_gathered_by_threads_are_the_rows(monkeypatch, threads):
    from sparse_dict._torch import data

    X = np.random.RandomState(0).randn(500, 6).astype(np.float32)
    monkeypatch.setattr(data, "host_threads", lambda n_bytes: threads)
    sample = data.sample_rows(X, 100, np.random.RandomState(1), dtype=np.float32)
    index = np.sort(np.random.RandomState(1).choice(500, size=100, replace=False))
    assert np.array_equal(sample, X[index])
    assert not np.shares_memory(sample, X)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shift=st.floats(-1e3, 1e3),
    factor=st.floats(1e-2, 1e3),
    init=st.sampled_from(["geometric_median", "mean"]),
)
def test_the_scale_ignores_a_shared_shift_and_follows_the_units(seed, shift, factor, init):
    # Rows moved by one vector and measured in other units train alike: the
    # scale divides by the units and ignores the shift, and the decoder bias
    # starts at the same scaled point relative to the rows.
    rng = np.random.RandomState(seed)
    X = rng.standard_normal((64, 5)) * rng.uniform(0.5, 2.0, size=5)
    moved = X * factor + shift * rng.uniform(-1.0, 1.0, size=5)
    trainers = []
    for data in (X, moved):
        trainer = Trainer(5, 8, "cpu", seed=0)
        trainer.initialize(data, np.random.RandomState(1), init)
        trainers.append(trainer)
    plain, other = trainers
    # The sampled rows cross in float32: a shift far larger than the spread
    # keeps fewer of the spread's digits.
    tol = 1e-5 + 8 * np.finfo(np.float32).eps * np.abs(moved).max() / (factor * X.std())
    assert other.scale * factor == pytest.approx(plain.scale, rel=tol)
    assert other.variance == pytest.approx(plain.variance, rel=2 * tol)
    gaps = [X * plain.scale - plain.model.b_dec.detach().numpy(),
            moved * other.scale - other.model.b_dec.detach().numpy()]
    np.testing.assert_allclose(gaps[1], gaps[0], atol=10 * tol * np.abs(gaps[0]).max())


@pytest.mark.parametrize("scale", [1e-30, 3.0, 1e200])
def test_given_atoms_become_contiguous_unit_rows_of_both_weights(scale):
    # A Fortran-ordered start (scikit-learn's components_ can be) would give
    # parameters that torch's fused CPU Adam steps wrongly; rows of any
    # magnitude must neither under- nor overflow on the way to unit norm.
    base = np.random.RandomState(0).standard_normal((40, 12))
    atoms = np.asfortranarray(base * scale)
    model = SparseAutoencoder(12, 40, atoms=atoms)
    for weight in (model.W_dec, model.W_enc):
        assert weight.is_contiguous()
        np.testing.assert_allclose(weight.detach().numpy(),
                                   base / np.linalg.norm(base, axis=1, keepdims=True),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"atoms have shape \(40, 12\), not \(41, 12\)"):
        SparseAutoencoder(12, 41, atoms=atoms)


def test_parameters_rebuilt_from_fortran_ordered_arrays_are_contiguous():
    # The other way in for outside arrays (load, SAELens import, partial_fit
    # after either): copied into the model's own contiguous parameters.
    rng = np.random.RandomState(0)
    params = {"components": np.asfortranarray(rng.standard_normal((40, 12))),
              "encoder_weights": np.asfortranarray(rng.standard_normal((40, 12))),
              "encoder_bias": np.zeros(40), "decoder_bias": np.zeros(12)}
    trainer = Trainer.from_parameters(params, 1.0, "cpu", 0)
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    np.testing.assert_allclose(trainer.model.W_enc.detach().numpy(), params["encoder_weights"],
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["jumprelu", "topk"])
def test_a_resampled_feature_restarts_its_mechanism_s_state(name):
    # JumpReLU: the threshold a feature died with was kept, above anything
    # its new encoder row gives, so it stayed dead. TopK: an imported
    # feature's selection scale described its old atom.
    import math

    from sparse_dict._torch.activations import make_activation

    rng = np.random.RandomState(0)
    X = rng.standard_normal((2000, 16)).astype(np.float32)
    trainer = Trainer(16, 64, "cpu", seed=0, activation=make_activation(name, k=4))
    trainer.initialize(X, rng, "mean")
    model, dead = trainer.model, torch.tensor([3, 7])
    own = model.log_threshold if name == "jumprelu" else model.selection_scale
    with torch.no_grad():
        own[dead] = math.log(50.0) if name == "jumprelu" else 1e-3
        if name == "topk":
            own[:] = 0.5  # every other feature's too: an imported dictionary's
    if name == "jumprelu":
        trainer.optimizer.state[own] = {"exp_avg": torch.ones(64), "exp_avg_sq": torch.ones(64)}
    trainer.steps_since_fired[dead] = 10**6
    x = torch.as_tensor(X[:512] * trainer.scale)
    trainer._resample([(x, 512)], window=1000)
    assert trainer.n_resampled == 2
    if name == "jumprelu":
        # Each fires again, at least on the input it restarted on.
        with torch.no_grad():
            _, codes = model(x)
        assert bool((codes[:, dead] > 0).any(dim=0).all())
        assert float(own[dead].exp().max()) < 50.0
        state = trainer.optimizer.state[own]
        assert not state["exp_avg"][dead].any() and state["exp_avg"][:3].all()
    else:
        assert own[dead].tolist() == [1.0, 1.0] and float(own[0]) == 0.5


def test_a_loss_that_rose_mid_run_is_called_unstable_not_slow():
    # 1000 steps: the loss falls to 1, rises to 7 at 65% of the run and is
    # still coming back down over the last fifth. The "still falling" rule
    # read the recovery as slow convergence and advised more steps.
    steps = np.arange(1000)
    mse = 1.0 + 6.0 * np.exp(-((steps - 650) / 200.0) ** 2)
    mse[:300] = np.linspace(5.0, 1.0, 300)
    problems = _judged(mse, [16] * 1000, data_variance=20.0, messages=True)
    assert [kind for kind, _ in problems] == ["unconverged"]
    message = problems[0][1]
    assert "rose mid-run to" in message and "StandardScaler" in message
    assert "learning_rate" in message and "still falling" not in message
    # A loss that only falls, slowly, is still called slow.
    slow = _judged(np.linspace(5.0, 1.0, 1000), [16] * 1000, data_variance=20.0,
                   messages=True)
    assert "still falling" in slow[0][1] and "rose mid-run" not in slow[0][1]
    # The same rise among losses too small to matter (a thousandth of the
    # mean's error at its highest, as a TopK fit of rows of rank 5 had,
    # held-out EV 1.000) is no instability.
    tiny = _judged(mse / 350.0, [16] * 1000, data_variance=20.0, messages=True)
    assert not any("rose mid-run" in message for _, message in tiny), tiny
    # Nor is a rise to a level that matters in a run that ended below it: a
    # JumpReLU fit that rose 5-fold and ended explaining 0.993 of held-out
    # rows was told to lower learning_rate, which gave 0.861. (Here the rise
    # is to 2.5% of the mean's error, the end at 0.65%.)
    ended_low = _judged(mse / 10.0, [16] * 1000, data_variance=20.0, messages=True)
    assert not any("rose mid-run" in message for _, message in ended_low), ended_low
    # Nor is a fall among such losses (rank-5 rows: 0.014 to 0.007 where
    # the mean's error is 64) a fit still converging.
    assert _judged(np.linspace(5.0, 1.0, 1000) / 2000.0, [16] * 1000, data_variance=20.0) == []


def test_a_poor_fit_whose_error_rose_is_blamed_on_large_steps():
    # The error rose from its start to the mean's: "steps too small" was
    # said because it had never fallen (learning_rate 1 on a GPU).
    problems = _judged(np.linspace(9.8, 16.0, 60), [16] * 60, data_variance=15.0,
                       messages=True)
    poor = [message for kind, message in problems if kind == "poor"]
    assert poor and "steps too large" in poor[0] and "too small" not in poor[0]
    # An error that stayed flat is still put down to steps too small or too few.
    flat = _judged(np.full(60, 16.0), [16] * 60, data_variance=15.9, messages=True)
    assert "too small or too few" in [m for k, m in flat if k == "poor"][0]
    # One that fell a long way and was at its lowest at the end wants more
    # steps: rows far from a decoder bias started at zero were told to lower
    # a learning rate already too low, which left them worse.
    falling = _judged(np.linspace(60.0, 20.0, 1000), [16] * 1000, data_variance=15.0,
                      messages=True)
    poor = [message for kind, message in falling if kind == "poor"]
    assert poor and "too few steps" in poor[0] and "lower learning_rate" not in poor[0]


def _verdict(error=None):
    import concurrent.futures

    future = concurrent.futures.Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


@pytest.mark.parametrize("failure", [RuntimeError("the step failed"), KeyboardInterrupt()])
def test_a_verdict_that_refuses_the_data_replaces_the_steps_error(monkeypatch, failure):
    # Checks of X that ran beside the first steps (train's verdict): a step
    # that failed on rows they refuse reports the refusal, not its own
    # error. An interruption is the user's, and is left as it is.
    rng = np.random.RandomState(0)
    X = rng.exponential(size=(256, 6)).astype(np.float32)
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, rng, "mean")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(trainer, "_local_step", fail)
    refused = ValueError("Input X contains NaN")
    with pytest.raises(type(failure) if isinstance(failure, KeyboardInterrupt)
                       else ValueError) as caught:
        trainer.train(X, 1, TrainConfig(batch_size=32), rng, verdict=_verdict(refused))
    if not isinstance(failure, KeyboardInterrupt):
        assert caught.value is refused and caught.value.__suppress_context__
    # A verdict that passes leaves the step's own error.
    with pytest.raises(type(failure)):
        trainer.train(X, 1, TrainConfig(batch_size=32), rng, verdict=_verdict())


def test_a_pending_verdict_is_awaited_before_a_pass_s_statistics():
    # Steps may run while the verdict is pending; the first pass's end waits
    # for it, so no statistics of refused rows reach the history or the
    # callback.
    import threading

    rng = np.random.RandomState(0)
    X = rng.exponential(size=(256, 6)).astype(np.float32)
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, rng, "mean")
    import concurrent.futures

    pending = concurrent.futures.Future()
    timer = threading.Timer(0.3, pending.set_exception, [ValueError("refused")])
    seen = []
    timer.start()
    try:
        with pytest.raises(ValueError, match="refused"):
            trainer.train(X, 2, TrainConfig(batch_size=32), rng, callback=seen.append,
                          verdict=pending, rollback=False)
    finally:
        timer.cancel()
    assert trainer.step == 8 and len(trainer.history) == 0 and not seen
    # Settled and passed: trained as without one.
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    assert trainer.train(X, 2, TrainConfig(batch_size=32), rng, verdict=_verdict()) == 2
    assert len(trainer.history) == 16 and trainer._verdict is None


def test_a_bf16_step_s_decoder_bias_gradient_is_the_float32_one_to_bf16_precision():
    # Under autocast the gradient through the encoder is formed from the
    # encoder's bfloat16 copy (half the bytes of W_enc): the float32
    # step's value to bfloat16's precision.
    model = SparseAutoencoder(48, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    grads = {}
    for dtype in (None, torch.bfloat16):
        model.loss_and_gradients(x, 0.3, dtype, sparse_step=False)
        grads[dtype] = model.b_dec.grad.clone()
        assert grads[dtype].dtype == torch.float32
        for p in model.parameters():
            p.grad = None
        model.release_workspace()
    exact = grads[None]
    scale = float(exact.abs().max())
    assert scale > 0
    torch.testing.assert_close(grads[torch.bfloat16], exact, rtol=0, atol=2e-2 * scale)


def test_a_call_that_takes_no_step_still_takes_the_verdict():
    rng = np.random.RandomState(0)
    X = rng.exponential(size=(64, 6)).astype(np.float32)
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, rng, "mean")
    with pytest.raises(ValueError, match="refused"):
        trainer.train(X, 0, TrainConfig(batch_size=32), rng,
                      verdict=_verdict(ValueError("refused")))
    assert trainer.train(X, 0, TrainConfig(batch_size=32), rng, verdict=_verdict()) == 0


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       offset=st.sampled_from([0.0, 1e3, 1e6]), seed=st.integers(0, 1000))
def test_rows_seen_in_parts_have_the_moments_of_the_whole(sizes, offset, seed):
    # partial_fit's calls merge into one mean and variance (no E||x||^2 -
    # ||E x||^2, whose digits an offset would cancel).
    rng = np.random.RandomState(seed)
    parts = [rng.standard_normal((n, 3)) + offset for n in sizes]
    trainer = Trainer(3, 4, "cpu", seed=0)
    for part in parts:
        trainer.see_rows(torch.from_numpy(part), len(part))
    whole = np.concatenate(parts)
    count, mean, variance = trainer.seen
    assert count == len(whole)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12, atol=1e-9)
    expected = ((whole - whole.mean(0)) ** 2).sum(1).mean()
    assert variance == pytest.approx(expected, rel=1e-6, abs=1e-9)



_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", _DEVICES)
def test_a_pass_s_figures_are_read_after_the_next_pass_as_a_callback_reads_them_at_once(
        monkeypatch, device):
    # Reading a pass's figures at its end made the host wait for every step
    # it had queued, and the GPU then for the next pass's launches (2.3 ms a
    # pass on an H200). Without a callback or a progress bar they are read
    # after the next pass; the history is the same.
    from sparse_dict._torch import train as train_module

    X = np.random.RandomState(0).exponential(size=(256, 6)).astype(np.float32)
    real, reads, trainers = train_module._PassEnd.values, [], []

    def values(end):
        reads.append((end.last_step, trainers[-1].step))
        return real(end)

    monkeypatch.setattr(train_module._PassEnd, "values", values)
    infos = []
    for callback in (None, infos.append):
        trainers.append(Trainer(6, 12, device, seed=0))
        trainers[-1].initialize(X, np.random.RandomState(0), "mean")
        assert trainers[-1].train(X, 3, TrainConfig(batch_size=32), np.random.RandomState(1),
                                  callback=callback) == 3
    # 8 steps a pass: steps 0-7, 8-15, 16-23. Without a callback, the first
    # two passes are read once the next has run, the last as the call ends.
    assert reads[:3] == [(7, 16), (15, 24), (23, 24)]
    assert reads[3:] == [(7, 8), (15, 16), (23, 24)]
    assert [info["step"] for info in infos] == [8, 16, 24]
    later, at_once = trainers
    assert later.history.shape == (24, at_once.history.shape[1])
    np.testing.assert_allclose(later.history, at_once.history, rtol=1e-6)
    np.testing.assert_array_equal(later.history_rows, at_once.history_rows)
    np.testing.assert_array_equal(later.pass_fired, at_once.pass_fired)
    assert later.pass_rows == at_once.pass_rows == 256


def _trainer_whose_weights_turn_nan(monkeypatch, device, n_rows, nan_step):
    """A trainer on ``n_rows`` rows whose W_dec is NaN from step ``nan_step`` on; its steps run."""
    X = np.random.RandomState(0).exponential(size=(n_rows, 6)).astype(np.float32)
    trainer = Trainer(6, 12, device, seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    real, steps = Trainer.apply_gradients, []

    def apply_gradients(self, config):
        real(self, config)
        steps.append(self.step)
        if self.step == nan_step:
            with torch.no_grad():
                self.model.W_dec.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "apply_gradients", apply_gradients)
    return trainer, X, steps


@pytest.mark.parametrize("device", _DEVICES)
def test_a_divergence_found_a_pass_late_still_raises_and_restores_the_trainer(monkeypatch,
                                                                              device):
    from sparse_dict._torch.train import DivergenceError

    # NaN weights from the fourth step on, in the first of three passes.
    trainer, X, _ = _trainer_whose_weights_turn_nan(monkeypatch, device, 256, nan_step=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(DivergenceError, match=r"became NaN or infinite at step 4\b"):
        trainer.train(X, 3, TrainConfig(batch_size=32), np.random.RandomState(1))
    assert trainer.step == 0 and len(trainer.history) == 0
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", _DEVICES)
def test_a_divergence_inside_a_long_pass_is_found_at_the_check_after_next(monkeypatch,
                                                                           device):
    # Every 100 steps a pass checks its statistics; the flag is read at the
    # next check (read at once, it made the host wait for every queued step):
    # NaN weights from step 120 fail the check at step 200 ("at step 199"),
    # read at step 300, long before the pass's 1,000 steps end.
    from sparse_dict._torch.train import DivergenceError

    trainer, X, steps = _trainer_whose_weights_turn_nan(monkeypatch, device, 8000,
                                                        nan_step=120)
    with pytest.raises(DivergenceError, match=r"became NaN or infinite at step 199\b"):
        trainer.train(X, 1, TrainConfig(batch_size=8), np.random.RandomState(1))
    assert len(steps) == 300
    assert trainer.step == 0 and len(trainer.history) == 0


@pytest.mark.parametrize("chunk_bytes", [1 << 26, 4096])
def test_refit_gain_is_each_rows_least_squares_on_its_active_atoms(chunk_bytes):
    # The device's padded normal equations, in one chunk or many, against
    # numpy's least squares row by row.
    rng = np.random.default_rng(0)
    trainer = Trainer(12, 40, "cpu", seed=0)
    with torch.no_grad():
        trainer.model.b_enc.fill_(-1.3)  # a sparse code: a few atoms a row
        trainer.model.b_dec.copy_(torch.from_numpy(rng.normal(size=12)).float())
    rows = torch.from_numpy(rng.normal(size=(60, 12))).float()
    explained, refitted = trainer.refit_gain(rows, chunk_bytes=chunk_bytes)
    with torch.no_grad():
        made, codes = trainer.model(rows)
    atoms = trainer.model.W_dec.detach().double().numpy()
    x, b = rows.double().numpy(), trainer.model.b_dec.detach().double().numpy()
    codes = codes.double().numpy()
    assert 0 < (codes > 0).sum(axis=1).mean() < 6
    refit = np.zeros_like(x)
    for i, row in enumerate(codes):
        support = np.flatnonzero(row > 0)
        if support.size:
            refit[i] = np.linalg.lstsq(atoms[support].T, x[i] - b, rcond=None)[0] @ atoms[support]
    variance = ((x - x.mean(axis=0)) ** 2).sum()
    assert explained == pytest.approx(1 - ((x - made.double().numpy()) ** 2).sum() / variance)
    assert refitted == pytest.approx(1 - ((x - b - refit) ** 2).sum() / variance, abs=1e-8)
    assert refitted > explained


def test_refit_gain_solves_supports_of_hundreds_of_atoms_on_threads():
    # torch's batched LU through oneMKL failed on two threads for systems of
    # about 150 unknowns ("Pivots given to lu_solve must all be greater or
    # equal to 1"): a row with 151 active atoms made a default fit fail.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = Trainer(8, 256, "cpu", seed=0)
        with torch.no_grad():
            trainer.model.b_enc.fill_(5.0)  # every atom active on every row
        rows = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 8))).float()
        explained, refitted = trainer.refit_gain(rows)
    finally:
        torch.set_num_threads(threads)
    # 256 atoms span the 8 dimensions: least squares fits every row.
    assert refitted == pytest.approx(1.0, abs=1e-6)
    assert refitted > explained


def test_refit_gain_reads_rows_spread_over_the_sample():
    # The sample keeps X's order, and the refit took its first rows: with the
    # small rows of X first, the shrinkage warning said -0.09 against 0.27
    # where all rows gave 0.83 against 0.98.
    rng = np.random.default_rng(0)
    trainer = Trainer(12, 40, "cpu", seed=0)
    with torch.no_grad():
        trainer.model.b_enc.fill_(-1.3)
    rows = torch.from_numpy(rng.normal(size=(1024, 12)) * np.linspace(0.01, 3, 1024)[:, None])
    rows = rows.float()
    spread = trainer.refit_gain(rows, n_rows=256)
    assert spread == trainer.refit_gain(rows[::4], n_rows=256)
    assert spread != trainer.refit_gain(rows[:256], n_rows=256)


def test_the_record_of_steps_grows_in_place_and_kept_views_stay_as_they_were():
    # Each pass concatenated the whole record of steps anew (and judging a
    # call summed and sorted all of it): a partial_fit stream's calls cost in
    # proportion to every step before them, 77 ms a call after 1.1 million
    # steps against 20 ms at the start. The record now grows in a buffer of
    # doubling capacity: a few buffers for 300 passes, not one a pass.
    from sparse_dict._torch.train import assess_training

    X = np.random.RandomState(0).exponential(size=(64, 6)).astype(np.float32)
    trainer = Trainer(6, 12, torch.device("cpu"), seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    rng, config = np.random.RandomState(1), TrainConfig(batch_size=16, warmup_steps=0)
    buffers, kept = [], []
    for call in range(300):
        trainer.train(X[:16 + call % 3], 1, config, rng)  # a step of 16 rows, and one of 0 to 2
        assess_training(trainer, config, check_convergence=False)
        history = trainer.history
        buffer = history if history.base is None else history.base
        if not any(buffer is seen for seen in buffers):
            buffers.append(buffer)
        kept.append((history, history.copy(), trainer.history_rows, trainer.history_rows.copy()))
    assert len(trainer.history) == len(trainer.history_rows) == 500
    assert len(buffers) <= 6, len(buffers)
    # Whatever a caller kept was never written again.
    for history, copied, rows, rows_copied in kept:
        np.testing.assert_array_equal(history, copied)
        np.testing.assert_array_equal(rows, rows_copied)
    np.testing.assert_array_equal(trainer.history[:len(kept[0][0])], kept[0][1])
    # A pickle (and a snapshot) holds the steps alone, and goes on as the trainer.
    import pickle

    copy = pickle.loads(pickle.dumps(trainer))
    np.testing.assert_array_equal(copy.history, trainer.history)
    np.testing.assert_array_equal(copy.history_rows, trainer.history_rows)
    for twin in (trainer, copy):
        twin.train(X, 1, config, np.random.RandomState(2))
    np.testing.assert_array_equal(copy.history, trainer.history)


@pytest.mark.parametrize("name, state", [
    ("relu", {}), ("topk", {}), ("topk", {"selection_scale": "random"}),
    ("batchtopk", {"threshold": 0.3}), ("jumprelu", {"threshold": "random"}),
])
def test_codes_written_in_place_are_encode_s(name, state):
    # transform computes each batch's codes in its output array's own rows
    # (made apart and copied in, they cost it 1.3 to 1.5 times plain torch):
    # the same values, in the memory given.
    from sparse_dict._torch.activations import make_activation

    rng = np.random.default_rng(0)
    pre = torch.from_numpy(rng.normal(size=(64, 40)).astype(np.float32))
    activation = make_activation(name, k=5 if "topk" in name else None)
    state = {key: torch.from_numpy(rng.uniform(0.2, 2.0, 40).astype(np.float32))
             if value == "random" else torch.full((40,), value) for key, value in state.items()}
    expected = activation.encode(pre, state)
    target = pre.clone()
    codes = activation.encode_(target, state)
    assert codes.data_ptr() == target.data_ptr()
    torch.testing.assert_close(codes, expected, rtol=0, atol=0)
    assert 0 < (codes > 0).float().mean() < 1
