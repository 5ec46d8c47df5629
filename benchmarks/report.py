"""Write a benchmark run as JSON, markdown tables and PNG plots.

Every function takes the results dict that :mod:`benchmarks.__main__` builds:
``{"mode", "machine", "sections": {name: figures}, "targets", ...}``.
"""

import json
import math
from pathlib import Path

import numpy as np

# The PNG each section draws (a section that failed draws nothing).
PLOTS = {
    "recovery": ["recovery.png"],
    "frontier": ["frontier.png"],
    "time_to_quality": ["time_to_quality.png"],
    "scaling": ["scaling_time.png", "scaling_memory.png"],
    "encoding": ["encoding.png"],
    "throughput": ["throughput.png"],
    "extraction": [],
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
    Path(path).write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")


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


def _machine_md(m):
    card = f", card {m['card']}" if m.get("card") else ""
    load = m.get("load_average_at_start")
    load = f"; load average at start {', '.join(f'{v:.1f}' for v in load)}" if load else ""
    return (
        f"{m['cpu_model']}, {m['cpus_available']} of {m['cpu_count']} cores available, "
        f"{m['torch_threads']} torch threads; device {m['device']}{card}{load}.  \n"
        f"Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, scipy {m['scipy']}, "
        f"scikit-learn {m['sklearn']}, sparse_dict {m['sparse_dict']}; {m['platform']}.  \n"
        f"Date {m['date']}."
    )


def _targets_md(targets):
    rows = [
        [t["section"], t["description"], t["value"], f"{t['comparison']} {t['threshold']:g}",
         "**met**" if t["met"] else "**not met**", t.get("note", "")]
        for t in targets
    ]
    return _table(["section", "target", "value", "threshold", "", "note"], rows)


def _recovery_md(r):
    out = []
    for case in r["cases"]:
        out.append(
            f"**{case['n_features']} features, {case['n_true_atoms']} true atoms, "
            f"{case['n_train_rows']:,} training rows** (scored on {case['n_eval_rows']:,} "
            "held-out rows)\n"
        )
        rows = [[m["method"], m["mmcs"], m["recovery_0.9"], m["explained_variance"], m["l0"],
                 m["dead_fraction"], m["fit_s"], m["transform_rows_per_s"]]
                for m in case["methods"]]
        out.append(_table(["method", "MMCS", "recovered at 0.9", "EV", "L0", "dead",
                           "fit s", "transform rows/s"], rows))
        out.append("")
    return "\n".join(out)


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
            "held-out tokens\n"
        )
        rows = []
        for p in model["sae"]:
            splice = p.get("splice") or {}
            rows.append([f"SAE l1_coef={p['l1_coef']:g}", p["n_components"], p["l0"],
                         p["explained_variance"], p["dead_fraction"], p["fit_s"],
                         splice.get("loss_recovered"), splice.get("kl_divergence"),
                         splice.get("cosine_spliced")])
        for p in model["mbdl"]:
            rows.append([f"MBDL alpha={p['alpha']:g} ({p['n_rows']:,} rows)",
                         p["n_components"], p["l0"], p["explained_variance"],
                         p["dead_fraction"], p["fit_s"], None, None, None])
        out.append(_table(["method", "atoms", "L0", "EV", "dead", "fit s", "loss recovered",
                           "KL (nats)", "output cosine"], rows))
        out.append("")
    return "\n".join(out)


