"""Write a benchmark run as JSON, markdown tables and PNG plots.

Every function takes the results dict that :mod:`benchmarks.__main__` builds:
``{"mode", "machine", "sections": {name: figures}, "targets", ...}``.
"""

import json
import math
import re
from pathlib import Path

import numpy as np

from sparse_dict import _persist

# The PNG each section draws (a section that failed draws nothing).
PLOTS = {
    "recovery": ["recovery.png"],
    "frontier": ["frontier.png"],
    "time_to_quality": ["time_to_quality.png"],
    "scaling": ["scaling_time.png", "scaling_memory.png"],
    "encoding": ["encoding.png"],
    "throughput": ["throughput.png"],
    "steering": [],
    "extraction": [],
    "extraction_disk": [],
    "distributed": [],
    "saelens_throughput": [],
    "findings": ["size_curve.png"],
    "gpu": [],
}


def _clean(obj):
    """JSON-ready copy: numpy scalars to Python, NaN and inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def write_json(results, path):
    """Write ``results`` to ``path`` as strict JSON (no NaN)."""
    Path(path).write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n",
                          encoding="utf-8")


def merge_run(results, other):
    """``results`` with the sections of ``other``, a run of the same mode, in place of its own.

    For a section run apart, as the ``gpu`` section is on a lent machine:
    each merged section keeps the machine it ran on (its own ``"machine"``,
    else ``other``'s), joins ``kept_sections``, and brings its targets. A
    section merged without its machine was once labelled with the next
    CPU run's (the H200's figures read "device cpu, torch 2.13.0+cpu").

    Examples
    --------
    >>> base = {"mode": "quick", "machine": {"date": "1"}, "targets": [],
    ...         "sections": {"recovery": {"targets": []}}}
    >>> gpu = {"mode": "quick", "machine": {"date": "2", "device": "cuda"},
    ...        "sections": {"gpu": {"targets": [{"name": "t", "met": True}]}}}
    >>> merged = merge_run(base, gpu)
    >>> merged["sections"]["gpu"]["machine"]["device"], merged["kept_sections"]
    ('cuda', ['gpu'])
    >>> merged["targets"]
    [{'name': 't', 'met': True, 'section': 'gpu'}]
    """
    from benchmarks.__main__ import SECTIONS

    if other.get("mode") != results.get("mode"):
        raise ValueError(f"cannot merge a --{other.get('mode')} run into a "
                         f"--{results.get('mode')} run: their sizes differ.")
    sections = dict(results["sections"])
    for name, section in other["sections"].items():
        sections[name] = dict(section, machine=section.get("machine") or other["machine"])
    merged = dict(results)
    merged["sections"] = {name: sections[name] for name in SECTIONS if name in sections}
    merged["kept_sections"] = sorted(set(results.get("kept_sections", []))
                                     | set(other["sections"]))
    merged["targets"] = [dict(t, section=name) for name, section in merged["sections"].items()
                         for t in section.get("targets", [])]
    return merged


# ------------------------------------------------------------------ markdown
def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


# Tables are written as markdown or as reStructuredText list-tables; the
# text around them is valid in both (paragraphs and **bold**).
_STYLE = {"format": "md"}


def _rst_cell(text):
    return " " + text if text else ""


def _table(header, rows):
    cells = [[_fmt(v) for v in row] for row in rows]
    if _STYLE["format"] == "rst":
        lines = [".. list-table::", "   :header-rows: 1", ""]
        for row in [list(header)] + cells:
            lines.append("   * -" + _rst_cell(row[0]))
            lines += ["     -" + _rst_cell(c) for c in row[1:]]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _blas_line(m):
    from benchmarks._common import blas_summary

    here = blas_summary(m.get("blas"))
    child = blas_summary(m.get("blas_isolated"))
    return (f"BLAS in the main process: {here}. BLAS in the processes that compare the SAE "
            f"with scikit-learn: {child}.")


def _machine_md(m):
    card = f", card {m['card']}" if m.get("card") else ""
    load = m.get("load_average_at_start")
    load = f"; load average at start {', '.join(f'{v:.1f}' for v in load)}" if load else ""
    return (
        f"{m['cpu_model']}, {m['cpus_available']} of {m['cpu_count']} cores available, "
        f"{m['torch_threads']} torch threads; device {m['device']}{card}{load}.  \n"
        f"Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, scipy {m['scipy']}, "
        f"scikit-learn {m['sklearn']}, sparse_dict {m['sparse_dict']}; {m['platform']}.  \n"
        f"Date {m['date']}.  \n"
        + _blas_line(m)
    )


def _kept_md(results):
    """Which sections an ``--only`` run kept from an earlier run ("" when none)."""
    kept = results.get("kept_sections")
    if not kept:
        return ""
    return (f"This run ({results['machine']['date']}) reran "
            f"{', '.join(n for n in results['sections'] if n not in kept)}; the other "
            f"sections ({', '.join(kept)}) come from earlier runs, each with its machine and "
            f"date below its tables.\n")


def _section_machine_md(section, results):
    """Where a section that ran apart from the run's machine line ran ("" otherwise)."""
    m = section.get("machine")
    if not m or m.get("date") == results["machine"].get("date"):
        return ""
    card = f", card {m['card']}" if m.get("card") else ""
    return (f" Run on {m['date']}: {m['cpu_model']}, device {m['device']}{card}, "
            f"torch {m['torch']}, sparse_dict {m['sparse_dict']}.")


def _targets_md(targets):
    rows = [
        [t["section"], t["description"], t["value"], f"{t['comparison']} {t['threshold']:g}",
         "**met**" if t["met"] else "**not met**", t.get("note", "")]
        for t in targets
    ]
    return _table(["section", "target", "value", "threshold", "", "note"], rows)


def _recovery_md(r):
    from benchmarks.recovery import case_name

    out = ["Every method learns as many atoms as there are true ones; MMCS = mean max "
           "cosine similarity to the true atoms. The 'rows' column is the number of "
           "training rows each method saw: where MiniBatchDictionaryLearning saw fewer, the "
           "best top-k-family SAE was also fitted on those rows (marked 'as MBDL').\n"]
    mbdl = r.get("settings", {}).get("mbdl", {})
    if mbdl.get("cosine"):
        out.append("MiniBatchDictionaryLearning ran at alpha "
                   + ", ".join(f"{a:g}" for a in mbdl["alpha"])
                   + "; the summary takes its best MMCS (the alpha column says which). Its "
                   "codes are signed, so its MMCS and recovery rate are on the absolute cosine (an atom "
                   "learned as the negative of a true one is an exact solution); the SAEs', "
                   "whose codes are non-negative, are on the signed cosine.\n")
    summary = [[case_name(c), c["best_topk_family"], c["best_topk_family_mmcs"],
                c["best_topk_family_same_rows_mmcs"], c["mbdl_mmcs"],
                _alpha(c.get("mbdl_best_alpha")), c["margin_over_mbdl"],
                "fewer" if c["mbdl_rows_fewer"] else "same"]
               for c in r["cases"]]
    out.append(_table(["case", "best top-k-family SAE", "its MMCS", "MMCS on MBDL's rows",
                       "MBDL MMCS", "MBDL alpha", "margin (equal rows)", "MBDL rows"],
                      summary))
    out.append("")
    for case in r["cases"]:
        out.append(f"**{case_name(case)}**, about {case['n_active']:g} active per row "
                   f"(scored on {case['n_eval_rows']:,} held-out rows; SAE "
                   f"{case['sae_steps']:,} steps)\n")
        rows = [[m["method"], m["n_rows"], m["mmcs"], m["recovery_0.9"],
                 m["explained_variance"], m["l0"], m["dead_fraction"], m["fit_s"],
                 m["transform_rows_per_s"]]
                for m in case["methods"]]
        out.append(_table(["method", "rows", "MMCS", "recovered at 0.9", "EV", "L0", "dead",
                           "fit s", "transform rows/s"], rows))
        out.append("")
    return "\n".join(out)


def _margin(value, outside=0):
    """A frontier margin, with the points of the other method it could not compare."""
    if value is None:
        return (f"n/a (all {outside} point(s) at L0 <= 32 below the frontier's L0 range)"
                if outside else "n/a (no point at L0 <= 32)")
    text = f"{value:+.3f}"
    return text + (f" ({outside} below range)" if outside else "")


