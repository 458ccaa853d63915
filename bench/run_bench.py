"""Benchmark the I-Con loss: every backend against naive PyTorch, eager and compiled, on this machine.

What ``make bench`` runs. Configurations (bench/configs.py): InfoNCE/SupCon (labels, dot kernel),
t-SNE (Affinity target with a Gaussian kernel, student_t kernel) and CLIP-style (rectangular y).
Contenders (bench/contenders.py): naive PyTorch (backend "reference"), the same under
torch.compile, every usable fused backend of the device, and optional peers
(pytorch-metric-learning's SupConLoss, KeOps) when installed.

Per row (configuration, dtype, N), forward + backward:
- time: the median, min and max over the timed runs after one warm-up. All contenders of a row
  and the GEMM floor are timed in the same process, on the same inputs, in alternating order.
- x naive: the time divided by naive's time in the same row.
- x floor: the time divided by the GEMM floor, four N x M x d matmuls timed in the same process.
- peak memory:
  - on CPU, the increase of the peak RSS (VmHWM, the ru_maxrss counter, reset just before the
    call) over the RSS just before one run, in a fresh process per contender, with the inputs
    already allocated;
  - on CUDA, max_memory_allocated over one run minus memory_allocated before it.
- max err: the error against the reference, where the reference ran.
Cells say "OOM" or "skipped" instead of crashing. A largest-N probe finds the largest N that naive
and each fused backend can run within a memory budget. Results go to
bench/results/<host>-<timestamp>.{csv,json}, with PNG plots beside them.

    python bench/run_bench.py             # default: under 10 minutes on a 2-core machine
    python bench/run_bench.py --quick     # under 2 minutes
    python bench/run_bench.py --full      # the whole sweep (CPU 2k..32k, GPU 4k..256k, bf16 + fp32)
    python bench/run_bench.py --configs infonce --sizes 4096 8192 --contenders naive cpu
"""
from __future__ import annotations

import os

# torch.cuda.is_available() through NVML: the parent never initialises the CUDA driver, so the
# CPU jobs it forks stay clean (GPU jobs run in fresh interpreters).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import icon_kernels as ik  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
import worker  # noqa: E402
from configs import CONFIGS, MODES, PROBE_CONFIG  # noqa: E402
from contenders import FUSED, NAIVE, ORDER, PEERS, contenders_for, label, unavailable_reason  # noqa: E402
from report import FLOOR  # noqa: E402

# extra seconds a job may take beyond its time budget: compiling (inductor, KeOps) and start-up
ALLOWANCE = {"compiled": 240.0, "keops": 300.0}
DEFAULT_ALLOWANCE = 60.0


# --- machine ------------------------------------------------------------------------------------------

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
        "cpu": _read("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "mem_total_gib": int(mem.split()[0]) / 2**20 if mem else None,
        "mem_available_gib": int(avail.split()[0]) / 2**20 if avail else None,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "icon_kernels": ik.__version__, "git": _git(), "cuda_available": torch.cuda.is_available(),
        "backends": ik.available_backends(),
    }


# --- arguments ----------------------------------------------------------------------------------------

def _list(values, cast=str):
    out = []
    for v in values or []:
        out += [cast(s) for s in str(v).split(",") if s.strip()]
    return out or None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[-4:]))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes")
    g.add_argument("--full", action="store_true", help="the whole sweep (long)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA when present")
    p.add_argument("--configs", nargs="+", help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--sizes", nargs="+", help="N values for every configuration (overrides the plan)")
    p.add_argument("--dtypes", nargs="+", help="dtypes (overrides the plan), e.g. float32 bfloat16")
    p.add_argument("--contenders", nargs="+",
                   help="subset of naive, compiled, torch, cpu, triton, cuda, pml-supcon, keops")
    p.add_argument("--d", type=int, default=128, help="embedding dimension (default 128)")
    p.add_argument("--repeats", type=int, help="timed runs per contender after the warm-up (at most)")
    p.add_argument("--budget", type=float,
                   help="seconds per contender and row (memory run + warm-up + timed runs)")
    p.add_argument("--deadline", type=float,
                   help="seconds for the whole run, after which cells are skipped (0: none; default: "
                        "110 with --quick, 560 by default, none with --full; on CUDA 110 / 200 / none)")
    p.add_argument("--mem-limit", type=float,
                   help="GiB a CPU run may add to its address space before it counts as OOM "
                        "(default: 80%% of MemAvailable at start)")
    p.add_argument("--no-probe", action="store_true", help="skip the largest-N probe")
    p.add_argument("--probe-mem", type=float, help="GiB, memory budget of the largest-N probe "
                   "(default: 4 on CPU, 1 with --quick; 90%% of device memory on CUDA)")
    p.add_argument("--probe-step-s", type=float, help="no probe step predicted to take longer")
    p.add_argument("--probe-steps", type=int, help="probe runs per contender, at most")
    p.add_argument("--probe-max-n", type=int, help="largest N the probe tries")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--plot-dir", help="where the PNG plots go (default: the results directory)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme-plot", metavar="PNG",
                   help="also write one small PNG (infonce on the first device) for the README, "
                        "e.g. bench/plots/cpu-infonce.png")
    p.add_argument("--from-json", metavar="JSON",
                   help="measure nothing: print the table of an earlier run and write its plots "
                        "(with --readme-plot, the README's plot)")
    p.add_argument("--spawn", action="store_true",
                   help="run CPU jobs in fresh interpreters instead of forked children")
    a = p.parse_args(argv)
    a.configs = _list(a.configs)
    a.sizes = _list(a.sizes, int)
    a.dtypes = _list(a.dtypes)
    a.contenders = _list(a.contenders)
    for c in a.configs or []:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    return a


