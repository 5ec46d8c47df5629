"""Run benchmark sections in this process and write each one's figures as JSON.

``python -m benchmarks._section MODE DEVICE OUT_DIR NAME [NAME ...]`` is what
:func:`benchmarks._common.run_isolated` starts, in an environment without the
OpenBLAS overrides, so that scikit-learn and the SAE meet on the BLAS the CPU
supports. Each section is written to ``OUT_DIR/NAME.json`` as soon as it
ends (its figures, ``wall_s`` and the BLAS in use, or its error), so that an
interrupted run keeps what it measured.
"""

import importlib
import json
import sys
import traceback
from pathlib import Path

from benchmarks._common import Timer, blas_info, blas_summary
from benchmarks.report import _clean


def main(argv=None):
    """Run ``benchmarks.<NAME>.run(MODE, DEVICE)`` for each NAME; write OUT_DIR/NAME.json."""
    mode, device, out, *names = argv if argv is not None else sys.argv[1:]
    blas = blas_info()
    for name in names:
        print(f"[benchmarks] {name} ({mode}), in a child process with BLAS "
              f"{blas_summary(blas)} ...", flush=True)
        with Timer() as t:
            try:
                result = importlib.import_module(f"benchmarks.{name}").run(mode=mode,
                                                                            device=device)
            except Exception:  # noqa: BLE001 - record and go on with the other sections
                result = {"error": traceback.format_exc()}
                print(result["error"], file=sys.stderr, flush=True)
        result["wall_s"] = t.seconds
        result["blas"] = blas
        print(f"[benchmarks] {name}: {t.seconds:.1f} s", flush=True)
        with open(Path(out) / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(_clean(result), f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