def _ttq_md(r):
    c = r["case"]
    out = [f"{c['n_features']} features, {c['n_atoms']} atoms, {c['n_rows']:,} rows "
           f"(scored on {c['n_eval']:,} held-out rows).\n"]
    rows = []
    for name, level in (("primary (MBDL's final)", r["primary_level"]),
                        ("common (best SAE fit MBDL also reaches)", r["common_level"])):
        if level is None:
            rows.append([name, "none", None, None, None])
            continue
        rows.append([name, f"EV >= {level['explained_variance']:.3f}, L0 <= {level['l0']:.1f}",
                     level["mbdl_s"], level["sae_s"], level["speedup"]])
    d = r.get("dictionary_level")
    if d:
        rows.append(["dictionary (MBDL's final MMCS)", f"MMCS >= {d['mmcs']:.3f}",
                     d["mbdl_s"], d["sae_s"], d["speedup"]])
    out.append(_table(["level", "criterion", "MBDL s", "SAE s", "speed-up (MBDL s / SAE s)"],
                      rows))
    out.append("\nMiniBatchDictionaryLearning checkpoints:\n")
    out.append(_table(["batches", "fit s", "EV", "L0", "MMCS"],
                      [[p["steps"], p["fit_s"], p["explained_variance"], p["l0"], p.get("mmcs")]
                       for p in r["mbdl_trajectory"]]))
    out.append("\nSAE fits:\n")
    out.append(_table(["l1_coef", "epochs", "steps", "fit s", "EV", "L0", "MMCS",
                       "reaches primary"],
                      [[p["l1_coef"], p["epochs"], p["steps"], p["fit_s"],
                        p["explained_variance"], p["l0"], p.get("mmcs"), p["reaches_primary"]]
                       for p in r["sae_fits"]]))
    return "\n".join(out) + "\n"


def _union_table(label, sae_x, sae_s, mbdl_x, mbdl_s):
    sae, mbdl = dict(zip(sae_x, sae_s)), dict(zip(mbdl_x, mbdl_s))
    sizes = sorted(set(sae) | set(mbdl))
    return _table([label, "SAE s", "MBDL s"], [[n, sae.get(n), mbdl.get(n)] for n in sizes])


def _scaling_md(r):
    t = r["time"]
    out = []
    vs = t["vs_n_samples"]
    out.append(f"Fit time against n_samples ({t['n_features']} features, "
               f"{vs['n_components']} atoms; SAE {t['sae_epochs']} epochs, MBDL 1 pass). "
               f"Log-log slope: SAE {_fmt(vs['sae_slope'])}, MBDL {_fmt(vs['mbdl_slope'])}.\n")
    out.append(_union_table("n_samples", vs["n_samples"], vs["sae_s"],
                            vs["mbdl_n_samples"], vs["mbdl_s"]))
    vc = t["vs_n_components"]
    out.append(f"\nFit time against n_components (SAE {vc['n_samples']:,} rows, MBDL "
               f"{vc.get('mbdl_n_samples', vc['n_samples']):,} rows). Log-log slope: "
               f"SAE {_fmt(vc['sae_slope'])}, MBDL {_fmt(vc['mbdl_slope'])}.\n")
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
    out = [f"SAE of {c['n_atoms']} atoms on {c['n_features']} features; the SAE encodes "
           f"{c['n_sae']:,} rows, the per-row coders {c['n_slow']:,}. Speed-up over LARS at "
           f"matched L0: {_fmt(r['speedup_vs_lars'])}x.\n"]
    out.append(_table(["coder", "rows/s", "L0", "EV"],
                      [[x["coder"], x["rows_per_s"], x["l0"], x["explained_variance"]]
                       for x in r["coders"]]))
    out.append(f"\nAmortisation gap (non-negative OMP of the SAE's dictionary at L0 "
               f"{g['l0']} minus the SAE encoder): EV {_fmt(g['optimal'])} - "
               f"{_fmt(g['encoder'])} = **{_fmt(g['gap'])}**.\n")
    return "\n".join(out)


def _throughput_md(r):
    s = r["shape"]
    rows = [["dense matmul", r["matmul_gflops"], 1.0],
            ["SAE training (sparse_dict Trainer)", r["sae_gflops"], r["sae_fraction_of_matmul"]],
            ["plain torch loop", r["plain_loop_gflops"], r["plain_fraction_of_matmul"]]]
    return (f"Batch {s['batch']}, d={s['d']}, N={s['n']} on {r['device']} "
            f"({r['torch_threads']} torch thread(s)); one step = 10·B·d·N FLOPs. "
            f"SAE / plain loop: {_fmt(r['sae_over_plain'])}.\n\n"
            + _table(["", "GFLOP/s", "fraction of matmul"], rows) + "\n")


