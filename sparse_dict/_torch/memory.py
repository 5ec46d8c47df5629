"""How much memory a model needs, and how much a device has, before anything is allocated."""

import os

import torch

# Each parameter is held four times while training (the value, its gradient
# and Adam's two moments), in float32.
_COPIES_WHILE_TRAINING = 4
_BYTES_PER_FLOAT = 4


def training_bytes(n_features, n_components):
    """Bytes that the parameters of a model take while it trains.

    The encoder and decoder weights (``n_components x n_features`` each) and
    the two biases, each with its gradient and Adam's two moments. Batches
    and workspace come on top, so this is a lower bound.

    Examples
    --------
    >>> training_bytes(512, 4096)
    67182592
    """
    n_params = 2 * n_components * n_features + n_components + n_features
    return _COPIES_WHILE_TRAINING * _BYTES_PER_FLOAT * n_params


def device_bytes(device):
    """Total memory of ``device`` (a ``torch.device``) in bytes, or None if unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except (RuntimeError, AssertionError):
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
