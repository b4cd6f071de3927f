"""ALIE against robust aggregators on non-IID digits: final accuracy, 3 seeds, mean and spread.

    python benchmarks/poisoning_digits.py            # every arm x seeds 0,1,2 -> benchmarks/results/poisoning_digits.json
    python benchmarks/poisoning_digits.py --quick    # 2 arms, 1 seed, 5 rounds (smoke test)

Base config: experiments/poisoning_digits.toml (25 clients, 5 malicious, Dirichlet(1.0)
label skew, SmallCNN). Each arm overrides the aggregator, the pre-aggregators and the
client momentum beta (0 = plain local SGD, 0.9 = worker momentum kept across rounds,
Karimireddy et al. 2021). Runs are independent processes (``--workers``), one torch
thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "experiments" / "poisoning_digits.toml"
F = 5
TAU = 0.5

# name -> (aggregator, pre_aggregators, momentum beta, attacked)
ARMS: dict[str, tuple[dict, list, float, bool]] = {
    "no attack / Mean": ({"name": "mean"}, [], 0.0, False),
    "ALIE / Mean": ({"name": "mean"}, [], 0.0, True),
    "ALIE / CoordinateMedian": ({"name": "median"}, [], 0.0, True),
    "ALIE / Krum": ({"name": "krum", "f": F}, [], 0.0, True),
    "ALIE / TrimmedMean": ({"name": "trimmed-mean", "f": F}, [], 0.0, True),
    "ALIE / CenteredClipping": ({"name": "centered-clipping", "tau": TAU}, [], 0.0, True),
    "ALIE / CenteredClipping + momentum": ({"name": "centered-clipping", "tau": TAU}, [], 0.9, True),
    "ALIE / NNM + CenteredClipping + momentum": ({"name": "centered-clipping", "tau": TAU}, [{"name": "nnm", "f": F}], 0.9, True),
    "ALIE / CoordinateMedian + momentum": ({"name": "median"}, [], 0.9, True),
    "ALIE / Krum + momentum": ({"name": "krum", "f": F}, [], 0.9, True),
    "ALIE / TrimmedMean + momentum": ({"name": "trimmed-mean", "f": F}, [], 0.9, True),
}
QUICK_ARMS = ["ALIE / Mean", "ALIE / CenteredClipping + momentum"]


def run_one(arm: str, seed: int, rounds: int | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from secfed.config import load_config
    from secfed.engine import Engine

    agg, pre, beta, attacked = ARMS[arm]
    ov = {"run.seed": seed, "server.aggregator": agg, "server.pre_aggregators": pre,
          "client.trainer": {"name": "momentum-sgd", "beta": beta}, "run.threads": 1}
    if rounds:
        ov["run.rounds"] = rounds
    if not attacked:
        ov["attack.adversary"] = None
    cfg = load_config(BASE, ov)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = Engine(cfg, Path(d) / "run", progress=False).run()
        return {"arm": arm, "seed": seed, "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
                "seconds": time.perf_counter() - t0, "majority_baseline": s["majority_baseline"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 14))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "poisoning_digits.json"))
    args = ap.parse_args()
    arms = QUICK_ARMS if args.quick else list(ARMS)
    seeds = [0] if args.quick else args.seeds
    rounds = 5 if args.quick else None
    jobs = [(a, s) for a in arms for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as ex:
        results = list(ex.map(run_one, [a for a, _ in jobs], [s for _, s in jobs], [rounds] * len(jobs)))
    table = []
    for a in arms:
        accs = [r["final_accuracy"] for r in results if r["arm"] == a]
        table.append({"arm": a, "aggregator": ARMS[a][0], "pre_aggregators": ARMS[a][1], "momentum": ARMS[a][2],
                      "attack": "alie" if ARMS[a][3] else None, "final_accuracy": accs,
                      "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "min": min(accs), "max": max(accs)})
    for row in table:
        print(f"{row['arm']:<45} {row['mean']:.3f} +- {row['std']:.3f}  (min {row['min']:.3f}, max {row['max']:.3f})")
    out = {
        "headline": {"alie_final_accuracy_mean": {r["arm"]: round(r["mean"], 4) for r in table}},
        "config": str(BASE.relative_to(ROOT)), "seeds": seeds, "f": F, "tau": TAU, "quick": args.quick,
        "majority_baseline": results[0]["majority_baseline"], "table": table, "runs": results,
        "wall_seconds": time.perf_counter() - t0, "workers": args.workers,
        "command": "python benchmarks/poisoning_digits.py" + (" --quick" if args.quick else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} in {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
