"""Sparse dictionaries of neural-network activations, the scikit-learn way.

The public names are imported lazily, so that ``import sparse_dict`` stays
cheap and a command-line call that needs only one part loads only that part.
"""

from sparse_dict._version import __version__

_PUBLIC = {
    "SparseAutoencoderDictionary": "sparse_dict.estimator",
    "LassoCoder": "sparse_dict.coding",
    "TransformerActivationExtractor": "sparse_dict.extraction",
    "metrics": "sparse_dict.metrics",
    "model_selection": "sparse_dict.model_selection",
    "datasets": "sparse_dict.datasets",
    "analysis": "sparse_dict.analysis",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sparse_dict' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_PUBLIC[name])
    value = module if module.__name__.endswith(name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