# --- the run ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, a):
        self.a = a
        self.mode_name = "quick" if a.quick else "full" if a.full else "default"
        self.info = machine_info()
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.t0 = time.time()
        self.records = []
        self.est = {}            # (device, config, dtype, contender) -> (n, m, seconds per run)
        self.oom_at = {}         # (device, config, dtype, contender) -> smallest N that ran out of memory
        self.done_steps, self.cell_costs, self.row_index = 0, [], 0
        self.devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
                        if a.device == "auto" else [a.device])
        if "cuda" in self.devices and not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
        self.deadline = None
        deadlines = [MODES[(d, self.mode_name)].deadline_s for d in self.devices]
        if a.deadline is not None:
            self.deadline = self.t0 + a.deadline if a.deadline > 0 else None
        elif all(deadlines):
            self.deadline = self.t0 + sum(deadlines)
        self.sweep_deadline = self.deadline
        if self.deadline and not a.no_probe:
            self.sweep_deadline = self.deadline - min(90.0, self.probe_estimate)
        avail = self.info.get("mem_available_gib") or 8.0
        self.mem_limit_mib = 1024 * (a.mem_limit if a.mem_limit else 0.8 * avail)
        os.makedirs(a.results_dir, exist_ok=True)
        self.stem = os.path.join(a.results_dir, f"{self.info['host']}-{self.stamp}")
        self.rows = self.plan()
        self.total_steps = sum((len(r["contenders"]) + 1) if r["device"] == "cpu" else 1 for r in self.rows)

    # plan -----------------------------------------------------------------------------------------------
    def mode(self, device):
        return MODES[(device, self.mode_name)]

    def plan(self):
        rows = []
        for device in self.devices:
            mode = self.mode(device)
            for cname, dtypes, sizes, skip in mode.plan:
                if self.a.configs and cname not in self.a.configs:
                    continue
                cfg = CONFIGS[cname]
                conts = contenders_for(cfg, device, self.a.contenders, () if self.a.contenders else skip)
                for dtype in (self.a.dtypes or dtypes):
                    for n in (self.a.sizes or sizes):
                        if any((r["device"], r["config"], r["dtype"], r["n"]) == (device, cname, dtype, n)
                               for r in rows):
                            continue       # a --dtypes override can repeat a plan entry
                        rows.append({"device": device, "config": cname, "dtype": dtype, "n": n,
                                     "m": cfg.m_of_n(n), "contenders": conts})
        # configurations requested but absent from the mode's plan (e.g. --configs tsne on quick CUDA)
        for device in self.devices:
            for cname in self.a.configs or []:
                if not any(r["config"] == cname and r["device"] == device for r in rows):
                    cfg = CONFIGS[cname]
                    conts = contenders_for(cfg, device, self.a.contenders)
                    dtypes = self.a.dtypes or (["float32"] if device == "cpu" else ["bfloat16"])
                    for dtype in dtypes:
                        for n in self.a.sizes or ([2048] if device == "cpu" else [16384]):
                            rows.append({"device": device, "config": cname, "dtype": dtype, "n": n,
                                         "m": cfg.m_of_n(n), "contenders": conts})
        return rows

    def repeats(self, device):
        return self.a.repeats or self.mode(device).repeats

    def budget(self, device):
        return self.a.budget or self.mode(device).budget_s

    # helpers ----------------------------------------------------------------------------------------------
    def elapsed(self):
        return time.time() - self.t0

    def run_job(self, spec, timeout):
        if self.deadline:   # a job never runs far past the deadline (gpu_check.sh wraps us in `timeout`)
            timeout = min(timeout, max(10.0, self.deadline + 15 - time.time()))
        if spec["device"] == "cuda" or self.a.spawn or not hasattr(os, "fork"):
            return worker.run_spawned(spec, timeout)
        return worker.run_forked(spec, timeout)

    def predict(self, key, n, m):
        if key not in self.est:
            return None
        n0, m0, t0 = self.est[key]
        return t0 * (n * m) / (n0 * m0)

    def eta(self):
        """Seconds left: predicted cost of the remaining cells, the mean observed cost otherwise."""
        mean = statistics.mean(self.cell_costs) if self.cell_costs else 5.0
        left = 0.0
        for row in self.rows[self.row_index:]:
            for name in row["contenders"]:
                p = self.predict((row["device"], row["config"], row["dtype"], name), row["n"], row["m"])
                cost = mean if p is None else min(self.budget(row["device"]), p * (self.repeats(row["device"]) + 2))
                left += cost
        if not self.a.no_probe:
            left += self.probe_estimate
        if self.deadline:
            left = min(left, max(0.0, self.deadline - time.time()))
        return left

    def progress(self, text, steps=1):
        self.done_steps += steps
        el, eta = self.elapsed(), self.eta()
        print(f"[{self.done_steps:3d}/{self.total_steps}] {text} | {el // 60:.0f}:{el % 60:02.0f} elapsed, "
              f"ETA {eta // 60:.0f}:{eta % 60:02.0f}", flush=True)

    def base_record(self, row, name):
        cfg = CONFIGS[row["config"]]
        return {"kind": "sweep", "host": self.info["host"], "timestamp": self.stamp,
                "device": row["device"], "device_name": self.device_name(row["device"]),
                "cpu": self.info["cpu"], "threads": self.threads, "python": self.info["python"],
                "torch": self.info["torch"], "triton": self.info["triton"],
                "icon_kernels": self.info["icon_kernels"], "git": self.info["git"],
                "dtype": row["dtype"], "config": row["config"], "target": cfg.target, "kernel": cfg.kernel,
                "n": row["n"], "m": row["m"], "d": self.a.d, "contender": label(name), "status": "ok"}

    threads = None
    _gpu_name = None

    def device_name(self, device):
        return self.info["cpu"] if device == "cpu" else self._gpu_name

    # one row ----------------------------------------------------------------------------------------------
    def run_row(self, row):
        device, n, m = row["device"], row["n"], row["m"]
        budget, k = self.budget(device), self.repeats(device)
        where = f"{row['config']} {row['dtype']} N={n}" + (f" M={m}" if m != n else "")
        recs, to_time, spent, run_s = {}, [], {}, {}
        for name, why in row["contenders"].items():
            rec = recs[name] = self.base_record(row, name)
            key = (device, row["config"], row["dtype"], name)
            pred = self.predict(key, n, m)
            if why:
                rec.update(status="n/a", note=why)
            elif key in self.oom_at and n >= self.oom_at[key]:
                rec.update(status="OOM", note=f"OOM: ran out of memory at N={self.oom_at[key]}")
            elif pred is not None and pred * 3 > budget:
                rec.update(status="skipped", note=f"skipped: over time budget (one run ~{pred:.1f} s "
                                                  f"predicted, budget {budget:.0f} s per contender and row)")
            elif self.sweep_deadline and time.time() > self.sweep_deadline:
                rec.update(status="skipped", note="skipped: over time budget (deadline of the whole run)")
            elif device == "cuda":
                to_time.append(name)
                continue
            else:
                t_cell = time.time()
                timeout = max(budget, 3 * (pred or 0)) + ALLOWANCE.get(name, DEFAULT_ALLOWANCE)
                r = self.run_job({"job": "memory", "config": row["config"], "contender": name, "n": n,
                                  "d": self.a.d, "dtype": row["dtype"], "device": device,
                                  "mem_limit_mib": self.mem_limit_mib, "warm_n": self.warm_n()}, timeout)
                self.threads = self.threads or r.get("threads")
                if r.get("ok"):
                    rec.update(peak_mib=r["peak_mib"], memory_counter=r["memory_counter"], one_run_s=r["run_s"])
                    run_s[name] = spent[name] = r["run_s"]
                    self.est[key] = (n, m, r["run_s"])
                    if r["run_s"] * 3 > budget:
                        rec.update(status="skipped", note=f"skipped: over time budget (one run took "
                                                          f"{r['run_s']:.1f} s, budget {budget:.0f} s)")
                        msg = f"memory +{r['peak_mib']:.1f} MiB, one run {r['run_s']:.2f} s; not timed (budget)"
                    else:
                        to_time.append(name)
                        msg = f"memory +{r['peak_mib']:.1f} MiB, one run {r['run_s']:.2f} s"
                else:
                    self._fail(rec, r, key, n)
                    msg = rec["note"]
                self.cell_costs.append(time.time() - t_cell)
                self.progress(f"{where} {label(name):13s} {msg}")
                continue
            if device == "cpu":
                self.progress(f"{where} {label(name):13s} {rec['note']}")

        floor = self.base_record(row, FLOOR)
        floor.update(contender=FLOOR, status="skipped", note="nothing timed")
        if to_time and not (self.sweep_deadline and time.time() > self.sweep_deadline):
            t_job = time.time()
            timeout = (len(to_time) * budget + sum(ALLOWANCE.get(c, DEFAULT_ALLOWANCE) for c in to_time)
                       + 60 + (120 if device == "cuda" else 0))
            spec = {"job": "timing", "config": row["config"], "contenders": to_time, "n": n,
                    "d": self.a.d, "dtype": row["dtype"], "device": device, "repeats": k,
                    "budget_s": budget, "spent_s": spent, "run_s": run_s,
                    "mem_limit_mib": self.mem_limit_mib if device == "cpu" else None}
            r = self.run_job(spec, timeout)
            while r.get("poisoned_by") in to_time:
                # a fault in one contender broke the CUDA context: record it, rerun the others
                bad = r["poisoned_by"]
                self._fail(recs[bad], r, (device, row["config"], row["dtype"], bad), n)
                print(f"  {label(bad)} broke the CUDA context ({r.get('message', '')[:120]}); "
                      "rerunning the row without it", flush=True)
                to_time = [c for c in to_time if c != bad]
                spec["contenders"] = to_time
                r = self.run_job(spec, timeout) if to_time else {"ok": True, "results": {}}
            self.threads = self.threads or r.get("threads")
            self._gpu_name = self._gpu_name or r.get("device_name")
            if r.get("ok"):
                self._take_timing(row, recs, floor, r, to_time)
            else:
                for name in to_time:
                    self._fail(recs[name], r, (device, row["config"], row["dtype"], name), n,
                               prefix="timing job: ")
            self.cell_costs.append((time.time() - t_job) / max(1, len(to_time)))
            summary = ", ".join(f"{label(c)} {report.fmt_s(recs[c].get('median_s'))} s"
                                if recs[c]["status"] == "ok" else f"{label(c)} {recs[c]['status']}"
                                for c in to_time)
            self.progress(f"{where} timed: {summary}, floor {report.fmt_s(floor.get('median_s'))} s")
        elif to_time:
            for name in to_time:
                recs[name].update(status="skipped", note="skipped: over time budget (deadline of the whole run)")
            self.progress(f"{where} not timed: deadline")
        elif device == "cpu":
            self.progress(f"{where} nothing to time")
        self._ratios(recs, floor)
        for rec in list(recs.values()) + [floor]:
            rec.update(threads=self.threads, device_name=self.device_name(device))
        self.records += [recs[c] for c in row["contenders"]] + [floor]
        self.save()

    def warm_n(self):
        # tiny warm-up size for compile: no size equal to d (duck sizing would specialise on it)
        return 320 if self.a.d not in (320, 160) else 448

    def _fail(self, rec, r, key, n, prefix=""):
        status = r.get("status", "failed")
        msg = r.get("message", "")
        if status == "OOM":
            rec.update(status="OOM", note=f"OOM: {msg}")
            self.oom_at[key] = min(n, self.oom_at.get(key, n))
        elif status == "timeout":
            rec.update(status="skipped", note=f"skipped: over time budget ({prefix}{msg})")
        elif status == "compile failed":
            rec.update(status="compile failed", note=f"compile failed: {msg}")
        else:
            rec.update(status="failed", note=f"failed: {prefix}{msg}")

    def _take_timing(self, row, recs, floor, r, to_time):
        device = row["device"]
        for name in to_time:
            rec, res = recs[name], r["results"].get(name, {"status": "failed", "message": "no result"})
            key = (device, row["config"], row["dtype"], name)
            for f in ("loss", "err_loss_rel", "err_grad_rel", "max_err"):
                if f in res:
                    rec[f] = res[f]
            if "peak_mib" in res:
                rec.update(peak_mib=res["peak_mib"], memory_counter=res["memory_counter"])
            if res.get("err_loss_rel") is not None:
                rec["oracle"] = r.get("oracle")
            status = res.get("status")
            if status == "ok" and res.get("times_s"):
                t = res["times_s"]
                rec.update(median_s=statistics.median(t), min_s=min(t), max_s=max(t), runs=len(t), times_s=t)
                self.est[key] = (row["n"], row["m"], rec["median_s"])
            elif status == "skipped":
                rec.update(status="skipped", note="skipped: " + res.get("message", "over time budget"))
                if res.get("run_s"):
                    self.est[key] = (row["n"], row["m"], res["run_s"])
            else:
                self._fail(rec, res, key, row["n"])
        if r.get("floor_s"):
            t = r["floor_s"]
            floor.update(status="ok", note="", median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                         runs=len(t), times_s=t)
        elif r.get("floor_status"):
            self._fail(floor, r["floor_status"], None, row["n"])

    def _ratios(self, recs, floor):
        naive = recs.get(NAIVE)
        fl = floor.get("median_s")
        for rec in list(recs.values()) + [floor]:
            med = rec.get("median_s")
            if med:
                rec["floor_s"] = fl
                rec["x_floor"] = med / fl if fl else None
                rec["tflops"] = 8 * rec["n"] * rec["m"] * rec["d"] / med / 1e12
                if naive and naive.get("median_s"):
                    rec["x_naive"] = med / naive["median_s"]
            # below 1 MiB the naive figure is page-granular noise: no ratio
            if rec.get("peak_mib") is not None and naive and (naive.get("peak_mib") or 0) >= 1.0:
                rec["x_naive_mem"] = rec["peak_mib"] / naive["peak_mib"]

    # largest-N probe --------------------------------------------------------------------------------------
    def probe_contenders(self, device):
        cfg = CONFIGS[PROBE_CONFIG]
        names = [n for n in contenders_for(cfg, device, self.a.contenders) if n == NAIVE or n in FUSED]
        return [n for n in names if contenders_for(cfg, device, [n])[n] is None]

    @property
    def probe_estimate(self):
        if self.a.no_probe:
            return 0.0
        total = 0.0
        for device in self.devices:
            step = self.a.probe_step_s or self.mode(device).probe_step_s
            start_up = 10.0 if device == "cuda" else 1.0      # a fresh interpreter per GPU probe
            total += len(self.probe_contenders(device)) * (start_up + 0.8 * step)
        return total

    def probe(self, device):
        mode = self.mode(device)
        dtype = (self.a.dtypes or next((p[1] for p in mode.plan if p[0] == PROBE_CONFIG), ("float32",)))[0]
        mem_gib = self.a.probe_mem if self.a.probe_mem is not None else mode.probe_mem_gib
        budget_mib = mem_gib * 1024
        step_s = self.a.probe_step_s or mode.probe_step_s
        steps = self.a.probe_steps or mode.probe_steps
        budget_text = f"{mem_gib:g} GiB" if budget_mib else "90% of device memory"
        print(f"\nLargest-N probe on {device} ({PROBE_CONFIG}, {dtype}, d={self.a.d}): memory budget "
              f"{budget_text}, no step predicted over {step_s:.0f} s, at most {steps} steps per contender",
              flush=True)
        for name in self.probe_contenders(device):
            known = []
            for r in self.records:
                if (r.get("kind"), r["device"], r["config"], r["dtype"], r["contender"]) != \
                        ("sweep", device, PROBE_CONFIG, dtype, label(name)):
                    continue
                t = r.get("median_s") or r.get("one_run_s")
                if r.get("peak_mib") is not None and budget_mib and t:
                    known.append((r["n"], r["peak_mib"] <= budget_mib, r["peak_mib"], t))
                elif r["status"] == "OOM":
                    known.append((r["n"], False, None, None))
            rec = self.base_record({"device": device, "config": PROBE_CONFIG, "dtype": dtype, "n": 0, "m": 0},
                                   name)
            rec.update(kind="probe", n=None, m=None, budget_mib=budget_mib or None)

            def on_step(n, fits, r, name=name):
                detail = (f"+{r['peak_mib']:.1f} MiB, {r['run_s']:.2f} s" if r["status"] == "ok"
                          else f"{r['status']}: {r.get('message', '')[:80]}")
                el = self.elapsed()
                print(f"  probe {device} {label(name):13s} N={n:<8d} {'fits' if fits else 'does not fit'} "
                      f"({detail}) | {el // 60:.0f}:{el % 60:02.0f} elapsed", flush=True)

            if device == "cuda":
                r = self.run_job({"job": "probe", "config": PROBE_CONFIG, "contender": name, "device": device,
                                  "dtype": dtype, "d": self.a.d, "mem_budget_mib": budget_mib,
                                  "start_n": min(16384, self.a.probe_max_n or 16384), "known": known, "step_s": step_s, "steps": steps,
                                  "max_n": self.a.probe_max_n, "deadline": self.deadline},
                                 timeout=steps * (step_s * 3 + 30) + 120)
                for s in r.get("steps", []):
                    on_step(s["n"], s["fits"], s)
                if not r.get("ok"):
                    rec.update(status=r.get("status", "failed"), note=r.get("message", ""))
                    self.records.append(rec)
                    continue
                budget_mib = budget_mib or r.get("budget_mib")
                rec["budget_mib"] = r.get("budget_mib")
            else:
                hard = max(2 * budget_mib, budget_mib + 1024)

                def step(n, name=name):
                    res = self.run_job({"job": "memory", "config": PROBE_CONFIG, "contender": name, "n": n,
                                        "d": self.a.d, "dtype": dtype, "device": device,
                                        "mem_limit_mib": hard, "warm_n": self.warm_n()},
                                       timeout=3 * step_s + ALLOWANCE.get(name, DEFAULT_ALLOWANCE))
                    return {"status": res.get("status", "failed"), "message": res.get("message", ""),
                            "peak_mib": res.get("peak_mib"), "run_s": res.get("run_s")}

                start = min(2048, self.a.probe_max_n or 2048)
                r = worker.probe_search(step, budget_mib, start, known, step_s, steps,
                                        self.a.probe_max_n, self.deadline, on_step=on_step)
            rec.update(n=r["largest_n"], peak_mib=r["peak_mib"], median_s=r["run_s"],
                       fails_at_n=r["smallest_failing_n"], limited_by=r["limited_by"],
                       status="ok" if r["largest_n"] else "none fits",
                       note=f"{len(r['steps'])} probe runs")
            self.records.append(rec)
            self.save()

    # output -----------------------------------------------------------------------------------------------
    def payload(self):
        return {"machine": self.info, "threads": self.threads, "gpu": self._gpu_name, "mode": self.mode_name,
                "args": vars(self.a), "mem_limit_mib": self.mem_limit_mib,
                "total_wall_s": self.elapsed(), "records": self.records}

    def save(self):
        report.write_csv(self.stem + ".csv", self.records)
        report.write_json(self.stem + ".json", self.payload())

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
                "x floor: median / GEMM floor\n  (four N x M x d matmuls, timed in the same process).\n"
                "peak MiB: CPU: increase of the peak RSS (VmHWM = ru_maxrss counter, reset before the call) "
                "over the RSS just before one\n  forward+backward, in a fresh process per contender, inputs "
                "already allocated; CUDA: max_memory_allocated minus memory_allocated before.\n"
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

    def run(self):
        if self.a.from_json:
            return self.replay(self.a.from_json)
        self.header()
        for self.row_index, row in enumerate(self.rows):
            self.run_row(row)
        self.row_index = len(self.rows)
        if not self.a.no_probe:
            for device in self.devices:
                if self.deadline and time.time() > self.deadline:
                    print(f"\nLargest-N probe on {device}: skipped (deadline)")
                    continue
                self.probe(device)
        return self.finish()

    def finish(self, measured=True):
        titles = {c: CONFIGS[c].title for c in CONFIGS}
        print(report.format_table(self.records, titles))
        print(report.format_probe(self.records))
        print(self.legend())
        written = []
        if measured:
            self.save()
            written = [self.stem + ".csv", self.stem + ".json"]
        if not self.a.no_plots:
            if plots.available():
                machine = f"{self.info['cpu']}, torch {self.info['torch']}"
                written += plots.plot_all(self.records, self.a.plot_dir or self.a.results_dir,
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


def main(argv=None):
    a = parse_args(argv)
    return Bench(a).run()


if __name__ == "__main__":
    sys.exit(main())
