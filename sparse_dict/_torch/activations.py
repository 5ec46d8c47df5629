"""Sparsity mechanisms: the one place that defines how codes are made sparse.

An :class:`Activation` turns the encoder's pre-activations into codes, says
how its sparsity term enters the loss, and owns any fitted state of its own
(a threshold). The training step in :mod:`sparse_dict._torch.model` is written
once for every activation and calls these hooks; a new mechanism is a new
subclass here, registered in :data:`ACTIVATIONS`, and nothing else.

Every hook works in place on (batch, n_components) buffers, because on a CPU
a fresh tensor of that size costs page faults comparable to a matrix product.
All values are in the trainer's scaled units (inputs at a mean squared
distance equal to their width from the decoder bias's starting point);
:meth:`Activation.export_state` says how each fitted tensor converts to the
caller's units.
"""

import math

import torch

__all__ = ["ACTIVATIONS", "Activation", "BatchTopK", "JumpReLU", "ReLU", "TopK", "make_activation"]


class Activation:
    """Base class of the sparsity mechanisms.

    Attributes
    ----------
    name : str
        The name users pass as ``activation``.
    penalty_name : str or None
        The estimator parameter that weighs this mechanism's sparsity term
        (``"l1_coef"``, ``"l0_coef"``), or None when sparsity is set by
        ``k`` and the loss is reconstruction only.
    state_names : tuple of str
        Names of the fitted tensors of shape (n_components,) this mechanism
        adds to the four every autoencoder has.
    uses_k : bool
        Whether ``k`` sets the sparsity (the top-k family). Such a mechanism
        has no penalty, its dead features lose every selection and need
        AuxK, and ``k`` is its natural number of atoms for optimal codes.
    min_default_steps : int
        The fewest training steps of the default budget. A penalised
        mechanism finds its L0 through the penalty and needs more steps
        than one whose L0 is set by ``k`` (measured: ReLU's L0 was still
        moving after 3000 steps where TopK had converged).
    state_defaults : dict of str to float
        For a state tensor added after folders were first saved with this
        mechanism: the value every feature takes when an older folder lacks
        it (one that leaves the codes unchanged).
    has_sparse_step : bool
        Whether the mechanism can give its training codes as a few (index,
        value) pairs per row (:meth:`select`), so that the training step can
        skip the dense products that only touch inactive codes.
    workspace_names : tuple of str
        (batch, n_components) buffers of its own that :meth:`forward_` needs,
        kept with the step's others (reused across steps, freed with them).
    forward_is_relu : bool
        Whether :meth:`forward_` is exactly ``pre.relu_()``, so that the
        one-pass codes kernel on a GPU
        (:func:`sparse_dict._torch.fused.codes_bits_count_`) may take it
        along with the mask and the firing counts.
    """

    name = None
    penalty_name = None
    state_names = ()
    uses_k = False
    min_default_steps = 3000
    state_defaults = {}
    has_sparse_step = False
    workspace_names = ()
    forward_is_relu = False
    # A resampled feature's encoder row, as a share of the live rows' mean
    # norm (see Trainer._resample).
    restart_encoder_share = 0.2

    def init_model(self, model):
        """Register this mechanism's parameters and buffers on ``model``."""

    def resample_(self, model, dead, pre):
        """Restart this mechanism's state of the resampled ``dead`` features.

        ``pre`` holds each one's new pre-activation on the input it was
        restarted on. Returns the tensors it changed: those with optimiser
        moments have them cleared at ``dead``, and with several processes
        all are sent from rank 0 with the new weights.
        """
        return ()

    # -------------------------------------------------------------- training
    def forward_(self, pre, buffers, model):
        """Turn pre-activations into codes, in place.

        Every mechanism's codes are the pre-activations where active and 0
        elsewhere, and active codes are positive: the derivative of a code
        with respect to its pre-activation is 1 where the code is positive,
        which the training step forms once, for every mechanism, from the
        codes (:func:`positive_mask`).

        Parameters
        ----------
        pre : torch.Tensor of shape (batch, n_components)
            Overwritten with the codes.
        buffers : dict of str to torch.Tensor of shape (batch, n_components)
            The step's reused buffers in ``pre``'s dtype: ``"mask"``, free
            until the step writes the mask, and one per name in
            :attr:`workspace_names`, the mechanism's own until the next step.
        model : SparseAutoencoder
        """
        raise NotImplementedError

    def select(self, pre, model):
        """The training codes as (index, value) pairs: the sparse step's forward.

        Only for mechanisms with ``has_sparse_step`` (no penalty, no
        parameters of their own, and codes that pass their pre-activation
        through where active).

        Parameters
        ----------
        pre : torch.Tensor of shape (batch, n_components)
            Left unchanged.
        model : SparseAutoencoder

        Returns
        -------
        index : torch.Tensor of int64, shape (batch, m)
            Candidate features of each row.
        values : torch.Tensor of shape (batch, m)
            Their pre-activations (the codes where ``keep``).
        keep : torch.Tensor of bool, shape (batch, m)
            Which candidates are active codes; exactly the codes that
            :meth:`forward_` would make.
        """
        raise NotImplementedError(f"{type(self).__name__} has no sparse training step.")

    def penalty_terms(self, model):
        """The sparsity term in closed form: ``code_sums @ weights / batch + l0_factor * l0``.

        Every mechanism's term is of this form (ReLU's weighted L1, JumpReLU's
        scaled L0, none for the top-k family), which lets one small kernel
        form it with the step's statistics
        (:func:`sparse_dict._torch.fused.penalty_stats_`).

        Returns
        -------
        weights : torch.Tensor of shape (n_components,) or None
            None: no term in the codes' values (and no gradient through them).
        l0_factor : float
        """
        return None, 0.0

    def penalty(self, code_sums, l0, model, coef, batch):
        """The sparsity term and its gradient with respect to the codes.

        Parameters
        ----------
        code_sums : torch.Tensor of shape (n_components,)
            Column sums of the codes over the batch.
        l0 : torch.Tensor
            Mean number of active codes per row.
        coef : float
            The weight of the term at this step.
        batch : int

        Returns
        -------
        value : torch.Tensor
            The term before ``coef``.
        code_bias : torch.Tensor of shape (n_components,) or None
            ``coef * d term / d code``, the same for every row (a bias in the
            product that forms the codes' gradient), or None when the term
            does not depend on the code values.
        """
        return penalty_from_terms(*self.penalty_terms(model), code_sums, l0, coef, batch)

    def parameter_gradients_(self, grad_codes, model, coef, batch):
        """Write ``.grad`` of this mechanism's own parameters.

        ``grad_codes`` is d loss / d codes before the mask is applied.
        """

    def after_step_(self, model, step):
        """Update non-trained state (a running threshold) after a step."""

    def settings_changed_(self, model):
        """Forget state fitted for other settings (``k``, a bandwidth).

        Called when training goes on with settings other than those the
        state was fitted with; trained parameters stay, as they are a start
        for the new settings too.
        """

    # ------------------------------------------------------------- inference
    def encode(self, pre, state):
        """Codes from pre-activations, batch-independent, for inference.

        ``state`` holds this mechanism's fitted tensors, in the same units as
        ``pre``.
        """
        raise NotImplementedError

    def encode_(self, pre, state):
        """:meth:`encode`'s codes written over ``pre``, which is returned.

        For inference into memory the caller owns (``transform``'s output):
        the same values as :meth:`encode`, without a second array of codes
        to copy from.
        """
        return pre.copy_(self.encode(pre, state))

    # ------------------------------------------------------------ fitted state
    def export_state(self, model):
        """This mechanism's fitted tensors, in scaled units (divide by the scale)."""
        return {}

    def load_state_(self, model, state):
        """Set this mechanism's fitted tensors (scaled units) on ``model``."""

    def describe(self):
        """The settings that define this mechanism, as a dict for configs."""
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class ReLU(Activation):
    """``f = ReLU(pre)`` with an L1 penalty on codes weighted by atom norms.

    The penalty is ``mean_b sum_i f_i ||W_dec[i]||`` (atoms are kept at unit
    norm, so this is the codes' L1 norm; the norm factor removes the
    incentive to shrink codes by growing atoms).
    """

    name = "relu"
    penalty_name = "l1_coef"
    min_default_steps = 8000
    forward_is_relu = True

    def forward_(self, pre, buffers, model):
        pre.relu_()

    def penalty_terms(self, model):
        return model.atom_norms(), 0.0

    def encode(self, pre, state):
        return torch.relu(pre)

    def encode_(self, pre, state):
        return pre.relu_()


