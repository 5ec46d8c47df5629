"""Test-session set-up shared by tests/ and the doctests in sparse_dict/."""

import os

# scikit-learn's check_array_api_input is skipped unless SciPy's array-API
# mode is on; it must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# Keep plots headless.
os.environ.setdefault("MPLBACKEND", "Agg")
# One CPU matrix product for every test and the processes they start:
# measured ("auto"), the choice between
# torch's and numpy's OpenBLAS can differ from one worker to the next on a
# near tie, and chaotic runs (a learning rate of 1) then end differently.
# tests/test_matmul.py measures it on its own.
os.environ.setdefault("SPARSE_DICT_CPU_PRODUCT", "torch")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each. OpenMP threads that
    # spin-wait for a core held by another process slow small tensor work
    # down by orders of magnitude.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