def _frontier_md(r):
    out = []
    for key in ("builtin", "minilm"):
        model = r.get(key, {})
        if "skipped" in model:
            out.append(f"**{key}**: skipped ({model['skipped']})\n")
            continue
        out.append(
            f"**{model['model']}**, {model['hook']} ({model['n_features']} wide): "
            f"{model['n_train_tokens']:,} training tokens, {model['n_eval_tokens']:,} "
            f"held-out tokens; {model['n_components']:,} atoms for every method; SAE "
            f"{model['steps']:,} steps. MiniBatchDictionaryLearning saw "
            f"{model['mbdl_rows']:,} of the {model['n_train_tokens']:,} training rows"
            + (" (each SAE marked 'as MBDL' saw those same rows: every activation over "
               "its grid)." if model["mbdl_rows"] < model["n_train_tokens"] else ".") + "\n"
        )
        rows = []
        for p in model["sae"]:
            splice = p.get("splice") or {}
            # Dead on the held-out rows for every method (the SAE rows showed
            # the training rows' share beside MBDL's held-out one, which
            # favoured the SAE: 0.162 against 0.477 held out, topk k=4).
            rows.append([p["method"], p["n_rows"], p["l0"], p["explained_variance"],
                         p["dead_fraction"], p["train_dead_fraction"], p["fit_s"],
                         splice.get("loss_recovered"), splice.get("kl_divergence"),
                         splice.get("cosine_spliced")])
        for p in model["mbdl"]:
            rows.append([p["method"], p["n_rows"], p["l0"], p["explained_variance"],
                         p["dead_fraction"], None, p["fit_s"], None, None, None])
        out.append(_table(["method", "rows", "L0", "EV", "dead (held-out)",
                           "dead (training)", "fit s", "loss recovered", "KL (nats)",
                           "output cosine"], rows))
        c = model["comparison"]
        out.append("\nFrontier margins (EV of the activation's frontier minus the other's "
                   "points, L0 <= 32; >= 0 means on or above; 'below range': points of the "
                   "other below the frontier's lowest L0, not compared):\n")
        equal = any("equal_rows_vs_mbdl" in v for v in c["per_activation"].values())
        header = ["activation", f"vs MBDL (SAE on all {model['n_train_tokens']:,} rows, "
                                f"MBDL on {model['mbdl_rows']:,})"]
        if equal:
            header.append(f"vs MBDL, both on MBDL's {model['mbdl_rows']:,} rows")
        header.append("vs ReLU SAE")
        rows = []
        for a, v in c["per_activation"].items():
            row = [a + (" (best)" if a == c["best_activation"] else ""),
                   _margin(v["vs_mbdl"], v["mbdl_points_below_range"])]
            if equal:
                row.append(_margin(v.get("equal_rows_vs_mbdl"),
                                   v.get("equal_rows_mbdl_points_below_range", 0))
                           + (" (best)" if a == c.get("equal_rows_best_activation") else ""))
            row.append("(itself)" if a == "relu"
                       else _margin(v["vs_relu"], v["relu_points_below_range"]))
            rows.append(row)
        out.append(_table(header, rows))
        if "equal_rows_vs_mbdl" in c and not equal:
            # A result from before every activation was fitted on MBDL's rows.
            out.append(f"\nOn MBDL's rows only, the SAE's margin over MBDL: "
                       f"{_margin(c['equal_rows_vs_mbdl'])}.\n")
        g = model.get("amortisation_gap")
        if g:
            out.append(f"\nAmortisation gap of {g['method']} on {g['n_rows']:,} held-out "
                       f"rows: non-negative OMP at L0 {g['l0']} EV {_fmt(g['optimal'])} - "
                       f"encoder {_fmt(g['encoder'])} = **{_fmt(g['gap'])}**.\n")
        out.append("")
    return "\n".join(out)


def _alpha(value):
    return None if value is None else f"{value:g}"


def _ttq_alphas(r):
    """MiniBatchDictionaryLearning's alphas in a time-to-quality result (one before the sweep)."""
    settings = r.get("settings", {})
    return list(settings.get("mbdl_alphas") or [settings.get("mbdl_alpha", 0.1)])


def _ttq_md(r):
    c = r["case"]
    alphas = _ttq_alphas(r)
    primary = r["primary_level"].get("defined_by_alpha", alphas[0])
    out = [f"{c['n_features']} features, {c['n_atoms']} atoms for both methods, the same "
           f"{c['n_rows']:,} training rows (scored on {c['n_eval']:,} held-out rows). "
           f"MiniBatchDictionaryLearning ran one pass at each alpha of "
           f"{', '.join(f'{a:g}' for a in alphas)}; its time to a level is the fastest "
           f"over them (the alpha column says which). The primary and dictionary levels are "
           f"its final point at alpha {primary:g}, the setting the issue defined the level "
           f"with and the one of highest EV.\n"]
    rows = []
    for name, level in ((f"primary (MBDL's final, alpha {primary:g})", r["primary_level"]),
                        ("common (best SAE fit MBDL also reaches)", r["common_level"])):
        if level is None:
            rows.append([name, "none", None, None, None, None])
            continue
        rows.append([name, f"EV >= {level['explained_variance']:.3f}, L0 <= {level['l0']:.1f}",
                     _alpha(level.get("mbdl_alpha")), level["mbdl_s"], level["sae_s"],
                     level["speedup"]])
    d = r.get("dictionary_level")
    if d:
        rows.append([f"dictionary (MBDL's final MMCS, alpha {primary:g})",
                     f"MMCS >= {d['mmcs']:.3f}", _alpha(d.get("mbdl_alpha")), d["mbdl_s"],
                     d["sae_s"], d["speedup"]])
    out.append(_table(["level", "criterion", "MBDL alpha", "MBDL s", "SAE s",
                       "speed-up (MBDL s / SAE s)"], rows))
    per = r["primary_level"].get("per_activation") or {}
    if per:
        out.append("\nTime to MBDL's final level, per activation (fastest setting of each):\n")
        out.append(_table(["activation", "SAE s", "speed-up"],
                          [[a, v["sae_s"], v["speedup"]] for a, v in per.items()]))
    out.append("\nMiniBatchDictionaryLearning checkpoints:\n")
    out.append(_table(["alpha", "batches", "fit s", "EV", "L0", "MMCS"],
                      [[_alpha(p.get("alpha", alphas[0])), p["steps"], p["fit_s"],
                        p["explained_variance"], p["l0"], p.get("mmcs")]
                       for p in r["mbdl_trajectory"]]))
    out.append("\nSAE fits:\n")
    out.append(_table(["setting", "steps", "fit s", "EV", "L0", "MMCS", "reaches primary"],
                      [[p["setting"], p["steps"], p["fit_s"], p["explained_variance"], p["l0"],
                        p.get("mmcs"), p["reaches_primary"]]
                       for p in r["sae_fits"]]))
    return "\n".join(out) + "\n"


def _union_table(label, sae_x, sae_s, mbdl_x, mbdl_s):
    sae, mbdl = dict(zip(sae_x, sae_s)), dict(zip(mbdl_x, mbdl_s))
    sizes = sorted(set(sae) | set(mbdl))
    return _table([label, "SAE s", "MBDL s"], [[n, sae.get(n), mbdl.get(n)] for n in sizes])


def _span(sizes):
    return f"{min(sizes):,}-{max(sizes):,}"


def _same_range(part, mbdl_sizes):
    """The SAE's slope over MBDL's range of sizes, where it was recorded."""
    if part.get("sae_slope_mbdl_range") is None:
        return ""
    return (f" (SAE over MBDL's {_span(mbdl_sizes)}: "
            f"{_fmt(part['sae_slope_mbdl_range'])})")


def _scaling_md(r):
    t = r["time"]
    out = []
    vs = t["vs_n_samples"]
    out.append(f"Fit time against n_samples ({t['n_features']} features, "
               f"{vs['n_components']} atoms; SAE {t['sae_epochs']} epochs, MBDL 1 pass). "
               f"Log-log slope: SAE {_fmt(vs['sae_slope'])} over {_span(vs['n_samples'])}, "
               f"MBDL {_fmt(vs['mbdl_slope'])} over {_span(vs['mbdl_n_samples'])}"
               + _same_range(vs, vs["mbdl_n_samples"]) + ".\n")
    out.append(_union_table("n_samples", vs["n_samples"], vs["sae_s"],
                            vs["mbdl_n_samples"], vs["mbdl_s"]))
    vc = t["vs_n_components"]
    out.append(f"\nFit time against n_components (SAE {vc['n_samples']:,} rows, MBDL "
               f"{vc.get('mbdl_n_samples', vc['n_samples']):,} rows). Log-log slope: "
               f"SAE {_fmt(vc['sae_slope'])} over {_span(vc['n_components'])}, MBDL "
               f"{_fmt(vc['mbdl_slope'])} over {_span(vc['mbdl_n_components'])}"
               + _same_range(vc, vc["mbdl_n_components"]) + ".\n")
    out.append(_union_table("n_components", vc["n_components"], vc["sae_s"],
                            vc["mbdl_n_components"], vc["mbdl_s"]))
    m = r["memory"]
    out.append(f"\nMemory fitting from a memmap ({m['n_features']} features, "
               f"{m['n_components']} atoms, batch {m['batch_size']}, one epoch). "
               f"Measure: {m['measure']}. Growth of peak anonymous memory from the smallest "
               f"to the largest file: {100 * m['growth']:.1f}%.\n")
    out.append(_table(["file MB", "rows", "fit s", "RssAnon before fit MB",
                       "peak RssAnon MB", "VmHWM MB"],
                      [[x["file_mb"], x["n_rows"], x["fit_s"], x["rss_anon_before_fit_mb"],
                        x["peak_rss_anon_mb"], x["vm_hwm_mb"]] for x in m["runs"]]))
    return "\n".join(out) + "\n"