class TopK(Activation):
    """Keep the ``k`` largest pre-activations of each row, then ReLU.

    Gao et al. (2024), "Scaling and evaluating sparse autoencoders". No
    sparsity coefficient: ``k`` sets L0 (at most ``k``; fewer when some of
    the largest pre-activations are negative).

    The fitted state ``selection_scale`` (one positive value per feature)
    weighs the pre-activations when the ``k`` largest are chosen; the codes
    themselves are the unweighted pre-activations. It is all ones for
    dictionaries trained here. It exists so that an SAE trained with atoms
    of any norm (SAELens' ``"topk"``) can be rescaled to unit-norm atoms
    exactly: rescaling atom ``i`` by ``1 / n_i`` multiplies code ``i`` by
    ``n_i``, and selecting on ``pre_i / n_i`` keeps the original choice.
    """

    name = "topk"
    uses_k = True
    has_sparse_step = True
    state_names = ("selection_scale",)
    # A feature competes for the top k: at a fifth of the live rows' norm
    # it loses every selection, even on the input it restarted on, and dies
    # again (none of 16 restarted features fired).
    restart_encoder_share = 1.0
    # Folders saved before selection_scale existed selected on pre itself.
    state_defaults = {"selection_scale": 1.0}

    def __init__(self, k):
        self.k = int(k)

    def _k(self, model):
        return min(self.k, model.n_components)

    def init_model(self, model):
        model.register_buffer("selection_scale", model.b_enc.new_ones(model.n_components))

    def resample_(self, model, dead, pre):
        # A restarted feature's atom has unit norm, as a trained one's: it is
        # chosen on its pre-activation as it is (an imported feature's scale
        # described its old atom's norm).
        with torch.no_grad():
            model.selection_scale[dead] = 1.0
        return (model.selection_scale,)

    def _weighted(self, model):
        """Whether the selection scale is not all ones (checked once per change).

        Training skips the weighting, a full pass over the batch, when it
        would change nothing; the answer is cached against the buffer's
        version counter, which every in-place write (loading) advances.
        """
        scale = model.selection_scale
        key = (id(scale), scale._version)
        if getattr(self, "_weighted_key", None) != key:
            self._weighted_key, self._weighted_value = key, not bool((scale == 1).all())
        return self._weighted_value

    def _row_selection(self, pre, model):
        if self._weighted(model):
            index = row_topk(pre * model.selection_scale.to(pre.dtype), self._k(model))[1]
            return pre.gather(1, index), index
        return row_topk(pre, self._k(model))

    def select(self, pre, model):
        values, index = self._row_selection(pre, model)
        return index, values, values > 0

    def forward_(self, pre, buffers, model):
        values, index = self._row_selection(pre, model)
        pre.zero_()
        pre.scatter_(1, index, values.relu_())

    def encode(self, pre, state):
        values, index = self._chosen(pre, state)
        return torch.zeros_like(pre).scatter_(1, index, values.relu_())

    def encode_(self, pre, state):
        values, index = self._chosen(pre, state)  # copies: pre may be cleared
        return pre.zero_().scatter_(1, index, values.relu_())

    def _chosen(self, pre, state):
        """The values each row keeps, and their columns."""
        k = min(self.k, pre.shape[1])
        scale = state.get("selection_scale")
        if scale is None or bool((scale == 1).all()):
            return row_topk(pre, k)
        index = row_topk(pre * scale, k)[1]
        return pre.gather(1, index), index

    def export_state(self, model):
        return {"selection_scale": model.selection_scale.detach().float()}

    def load_state_(self, model, state):
        scale = torch.as_tensor(state["selection_scale"], dtype=torch.float32)
        with torch.no_grad():
            model.selection_scale.copy_(scale)

    def describe(self):
        return {"name": self.name, "k": self.k}


