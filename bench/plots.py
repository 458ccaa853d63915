"""PNG plots of benchmark results: time versus N and peak memory versus N, log-log, one line per
contender (the GEMM floor dashed). Needs matplotlib (the ``bench`` extra); without it the
benchmark says so and writes no plot."""
from __future__ import annotations

import math
import os

from workloads import FLOOR

STYLE = {"naive": ("tab:red", "o"), "naive+compile": ("tab:orange", "v"), "torch": ("tab:blue", "s"),
         "cpu": ("tab:green", "D"), "cpu-plain": ("tab:olive", "d"), "triton": ("tab:purple", "^"), "cuda": ("tab:brown", "P"),
         "pml-supcon": ("tab:pink", "x"), "keops": ("tab:olive", "*"), FLOOR: ("black", None)}


def available():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def _ok(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _series(rows, key):
    out = {}
    for r in rows:
        if _ok(r.get(key)):
            out.setdefault(r["contender"], []).append((r["n"], r[key]))
    return {c: sorted(p) for c, p in out.items()}


def _n_label(n, _=None):
    n = int(round(n))
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _panel(ax, rows, key, ylabel, with_floor):
    for contender, pts in _series(rows, key).items():
        if contender == FLOOR and not with_floor:
            continue
        color, marker = STYLE.get(contender, (None, "o"))
        ls = "--" if contender == FLOOR else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, marker=marker,
                markersize=4, linewidth=1.4, label=contender)
    from matplotlib import ticker
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ns = sorted({r["n"] for r in rows})
    ax.set_xticks(ns)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_n_label))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("N")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plot_group(rows, path, title, small=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figsize, dpi = ((8.0, 3.2), 80) if small else ((11.0, 4.2), 100)
    fig, (a, b) = plt.subplots(1, 2, figsize=figsize, dpi=dpi)
    _panel(a, rows, "median_s", "forward+backward, median s", True)
    _panel(b, rows, "peak_mib", "peak memory, MiB", False)
    a.set_title("time", fontsize=9)
    b.set_title("peak memory (increase over baseline)", fontsize=9)
    handles, labels = a.get_legend_handles_labels()
    h2, l2 = b.get_legend_handles_labels()
    for h, lab in zip(h2, l2):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.82 if small else 0.86, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_all(groups, out_dir, stem, machine_line):
    """One PNG per (device, configuration, dtype) group of sweep records (report.sweep_groups);
    returns the paths written."""
    paths = []
    for (device, config, dtype), rows in groups.items():
        if len({r["n"] for r in rows}) < 1:
            continue
        path = os.path.join(out_dir, f"{stem}-{device}-{config}-{dtype}.png")
        plot_group(rows, path, f"{config}, {device} {dtype}, d={rows[0]['d']} - {machine_line}")
        paths.append(path)
    return paths
