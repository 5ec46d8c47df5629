"""The sparsity mechanisms: gradients against autograd, AuxK, BatchTopK's threshold."""

import numpy as np
import pytest
import torch

from sparse_dict._torch import SparseAutoencoder, make_activation
from sparse_dict._torch.activations import ACTIVATIONS

# A wide JumpReLU kernel, so that many pre-activations fall in the window and
# the threshold's straight-through gradient is exercised, not just zero.
BANDWIDTH = 0.8


class _Jump(torch.autograd.Function):
    """JumpReLU written from the paper's straight-through estimators."""

    @staticmethod
    def forward(ctx, z, log_theta, eps):
        theta = log_theta.exp()
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(z.dtype)
        d_theta = (g * -(theta / ctx.eps) * window).sum(0)
        return g * (z > theta), d_theta * theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, log_theta, eps):
        theta = log_theta.exp()
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(z.dtype)
        return None, (g * -(1 / ctx.eps) * window).sum(0) * theta, None


def _reference_loss(model, x, coef, dead=None, auxk_coef=0.0, k_aux=0):
    """The loss of ``model`` written with autograd in float64, and its gradients.

    The loss returned leaves the AuxK term out, as the fused step's does; the
    gradients include it.
    """
    act = model.activation
    p = {k: v.detach().double().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x = x.double()
    batch, d = x.shape
    pre = (x - p["b_dec"]) @ p["W_enc"].t() + p["b_enc"]
    penalty = 0.0
    if act.name == "relu":
        codes = torch.relu(pre)
        penalty = (codes * p["W_dec"].norm(dim=1)).sum() / batch
    elif act.name == "topk":
        values, index = pre.topk(act.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, index, torch.relu(values))
    elif act.name == "batchtopk":
        positive = torch.relu(pre)
        kth = positive.flatten().topk(act.k * batch).values[-1]
        codes = positive * (positive >= kth)
    elif act.name == "jumprelu":
        codes = _Jump.apply(pre, p["log_threshold"], act.bandwidth)
        penalty = _Step.apply(pre, p["log_threshold"], act.bandwidth).sum() / batch * d
    x_hat = codes @ p["W_dec"] + p["b_dec"]
    loss = (x - x_hat).pow(2).sum() / batch + coef * penalty
    reported = loss.item()
    if dead is not None:
        residual = (x - x_hat).detach()
        pre_dead = (x - p["b_dec"].detach()) @ p["W_enc"][dead].t() + p["b_enc"][dead]
        values, index = pre_dead.topk(min(k_aux, len(dead)), dim=1)
        aux_codes = torch.zeros_like(pre_dead).scatter(1, index, torch.relu(values))
        # Relative to the residual's mean squared norm, a constant.
        power = residual.pow(2).sum() / batch
        aux = (residual - aux_codes @ p["W_dec"][dead]).pow(2).sum() / batch / power
        loss = loss + auxk_coef * aux
    loss.backward()
    return reported, {k: v.grad for k, v in p.items()}, codes.detach()


def _model(name, seed=0):
    act = make_activation(name, k=5, bandwidth=BANDWIDTH)
    model = SparseAutoencoder(12, 40, act, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        model.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 2))
        if name == "jumprelu":
            model.log_threshold.normal_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    return model


def _tangent(grad, atoms):
    # The fused step leaves out gradient components along each atom, which
    # the unit-norm constraint removes anyway.
    return grad - (grad * atoms).sum(1, keepdim=True) * atoms


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("with_auxk", [False, True])
def test_fused_step_matches_autograd(name, with_auxk):
    model = _model(name)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(4))
    dead = torch.tensor([1, 5, 7, 20, 33]) if with_auxk else None
    stats, fired = model.loss_and_gradients(x, 0.7, dead=dead, auxk_coef=0.5, k_aux=3)
    loss, grads, codes = _reference_loss(model, x, 0.7, dead, 0.5, 3)
    assert float(stats[0]) == pytest.approx(loss, rel=1e-5)
    assert torch.equal(fired, (codes > 0).sum(0).float())
    atoms = model.W_dec.detach().double()
    for pname, param in model.named_parameters():
        ours, ref = param.grad.double(), grads[pname]
        if pname == "W_dec":
            ours, ref = _tangent(ours, atoms), _tangent(ref, atoms)
        assert ref.abs().max() > 0, pname  # the check would be empty otherwise
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=pname)


def test_jumprelu_threshold_gradient_is_the_straight_through_estimate():
    # Only the threshold's own gradient, against a direct count: every
    # pre-activation inside the window pushes theta by -theta/eps times its
    # code's gradient, and the L0 term by -coef*d/(batch*eps).
    model = _model("jumprelu")
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    model.loss_and_gradients(x, 0.0)
    grad_no_penalty = model.log_threshold.grad.clone()
    model.loss_and_gradients(x, 0.7)
    theta = model.log_threshold.detach().exp()
    with torch.no_grad():
        pre = model.pre_activations(x)
    in_window = ((pre - theta).abs() < BANDWIDTH / 2).sum(0).float()
    expected = -(0.7 * 12 / (64 * BANDWIDTH)) * in_window * theta
    assert in_window.sum() > 0
    torch.testing.assert_close(model.log_threshold.grad - grad_no_penalty, expected,
                               rtol=1e-4, atol=1e-6)