def penalty_from_terms(weights, l0_factor, code_sums, l0, coef, batch):
    """The penalty and its codes' bias from :meth:`Activation.penalty_terms`' closed form.

    ``value = code_sums @ weights / batch + l0_factor * l0`` (each term only
    where it is there); ``code_bias = weights * (coef / batch)``, or None
    without weights. See :meth:`Activation.penalty`.
    """
    terms = []
    if weights is not None:
        terms.append(code_sums.dot(weights) / batch)
    if l0_factor:
        terms.append(l0 * l0_factor)
    value = sum(terms[1:], terms[0]) if terms else code_sums.new_zeros(())
    return value, None if weights is None else weights * (coef / batch)


def positive_mask(codes, mask):
    """``mask = (codes > 0)`` in ``codes``' dtype, for codes that are never negative.

    The sign of a non-negative value is that mask (``-0.0`` gives ``-0.0``,
    which masks alike). It is a same-dtype operation: on a GPU a comparison
    that writes bfloat16 runs as a slower converting kernel (an H200's
    profile of a bf16 step: 217 us for ``gt`` against 93 us for the ReLU
    itself, on a 4096 x 24576 batch).
    """
    torch.sign(codes, out=mask)


def _group_size(n_columns, k):
    """Columns per group for :func:`row_topk`, or 0 for a plain top-k."""
    # The cost is about one pass over the row, a top-k over n_columns / g
    # group maxima and one over k * g candidates: least near g = sqrt(n / k).
    g = 1 << max(0, int(round(math.log2(math.sqrt(n_columns / max(k, 1))))))
    if g < 4 or n_columns // g < 2 * k:
        return 0
    return g


