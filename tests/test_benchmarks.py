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

import numpy as np
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
        "recovery_topk_family_mmcs", "recovery_topk_family_vs_mbdl", "loss_recovered_builtin",
        "dead_features_with_auxk_builtin", "frontier_vs_mbdl_builtin",
        "time_to_quality_speedup", "memmap_memory_growth", "encoding_speedup_vs_lars",
        "amortisation_gap_best", "throughput_fraction_of_matmul",
        "extraction_disk_memory_growth",
        "sparse_topk_over_dense_relu", "steering_ratio", "universality_vs_random",
        "size_curve_rises",
        "gpu_fit_fraction_of_matmul_float32", "gpu_fit_fraction_of_matmul_bf16",
        "gpu_fit_over_plain_gather_bf16", "gpu_step_fraction_of_matmul_bf16",
        "gpu_short_fit_overhead_float32", "gpu_short_fit_overhead_bf16",
        "gpu_small_fit_over_plain_device_float32", "gpu_small_fit_over_plain_device_bf16",
    }
    for t in results["targets"]:
        assert isinstance(t["met"], bool)
        assert t["value"] is None or math.isfinite(t["value"])
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown
    assert "met" in markdown
    assert "BLAS" in markdown


ACTIVATIONS = {"relu", "topk", "batchtopk", "jumprelu"}


@pytest.fixture(scope="module")
def sections(tiny_run):
    _, out = tiny_run
    return json.loads((out / "results.json").read_text())["sections"]


def test_blas_kernel_is_recorded(tiny_run, sections):
    from benchmarks.__main__ import ISOLATED

    _, out = tiny_run
    machine = json.loads((out / "results.json").read_text())["machine"]
    for info in (machine["blas"], machine["blas_isolated"]):
        assert info["libraries"], info
        assert all(lib["internal_api"] for lib in info["libraries"])
        assert "architecture" in info["libraries"][0]
    # The comparison processes run without the OpenBLAS overrides, whatever
    # the test's own environment holds.
    for name in ISOLATED:
        if name in sections:
            env = sections[name]["blas"]["env"]
            assert env == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}, name


def test_recovery_cases_are_on_equal_footing(sections):
    cases = sections["recovery"]["cases"]
    assert {c["generator"] for c in cases} == {"superposition", "clustered"}
    assert {c["frequencies"] for c in cases} == {"uniform", "power-law"}
    for case in cases:
        methods = case["methods"]
        sae = [m for m in methods if m.get("activation") and "as MBDL" not in m["method"]]
        assert {m["activation"] for m in sae} == ACTIVATIONS
        assert {m["n_rows"] for m in sae} == {case["n_rows"]}
        # MBDL at each alpha of its grid, scored on the absolute cosine (signed codes);
        # the verdict takes its best MMCS.
        from benchmarks.recovery import MBDL_ALPHAS

        mbdl_rows = [m for m in methods if "mbdl_alpha" in m]
        assert [m["mbdl_alpha"] for m in mbdl_rows] == list(MBDL_ALPHAS)
        assert all(m["cosine"].startswith("absolute cosine") for m in mbdl_rows)
        mbdl = max(mbdl_rows, key=lambda m: m["mmcs"])
        assert case["mbdl_mmcs"] == mbdl["mmcs"]
        assert case["mbdl_best_alpha"] == mbdl["mbdl_alpha"]
        assert all(m["n_rows"] == case["mbdl_rows"] for m in mbdl_rows)
        if mbdl["n_rows"] < case["n_rows"]:
            # The SAE is also shown on exactly the rows MBDL saw.
            same = [m for m in methods if "as MBDL" in m["method"]]
            assert len(same) == 1 and same[0]["n_rows"] == mbdl["n_rows"]
            assert same[0]["activation"] in {"topk", "batchtopk"}
            assert case["mbdl_rows_fewer"]
        assert case["margin_over_mbdl"] == pytest.approx(
            case["best_topk_family_same_rows_mmcs"] - case["mbdl_mmcs"])
        # The optimisation reference: one plain loop from each start, on the
        # SAEs' rows and steps; started at the truth it keeps the true atoms.
        reference = {m["reference"]: m for m in methods if "reference" in m}
        assert set(reference) == {"random", "true"}
        for m in reference.values():
            assert m["n_rows"] == case["n_rows"] and m["steps"] == case["sae_steps"]
            assert m["l0"] == pytest.approx(case["n_active"], abs=0.5)
        assert reference["true"]["mmcs"] > reference["random"]["mmcs"] + 0.1
        # The SAE warm-started from MBDL's atoms: on every row, out of the verdict.
        warm = [m for m in methods if m.get("warm_start") == "mbdl"]
        assert len(warm) == 1 and "activation" not in warm[0]
        assert warm[0]["n_rows"] == case["n_rows"]
        assert warm[0]["method"] != case["best_topk_family"]
    assert any(c["mbdl_rows_fewer"] for c in cases)