def _encoding_md(r):
    c = r["case"]
    g = r["amortisation_gap"]
    out = [f"SAEs of {c['n_atoms']} atoms on {c['n_features']} features; the SAE encodes "
           f"{c['n_sae']:,} rows, the per-row coders {c['n_slow']:,}"
           + (f"; each coder's time is the fastest of {r['timing_repeats']} calls"
              if r.get("timing_repeats") else
              "; the SAE's time is the fastest of 5 calls, each per-row coder's one call")
           + f". Speed-up over LARS at matched L0: {_fmt(r['speedup_vs_lars'])}x.\n"]
    out.append(_table(["coder", "rows/s", "L0", "EV"],
                      [[x["coder"], x["rows_per_s"], x["l0"], x["explained_variance"]]
                       for x in r["coders"]]))
    out.append("\nAmortisation gap per activation (non-negative OMP of each SAE's own "
               "dictionary at its L0, minus its encoder):\n")
    out.append(_table(["SAE", "L0", "encoder EV", "OMP EV", "gap"],
                      [[x["setting"], x["l0"], x["encoder"], x["optimal"], x["gap"]]
                       for x in r.get("gaps", [])]))
    out.append(f"\nBest top-k-family activation ({g.get('setting', 'SAE')}): gap "
               f"**{_fmt(g['gap'])}**.\n")
    ref = r.get("true_atoms_gap")
    if ref:
        out.append(f"Reference for the architecture: the best top-k encoder (k={ref['l0']}) of "
                   f"the true atoms, trained against them for {ref['steps']:,} steps, reaches EV "
                   f"{_fmt(ref['encoder'])} where non-negative OMP on the true atoms reaches "
                   f"{_fmt(ref['optimal'])}: the data's own atoms leave a gap of "
                   f"**{_fmt(ref['gap'])}** to a top-k encoder, however well trained. "
                   f"The SAEs trained on {c['n_rows']:,} rows "
                   f"({c['n_rows'] / c['n_atoms']:.0f} an atom), so that the gap is not the "
                   f"encoder overfitting its rows.\n")
    return "\n".join(out)


def _throughput_md(r):
    s = r["shape"]
    by_library = r.get("matmul_gflops_by_library", {"torch": r["matmul_gflops"]})
    rows = [[f"dense matmul ({library})", rate, rate / r["matmul_gflops"]]
            for library, rate in by_library.items()]
    if "sae_step_gflops" in r:
        rows.append(["SAE training step alone (loss and gradients)", r["sae_step_gflops"],
                     r["sae_step_fraction_of_matmul"]])
    rows += [["SAE training loop (sparse_dict Trainer)", r["sae_gflops"],
              r["sae_fraction_of_matmul"]],
             ["plain torch loop", r["plain_loop_gflops"], r["plain_fraction_of_matmul"]]]
    out = (f"Batch {s['batch']}, d={s['d']}, N={s['n']} on {r['device']} "
           f"({r['torch_threads']} torch thread(s)); one step = 10·B·d·N FLOPs; fractions "
           f"of the faster matrix product of the same round (median over rounds). "
           f"sparse_dict's CPU float32 products: "
           f"{r.get('sparse_dict_matmul_backend', 'torch')}. "
           f"SAE / plain loop: {_fmt(r['sae_over_plain'])}.\n\n"
           + _table(["", "GFLOP/s", "fraction of matmul"], rows) + "\n"
           + "\nTraining rows/s of each activation against the ReLU loop, same rounds "
             "(> 1: faster than ReLU):\n\n"
           + _table(["activation", "k", "rows/s", "ratio to ReLU"],
                    [[name, a["k"], a["rows_per_s"], a["over_relu"]]
                     for name, a in r.get("activations", {}).items()]) + "\n")
    sparse = r.get("sparse")
    if sparse:
        sh, rows_s = sparse["shape"], sparse["rows_per_s"]
        steps_s = sparse.get("step_rows_per_s", rows_s)
        out += (f"\nThe top-k family's sparse step against the dense ReLU step, d={sh['d']}, "
                f"N={sh['n']}, k={sh['k']}, B={sh['batch']} (the flop count allows about "
                f"{_fmt(sparse['flop_ratio'])}x); the step alone, and the whole training loop:"
                "\n\n"
                + _table(["", "step rows/s", "ratio", "loop rows/s", "ratio"],
                         [[name.replace("_", " "), steps_s[name], steps_s[name] / steps_s["relu"],
                           v, v / rows_s["relu"]] for name, v in rows_s.items()])
                + "\n")
    return out


def _saelens_md(r):
    if "skipped" in r:
        return f"Skipped: {r['skipped']}.\n"
    sz = r["sizes"]
    by_setting = r.get("saelens_rows_per_s_by_setting")
    if by_setting:
        rows = [[f"SAELens, use_sparse_activations={name}", rate]
                for name, rate in by_setting.items()]
        setting = (" SAELens ran with its codes dense and sparse (use_sparse_activations); "
                   "the faster is compared.")
    else:
        rows = [["SAELens", r["saelens_rows_per_s"]]]
        setting = (" SAELens ran with its default dense codes only: this run predates "
                   "timing use_sparse_activations too, which SAELens recommends for float32 "
                   "and a small k, so its best setting may be faster.")
    return (f"d={sz['d']}, N={sz['n']}, k={sz['k']}, B={sz['batch']}, {r['threads']} torch "
            f"thread(s), SAELens {r['saelens_version']} (torch {r['saelens_torch']}).{setting}"
            "\n\n"
            + _table(["TopK training loop", "rows/s"],
                     [["sparse_dict", r["sparse_dict_rows_per_s"]], *rows])
            + f"\nsparse_dict / SAELens: **{_fmt(r['speedup'])}**.\n")


# The gpu section's rows: (label, key in each dtype's figures).
_GPU_ROWS = (
    ("dense matmul TFLOP/s", "matmul_tflops"),
    ("fused step, ms", "step_ms"),
    ("fused step, fraction of matmul", "step_fraction_of_matmul"),
    ("step with torch's weight update, ms", "step_plain_update_ms"),
    ("step with the codes' plain passes, ms", "step_plain_codes_ms"),
    ("one-pass codes kernel chosen", "codes_kernel"),
    ("  its launch (codes kernel's programs / mask kernel's rows / warps)", "codes_launch"),
    ("step with the residual's plain operations, ms", "step_plain_residual_ms"),
    ("residual kernel chosen", "residual_kernel"),
    ("  its launch (programs / rows a tile)", "residual_launch"),
    ("step with ReLU after the encoder's product, ms", "step_plain_product_relu_ms"),
    ("ReLU in the product's epilogue chosen", "product_relu_kernel"),
    ("step with the statistics' plain operations, ms", "step_plain_penalty_stats_ms"),
    ("statistics kernel chosen", "penalty_stats_kernel"),
    ("step with the rows centred by torch's subtraction, ms", "step_plain_centre_ms"),
    ("centring kernel chosen", "centre_kernel"),
    ("fused step on the long fit's final state, ms", "step_trained_ms"),
    ("fused step on the long fit's final state, fraction of matmul",
     "step_trained_fraction_of_matmul"),
    ("whole fit, short (s)", "fit_short_s"),
    ("whole fit, long (s)", "fit_long_s"),
    ("whole fit, steady ms/step", "steady_ms_per_step"),
    ("whole fit, fraction of matmul", "fit_fraction_of_matmul"),
    ("short-fit overhead (short fit / its steady steps)", "short_fit_overhead"),
    ("short fit's batches streamed while its data was copied", "fit_short_streamed_batches"),
    ("plain loop (a) host batches, ms/step", "plain_gather_ms_per_step"),
    ("plain loop (b) device batches, ms/step", "plain_device_ms_per_step"),
    ("whole fit rows/s", "fit_rows_per_s"),
    ("sparse_dict / plain loop (a)", "over_plain_gather"),
    ("sparse_dict / plain loop (b)", "over_plain_device"),
)


