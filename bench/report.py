"""Tables, CSV and JSON of benchmark results (one flat record per row and contender)."""
from __future__ import annotations

import csv
import json
import math

# every CSV row carries the machine, the versions and the dtype
CSV_COLUMNS = [
    "kind", "host", "timestamp", "device", "device_name", "cpu", "threads", "python", "torch",
    "triton", "icon_kernels", "git", "dtype", "config", "target", "kernel", "n", "m", "d",
    "contender", "status", "median_s", "min_s", "max_s", "runs", "floor_s", "x_naive", "x_floor",
    "tflops", "peak_mib", "memory_counter", "x_naive_mem", "loss", "err_loss_rel", "err_grad_rel",
    "max_err", "oracle", "budget_mib", "fails_at_n", "limited_by", "note", "times_s",
]
FLOOR = "GEMM floor"


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_s(v):
    if not _num(v):
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_x(v):
    if not _num(v):
        return "-"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def fmt_mib(v):
    if not _num(v):
        return "-"
    return f"{v:.1f}" if v < 10000 else f"{v:.0f}"


def fmt_err(v):
    return f"{v:.1e}" if _num(v) else "-"


TABLE = [("N", 7, "n", str), ("M", 7, "m", str), ("contender", 13, "contender", str),
         ("median s", 9, "median_s", fmt_s), ("[min, max] s", 19, None, None),
         ("runs", 4, "runs", str), ("x naive", 7, "x_naive", fmt_x),
         ("x floor", 7, "x_floor", fmt_x), ("peak MiB", 9, "peak_mib", fmt_mib),
         ("x naive mem", 11, "x_naive_mem", fmt_x), ("max err", 8, "max_err", fmt_err)]


def _cells(r):
    out = []
    for title, width, key, f in TABLE:
        if title == "[min, max] s":
            out.append(f"[{fmt_s(r.get('min_s'))}, {fmt_s(r.get('max_s'))}]" if _num(r.get("min_s")) else "-")
        elif key == "median_s" and r.get("status") != "ok" and not _num(r.get("median_s")):
            out.append({"skipped": "skipped"}.get(r.get("status"), r.get("status", "?").split(":")[0]))
        else:
            v = r.get(key)
            out.append("-" if v is None else f(v))
    return out


def group_key(r):
    return (r["device"], r["config"], r["dtype"])


def format_table(records, titles=None):
    """The readable table: one block per (device, configuration, dtype); notes at the right."""
    lines = []
    groups = {}
    for r in records:
        if r.get("kind") == "sweep":
            groups.setdefault(group_key(r), []).append(r)
    for key, rows in groups.items():
        device, config, dtype = key
        title = (titles or {}).get(config, config)
        lines.append(f"\n{config} ({title}), {device}, {dtype}")
        lines.append(" | ".join(t.rjust(w) for t, w, _, _ in TABLE) + " | note")
        lines.append("-+-".join("-" * w for _, w, _, _ in TABLE) + "-+-" + "-" * 4)
        for r in rows:
            note = r.get("note") or ""
            lines.append(" | ".join(c.rjust(w) for c, (_, w, _, _) in zip(_cells(r), TABLE))
                         + (" | " + note if note else ""))
    return "\n".join(lines)


def format_probe(records):
    rows = [r for r in records if r.get("kind") == "probe"]
    if not rows:
        return ""
    head = [("device", 6), ("dtype", 8), ("contender", 13), ("budget MiB", 10), ("largest N", 9),
            ("peak MiB", 9), ("fwd+bwd s", 9), ("fails at N", 10)]
    lines = ["\nLargest N within the memory budget (" + rows[0]["config"] + "): " +
             "doubling, then bisection; each step a fresh run",
             " | ".join(t.rjust(w) for t, w in head) + " | limited by",
             "-+-".join("-" * w for _, w in head) + "-+-" + "-" * 10]
    for r in rows:
        largest = r.get("n")
        lb = r.get("limited_by") or ""
        shown = "-" if largest is None else (f">={largest}" if lb not in ("resolution",) else str(largest))
        cells = [r["device"], r["dtype"], r["contender"], fmt_mib(r.get("budget_mib")), shown,
                 fmt_mib(r.get("peak_mib")), fmt_s(r.get("median_s")),
                 "-" if r.get("fails_at_n") is None else str(r["fails_at_n"])]
        lines.append(" | ".join(c.rjust(w) for c, (_, w) in zip(cells, head)) + " | " + lb)
    return "\n".join(lines)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = {k: r.get(k) for k in CSV_COLUMNS}
            if isinstance(row.get("times_s"), list):
                row["times_s"] = " ".join(f"{t:.6g}" for t in row["times_s"])
            for k, v in row.items():
                if isinstance(v, float):
                    row[k] = "" if not math.isfinite(v) else f"{v:.6g}"
                elif v is None:
                    row[k] = ""
            w.writerow(row)


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(_clean(payload), f, indent=1)