def test_frontier_has_every_activation_and_equal_atoms(sections):
    model = sections["frontier"]["builtin"]
    sae, mbdl = model["sae"], model["mbdl"]
    assert {p["activation"] for p in sae} == ACTIVATIONS
    assert {p["n_components"] for p in sae + mbdl} == {model["n_components"]}
    no_auxk = [p for p in sae if p.get("no_auxk")]
    assert len(no_auxk) == 1 and no_auxk[0]["auxk_coef"] == 0
    assert all("loss_recovered" in p["splice"] for p in sae if not p.get("equal_rows"))
    # On MBDL's rows: every activation again, over the same grid, exactly those rows.
    from benchmarks.frontier import SIZES

    grid = SIZES["tiny"]["builtin"]["grid"]
    equal = [p for p in sae if p.get("equal_rows")]
    assert sorted((p["activation"], p["knob"]) for p in equal) == sorted(
        (a, k) for a, knobs in grid.items() for k in knobs)
    assert {p["n_rows"] for p in equal} == {mbdl[0]["n_rows"]}
    comparison = model["comparison"]
    assert comparison["equal_rows_best_activation"] in ACTIVATIONS
    assert set(comparison["per_activation"]) == ACTIVATIONS
    names = {t["name"] for t in sections["frontier"]["targets"]}
    assert {"frontier_vs_mbdl_builtin", "frontier_vs_mbdl_equal_rows_builtin"} <= names
    assert model["comparison"]["best_activation"] in ACTIVATIONS
    assert {"gap", "encoder", "optimal", "l0"} <= set(model["amortisation_gap"])
    # The loss-recovered probe: its own size, its own rows, outside the frontiers.
    probe = model["loss_probe"]
    assert probe["n_components"] == 128 and probe["steps"] == 30
    assert probe["n_rows"] != model["n_train_tokens"]
    assert 0 <= probe["splice"]["l0"] and "loss_recovered" in probe["splice"]
    assert probe not in sae


def test_time_to_quality_and_encoding_cover_every_activation(sections):
    ttq = sections["time_to_quality"]
    assert set(ttq["primary_level"]["per_activation"]) == ACTIVATIONS
    # MBDL at every alpha of its grid; its time to a level is its fastest.
    from benchmarks.time_to_quality import MBDL_ALPHAS

    assert {p["alpha"] for p in ttq["mbdl_trajectory"]} == set(MBDL_ALPHAS)
    assert ttq["settings"]["mbdl_alphas"] == list(MBDL_ALPHAS)
    assert ttq["primary_level"]["mbdl_s"] <= max(
        p["fit_s"] for p in ttq["mbdl_trajectory"] if p["alpha"] == 0.1)
    assert {p["activation"] for p in ttq["sae_fits"]} == ACTIVATIONS
    enc = sections["encoding"]
    assert {g["activation"] for g in enc["gaps"]} == ACTIVATIONS
    for g in enc["gaps"]:
        assert g["gap"] == pytest.approx(g["optimal"] - g["encoder"])
    ref = enc["true_atoms_gap"]
    assert ref["gap"] == pytest.approx(ref["optimal"] - ref["encoder"])
    assert ref["l0"] == enc["case"]["n_active"]
    assert f"{ref['gap']:.3f}" in enc["targets"][0]["note"]
    ratios = sections["throughput"]["activation_ratios"]
    assert set(ratios) == ACTIVATIONS and ratios["relu"] == 1.0
    throughput = sections["throughput"]
    assert set(throughput["matmul_gflops_by_library"]) == {"torch", "openblas"}
    assert throughput["sparse_dict_matmul_backend"] in {"torch", "openblas"}
    sparse = throughput["sparse"]
    assert set(sparse["step_rows_per_s"]) == {"relu", "topk_sparse", "batchtopk_sparse",
                                              "topk_dense"}
    assert sparse["step_topk_sparse_over_relu"] == pytest.approx(
        sparse["step_rows_per_s"]["topk_sparse"] / sparse["step_rows_per_s"]["relu"])
    # The target's figure is the step's, each round against that round's
    # faster product; the loop's is beside it.
    rounds = throughput["rounds"]
    best = np.max([rounds["matmul"][lib] for lib in ("torch", "openblas")], axis=0)
    assert throughput["sae_step_fraction_of_matmul"] == pytest.approx(
        np.median(np.asarray(rounds["sae_step"]) / best))
    assert throughput["sae_fraction_of_matmul"] == pytest.approx(
        np.median(np.asarray(rounds["sae"]) / best))
    target = next(t for t in throughput["targets"]
                  if t["name"] == "throughput_fraction_of_matmul")
    assert target["value"] == throughput["sae_step_fraction_of_matmul"]