def _gpu_md(r):
    out = [f"{r['card']} ({r['device']}), torch {r['torch']}, CUDA {r['cuda']}, float32 "
           f"matmul precision {r['float32_matmul_precision']}; batch {r['batch']}, "
           f"{r['n_rows']:,} rows of random data; one step = 10·B·d·N FLOPs."]
    first = r.get("first_fit")
    if first:
        out.append(f"Warm-up (first fit in process): {_fmt(first['seconds'])} s for "
                   f"{first['steps']} {first['dtype']} steps at the first size ({first['note']}).")
    if r.get("profile"):
        out.append(f"A torch.profiler summary of one short bf16 fit at the reference size is "
                   f"in {r['profile']}.")
    elif r.get("profile_error"):
        out.append("The profiler failed: " + r["profile_error"].strip().splitlines()[-1] + ".")
    paths = r.get("export_paths_ms")
    if paths:
        rows, cols = paths["shape"]
        out.append(f"Bringing one {rows:,} x {cols} float32 matrix back into a new host array "
                   "(ms, information for the short fit's export; `export_paths_ms`): "
                   + ", ".join(f"{k} {_fmt(v)}" for k, v in paths.items() if k != "shape")
                   + ".")
    elif r.get("export_paths_error"):
        out.append("The export measurement failed: "
                   + r["export_paths_error"].strip().splitlines()[-1] + ".")
    for label, size in r["sizes"].items():
        head = f"**{label}**: d={size['d']}, N={size['n']}, B={size['batch']}"
        if "error" in size:
            out.append(f"{head}: failed ({size['error'].strip().splitlines()[-1]}).")
            continue
        dtypes = [name for name in ("float32", "bf16") if name in size]
        steps = size[dtypes[0]]
        head += (f"; fits of {steps['short_steps']} and {steps['long_steps']} steps"
                 + (f" ({size['note']})" if size.get("note") else "") + ":")
        rows = [[row, *(size[name].get(key, "n/a") for name in dtypes)]
                for row, key in _GPU_ROWS]
        phases = [size[name].get("fit_short_phases_s", {}) for name in dtypes]
        rows += [[f"short fit's {phase} (s)", *(p.get(phase, "n/a") for p in phases)]
                 for phase in dict.fromkeys(k for p in phases for k in p)]
        parts = [size[name].get("fit_short_parts_s", {}) for name in dtypes]
        # A phase's parts, then the work of the fit's own threads beside them.
        rows += [[f"  {'' if part.startswith('beside') else 'of which '}{part} (s)",
                  *(p.get(part, "n/a") for p in parts)]
                 for part in dict.fromkeys(k for p in parts for k in p)]
        without = [size[name].get("fit_short_without_s", {}) for name in dtypes]
        rows += [[f"short fit without {piece} (s)", *(w.get(piece, "n/a") for w in without)]
                 for piece in dict.fromkeys(k for w in without for k in w)]
        for kernel in ("codes", "residual"):
            ways = [size[name].get(f"{kernel}_ways_us") for name in dtypes]
            if any(ways):
                rows.append([f"first step's timing of the {kernel} ways (us a call)",
                             *("; ".join(f"{k} {_fmt(v)}" for k, v in w.items()) if w else "n/a"
                               for w in ways)])
        products = [size[name].get("step_products_ms", {}) for name in dtypes]
        rows += [[f"product {product}, ms as issued / transposed",
                  *(f"{_fmt(p[product]['as_issued'])} / {_fmt(p[product]['transposed'])}"
                    if product in p else "n/a" for p in products)]
                 for product in dict.fromkeys(k for p in products for k in p)]
        out.append(head + "\n\n" + _table(["", *dtypes], rows))
    return "\n\n".join(out) + "\n"


def _distributed_md(r):
    s = r["shape"]
    rows = [[name, a["one_process_rows_per_s"], a["data_parallel_rows_per_s"], a["speedup"],
             a["max_abs_diff_components"], a["one_process_ev"], a["data_parallel_ev"]]
            for name, a in r["activations"].items()]
    n = r["n_processes"]
    return (f"{s['n_samples']:,} rows of {s['n_features']} features from a memmap, "
            f"{s['n_components']} atoms, global batch {s['batch_size']}, {s['steps']} steps; "
            f"one process with {r['cores']} thread(s) against {n} gloo processes with "
            f"{max(1, r['cores'] // n)} each, on {r['device']}.\n\n"
            + _table(["activation", "rows/s, 1 process", f"rows/s, {n} processes",
                      f"{n} / 1", "largest atom difference", "EV, 1 process",
                      f"EV, {n} processes"], rows) + "\n")


def _extraction_md(r):
    b, m = r["builtin"], r["minilm"]
    rows = [["built-in: plain forward, whole model", b["plain_forward_tokens_per_s"]],
            ["built-in: extractor (token ids)", b["extractor_tokens_per_s"]],
            ["built-in: extractor (texts)", b["extractor_from_text_tokens_per_s"]]]
    if "stopped_forward_tokens_per_s" in b:
        rows.insert(0, ["built-in: plain forward, stopped at the hook",
                        b["stopped_forward_tokens_per_s"]])
        head = ("extractor / plain forward stopped at the same module (the same work) = "
                f"{_fmt(b['ratio'])}; against the whole forward pass, which the extractor "
                f"does not run to its end, {_fmt(b['ratio_to_whole_forward'])}")
    else:  # a run before 2026-11-27: its plain pass ran the whole model
        head = (f"extractor / whole forward pass = {_fmt(b['ratio'])} (a run from before "
                "the plain pass stopped at the hook: not the same work)")
    out = (f"Built-in model, {b['n_tokens']:,} tokens; {head}.\n\n"
           + _table(["", "tokens/s"], rows) + "\n")
    if "skipped" in m:
        out += f"\nMiniLM: skipped ({m['skipped']}).\n"
    else:
        out += (f"\nMiniLM layer-1 extraction (early stop) {_fmt(m['layer1_extraction_s'])} s "
                f"against a full {m['n_layers']}-layer forward {_fmt(m['full_forward_s'])} s: "
                f"{_fmt(m['speedup'])}x.\n")
    return out


def _extraction_disk_md(r):
    rows = [[f"{x['n_tokens']:,}", f"{x['n_texts']:,}", x["store_mb"], x["extract_s"],
             x["tokens_per_s"], x["rss_before_mb"], x["vm_hwm_mb"], x["peak_rss_anon_mb"]]
            for x in r["runs"]]
    return (f"{r['model']} on {r['device']}, {r['chunk_texts']} texts a chunk. Growth of "
            f"peak memory (VmHWM) from the smallest to the largest corpus: "
            f"**{_fmt(r['growth'])}**.\n\n"
            + _table(["tokens", "texts", "store MB", "time s", "tokens/s",
                      "RSS before MB", "VmHWM MB", "peak RssAnon MB"], rows) + "\n")


def _literal(text):
    """``text`` shown as it is in a table cell of the current format.

    Token strings hold characters that are markup in reStructuredText
    (``|endoftext|`` is a substitution, a backslash escapes, ``*`` starts
    emphasis) or that end a cell in markdown (``|``).
    """
    if _STYLE["format"] == "rst":
        return re.sub(r"([\\`*_|<>\[\]:])", r"\\\1", text)
    return text.replace("|", "\\|")


def _steering_md(r):
    out = [f"ReLU SAE of {r['n_components']:,} features ({r['steps']:,} steps, training L0 "
           f"{_fmt(r['train_l0'])}) on {r['n_train_tokens']:,} tokens of the built-in model's "
           f"MLP; measured on {r['n_eval_positions']:,} positions of {r['n_eval_texts']} "
           f"held-out texts. Strength {r['strength']:.2f} ({r['strength_share']:g} x the "
           f"activations' RMS norm {_fmt(r['activation_rms_norm'])}). Mean log-prob increase "
           f"of each feature's top-10 promoted tokens: **{_fmt(r['feature_mean_increase'])}** "
           f"nats steering with the feature, {_fmt(r['random_mean_increase'])} with a random "
           f"direction of equal norm; ratio **{_fmt(r['ratio'])}**.\n"]
    out.append(_table(
        ["feature", "largest logit effect", "top promoted tokens", "increase (feature)",
         "increase (random)", "KL feature", "KL random"],
        [[x["feature"], x["largest_logit_effect"],
          _literal(" ".join(repr(t) for t in x["promoted"][:4])),
          x["feature_increase"], x["random_increase"], x["feature_kl"], x["random_kl"]]
         for x in r["features"]]))
    return "\n".join(out) + "\n"


def _code_block(lines):
    """Lines shown verbatim, in markdown and in reStructuredText alike."""
    if _STYLE["format"] == "rst":
        return "::\n\n" + "\n".join("   " + line for line in lines) + "\n"
    return "```text\n" + "\n".join(lines) + "\n```\n"


