"""Causal-LM benchmark: secfed's local LoRA step against a plain PEFT + transformers loop, the DP-SGD
step against the plain step, and the default generative experiment, side by side in one run.

    python benchmarks/causal_lm.py                # all parts (SmolLM2-135M; the experiment takes ~15 min)
    python benchmarks/causal_lm.py --skip-run     # step parts only (a few minutes); keeps the last run figures
    python benchmarks/causal_lm.py --tiny         # smoke version: tiny random Llama, a 1-round experiment

Step part (one subprocess, every variant on the same model object, the same batches and
the same torch threads; variants interleaved so that drift hits all of them alike):

- ``secfed``: a client's local step, ``SGDTrainer.train`` through the task's loss
  (``CausalLMTask.loss``: response tokens only) on one batch of client 0's shard;
- ``plain``: the loop a PEFT user writes: the same PEFT model, ``model(input_ids,
  attention_mask, labels=lm_labels).loss`` (transformers' shifted token cross-entropy),
  backward, Adam step; batches padded to their longest row as a collator would;
- ``dp``: ``DPSGDTrainer.train`` (Opacus per-sample gradients, clip 1.0, z 1.0) on the
  same batch (its Poisson rate is 1 over a shard of exactly that batch).

Tokens per second count the non-padding tokens of a batch. Headlines:
``step_tokens_per_s_over_plain`` = secfed tokens/s / plain tokens/s (goal >= 0.9),
``dp_step_over_plain`` = DP step seconds / secfed plain step seconds (goal <= 1.5).

Run part: experiments/instruct_quickstart.toml through ``secfed.engine.Engine`` in its own
process (its peak RSS is its own): ``accuracy`` (final, label likelihood on the test split),
``zero_shot_accuracy`` (the base model, adapter disabled), ``seconds_per_round``, ``peak_rss_mb``.

Writes benchmarks/results/causal_lm.json (``--tiny`` writes $TMPDIR/causal_lm_tiny.json instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "experiments/instruct_quickstart.toml"
TINY_SETS = {"model.name": "tiny-llama", "run.rounds": 1, "data.max_examples": 120, "data.test_size": 20,
             "data.num_clients": 3, "data.generate_examples": 2, "data.max_new_tokens": 3, "server.cohort_size": 2}
# The same experiment with a defence on (--defences): sample-level DP-SGD at epsilon 8 (the
# record-level preset: Opacus on every client, calibrated for the smallest shard) and SecAgg+.
DEFENCES = {
    "dp-sgd-eps8": {"privacy.preset": "record-level", "privacy.epsilon": 8.0, "privacy.delta": 1e-5},
    "secagg+": {"server.secure_sum": "secagg+"},
}
# Used when the experiment file is absent (it belongs to the instruction-tuning task).
FALLBACK = {
    "run": {"name": "instruct_quickstart", "seed": 0, "rounds": 3},
    "data": {"source": "tweets-instruct", "max_examples": 2000, "test_size": 200, "max_length": 96, "num_clients": 10},
    "model": {"name": "smollm2", "lora_r": 8, "lora_alpha": 16},
    "client": {"batch_size": 8, "lr": 1e-3, "local_steps": 10},
    "server": {"cohort_size": 5},
}


def machine() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import opacus

        opacus_v = opacus.__version__
    except ImportError:
        opacus_v = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu_model": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "opacus": opacus_v, "git_commit": commit or None}


def load_cfg(tiny: bool, extra: dict[str, Any] | None = None):
    sys.path.insert(0, str(ROOT))
    from secfed.config import load_config, parse_config, set_dotted

    sets = {**(TINY_SETS if tiny else {}), **(extra or {})}
    if (ROOT / CONFIG).is_file():
        return load_config(ROOT / CONFIG, sets), CONFIG
    data = json.loads(json.dumps(FALLBACK))
    for k, v in sets.items():
        set_dotted(data, k, v)
    return parse_config(data, "FALLBACK"), "benchmarks/causal_lm.py:FALLBACK"


# ---------------------------------------------------------------------- step part (worker process)
def step_worker(tiny: bool, batch: int, warmup: int, reps: int, threads: int) -> dict[str, Any]:
    import torch

    from defenses.privacy.dpsgd import DPSGDTrainer
    from secfed.models import torch_threads
    from secfed.task import Task
    from secfed.training import SGDTrainer

    if threads:
        torch_threads(threads)
    cfg, cfg_name = load_cfg(tiny, {"client.batch_size": batch})
    task = Task(cfg)
    model = task.build_model()
    shard = task.client_data(0)
    if len(shard) < batch:
        shard = task.train
    nb = 4
    batches = [shard.subset(list(range(i * batch, (i + 1) * batch))) for i in range(min(nb, len(shard) // batch))]
    if not batches:
        raise SystemExit(f"client 0 has fewer than {batch} examples")
    tokens = [int(b.tensors["attention_mask"].sum()) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    plain_opt = torch.optim.Adam(params, lr=cfg.client.lr)

    def plain_step(b) -> None:  # what a PEFT + transformers user writes (dynamic padding to the longest row)
        longest = int(b.tensors["attention_mask"].sum(1).max())
        x = {k: b.tensors[k][:, :longest] for k in ("input_ids", "attention_mask", "lm_labels")}
        model.train()
        plain_opt.zero_grad(set_to_none=True)
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["lm_labels"])
        out.loss.backward()
        plain_opt.step()

    def secfed_step(b, i: int) -> None:
        SGDTrainer(local_steps=1, batch_size=batch, lr=cfg.client.lr, optimizer="adam").train(
            model, task, b, torch.Generator().manual_seed(i))

    def dp_step(b, i: int) -> None:
        DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=1.0, noise="seeded", local_steps=1, batch_size=batch,
                     lr=cfg.client.lr, optimizer="adam").train(model, task, b, torch.Generator().manual_seed(i))

    variants = {"plain": lambda b, i: plain_step(b), "secfed": secfed_step, "dp": dp_step}
    times: dict[str, list[float]] = {k: [] for k in variants}
    tok_s: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(warmup + reps):
        for j, b in enumerate(batches):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(b, r * 100 + j)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
                    tok_s[name].append(tokens[j] / dt)
    rows = {k: {"seconds_per_step": statistics.median(v), "seconds_min": min(v), "tokens_per_s": statistics.median(tok_s[k]),
                "steps_timed": len(v)} for k, v in times.items()}
    return {"config": cfg_name, "model": cfg.model.name, "batch_size": batch, "max_length": cfg.data.max_length,
            "tokens_per_batch": tokens, "trainable_params": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads(), "variants": rows,
            "step_tokens_per_s_over_plain": rows["secfed"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
            "dp_step_over_plain": rows["dp"]["seconds_per_step"] / rows["secfed"]["seconds_per_step"],
            "dp_step_over_plain_hf_loop": rows["dp"]["seconds_per_step"] / rows["plain"]["seconds_per_step"]}


# ---------------------------------------------------------------------- run part (worker process)
def run_worker(tiny: bool, threads: int, out: str, defence: str = "") -> dict[str, Any]:
    from secfed.engine import Engine

    sets = {**({"run.threads": threads} if threads else {}), **DEFENCES.get(defence, {})}
    cfg, cfg_name = load_cfg(tiny, sets)
    t0 = time.perf_counter()
    s = Engine(cfg, out, progress=False).run()
    import torch

    return {"config": cfg_name, "overrides": {**(TINY_SETS if tiny else {}), **DEFENCES.get(defence, {})},
            "model": cfg.model.name, "epsilon": s.get("epsilon"), "guarantee": s.get("guarantee"),
            "rounds": s["rounds_completed"], "accuracy": s.get("final_accuracy"),
            "zero_shot_accuracy": s.get("zero_shot_accuracy"), "majority_baseline": s.get("majority_baseline"),
            "seconds_per_round": s.get("seconds_per_round"), "peak_rss_mb": s.get("peak_rss_mb"),
            "wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
            "summary": {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None}}


def _sub(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama, 1 round")
    ap.add_argument("--skip-run", action="store_true", help="step parts only; keep the last run figures")
    ap.add_argument("--skip-step", action="store_true", help="run part only; keep the last step figures")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed passes over the 4 batches")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both workers (0: torch's default)")
    ap.add_argument("--worker", choices=["step", "run"])
    ap.add_argument("--defences", nargs="*", default=None, choices=list(DEFENCES), metavar="NAME",
                    help=f"also run the experiment with these defences (none named: all of {', '.join(DEFENCES)}); "
                         "the others keep their last figures")
    ap.add_argument("--defence", default="", choices=["", *DEFENCES], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine (timings not comparable)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.worker == "step":
        print(json.dumps(step_worker(a.tiny, a.batch, a.warmup, a.reps, a.threads)))
        return
    if a.worker == "run":
        print(json.dumps(run_worker(a.tiny, a.threads, a.out, a.defence)))
        return

    import tempfile

    # the smoke run stays out of benchmarks/results (headlines.py quotes every file there)
    dest = Path(tempfile.gettempdir()) / "causal_lm_tiny.json" if a.tiny else RESULTS / "causal_lm.json"
    old = json.loads(dest.read_text()) if dest.is_file() else {}
    flags = ["--tiny"] if a.tiny else []
    common = flags + ["--threads", str(a.threads)]
    step = old.get("step")
    if not a.skip_step:
        print("step part ...", flush=True)
        step = _sub(["--worker", "step", *common, "--batch", str(a.batch), "--warmup", str(a.warmup),
                     "--reps", str(a.reps)])
        for k, v in step["variants"].items():
            print(f"  {k:7s} {v['seconds_per_step']:.3f} s/step  {v['tokens_per_s']:.0f} tokens/s", flush=True)
    run = old.get("run")
    if not a.skip_run:
        print("run part ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = _sub(["--worker", "run", *common, "--out", f"{tmp}/run"])
        print(f"  accuracy {run['accuracy']}  zero-shot {run['zero_shot_accuracy']}  "
              f"{run['seconds_per_round']:.1f} s/round  peak {run['peak_rss_mb']:.0f} MB", flush=True)
    defences = old.get("defences", {})
    if a.defences is not None:
        for name in a.defences or list(DEFENCES):
            print(f"run part with {name} ...", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                d = _sub(["--worker", "run", *common, "--out", f"{tmp}/run", "--defence", name])
            d["loaded_machine"] = bool(a.loaded)
            defences[name] = d
            print(f"  accuracy {d['accuracy']}  epsilon {d.get('epsilon')}  {d['seconds_per_round']:.1f} s/round", flush=True)
    step, run = step or {}, run or {}
    result = {
        "headline": {
            "accuracy": run.get("accuracy"),
            "zero_shot_accuracy": run.get("zero_shot_accuracy"),
            "step_tokens_per_s_over_plain": step.get("step_tokens_per_s_over_plain"),
            "dp_step_over_plain": step.get("dp_step_over_plain"),
            "seconds_per_round": run.get("seconds_per_round"),
            "peak_rss_mb": run.get("peak_rss_mb"),
        },
        "goals": {"step_tokens_per_s_over_plain": ">= 0.9", "dp_step_over_plain": "<= 1.5"},
        "machine": machine(),
        "command": "python benchmarks/causal_lm.py " + " ".join(sys.argv[1:]),
        "step": step,
        "run": run,
        "defences": defences,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["headline"], indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