def test_saelens_section_records_why_it_was_skipped(monkeypatch, tmp_path):
    from benchmarks import saelens_throughput

    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setenv("SAELENS_PYTHON", str(missing))
    result = saelens_throughput.run("tiny", "cpu")
    assert str(missing) in result["skipped"]
    assert "requirements-saelens.txt" in result["skipped"]
    [t] = result["targets"]
    assert t["name"] == "saelens_topk_speedup" and t["value"] is None and not t["met"]


def test_clean_blas_env_drops_only_the_overrides():
    from benchmarks._common import clean_blas_env

    env = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1", "PYTHONPATH": "x",
           "OMP_NUM_THREADS": "1"}
    assert clean_blas_env(env) == {"PYTHONPATH": "x", "OMP_NUM_THREADS": "1"}
    assert env["OPENBLAS_CORETYPE"] == "Haswell"  # the caller's mapping is untouched


def test_frontier_margin():
    from benchmarks.frontier import frontier_margin

    def pts(*pairs):
        return [{"l0": a, "explained_variance": b} for a, b in pairs]

    sae = pts((8, 0.6), (16, 0.8), (32, 0.9))
    # Read between points on a log-L0 line: L0 11.3 is halfway from 8 to 16.
    margin, outside = frontier_margin(sae, pts((8 * 2 ** 0.5, 0.65)))
    assert margin == pytest.approx(0.05) and outside == 0
    margin, outside = frontier_margin(sae, pts((16, 0.85), (4, 0.1), (64, 0.99)))
    assert margin == pytest.approx(-0.05) and outside == 1  # L0 64 is beyond 32
    assert frontier_margin(sae, pts((4, 0.1))) == (None, 1)


def test_unknown_section_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nonsense"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown section" in proc.stderr


def test_gpu_section_measures_only_the_sizes_asked_for():
    from benchmarks import gpu

    result = gpu.measure("tiny", "cpu", only_sizes=["small"])
    assert set(result["sizes"]) == {"small"}
    with pytest.raises(ValueError, match="Unknown sizes \\['huge'\\]"):
        gpu.measure("tiny", "cpu", only_sizes=["huge"])


