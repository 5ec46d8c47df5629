"""Run the benchmark suite: ``python -m benchmarks [--quick|--full|--tiny]``.

Writes ``results.json`` (every figure, the machine and the targets),
``results.md`` (tables) and PNG plots to ``--out`` (default
``benchmarks/results/``). Sections (``--only`` takes a comma-separated
subset): recovery, frontier, time_to_quality, scaling, encoding, throughput,
steering, extraction, extraction_disk, distributed, findings (the seed paper's findings: dictionary
size, universality and feature splitting on the built-in model), gpu (the training step and
the whole fit against the device's dense matrix-product rate in float32 and bfloat16, and
against a plain torch loop, at four sizes up to d=2048 and N=65536; meant for
``--device cuda``, where it also writes a profiler summary), saelens_throughput
(against SAELens, in its own optional environment: see
``benchmarks/requirements-saelens.txt``; skipped, with the reason recorded, when
that is missing). A section that fails is recorded with its error and the others
still run; the exit status is then 1.

A run of one mode is refused where ``results.json`` holds a run of another
mode (a ``--tiny`` smoke test would replace the reference figures), unless
``--replace`` is given, and so is an output folder holding a file by one of
the run's names that no run wrote (a user's own ``results.json``, a plot
without sparse_dict's PNG mark). The sections a run leaves out (those not in
``--only``; the gpu section, which a quick or full run on the CPU skips: its
sizes are a GPU's) keep their figures from a ``results.json`` of the same
mode already in the output folder, each with the machine and date it ran on,
so that rerunning one section updates the reference results instead of
replacing them with that section alone.

The sections that put the SAE beside scikit-learn (recovery, frontier,
time_to_quality, scaling, encoding), the throughput section (which puts
torch's matrix product beside OpenBLAS's) and the SAELens comparison (whose
SAELens side already runs in its own environment) run in child processes whose environment lacks
``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``: this machine sets them, and
they halve the OpenBLAS that scikit-learn's numpy uses. The BLAS kernel of
each child is printed and recorded (``--same-env`` runs everything in this process with the
environment as it is, to measure what the override costs). That one child
writes each section's figures to ``sections/NAME.json`` under the output
folder as soon as the section ends.
"""

import argparse
import importlib
import inspect
import json
import os
import sys
import traceback
from pathlib import Path

from benchmarks._common import Timer, blas_summary, machine_info, run_isolated

SECTIONS = ("recovery", "frontier", "time_to_quality", "scaling", "encoding",
            "throughput", "steering", "extraction", "extraction_disk", "distributed",
            "findings", "gpu", "saelens_throughput")
# Sections of the tiny (smoke-test) mode: the SAELens comparison needs its
# optional environment.
TINY_SECTIONS = tuple(name for name in SECTIONS if name != "saelens_throughput")
# Sections that compare the SAE with scikit-learn: run with the clean BLAS environment.
# throughput too: it compares torch's matrix product with OpenBLAS's, which the
# overrides halve.
ISOLATED = ("recovery", "frontier", "time_to_quality", "scaling", "encoding", "throughput",
            "saelens_throughput")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Sections whose module is named otherwise.
MODULES = {"extraction": "extraction_speed"}