def _auxk_case():
    """A TopK model, a batch, its gradients without AuxK, and three dead features."""
    model = _model("topk")
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(6))
    model.loss_and_gradients(x, 0.0)
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, x, plain, torch.tensor([2, 9, 31])


def test_auxk_touches_only_dead_features_and_detaches_the_residual():
    model, x, plain, dead = _auxk_case()
    stats, _ = model.loss_and_gradients(x, 0.0, dead=dead, auxk_coef=1.0, k_aux=2)
    assert float(stats[4]) > 0
    live = torch.ones(40, dtype=torch.bool)
    live[dead] = False
    for name in ("W_dec", "W_enc", "b_enc"):
        grad = model.get_parameter(name).grad
        torch.testing.assert_close(grad[live], plain[name][live])
        assert not torch.allclose(grad[dead], plain[name][dead]), name
    # Detached residual, and no pull on the shared decoder bias.
    torch.testing.assert_close(model.b_dec.grad, plain["b_dec"])


def test_auxk_is_relative_to_the_residual_power():
    # By default the term is divided by the batch's own mean squared error;
    # the trainer passes the previous step's instead. Twice the power: half
    # the term and half its gradients on the dead features.
    model, x, plain, dead = _auxk_case()
    own, _ = model.loss_and_gradients(x, 0.0, dead=dead, auxk_coef=1.0, k_aux=2)
    extra = {n: model.get_parameter(n).grad[dead] - plain[n][dead] for n in ("W_dec", "W_enc")}
    twice, _ = model.loss_and_gradients(x, 0.0, dead=dead, auxk_coef=1.0, k_aux=2,
                                        residual_power=2 * own[1])
    assert float(own[4]) > 0
    torch.testing.assert_close(twice[4], own[4] / 2)
    for name, value in extra.items():
        torch.testing.assert_close(model.get_parameter(name).grad[dead] - plain[name][dead],
                                   value / 2)


def test_topk_codes_have_at_most_k_active():
    model = _model("topk")
    codes = model.encode(torch.randn(50, 12))
    assert int((codes > 0).sum(1).max()) <= 5
    assert bool((codes >= 0).all())


def test_batchtopk_keeps_k_per_row_on_average_in_training():
    model = _model("batchtopk")
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
    stats, fired = model.loss_and_gradients(x, 0.0)
    assert float(stats[3]) == pytest.approx(5.0)
    per_row = model._ws["mask"][:64].sum(1)
    assert per_row.max() > per_row.min()  # rows differ; only the mean is fixed


def test_batchtopk_inference_is_independent_of_the_batch():
    model = _model("batchtopk")
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(8))
    model.activation.calibrate_(model, model.pre_activations(x))
    whole = model.encode(x)
    alone = torch.cat([model.encode(x[i : i + 1]) for i in range(0, 256, 37)])
    torch.testing.assert_close(alone, whole[::37])
    # The calibrated threshold keeps k codes per row on the calibration rows.
    assert float((whole > 0).sum(1).float().mean()) == pytest.approx(5.0, abs=0.05)


def test_batch_selection_is_exact_when_a_row_holds_many():
    # One row dominates: the per-row candidate shortcut must fall back.
    from sparse_dict._torch.activations import _batch_kth_largest

    pre = torch.rand(8, 100)
    pre[0] += 10.0
    kth = _batch_kth_largest(pre, 40, 20)
    assert float(kth) == float(pre.flatten().topk(40).values[-1])


def test_unknown_activation_and_missing_k():
    with pytest.raises(ValueError, match="Unknown activation 'gelu'"):
        make_activation("gelu")
    with pytest.raises(ValueError, match="needs k"):
        make_activation("topk")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_fitted_state_round_trips(name):
    model = _model(name)
    if name == "batchtopk":
        model.activation.calibrate_(model, model.pre_activations(torch.randn(64, 12)))
    other = _model(name, seed=11)
    other.load_fitted_tensors_({k: v.numpy() for k, v in model.fitted_tensors().items()})
    x = torch.randn(20, 12)
    torch.testing.assert_close(other.encode(x), model.encode(x))
    assert bool(torch.isfinite(model.encode(x)).all())


