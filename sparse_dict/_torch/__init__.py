"""The torch core: the autoencoder, its training loop and batching onto a device.

Nothing here knows about scikit-learn. Arrays come in as numpy arrays (dense,
``np.memmap`` or scipy CSR) and go out as numpy arrays or tensors.
"""

from sparse_dict._torch.device import resolve_device
from sparse_dict._torch.model import SparseAutoencoder
from sparse_dict._torch.train import DivergenceError, TrainConfig, Trainer
from sparse_dict._torch.data import decode_array, encode_array

__all__ = [
    "DivergenceError",
    "SparseAutoencoder",
    "TrainConfig",
    "Trainer",
    "decode_array",
    "encode_array",
    "resolve_device",
]
