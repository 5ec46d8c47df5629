"""Smoke test of the benchmark suite: the tiny mode runs and writes every file.

Figures of the tiny mode are not meaningful and nothing here looks at
timings; the test only proves that ``python -m benchmarks`` works end to end
and that its outputs have the promised shape.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow


def _numbers(obj, path="$"):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: the smoke test may share the machine with other test workers.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    return proc, out


def test_tiny_run_succeeds(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_promised_file_exists(tiny_run):
    from benchmarks.__main__ import TINY_SECTIONS
    from benchmarks.report import PLOTS

    _, out = tiny_run
    expected = ["results.json", "results.md"]
    expected += [png for name in TINY_SECTIONS for png in PLOTS[name]]
    for name in expected:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_json_has_every_section_with_finite_numbers(tiny_run):
    from benchmarks.__main__ import TINY_SECTIONS

    _, out = tiny_run
    # json.loads rejects nothing by default, so check the numbers explicitly.
    results = json.loads((out / "results.json").read_text())
    assert set(results["sections"]) == set(TINY_SECTIONS)
    for name, section in results["sections"].items():
        assert "error" not in section, section.get("error")
        numbers = list(_numbers(section))
        assert numbers, name
        bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
        assert not bad, bad
    machine = results["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "numpy", "sklearn", "torch_threads",
                "date", "device"):
        assert machine[key] not in (None, ""), key


def test_every_target_is_recorded(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    names = {t["name"] for t in results["targets"]}
    assert names >= {
        "recovery_sae_mmcs", "recovery_sae_vs_mbdl", "loss_recovered_builtin",
        "time_to_quality_speedup", "memmap_memory_growth", "encoding_speedup_vs_lars",
        "throughput_fraction_of_matmul",
    }
    for t in results["targets"]:
        assert isinstance(t["met"], bool)
        assert t["value"] is None or math.isfinite(t["value"])
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown
    assert "met" in markdown


def test_unknown_section_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nonsense"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown section" in proc.stderr
