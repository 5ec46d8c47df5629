"""The Python examples of the documentation's pages run as printed.

A page's ``.. code-block:: python`` blocks continue one another (later blocks
use what earlier ones made), so each page runs as one script, in a fresh
interpreter and an empty folder. Pages whose blocks are sketches that cannot
run on their own are listed below with the reason; every other page with
Python examples is run, so a new page is covered without a change here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import _python_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

NOT_RUNNABLE = {
    "index": "a sketch: 'acts' stands for the user's activations",
    "gpu": "needs a CUDA GPU",
    "saving": "continues from a fitted estimator the page does not make",
    "saelens": "reads a SAELens folder the user has; the page's worked example runs at "
               "every docs build instead",
}

PAGES = sorted(p.stem for p in DOCS.glob("*.rst")
               if _python_blocks(p.read_text(encoding="utf-8")))


def test_exclusions_name_real_pages():
    assert set(NOT_RUNNABLE) <= set(PAGES)
    assert len(set(PAGES) - set(NOT_RUNNABLE)) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p not in NOT_RUNNABLE])
def test_page_examples_run_as_printed(page, tmp_path):
    script = tmp_path / f"{page}.py"
    script.write_text("\n".join(_python_blocks((DOCS / f"{page}.rst").read_text("utf-8"))),
                      encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
