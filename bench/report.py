"""What a benchmark run prints and writes, and the machine it ran on: the header, the table (one
flat record per row and contender) and its legend, the largest-N probe's table, the CSV and JSON,
the PNG plots (plots.py; and the README's plot), and the replay of an earlier run (--from-json)."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import socket
import subprocess

import torch

import icon_kernels as ik
import plots
from workloads import CONFIGS, ORDER, PEERS, PROBE_CONFIG, label, unavailable_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the machine: host, CPU, memory, versions, the git commit of the checkout, usable backends ---

def _read(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cache_size(level: int):
    """The size of cpu0's level-``level`` data or unified cache as sysfs spells it ("512K"), or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(f"{base}/{entry}/level") as f:
                if int(f.read()) != level:
                    continue
            with open(f"{base}/{entry}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{base}/{entry}/size") as f:
                return f.read().strip()
    except (OSError, ValueError):
        pass
    return None


def cpu_description():
    """The CPU model with what moves the CPU figures: family/model, the widest SIMD the kernels are
    compiled for (-march=native: AVX-512 or AVX2) and the per-core L2 (the tile-pair working set).
    Two VMs both called "AMD EPYC" (Zen 3: AVX2, 512 KiB L2; Zen 4: AVX-512, 1 MiB) give very
    different ratios to the floor (README, the family sweep of 2026-12-04)."""
    name = _read("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    flags = (_read("/proc/cpuinfo", "flags") or "").split()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    family, model = _read("/proc/cpuinfo", "cpu family"), _read("/proc/cpuinfo", "model\t")
    details = [f"family {family} model {model}" if family and model else None, simd,
               f"L2 {_cache_size(2)}" if _cache_size(2) else None]
    details = [d for d in details if d]
    return f"{name} ({', '.join(details)})" if details else name


def machine_info():
    mem = _read("/proc/meminfo", "MemTotal")
    avail = _read("/proc/meminfo", "MemAvailable")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: reported as None
        triton_version = None
    return {
        "host": socket.gethostname(), "platform": platform.platform(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(), "mem_total_gib": int(mem.split()[0]) / 2**20 if mem else None,
        "mem_available_gib": int(avail.split()[0]) / 2**20 if avail else None,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "icon_kernels": ik.__version__, "git": _git(), "cuda_available": torch.cuda.is_available(),
        "backends": ik.available_backends(),
    }


# --- the table -----------------------------------------------------------------------------------

# every CSV row carries the machine, the versions and the dtype
CSV_COLUMNS = [
    "kind", "host", "timestamp", "device", "device_name", "cpu", "threads", "python", "torch",
    "triton", "icon_kernels", "git", "dtype", "config", "target", "kernel", "n", "m", "d",
    "contender", "status", "median_s", "min_s", "max_s", "runs", "floor_s", "x_naive", "x_floor",
    "tflops", "peak_mib", "memory_counter", "x_naive_mem", "loss", "err_loss_rel", "err_grad_rel",
    "max_err", "oracle", "budget_mib", "fails_at_n", "limited_by", "note", "times_s",
]


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


def sweep_groups(records):
    """The sweep's records by (device, configuration, dtype): a block of the table, a plot."""
    groups = {}
    for r in records:
        if r.get("kind") == "sweep":
            groups.setdefault(group_key(r), []).append(r)
    return groups


def format_table(records, titles=None):
    """The readable table: one block per (device, configuration, dtype); notes at the right."""
    lines = []
    for key, rows in sweep_groups(records).items():
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


# --- files ---------------------------------------------------------------------------------------

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


# --- the run's output ----------------------------------------------------------------------------

class RunOutput:
    """Part of runner.Bench: its console output and files."""

    def payload(self):
        return {"machine": self.info, "threads": self.threads, "gpu": self._gpu_name, "mode": self.mode_name,
                "args": vars(self.a), "mem_limit_mib": self.mem_limit_mib,
                "total_wall_s": self.elapsed(), "records": self.records}

    def save(self):
        write_csv(self.stem + ".csv", self.records)
        write_json(self.stem + ".json", self.payload())

    def header(self):
        i = self.info
        print(f"I-Con loss benchmark ({self.mode_name}): forward + backward, d={self.a.d}")
        print(f"  machine   {i['host']}: {i['cpu']}, {i['cpu_count']} CPUs, "
              f"{(i['mem_total_gib'] or 0):.1f} GiB RAM ({(i['mem_available_gib'] or 0):.1f} available); {i['platform']}")
        print(f"  versions  python {i['python']}, torch {i['torch']}, triton {i['triton']}, "
              f"icon_kernels {i['icon_kernels']} ({i['git']})")
        print(f"  backends  {i['backends']}; devices {self.devices}")
        for device in self.devices:
            used = {c for r in self.rows if r["device"] == device for c in r["contenders"]}
            conts = [label(c) for c in ORDER if c in used]
            absent = [p for p in PEERS if not self.a.contenders
                      and "not installed" in (unavailable_reason(p, CONFIGS[PROBE_CONFIG], device) or "")]
            print(f"  {device:9s} contenders {', '.join(conts)}"
                  + (f" (peers not installed: {', '.join(absent)}; pip install .[peers])" if absent else ""))
            print(f"  {'':9s} budget {self.budget(device):.0f} s per contender and row, up to "
                  f"{self.repeats(device)} timed runs after one warm-up")
        for cname in dict.fromkeys(r["config"] for r in self.rows):
            sizes = sorted({r["n"] for r in self.rows if r["config"] == cname})
            print(f"  {cname:9s} {CONFIGS[cname].title}; N = {sizes}")
        if "cpu" in self.devices:
            print(f"  CPU runs may add at most {self.mem_limit_mib / 1024:.1f} GiB of address space (else OOM)")
        if self.deadline:
            print(f"  deadline  {self.deadline - self.t0:.0f} s for the whole run")
        print(flush=True)

    def legend(self):
        return ("\nmedian s: median forward+backward time over `runs` timed runs after one warm-up; all "
                "contenders of a row and the GEMM floor\n  are timed in one process, on the same inputs, "
                "in alternating order.  [min, max]: over those runs.\n"
                "x naive: median / naive's median (same row; naive = backend 'reference', dense, eager).  "
                "x floor: median / GEMM floor\n  (four N x M x d matmuls, two more N x M x dz for an Affinity target's Gram, timed in the same process).\n"
                "peak MiB: CPU: increase of the peak RSS (VmHWM = ru_maxrss counter, reset before the call) "
                "over the RSS just before one\n  forward+backward, in a fresh process per contender, inputs "
                "already allocated, glibc's mmap threshold pinned at 128 KiB\n  (reproducible to ~1 MiB; "
                "bench/measure.py); CUDA: max_memory_allocated minus memory_allocated before.\n"
                "x naive mem: peak / naive's peak.  max err: max(|loss - ref| / |ref|, max|grad - ref grad| / "
                "max|ref grad|) against naive (fp32 reference for bf16).")

    def replay(self, path):
        with open(path) as f:
            payload = json.load(f)
        self.records, self.info = payload["records"], payload["machine"]
        self.threads, self._gpu_name = payload.get("threads"), payload.get("gpu")
        self.stem = os.path.splitext(os.path.abspath(path))[0]
        self.devices = list(dict.fromkeys(r["device"] for r in self.records)) or ["cpu"]
        print(f"results of {path} ({payload.get('mode')} run, {payload.get('total_wall_s', 0):.0f} s)")
        return self.finish(measured=False)

    def finish(self, measured=True):
        titles = {c: CONFIGS[c].title for c in CONFIGS}
        print(format_table(self.records, titles))
        print(format_probe(self.records))
        print(self.legend())
        written = []
        if measured:
            self.save()
            written = [self.stem + ".csv", self.stem + ".json"]
        if not self.a.no_plots:
            if plots.available():
                machine = f"{self.info['cpu']}, torch {self.info['torch']}"
                written += plots.plot_all(sweep_groups(self.records), self.a.plot_dir or self.a.results_dir,
                                          os.path.basename(self.stem), machine)
                if self.a.readme_plot:
                    written.append(self.readme_plot())
            else:
                print("\nplots: skipped, matplotlib is not installed (pip install .[bench])")
        if measured:
            print(f"\ntotal wall time {self.elapsed():.0f} s")
        for p in written:
            if p:
                print(f"wrote {os.path.relpath(p)}")
        return 0

    def readme_plot(self):
        device = self.devices[0]
        rows = [r for r in self.records if r.get("kind") == "sweep" and r["device"] == device
                and r["config"] == PROBE_CONFIG]
        if not rows:
            return None
        dtype = rows[0]["dtype"]
        rows = [r for r in rows if r["dtype"] == dtype]
        who = self.device_name(device) or device
        title = (f"InfoNCE (labels, dot), {dtype}, d={self.a.d}, fwd+bwd on {who} "
                 f"({self.threads} threads), torch {self.info['torch']}")
        return plots.plot_group(rows, self.a.readme_plot, title, small=True)
