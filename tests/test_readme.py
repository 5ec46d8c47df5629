"""README.rst's Python examples run exactly as printed.

Each ``.. code-block:: python`` of README.rst runs on its own, in a fresh
interpreter and an empty folder, as a user who copies it would run it; so the
README cannot drift from the code again.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


def _python_blocks(text):
    """The code of each ``.. code-block:: python`` directive, dedented."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^\.\. code-block:: python\s*$", line):
            continue
        body = []
        for following in lines[i + 1:]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


BLOCKS = _python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 2
    assert all("import" in block for block in BLOCKS)


def test_block_reader_stops_at_the_next_paragraph():
    text = ".. code-block:: python\n\n    x = 1\n\n    y = 2\nAfter.\n"
    assert _python_blocks(text) == ["x = 1\n\ny = 2\n"]


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=lambda n: f"block{n + 1}")
def test_readme_example_runs_as_printed(number, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[number], encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if "mean_max_cosine_similarity" in BLOCKS[number]:
        # The comments promise an explained variance of ~0.81, ~0.99
        # recovery of the true features, and the L1 shrinkage warning.
        score, similarity = map(float, proc.stdout.split()[-2:])
        assert 0.77 < score < 0.85, proc.stdout
        assert similarity > 0.95, proc.stdout
        assert "The codes are shrunk" in proc.stderr, proc.stderr
    if "best_params_" in BLOCKS[number]:
        assert "sae__l1_coef" in proc.stdout.splitlines()[-1], proc.stdout
        assert "[CV 1/2] END" in proc.stdout  # progress is shown while it runs