def _extraction_md(r):
    b, m = r["builtin"], r["minilm"]
    rows = [["built-in: plain forward", b["plain_forward_tokens_per_s"]],
            ["built-in: extractor (token ids)", b["extractor_tokens_per_s"]],
            ["built-in: extractor (texts)", b["extractor_from_text_tokens_per_s"]]]
    out = (f"Built-in model ({b['weights']} weights), {b['n_tokens']:,} tokens; extractor / "
           f"plain forward = {_fmt(b['ratio'])}.\n\n"
           + _table(["", "tokens/s"], rows) + "\n")
    if "skipped" in m:
        out += f"\nMiniLM: skipped ({m['skipped']}).\n"
    else:
        out += (f"\nMiniLM layer-1 extraction (early stop) {_fmt(m['layer1_extraction_s'])} s "
                f"against a full {m['n_layers']}-layer forward {_fmt(m['full_forward_s'])} s: "
                f"{_fmt(m['speedup'])}x.\n")
    return out


_SECTION_MD = {
    "recovery": ("1. Ground-truth recovery", _recovery_md),
    "frontier": ("2. Real activations: explained variance against L0", _frontier_md),
    "time_to_quality": ("3. Time to quality", _ttq_md),
    "scaling": ("4. Scaling", _scaling_md),
    "encoding": ("5. Encoding speed and the amortisation gap", _encoding_md),
    "throughput": ("6. Training throughput", _throughput_md),
    "extraction": ("7. Extraction overhead", _extraction_md),
}


def _heading(text, level, fmt):
    if fmt == "md":
        return "#" * level + " " + text + "\n"
    return text + "\n" + "=-~^"[level - 1] * len(text) + "\n"


