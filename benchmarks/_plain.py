"""The baseline a user writes (a ReLU SAE trained with autograd, in a few lines), and a clock's sync.

The throughput and GPU sections put sparse_dict's training loop beside it.
"""

import numpy as np
import torch


def sync(device):
    """Wait for ``device``'s queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainSAE:
    """The same SAE trained the obvious way: autograd, Adam, unit-norm atoms.

    ReLU codes with an L1 penalty by default; ``k`` keeps each row's ``k``
    largest instead (a top-k SAE, trained on the reconstruction error alone).
    ``atoms`` starts the decoder (and the encoder, its transpose) at the given
    directions instead of random ones; ``learn_decoder=False`` keeps the
    decoder (atoms and bias) where it starts and trains the encoder alone.
    ``autocast`` runs the forward pass under ``torch.autocast`` in bfloat16
    (on a GPU; the CPU's bfloat16 autocast is not what a user would run).
    """

    def __init__(self, d, n, device, autocast=False, seed=0, learning_rate=1e-4, k=None,
                 atoms=None, learn_decoder=True):
        g = torch.Generator().manual_seed(seed)
        if atoms is None:
            atoms = torch.randn(n, d, generator=g)
        else:
            # Contiguous: torch's fused CPU Adam mis-steps other layouts.
            atoms = torch.as_tensor(atoms, dtype=torch.float32).clone(
                memory_format=torch.contiguous_format)
        atoms /= atoms.norm(dim=1, keepdim=True)
        self.k = k
        self.device = torch.device(device)
        self.autocast = autocast
        self.W_dec = atoms.to(device, copy=True).requires_grad_()
        self.W_enc = atoms.to(device, copy=True).requires_grad_()
        self.b_enc = torch.zeros(n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        self.learn_decoder = learn_decoder
        params = [self.W_enc, self.b_enc]
        if learn_decoder:
            params += [self.W_dec, self.b_dec]
        else:
            self.W_dec.requires_grad_(False)
            self.b_dec.requires_grad_(False)
        # At its best: torch's fused Adam where the device has it, as the
        # trainer uses (results recorded before 2026-11-26 used the default).
        try:
            self.optimizer = torch.optim.Adam(params, lr=learning_rate, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam(params, lr=learning_rate)

    def codes(self, x):
        """The codes of the rows ``x`` (with autograd, as the step uses them)."""
        f = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        if self.k is None:
            return f
        values, index = f.topk(self.k, dim=1)
        return torch.zeros_like(f).scatter(1, index, values)

    def step(self, x, l1_coef=0.0):
        """One training step on the rows ``x``; returns the loss (detached)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f = self.codes(x)
            x_hat = f @ self.W_dec + self.b_dec
            mse = (x - x_hat).pow(2).sum(dim=1).mean()
            loss = mse
            if l1_coef:
                loss = mse + l1_coef * (f * self.W_dec.norm(dim=1)).sum(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.learn_decoder:
            with torch.no_grad():
                W, g = self.W_dec, self.W_dec.grad
                g -= (g * W).sum(dim=1, keepdim=True) * W
        self.optimizer.step()
        if self.learn_decoder:
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return loss.detach()

    def train(self, X, steps, batch_size, seed=0):
        """``steps`` steps on random batches of the rows of ``X`` (an array); returns self."""
        rows = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            self.step(rows[torch.randint(0, rows.shape[0], (batch_size,), generator=g)])
        return self

    # As a dictionary (components_, transform, inverse_transform), for the
    # benchmarks' scoring.
    @property
    def components_(self):
        return self.W_dec.detach().cpu().numpy()

    def transform(self, X):
        """The codes of the rows of ``X`` (an array), as a float32 array."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device)
            return self.codes(x).cpu().numpy()

    def inverse_transform(self, codes):
        return codes @ self.components_ + self.b_dec.detach().cpu().numpy()