def test_gpu_section_tiny_on_cpu(tmp_path):
    from benchmarks import gpu

    result = gpu.run("tiny", "cpu", out_dir=tmp_path)
    tiny = gpu.SIZES["tiny"]
    assert set(result["sizes"]) == {"reference", "small"} == set(tiny["shapes"])
    assert result["first_fit"]["seconds"] > 0
    assert result["device"] == "cpu" and result["torch"]
    for label, size in result["sizes"].items():
        assert "error" not in size, size.get("error")
        assert (size["d"], size["n"]) == (tiny["shapes"][label]["d"], tiny["shapes"][label]["n"])
        for dtype in ("float32", "bf16"):
            f = size[dtype]
            for key in ("matmul_tflops", "step_ms", "step_fraction_of_matmul", "fit_short_s",
                        "fit_long_s", "plain_gather_ms_per_step", "plain_device_ms_per_step",
                        "step_trained_ms"):
                assert math.isfinite(f[key]) and f[key] > 0, (label, dtype, key, f[key])
            assert f["step_trained_fraction_of_matmul"] == pytest.approx(
                10.0 * size["batch"] * size["d"] * size["n"] / (f["step_trained_ms"] / 1e3)
                / 1e12 / f["matmul_tflops"])
            steady = (f["fit_long_s"] - f["fit_short_s"]) / (f["long_steps"] - f["short_steps"])
            if steady <= 0:
                # Machine noise beat the long fit's extra steps (a busy
                # machine, tiny sizes): the steady figures are NaN, not wrong.
                assert math.isnan(f["steady_ms_per_step"]), f
                continue
            # The ratios are the figures they are said to be.
            assert f["steady_ms_per_step"] == pytest.approx(1e3 * steady)
            assert f["fit_fraction_of_matmul"] == pytest.approx(
                f["fit_tflops"] / f["matmul_tflops"])
            assert f["short_fit_overhead"] == pytest.approx(
                f["fit_short_s"] / (f["short_steps"] * steady))
            assert f["over_plain_device"] == pytest.approx(
                f["plain_device_ms_per_step"] / f["steady_ms_per_step"])
            assert f["plain_autocast"] is False  # no bfloat16 autocast on the CPU
            # The short fit's phases: each timed, and the rest what no phase
            # took. No rows are resident on the CPU: none streamed meanwhile.
            phases = f["fit_short_phases_s"]
            named = ("validate", "feed", "initialise", "train", "finish")
            assert all(phases[k] > 0 for k in named)
            assert phases["other"] == pytest.approx(phases["total"] - sum(
                phases[k] for k in named))
            assert f["fit_short_streamed_batches"] == 0
            # Parts inside the phases, each within its phase's time.
            parts = f["fit_short_parts_s"]
            inside = {k: v for k, v in parts.items() if not k.startswith("beside")}
            # The short fit with each piece of its work beside the steps left
            # out, at the reference size (the target's) only.
            if label == "reference":
                assert set(f["fit_short_without_s"]) == set(gpu._LEFT_OUT)
                assert all(v > 0 for v in f["fit_short_without_s"].values())
            else:
                assert "fit_short_without_s" not in f
            # Nothing resident on the CPU: no step waited for a copy.
            assert inside.pop("train: the wait for the copy's last rows") == 0
            assert len(inside) == 11 and all(v > 0 for v in inside.values()), parts
            assert parts["finish: export"] < phases["finish"]
            assert parts["initialise: sample_moments"] < phases["initialise"]
            assert parts["other: the trainer's construction"] < phases["other"]
            # The value scan, in a thread of its own: its time, and when it
            # ended, within the fit (the first step waits for its verdict).
            scan = parts["beside: the value scan"]
            assert 0 < scan <= parts["beside: the value scan, ended at"] < phases["total"]
            # The short fit step by step: one mark a step, and the excess
            # over the median what it says it is.
            timeline = f["fit_short_timeline"]
            assert len(timeline["device_ms"]) == len(timeline["host_ms"]) == f["short_steps"]
            assert all(t >= 0 for t in timeline["device_ms"])
            assert timeline["median_device_ms"] == pytest.approx(
                float(np.median(timeline["device_ms"])))
            assert timeline["excess_ms"] == pytest.approx(sum(
                max(0.0, t - timeline["median_device_ms"]) for t in timeline["device_ms"]))
            assert 0 <= timeline["excess_first_10_ms"] <= timeline["excess_ms"]
            # The step's five products, each timed as issued and transposed.
            products = f["step_products_ms"]
            assert len(products) == 5
            assert all(v["as_issued"] > 0 and v["transposed"] > 0 and v["tflops"] > 0
                       for v in products.values())
    names = {t["name"] for t in result["targets"]}
    assert names == {
        "gpu_fit_fraction_of_matmul_float32", "gpu_fit_fraction_of_matmul_bf16",
        "gpu_fit_over_plain_gather_bf16", "gpu_step_fraction_of_matmul_bf16",
        "gpu_short_fit_overhead_float32", "gpu_short_fit_overhead_bf16",
        "gpu_small_fit_over_plain_device_float32", "gpu_small_fit_over_plain_device_bf16",
    }
    # A figure that noise left undefined is recorded as not met, never dropped.
    assert all(t["value"] > 0 if t["value"] is not None else not t["met"]
               for t in result["targets"])
    # The export's paths at the reference size: every host one timed, the
    # registered one (CUDA only) absent.
    paths = result["export_paths_ms"]
    ref = tiny["shapes"]["reference"]
    assert paths["shape"] == [ref["n"], ref["d"]] and "export_paths_error" not in result
    timed = ("to_host", "to_host_touched", "touch", "copy_fresh", "copy_touched")
    assert set(paths) == {"shape", *timed}
    assert all(paths[k] > 0 for k in timed)
    # The partial figures on disk hold every size; no profile without a GPU.
    partial = json.loads((tmp_path / "gpu_partial.json").read_text())
    assert set(partial["sizes"]["small"]) >= {"float32", "bf16"}
    assert not (tmp_path / "gpu_profile.txt").exists() and "profile" not in result
    # On a GPU the first step's timing of each launch is recorded; the page
    # shows it (none on the CPU: nothing is timed there).
    from benchmarks import report

    assert "first step's timing" not in report._gpu_md(result)
    result["sizes"]["reference"]["bf16"]["codes_ways_us"] = {"plain": 262.0,
                                                             "default/16/4": 231.5}
    page = report._gpu_md(result)
    assert "first step's timing of the codes ways (us a call) | n/a | plain 262; default/16/4 232" \
        in page


