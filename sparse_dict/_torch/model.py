"""The sparse autoencoder module and its hand-fused training gradients."""

import torch
from torch import nn


class SparseAutoencoder(nn.Module):
    """A one-layer ReLU sparse autoencoder with a bias subtracted before encoding.

    ``f(x) = ReLU((x - b_dec) @ W_enc.T + b_enc)`` and
    ``x_hat = f(x) @ W_dec + b_dec``. The rows of ``W_dec`` are the dictionary
    atoms; the trainer keeps them at unit norm.

    Parameters
    ----------
    n_features : int
        Width ``d`` of the input.
    n_components : int
        Number ``N`` of dictionary atoms (features).
    generator : torch.Generator, optional
        Source of randomness for the initial atoms, for repeatable fits.

    Examples
    --------
    >>> import torch
    >>> sae = SparseAutoencoder(8, 32, generator=torch.Generator().manual_seed(0))
    >>> codes = sae.encode(torch.randn(5, 8))
    >>> tuple(codes.shape), bool((codes >= 0).all())
    ((5, 32), True)
    """

    def __init__(self, n_features, n_components, generator=None):
        super().__init__()
        atoms = torch.randn(n_components, n_features, generator=generator)
        atoms /= atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(atoms)
        # The encoder starts as the decoder's transpose: each feature first
        # responds to its own atom's direction, which avoids a long phase of
        # encoder and decoder searching for each other.
        self.W_enc = nn.Parameter(atoms.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_components))
        self.b_dec = nn.Parameter(torch.zeros(n_features))

    @property
    def n_features(self):
        return self.W_dec.shape[1]

    @property
    def n_components(self):
        return self.W_dec.shape[0]

    def encode(self, x):
        """Non-negative codes of the rows of ``x``."""
        return torch.relu(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t()))

    def decode(self, codes):
        """Reconstruction of the inputs from their codes."""
        return torch.addmm(self.b_dec, codes, self.W_dec)

    def forward(self, x):
        codes = self.encode(x)
        return self.decode(codes), codes

    @torch.no_grad()
    def normalize_atoms_(self):
        """Rescale every atom (row of ``W_dec``) to unit norm, in place."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _workspace(self, batch, dtype, device):
        """Reusable buffers for the training step.

        On the CPU a fresh (batch, n_components) tensor is a fresh ``mmap``:
        allocating several per step costs page faults comparable to a matrix
        product. Buffers sized for the largest batch seen are reused; a
        smaller batch takes a leading slice, which is contiguous. The two
        (batch, n_features + padding) buffers carry a column of ones, so that two
        matrix products also return column sums of the codes and of their
        gradient, saving two passes over (batch, n_components) arrays.
        """
        ws = getattr(self, "_ws", None)
        if (
            ws is None
            or ws["codes"].shape[0] < batch
            or ws["codes"].dtype != dtype
            or ws["codes"].device != device
        ):
            wide = (batch, self.n_components)
            ws = {k: torch.empty(wide, dtype=dtype, device=device) for k in ("codes", "grad", "mask")}
            # One more column than the features, rounded up to a multiple of
            # 16: BLAS kernels lose about 40% on an odd width such as 513.
            d = self.n_features
            width = -(-(d + 1) // 16) * 16
            for k in ("xc", "gx"):
                ws[k] = torch.zeros(batch, width, dtype=dtype, device=device)
                ws[k][:, d] = 1.0
            self._ws = ws
        return {k: v[:batch] for k, v in ws.items()}

    def release_workspace(self):
        """Free the training buffers (after training, before pickling)."""
        self._ws = None

    @torch.no_grad()
    def loss_and_gradients(self, x, l1_coef, autocast_dtype=None):
        """Loss of a batch and its gradients, written into each ``.grad``.

        The loss is ``mean_b ||x_b - x_hat_b||^2 + l1_coef * mean_b sum_i
        f_i(x_b) ||W_dec[i]||``. The backward pass is written out by hand
        instead of through autograd: it works in place in reused buffers and
        folds the L1 gradient into a matrix product's bias, which removes
        several full passes over the (batch, n_components) activations, so
        the five matrix products are nearly the whole cost, as the
        performance model assumes.

        The L1 term's gradient with respect to ``W_dec`` is parallel to each
        atom, and the trainer projects the parallel component out (the atoms
        are constrained to unit norm), so it is not computed here.

        Parameters
        ----------
        x : torch.Tensor of shape (batch, n_features)
        l1_coef : float
        autocast_dtype : torch.dtype, optional
            Run the matrix products in this dtype (``torch.bfloat16`` on a
            GPU); the gradients are returned in float32.

        Returns
        -------
        stats : torch.Tensor of shape (4,)
            Loss, mean squared error, L1 penalty (before ``l1_coef``) and L0,
            left on the device so that no step waits for a host transfer.
        fired : torch.Tensor of shape (n_components,)
            How many rows of the batch fired each feature (as floats).
        """
        batch, d = x.shape
        W_enc, W_dec, b_enc, b_dec = self.W_enc, self.W_dec, self.b_enc, self.b_dec
        cdtype = autocast_dtype or torch.float32
        W_enc_c, W_dec_c = W_enc.to(cdtype), W_dec.to(cdtype)
        ws = self._workspace(batch, cdtype, x.device)
        codes, grad, mask = ws["codes"], ws["grad"], ws["mask"]
        xc_ones, gx_ones = ws["xc"], ws["gx"]
        xc = xc_ones[:, :d]

        torch.sub(x, b_dec, out=xc)
        torch.addmm(b_enc.to(cdtype), xc, W_enc_c.t(), out=codes)
        codes.relu_()
        torch.gt(codes, 0, out=mask)
        # Float sums along the batch are vectorised; integer ones are not.
        fired = mask.sum(dim=0, dtype=torch.float32)
        err = torch.addmm(b_dec.to(cdtype), codes, W_dec_c).float().sub_(x)
        mse = err.pow(2).sum() / batch

        # d loss / d x_hat, next to a column of ones: the product with the
        # codes gives W_dec's gradient and, in the last column, the codes'
        # column sums (for the L1 term).
        gx_ones[:, :d] = err.mul_(2.0 / batch)
        dec_grad = torch.mm(codes.t(), gx_ones).float()
        self.W_dec.grad = dec_grad[:, :d].contiguous()
        code_sums = dec_grad[:, d]

        norms = W_dec.norm(dim=1)
        l1 = code_sums.dot(norms) / batch
        loss = mse + l1_coef * l1
        l0 = fired.sum() / batch

        # d loss / d codes, with the L1 term (constant per feature) as the
        # bias; then through the ReLU, zero where the feature did not fire.
        torch.addmm((norms * (l1_coef / batch)).to(cdtype), gx_ones[:, :d], W_dec_c.t(), out=grad)
        grad.mul_(mask)
        enc_grad = torch.mm(grad.t(), xc_ones).float()
        self.W_enc.grad = enc_grad[:, :d].contiguous()
        grad_b_enc = enc_grad[:, d].contiguous()
        self.b_enc.grad = grad_b_enc
        # b_dec enters twice: added to x_hat, and subtracted before encoding.
        self.b_dec.grad = gx_ones[:, :d].sum(dim=0, dtype=torch.float32) - grad_b_enc @ W_enc
        stats = torch.stack([loss, mse, l1, l0])
        return stats, fired