def row_topk(pre, k):
    """The ``k`` largest values of each row of ``pre`` and their columns, unsorted.

    The same values as ``pre.topk(k, dim=1, sorted=False)``, several times
    faster on a CPU for ``k`` much smaller than the row: a top-k over a row
    of ``n`` values costs a few nanoseconds per value, where a maximum costs
    a fraction of one. The row's columns are split into ``n / g`` groups
    (columns ``j``, ``j + n/g``, ...: a maximum over the leading axis of a
    view, vectorised), the ``k`` groups with the largest maxima are kept,
    and the top ``k`` of their ``k * g`` members is the answer. It is
    exact: the k-th largest value of the row is at least the k-th largest
    group maximum ``t`` (the ``k`` best group maxima are ``k`` distinct
    values of at least ``t``), so every value of the top ``k`` lies in a
    group whose maximum is at least ``t``; with ties at ``t`` another group
    may hold an equal value, which changes the columns but not the values.
    Columns past the last whole group are always candidates.

    Parameters
    ----------
    pre : torch.Tensor of shape (batch, n)
    k : int
        At most ``n``.

    Returns
    -------
    values : torch.Tensor of shape (batch, k)
    index : torch.Tensor of int64, shape (batch, k)

    Examples
    --------
    >>> import torch
    >>> pre = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    >>> values, index = row_topk(pre, 8)
    >>> torch.equal(values.sort(1).values, pre.topk(8, dim=1).values.sort(1).values)
    True
    >>> torch.equal(pre.gather(1, index), values)
    True
    """
    batch, n = pre.shape
    g = _group_size(n, k)
    if g == 0:
        return pre.topk(k, dim=1, sorted=False)
    n_groups = n // g
    covered = n_groups * g
    group_max = pre[:, :covered].reshape(batch, g, n_groups).amax(dim=1)
    groups = group_max.topk(k, dim=1, sorted=False).indices
    offsets = torch.arange(0, covered, n_groups, device=pre.device)
    columns = (groups.unsqueeze(2) + offsets).reshape(batch, k * g)
    if covered < n:
        tail = torch.arange(covered, n, device=pre.device).expand(batch, n - covered)
        columns = torch.cat([columns, tail], dim=1)
    candidates = pre.gather(1, columns)
    values, chosen = candidates.topk(k, dim=1, sorted=False)
    return values, columns.gather(1, chosen)