def _findings_size_md(r):
    out = [f"**Size curve** on {r['model']}, {r['hook']} ({r['n_features']} wide): top-k "
           f"SAEs with k = {r['k']} (L0 fixed), batches of {r['batch_size']} rows from "
           f"{r['n_train_tokens']:,} training tokens, {r['steps']:,} steps up to "
           f"{r.get('steps_reference_size', 0):,} features and sqrt(size / "
           f"{r.get('steps_reference_size', 0):,}) times as many above (column 'steps'), "
           "scored on "
           f"{r['n_eval_tokens']:,} held-out tokens ({r['n_eval_texts']} texts).\n"]
    out.append(_table(["features", "steps", "loss recovered", "EV", "L0", "KL (nats)",
                       "dead (train)", "live", "converged", "fit s"],
                      [[p["n_components"], p["steps"], p["loss_recovered"], p["explained_variance"],
                        p["l0"], p["kl_divergence"], p["train_dead_fraction"],
                        round(p["n_components"] * (1 - p["train_dead_fraction"])),
                        p.get("converged"), p["fit_s"]]
                       for p in r["size_curve"]]))
    out.append("\n'dead (train)': share of features that fired on no row late in training; "
               "'live': the features that did, how large the dictionary effectively is. "
               "'converged: no': the estimator warned that its loss was still falling when "
               "the step budget ran out.\n")
    rises = r["size_curve_rises"]
    out.append(f"\nLoss recovered rises at every size: **{_fmt(rises['loss_recovered'])}**; "
               f"explained variance rises at every size: "
               f"**{_fmt(rises['explained_variance'])}**.\n")
    return "\n".join(out)


def _findings_universality_md(u):
    n_best = u.get("n_best_pairs")
    rows = []
    for key, label in (("two_seeds", "the same size, another seed"),
                       ("random", f"{u['n_components']:,} random unit atoms"),
                       ("neurons", "the neuron basis (512 neurons)"),
                       ("random_vs_neurons", "random atoms against the neuron basis")):
        c = u[key]
        rows.append([label, c["hungarian"], c["n_pairs"],
                     *([c["hungarian_best"]] if n_best else []), c["max"],
                     next(v for k, v in c.items() if k.startswith("share_above"))])
    good = next(k for k in u["two_seeds"] if k.startswith("share_above")).split("_")[-1]
    best_text = (f" Hungarian, best {n_best:,} pairs: the mean of the {n_best:,} highest "
                 "cosines of that matching, as many pairs as the neuron basis has, so that "
                 "the rows compare alike (the neuron basis's matching pairs only "
                 f"{n_best:,} of the SAE's atoms, those that suit it best; for two dictionaries "
                 f"of {u['n_components']:,} it is a lower bound on their best matching of "
                 f"{n_best:,} pairs)." if n_best else "")
    return (f"**Universality**: a {u['n_components']:,}-feature SAE (seed 0) against other "
            "bases. Hungarian, all pairs: mean cosine of the one-to-one matching, over its "
            "pairs (the 'pairs' column)." + best_text + " Max: mean over the SAE's atoms "
            "of each one's best cosine (for the last row, over the random atoms).\n\n"
            + _table(["compared with", "Hungarian, all pairs", "pairs",
                      *([f"Hungarian, best {n_best:,} pairs"] if n_best else []), "max",
                      f"share of pairs at cosine >= {good}"], rows) + "\n")


def _findings_splitting_md(sp):
    out = [f"**Feature splitting**: the {sp['small']:,}-feature SAE ({sp['small_alive']:,} "
           f"of its features fire) against each larger SAE, on {sp['n_tokens']:,} training "
           f"tokens. A feature splits when at least two features of the larger SAE have "
           f"cosine >= {sp['threshold']:g} with it and fire together with it on at least "
           f"{sp['co_firing_threshold']:.0%} of their own tokens.\n"]
    out.append(_table(["larger SAE", "features that split", "share", "children per split"],
                      [[b["large"], b["n_split"], b["share_split"], b["mean_children"]]
                       for b in sp["by_size"]]))
    for i, ex in enumerate(sp["examples"], 1):
        out.append(f"\n**Example {i}**: feature {ex['parent']} of the {sp['small']:,}-feature "
                   f"SAE (fires on {ex['parent_frequency']:.2%} of tokens) splits into "
                   f"{len(ex['children'])} features of the {sp['large']:,}-feature SAE. Its "
                   "top activations, the token marked «so»:\n")
        out.append(_code_block([f"{c['activation']:7.2f}  {c['text']}"
                                for c in ex["parent_contexts"]]))
        for child in ex["children"]:
            out.append(f"Child {child['child']} (cosine {child['cosine']:.2f}, co-firing "
                       f"{child['co_firing']:.2f}, fires on {child['frequency']:.2%} of "
                       "tokens):\n")
            out.append(_code_block([f"{c['activation']:7.2f}  {c['text']}"
                                    for c in child["contexts"]]))
    if not sp["examples"]:
        out.append("\nNo feature split at these thresholds, so there are no examples.\n")
    return "\n".join(out)


def _findings_md(r):
    return "\n".join([_findings_size_md(r), _findings_universality_md(r["universality"]),
                      _findings_splitting_md(r["splitting"])])


