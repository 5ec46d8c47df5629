"""The baseline a user writes (a ReLU SAE trained with autograd, in a few lines), and a clock's sync.

The throughput and GPU sections put sparse_dict's training loop beside it.
"""

import torch


def sync(device):
    """Wait for ``device``'s queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainSAE:
    """The same ReLU SAE trained the obvious way: autograd, Adam, unit-norm atoms.

    ``autocast`` runs the forward pass under ``torch.autocast`` in bfloat16
    (on a GPU; the CPU's bfloat16 autocast is not what a user would run).
    """

    def __init__(self, d, n, device, autocast=False, seed=0, learning_rate=1e-4):
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n, d, generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        self.device = torch.device(device)
        self.autocast = autocast
        self.W_dec = atoms.to(device, copy=True).requires_grad_()
        self.W_enc = atoms.to(device, copy=True).requires_grad_()
        self.b_enc = torch.zeros(n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        params = [self.W_dec, self.W_enc, self.b_enc, self.b_dec]
        # At its best: torch's fused Adam where the device has it, as the
        # trainer uses (results recorded before 2026-11-26 used the default).
        try:
            self.optimizer = torch.optim.Adam(params, lr=learning_rate, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam(params, lr=learning_rate)

    def step(self, x, l1_coef):
        """One training step on the rows ``x``; returns the loss (detached)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
            x_hat = f @ self.W_dec + self.b_dec
            mse = (x - x_hat).pow(2).sum(dim=1).mean()
            l1 = (f * self.W_dec.norm(dim=1)).sum(dim=1).mean()
            loss = mse + l1_coef * l1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(dim=1, keepdim=True) * W
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        return loss.detach()
