"""Run one benchmark section and write its figures as JSON.

``python -m benchmarks._section NAME MODE DEVICE OUT`` is what
:func:`benchmarks._common.run_isolated` starts, in an environment without the
OpenBLAS overrides, so that scikit-learn and the SAE meet on the BLAS the CPU
supports. The BLAS in use is recorded with the figures.
"""

import importlib
import json
import sys

from benchmarks._common import blas_info, blas_summary
from benchmarks.report import _clean


def main(argv=None):
    """Run ``benchmarks.<NAME>.run(MODE, DEVICE)`` and write the result to OUT."""
    name, mode, device, out = (argv or sys.argv[1:])[:4]
    blas = blas_info()
    print(f"[benchmarks] {name}: BLAS {blas_summary(blas)}", flush=True)
    result = importlib.import_module(f"benchmarks.{name}").run(mode=mode, device=device)
    result["blas"] = blas
    with open(out, "w") as f:
        json.dump(_clean(result), f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