# What each section measures and how, printed under its heading (in the
# markdown and on the docs page alike).
SECTION_NOTES = {
    "recovery": (
        "Synthetic data with known atoms from two generators, each with uniform and "
        "power-law feature frequencies: ``make_superposition`` and the benchmark's own "
        "``make_clustered_mixtures`` (clustered, co-firing atoms, log-normal magnitudes; "
        "its largest quick case is the issue's 512 atoms in 128 dimensions, 40,000 rows, "
        "about 8 active per row). Every method learns as many atoms as there are true ones "
        "from the same rows: the SAE with each activation (``k`` = the true mean L0 for "
        "top-k and batch top-k, with AuxK), and MiniBatchDictionaryLearning (LARS, trained "
        "until scikit-learn's own early stopping) at each alpha of a small grid, its best "
        "MMCS compared (its best setting). "
        "MiniBatchDictionaryLearning's codes are signed, so an atom learned as the negative "
        "of a true one is an exact solution: its MMCS and recovery rate are on the absolute cosine, "
        "the SAEs' (non-negative codes) on the signed cosine. Where "
        "MiniBatchDictionaryLearning sees fewer rows, the best top-k-family "
        "SAE is also fitted on those rows, and the target compares those two. The row 'from "
        "MBDL's dictionary' is the top-k SAE started from the atoms of "
        "MiniBatchDictionaryLearning's best alpha "
        "(``dict_init``), trained like the others (its fit time leaves out MBDL's); the "
        "targets judge the SAE alone and leave it out. The last two "
        "rows of each case are a reference for the optimisation: a plain top-k SAE loop "
        "(autograd, Adam, the SAEs' learning rate, batch and steps) started from random atoms "
        "and from the true ones. Where the start at the truth keeps the atoms and "
        "reconstructs the held-out rows better, the objective's optimum near the true atoms "
        "is better than the one a random start finds, and an MMCS below the target is a "
        "shortfall of optimisation, not of the objective. Targets: the "
        "best top-k-family SAE has MMCS >= 0.95 on every case and beats "
        "MiniBatchDictionaryLearning's MMCS on every case."),
    "frontier": (
        "Explained variance against L0 on held-out real activations of the built-in "
        "model and of MiniLM, with the same number of atoms for every method: each "
        "activation over its knob grid (``k``, ``l0_coef``, ``l1_coef``), "
        "MiniBatchDictionaryLearning over ``alpha``. MiniBatchDictionaryLearning sees "
        "only the first training rows (its LARS coding cost; the labels say how many), so "
        "every activation is also fitted over its grid on exactly those rows, and that "
        "comparison is a target of its own. The margin of a frontier over other "
        "points is its EV (interpolated in log L0) minus theirs, at L0 <= 32. Loss "
        "recovered: the SAE's reconstruction spliced into the built-in model; a top-k SAE "
        "is also fitted without AuxK to show what AuxK does to dead features. Targets: the "
        "best activation's frontier on or above MiniBatchDictionaryLearning's (on all rows, "
        "and both on MBDL's rows) and above "
        "the ReLU SAE's at L0 <= 32; loss recovered >= 0.97 at L0 <= 20 with at most 4096 "
        "features; dead features < 1% with AuxK."),
    "time_to_quality": (
        "The same atoms and rows for both methods. MiniBatchDictionaryLearning makes one "
        "pass at each alpha of a small grid and is scored at checkpoints; its final (EV, "
        "L0) at alpha 0.1 is the level to reach, and its time to any level is the fastest "
        "over its alphas. Each "
        "activation is fitted from scratch with a ladder of step budgets; the SAE's time "
        "is that of its cheapest complete fit reaching the level at equal or lower L0. "
        "Target: MiniBatchDictionaryLearning's time / the fastest SAE's >= 20, in one "
        "process."),
    "scaling": (
        "Fit time against rows and atoms for the SAE and MiniBatchDictionaryLearning, and "
        "the memory of a fit from a memmap. MiniBatchDictionaryLearning covers a shorter "
        "range of sizes; the SAE's slope over that same range is given beside its slope "
        "over its whole range."),
    "encoding": (
        "The amortisation gap of each activation: non-negative OMP on the SAE's own "
        "dictionary at the SAE's L0, minus the SAE encoder's EV (target: at most 0.03 for "
        "the best top-k-family SAE); then the encoder's speed against per-row coders of "
        "the same dictionary at matched L0."),
    "throughput": (
        "The ReLU training step, and the whole training loop, against the faster dense "
        "float32 matrix product (torch's or numpy's OpenBLAS) of the same rounds (target: "
        "the step at least 0.8), each activation's "
        "training rows/s against ReLU's in the same rounds, and the top-k family's "
        "sparse step against the dense ReLU step at d=512, N=16384, k=32, B=4096 "
        "(target: at least 2.5 times the rows/s). Run in a child process without the "
        "OpenBLAS overrides."),
    "steering": (
        "Features as actions on the built-in model: the 20 features (of those that fired "
        "in training) with the largest logit effects; for each, on held-out texts, the mean "
        "increase of the log-probability of its own top-10 promoted tokens when its atom is "
        "added at every position, against the same for a random direction of equal norm. "
        "Target: the ratio of the two means >= 3."),
    "extraction": (
        "The extractor's overhead over a plain forward pass doing the same work: "
        "stopped at the hooked module, the real tokens' rows copied out."),
    "extraction_disk": (
        "The built-in model's activations of corpora of growing size written to an "
        "activation store by ``transform_to_disk``, the texts streamed from a generator, "
        "each size in a fresh subprocess. VmHWM is the peak resident set of the whole "
        "process (the store is written with write calls, never memory-mapped, so the pages "
        "written are page cache and do not count). Target: VmHWM grows by at most 10% "
        "from the smallest corpus to the largest (10^5 to 10^7 tokens in the full mode, "
        "10^5 to 10^6 in the quick mode)."),
    "distributed": (
        "Data-parallel training on one machine: the same fit (data, seed, global batch, "
        "steps) in one process using every core and in several gloo processes sharing "
        "them, each reading its share of every batch from a memmap. Rows/s are those of "
        "each ``fit`` call (initialisation included), the slowest rank's for the "
        "data-parallel run; the atoms of the two runs differ only by the order of "
        "floating-point sums. On one machine the processes share the cores, so this "
        "shows the cost of the per-step ``all_reduce``, not a speed-up."),
    "saelens_throughput": (
        "sparse_dict's TopK training loop (AuxK on, the step it chooses) against SAELens' "
        "own TopK training step (its TopKTrainingSAE, AuxK, gradient clipping and Adam, "
        "through SAETrainer._train_step) on the same configuration and batches in memory, "
        "SAELens in its own optional environment (benchmarks/requirements-saelens.txt). "
        "Target: at least 1.5 times SAELens' rows/s."),
    "gpu": (
        "The GPU at its limit: for each size, in float32 and bfloat16, the dense "
        "(B x d) @ (d x N) matrix product's rate; the fused training step alone (the "
        "trainer's loss and gradients, the unit-norm projection, Adam, renormalisation) "
        "with the batch on the device; the whole ``fit`` from a numpy array, whose "
        "steady-state step is the difference of a long and a short fit over their "
        "difference in steps; and a plain autograd loop of the same model with batches "
        "(a) gathered on the host and copied every step, (b) indexed on the device. "
        "Targets at the reference size (d=768, N=24576): whole fit at least 0.75 (float32) "
        "and 0.5 (bf16) of the matrix product; at least 1.5 times plain loop (a) in bf16; "
        "the fused step at least 0.6 of the bf16 product; a short fit at most 1.3 times as "
        "many steady steps; at the small size, at least as fast as plain loop (b). "
        "Footing: the fit copies these 65,536 rows to the GPU once (they fit "
        "``device_data_budget``), so plain loop (b), its data on the GPU too, is the "
        "like-for-like baseline and (a) is the loop a user writes from numpy. The fits "
        "keep the fastest of their repeats and the plain loops, from 2026-11-26, too, with "
        "torch's fused Adam; the H200 run recorded on 2026-11-25 timed each plain loop "
        "once, with torch's default Adam."),
    "findings": (
        "Measurements of the seed paper's findings on the built-in model's MLP activations "
        "(512 neurons). Size curve: top-k SAEs of growing size at one fixed L0 (``k``), with "
        "the same training rows, steps, batch and learning rate, scored on held-out texts "
        "(explained variance; loss recovered when the reconstruction is spliced into the "
        "model, zero ablation as the baseline). Universality: two SAEs trained with "
        "different seeds, matched one to one (Hungarian) and by best match (max), beside "
        "random unit atoms and the neuron basis; the one-to-one score is given over all "
        "pairs and over each comparison's best 512 pairs, as many as the neuron basis can "
        "form, so that the rows compare alike. Feature splitting: the smallest SAE "
        "against each larger one (children: cosine and co-firing above the thresholds "
        "shown, at least two per parent). Targets: loss recovered rises with size; the two "
        "seeds' one-to-one similarity exceeds random atoms' by at least 0.3."),
}


_SECTION_MD = {
    "recovery": ("1. Ground-truth recovery", _recovery_md),
    "frontier": ("2. Real activations: explained variance against L0", _frontier_md),
    "time_to_quality": ("3. Time to quality", _ttq_md),
    "scaling": ("4. Scaling", _scaling_md),
    "encoding": ("5. Encoding speed and the amortisation gap", _encoding_md),
    "throughput": ("6. Training throughput", _throughput_md),
    "steering": ("7. Steering with features", _steering_md),
    "extraction": ("8. Extraction overhead", _extraction_md),
    "extraction_disk": ("9. Extraction to disk: memory against corpus size",
                        _extraction_disk_md),
    "distributed": ("10. Data-parallel training", _distributed_md),
    "findings": ("11. The seed's findings: dictionary size, universality, splitting",
                 _findings_md),
    "gpu": ("12. The GPU at its limit", _gpu_md),
    "saelens_throughput": ("13. Training throughput against SAELens", _saelens_md),
}


def _heading(text, level, fmt):
    if fmt == "md":
        return "#" * level + " " + text + "\n"
    return text + "\n" + "=-~^"[level - 1] * len(text) + "\n"


def markdown(results, fmt="md", images=None, first_level=1, skip=()):
    """The results as a markdown (``fmt="md"``) or reStructuredText document.

    Parameters
    ----------
    results : dict
    fmt : {"md", "rst"}
    images : str or None
        For ``"rst"``: the folder of the PNGs relative to the document;
        each section's plots are shown after its tables.
    first_level : int
        Heading level of the title (rst underline characters ``=-~^``).
    skip : sequence of str
        Sections left out (shown on a page of their own).
    """
    _STYLE["format"] = fmt
    try:
        top, sub = first_level, first_level + 1
        out = [_heading(f"sparse_dict benchmarks ({results['mode']} mode)", top, fmt),
               _machine_md(results["machine"]) + "\n",
               f"Total wall time {results.get('total_wall_s', 0):.0f} s. "
               "Timings are wall-clock on a possibly shared machine.\n",
               _kept_md(results),
               _heading("Targets", sub, fmt), _targets_md(results.get("targets", [])) + "\n"]
        for name, section in results["sections"].items():
            if name in skip:
                continue
            title, fn = _SECTION_MD[name]
            out.append(_heading(title, sub, fmt))
            if name in SECTION_NOTES:
                out.append(SECTION_NOTES[name] + "\n")
            if "error" in section:
                if fmt == "md":
                    out.append("Failed:\n\n```\n" + section["error"] + "```\n")
                else:
                    body = "\n".join("   " + line for line in section["error"].splitlines())
                    out.append("Failed::\n\n" + body + "\n")
                continue
            out.append(fn(section))
            blas = ""
            if section.get("blas"):
                from benchmarks._common import blas_summary

                blas = f" Run in its own process; BLAS there: {blas_summary(section['blas'])}."
            out.append(f"Section wall time {section['wall_s']:.0f} s.{blas}"
                       f"{_section_machine_md(section, results)}\n")
            if fmt == "rst" and images is not None:
                for png in PLOTS[name]:
                    out.append(f".. image:: {images}/{png}\n   :width: 100%\n")
        return "\n".join(out)
    finally:
        _STYLE["format"] = "md"


def write_markdown(results, path):
    """Write :func:`markdown` to ``path``."""
    Path(path).write_text(markdown(results), encoding="utf-8")


RST_START = ".. start-benchmark-results"


