"""What a benchmark run prints and writes: the header, the table and its legend, the CSV and JSON,
the PNG plots (and the README's plot), and the replay of an earlier run (--from-json)."""
from __future__ import annotations

import json
import os

import plots
import report
from configs import CONFIGS, PROBE_CONFIG
from contenders import ORDER, PEERS, label, unavailable_reason


class BenchOutput:
    """Part of run_bench.Bench: its console output and files."""

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