def test_best_topk_encoder_of_true_atoms_beats_the_matched_filter():
    """The encoding section's reference trains: it codes better than ``W = atoms.T``."""
    from benchmarks.encoding import best_topk_encoder
    from sparse_dict.datasets import make_superposition
    from sparse_dict.metrics import explained_variance

    X, atoms, _ = make_superposition(6000, 16, 48, n_active=3, random_state=0,
                                     dtype=np.float32)
    X_train, X_eval = X[:5000], X[5000:]
    encode = best_topk_encoder(atoms, X_train, 3, 300)
    codes = encode(X_eval)
    assert codes.shape == (1000, 48)
    assert (np.count_nonzero(codes, axis=1) <= 3).all() and (codes >= 0).all()
    pre = np.maximum(X_eval @ atoms.T, 0)
    keep = np.argsort(-pre, axis=1)[:, :3]
    matched = np.zeros_like(pre)
    np.put_along_axis(matched, keep, np.take_along_axis(pre, keep, axis=1), axis=1)
    trained = explained_variance(X_eval, codes @ atoms)
    assert trained > explained_variance(X_eval, matched @ atoms) + 0.1


def _run_benchmarks(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "results.json").read_text())


def test_only_keeps_the_other_sections_of_an_earlier_run_of_the_same_mode(tmp_path):
    first = _run_benchmarks(tmp_path, "--tiny", "--only", "extraction", "--same-env")
    second = _run_benchmarks(tmp_path, "--tiny", "--only", "encoding", "--same-env")
    assert list(second["sections"]) == ["encoding", "extraction"]  # the suite's order
    assert second["kept_sections"] == ["extraction"]
    kept = second["sections"]["extraction"]
    assert kept["machine"]["date"] == first["machine"]["date"]
    assert kept["builtin"] == first["sections"]["extraction"]["builtin"]
    assert second["sections"]["encoding"]["machine"]["date"] == second["machine"]["date"]
    assert {t["section"] for t in second["targets"]} == {"extraction", "encoding"}
    md = (tmp_path / "results.md").read_text()
    assert "reran encoding; the other sections (extraction) come from earlier runs" in md
    assert f"Run on {first['machine']['date']}" in md
    # Another mode's results (the reference figures) are kept unless told:
    # then replaced, not mixed with these.
    quick = dict(first, mode="quick", sections={"recovery": {"wall_s": 1.0}})
    (tmp_path / "results.json").write_text(json.dumps(quick))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    refused = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path),
                              "--tiny", "--only", "extraction", "--same-env"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "holds a --quick run" in refused.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == quick
    other = _run_benchmarks(tmp_path, "--tiny", "--only", "extraction", "--same-env",
                            "--replace")
    assert set(other["sections"]) == {"extraction"} and "kept_sections" not in other
    empty = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path),
                            "--tiny", "--only", ","], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert empty.returncode == 2 and "--only names no section" in empty.stderr