def _batch_candidates(pre, n_keep, per_row, need_candidates=True):
    """The ``n_keep``-th largest value of ``pre`` and each row's candidates.

    A flat top-k over the whole (batch, n_components) array costs about two
    matrix products on a CPU. Instead each row offers its ``per_row``
    largest values as candidates and the answer is taken among those; it is
    exact unless some row has all its candidates above the result (that row
    may hold more), in which case the flat search runs and each row offers
    as many candidates as it holds values at or above the result.

    Returns
    -------
    kth : torch.Tensor
        The ``n_keep``-th largest value (float32 scalar).
    values, index : torch.Tensor of shape (batch, m)
        Each row's candidates: every positive value of the row at or above
        ``kth`` is among them (with ``need_candidates``; otherwise only
        ``kth`` is exact).
    """
    per_row = min(per_row, pre.shape[1])
    values, index = row_topk(pre, per_row)
    flat = values.reshape(-1).float()
    n_keep = min(n_keep, flat.numel())
    kth = flat.kthvalue(flat.numel() - n_keep + 1).values
    if per_row < pre.shape[1] and bool((values.amin(dim=1) > kth).any()):
        flat = pre.reshape(-1).float()
        kth = flat.kthvalue(flat.numel() - n_keep + 1).values
        if need_candidates:
            # Only positive values are ever kept: a non-positive kth must not
            # make every row offer all its values.
            kept = (pre >= kth.to(pre.dtype)) & (pre > 0)
            most = int(kept.sum(dim=1).max())
            values, index = row_topk(pre, max(1, min(most, pre.shape[1])))
    return kth, values, index


def _batch_kth_largest(pre, n_keep, per_row):
    """The ``n_keep``-th largest value of ``pre`` (a 2-D tensor), exactly."""
    return _batch_candidates(pre, n_keep, per_row, need_candidates=False)[0]


