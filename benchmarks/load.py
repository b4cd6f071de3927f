"""Load: 1000 simulated clients, 20 rounds, tiny model, SecAgg+, one process.

Population 1,000 clients; each round samples a Poisson cohort at q = 0.1 (about
100 clients run local training and the full SecAgg+ protocol). Records the
process RSS after every round and fits a line through rounds 6..20: the slope is
the memory growth per round (flat = no leak).

    python benchmarks/load.py [--rounds 20] [--clients 1000] [--rate 0.1]

Writes benchmarks/results/load.json (read by benchmarks/hardening.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--secure-sum", default="secagg+")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from secfed.config import parse_config
    from secfed.engine import Engine, read_rounds

    cfg = parse_config({
        "run": {"name": "load", "seed": 0, "rounds": args.rounds, "eval_every": args.rounds},
        "data": {"source": "synthetic-text", "num_clients": args.clients, "test_size": 100, "max_length": 16},
        "model": {"name": "tiny-bert", "lora_r": 4},
        "client": {"batch_size": 4, "lr": 1e-2, "local_steps": 1, "weighting": "uniform"},
        "server": {"sampling": "poisson", "sample_rate": args.rate, "secure_sum": args.secure_sum},
    })
    proc = psutil.Process()
    rss: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(cfg, Path(tmp) / "run", progress=True,
                        on_round_end=lambda t: rss.append(proc.memory_info().rss / 2**20))
        t0 = time.perf_counter()
        summary = engine.run()
        wall = time.perf_counter() - t0
        recs = read_rounds(Path(tmp) / "run")
    xs = np.arange(len(rss))
    tail = slice(min(5, len(rss) - 2), len(rss))
    slope = float(np.polyfit(xs[tail], np.array(rss)[tail], 1)[0]) if len(rss) >= 3 else None
    out = {
        "population": args.clients, "rounds": args.rounds, "sample_rate": args.rate, "secure_sum": args.secure_sum,
        "model": "tiny-bert + LoRA r=4", "trainable_params": summary["trainable_params"],
        "mean_cohort": float(np.mean([r["sampled"] for r in recs])),
        "completed_per_round": [r["completed"] for r in recs],
        "seconds_per_round": summary["seconds_per_round"], "wall_seconds": wall,
        "rss_mb_per_round": rss, "peak_rss_gb": summary["peak_rss_mb"] / 1024,
        "rss_growth_per_round_mb": slope,
    }
    path = ROOT / "benchmarks" / "results" / "load.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rss_mb_per_round"}, indent=2))


if __name__ == "__main__":
    main()