# ------------------------------------------------------------- sparse step
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_auxk", [False, True])
def test_sparse_step_matches_autograd(name, with_auxk):
    model = _model(name)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(4))
    dead = torch.tensor([1, 5, 7, 20, 33]) if with_auxk else None
    stats, fired = model.loss_and_gradients(x, 0.7, dead=dead, auxk_coef=0.5, k_aux=3,
                                            sparse_step=True)
    loss, grads, codes = _reference_loss(model, x, 0.7, dead, 0.5, 3)
    assert float(stats[0]) == pytest.approx(loss, rel=1e-5)
    assert torch.equal(fired, (codes > 0).sum(0).float())
    assert float(stats[2]) == pytest.approx(float(codes.sum()) / 64, rel=1e-5)
    assert float(stats[3]) == pytest.approx(float((codes > 0).sum()) / 64)
    if with_auxk:
        assert float(stats[4]) > 0
    atoms = model.W_dec.detach().double()
    for pname, param in model.named_parameters():
        ours, ref = param.grad.double(), grads[pname]
        if pname == "W_dec":
            ours, ref = _tangent(ours, atoms), _tangent(ref, atoms)
        assert ref.abs().max() > 0, pname
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=pname)


def _wide_model(name, n=600, d=24, k=6, seed=0):
    act = make_activation(name, k=k)
    model = SparseAutoencoder(d, n, act, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_sparse_and_dense_steps_agree_on_a_wide_dictionary(name):
    # 600 atoms: the grouped row selection (row_topk) is in use, and a row
    # with one huge input makes BatchTopK's candidate shortcut fall back.
    model = _wide_model(name)
    x = torch.randn(48, 24, generator=torch.Generator().manual_seed(9))
    x[0] *= 30.0
    dead = torch.arange(0, 600, 7)
    out = {}
    for sparse in (False, True):
        stats, fired = model.loss_and_gradients(x, 0.0, dead=dead, auxk_coef=0.3, k_aux=4,
                                                sparse_step=sparse)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[sparse] = (stats, fired, grads)
        model.release_workspace()
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    assert float(out[True][0][4]) > 0  # AuxK had dead features to train
    assert torch.equal(out[True][1], out[False][1])
    for pname in out[True][2]:
        ref = out[False][2][pname]
        # The row scaled by 30 makes gradients of order 1e3: rounding is
        # relative to the largest.
        torch.testing.assert_close(out[True][2][pname], ref, rtol=1e-4,
                                   atol=1e-6 * float(ref.abs().max()), msg=pname)


def test_sparse_step_is_chosen_by_the_measured_rule():
    from sparse_dict._torch.model import sparse_step_pays

    cpu = torch.device("cpu")
    assert sparse_step_pays(32, 16384, cpu) and sparse_step_pays(32, 512, cpu)
    assert not sparse_step_pays(64, 512, cpu)  # k above N / 16
    assert not sparse_step_pays(8, 256, cpu)  # below the sizes measured
    assert not sparse_step_pays(8, 4096, torch.device("meta"))  # only measured on CPUs
    topk = _wide_model("topk")  # k=6 of 600 atoms
    assert topk.uses_sparse_step("auto") and not topk.uses_sparse_step(False)
    assert not topk.uses_sparse_step("auto", autocast_dtype=torch.bfloat16)
    assert not _model("topk").uses_sparse_step("auto")  # 40 atoms
    relu = _model("relu")
    assert not relu.uses_sparse_step("auto")
    with pytest.raises(ValueError, match="sparse_step=True needs an activation"):
        relu.uses_sparse_step(True)
    with pytest.raises(ValueError, match="sparse_step must be"):
        topk.uses_sparse_step("yes")


@pytest.mark.parametrize("n, k", [(1000, 8), (1003, 8), (4096, 32), (64, 30), (50, 50)])
def test_row_topk_gives_topk_values(n, k):
    from sparse_dict._torch.activations import row_topk

    pre = torch.randn(7, n, generator=torch.Generator().manual_seed(n + k))
    pre[1] = 0.5  # a row of ties
    pre[2, -3:] = 100.0  # the largest values past the last whole group
    values, index = row_topk(pre, k)
    assert index.shape == (7, k)
    for row in range(7):
        assert len(set(index[row].tolist())) == k  # k distinct columns
    torch.testing.assert_close(pre.gather(1, index), values)
    torch.testing.assert_close(values.sort(1).values, pre.topk(k, dim=1).values.sort(1).values)


def test_sparse_batchtopk_when_few_pre_activations_are_positive():
    # Fewer positive pre-activations than k * batch: every positive one is a
    # code, in both steps, and the rows with only positive candidates do not
    # turn the selection dense.
    model = _wide_model("batchtopk", k=20)
    with torch.no_grad():
        model.b_enc.fill_(-2.5)
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(11))
    x[0] *= 30.0  # one row with many positive values: the candidates fall back
    from sparse_dict._torch.activations import _batch_candidates

    with torch.no_grad():
        kth, values, _ = _batch_candidates(model.pre_activations(x), 20 * 32, 80)
    assert float(kth) < 0 and 80 < values.shape[1] < 600
    results = []
    for sparse in (False, True):
        stats, fired = model.loss_and_gradients(x, 0.0, sparse_step=sparse)
        results.append((stats, fired, model.W_enc.grad.clone()))
        model.release_workspace()
    with torch.no_grad():
        positive = int((model.pre_activations(x) > 0).sum())
    assert 0 < positive < 20 * 32
    assert float(results[1][0][3]) * 32 == pytest.approx(positive)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1][1], results[0][1])
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-4, atol=1e-6)