class BatchTopK(TopK):
    """Keep the ``k * batch`` largest pre-activations of the whole batch.

    Bussmann et al. (2024). Rows may use more or fewer than ``k`` codes, the
    mean is ``k``. A row's training code depends on its batch, so inference
    uses one threshold ``theta`` instead: ``f = pre * (pre > theta)``.
    ``theta`` is a running average (in float64) of the smallest kept value
    of each training batch, and the estimator re-estimates it on the final
    model after fit (:meth:`calibrate_`).
    """

    name = "batchtopk"
    state_names = ("threshold",)
    state_defaults = {}
    # Each row offers this many times k candidates to the batch selection.
    _CANDIDATES_PER_K = 4

    def init_model(self, model):
        model.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        model.register_buffer("threshold_weight", torch.zeros((), dtype=torch.float64))
        self._last_kth = None

    def select(self, pre, model):
        # Without the ReLU pass of forward_: a negative value is never kept,
        # and the kept set is the same (see forward_).
        k = self._k(model)
        kth, values, index = _batch_candidates(pre, k * pre.shape[0], self._CANDIDATES_PER_K * k)
        self._last_kth = kth.clamp_min(0)
        keep = (values >= kth.to(values.dtype)) & (values > 0)
        return index, values, keep

    def forward_(self, pre, buffers, model):
        pre.relu_()
        k = self._k(model)
        kth = _batch_kth_largest(pre, k * pre.shape[0], self._CANDIDATES_PER_K * k)
        self._last_kth = kth
        # Ties at the threshold are kept; with continuous values they are
        # rare. Codes are never negative after the ReLU, so a threshold of
        # 0 keeps zeros as zeros.
        mask = buffers["mask"]
        torch.ge(pre, kth.to(pre.dtype), out=mask)
        pre.mul_(mask)

    def after_step_(self, model, step):
        # A bias-corrected average with a half-life of about 70 steps early
        # on that lengthens to about 700: early values come from a model far
        # from its final state and are soon forgotten.
        if self._last_kth is None:
            return
        beta = min(0.999, 1.0 - 1.0 / (1.0 + 0.1 * step))
        with torch.no_grad():
            model.threshold_weight.mul_(beta).add_(1.0 - beta)
            model.threshold.mul_(beta).add_((1.0 - beta) * self._last_kth.double())
        self._last_kth = None

    @torch.no_grad()
    def calibrate_(self, model, pre):
        """Set the threshold from the pre-activations of a sample of rows.

        The threshold becomes the value that keeps ``k`` codes per row on
        average over the sample, which is what the training selection does
        batch by batch, measured on the final model.
        """
        pre = torch.relu(pre.float())
        k = self._k(model)
        n_keep = k * pre.shape[0]
        kth = float(_batch_kth_largest(pre, n_keep, self._CANDIDATES_PER_K * k))
        # Halfway to the next value down: inference keeps what lies above the
        # threshold, so at the kept value itself the sample kept one code
        # too few (transform_l0_ read k - 1/n), and whether the boundary
        # code stayed in transform turned on the threshold's rounding to
        # float32 in X's units.
        following = (float(_batch_kth_largest(pre, n_keep + 1, self._CANDIDATES_PER_K * k))
                     if n_keep < pre.numel() else 0.0)
        model.threshold.fill_((kth + following) / 2)
        model.threshold_weight.fill_(1.0)

    def current_threshold(self, model):
        weight = float(model.threshold_weight)
        return float(model.threshold) / weight if weight > 0 else 0.0

    def encode(self, pre, state):
        theta = state["threshold"]
        return pre * (pre > theta)

    def encode_(self, pre, state):
        return pre.mul_(pre > state["threshold"])

    def export_state(self, model):
        theta = self.current_threshold(model)
        return {"threshold": torch.full((model.n_components,), theta, dtype=torch.float32)}

    def load_state_(self, model, state):
        model.threshold.fill_(float(torch.as_tensor(state["threshold"]).double().max()))
        model.threshold_weight.fill_(1.0)

    def resample_(self, model, dead, pre):
        # The threshold is one for all features, a running average of the
        # batches' selections: a restarted feature has no state of its own.
        return ()

    def settings_changed_(self, model):
        # The threshold keeps the old k's codes per row; its average has a
        # memory of about 1,000 steps late in a run, so kept, it would go on
        # selecting for the old k through short partial_fit calls. With no
        # weight, the average restarts from the new k's first step.
        with torch.no_grad():
            model.threshold.zero_()
            model.threshold_weight.zero_()


