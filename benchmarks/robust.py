"""secfed's robust aggregators timed side by side with ByzFL's, in one run.

    python benchmarks/robust.py            # n in {10, 50, 100}, d in {1e5, 1e6}, f = 20% of n
    python benchmarks/robust.py --quick    # n = 10, d = 1e4 (smoke test)
    python benchmarks/robust.py --quick --no-byzfl   # without ByzFL: only the sum-pass ratios

Needs a Python that imports both secfed and ByzFL. ByzFL declares torchvision, which would pull
a CUDA torch into secfed's environment, so install it without dependencies into its own folder
and put that on the path (its aggregators need only torch, numpy and scipy)::

    .venv/bin/pip install --no-deps --target /tmp/byzfl-pkg byzfl==0.0.11
    PYTHONPATH=/tmp/byzfl-pkg .venv/bin/python benchmarks/robust.py

(or the separate venv of tests/data/make_byzfl_reference.py with ``PYTHONPATH=$PWD``).
``import byzfl`` runs its benchmark package (torchvision); the aggregators are imported without it.

Speed is machine-dependent, so every time is also reported as a multiple of one pass over the
same input: ``X.sum(0)`` on the same (n, d) float32 tensor, timed in the same process with the same
threads (``*_over_sum``). The second headline, ``max_over_sum_pass_n50_d1e6``, is the largest such
multiple among the order-statistic aggregators (coordinate median, trimmed mean) at n = 50,
d = 1e6: how far they are from memory speed (goal: <= 5). The CPU model and flags from
/proc/cpuinfo, the load average and the numba version are recorded with the results.

Both libraries get the same float32 (n, d) tensor on CPU and the same torch thread count.
Each cell is the median of ``--repeats`` calls after one warm-up; peak memory is the
largest resident-set growth seen by a 1 ms sampling thread during one further, untimed call
(approximate: sampling can miss a very short peak; the sampler is not running while calls are
timed, because its wake-ups steal the GIL and a core). Writes benchmarks/results/robust.json
with ``headline.min_speedup_vs_byzfl_n50_d1e6``: the smallest ByzFL/secfed time ratio at
n = 50, d = 1e6 over the robust aggregators both libraries have (Median, TrimmedMean, Krum,
MultiKrum, GeometricMedian, CenteredClipping; the plain mean and the pre-aggregators are in
the table, not in the headline).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defenses.robust import (NNM, Bulyan, CenteredClipping, CoordinateMedian, GeometricMedian, Krum,  # noqa: E402
                             Mean, MultiKrum, StaticClip, TrimmedMean)
from defenses.robust import compiled, order_stats  # noqa: E402

from _machine import command  # noqa: E402 - benchmarks/ (this script's folder) is on sys.path

HEADLINE = ["Median", "TrimmedMean", "Krum", "MultiKrum", "GeometricMedian", "CenteredClipping"]
ORDER_STATS = ["Median", "TrimmedMean"]  # the max_over_sum_pass headline


def cpu_description() -> dict:
    """CPU model name and flags from /proc/cpuinfo (Linux), the cores this process may use, the load."""
    model, flags = platform.processor() or None, []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in (None, "", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "amx", "neon", "asimd", "sve"))]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_model": model, "cpu_simd_flags": simd, "cpu_flags": flags, "usable_cpus": usable,
            "load_average_at_start": load}


def kernel_description() -> dict:
    """numba's version, the min/max instruction set the selection kernel is compiled for, and the seconds
    of each kernel's first call in this process (numba import + cache load, or a compile when the cache is
    cold): order statistics, the Gram matrix (Krum & co.), centred clipping."""
    from defenses.robust import Krum  # through Krum: gram64 routes any CPU float32 X to its kernel

    firsts = {}
    for name, first_call in (("_select_kernel", lambda: order_stats.coordinate_median(torch.randn(3, 70))),
                             ("_gram_kernel", lambda: Krum(f=1)(torch.randn(4, 70))),
                             ("_clip_kernel",  # directly: CenteredClipping sends a small X to torch
                              lambda: compiled("_clip_kernel").clip_step(torch.randn(3, 70), None, 1.0))):
        t0 = time.perf_counter()
        if compiled(name) is not None:
            first_call()
        firsts[name] = round(time.perf_counter() - t0, 3)
    kernel = compiled("_select_kernel")
    return {"numba": getattr(getattr(kernel, "numba", None), "__version__", None),
            "kernel_isa": getattr(kernel, "ISA", None),
            "numba_threading_layer": kernel.threading_layer() if kernel is not None else None,
            "kernel_first_call_s": firsts["_select_kernel"],
            "kernel_first_call_s_by_kernel": firsts}


def scaling_rows(repeats: int, quick: bool) -> list[dict]:
    """Median and trimmed mean (secfed only) over cohort sizes outside the ByzFL grid, each as a
    multiple of one ``X.sum(0)`` on the same input (the 5x goal: n = 5..1000, d up to 1e7)."""
    cells = [(5, 10_000), (200, 2_000)] if quick else [(5, 1_000_000), (10, 10_000_000), (200, 100_000), (1000, 100_000)]
    rows = []
    for n, d in cells:
        X = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
        t_sum = time_it(lambda X: X.sum(0), X, repeats)[0]
        for name, fn in (("Median", lambda X: CoordinateMedian()(X)),
                         ("TrimmedMean", lambda X: TrimmedMean(max(1, round(0.2 * n)))(X))):
            t = time_it(fn, X, repeats)[0]
            rows.append({"aggregator": name, "n": n, "d": d, "secfed_s": t, "sum_pass_s": t_sum,
                         "secfed_over_sum": t / t_sum})
            print(f"n={n:<4} d={d:<8} {name:<18} secfed {t*1e3:9.1f} ms = {t/t_sum:5.2f} sums", flush=True)
        del X
    return rows


def import_byzfl():
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        raise SystemExit("benchmarks/robust.py needs byzfl importable (see the module docstring)")
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = pkg
    from byzfl.aggregators import aggregators, preaggregators

    try:
        version = importlib.metadata.version("byzfl")
    except importlib.metadata.PackageNotFoundError:  # a bare copy of the package on PYTHONPATH
        version = "unknown"
    return aggregators, preaggregators, version


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS growth over the baseline while the block runs (sampled every 1 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def pairs(A, P, n: int, f: int):
    """name -> (secfed callable, ByzFL callable), configured to compute the same thing."""
    return {
        "Mean": (lambda X: Mean()(X), lambda X: A.Average()(X)),
        "Median": (lambda X: CoordinateMedian()(X), lambda X: A.Median()(X)),
        "TrimmedMean": (lambda X: TrimmedMean(f)(X), lambda X: A.TrMean(f=f)(X)),
        # ByzFL scores over n-f-1 neighbours; secfed is told to do the same for a like-for-like timing
        "Krum": (lambda X: Krum(f, neighbours=n - f - 1)(X), lambda X: A.Krum(f=f)(X)),
        "MultiKrum": (lambda X: MultiKrum(f, neighbours=n - f - 1)(X), lambda X: A.MultiKrum(f=f)(X)),
        # ByzFL's default: 3 Weiszfeld iterations from 0 with nu = 0.1
        "GeometricMedian": (lambda X: GeometricMedian(nu=0.1, max_iter=3, tol=0, init="zeros")(X),
                            lambda X: A.GeometricMedian(nu=0.1, T=3)(X)),
        "CenteredClipping": (lambda X: CenteredClipping(tau=1.0, L=1)(X, center=None),
                             lambda X: A.CenteredClipping(L=1, tau=1.0)(X)),
        "NNM (pre)": (lambda X: NNM(f)(X), lambda X: P.NNM(f=f)(X)),
        "StaticClip (pre)": (lambda X: StaticClip(1.0)(X), lambda X: P.Clipping(c=1.0)(X.clone())),
        # ByzFL has no Bulyan; n >= 4f + 3 caps f
        "Bulyan": (lambda X: Bulyan(min(f, (n - 3) // 4))(X), None),
    }


def time_it(fn, X, repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median time of ``repeats`` calls after a warm-up, then the peak memory of one more call.

    The memory sampler is a Python thread that wakes every millisecond: it takes the GIL and a
    share of the cores, which slows an implementation made of many short torch ops more than one
    made of a few long ones, so no call is timed while it runs."""
    out = fn(X)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(X)
        times.append(time.perf_counter() - t0)
    with PeakRSS() as mem:
        fn(X)
    return statistics.median(times), mem.mib, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-byzfl", action="store_true", help="time secfed only (no speedup headline)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robust.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    kernel = kernel_description()
    A, P, byzfl_version = (None, None, None) if args.no_byzfl else import_byzfl()
    grid = [(10, 10_000)] if args.quick else [(n, d) for d in (100_000, 1_000_000) for n in (10, 50, 100)]
    rows = []
    for n, d in grid:
        f = max(1, round(0.2 * n))
        g = torch.Generator().manual_seed(n * 7919 + d)
        X = torch.randn(n, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
        t_sum = time_it(lambda X: X.sum(0), X, args.repeats)[0]  # one pass over the input: the unit
        print(f"n={n:<4} d={d:<8} {'X.sum(0)':<18} {t_sum*1e3:9.1f} ms", flush=True)
        for name, (ours, theirs) in pairs(A, P, n, f).items():
            t_ours, m_ours, o_ours = time_it(ours, X, args.repeats)
            t_byz = m_byz = max_diff = err = None
            if theirs is None:
                err = "not in ByzFL"
            elif A is not None:
                try:
                    t_byz, m_byz, o_byz = time_it(theirs, X, args.repeats)
                    max_diff = float((o_ours.float() - o_byz.float()).abs().max())
                except (RuntimeError, ValueError) as e:  # e.g. torch.quantile's input-size limit
                    err = str(e).splitlines()[0][:200]
            row = {"aggregator": name, "n": n, "d": d, "f": f, "secfed_s": t_ours, "byzfl_s": t_byz,
                   "speedup": (t_byz / t_ours) if t_byz else None, "sum_pass_s": t_sum,
                   "secfed_over_sum": t_ours / t_sum, "byzfl_over_sum": (t_byz / t_sum) if t_byz else None,
                   "secfed_peak_mib": m_ours, "byzfl_peak_mib": m_byz,
                   "input_mib": n * d * 4 / 2**20, "max_abs_diff": max_diff, "byzfl_error": err}
            rows.append(row)
            sp = f"{row['speedup']:.1f}x" if row["speedup"] else f"ByzFL: {err or 'not run'}"
            print(f"n={n:<4} d={d:<8} {name:<18} secfed {t_ours*1e3:9.1f} ms = {t_ours/t_sum:5.1f} sums "
                  f"({m_ours:7.1f} MiB)  byzfl {('%9.1f ms' % (t_byz*1e3)) if t_byz else '      n/a'}  {sp}",
                  flush=True)
        del X
    scaling = scaling_rows(args.repeats, args.quick)
    key_n, key_d = (10, 10_000) if args.quick else (50, 1_000_000)
    key = [r for r in rows if r["n"] == key_n and r["d"] == key_d and r["aggregator"] in HEADLINE]
    # a ByzFL failure (no time) counts as an unbounded speedup, but is reported by name
    finite = [r for r in key if r["speedup"] is not None]
    slowest = min(finite, key=lambda r: r["speedup"]) if finite else None
    cell = [r for r in rows if r["n"] == key_n and r["d"] == key_d]
    order = [r for r in cell if r["aggregator"] in ORDER_STATS]
    farthest = max(order, key=lambda r: r["secfed_over_sum"]) if order else None
    order_sp = [r["speedup"] for r in order if r["speedup"] is not None]
    out = {
        "headline": {"min_speedup_vs_byzfl_n50_d1e6": round(slowest["speedup"], 2) if slowest else None,
                     "max_over_sum_pass_n50_d1e6": round(farthest["secfed_over_sum"], 2) if farthest else None,
                     # the same minimum over the order statistics alone (median, trimmed mean)
                     "min_speedup_vs_byzfl_order_stats_n50_d1e6": round(min(order_sp), 2) if order_sp else None},
        "headline_detail": {
            "slowest_aggregator": slowest["aggregator"] if slowest else None,
            "farthest_from_memory_speed": farthest["aggregator"] if farthest else None,
            "cell": {"n": key_n, "d": key_d},
            "speedups": {r["aggregator"]: (round(r["speedup"], 2) if r["speedup"] else None) for r in key},
            "secfed_over_sum": {r["aggregator"]: round(r["secfed_over_sum"], 2) for r in cell},
            "byzfl_over_sum": {r["aggregator"]: (round(r["byzfl_over_sum"], 2) if r["byzfl_over_sum"] else None)
                               for r in cell},
            "sum_pass_ms": round(cell[0]["sum_pass_s"] * 1e3, 3) if cell else None,
            "byzfl_failures": {r["aggregator"]: r["byzfl_error"] for r in key if r["byzfl_error"]},
            "quick": args.quick,
            "goals": {"max_over_sum_pass_n50_d1e6": "<= 5", "min_speedup_vs_byzfl_n50_d1e6": ">= 10"},
        },
        "environment": {"torch": torch.__version__, "byzfl": byzfl_version, **kernel,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "python": platform.python_version(), **cpu,
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "method": ("median of %d calls after a warm-up, no sampler running; peak = max RSS growth sampled every 1 ms"
                   " during one more, untimed call; *_over_sum = time / time of X.sum(0) on the same input, same"
                   " process and threads") % args.repeats,
        "command": command("benchmarks/robust.py", sys.argv[1:]),
        "table": rows,
        "order_stats_scaling": scaling,
        "max_over_sum_pass_all_n": round(max(r["secfed_over_sum"] for r in scaling + [
            r for r in rows if r["aggregator"] in ORDER_STATS]), 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["headline"]), json.dumps(out["headline_detail"]["speedups"]),
          json.dumps(out["headline_detail"]["secfed_over_sum"]))


if __name__ == "__main__":
    main()
