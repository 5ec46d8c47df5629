"""The sparse autoencoder module and its hand-fused training gradients."""

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dict._torch import fused
from sparse_dict._torch.activations import ReLU, penalty_from_terms, positive_mask
from sparse_dict._torch.matmul import mm

# The fitted tensors every autoencoder has, in the order configs list them;
# an activation adds its own (``Activation.state_names``).
BASE_TENSORS = ("components", "encoder_weights", "encoder_bias", "decoder_bias")
# The fitted tensors that do not change with the input's units; all others
# (biases, and every activation's thresholds) are in input units. TopK's
# selection_scale weighs pre-activations against each other: a common factor
# changes nothing, so it is left as it is.
UNSCALED_TENSORS = ("components", "encoder_weights", "selection_scale")
# The statistics of every training step, in the columns of the history.
STAT_NAMES = ("loss", "mse", "l1", "l0", "auxk")


# When the sparse step is faster than the dense one (sparse_step="auto"):
# see sparse_step_pays.
_SPARSE_MAX_K_RATIO = 1 / 16
_SPARSE_MIN_COMPONENTS = 512


def sparse_step_pays(k, n_components, device):
    """Whether the top-k family's sparse training step beats the dense one.

    The dense step costs five (batch, d, n_components) products; the sparse
    one costs one, a top-k selection (a pass over the pre-activations) and
    about ``batch * k * d`` gathered multiply-adds, which run far below a
    matrix product's rate. Measured on a 2-core x86 CPU (Intel Xeon, one
    thread, d=512, batch 1024, N from 512 to 4096 and k from 8 to 256):
    the sparse step was faster than the dense one (1.1 to 8 times) wherever
    ``k`` was at most a sixteenth of ``N``, and slower (0.7 to 0.8 times)
    at ``k = N / 8`` for N of 512 and 2048; at d=512, N=16384, k=32 and
    batch 4096 it was 4.8 times faster. Below 512 atoms it was not measured.
    On a GPU the dense products are fast and the gathers comparatively
    slow, and this has not been measured: the dense step is kept there.

    Examples
    --------
    >>> import torch
    >>> sparse_step_pays(32, 16384, torch.device("cpu"))
    True
    >>> sparse_step_pays(256, 1024, torch.device("cpu"))
    False
    """
    return (device.type == "cpu" and n_components >= _SPARSE_MIN_COMPONENTS
            and k <= _SPARSE_MAX_K_RATIO * n_components)


def _float32_dense(t):
    """``t`` as a contiguous float32 tensor, in one pass (a bf16 product's column slice)."""
    return t.contiguous() if t.dtype == torch.float32 else t.to(
        torch.float32, memory_format=torch.contiguous_format)


def _uses_kernel(kernels, name, device, pays, forced=True):
    """Whether the step takes GPU kernel ``name``, and how: as ``kernels`` says, or where it pays.

    ``kernels[name]`` is True, False or "auto" (the default): where a
    kernel may run (:func:`sparse_dict._torch.fused.may_run`: a CUDA
    device, or Triton's interpreter in the tests, so that they go through
    the first step's decision too), ``pays()`` (a measured choice, made
    once per shape by :func:`sparse_dict._torch.fused.kernel_pays`, which
    may be a launch to run the kernel with); elsewhere never. A kernel
    forced on gives ``forced`` (its default launch, for a kernel that has
    launches). False means the plain operations.
    """
    use = "auto" if kernels is None else kernels.get(name, "auto")
    if use == "auto":
        # On a GPU, pays() alone: its decided choice is a lookup.
        return (device.type == "cuda" or fused.may_run(device)) and pays()
    return forced if use else False


# The weight each of SparseAutoencoder.operand_views' buffers is made from.
_OPERAND_OF = {"W_enc": "W_enc", "W_dec": "W_dec", "W_dec_norms": "W_dec", "b_enc": "b_enc"}
# The operand each of the workspace's extra buffers holds (see _extra).
_EXTRA_OPERAND = {"norms": "W_dec_norms", "bias": "b_enc"}


def fitted_tensor_names(activation):
    """Names of every fitted tensor of an autoencoder with ``activation``.

    The one list that exporting, saving, loading and pickling iterate over.

    Examples
    --------
    >>> from sparse_dict._torch.activations import JumpReLU
    >>> fitted_tensor_names(JumpReLU())
    ('components', 'encoder_weights', 'encoder_bias', 'decoder_bias', 'threshold')
    """
    return BASE_TENSORS + tuple(activation.state_names)