def write_rst(results, path, images, source="benchmarks/results/results.json"):
    """Write the results as a reStructuredText page for the docs.

    The page is ``:orphan:`` so that Sphinx builds it without a toctree
    entry; a page that includes it should start after :data:`RST_START`
    (``.. include:: benchmarks_results.rst`` with ``:start-after:``).
    """
    # The findings have their own page (docs/findings.rst).
    body = markdown(results, fmt="rst", images=images, first_level=2, skip=("findings",))
    header = (":orphan:\n\n"
              "..  Generated by ``python -m benchmarks.report``"
              f" from {source}; do not edit.\n\n"
              f"{RST_START}\n\n")
    how = ("These figures come from ``python -m benchmarks`` (quick mode; sections rerun "
           "apart, on other machines or days, are merged in, each with its own machine and "
           "date below its tables; "
           "``--full`` for the issue's full sizes, ``--device cuda`` for a GPU, "
           "``--only recovery,encoding`` for a subset), which writes ``results.json``, "
           "``results.md`` and the plots to ``benchmarks/results/``; "
           "``python -m benchmarks.report`` rewrites this page from them.\n\n"
           "The SAE and MiniBatchDictionaryLearning learn the same number of atoms and "
           "are scored on the same held-out rows, each with its wall time, and "
           "MiniBatchDictionaryLearning runs over a small grid of ``alpha`` (its best "
           "setting counts). They learn from the same training rows except where "
           "MiniBatchDictionaryLearning's LARS coding would take too long on all of them "
           "(the frontier on real activations, the largest recovery case): there it sees "
           "only the first rows, the tables and target labels say how many, and the SAE "
           "is also fitted on exactly those rows, with its own comparison (in the frontier "
           "a target of its own); the scaling section times it over a shorter range of "
           "sizes, and gives the SAE's slope over that range too. The sections that "
           "compare the SAE with scikit-learn run in a child "
           "process whose environment lacks ``OPENBLAS_CORETYPE`` and "
           "``OPENBLAS_L2_SIZE`` (which, where set, make OpenBLAS use an older, slower "
           "kernel for numpy and scikit-learn only); the BLAS kernel of both processes, "
           "from threadpoolctl, is recorded with the machine. Timings are ratios measured "
           "side by side in one process.\n\n")
    Path(path).write_text(header + how + body, encoding="utf-8")


FINDINGS_START = ".. start-findings-results"


def write_findings_rst(results, path, images, source="benchmarks/results/results.json"):
    """Write the ``findings`` section as a reStructuredText page for the docs.

    Like :func:`write_rst`, the page is ``:orphan:``; docs/findings.rst
    includes it after :data:`FINDINGS_START`. The machine and date shown
    are the section's own ``"machine"`` when it has one (a section rerun
    alone and merged into the reference results), else the run's. Returns
    False (and writes nothing) when the results have no findings section.
    """
    section = results["sections"].get("findings")
    if section is None:
        return False
    _STYLE["format"] = "rst"
    try:
        if "error" in section:
            body = ("The findings section of this run failed::\n\n"
                    + "\n".join("   " + line for line in section["error"].splitlines()) + "\n")
        else:
            parts = [_findings_size_md(section)]
            if images is not None:
                parts.append(f".. image:: {images}/size_curve.png\n   :width: 100%\n")
            parts += [_findings_universality_md(section["universality"]),
                      _findings_splitting_md(section["splitting"])]
            body = "\n".join(parts)
    finally:
        _STYLE["format"] = "md"
    # A section run on its own and merged into a reference run carries the
    # machine (and date) it ran on.
    m = section.get("machine") or results["machine"]
    header = (":orphan:\n\n"
              "..  Generated by ``python -m benchmarks.report``"
              f" from {source}; do not edit.\n\n"
              f"{FINDINGS_START}\n\n")
    load = m.get("load_average_at_start")
    load = f", load average at start {load[0]:.1f}" if load else ""
    how = (f"From one run of ``python -m benchmarks --only findings`` ({results['mode']} "
           f"mode) on {m['cpu_model']} ({m['torch_threads']} torch threads, device "
           f"{m['device']}{load}), {m['date']}; section wall time "
           f"{section.get('wall_s', 0):.0f} s.\n\n")
    Path(path).write_text(header + how + body, encoding="utf-8")
    return True




# --------------------------------------------------------------------- plots
def _recovery_label(m):
    # Group bars by method across cases whose k differ.
    if "oracle" in m["method"]:
        return None
    if "as MBDL" in m["method"]:
        return "SAE, best top-k family, on MBDL's rows"
    if m.get("activation"):
        return f"SAE {m['activation']}"
    return m["method"]


