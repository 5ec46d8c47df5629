"""The one-pass weight update against torch's Adam and the plain constraint."""

import os
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
import torch

from sparse_dict._torch import TrainConfig, Trainer, fused
from sparse_dict._torch.activations import make_activation

# Trains the same model with the fused update and with the plain one, then
# calls adam_rows_ directly on awkward shapes, and prints the largest gaps.
_COMPARE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from sparse_dict._torch import TrainConfig, Trainer, fused
    from sparse_dict._torch.activations import make_activation

    device = sys.argv[1]
    out = {"available": fused.available(torch.device(device))}
    X = np.random.RandomState(2).randn(400, 24).astype(np.float32)
    for act in ("relu", "topk", "jumprelu"):
        models = []
        for update in (False, True):
            t = Trainer(24, 40, device, seed=3, activation=make_activation(act, k=4))
            t.initialize(X, np.random.RandomState(0))
            config = TrainConfig(batch_size=50, total_steps=30, fused_update=update,
                                 learning_rate=0.1, coef=20.0, resample_interval=10, k_aux=4,
                                 auxk_coef=0.1 if act == "topk" else 0.0, dead_window=5)
            t.train(X, 5, config, np.random.RandomState(5))
            models.append(t)
        a, b = models
        out[act] = {k: float((b.model.state_dict()[k] - v).abs().max())
                    for k, v in a.model.state_dict().items()}
        sa, sb = (m.optimizer.state[m.model.W_dec] for m in models)
        out[act]["moments"] = float((sa["exp_avg_sq"] - sb["exp_avg_sq"]).abs().max())
        out[act]["steps"] = [float(sa["step"]), float(sb["step"])]
        out[act]["resampled"] = a.n_resampled
    # bfloat16 products: the fused update reads the weights' gradients in
    # bfloat16 and writes the next step's bfloat16 copies of the weights.
    # Against torch's update, and against the same fused update without
    # those two savings (the model told to keep neither), which must give
    # the same numbers on any device: the savings change no value. The
    # residual kernel stays off here: on a GPU it adds gx's column sums
    # (b_dec's gradient) atomically, in an order that changes from run to
    # run, and in bfloat16 a last-bit difference can flip an operand's
    # rounding, which the later steps carry (7e-5 in W_dec after 30 steps on
    # an H200, where two runs of the same update were compared).
    # ReLU's bias in the product's epilogue is forced on: its bfloat16 copy
    # is one of the operands the update writes, and at this size an H200's
    # first step chose the plain product, leaving nothing to check.
    models = {}
    for mode in ("plain", "fused", "fused_without_savings"):
        t = Trainer(24, 40, device, seed=3)
        if mode == "fused_without_savings":
            model = t.model
            model.operand_views = lambda: {}
            model._weight_grad_ = lambda name, grad, keep_low, m=model: type(m)._weight_grad_(
                m, name, grad, False)
        t.initialize(X, np.random.RandomState(0))
        config = TrainConfig(batch_size=50, total_steps=30, fused_update=mode != "plain",
                             bf16=True, learning_rate=0.01, resample_interval=10, dead_window=5,
                             fused_residual=False, fused_product=True)
        t.train(X, 5, config, np.random.RandomState(5))
        models[mode] = t.model
    def gaps(a, b):
        return {k: float((b.state_dict()[k] - v).abs().max()) for k, v in a.state_dict().items()}
    b = models["fused"]
    out["bf16"] = gaps(models["plain"], b)
    out["bf16"]["operands_written"] = sorted(b._operands_current)
    # ReLU's bias in the product's epilogue: its bfloat16 copy, as the
    # update wrote it, is b_enc's rounding.
    out["bf16"]["bias_written"] = bool(torch.equal(
        b._ws["bias"], b.b_enc.detach().to(torch.bfloat16)))
    out["bf16"]["low_grads_read"] = b.W_dec.grad is None and b.W_enc.grad is None
    # The ReLU penalty's atom norms: the ones the update wrote, not a pass
    # over W_dec, and equal to that pass's to rounding.
    out["bf16"]["norms_read"] = b.atom_norms().data_ptr() == b._ws["norms"].data_ptr()
    out["bf16"]["norms_gap"] = float((b.atom_norms() - b.W_dec.norm(dim=1)).abs().max())
    b.operands_stale_()
    out["bf16"]["norms_after_stale"] = b.atom_norms().data_ptr() != b._ws["norms"].data_ptr()
    c = models["fused_without_savings"]
    out["bf16_savings"] = gaps(c, b)
    out["bf16_savings"]["control_kept_neither"] = (
        not c._operands_current and c.W_dec.grad is not None)
    # Switching paths between calls: the step counts carry over.
    runs = []
    for updates in ((True, False, True), (False, False, False)):
        t = Trainer(24, 40, device, seed=3)
        t.initialize(X, np.random.RandomState(0))
        for i, update in enumerate(updates):
            config = TrainConfig(batch_size=50, total_steps=10 * (i + 1), fused_update=update,
                                 learning_rate=0.01, resample_dead=False)
            t.train(X, 5, config, np.random.RandomState(i))
        runs.append(t)
    out["switch"] = {
        "gap": max(float((runs[0].model.state_dict()[k] - v).abs().max())
                   for k, v in runs[1].model.state_dict().items()),
        "steps": [float(r.optimizer.state[r.model.b_enc]["step"]) for r in runs],
    }
    # 37 rows (not a multiple of a block), d=70 (not a power of two), a
    # strided bfloat16 gradient, and the low-precision copy.
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(37, 70, generator=g, device=device)
    w /= w.norm(dim=1, keepdim=True)
    wide = torch.randn(37, 80, generator=g, device=device).bfloat16()
    grad = wide[:, :70]
    m = torch.randn(37, 70, generator=g, device=device) * 0.1
    v = torch.rand(37, 70, generator=g, device=device) * 0.1
    low = torch.zeros(37, 80, device=device, dtype=torch.bfloat16)
    norms = torch.full((37,), 5.0, device=device)
    ref_w = w.clone().requires_grad_()
    opt = torch.optim.Adam([ref_w], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ref_w.grad = torch.zeros_like(ref_w)
    opt.step()  # creates the state; its values are set next
    with torch.no_grad():
        ref_w.copy_(w)
    state = opt.state[ref_w]
    state["exp_avg"].copy_(m); state["exp_avg_sq"].copy_(v); state["step"].fill_(6)
    ref_grad = grad.float()
    ref_grad = ref_grad - (ref_grad * w).sum(1, keepdim=True) * w
    ref_w.grad = ref_grad
    opt.step()
    with torch.no_grad():
        expected = ref_w / ref_w.norm(dim=1, keepdim=True)
    fused.adam_rows_(w, grad, m, v, lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, step=7,
                     project=True, unit=True, low=low, norms=norms)
    out["direct"] = {
        "norms": float((norms - w.norm(dim=1)).abs().max()),
        "weight": float((w - expected).abs().max()),
        "exp_avg": float((m - state["exp_avg"]).abs().max()),
        "exp_avg_sq": float((v - state["exp_avg_sq"]).abs().max()),
        "low_is_torch_s_rounding": bool(torch.equal(low[:, :70], w.bfloat16())),
        "low_untouched": float(low[:, 70:].float().abs().max()),
        "grad_unchanged": bool(torch.equal(grad, wide[:, :70])),
    }
    print(json.dumps(out))
''')


def _compare(device, env=None, script=_COMPARE):
    """Run one of this file's comparison scripts in a fresh process; its JSON."""
    result = subprocess.run([sys.executable, "-c", script, device], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


# How far the fused and plain trainings may drift apart over 30 steps. In
# Triton's interpreter the kernel's arithmetic is correctly rounded, as
# torch's, and they stay within 1e-6. On a GPU the kernel's division and
# square root are the fast ones (within 2 ulp; the correctly rounded ones
# made it 3 times slower on an H200), and the last-bit differences grow
# at these high learning rates: 1.5e-4 in W_dec after 30 steps at 0.1 on
# an H200, and with bfloat16 products, whose operands round to 8 bits,
# 2.4e-3 in W_enc after 30 steps at 0.01 there. A wrong formula (a missed
# bias correction) moves the weights by about the learning rate at once.
# In the interpreter too, a last-bit difference in a float32 weight can
# flip the rounding of its bfloat16 operand copy (8 bits), which the later
# steps carry: 2.4e-4 in W_enc after 30 steps at 0.01 (the float32 gaps
# stay within 1e-6).
# The bfloat16 savings (gradients read in bfloat16, operands written by the
# update) are checked exactly on every device, against the same fused
# update without them.
# (fused against torch's update, the same in bf16, the bf16 savings against
# the same update without them). The savings change no value, which the
# interpreter shows exactly; on a GPU two runs of one bf16 update already
# differ (atomic sums in the step's kernels flip a bf16 operand's rounding,
# which later steps carry): 6e-4 in W_enc after 30 steps on an H200
# (2026-11-26), so there the savings are held to the fused drift.
_DRIFT = {"interpreter": (2e-5, 1e-3, 2e-6), "gpu": (2e-3, 1e-2, 2e-3)}


def _check(out, drifts):
    drift, drift_bf16, drift_savings = drifts
    assert out["available"]
    for act in ("relu", "topk", "jumprelu"):
        gaps = out[act]
        assert gaps["steps"] == [30.0, 30.0]
        for name in ("W_dec", "W_enc", "b_enc", "b_dec", "moments"):
            assert gaps[name] < drift, (act, name, gaps)
    assert out["jumprelu"]["log_threshold"] < drift, out["jumprelu"]
    assert out["switch"]["steps"] == [30.0, 30.0] and out["switch"]["gap"] < drift, out["switch"]
    assert out["relu"]["resampled"] > 0  # the moments' reset by resampling ran on both
    bf16 = out["bf16"]
    assert bf16["operands_written"] == ["W_dec", "W_dec_norms", "W_enc", "b_enc"]
    assert bf16["low_grads_read"] and bf16["bias_written"]
    assert bf16["norms_read"] and bf16["norms_gap"] < 1e-6 and bf16["norms_after_stale"]
    savings = out["bf16_savings"]
    assert savings["control_kept_neither"]
    for name in ("W_dec", "W_enc", "b_enc", "b_dec"):
        assert bf16[name] < drift_bf16, (name, bf16)
        assert savings[name] < drift_savings, (name, savings)
    direct = out["direct"]
    assert direct["weight"] < 1e-5 and direct["exp_avg"] < 1e-6 and direct["exp_avg_sq"] < 1e-6
    assert direct["norms"] < 1e-6
    assert direct["low_is_torch_s_rounding"]  # to nearest even, as torch converts
    assert direct["low_untouched"] == 0.0 and direct["grad_unchanged"]


def test_fused_update_matches_torch_in_triton_s_interpreter():
    pytest.importorskip("triton")
    # The interpreter runs the kernel's own code on the CPU, element by
    # element as written: what a GPU would compute, up to rounding.
    _check(_compare("cpu", {"TRITON_INTERPRET": "1"}), _DRIFT["interpreter"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_update_matches_torch_on_the_gpu():
    pytest.importorskip("triton")
    _check(_compare("cuda"), _DRIFT["gpu"])


def test_no_fused_update_on_the_cpu_or_when_turned_off(monkeypatch):
    assert not fused.available(torch.device("cpu"))
    monkeypatch.setenv("SPARSE_DICT_FUSED", "0")
    assert not fused.available(torch.device("cuda"))


def test_bad_layouts_are_refused():
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        fused.adam_rows_(w.t(), w.t(), w.t(), w.t(), lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, step=1)
    with pytest.raises(ValueError, match="columns"):
        fused.adam_rows_(w, torch.zeros(8, 4).t(), w.clone(), w.clone(), lr=1e-3, beta1=0.9,
                         beta2=0.999, eps=1e-8, step=1)


def test_the_trainer_falls_back_to_torch_where_fused_cannot_run():
    X = np.random.RandomState(0).randn(100, 6).astype(np.float32)
    runs = []
    for update in ("auto", False):
        t = Trainer(6, 12, "cpu", seed=0, activation=make_activation("relu"))
        t.initialize(X, np.random.RandomState(0))
        t.train(X, 2, TrainConfig(batch_size=20, fused_update=update), np.random.RandomState(1))
        runs.append(t.model.W_dec.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("failure", ["raises", "differs"])
def test_a_kernel_that_fails_its_probe_leaves_the_plain_path(monkeypatch, failure):
    def probe_gap(device):
        if failure == "raises":
            raise RuntimeError("no compiler")
        return 0.5

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets available() probe on the CPU
    monkeypatch.setattr(fused, "_probe_gap", probe_gap)
    fused._probe.cache_clear()
    try:
        match = "cannot run" if failure == "raises" else "differs"
        with pytest.warns(RuntimeWarning, match=match):
            assert not fused.available(torch.device("cpu"))
    finally:
        fused._probe.cache_clear()


# ------------------------------------------ the codes' pass, the residual

# The codes kernels against the plain operations, exactly: direct calls on
# awkward shapes and dtypes, then whole trainings of every dense mechanism
# with the kernels forced on and off. Then the residual kernel: its
# element-wise outputs exactly, its sums to float32 rounding, and trainings
# with it on and off, which differ by that rounding alone.
_CODES = textwrap.dedent('''
    import json, sys, warnings
    import numpy as np, torch
    from sparse_dict._torch import TrainConfig, Trainer, fused
    from sparse_dict._torch.activations import make_activation, positive_mask

    device = sys.argv[1]
    out = {"direct": [], "train": {}, "residual": [], "residual_train": {}, "product": [],
           "product_train": {}, "stats": [], "stats_train": {}}
    g = torch.Generator(device=device).manual_seed(0)
    # Each case twice: as launched, and with one program doing every tile of
    # its columns (the loop over tiles that a GPU-sized batch runs).
    cases = [(dtype, programs) for programs in (None, 1)
             for dtype in (torch.float32, torch.bfloat16)]
    for dtype, programs in cases:
        if programs is not None:
            fused._PROGRAMS.update(codes=programs, residual=programs)
        for relu in (True, False):
            # 37 rows (not a multiple of a block), 300 columns (not a power of
            # two, nor of eight), the rows a slice of a wider buffer; exact
            # zeros, -0.0.
            wide = torch.randn(37, 320, generator=g, device=device).to(dtype)
            wide[::3, ::7] = 0.0
            wide[1::5, ::11] = -0.0
            if not relu:
                wide.clamp_(min=0.0)  # codes after an activation are never negative
            codes = wide[:, :300]
            rest = wide[:, 300:].clone()
            expected = codes.clone()
            if relu:
                expected.relu_()
            mask_ref = torch.empty_like(expected)
            positive_mask(expected, mask_ref)
            fired_ref = mask_ref.sum(dim=0, dtype=torch.float32)
            bits_wide = torch.full((37, 48), 7, device=device, dtype=torch.uint8)
            bits = bits_wide[:, :fused.bits_columns(300)]
            fired = fused.codes_bits_count_(codes, bits, relu=relu)
            grad_wide = torch.randn(37, 320, generator=g, device=device).to(dtype)
            grad_wide[0, :4] = float("nan")
            grad_ref = grad_wide[:, :300] * mask_ref
            grad_rest = grad_wide[:, 300:].clone()
            fused.mask_by_bits_(grad_wide[:, :300], bits)
            out["direct"].append({
                "dtype": str(dtype), "relu": relu,
                "codes": bool(torch.equal(codes, expected)),
                "mask": bool(torch.equal(fused.unpack_bits(bits, 300, dtype), mask_ref)),
                "fired": bool(torch.equal(fired, fired_ref)),
                "rest_untouched": bool(torch.equal(wide[:, 300:], rest)
                                       and bool((bits_wide[:, 38:] == 7).all())),
                "masked": bool(torch.equal(grad_wide[:, :300].nan_to_num(9.0),
                                           grad_ref.nan_to_num(9.0))),
                "grad_rest_untouched": bool(torch.equal(grad_wide[:, 300:], grad_rest)),
            })
        # The residual: 37 rows, d = 70, gx a slice of a wider buffer, the
        # decoder's product in the step's dtype, and err as its own input.
        for in_place in (False, True):
            y = torch.randn(37, 70, generator=g, device=device).to(dtype)
            b = torch.randn(70, generator=g, device=device)
            x = torch.randn(37, 70, generator=g, device=device)
            gx_wide = torch.full((37, 80), 3.0, device=device, dtype=dtype)
            err = torch.empty(37, 70, device=device)
            e = (y.float() + b) - x
            gx_ref = (e * (2.0 / 37)).to(dtype)
            if in_place:
                if dtype != torch.float32:
                    continue
                err.copy_(y)
                y = err
            sse, sums = fused.residual_(y, b, x, gx_wide[:, :70], err, 2.0 / 37)
            out["residual"].append({
                "dtype": str(dtype), "in_place": in_place,
                "err": bool(torch.equal(err, e)),
                "gx": bool(torch.equal(gx_wide[:, :70], gx_ref)),
                "gx_rest_untouched": bool((gx_wide[:, 70:] == 3.0).all()),
                "sse": abs(float(sse) - float(e.double().square().sum())) / float(sse),
                "sums": float((sums - gx_ref.double().sum(0)).abs().max()),
            })
    fused._PROGRAMS.update(codes=4096, residual=512)
    # Every launch a GPU's first step may time: other grids and blocks, the
    # same values. 37 rows over 600 columns: 3 blocks of columns, and, one
    # tile of 16 rows a program, 3 of rows; 64 rows a program of the mask
    # kernel cover them all.
    out["launches"] = []
    for dtype in (torch.float32, torch.bfloat16):
        codes = torch.randn(37, 600, generator=g, device=device).to(dtype)
        expected = codes.relu()
        mask_ref = torch.empty_like(expected)
        positive_mask(expected, mask_ref)
        grad = torch.randn(37, 600, generator=g, device=device).to(dtype)
        for launch in fused._launches():
            c = codes.clone()
            bits = torch.empty(37, fused.bits_columns(600), device=device, dtype=torch.uint8)
            fired = fused.codes_bits_count_(c, bits, relu=True, launch=launch)
            masked = grad.clone()
            fused.mask_by_bits_(masked, bits, launch)
            out["launches"].append({
                "dtype": str(dtype), "launch": list(launch),
                "same": bool(torch.equal(c, expected)
                             and torch.equal(fired, mask_ref.sum(dim=0, dtype=torch.float32))
                             and torch.equal(masked, grad * mask_ref)),
            })
    # The residual's launches: 300 rows over d = 70 (one tile of 32 rows
    # each, or 10 a program), float32 and bfloat16 gradients.
    out["residual_launches"] = []
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(300, 70, generator=g, device=device).to(dtype)
        b = torch.randn(70, generator=g, device=device)
        x = torch.randn(300, 70, generator=g, device=device)
        e = (y.float() + b) - x
        gx_ref = (e * (2.0 / 300)).to(dtype)
        for launch in fused._RESIDUAL_LAUNCHES:
            err = torch.full((300, 70), float("nan"), device=device)
            gx = torch.full((300, 70), float("nan"), device=device, dtype=dtype)
            sse, sums = fused.residual_(y, b, x, gx, err, 2.0 / 300, launch)
            out["residual_launches"].append({
                "dtype": str(dtype), "launch": list(launch),
                "same": bool(torch.equal(err, e) and torch.equal(gx, gx_ref)),
                "sse": abs(float(sse) - float(e.double().square().sum())) / float(sse),
                "sums": float((sums - gx_ref.double().sum(0)).abs().max()),
            })
    nan = torch.tensor([[float("nan"), -1.0, 2.0]], device=device)
    nan_bits = torch.empty(1, 1, device=device, dtype=torch.uint8)
    fused.codes_bits_count_(nan, nan_bits, relu=True)
    out["nan_kept"] = bool(torch.isnan(nan[0, 0])) and nan[0, 1:].tolist() == [0.0, 2.0]

    X = np.abs(np.random.RandomState(2).randn(300, 16)).astype(np.float32)
    def train(act, **kernels):
        t = Trainer(16, 32, device, seed=3, activation=make_activation(act, k=4))
        t.initialize(X, np.random.RandomState(0))
        config = TrainConfig(batch_size=50, total_steps=12, fused_update=False,
                             sparse_step=False, learning_rate=0.05, coef=0.5,
                             resample_interval=5, dead_window=4, **kernels)
        t.train(X, 2, config, np.random.RandomState(5))
        return t
    for act in ("relu", "topk", "batchtopk", "jumprelu"):
        a, b = (train(act, fused_codes=on, fused_residual=False) for on in (False, True))
        out["train"][act] = {
            "same": all(torch.equal(b.model.state_dict()[k], v)
                        for k, v in a.model.state_dict().items()),
            "history": bool(np.array_equal(a.history, b.history)),
            "fired": bool(np.array_equal(a.pass_fired, b.pass_fired)),
            "bits_used": b.model._ws is not None and "bits" in b.model._ws,
        }
        a, b = (train(act, fused_codes=False, fused_residual=on) for on in (False, True))
        out["residual_train"][act] = {
            "params": max(float((b.model.state_dict()[k] - v).abs().max())
                          for k, v in a.model.state_dict().items()),
            "history": float(np.abs(a.history - b.history).max()),
        }
    # The first step's choices: measured (on the interpreter, only checked).
    codes = torch.randn(8, 40, generator=g, device=device)
    mask, scratch = torch.empty_like(codes), torch.empty_like(codes)
    bits = torch.empty(8, 5, device=device, dtype=torch.uint8)

    def plain(c, m):
        c.relu_()
        positive_mask(c, m)
        return m.sum(dim=0)

    def wrong(c, m):
        plain(c, m)
        return m.sum(dim=0) + 1

    before = codes.clone()
    out["pays"] = fused.codes_kernel_pays(codes, mask, scratch, bits, plain, True)
    out["codes_kept"] = bool(torch.equal(codes, before))
    # Decided: the steps after the first ask again and touch nothing (no
    # copy of the codes into the scratch buffer, a pass over the largest
    # array of the step).
    scratch.fill_(5.0)
    again = fused.codes_kernel_pays(codes, mask, scratch, bits, plain, True)
    out["asked_again"] = again == out["pays"] and bool((scratch == 5.0).all())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["pays_wrong"] = fused.codes_kernel_pays(codes[:, :30], mask[:, :30],
                                                    scratch[:, :30], bits[:, :4], wrong, True)
        y, b, x = (torch.randn(6, 9, generator=g, device=device) for _ in range(3))
        err, gx = torch.empty(6, 9, device=device), torch.empty(6, 9, device=device)
        def plain_residual(shift=0.0):
            err.copy_(y).add_(b[0]).sub_(x)
            torch.mul(err, 0.5, out=gx)
            return err.square().sum() + shift, gx.sum(dim=0)
        y_before = y.clone()
        out["residual_pays"] = fused.residual_pays(y, b[0], x, gx, err, 0.5, plain_residual)
        out["residual_y_kept"] = bool(torch.equal(y, y_before))
        out["residual_pays_wrong"] = fused.residual_pays(
            y[:5], b[0], x[:5], gx[:5], err[:5], 0.5, lambda: plain_residual(1.0))
        # The encoder's bias and ReLU in the product: against the ones
        # column and a ReLU, and a plain way without its bias (wrong).
        xc = torch.randn(6, 16, generator=g, device=device)
        xc[:, 9] = 1.0
        xc[:, 10:] = 0.0  # the padding, as in the step's buffer
        enc = torch.randn(10, 16, generator=g, device=device)
        bias = torch.randn(10, generator=g, device=device)
        out_p, scratch_p = torch.empty(6, 10, device=device), torch.empty(6, 10, device=device)
        def plain_product(into, with_bias=True):
            enc[:, 9] = bias if with_bias else 0.0
            return torch.mm(xc[:len(into)], enc.t(), out=into)
        out["product_pays"] = fused.product_relu_pays(
            lambda: bias, xc[:, :9], enc[:, :9].t(), out_p, scratch_p, plain_product)
        out["product_pays_wrong"] = fused.product_relu_pays(
            lambda: bias, xc[:5, :9], enc[:, :9].t(), out_p[:5], scratch_p[:5],
            lambda into: plain_product(into, with_bias=False))
        # The statistics' kernel against a plain way that is off by one.
        vec = torch.rand(12, generator=g, device=device)
        bias_col = torch.empty(12, device=device)
        def plain_stats(shift):
            bias_col.copy_(vec * (0.5 / 8))
            return torch.stack([vec.sum(), vec.sum(), vec.sum(), vec.sum(), vec.sum()]) + shift
        out["stats_pays_wrong"] = fused.penalty_stats_pays(
            vec, vec, vec.sum(), vec, 0.0, 0.5, 8, bias_col, lambda: plain_stats(1.0))
    out["warned"] = [str(w.message) for w in caught]
    # A launch that gave other values (here the mask kernel's 64 rows, made
    # to skip the mask) keeps the plain operations for every launch.
    real_mask = fused.mask_by_bits_
    def broken_mask(grad, bits, launch=None):
        if launch is not None and launch.rows == 64:
            return None
        return real_mask(grad, bits, launch)
    fused.mask_by_bits_ = broken_mask
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["pays_one_launch_wrong"] = fused.codes_kernel_pays(
            codes[:, :20], mask[:, :20], scratch[:, :20], bits[:, :3], plain, True)
    fused.mask_by_bits_ = real_mask
    out["warned_one_launch_wrong"] = [str(w.message) for w in caught]
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(37, 80, generator=g, device=device).to(dtype)[:, :70]
        w = torch.randn(300, 80, generator=g, device=device).to(dtype)[:, :70]
        bias = torch.randn(300, generator=g, device=device).to(dtype)
        expected = torch.relu(a.float() @ w.float().t() + bias.float())
        got = fused.product_relu_(bias, a, w.t(), torch.empty(37, 300, device=device,
                                                              dtype=dtype))
        out["product"].append(float(torch.linalg.vector_norm(got.float() - expected)
                                    / torch.linalg.vector_norm(expected)))
    for act in ("relu", "topk"):
        runs = [train(act, fused_codes=codes, fused_residual=False, fused_product=product)
                for codes, product in ((False, False), (False, True), (True, True))]
        out["product_train"][act] = {
            "gaps": [max(float((r.model.state_dict()[k] - v).abs().max())
                         for k, v in runs[0].model.state_dict().items()) for r in runs[1:]],
            "taken": ["bias" in r.model._ws for r in runs]}
    # The step's statistics and penalty bias: ReLU's weighted L1, JumpReLU's
    # scaled L0, nothing (TopK); the code sums a column of a wider product,
    # the bias a column of the decoder's buffer.
    for dtype in (torch.float32, torch.bfloat16):
        for weighted, l0_factor in ((True, 0.0), (False, 24.0), (False, 0.0)):
            n = 2500  # ten programs of 256 features, the last one partly filled
            wide = torch.rand(n, 20, generator=g, device=device).to(dtype) * 50
            fired = torch.randint(0, 40, (n,), generator=g, device=device).float()
            sse = torch.tensor(123.25, device=device)
            weights = torch.rand(n, generator=g, device=device) + 0.5 if weighted else None
            coef, batch = 0.7, 64
            dec = torch.full((n, 20), 9.0, device=device, dtype=dtype)
            stats = fused.penalty_stats_(wide[:, 17], fired, sse, weights, l0_factor, coef,
                                         batch, dec[:, 17])
            sums = wide[:, 17].float()
            l0 = fired.sum() / batch
            penalty = ((sums.double() @ weights.double()) / batch if weighted else 0.0) + (
                l0.double() * l0_factor)
            mse = 123.25 / batch
            expected = [mse + coef * float(penalty), mse, float(sums.double().sum()) / batch,
                        float(l0), 0.0]
            bias = (weights * (coef / batch)).to(dtype) if weighted else torch.zeros(
                n, device=device, dtype=dtype)
            out["stats"].append({
                "case": [str(dtype), weighted, l0_factor],
                "gap": max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(stats.tolist(), expected)),
                "bias": bool(torch.equal(dec[:, 17], bias)),
                "rest_untouched": bool((dec[:, :17] == 9.0).all() and (dec[:, 18:] == 9.0).all()),
            })
    for act in ("relu", "jumprelu", "topk"):
        a, b = (train(act, fused_codes=False, fused_residual=False, fused_stats=on)
                for on in (False, True))
        out["stats_train"][act] = {
            "params": max(float((b.model.state_dict()[k] - v).abs().max())
                          for k, v in a.model.state_dict().items()),
            "history": float(np.abs(a.history - b.history).max()),
        }
    out["choices"] = sorted(str(k[0]) + ":" + str(bool(v)) for k, v in fused.choices().items())
    # A first step that decides must train as one that does not: each
    # dense mechanism, float32 and bfloat16, with every kernel "auto" and
    # nothing decided yet, against the same choices forced. (A float32
    # residual is written over the decoder's product; its decision once left
    # the residual there, and the first step took it for the product.)
    flags = {"codes": "fused_codes", "residual": "fused_residual",
             "product_relu": "fused_product", "penalty_stats": "fused_stats",
             "centre": "fused_centre", "tally": "fused_tally"}
    out["decided_train"] = {}
    for bf16 in (False, True):
        for act in ("relu", "topk", "jumprelu"):
            fused._choices.clear()
            a = train(act, bf16=bf16)
            made = {flags[k[0]]: bool(v) for k, v in fused.choices().items()}
            b = train(act, bf16=bf16, **{flag: made.get(flag, False) for flag in flags.values()})
            out["decided_train"][f"{act} bf16={bf16}"] = {
                "decided": sorted(made),
                "params": max(float((b.model.state_dict()[k] - v).abs().max())
                              for k, v in a.model.state_dict().items()),
                "history": float(np.abs(a.history - b.history).max()),
            }
    # The residual's decision with err as its own input (float32 products),
    # deciding for the kernel and, with a bias the kernel refuses, against
    # it after the plain way already ran: err holds the product again.
    for bias_kind in ("contiguous", "strided"):
        y = torch.randn(7, 9, generator=g, device=device)
        x = torch.randn(7, 9, generator=g, device=device)
        bias = torch.randn(9, 2, generator=g, device=device)
        bias = bias[:, 0].contiguous() if bias_kind == "contiguous" else bias[:, 0]
        gx = torch.empty(7, 9, device=device)
        err, before = y.clone(), y.clone()
        def plain_alias():
            err.add_(bias).sub_(x)
            torch.mul(err, 0.5, out=gx)
            return err.square().sum(), gx.sum(dim=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused._choices.clear()
            chose = fused.residual_pays(err, bias, x, gx, err, 0.5, plain_alias)
        out[f"residual_alias_{bias_kind}"] = {"chose": chose,
                                               "err_is_y": bool(torch.equal(err, before))}
    print(json.dumps(out))
''')


def _check_codes(out, measured):
    assert len(out["direct"]) == 8 and len(out["residual"]) == 6
    for case in out["direct"]:
        assert all(v for k, v in case.items() if k not in ("dtype", "relu")), case
    for case in out["residual"]:
        assert case["err"] and case["gx"] and case["gx_rest_untouched"], case
        assert case["sse"] < 1e-5 and case["sums"] < 1e-5, case
    assert out["nan_kept"]
    # The residual's six launches, float32 and bfloat16 gradients: the same
    # values, the sums to float32 rounding.
    assert len(out["residual_launches"]) == 12, out["residual_launches"]
    for case in out["residual_launches"]:
        assert case["same"] and case["sse"] < 1e-5 and case["sums"] < 1e-5, case
    # Three grids of the codes kernel, three blocks of the mask kernel, each
    # with each, in both dtypes.
    assert len(out["launches"]) == 18 and len({str(c["launch"]) for c in out["launches"]}) == 9
    assert all(case["same"] for case in out["launches"]), out["launches"]
    for act in ("relu", "topk", "batchtopk", "jumprelu"):
        assert out["train"][act] == {"same": True, "history": True, "fired": True,
                                     "bits_used": True}, act
        # Sums in another order: float32 rounding in the squared error and
        # in b_dec's gradient, which 12 steps at a learning rate of 0.05 do
        # not grow past 1e-4 (a wrong term moves them by about 0.05).
        gaps = out["residual_train"][act]
        assert gaps["params"] < 1e-4 and gaps["history"] < 1e-4, (act, gaps)
    assert out["codes_kept"] and out["residual_y_kept"] and out["asked_again"]
    if not measured:
        # Nothing to time on the interpreter.
        # The interpreter takes the kernel in its default launch.
        assert out["pays"] == [None, 16, 4] and out["residual_pays"] == [None, None]
    else:
        assert out["pays"] is False or out["pays"] in [c["launch"] for c in out["launches"]]
        assert out["residual_pays"] is False or out["residual_pays"] in [
            c["launch"] for c in out["residual_launches"]]
    assert out["pays_wrong"] is False and out["residual_pays_wrong"] is False
    assert out["pays_one_launch_wrong"] is False
    assert [("differs" in m) for m in out["warned_one_launch_wrong"]] == [True]
    assert out["product_pays_wrong"] is False and out["stats_pays_wrong"] is False
    if not measured:
        assert out["product_pays"] is True
    assert sum("differs" in message for message in out["warned"]) == 4, out["warned"]
    # The bias and ReLU in the product: float32 and bfloat16 rounding.
    assert out["product"][0] < 1e-6 and out["product"][1] < 1e-2, out["product"]
    # ReLU trains alike with the ReLU in the product (with the codes' plain
    # pass or the kernel after it), to rounding; TopK never takes it.
    relu, topk = out["product_train"]["relu"], out["product_train"]["topk"]
    assert relu["taken"] == [False, True, True] and max(relu["gaps"]) < 1e-4, relu
    assert topk == {"gaps": [0.0, 0.0], "taken": [False, False, False]}, topk
    assert measured or "product_relu:True" in out["choices"]
    # The statistics to float32 rounding, the penalty bias exactly, and
    # trainings alike (to rounding) with and without the kernel.
    assert len(out["stats"]) == 6
    for case in out["stats"]:
        assert case["gap"] < 1e-5 and case["bias"] and case["rest_untouched"], case
    for act, gaps in out["stats_train"].items():
        assert gaps["params"] < 1e-4 and gaps["history"] < 1e-4, (act, gaps)
    # The first step's decisions leave its values as they were: the same
    # operations, in the same order, as the choices forced.
    assert len(out["decided_train"]) == 6
    for case, result in out["decided_train"].items():
        assert result["params"] == 0.0 and result["history"] == 0.0, (case, result)
        assert {"fused_codes", "fused_residual", "fused_stats",
                "fused_centre", "fused_tally"} <= set(result["decided"]), case
        assert ("fused_product" in result["decided"]) == case.startswith("relu"), case
    assert out["residual_alias_contiguous"] == {"chose": out["residual_alias_contiguous"][
        "chose"] if measured else [None, None], "err_is_y": True}
    assert out["residual_alias_strided"] == {"chose": False, "err_is_y": True}


# Where the kernels' comparison scripts run: Triton's interpreter on the
# CPU (every machine), and a GPU, whose choices are measured.
_WHERE = [pytest.param("interpreter"),
          pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                       reason="needs a CUDA GPU"))]


def _run_where(where, script):
    """``(the script's JSON, whether its choices were measured)`` on ``where``."""
    pytest.importorskip("triton")
    if where == "gpu":
        return _compare("cuda", script=script), True
    return _compare("cpu", {"TRITON_INTERPRET": "1"}, script), False


@pytest.mark.parametrize("where", _WHERE)
def test_the_step_s_kernels_match_the_plain_operations(where):
    _check_codes(*_run_where(where, _CODES))


_CENTRE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from sparse_dict._torch import TrainConfig, Trainer, fused

    device = sys.argv[1]
    g = torch.Generator(device=device).manual_seed(0)
    out = {"cases": [], "train": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows in (37, 300):
            # 300 columns (not a power of two), written into a slice of a
            # wider buffer whose last column must stay as it was; NaN,
            # infinities, -0.0 and values that round to bfloat16's halfway.
            x = torch.randn(n_rows, 300, generator=g, device=device)
            x[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
            x[1, :2] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
            b = torch.randn(300, generator=g, device=device)
            b[1] = 0.0
            wide = torch.full((n_rows, 301), 7.0, device=device, dtype=dtype)
            expected = wide.clone()
            torch.sub(x, b, out=expected[:, :300])
            fused.centre_(x, b, wide[:, :300])
            out["cases"].append(bool(torch.equal(wide.isnan(), expected.isnan()) and torch.equal(
                torch.nan_to_num(wide), torch.nan_to_num(expected))))
    # The decision, and trainings alike with the kernel and without.
    out["pays"] = fused.centre_pays(x, b, wide[:, :300],
                                    lambda: torch.sub(x, b, out=wide[:, :300]))
    X = np.random.RandomState(0).randn(300, 24).astype(np.float32)
    calls, real = [], fused.centre_
    fused.centre_ = lambda *args: calls.append(1) or real(*args)
    for bf16 in (False, True):
        params = []
        for on in (True, False):
            trainer = Trainer(24, 48, device, seed=0)
            trainer.initialize(X, np.random.RandomState(0))
            config = TrainConfig(batch_size=32, total_steps=12, learning_rate=0.05, bf16=bf16,
                                 fused_centre=on)
            trainer.train(X, 2, config, np.random.RandomState(1))
            params.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        out["train"][str(bf16)] = max(float((params[0][k] - v).abs().max())
                                      for k, v in params[1].items())
    out["calls"] = len(calls)  # 12 steps of each fit with the kernel, none without
    fused.centre_ = real

    # The trainer's counts: the same values as its three torch operations.
    fired = torch.randint(0, 3, (300,), generator=g, device=device).float()
    total = torch.rand(300, generator=g, device=device, dtype=torch.float64)
    since = torch.randint(0, 50, (300,), generator=g, device=device)
    plain_total, plain_since = total.clone(), since.clone()
    plain_total += fired
    plain_since += 1
    plain_since.masked_fill_(fired > 0, 0)
    fused.tally_(fired, total, since)
    out["tally"] = bool(torch.equal(total, plain_total) and torch.equal(since, plain_since))
    before = (total.clone(), since.clone())
    def plain(t, s):
        t += fired
        s += 1
        s.masked_fill_(fired > 0, 0)

    out["tally_pays"] = fused.tally_pays(fired, total, since, plain)
    # A wrong plain way (nothing done): the kernel differs from it, and is not taken.
    out["tally_pays_wrong"] = fused.tally_pays(fired[:299].contiguous(), total[:299].clone(),
                                               since[:299].clone(), lambda t, s: None)
    out["tally_untouched"] = bool(torch.equal(total, before[0]) and torch.equal(since, before[1]))
    tallies, real_tally = [], fused.tally_
    fused.tally_ = lambda *args: tallies.append(1) or real_tally(*args)
    runs = []
    for on in (True, False):
        trainer = Trainer(24, 48, device, seed=0)
        trainer.initialize(X, np.random.RandomState(0))
        config = TrainConfig(batch_size=32, total_steps=12, learning_rate=0.05, fused_tally=on,
                             resample_interval=5, dead_window=3)
        trainer.train(X, 2, config, np.random.RandomState(1))
        runs.append((trainer.pass_fired.tolist(), trainer.steps_since_fired.tolist(),
                     trainer.n_resampled))
    out["tally_train"] = runs[0] == runs[1]
    out["tally_calls"] = len(tallies)
    print(json.dumps(out))
''')


