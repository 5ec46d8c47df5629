"""Test-session set-up shared by tests/ and the doctests in sparse_dict/."""

import os

# scikit-learn's check_array_api_input is skipped unless SciPy's array-API
# mode is on; it must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# Keep plots headless.
os.environ.setdefault("MPLBACKEND", "Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each. OpenMP threads that
    # spin-wait for a core held by another process slow small tensor work
    # down by orders of magnitude.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
