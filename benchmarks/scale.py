"""Seconds per round for 10, 100 and 1000 clients: in-process engine vs Flower's simulation runtime on Ray.

Same config and seed on both sides (tiny-bert + LoRA on synthetic text, every
client in every round, one local step each), so the two runs also produce the
same model (checked and reported as ``same_weights``). A round's time is the
engine's own ``seconds`` field (sampling -> evaluation, checkpoint excluded).
"Seconds per round" is the steady state: the mean over rounds 2.., because in
round 1 every Ray actor first builds its task and model (reported as
``first_round_*``); Ray's start-up and shut-down are reported separately
(``startup_seconds_flower_ray``).

    python benchmarks/scale.py            # 10, 100, 1000 clients -> benchmarks/results/scale.json
    python benchmarks/scale.py --quick    # 10 and 30 clients, 2 rounds (smoke)

Ray is limited to ``--ray-cpus`` CPUs (default: all cores of this machine) with one
CPU per simulated client; it is shut down after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def config(n: int, rounds: int, ray_cpus: int):
    from secfed.config import parse_config

    return parse_config({
        "run": {"name": f"scale-{n}", "seed": 0, "rounds": rounds, "eval_every": rounds, "threads": 1},
        "data": {"source": "synthetic-text", "num_clients": n, "test_size": 100, "max_length": 16},
        "model": {"name": "tiny-bert", "lora_r": 4},
        "client": {"batch_size": 8, "lr": 1e-2, "local_steps": 1},
        "server": {"cohort_size": n},
        "deploy": {"ray_num_cpus": ray_cpus, "ray_client_cpus": 1.0, "round_timeout": 3600, "connect_timeout": 600},
    })


def per_round(run_dir: Path) -> list[float]:
    return [json.loads(l)["seconds"] for l in (run_dir / "rounds.jsonl").read_text().splitlines() if l.strip()]


def measure(n: int, rounds: int, ray_cpus: int, work: Path) -> dict:
    import torch

    from secfed.checkpoint import load_checkpoint
    from secfed.engine import Engine
    from secfed.flower.simulation import run_ray_simulation

    cfg = config(n, rounds, ray_cpus)
    a, b = work / f"inprocess-{n}", work / f"ray-{n}"
    t0 = time.perf_counter()
    Engine(cfg, a, progress=False).run()
    wall_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_ray_simulation(cfg, b)
    wall_b = time.perf_counter() - t0
    ra, rb = per_round(a), per_round(b)
    wa, wb = load_checkpoint(a)[0]["global"], load_checkpoint(b)[0]["global"]
    row = {
        "clients": n, "rounds": rounds,
        "seconds_per_round_inprocess": sum(ra[1:]) / len(ra[1:]),
        "seconds_per_round_flower_ray": sum(rb[1:]) / len(rb[1:]),
        "first_round_inprocess": ra[0], "first_round_flower_ray": rb[0],
        "rounds_inprocess": ra, "rounds_flower_ray": rb,
        "wall_seconds_inprocess": wall_a, "wall_seconds_flower_ray": wall_b,
        "startup_seconds_flower_ray": wall_b - sum(rb),
        "same_weights": bool(torch.equal(wa, wb)),
    }
    row["faster"] = "inprocess" if row["seconds_per_round_inprocess"] <= row["seconds_per_round_flower_ray"] else "flower_ray"
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("rounds_")}), flush=True)
    return row


def crossover(rows: list[dict]) -> str:
    wins = [(r["clients"], r["faster"]) for r in rows]
    ray_wins = [n for n, f in wins if f == "flower_ray"]
    if not ray_wins:
        return (f"no crossover up to {rows[-1]['clients']} clients on {os.cpu_count()} cores: the in-process loop is "
                "faster per round at every size measured")
    if len(ray_wins) == len(wins):
        return f"Flower/Ray is faster per round at every size measured ({wins[0][0]}..{wins[-1][0]} clients)"
    first = min(ray_wins)
    below = max(n for n, f in wins if f == "inprocess" and n < first) if any(
        f == "inprocess" and n < first for n, f in wins) else None
    return f"Flower/Ray becomes faster between {below} and {first} clients" if below else f"Flower/Ray faster from {first} clients"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 and 30 clients, 2 rounds")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()
    import flwr
    import ray
    import torch

    torch.set_num_threads(1)
    plan = [(10, 2), (30, 2)] if args.quick else [(10, 3), (100, 3), (1000, 3)]
    work = Path(tempfile.mkdtemp(prefix="secfed-scale-"))
    rows = []
    try:
        for n, rounds in plan:
            rows.append(measure(n, rounds, args.ray_cpus, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_n = {r["clients"]: r for r in rows}
    headline = {}
    for n in (100, 1000):
        if n in by_n:
            headline[f"seconds_per_round_inprocess_n{n}"] = round(by_n[n]["seconds_per_round_inprocess"], 3)
            headline[f"seconds_per_round_flower_ray_n{n}"] = round(by_n[n]["seconds_per_round_flower_ray"], 3)
    result = {
        "headline": headline,
        "crossover": crossover(rows),
        "rows": rows,
        "setup": {"model": "tiny-bert, LoRA r=4 (1123 trainable)", "data": "synthetic-text, 1900 train examples, iid",
                  "client": "1 local step, batch 8, every client every round", "torch_threads": 1,
                  "ray_cpus": args.ray_cpus, "ray_cpus_per_client": 1.0, "cpu_count": os.cpu_count(),
                  "machine": platform.platform(), "python": platform.python_version(), "flwr": flwr.__version__,
                  "ray": ray.__version__, "torch": torch.__version__, "quick": args.quick,
                  "note": "timings on a shared machine are noisy; the in-process loop runs clients one after another "
                          "in one process, Flower/Ray runs them in ray_cpus actors and moves every message through "
                          "Flower's simulation runtime"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"headline": headline, "crossover": result["crossover"]}, indent=2))


if __name__ == "__main__":
    main()