def run_section(name, mode, device, out_dir=None):
    """One section's figures (with ``wall_s``), or its error, run in this process.

    A section whose ``run`` takes ``out_dir`` (gpu) is given the output
    folder, for the files it writes beside its figures.
    """
    with Timer() as t:
        try:
            module = importlib.import_module(f"benchmarks.{MODULES.get(name, name)}")
            extra = ({"out_dir": out_dir}
                     if "out_dir" in inspect.signature(module.run).parameters else {})
            result = module.run(mode=mode, device=device, **extra)
        except Exception:  # noqa: BLE001 - record and go on with the other sections
            result = {"error": traceback.format_exc()}
    result["wall_s"] = t.seconds
    return result


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="minutes on two CPU cores (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the issue's full sizes (an hour or more on a CPU)")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="seconds; for the smoke test, figures are not meaningful")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default benchmarks/results/)")
    parser.add_argument("--same-env", action="store_true",
                        help="run every section in this process, BLAS environment as it is")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sections out of {', '.join(SECTIONS)}")
    parser.add_argument("--replace", action="store_true",
                        help="let a run of one mode replace the results of another mode in "
                        "--out (refused otherwise: a --tiny run would replace the reference "
                        "figures)")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        if not names:
            parser.error(f"--only names no section; choose from {list(SECTIONS)}")
        unknown = sorted(set(names) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    else:
        names = list(TINY_SECTIONS if args.mode == "tiny" else SECTIONS)
        if args.mode != "tiny" and args.device == "cpu":
            # Its sizes are a GPU's: at d=2048 one step takes 9 s on two
            # cores, and the section hours. --only gpu runs it anyway.
            names.remove("gpu")
    args.sections = names
    return args


def _json_object(path):
    """The JSON object in ``path``, or None (missing, unreadable, or not an object)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_run(path):
    run = _json_object(path) or {}
    return isinstance(run.get("mode"), str) and isinstance(run.get("sections"), dict)


def _is_section(path):
    return "wall_s" in (_json_object(path) or {})


def _starts_with(prefix):
    """A recogniser of text files that start with ``prefix``."""
    def recognise(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read(len(prefix)) == prefix
        except OSError:
            return False

    return recognise


_is_markdown = _starts_with("# sparse_dict benchmarks")
_is_gpu_profile = _starts_with("torch.profiler:")


def _is_gpu_partial(path):
    return "sizes" in (_json_object(path) or {})


def _foreign_outputs(out, sections):
    """Files in ``out`` this run would write over that no benchmark run wrote.

    A run writes ``results.json``, ``results.md``, every section's plot and
    ``sections/NAME.json``; one of those names holding a user's own file
    (a ``results.json`` that is not a run, a plot without sparse_dict's PNG
    mark) is refused, not replaced.
    """
    from benchmarks.report import PLOTS
    from sparse_dict import _persist

    checks = [(out / "results.json", _is_run), (out / "results.md", _is_markdown)]
    checks += [(out / name, _persist.PNG.recognize) for names in PLOTS.values()
               for name in names]
    checks += [(out / "sections" / f"{name}.json", _is_section) for name in sections]
    if "gpu" in sections:
        # The GPU section's progress file and its profile (on a GPU).
        checks += [(out / "gpu_partial.json", _is_gpu_partial),
                   (out / "gpu_profile.txt", _is_gpu_profile)]
    return [path for path, recognise in checks if os.path.lexists(path)
            and not (path.is_file() and not path.is_symlink() and recognise(path))]


def _mode_of(out):
    """The mode of the run whose ``results.json`` is in ``out``, or None."""
    mode = (_json_object(out / "results.json") or {}).get("mode")
    return mode if isinstance(mode, str) else None


def _earlier_sections(out, mode, rerun):
    """The sections of ``out/results.json`` (same ``mode``) that are not in ``rerun``.

    Each keeps the machine it ran on: its own ``"machine"`` when it was merged
    before, else that of the run it came from. A file of another mode, or one
    that cannot be read as a benchmark run, contributes nothing and is
    replaced, as a run without ``--only`` replaces it.
    """
    try:
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
        if earlier.get("mode") != mode:
            return {}
        return {name: dict(section, machine=section.get("machine") or earlier["machine"])
                for name, section in earlier["sections"].items() if name not in rerun}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def main(argv=None):
    """Run the chosen sections and write the results; return the exit status."""
    from benchmarks import report

    args = _parse(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available.", file=sys.stderr)
            return 2
    if os.path.lexists(args.out) and not args.out.is_dir():
        print(f"--out {args.out}: it exists and is not a folder.", file=sys.stderr)
        return 2
    foreign = _foreign_outputs(args.out, args.sections)
    if foreign:
        print(f"--out {args.out} holds files this run would replace that no benchmark run "
              f"wrote: {', '.join(str(p.relative_to(args.out)) for p in foreign)}; choose "
              "another --out, or move them.", file=sys.stderr)
        return 2
    earlier_mode = _mode_of(args.out)
    if earlier_mode not in (None, args.mode) and not args.replace:
        print(f"{args.out / 'results.json'} holds a --{earlier_mode} run, which this --"
              f"{args.mode} run would replace; choose another --out, or pass --replace.",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Sections not run this time (those left out of --only, or the gpu
    # section on the CPU) keep their figures from a run of the same mode.
    kept = _earlier_sections(args.out, args.mode, args.sections)
    results = {
        "mode": args.mode,
        "machine": machine_info(args.device),
        "sections": dict(kept),
    }
    if kept:
        results["kept_sections"] = sorted(kept)
        print(f"[benchmarks] keeping {', '.join(sorted(kept))} from the earlier run in "
              f"{args.out}", flush=True)
    print(f"[benchmarks] BLAS here: {blas_summary(results['machine']['blas'])}; "
          f"in the comparison processes: {blas_summary(results['machine']['blas_isolated'])}",
          flush=True)
    with Timer() as total:
        isolated = [] if args.same_env else [n for n in args.sections if n in ISOLATED]
        if isolated:
            # Each section's JSON lands in sections/ as soon as it ends, so an
            # interrupted run keeps its figures.
            done = run_isolated(isolated, args.mode, args.device, args.out / "sections")
        for name in args.sections:
            if name in isolated:
                section = done[name]
            else:
                print(f"[benchmarks] {name} ({args.mode}) ...", flush=True)
                section = run_section(name, args.mode, args.device, args.out)
                if "error" in section:
                    print(section["error"], file=sys.stderr, flush=True)
                print(f"[benchmarks] {name}: {section['wall_s']:.1f} s", flush=True)
            if kept:
                section["machine"] = results["machine"]
            results["sections"][name] = section
            # Written after every section so that an interrupted run keeps its figures.
            report.write_json(results, args.out / "results.json")
    results["total_wall_s"] = total.seconds
    # Kept and rerun sections in the suite's order, as a whole run writes them.
    results["sections"] = {name: results["sections"][name] for name in SECTIONS
                           if name in results["sections"]}
    results["targets"] = [
        dict(t, section=name)
        for name, section in results["sections"].items()
        for t in section.get("targets", [])
    ]
    report.write_json(results, args.out / "results.json")
    report.write_markdown(results, args.out / "results.md")
    report.write_plots(results, args.out)
    print(f"[benchmarks] wrote {args.out} in {total.seconds:.0f} s", flush=True)
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  {'MET    ' if t['met'] else 'NOT MET'} {t['name']}: {value} "
              f"(target {t['comparison']} {t['threshold']:g})")
    failed = [n for n, s in results["sections"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
