"""Seconds per round and peak memory of the in-process engine.

Cases (each in its own process so peak RSS is its own):
- ``default``: experiments/quickstart.toml as shipped (its accuracy and majority
  baseline are the headline);
- ``tiny_n10`` / ``tiny_n100``: the random tiny BERT with LoRA on generated text,
  every client in every round.

    python benchmarks/engine.py            # all cases, writes benchmarks/results/engine.json
    python benchmarks/engine.py --quick    # tiny cases only, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "engine.json"


def run_case(name: str, config: str, sets: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "secfed", "run", config, "--out", f"{tmp}/run", "--quiet"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{name} failed: {res.stderr.strip()[-500:]}")
        s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    row = {"case": name, "config": config, "overrides": sets, "rounds": s["rounds_completed"],
           "clients": s["num_clients"], "trainable_params": s["trainable_params"],
           "seconds_per_round": s["seconds_per_round"], "wall_seconds": wall, "peak_rss_mb": s["peak_rss_mb"],
           "accuracy": s["final_accuracy"], "majority_baseline": s["majority_baseline"]}
    print(f"{name:10s} {row['seconds_per_round']:7.2f} s/round  peak {row['peak_rss_mb']:7.0f} MB  "
          f"acc {row['accuracy']:.3f} (baseline {row['majority_baseline']:.3f})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 2 if args.quick else 3
    tiny = ["data.source='synthetic-text'", "model.name='tiny-bert'", "model.lora_r=4", "data.max_length=16",
            "data.test_size=200", "client.local_steps=2", "client.batch_size=8", f"run.rounds={rounds}",
            "server.cohort_size=0", "run.threads=1"]
    rows = []
    if not args.quick:
        rows.append(run_case("default", "experiments/quickstart.toml", []))
    rows.append(run_case("tiny_n10", "experiments/quickstart.toml", tiny + ["data.num_clients=10"]))
    rows.append(run_case("tiny_n100", "experiments/quickstart.toml", tiny + ["data.num_clients=100"]))
    result = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                          "platform": platform.platform()},
              "cases": rows}
    if not args.quick:
        d = rows[0]
        result["headline"] = {"accuracy": d["accuracy"], "majority_baseline": d["majority_baseline"],
                              "seconds_per_round": d["seconds_per_round"]}
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {OUT}")
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
