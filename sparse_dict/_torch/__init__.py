"""The torch core: the autoencoder, its training loop and batching onto a device.

Nothing here knows about scikit-learn. Arrays come in as numpy arrays (dense,
``np.memmap`` or scipy CSR) and go out as numpy arrays or tensors.
"""

from sparse_dict._torch.activations import ACTIVATIONS, make_activation
from sparse_dict._torch.device import resolve_device
from sparse_dict._torch.distributed import RankFailedError
from sparse_dict._torch.model import SparseAutoencoder, fitted_tensor_names
from sparse_dict._torch.train import DivergenceError, TrainConfig, Trainer, assess_training
from sparse_dict._torch.data import (
    decode_array,
    encode_array,
    median_squared_distance,
    reconstructor,
    value_range,
)

__all__ = [
    "ACTIVATIONS",
    "DivergenceError",
    "RankFailedError",
    "SparseAutoencoder",
    "TrainConfig",
    "Trainer",
    "assess_training",
    "decode_array",
    "encode_array",
    "reconstructor",
    "fitted_tensor_names",
    "make_activation",
    "median_squared_distance",
    "resolve_device",
    "value_range",
]
