"""secfed's robust aggregators timed side by side with ByzFL's, in one run.

    python benchmarks/robust.py            # n in {10, 50, 100}, d in {1e5, 1e6}, f = 20% of n
    python benchmarks/robust.py --quick    # n = 10, d = 1e4 (smoke test)

Needs a Python that imports both secfed and ByzFL (ByzFL pulls torchvision, so keep it out
of secfed's environment): e.g. ``PYTHONPATH=$PWD /tmp/byzfl-venv/bin/python benchmarks/robust.py``
with the venv of tests/data/make_byzfl_reference.py. ``import byzfl`` runs its benchmark
package (torchvision); the aggregators are imported without it.

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

from defenses.robust import (NNM, CenteredClipping, CoordinateMedian, GeometricMedian, Krum, Mean,  # noqa: E402
                             MultiKrum, StaticClip, TrimmedMean)

HEADLINE = ["Median", "TrimmedMean", "Krum", "MultiKrum", "GeometricMedian", "CenteredClipping"]


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
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robust.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    A, P, byzfl_version = import_byzfl()
    grid = [(10, 10_000)] if args.quick else [(n, d) for d in (100_000, 1_000_000) for n in (10, 50, 100)]
    rows = []
    for n, d in grid:
        f = max(1, round(0.2 * n))
        g = torch.Generator().manual_seed(n * 7919 + d)
        X = torch.randn(n, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
        for name, (ours, theirs) in pairs(A, P, n, f).items():
            t_ours, m_ours, o_ours = time_it(ours, X, args.repeats)
            try:
                t_byz, m_byz, o_byz = time_it(theirs, X, args.repeats)
                err = None
                max_diff = float((o_ours.float() - o_byz.float()).abs().max())
            except (RuntimeError, ValueError) as e:  # e.g. torch.quantile's input-size limit
                t_byz = m_byz = max_diff = None
                err = str(e).splitlines()[0][:200]
            row = {"aggregator": name, "n": n, "d": d, "f": f, "secfed_s": t_ours, "byzfl_s": t_byz,
                   "speedup": (t_byz / t_ours) if t_byz else None, "secfed_peak_mib": m_ours, "byzfl_peak_mib": m_byz,
                   "input_mib": n * d * 4 / 2**20, "max_abs_diff": max_diff, "byzfl_error": err}
            rows.append(row)
            sp = f"{row['speedup']:.1f}x" if row["speedup"] else f"ByzFL failed: {err}"
            print(f"n={n:<4} d={d:<8} {name:<18} secfed {t_ours*1e3:9.1f} ms ({m_ours:7.1f} MiB)  "
                  f"byzfl {('%9.1f ms' % (t_byz*1e3)) if t_byz else '      n/a'}  {sp}", flush=True)
        del X
    key_n, key_d = (10, 10_000) if args.quick else (50, 1_000_000)
    key = [r for r in rows if r["n"] == key_n and r["d"] == key_d and r["aggregator"] in HEADLINE]
    # a ByzFL failure (no time) counts as an unbounded speedup, but is reported by name
    finite = [r for r in key if r["speedup"] is not None]
    slowest = min(finite, key=lambda r: r["speedup"]) if finite else None
    out = {
        "headline": {"min_speedup_vs_byzfl_n50_d1e6": round(slowest["speedup"], 2) if slowest else None},
        "headline_detail": {
            "slowest_aggregator": slowest["aggregator"] if slowest else None,
            "cell": {"n": key_n, "d": key_d},
            "speedups": {r["aggregator"]: (round(r["speedup"], 2) if r["speedup"] else None) for r in key},
            "byzfl_failures": {r["aggregator"]: r["byzfl_error"] for r in key if r["byzfl_error"]},
            "quick": args.quick,
        },
        "environment": {"torch": torch.__version__, "byzfl": byzfl_version, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                        "processor": platform.processor()},
        "method": ("median of %d calls after a warm-up, no sampler running; peak = max RSS growth sampled every 1 ms"
                   " during one more, untimed call") % args.repeats,
        "command": " ".join(["python", "benchmarks/robust.py"] + [a for a in sys.argv[1:] if not a.startswith("--out")]),
        "table": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["headline"]), json.dumps(out["headline_detail"]["speedups"]))


if __name__ == "__main__":
    main()
