"""Test-session set-up shared by tests/ and the doctests in sparse_dict/."""

import os

# scikit-learn's check_array_api_input is skipped unless SciPy's array-API
# mode is on; it must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# Keep plots headless.
os.environ.setdefault("MPLBACKEND", "Agg")