class JumpReLU(Activation):
    """``f = pre * H(pre - theta)`` with a learned threshold per feature.

    Rajamanoharan et al. (2024). The loss is reconstruction plus
    ``l0_coef * n_features * L0``: with inputs scaled to a mean squared
    distance of ``n_features`` from the decoder bias's starting point, a
    feature is worth firing on a row when it lowers the squared error by
    more than ``l0_coef`` times that distance, whatever their width. The
    step function has no useful gradient, so the threshold learns through
    straight-through estimators with a rectangle kernel of width
    ``bandwidth``: ``d f / d theta = -(theta / bandwidth) * rect((pre -
    theta) / bandwidth)`` and ``d H / d theta = -(1 / bandwidth) *
    rect(...)``; the codes pass the gradient to ``pre`` where they are
    active. ``theta`` is stored as its logarithm so it stays
    positive.

    ``bandwidth`` is in the trainer's scaled units (see
    :class:`~sparse_dict._torch.Trainer`), where active codes are of order
    one.
    """

    name = "jumprelu"
    penalty_name = "l0_coef"
    workspace_names = ("window",)
    min_default_steps = 8000
    state_names = ("threshold",)

    def __init__(self, bandwidth=0.05, initial_threshold=1.0):
        self.bandwidth = float(bandwidth)
        self.initial_threshold = float(initial_threshold)

    def init_model(self, model):
        model.log_threshold = torch.nn.Parameter(
            model.b_enc.new_full((model.n_components,), math.log(self.initial_threshold))
        )
        self._window = None

    def forward_(self, pre, buffers, model):
        theta = model.log_threshold.exp().to(pre.dtype)
        # pre - theta, then in place the rectangle window
        # rect((pre - theta) / bandwidth) that the threshold's gradient needs.
        window, mask = buffers["window"], buffers["mask"]
        torch.sub(pre, theta, out=window)
        torch.gt(window, 0, out=mask)
        pre.mul_(mask)
        window.abs_()
        torch.lt(window, 0.5 * self.bandwidth, out=window)
        self._window = window

    def penalty_terms(self, model):
        return None, float(model.n_features)

    def resample_(self, model, dead, pre):
        # The threshold a feature had when it died is often above anything
        # its new encoder row gives (a fifth of the live rows' norm): it
        # would stay dead, its threshold out of the gradient's window. Half
        # the new pre-activation on the input it restarts on lets it fire
        # there and on inputs like it; the L0 term then moves it as any.
        theta = (0.5 * pre.float()).clamp_min(1e-6)
        with torch.no_grad():
            model.log_threshold[dead] = theta.log().to(model.log_threshold.dtype)
        return (model.log_threshold,)

    def parameter_gradients_(self, grad_codes, model, coef, batch):
        theta = model.log_threshold.detach().exp()
        window = self._window
        in_window = window.sum(dim=0, dtype=torch.float32)
        through_codes = (grad_codes * window).sum(dim=0, dtype=torch.float32)
        weight = coef * model.n_features / (batch * self.bandwidth)
        d_theta = -(theta / self.bandwidth) * through_codes - weight * in_window
        model.log_threshold.grad = d_theta * theta
        self._window = None

    def encode(self, pre, state):
        return pre * (pre > state["threshold"])

    def encode_(self, pre, state):
        return pre.mul_(pre > state["threshold"])

    def export_state(self, model):
        return {"threshold": model.log_threshold.detach().exp().float()}

    def load_state_(self, model, state):
        # Thresholds of 0 (a SAELens file's, or a BatchTopK's written as
        # JumpReLU) start at half the bandwidth: log(1e-12) is -27.6, and Adam
        # moves log(theta) by about the learning rate a step, so such a
        # feature would train thousands of steps with no L0 pressure. Codes
        # below half the bandwidth (scaled units, where active codes are of
        # order one) are all this cuts. Positive thresholds, which training
        # gives, are kept as they are.
        theta = torch.as_tensor(state["threshold"], dtype=torch.float32)
        theta = torch.where(theta > 0, theta, torch.full_like(theta, 0.5 * self.bandwidth))
        with torch.no_grad():
            model.log_threshold.copy_(theta.log())

    def describe(self):
        return {"name": self.name, "bandwidth": self.bandwidth}


ACTIVATIONS = {cls.name: cls for cls in (ReLU, TopK, BatchTopK, JumpReLU)}


def make_activation(name, *, k=None, bandwidth=None):
    """The activation called ``name``, with the settings it uses.

    Parameters
    ----------
    name : {"relu", "topk", "batchtopk", "jumprelu"}
    k : int, optional
        Codes per row, for ``"topk"`` and ``"batchtopk"`` (required there).
    bandwidth : float, optional
        The straight-through kernel's width, for ``"jumprelu"``.

    Examples
    --------
    >>> make_activation("topk", k=8)
    TopK(k=8)
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    cls = ACTIVATIONS[name]
    if issubclass(cls, TopK):
        if k is None:
            raise ValueError(f"activation={name!r} needs k, the number of codes per row.")
        return cls(k)
    if cls is JumpReLU:
        return cls() if bandwidth is None else cls(bandwidth)
    return cls()