def _check_centre(out, measured):
    assert out["cases"] == [True] * 4
    assert out["calls"] == 24
    assert out["tally"] and out["tally_untouched"] and out["tally_train"]
    assert out["tally_calls"] == 12 and out["tally_pays_wrong"] is False
    if not measured:
        assert out["tally_pays"] is True
    # The same values either way: trainings alike to the last bit.
    assert out["train"] == {"False": 0.0, "True": 0.0}, out["train"]
    if not measured:
        assert out["pays"] is True


@pytest.mark.parametrize("where", _WHERE)
def test_the_centring_and_tally_kernels_give_torch_s_values(where):
    _check_centre(*_run_where(where, _CENTRE))


def test_the_centring_kernel_refuses_bad_layouts():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="centre_ needs float32"):
        fused.centre_(x.double(), x[0], x)
    with pytest.raises(ValueError, match="centre_ needs float32"):
        fused.centre_(x, x[0], x.t())
    with pytest.raises(ValueError, match="centre_ needs float32"):
        fused.centre_(x, x[:, 0], x)


def test_no_codes_or_residual_kernel_on_the_cpu_or_when_turned_off(monkeypatch):
    codes = torch.randn(4, 8)
    bits = torch.empty(4, 1, dtype=torch.uint8)
    codes_args = (codes, torch.empty_like(codes), torch.empty_like(codes), bits, None, True)
    x = torch.randn(4, 3)
    residual_args = (x, x[0], x, torch.empty_like(x), torch.empty_like(x), 0.5, None)
    assert not fused.codes_kernel_pays(*codes_args)
    assert not fused.residual_pays(*residual_args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPARSE_DICT_FUSED", "0")
    assert not fused.codes_kernel_pays(*codes_args)
    assert not fused.residual_pays(*residual_args)


def test_the_mask_and_residual_kernels_refuse_bad_layouts():
    codes = torch.zeros(4, 20)
    with pytest.raises(ValueError, match="uint8 bits tensor of at least \\(4, 3\\)"):
        fused.codes_bits_count_(codes, torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 bits"):
        fused.mask_by_bits_(codes, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="contiguous columns"):
        fused.mask_by_bits_(codes.t(), torch.zeros(20, 1, dtype=torch.uint8))
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="float32 x and err"):
        fused.residual_(x, x[0], x.double(), x, x, 1.0)
    with pytest.raises(ValueError, match="contiguous columns"):
        fused.residual_(x, x[0], x, x.t(), x, 1.0)


def test_the_timed_choice_keeps_each_way_s_best_of_alternating_trials(monkeypatch):
    # A fake clock that each call advances: the kernel costs 1.0 a call and
    # the plain operations 1.1, but the kernel's first timed calls meet a
    # slow spell (+10). One timing of each way would keep the plain
    # operations; the best of three alternating ones keeps the kernel.
    now = [0.0]
    monkeypatch.setattr(fused, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = {"fused": 0}

    def plain():
        now[0] += 1.1

    def kernel():
        calls["fused"] += 1
        now[0] += 1.0 + (10.0 if calls["fused"] == 2 else 0.0)

    syncs = []
    ways = {False: plain, True: kernel}
    assert fused._fastest(ways, lambda: syncs.append(1), repeats=5) is True
    assert calls["fused"] == 1 + 3 * 5 and len(syncs) == 2 * 2 * 3
    calls["fused"] = 0
    assert fused._fastest(ways, lambda: None, repeats=5, trials=1) is False

    def slower():
        now[0] += 1.2

    def fastest():
        now[0] += 0.9

    assert fused._fastest({False: plain, True: slower}, lambda: None, repeats=5) is False
    # Several launches of a kernel: the fastest of all, whatever its place.
    launches = {False: plain, "a": slower, "b": fastest, "c": kernel}
    best = {}
    assert fused._fastest(launches, lambda: None, repeats=5, best=best) == "b"
    assert best == pytest.approx({False: 5.5, "a": 6.0, "b": 4.5, "c": 5.0})

    def tie():
        now[0] += 1.1

    # A tie keeps the way listed first: the plain operations.
    assert fused._fastest({False: plain, True: tie}, lambda: None, repeats=5) is False


def test_a_kernel_with_several_launches_is_decided_for_the_fastest_on_a_gpu(monkeypatch):
    # kernel_pays with a dict of launches: every way is timed on a GPU and
    # the fastest launch is the choice, kept for the key; the interpreter
    # (no timing) takes the first launch; a disagreement takes none.
    monkeypatch.setattr(fused, "may_run", lambda device: True)
    monkeypatch.setattr(fused, "_choices", {})
    monkeypatch.setattr(fused, "_timings", {})
    timed = []

    def fastest(ways, sync, repeats, best):
        timed.append(list(ways))
        best.update({way: 2.0 * repeats for way in ways}, wide=1.0 * repeats)
        return "wide"

    monkeypatch.setattr(fused, "_fastest", fastest)
    ways = {"narrow": lambda: None, "wide": lambda: None}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    key = ("codes", "cuda:0", torch.bfloat16, (8, 8), True)
    assert fused.kernel_pays(key, torch.device("cuda"),
                             lambda: (lambda: True, lambda: None, ways)) == "wide"
    assert timed == [[False, "narrow", "wide"]] and fused.choices()[key] == "wide"
    # What each way took, a call, kept for the benchmarks.
    assert fused.timings() == {key: {False: 2.0, "narrow": 2.0, "wide": 1.0}}
    key_cpu = ("codes", "cpu", torch.bfloat16, (8, 8), True)
    assert fused.kernel_pays(key_cpu, torch.device("cpu"),
                             lambda: (lambda: True, lambda: None, ways)) == "narrow"
    key_wrong = ("codes", "cpu", torch.bfloat16, (9, 8), True)
    with pytest.warns(RuntimeWarning, match="differs"):
        assert fused.kernel_pays(key_wrong, torch.device("cpu"),
                                 lambda: (lambda: False, lambda: None, ways)) is False
    assert len(timed) == 1 and list(fused.timings()) == [key]  # none timed off a GPU


def test_the_step_s_kernels_are_settled_once_per_training_call_on_the_cpu(monkeypatch):
    # Where no kernel may run, "auto" is settled when training starts; the
    # steps do not read the environment again (35 us a step on a CPU).
    asked = []
    real = fused.may_run
    monkeypatch.setattr(fused, "may_run", lambda device: asked.append(1) or real(device))
    X = np.random.RandomState(0).randn(400, 8).astype(np.float32)
    t = Trainer(8, 16, "cpu", seed=0)
    t.initialize(X, np.random.RandomState(0))
    t.train(X, 5, TrainConfig(batch_size=20, total_steps=60), np.random.RandomState(1))
    assert len(t.history) == 60 and len(asked) <= 2, len(asked)


def test_a_decided_choice_is_answered_without_reading_the_environment(monkeypatch):
    # Every step asks kernel_pays; once a shape is decided the answer is a
    # lookup, not a read of the environment (may_run) or a new decision.
    key = ("codes", "cuda:0", torch.bfloat16, (4096, 24576), True)
    monkeypatch.setitem(fused._choices, key, True)

    def refuse(*args):
        raise AssertionError("a decided choice read the environment or decided again")

    monkeypatch.setattr(fused, "may_run", refuse)
    assert fused.kernel_pays(key, torch.device("cuda"), refuse) is True


def test_a_new_choice_first_settles_the_pending_checks(monkeypatch):
    # Within decisions_wait_for, a choice not yet made first calls settle()
    # (the trainer's pending verdict on its rows); a choice made already
    # does not, and the gate is the block's alone.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "_choices", {("decided",): True})
    settled = []

    def prepare():
        return (lambda: True), (lambda: None), (lambda: None)

    with fused.decisions_wait_for(lambda: settled.append(1)):
        assert fused.kernel_pays(("decided",), torch.device("cpu"), prepare) is True
        assert settled == []
        assert fused.kernel_pays(("new",), torch.device("cpu"), prepare) is True
        assert settled == [1]
    fused.kernel_pays(("newer",), torch.device("cpu"), prepare)
    assert settled == [1]


def test_no_kernel_is_chosen_on_rows_a_pending_verdict_refuses(monkeypatch):
    # On a GPU the first steps may run beside the scan of X's values; a
    # choice made on NaN rows would find a kernel differing from torch's
    # operations, warn, and keep torch's for the process. The refusal comes
    # first, and nothing is chosen.
    import concurrent.futures

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "_choices", {})
    X = np.random.RandomState(0).randn(256, 6).astype(np.float32)
    X[3, 1] = np.nan
    trainer = Trainer(6, 12, "cpu", seed=0)
    trainer.initialize(X, np.random.RandomState(0), "mean")
    refused = concurrent.futures.Future()
    refused.set_exception(ValueError("Input X contains NaN"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="contains NaN") as caught:
            trainer.train(X, 1, TrainConfig(batch_size=32), np.random.RandomState(1),
                          verdict=refused)
    assert caught.value.__context__ is None
    assert fused.choices() == {}


def test_every_kernel_launch_makes_its_tensors_device_current():
    # Triton launches on the current CUDA device: a fit on cuda:1 with
    # cuda:0 current ran its kernels from the other GPU. Each launch is
    # guarded by _on(<its first tensor>.device).
    import inspect
    import re

    lines = inspect.getsource(fused).splitlines()
    launches = [i for i, line in enumerate(lines) if re.search(r"_kernels\(\)\.\w+\[", line)]
    assert len(launches) >= 7
    for i in launches:
        assert re.match(r"\s*with _on\(\w+\.device\):", lines[i - 1]), lines[i]


def test_the_launch_guard_is_the_cuda_device_or_nothing(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or "guard")
    assert fused._on(torch.device("cuda", 1)) == "guard"
    assert entered == [torch.device("cuda", 1)]
    with fused._on(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_fit_on_the_second_gpu_matches_one_on_the_first():
    from sparse_dict import SparseAutoencoderDictionary

    X = np.random.RandomState(0).standard_normal((4096, 64)).astype(np.float32)
    fits = [SparseAutoencoderDictionary(128, activation="topk", k=8, max_steps=60,
                                        device=device, random_state=0).fit(X)
            for device in ("cuda:0", "cuda:1")]
    assert torch.cuda.current_device() == 0
    np.testing.assert_allclose(fits[0].components_, fits[1].components_, atol=1e-4)
    np.testing.assert_allclose(fits[0].feature_frequencies_, fits[1].feature_frequencies_)