class SparseAutoencoder(nn.Module):
    """A one-layer sparse autoencoder with a bias subtracted before encoding.

    ``f(x) = act((x - b_dec) @ W_enc.T + b_enc)`` and
    ``x_hat = f(x) @ W_dec + b_dec``, where ``act`` is a sparsity mechanism
    from :mod:`sparse_dict._torch.activations` (ReLU by default). The rows of
    ``W_dec`` are the dictionary atoms; the trainer keeps them at unit norm.

    Parameters
    ----------
    n_features : int
        Width ``d`` of the input.
    n_components : int
        Number ``N`` of dictionary atoms (features).
    activation : Activation, optional
        The sparsity mechanism; ``ReLU()`` when None.
    generator : torch.Generator, optional
        Source of randomness for the initial atoms, for repeatable fits; on
        ``device``.
    device : torch.device, optional
        Where the parameters are made (and the initial atoms drawn: on a
        GPU, drawing them on the host and copying them costs more than a
        short fit's training).
    initialize : bool, default=True
        Draw the initial atoms; False leaves the parameters uninitialised,
        for a model whose state is loaded next.
    atoms : array-like of shape (n_components, n_features), optional
        The initial atoms, instead of random ones, each row scaled to unit
        norm here (rows must be finite and non-zero, which the caller
        checks).

    Examples
    --------
    >>> import torch
    >>> sae = SparseAutoencoder(8, 32, generator=torch.Generator().manual_seed(0))
    >>> codes = sae.encode(torch.randn(5, 8))
    >>> tuple(codes.shape), bool((codes >= 0).all())
    ((5, 32), True)
    """

    def __init__(self, n_features, n_components, activation=None, generator=None, device=None,
                 initialize=True, atoms=None):
        super().__init__()
        self.activation = ReLU() if activation is None else activation
        shape = (n_components, n_features)
        if atoms is not None:
            atoms = torch.as_tensor(atoms, dtype=torch.float64, device=device)
            if tuple(atoms.shape) != shape:
                raise ValueError(f"atoms have shape {tuple(atoms.shape)}, not {shape}.")
            # Each row over its largest entry first: neither tiny nor huge
            # rows under- or overflow when squared for their norm.
            atoms = atoms / atoms.abs().amax(dim=1, keepdim=True)
            # Contiguous whatever the caller's layout (a scikit-learn
            # dictionary's components_ can be Fortran-ordered): torch's fused
            # Adam on the CPU (2.13) updates a parameter of other strides
            # wrongly, and such a start diverged.
            atoms = (atoms / atoms.norm(dim=1, keepdim=True)).float().contiguous()
        elif initialize:
            atoms = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            atoms /= atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            atoms = torch.empty(shape, device=device, dtype=torch.float32)
        self.W_dec = nn.Parameter(atoms)
        # The encoder starts as the decoder's transpose: each feature first
        # responds to its own atom's direction, which avoids a long phase of
        # encoder and decoder searching for each other.
        self.W_enc = nn.Parameter(atoms.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_components, device=device, dtype=torch.float32))
        self.b_dec = nn.Parameter(torch.zeros(n_features, device=device, dtype=torch.float32))
        self.activation.init_model(self)
        # Weight gradients left in the products' dtype for an update that
        # reads them so (see loss_and_gradients' low_grads), and which
        # weights the step's operand buffers hold (see operands_written_).
        # Both are cleared in place on the step's path: setting an attribute
        # of a Module costs a few microseconds, which a small step notices.
        self.low_grads = {}
        self._operands_current = {}
        # Whether the last step added b_enc in the encoder product's
        # epilogue, from a copy of it that an update may then write.
        self._step_flags = {"bias_in_epilogue": False}
        # An activation registers its own state on the CPU.
        self.to(atoms.device)

    @property
    def n_features(self):
        return self.W_dec.shape[1]

    @property
    def n_components(self):
        return self.W_dec.shape[0]

    def pre_activations(self, x):
        """The encoder's output before the sparsity mechanism."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    def encode(self, x):
        """Non-negative codes of the rows of ``x``, independent of the batch."""
        state = {k: v.to(x.device) for k, v in self.activation.export_state(self).items()}
        return self.activation.encode(self.pre_activations(x), state)

    def decode(self, codes):
        """Reconstruction of the inputs from their codes."""
        return torch.addmm(self.b_dec, codes, self.W_dec)

    def forward(self, x):
        codes = self.encode(x)
        return self.decode(codes), codes

    def fitted_tensors(self):
        """Every fitted tensor by its exported name, in scaled units."""
        tensors = {
            "components": self.W_dec, "encoder_weights": self.W_enc,
            "encoder_bias": self.b_enc, "decoder_bias": self.b_dec,
        }
        tensors.update(self.activation.export_state(self))
        return {k: v.detach() for k, v in tensors.items()}

    @torch.no_grad()
    def load_fitted_tensors_(self, tensors):
        """Set every fitted tensor from ``tensors`` (scaled units)."""
        self.operands_stale_()
        for name, param in zip(BASE_TENSORS, (self.W_dec, self.W_enc, self.b_enc, self.b_dec)):
            param.copy_(torch.as_tensor(tensors[name], dtype=torch.float32))
        extra = {k: tensors[k] for k in self.activation.state_names}
        if extra:
            self.activation.load_state_(self, extra)

    @torch.no_grad()
    def normalize_atoms_(self):
        """Rescale every atom (row of ``W_dec``) to unit norm, in place."""
        self.operands_stale_()
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _workspace(self, batch, dtype, device, wide=("codes", "grad", "mask")):
        """Reusable buffers for the training step.

        On the CPU a fresh (batch, n_components) tensor is a fresh ``mmap``:
        allocating several per step costs page faults comparable to a matrix
        product. Buffers sized for the largest batch seen are reused; a
        smaller batch takes a leading slice, which is contiguous. The two
        (batch, n_features + padding) buffers ``xc`` and ``gx`` carry a
        column of ones, and the two (n_components, n_features + padding)
        buffers ``enc`` and ``dec`` a column for a bias: a matrix product of
        one with the other adds the bias (or returns column sums) at no
        extra pass over a (batch, n_components) array. ``err`` holds the
        float32 residual. Of the (batch, n_components) buffers only those in
        ``wide`` are made.
        """
        ws = getattr(self, "_ws", None)
        if (
            ws is None
            or ws["xc"].shape[0] < batch
            or ws["xc"].dtype != dtype
            or ws["xc"].device != device
        ):
            # One more column than the features, rounded up to a multiple of
            # 16: BLAS kernels lose about 40% on an odd width such as 513.
            d = self.n_features
            width = -(-(d + 1) // 16) * 16
            ws = {}
            for k in ("xc", "gx"):
                ws[k] = torch.zeros(batch, width, dtype=dtype, device=device)
                ws[k][:, d] = 1.0
            for k in ("enc", "dec"):
                ws[k] = torch.zeros(self.n_components, width, dtype=dtype, device=device)
            ws["err"] = torch.empty(batch, d, dtype=torch.float32, device=device)
            self._ws = ws
            self.operands_stale_()
        for k in wide:
            if k not in ws:
                ws[k] = torch.empty(ws["xc"].shape[0], self.n_components, dtype=dtype,
                                    device=device)
        return {k: v if k in ("enc", "dec") else v[:batch] for k, v in ws.items()}

    def release_workspace(self):
        """Free the training buffers (after training, before pickling)."""
        self._ws = None
        self.operands_stale_()
        self.low_grads.clear()

    def operand_views(self):
        """The step's copies of the weight matrices, for an update to write.

        The products read ``W_enc`` and ``W_dec`` from workspace buffers in
        their own dtype (bfloat16 under autocast), next to a column for a
        bias; each step copies the weights in. An update that writes the new
        weights into these views in the same pass (the fused update's
        ``low``) and then calls :meth:`operands_written_` spares the next
        step both copies: two passes over each weight matrix a step.

        The update may also write the atoms' norms (``"W_dec_norms"``),
        which the ReLU penalty reads every step (:meth:`atom_norms`): a pass
        over ``W_dec`` saved; and, where the last step added ``b_enc`` in
        the encoder product's epilogue, its copy in the products' dtype
        (``"b_enc"``), a launch saved.

        Returns
        -------
        dict
            ``{"W_enc": view, "W_dec": view}`` of shape (n_components,
            n_features), ``"W_dec_norms"`` and maybe ``"b_enc"`` of shape
            (n_components,); empty before the first step or after
            :meth:`release_workspace`.
        """
        ws = getattr(self, "_ws", None)
        if ws is None:
            return {}
        d = self.n_features
        views = {"W_enc": ws["enc"][:, :d], "W_dec": ws["dec"][:, :d],
                 "W_dec_norms": self._extra("norms", (self.n_components,), torch.float32)}
        if self._step_flags["bias_in_epilogue"]:
            views["b_enc"] = self._extra("bias", (self.n_components,), ws["enc"].dtype)
        return views

    def atom_norms(self):
        """The norm of each atom (row of ``W_dec``), as the last update wrote it when it did."""
        if self._operand_current("W_dec_norms"):
            return self._ws["norms"]
        return self.W_dec.detach().norm(dim=1)

    def operands_written_(self, names):
        """Record that the views of :meth:`operand_views` hold these weights now.

        Whoever changes a weight in any other way afterwards must call
        :meth:`operands_stale_` (this class's own methods that write
        weights do, and so does the trainer when its plain update,
        resampling or a new training call may have changed them): torch's
        version counts cannot be relied on for this, as its fused Adam
        leaves them unchanged. The record is also dropped when the weight
        is no longer the same tensor or its version count moved.
        """
        for name in names:
            param = getattr(self, _OPERAND_OF[name])
            self._operands_current[name] = (param, param._version)

    def operands_stale_(self):
        """Forget :meth:`operands_written_`'s record: the next step copies the weights."""
        self._operands_current.clear()

    def _operand_current(self, name):
        record = self._operands_current.get(name)
        param = getattr(self, _OPERAND_OF[name])
        return record is not None and record[0] is param and record[1] == param._version

    def uses_sparse_step(self, sparse_step="auto", autocast_dtype=None, device=None):
        """Whether a training step takes the sparse path (see :func:`sparse_step_pays`).

        Parameters
        ----------
        sparse_step : bool or "auto"
            ``True`` forces the sparse path (an error for an activation
            without one), ``False`` the dense one.
        autocast_dtype : torch.dtype, optional
        device : torch.device, optional
            Where the step runs; the parameters' device when None.
        """
        act = self.activation
        if isinstance(sparse_step, str):
            if sparse_step != "auto":
                raise ValueError(
                    f"sparse_step must be True, False or 'auto', not {sparse_step!r}.")
        elif sparse_step:
            if not act.has_sparse_step:
                raise ValueError(
                    f"sparse_step=True needs an activation with a sparse training step "
                    f"(topk or batchtopk), not {act.name!r}.")
            return True
        else:
            return False
        device = self.W_enc.device if device is None else torch.device(device)
        return bool(
            act.has_sparse_step and autocast_dtype in (None, torch.float32)
            and sparse_step_pays(act.k, self.n_components, device)
        )

    @torch.no_grad()
    def loss_and_gradients(self, x, coef, autocast_dtype=None, dead=None, auxk_coef=0.0, k_aux=0,
                           sparse_step="auto", kernels=None, residual_power=None,
                           low_grads=False):
        """Loss of a batch and its gradients, written into each ``.grad``.

        The loss is ``mean_b ||x_b - x_hat_b||^2 + coef * penalty`` (the
        activation's sparsity term: L1 for ReLU, L0 for JumpReLU, none for
        the top-k family). The gradients also hold the AuxK term's, times
        ``auxk_coef``, when ``dead`` is given; the term is reported apart and
        left out of the loss, which is the objective the dictionary is
        judged by: the term trains only dead features, and its share of the
        sum would move with the number of them. The
        backward pass is written out by hand instead of through autograd: it
        works in place in reused buffers and folds biases and a per-feature
        penalty gradient into the matrix products, which removes several
        full passes over the (batch, n_components) activations, so the five
        matrix products are nearly the whole cost, as the performance model
        assumes. Every activation shares this step through its hooks; the
        tests check each against autograd. The products go through
        :func:`sparse_dict._torch.matmul.mm`, the faster of torch's and
        numpy's BLAS on this CPU.

        For the top-k family a sparse step is also available (``sparse_step``):
        only the encoder's product is dense, and the decoder's product and
        every gradient are formed from the few active codes of each row
        (:meth:`_sparse_gradients_`): about ``2 * batch * d * N`` operations
        instead of ``10 * batch * d * N``.

        The L1 term's gradient with respect to ``W_dec`` is parallel to each
        atom, and the trainer projects the parallel component out (the atoms
        are constrained to unit norm), so it is not computed here.

        Parameters
        ----------
        x : torch.Tensor of shape (batch, n_features)
        coef : float
            Weight of the activation's sparsity term (ignored by top-k).
        autocast_dtype : torch.dtype, optional
            Run the matrix products in this dtype (``torch.bfloat16`` on a
            GPU); the gradients are returned in float32. The sparse step
            always works in float32.
        dead : torch.Tensor of int64, optional
            Indices of the dead features, for AuxK.
        auxk_coef : float
            Weight of the AuxK term.
        k_aux : int
            Dead features each row may use in the AuxK reconstruction.
        residual_power : torch.Tensor of shape (), optional
            Mean squared norm of the residual that normalises the AuxK term
            (see :meth:`_auxk_gradients_`); this batch's mean squared error
            when None. The trainer passes the previous step's, which is the
            same on every rank of a data-parallel run.
        sparse_step : bool or "auto"
            Take the sparse path (``True``, top-k family only), the dense one
            (``False``), or the faster for this shape and device
            (``"auto"``, see :func:`sparse_step_pays`). Both give the same
            loss and gradients up to rounding.
        kernels : dict, optional
            For each of the dense step's GPU kernels, True (use it), False
            (torch's operations) or "auto" (the faster, measured on the first
            step; the default for any left out): ``"codes"``, the mask and
            firing counts in one pass (:meth:`_codes_mask_count_`, the same
            values either way); ``"residual"``, the residual and its sums in
            one pass (:meth:`_residual_`); ``"product"``, ReLU's bias and
            ReLU in the encoder product's epilogue (:meth:`_pre_activations_`);
            ``"stats"``, the statistics and penalty bias in one small kernel
            (:meth:`_penalty_stats_`); ``"centre"``, the centred rows in
            one pass (:meth:`_centre_`, the same values either way). The
            residual, product and statistics kernels give the same values
            up to rounding (the order of sums' additions).
        low_grads : bool
            Leave the two weight matrices' gradients in the products' dtype
            (bfloat16 under autocast), in ``self.low_grads`` by name, with
            their ``.grad`` None, for an update that reads them so (the
            fused one): converting each to float32 is a pass over it that
            the update's own read makes needless. Only on the dense path
            without AuxK (which adds to ``.grad``); otherwise, or in float32,
            every ``.grad`` is written as usual. :meth:`grads_to_float32_`
            turns them into ``.grad``.

        Returns
        -------
        stats : torch.Tensor of shape (5,)
            Loss (without AuxK), mean squared error, L1 of the codes, L0 and
            the AuxK term (before its coefficient), left on the device so
            that no step waits for a host transfer.
        fired : torch.Tensor of shape (n_components,)
            How many rows of the batch fired each feature (as floats).
        """
        use_aux = dead is not None and dead.numel() > 0 and auxk_coef > 0 and k_aux > 0
        sparse = self.uses_sparse_step(sparse_step, autocast_dtype, x.device)
        cdtype = torch.float32 if sparse else (autocast_dtype or torch.float32)
        batch, d = x.shape
        ws = self._workspace(batch, cdtype, x.device, ("codes",) if sparse else
                             ("codes", "grad", "mask") + self.activation.workspace_names)
        xc_ones, enc = ws["xc"], ws["enc"]
        xc = xc_ones[:, :d]
        self._centre_(x, xc, kernels)
        if not self._operand_current("W_enc"):
            enc[:, :d] = self.W_enc
        # ReLU's codes straight from the product where that pays; AuxK reads
        # the dead features' pre-activations, which the ReLU would lose.
        relu = not (sparse or use_aux) and self.activation.forward_is_relu
        pre, relu_done = self._pre_activations_(ws, d, relu, kernels)
        pre_dead = pre[:, dead].float() if use_aux else None
        self.low_grads.clear()
        if sparse:
            mse, l1, l0, fired, err = self._sparse_gradients_(pre, x, xc)
            stats = torch.stack([mse, mse, l1, l0, mse.new_zeros(())])
        else:
            stats, fired, err = self._dense_gradients_(
                pre, x, ws, coef, kernels, low_grads=low_grads and not use_aux,
                relu_done=relu_done)

        if use_aux:
            power = stats[1] if residual_power is None else residual_power
            stats[4] = self._auxk_gradients_(pre_dead, dead, err, xc, auxk_coef, k_aux, batch,
                                             power)
        return stats, fired

    def _centre_(self, x, xc, kernels=None):
        """``xc = x - b_dec`` in the products' dtype (``ws["xc"]``'s first columns).

        The plain way is torch's subtraction; on a GPU one Triton kernel
        (:func:`sparse_dict._torch.fused.centre_`), where the first step
        measures it faster (:func:`sparse_dict._torch.fused.centre_pays`,
        ``kernels["centre"]``): the same values either way.
        """
        def plain():
            return torch.sub(x, self.b_dec, out=xc)

        if (x.dtype == torch.float32 and x.stride(1) == 1
                and _uses_kernel(kernels, "centre", x.device,
                                 lambda: fused.centre_pays(x, self.b_dec, xc, plain))):
            fused.centre_(x, self.b_dec, xc)
        else:
            plain()

    def _pre_activations_(self, ws, d, relu, kernels=None):
        """``(x - b_dec) @ W_enc.T + b_enc`` into ``ws["codes"]``; with ``relu``, maybe its ReLU.

        The plain way carries the bias through ``xc``'s column of ones and
        ``enc``'s bias column. For ReLU, a GPU's cuBLASLt can add the bias and
        take the ReLU in the product's epilogue
        (:func:`sparse_dict._torch.fused.product_relu_`), which spares the
        codes' pass its write; the first step measures both ways and keeps
        the faster (:func:`sparse_dict._torch.fused.product_relu_pays`,
        ``kernels["product"]``).

        Returns
        -------
        pre : torch.Tensor of shape (batch, n_components)
        relu_done : bool
            Whether ``pre`` holds ReLU's codes already.
        """
        xc_ones, enc, out = ws["xc"], ws["enc"], ws["codes"]

        def plain(into):
            enc[:, d] = self.b_enc
            return mm(xc_ones, enc.t(), out=into)

        flags = self._step_flags
        if relu and _uses_kernel(kernels, "product", out.device, lambda: fused.product_relu_pays(
                lambda: self._low_bias(ws), xc_ones[:, :d], enc[:, :d].t(), out, ws["grad"],
                plain)):
            flags["bias_in_epilogue"] = True
            return fused.product_relu_(self._low_bias(ws), xc_ones[:, :d], enc[:, :d].t(),
                                       out), True
        flags["bias_in_epilogue"] = False
        return plain(out), False

    def _low_bias(self, ws):
        """``b_enc`` in the products' dtype, contiguous (the product's epilogue bias).

        Copied from ``b_enc`` unless the last update wrote it there
        (:meth:`operand_views`).
        """
        bias = self._extra("bias", (self.n_components,), ws["enc"].dtype)
        if not self._operand_current("b_enc"):
            bias.copy_(self.b_enc)
        return bias

    def _extra(self, name, shape, dtype):
        """A buffer of the workspace that only some steps need, made on first use.

        Made again when the workspace's (or this buffer's) shape grows; freed
        with the workspace.
        """
        buf = self._ws.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.dtype != dtype:
            buf = self._ws[name] = torch.empty(shape, dtype=dtype,
                                               device=self._ws["enc"].device)
            # A new buffer holds no weight yet, whatever was written before.
            self._operands_current.pop(_EXTRA_OPERAND.get(name), None)
        return buf[:shape[0]]

    def _codes_mask_count_(self, codes, ws, kernels=None, relu_done=False):
        """The activation's codes in place, the mask of active codes, the firing counts.

        The plain way is the activation's :meth:`~Activation.forward_`, then
        :func:`positive_mask` into ``ws["mask"]`` and the mask's column
        sums: three passes over the (batch, n_components) codes. On a GPU one
        Triton kernel (:func:`sparse_dict._torch.fused.codes_bits_count_`)
        does the last two, and ReLU's forward too, in one, and writes the
        mask as bits (a sixteenth of a bfloat16 mask's bytes, read once more
        by :func:`~sparse_dict._torch.fused.mask_by_bits_`); the first step
        measures both ways, the kernels in several launches, on its own codes
        and keeps the fastest (:func:`sparse_dict._torch.fused.codes_kernel_pays`,
        ``kernels["codes"]``). ``relu_done``:
        the product gave ReLU's codes already (:meth:`_pre_activations_`).

        Returns
        -------
        fired : torch.Tensor of shape (n_components,)
        apply_mask : callable
            ``apply_mask(grad)``: ``grad *= mask`` in place, by the mask in
            ``ws["mask"]`` or by the kernel's packed bits.
        """
        act, mask = self.activation, ws["mask"]
        relu = act.forward_is_relu and not relu_done

        def plain(c, m):
            if relu:
                act.forward_(c, ws, self)
            positive_mask(c, m)
            if m.device.type == "cpu" and m.dtype == torch.float32:
                # The column sums as a BLAS matrix-vector product: a third of
                # the time of a sum along the batch on this CPU (1.2 ms against
                # 3.5 at 4096 x 4096); 0/1 sums below 2**24 are exact in any order.
                return torch.mv(m.t(), m.new_ones(m.shape[0]))
            # Float sums along the batch are vectorised; integer ones are not.
            return m.sum(dim=0, dtype=torch.float32)

        if not act.forward_is_relu:
            act.forward_(codes, ws, self)
        def bits():
            return self._extra("bits", (codes.shape[0], fused.bits_columns(self.n_components)),
                               torch.uint8)

        launch = _uses_kernel(kernels, "codes", codes.device, lambda: fused.codes_kernel_pays(
            codes, mask, ws["grad"], bits(), plain, relu), forced=fused.MaskLaunch())
        if launch:
            packed = bits()
            fired = fused.codes_bits_count_(codes, packed, relu=relu, launch=launch)
            return fired, lambda grad: fused.mask_by_bits_(grad, packed, launch)
        return plain(codes, mask), lambda grad: grad.mul_(mask)

    def _residual_(self, y, x, ws, kernels=None):
        """``err = x_hat - x`` and ``gx = 2 err / batch``, with their sums.

        ``y`` is the decoder's product (``err`` itself in float32). Writes
        ``ws["err"]`` and ``gx`` (``ws["gx"]``'s first columns); returns the
        squared error's sum and ``gx``'s column sums. The plain way is five
        torch operations; on a GPU one Triton kernel
        (:func:`sparse_dict._torch.fused.residual_`) does them in one pass
        where the first step measures it faster
        (:func:`sparse_dict._torch.fused.residual_pays`, ``kernels["residual"]``).
        """
        batch, d = x.shape
        err, gx, b_dec = ws["err"], ws["gx"][:, :d], self.b_dec
        scale = 2.0 / batch

        def plain():
            if y.data_ptr() != err.data_ptr():
                err.copy_(y)
            err.add_(b_dec).sub_(x)
            torch.mul(err, scale, out=gx)
            return (torch.linalg.vector_norm(err).square(),
                    gx.sum(dim=0, dtype=torch.float32))

        launch = _uses_kernel(kernels, "residual", x.device,
                              lambda: fused.residual_pays(y, b_dec, x, gx, err, scale, plain),
                              forced=fused.ResidualLaunch())
        if launch:
            return fused.residual_(y, b_dec, x, gx, err, scale, launch)
        return plain()

    def _weight_grad_(self, name, grad, keep_low):
        """Give weight ``name`` the gradient ``grad`` (a product's column slice)."""
        param = getattr(self, name)
        if keep_low and grad.dtype != torch.float32:
            param.grad = None
            self.low_grads[name] = grad
        else:
            param.grad = _float32_dense(grad)

    def grads_to_float32_(self):
        """Turn the gradients held in ``low_grads`` into float32 ``.grad``."""
        for name, grad in self.low_grads.items():
            getattr(self, name).grad = _float32_dense(grad)
        self.low_grads.clear()

    def _dense_gradients_(self, codes, x, ws, coef, kernels=None, low_grads=False,
                          relu_done=False):
        """The dense step after the encoder's product: four more products.

        Returns the step's statistics (:meth:`_penalty_stats_`), the firing
        counts and the residual.
        """
        batch, d = x.shape
        act = self.activation
        W_enc = self.W_enc
        grad, gx_ones, xc_ones, dec = ws["grad"], ws["gx"], ws["xc"], ws["dec"]
        # W_dec in the products' dtype, next to a column for the codes' bias.
        if not self._operand_current("W_dec"):
            dec[:, :d] = self.W_dec
        W_dec_c = dec[:, :d]
        fired, apply_mask = self._codes_mask_count_(codes, ws, kernels, relu_done)
        # x_hat - x in a float32 buffer of the workspace, and d loss / d
        # x_hat next to gx's column of ones: the product with the codes gives
        # W_dec's gradient and, in the last column, the codes' column sums
        # (for the penalty). No (batch, d) tensor is allocated in float32.
        y = mm(codes, W_dec_c, out=ws["err"] if codes.dtype == torch.float32 else None)
        sse, gx_sums = self._residual_(y, x, ws, kernels)
        err = ws["err"]
        dec_grad = mm(codes.t(), gx_ones)
        self._weight_grad_("W_dec", dec_grad[:, :d], low_grads)
        # The statistics, and the per-feature penalty gradient written as the
        # bias of the next product (through gx's ones column).
        stats = self._penalty_stats_(dec_grad[:, d], fired, sse, coef, batch, dec[:, d],
                                     kernels)

        # d loss / d codes, the penalty's through the bias; then through the
        # activation, zero where a code is not active.
        mm(gx_ones, dec.t(), out=grad)
        act.parameter_gradients_(grad, self, coef, batch)
        apply_mask(grad)
        enc_grad = mm(grad.t(), xc_ones)
        self._weight_grad_("W_enc", enc_grad[:, :d], low_grads)
        grad_b_enc = enc_grad[:, d].float().contiguous()
        self.b_enc.grad = grad_b_enc
        # b_dec enters twice: added to x_hat, and subtracted before encoding.
        if enc_grad.dtype == torch.float32:
            through_encoder = grad_b_enc @ W_enc
        else:
            # Through the encoder's copy in the products' dtype, as autocast
            # would: half the bytes of the float32 W_enc, which this product
            # only reads (22 us of a 1.96 ms bf16 step on an H200 in float32).
            # b_enc's gradient is in that dtype already. (The subtraction
            # below widens the product's result: no launch of its own.)
            through_encoder = torch.mv(ws["enc"][:, :d].t(), enc_grad[:, d])
        self.b_dec.grad = gx_sums - through_encoder
        return stats, fired, err

    def _penalty_stats_(self, code_sums, fired, sse, coef, batch, bias_out, kernels=None):
        """``[loss, mse, l1, l0, 0]`` of the step, and the codes' penalty bias into ``bias_out``.

        ``code_sums``: the codes' column sums (a column of a product). The
        plain way is a dozen torch operations on (n_components,) vectors; on
        a GPU one small Triton kernel
        (:func:`sparse_dict._torch.fused.penalty_stats_`) does them, where
        the first step measures it faster
        (:func:`sparse_dict._torch.fused.penalty_stats_pays`, ``kernels["stats"]``).
        The penalty's terms (:meth:`Activation.penalty_terms`) are formed
        once, for either way.
        """
        weights, l0_factor = self.activation.penalty_terms(self)

        def plain():
            sums = code_sums.float()
            l0 = fired.sum() / batch
            penalty, code_bias = penalty_from_terms(weights, l0_factor, sums, l0, coef, batch)
            mse = sse / batch
            if code_bias is None:
                bias_out.zero_()
            else:
                bias_out.copy_(code_bias)
            return torch.stack([mse + coef * penalty, mse, sums.sum() / batch, l0,
                                mse.new_zeros(())])

        if _uses_kernel(kernels, "stats", fired.device, lambda: fused.penalty_stats_pays(
                code_sums, fired, sse, weights, l0_factor, coef, batch, bias_out, plain)):
            return fused.penalty_stats_(code_sums, fired, sse, weights, l0_factor, coef, batch,
                                        bias_out)
        return plain()

    def _sparse_gradients_(self, pre, x, xc):
        """The sparse step after the encoder's product, from the active codes.

        The activation gives each row's active codes as (feature, value)
        pairs (:meth:`Activation.select`), laid out row after row as the
        bags of an ``embedding_bag``. Everything else is formed from those
        ``nnz`` pairs, about ``batch * k`` of them:

        * ``x_hat``: a weighted sum of each row's atoms, an ``embedding_bag``
          over ``W_dec`` (``nnz * d`` multiply-adds);
        * d loss / d code at each pair, ``gx_row . W_dec[feature]``: the
          gradient of that same ``embedding_bag`` with respect to its
          per-pair weights, which autograd computes without forming the
          (batch, n_components) product;
        * ``W_dec.grad`` and ``W_enc.grad``: one bag per feature, of the rows
          that fired it (the pairs sorted by feature), over ``gx`` and over
          ``x - b_dec``, weighted by the codes and by their gradients;
        * ``b_enc.grad`` and the firing counts: sums of the pairs by feature.

        A selected pair with a non-positive value is not a code (ReLU), so
        the activation leaves it out and it carries no gradient, as in the
        dense step.
        """
        batch, d = x.shape
        n = self.n_components
        index, values, keep = self.activation.select(pre, self)
        counts = keep.sum(dim=1)
        offsets = torch.zeros(batch + 1, dtype=torch.long, device=x.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        features, codes = index[keep], values[keep].float()
        rows = torch.repeat_interleave(torch.arange(batch, device=x.device), counts)

        # The decoder's product, with autograd on the codes only, for their gradient.
        with torch.enable_grad():
            weights = codes.detach().requires_grad_()
            x_hat = F.embedding_bag(features, self.W_dec.detach(), offsets,
                                    per_sample_weights=weights, mode="sum",
                                    include_last_offset=True)
        err = (x_hat.detach() + self.b_dec).sub_(x)
        mse = err.pow(2).sum() / batch
        gx = err.mul(2.0 / batch)
        grad_codes = torch.autograd.grad(x_hat, weights, gx)[0]

        # Regroup the pairs by feature: each feature's bag is the rows it fired on.
        order = torch.argsort(features, stable=True)
        fired_long = torch.bincount(features, minlength=n)
        by_feature = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        torch.cumsum(fired_long, 0, out=by_feature[1:])
        rows_by_feature = rows[order]
        self.W_dec.grad = F.embedding_bag(rows_by_feature, gx, by_feature,
                                          per_sample_weights=codes[order], mode="sum",
                                          include_last_offset=True)
        grad_pre = grad_codes[order]
        self.W_enc.grad = F.embedding_bag(rows_by_feature, xc.float(), by_feature,
                                          per_sample_weights=grad_pre, mode="sum",
                                          include_last_offset=True)
        grad_b_enc = grad_codes.new_zeros(n).index_add_(0, features, grad_codes)
        self.b_enc.grad = grad_b_enc
        self.b_dec.grad = gx.sum(dim=0) - grad_b_enc @ self.W_enc
        fired = fired_long.float()
        l1 = codes.sum() / batch
        l0 = torch.tensor(float(features.numel()) / batch, device=x.device, dtype=torch.float32)
        return mse, l1, l0, fired, err

    def _auxk_gradients_(self, pre_dead, dead, err, xc, auxk_coef, k_aux, batch, power):
        """AuxK: the dead features reconstruct the main step's residual.

        Gao et al. (2024): each row's ``k_aux`` largest pre-activations among
        the dead features, through ReLU, decode (without the decoder bias) the
        residual ``e = x - x_hat`` of the main reconstruction, which is
        detached: the term trains only the dead features' atoms, encoder
        rows and encoder biases, and never pulls the live reconstruction towards the
        residual. The term is ``mean_b ||e_b - e_hat_b||^2 / power``, where
        ``power`` is the residual's mean squared norm, a constant: the error
        relative to what there is to explain, as in OpenAI's code (which
        divides by the residual's variance in the batch). So the term keeps
        its weight as the live features improve and the residual shrinks;
        without the normalisation (sparsify's form, which also scales the
        term by the share of ``k_aux`` the dead features fill) AuxK barely
        moved the dead share on this package's benchmarks (see
        ``docs/sparsity.rst``). Adds to the ``.grad`` that the main step
        wrote; works on the dead columns only, so it costs little when few
        features are dead.
        """
        n_dead = dead.numel()
        k = min(k_aux, n_dead)
        values, index = pre_dead.topk(k, dim=1, sorted=False)
        values.relu_()
        aux_codes = torch.zeros_like(pre_dead).scatter_(1, index, values)
        W_dead = self.W_dec[dead]
        # err = x_hat - x, so the residual is -err and e_hat - e = e_hat + err.
        diff = torch.addmm(err, aux_codes, W_dead)
        # A residual of (nearly) nothing to explain must not blow the term up.
        scale = 1.0 / power.clamp_min(1e-6 * self.n_features)
        auxk = diff.pow(2).sum() / batch * scale
        g = diff.mul_(scale * (2.0 * auxk_coef / batch))
        self.W_dec.grad.index_add_(0, dead, aux_codes.t() @ g)
        grad_codes = (g @ W_dead.t()).mul_(aux_codes > 0)
        self.W_enc.grad.index_add_(0, dead, grad_codes.t() @ xc.float())
        # The decoder bias is shared with the live features: AuxK leaves it
        # alone, as if the input to the dead features' encoder were detached.
        self.b_enc.grad.index_add_(0, dead, grad_codes.sum(dim=0))
        return auxk