def _plot_recovery(r, plt):
    cases = r["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = []
    for case in cases:
        for m in case["methods"]:
            name = _recovery_label(m)
            if name is not None and name not in methods:
                methods.append(name)

    def find(case, name):
        return next((m for m in case["methods"] if _recovery_label(m) == name), None)

    width = 0.8 / len(methods)
    x = np.arange(len(cases))
    for i, name in enumerate(methods):
        rows = [find(case, name) for case in cases]
        axes[0].bar(x + i * width, [np.nan if m is None else m["mmcs"] for m in rows], width,
                    label=name)
        axes[1].bar(x + i * width,
                    [np.nan if m is None else max(m["fit_s"], 1e-4) for m in rows], width,
                    label=name)
    labels = [f"{c['generator']}\n{c['frequencies']}\n{c['n_features']}x{c['n_atoms']}, "
              f"{c['n_rows']:,} rows" for c in cases]
    for ax in axes:
        ax.set_xticks(x + width * (len(methods) - 1) / 2, labels, fontsize=7)
    axes[0].axhline(0.95, color="grey", ls=":", label="target 0.95")
    axes[0].set_ylabel("mean max cosine similarity")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("fit time (s)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Ground-truth recovery (equal atoms; MBDL = MiniBatchDictionaryLearning)")
    fig.tight_layout()
    return fig


def _plot_frontier(r, plt):
    models = [k for k in ("builtin", "minilm") if "skipped" not in r.get(k, {"skipped": 1})]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5),
                             squeeze=False)
    for ax, key in zip(axes[0], models):
        model = r[key]
        for activation in ("relu", "topk", "batchtopk", "jumprelu"):
            pts = sorted((p for p in model["sae"] if p["activation"] == activation
                          and not p.get("no_auxk") and not p.get("equal_rows")),
                         key=lambda p: p["l0"])
            if not pts:
                continue
            ax.plot([p["l0"] for p in pts], [p["explained_variance"] for p in pts], "o-",
                    label=f"SAE {activation}")
        equal = sorted((p for p in model["sae"] if p.get("equal_rows")
                        and p["activation"] == model["comparison"].get(
                            "equal_rows_best_activation", p["activation"])),
                       key=lambda p: p["l0"])
        if equal:
            ax.plot([p["l0"] for p in equal], [p["explained_variance"] for p in equal], "x:",
                    color="black", label=f"SAE {equal[0]['activation']} on MBDL's "
                                         f"{equal[0]['n_rows']:,} rows")
        for p in model["sae"]:
            if p.get("no_auxk"):
                ax.plot(p["l0"], p["explained_variance"], "x", color="black")
                ax.annotate("no AuxK", (p["l0"], p["explained_variance"]), fontsize=6)
        mb = sorted(model["mbdl"], key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in mb], [p["explained_variance"] for p in mb], "s--",
                color="black", label=f"MBDL, alpha grid ({mb[0]['n_rows']:,} rows)")
        ax.axvline(32, color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active features per token)")
        ax.set_ylabel("explained variance (held-out)")
        ax.set_title(f"{model['model']}, {model['n_components']:,} atoms each\n"
                     f"{model['hook']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_ttq(r, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mb = r["mbdl_trajectory"]
    alphas = _ttq_alphas(r)
    primary = r["primary_level"].get("defined_by_alpha", alphas[0])
    for ax, key, label in ((axes[0], "explained_variance", "explained variance (held-out)"),
                           (axes[1], "mmcs", "MMCS to the true atoms")):
        for alpha in alphas:
            pts = [p for p in mb if p.get("alpha", alpha) == alpha]
            ax.plot([p["fit_s"] for p in pts], [p.get(key) for p in pts], "s-",
                    label=f"MiniBatchDictionaryLearning alpha={alpha:g} (checkpoints)")
        settings = []
        for p in r["sae_fits"]:
            if p["setting"] not in settings:
                settings.append(p["setting"])
        for setting in settings:
            pts = [p for p in r["sae_fits"] if p["setting"] == setting]
            ax.plot([p["fit_s"] for p in pts], [p.get(key) for p in pts], "o-",
                    label=f"SAE {setting} (step ladder)")
        final = [p for p in mb if p.get("alpha", primary) == primary][-1]
        ax.axhline(final.get(key) or 0, color="grey", ls=":",
                   label=f"MBDL's final at alpha={primary:g}")
        ax.set_xscale("log")
        # Minor-tick labels of a log axis over a short range overlap.
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("wall time of the fit (s)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    for p in mb:
        axes[0].annotate(f"L0 {p['l0']:.1f}", (p["fit_s"], p["explained_variance"]), fontsize=6)
    for p in r["sae_fits"]:
        axes[0].annotate(f"L0 {p['l0']:.1f}", (p["fit_s"], p["explained_variance"]), fontsize=6)
    c = r["case"]
    fig.suptitle(f"Time to quality: {c['n_features']} features, {c['n_atoms']} atoms, "
                 f"{c['n_rows']:,} rows")
    fig.tight_layout()
    return fig


def _plot_scaling_time(r, plt):
    t = r["time"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    vs, vc = t["vs_n_samples"], t["vs_n_components"]
    axes[0].loglog(vs["n_samples"], vs["sae_s"], "o-", label=f"SAE ({t['sae_epochs']} epochs)")
    axes[0].loglog(vs["mbdl_n_samples"], vs["mbdl_s"], "s-", label="MBDL (1 pass)")
    axes[0].set_xlabel("n_samples")
    axes[0].set_title(f"{vs['n_components']} atoms", fontsize=9)
    axes[1].loglog(vc["n_components"], vc["sae_s"], "o-", label=f"SAE ({t['sae_epochs']} epochs)")
    axes[1].loglog(vc["mbdl_n_components"], vc["mbdl_s"], "s-", label="MBDL (1 pass)")
    axes[1].set_xlabel("n_components")
    axes[1].set_title(f"SAE {vc['n_samples']:,} rows, MBDL "
                      f"{vc.get('mbdl_n_samples', vc['n_samples']):,} rows", fontsize=9)
    for ax in axes:
        ax.set_ylabel("fit time (s)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Fit time scaling ({t['n_features']} features)")
    fig.tight_layout()
    return fig


def _plot_scaling_memory(r, plt):
    m = r["memory"]
    fig, ax = plt.subplots(figsize=(6, 4))
    size = [x["file_mb"] for x in m["runs"]]
    ax.plot(size, [x["peak_rss_anon_mb"] for x in m["runs"]], "o-",
            label="peak RssAnon (anonymous memory)")
    ax.plot(size, [x["vm_hwm_mb"] for x in m["runs"]], "s--",
            label="VmHWM (includes memmap page cache)")
    ax.plot(size, size, ":", color="grey", label="file size")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("memmap file size (MB)")
    ax.set_ylabel("MB")
    ax.set_title(f"Fitting from a memmap: anonymous memory grows {100 * m['growth']:.1f}%",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_encoding(r, plt):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [c["coder"] for c in r["coders"]]
    ax.barh(names, [c["rows_per_s"] for c in r["coders"]])
    ax.set_xscale("log")
    ax.set_xlabel("rows per second")
    for i, c in enumerate(r["coders"]):
        ax.text(c["rows_per_s"], i, f" L0 {c['l0']:.1f}, EV {c['explained_variance']:.3f}",
                va="center", fontsize=7)
    ax.set_xlim(right=max(c["rows_per_s"] for c in r["coders"]) * 30)
    ax.invert_yaxis()
    ax.set_title(f"Encoding at matched L0: SAE {r['speedup_vs_lars']:.0f}x LARS", fontsize=9)
    fig.tight_layout()
    return fig


def _plot_throughput(r, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax = axes[0]
    names = ["best matmul", "SAE training", "plain torch loop"]
    values = [r["matmul_gflops"], r["sae_gflops"], r["plain_loop_gflops"]]
    ax.bar(names, values)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v / values[0]:.2f}", ha="center", va="bottom")
    ax.set_ylabel("GFLOP/s")
    s = r["shape"]
    ax.set_title(f"ReLU training throughput (B={s['batch']}, d={s['d']}, N={s['n']}, "
                 f"{r['device']}, {r['torch_threads']} threads)", fontsize=8)
    acts = r.get("activations", {})
    ax = axes[1]
    ax.bar(list(acts), [a["over_relu"] for a in acts.values()])
    ax.axhline(1.0, color="grey", ls=":")
    for i, a in enumerate(acts.values()):
        ax.text(i, a["over_relu"], f"{a['over_relu']:.2f}", ha="center", va="bottom")
    ax.set_ylabel("training rows/s / ReLU's")
    ax.set_title("Step cost per activation (k=32 for the top-k family)", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_size_curve(r, plt):
    curve = r["size_curve"]
    n = [p["n_components"] for p in curve]
    # A copy of each point with its live features, leaving the results as they are.
    curve = [dict(p, live=p["n_components"] * (1 - p["train_dead_fraction"])) for p in curve]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, label, fmt in (
            (axes[0], "loss_recovered", "loss recovered (held-out)", "{:.3f}"),
            (axes[1], "explained_variance", "explained variance (held-out)", "{:.3f}"),
            (axes[2], "live", "live features (fired late in training)", "{:,.0f}")):
        ax.plot(n, [p[key] for p in curve], "o-")
        for x, p in zip(n, curve):
            ax.annotate(fmt.format(p[key]), (x, p[key]), fontsize=7,
                        textcoords="offset points", xytext=(0, 5), ha="center")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [f"{x:,}" for x in n])
        ax.set_xlabel("dictionary size (features)")
        ax.set_ylabel(label)
    fig.suptitle(f"{r['model']}: top-k SAEs, k={r['k']} at every size, batches of "
                 f"{r['batch_size']} rows, {r['steps']:,} steps up to "
                 f"{r.get('steps_reference_size', 0):,} features, sqrt(size) more above",
                 fontsize=9)
    fig.tight_layout()
    return fig


_PLOTTERS = {
    "recovery.png": _plot_recovery,
    "frontier.png": _plot_frontier,
    "time_to_quality.png": _plot_ttq,
    "scaling_time.png": _plot_scaling_time,
    "scaling_memory.png": _plot_scaling_memory,
    "encoding.png": _plot_encoding,
    "throughput.png": _plot_throughput,
    "size_curve.png": _plot_size_curve,
}


def write_plots(results, out_dir):
    """Draw the PNG of every section that ran; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, section in results["sections"].items():
        if "error" in section:
            continue
        for filename in PLOTS[name]:
            fig = _PLOTTERS[filename](section, plt)
            path = Path(out_dir) / filename
            # Marked as sparse_dict's, so that a later run into the same
            # folder tells its own plots from a user's (benchmarks.__main__).
            fig.savefig(path, dpi=80, metadata=_persist.png_metadata())
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv=None):
    """Rewrite results.md, the plots and the docs page from a results.json."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Rewrite the markdown, plots and docs page of a benchmark run.",
    )
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--results", type=Path, default=root / "benchmarks" / "results")
    parser.add_argument("--rst", type=Path, default=root / "docs" / "benchmarks_results.rst",
                        help="docs page to write (default docs/benchmarks_results.rst)")
    parser.add_argument("--findings-rst", type=Path,
                        default=root / "docs" / "findings_results.rst",
                        help="docs page of the findings section, written when the run has "
                             "one (default docs/findings_results.rst)")
    parser.add_argument("--no-images", action="store_true",
                        help="leave the plots out of the docs page (when --results is a "
                             "folder the docs cannot reach)")
    parser.add_argument("--merge", type=Path, metavar="RUN",
                        help="first put the sections of the run in folder RUN (its "
                             "results.json, same mode) in place of the results' own, each "
                             "with the machine it ran on, and rewrite results.json")
    args = parser.parse_args(argv)

    def run_in(folder, option):
        try:
            return json.loads((folder / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"{option} {folder}: no benchmark run's results.json to read ({exc})")

    results = run_in(args.results, "--results")
    if args.merge is not None:
        results = merge_run(results, run_in(args.merge, "--merge"))
        write_json(results, args.results / "results.json")
    write_markdown(results, args.results / "results.md")
    write_plots(results, args.results)
    import os

    images = os.path.relpath(args.results, args.rst.parent).replace(os.sep, "/")
    source = os.path.relpath(args.results, root).replace(os.sep, "/")
    if source.startswith(".."):
        source = str(args.results)  # a run kept outside the repository
    write_rst(results, args.rst, None if args.no_images else images,
              source=f"{source}/results.json")
    images = os.path.relpath(args.results, args.findings_rst.parent).replace(os.sep, "/")
    wrote = write_findings_rst(results, args.findings_rst, None if args.no_images else images,
                               source=f"{source}/results.json")
    print(f"wrote {args.results / 'results.md'}, the plots and {args.rst}"
          + (f" and {args.findings_rst}" if wrote else ""))


if __name__ == "__main__":
    main()