def markdown(results, fmt="md", images=None, first_level=1):
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
    """
    _STYLE["format"] = fmt
    try:
        top, sub = first_level, first_level + 1
        out = [_heading(f"sparse_dict benchmarks ({results['mode']} mode)", top, fmt),
               _machine_md(results["machine"]) + "\n",
               f"Total wall time {results.get('total_wall_s', 0):.0f} s. "
               "Timings are wall-clock on a possibly shared machine.\n",
               _heading("Targets", sub, fmt), _targets_md(results.get("targets", [])) + "\n"]
        for name, section in results["sections"].items():
            title, fn = _SECTION_MD[name]
            out.append(_heading(title, sub, fmt))
            if "error" in section:
                if fmt == "md":
                    out.append("Failed:\n\n```\n" + section["error"] + "```\n")
                else:
                    body = "\n".join("   " + line for line in section["error"].splitlines())
                    out.append("Failed::\n\n" + body + "\n")
                continue
            out.append(fn(section))
            out.append(f"Section wall time {section['wall_s']:.0f} s.\n")
            if fmt == "rst" and images is not None:
                for png in PLOTS[name]:
                    out.append(f".. image:: {images}/{png}\n   :width: 100%\n")
        return "\n".join(out)
    finally:
        _STYLE["format"] = "md"


def write_markdown(results, path):
    """Write :func:`markdown` to ``path``."""
    Path(path).write_text(markdown(results))


RST_START = ".. start-benchmark-results"


def write_rst(results, path, images):
    """Write the results as a reStructuredText page for the docs.

    The page is ``:orphan:`` so that Sphinx builds it without a toctree
    entry; a page that includes it should start after :data:`RST_START`
    (``.. include:: benchmarks_results.rst`` with ``:start-after:``).
    """
    body = markdown(results, fmt="rst", images=images, first_level=2)
    header = (":orphan:\n\n"
              "..  Generated by ``python -m benchmarks.report``"
              " from benchmarks/results/results.json; do not edit.\n\n"
              f"{RST_START}\n\n")
    how = ("These figures come from one run of ``python -m benchmarks`` (quick mode; "
           "``--full`` for the issue's full sizes, ``--device cuda`` for a GPU, "
           "``--only recovery,encoding`` for a subset), which writes ``results.json``, "
           "``results.md`` and the plots to ``benchmarks/results/``; "
           "``python -m benchmarks.report`` rewrites this page from them.\n\n")
    Path(path).write_text(header + how + body)




# --------------------------------------------------------------------- plots
def _plot_recovery(r, plt):
    cases = r["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = []
    for case in cases:
        for m in case["methods"]:
            if m["method"] not in methods:
                methods.append(m["method"])
    width = 0.8 / len(methods)
    x = np.arange(len(cases))
    for i, name in enumerate(methods):
        mmcs, fit = [], []
        for case in cases:
            row = next((m for m in case["methods"] if m["method"] == name), None)
            mmcs.append(np.nan if row is None else row["mmcs"])
            fit.append(np.nan if row is None else max(row["fit_s"], 1e-4))
        axes[0].bar(x + i * width, mmcs, width, label=name)
        axes[1].bar(x + i * width, fit, width, label=name)
    labels = [f"{c['n_features']}x{c['n_true_atoms']}" for c in cases]
    for ax in axes:
        ax.set_xticks(x + width * (len(methods) - 1) / 2, labels)
        ax.set_xlabel("features x true atoms")
    axes[0].set_ylabel("mean max cosine similarity")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel("fit time (s)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Ground-truth recovery on make_superposition")
    return fig


def _plot_frontier(r, plt):
    models = [k for k in ("builtin", "minilm") if "skipped" not in r.get(k, {"skipped": 1})]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4),
                             squeeze=False)
    for ax, key in zip(axes[0], models):
        model = r[key]
        sae = sorted(model["sae"], key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in sae], [p["explained_variance"] for p in sae], "o-",
                label=f"SAE ({sae[0]['n_components']} features), l1_coef grid")
        for p in sae:
            ax.annotate(f"{p['l1_coef']:g}", (p["l0"], p["explained_variance"]), fontsize=7)
        mb = sorted(model["mbdl"], key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in mb], [p["explained_variance"] for p in mb], "s--",
                label=f"MiniBatchDictionaryLearning ({mb[0]['n_components']} atoms), alpha grid")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean active features per token)")
        ax.set_ylabel("explained variance (held-out)")
        ax.set_title(f"{model['model']}\n{model['hook']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_ttq(r, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mb = r["mbdl_trajectory"]
    for ax, key, label in ((axes[0], "explained_variance", "explained variance (held-out)"),
                           (axes[1], "mmcs", "MMCS to the true atoms")):
        ax.plot([p["fit_s"] for p in mb], [p.get(key) for p in mb], "s-",
                label="MiniBatchDictionaryLearning (checkpoints)")
        for l1 in sorted({p["l1_coef"] for p in r["sae_fits"]}):
            pts = [p for p in r["sae_fits"] if p["l1_coef"] == l1]
            ax.plot([p["fit_s"] for p in pts], [p.get(key) for p in pts], "o-",
                    label=f"SAE l1_coef={l1:g} (epoch ladder)")
        ax.axhline(mb[-1].get(key) or 0, color="grey", ls=":", label="MBDL's final")
        ax.set_xscale("log")
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
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = ["dense matmul", "SAE training", "plain torch loop"]
    values = [r["matmul_gflops"], r["sae_gflops"], r["plain_loop_gflops"]]
    ax.bar(names, values)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v / values[0]:.2f}", ha="center", va="bottom")
    ax.set_ylabel("GFLOP/s")
    s = r["shape"]
    ax.set_title(f"Training throughput (B={s['batch']}, d={s['d']}, N={s['n']}, "
                 f"{r['device']}, {r['torch_threads']} threads)", fontsize=9)
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
            fig.savefig(path, dpi=80)
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
    args = parser.parse_args(argv)
    results = json.loads((args.results / "results.json").read_text())
    write_markdown(results, args.results / "results.md")
    write_plots(results, args.results)
    import os

    images = os.path.relpath(args.results, args.rst.parent).replace(os.sep, "/")
    write_rst(results, args.rst, images)
    print(f"wrote {args.results / 'results.md'}, the plots and {args.rst}")


if __name__ == "__main__":
    main()