def test_a_merged_section_keeps_its_machine_its_targets_and_the_suite_s_order():
    from benchmarks.report import merge_run

    cpu = {"date": "2026-11-26", "device": "cpu"}
    gpu = {"date": "2026-11-27", "device": "cuda", "card": "NVIDIA H200"}
    target = {"name": "gpu_step", "value": 0.6, "met": True}
    base = {"mode": "quick", "machine": cpu, "kept_sections": ["steering"],
            "sections": {"gpu": {"targets": [dict(target, value=0.5, met=False)]},
                         "recovery": {"targets": [{"name": "r", "value": 1.0, "met": True}]},
                         "steering": {"targets": []}},
            "targets": []}
    run = {"mode": "quick", "machine": gpu, "sections": {"gpu": {"targets": [target]}}}
    merged = merge_run(base, run)
    # The section ran on the lent machine, not on the base run's.
    assert merged["sections"]["gpu"]["machine"] == gpu
    assert list(merged["sections"]) == ["recovery", "steering", "gpu"]
    assert merged["kept_sections"] == ["gpu", "steering"]
    assert [(t["section"], t["name"], t["met"]) for t in merged["targets"]] == [
        ("recovery", "r", True), ("gpu", "gpu_step", True)]
    assert base["sections"]["gpu"]["targets"][0]["met"] is False  # the base is not changed
    with pytest.raises(ValueError, match="cannot merge a --full run into a --quick run"):
        merge_run(base, dict(run, mode="full"))


def test_out_never_replaces_a_file_no_run_wrote(tmp_path):
    # A results.json that is not a run passed the mode guard, and it, the
    # markdown, a plot and a section's JSON of the user's were replaced.
    mine = {"results.json": b'{"my": "notes"}', "encoding.png": b"\x89PNG\r\n\x1a\nmine",
            "results.md": b"# my notes\n"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", "encoding",
                           "--same-env", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "that no benchmark run wrote" in proc.stderr
    for name, data in mine.items():
        assert name in proc.stderr
        assert (tmp_path / name).read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine)
    afile = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", "encoding",
                           "--out", str(afile)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    assert afile.read_bytes() == mine["results.md"]


def test_the_gpu_files_and_the_defaults_tables_are_not_replaced_either(tmp_path):
    # The GPU section's gpu_partial.json and gpu_profile.txt, and the
    # defaults benchmark's two tables, were written over whatever was there.
    from benchmarks import defaults
    from benchmarks.__main__ import _foreign_outputs

    mine = {"gpu_partial.json": b'{"my": "notes"}', "gpu_profile.txt": b"my notes\n"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    assert sorted(p.name for p in _foreign_outputs(tmp_path, ["gpu"])) == sorted(mine)
    assert _foreign_outputs(tmp_path, ["encoding"]) == []
    (tmp_path / "gpu_partial.json").write_text('{"sizes": {}}')
    (tmp_path / "gpu_profile.txt").write_text("torch.profiler: one 50-step fit\n")
    assert _foreign_outputs(tmp_path, ["gpu"]) == []
    (tmp_path / "defaults.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as info:
        defaults.main(["--out", str(tmp_path)])  # refused before any fit
    assert info.value.code == 2
    assert (tmp_path / "defaults.md").read_text() == "my notes\n"
    assert not (tmp_path / "defaults.json").exists()


def test_a_run_on_the_cpu_leaves_the_gpu_section_out_unless_asked():
    # Its sizes are a GPU's: the default quick run on two cores would have
    # spent hours in it.
    from benchmarks.__main__ import _parse

    assert "gpu" not in _parse([]).sections and "gpu" not in _parse(["--full"]).sections
    assert "gpu" in _parse(["--device", "cuda"]).sections
    assert "gpu" in _parse(["--tiny"]).sections  # its smoke test
    assert _parse(["--only", "gpu"]).sections == ["gpu"]


@pytest.mark.parametrize("finishes", [False, True])
def test_the_gpu_session_keeps_partial_figures_of_a_section_cut_by_its_limit(tmp_path,
                                                                             finishes):
    # The session script, with a stand-in for python whose benchmark writes
    # its partial figures and then either finishes or runs past its limit.
    import shutil

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(root / "benchmarks" / "gpu_session.sh", tmp_path / "benchmarks")
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "benchmarks" ]; then\n'
        '  out=""; while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done\n'
        '  mkdir -p "$out"; echo "{}" > "$out/gpu_partial.json"\n'
        + ('  echo "{}" > "$out/results.json"\n' if finishes else "  sleep 20\n")
        + "fi\nexit 0\n")
    fake.chmod(0o755)
    out = tmp_path / "OUT"
    subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out), "2", "1", "1"],
                   cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)},
                   capture_output=True, timeout=120, check=False)
    assert (out / "gpu" / "results.json").exists() == finishes
    assert (out / "gpu" / "gpu_partial.json").exists() == (not finishes)
