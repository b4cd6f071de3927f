"""LoRA-aware aggregation side by side (issue 18): aggregation error and accuracy per method.

    python benchmarks/lora.py             # MiniLM on the tweets, 9 runs (about 40 min on an idle 2-core machine)
    python benchmarks/lora.py --quick     # tiny-bert on generated text, 2 rounds (smoke test, about a minute)
    python benchmarks/lora.py --cases fedit-dir,ffa-dir   # a subset

Cases (all from experiments/quickstart.toml: MiniLM-L6, LoRA on query/value + a linear head, 10
organisations, all 10 in every round (the cross-silo setting), Adam; one seed, the same settings for every
method; nothing is tuned on the test split):

- ``fedit`` / ``ffa`` / ``stack`` (secfed.lora) x partition IID and Dirichlet(alpha = 0.1) label skew,
  model.lora_r = 8;
- heterogeneous ranks {4, 8, 16} (``lora.client_ranks``, cycled over the 10 clients; model.lora_r = 16),
  Dirichlet(0.1): ``stack`` (FLoRA, exact), ``fedit`` + ``hetero = "pad"`` (HetLoRA zero-padding) and
  ``fedit`` + ``hetero = "svd"`` (FlexLoRA).

Per case: final test accuracy, the aggregation error ``lora_agg_rel_error`` of every round
(||U_agg - mean_i B_i A_i||_F / ||mean_i B_i A_i||_F over all LoRA modules, docs/lora.md) and its mean,
the update size, seconds. Writes benchmarks/results/lora.json; headline (Dirichlet 0.1):
``fedit_aggregation_rel_error``, ``ffa_aggregation_rel_error`` (means over rounds), ``accuracy_fedit``,
``accuracy_ffa``, ``accuracy_hetero_ranks`` (stack with ranks {4, 8, 16}, chosen before the run as the method
that supports different ranks exactly), plus ``stack_aggregation_rel_error`` and ``accuracy_stack``.
One seed per cell: differences of a point or two in accuracy are within run-to-run noise. A rerun case's
stored row moves to ``earlier[case]`` (``_results.keep_row``, as in benchmarks/dp.py): the cohort-of-5 rows
of 2026-12-01 are kept there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine  # noqa: E402
from _results import keep_row  # noqa: E402

from secfed.config import load_config  # noqa: E402
from secfed.engine import Engine, read_rounds  # noqa: E402

BASE = ["run.rounds=5", "run.eval_every=5", "data.max_examples=4000", "data.test_size=600", "client.local_steps=6",
        "client.local_epochs=1", "server.cohort_size=10"]
QUICK = ["data.source='synthetic-text'", "model.name='tiny-bert'", "model.lora_r=4", "data.max_length=16",
         "data.max_examples=0", "data.test_size=100", "data.num_clients=6", "server.cohort_size=3",
         "client.local_steps=2", "client.batch_size=8", "run.rounds=2", "run.eval_every=1"]
IID = ["data.partition='iid'"]
DIR = ["data.partition='dirichlet'", "data.alpha=0.1"]
HETERO = ["model.lora_r=16", "lora.client_ranks=[4, 8, 16]"]
QUICK_HETERO = ["model.lora_r=4", "lora.client_ranks=[1, 2, 4]"]

CASES: dict[str, list[str]] = {
    "fedit-iid": IID + ["lora.aggregation='fedit'"],
    "ffa-iid": IID + ["lora.aggregation='ffa'"],
    "stack-iid": IID + ["lora.aggregation='stack'"],
    "fedit-dir": DIR + ["lora.aggregation='fedit'"],
    "ffa-dir": DIR + ["lora.aggregation='ffa'"],
    "stack-dir": DIR + ["lora.aggregation='stack'"],
    "hetero-stack-dir": DIR + ["lora.aggregation='stack'", "HETERO"],
    "hetero-hetlora-dir": DIR + ["lora.aggregation='fedit'", "lora.hetero='pad'", "HETERO"],
    "hetero-flexlora-dir": DIR + ["lora.aggregation='fedit'", "lora.hetero='svd'", "HETERO"],
}


def parse_override(s: str) -> tuple[str, object]:
    key, _, raw = s.partition("=")
    return key, json.loads(raw.replace("'", '"'))


def run_case(name: str, quick: bool, out: Path) -> dict:
    overrides = list(QUICK if quick else BASE)
    for o in CASES[name]:
        overrides += (QUICK_HETERO if quick else HETERO) if o == "HETERO" else [o]
    cfg = load_config(ROOT / "experiments/quickstart.toml", dict(parse_override(o) for o in overrides))
    cfg.run.name = f"lora-{name}"
    t0 = time.perf_counter()
    summary = Engine(cfg, out / name, progress=False).run()
    recs = read_rounds(out / name)
    errs = [r.get("lora_agg_rel_error") for r in recs]
    errs_known = [e for e in errs if e is not None]
    row = {
        "case": name, "overrides": overrides,
        "aggregation": cfg.lora.aggregation, "hetero": cfg.lora.hetero, "client_ranks": cfg.lora.client_ranks,
        "lora_r": cfg.model.lora_r, "partition": cfg.data.partition,
        "alpha": cfg.data.alpha if cfg.data.partition == "dirichlet" else None,
        "accuracy": summary["final_accuracy"], "loss": summary["final_loss"],
        "majority_baseline": summary["majority_baseline"],
        "agg_rel_error_per_round": errs, "agg_rel_error_mean": statistics.fmean(errs_known) if errs_known else None,
        "trainable_params": summary["trainable_params"], "bytes_up_per_round": summary["bytes_up_per_round"],
        "rounds": summary["rounds_aggregated"], "wall_seconds": time.perf_counter() - t0,
    }
    print(f"{name:22s} acc {row['accuracy']:.3f}  err {row['agg_rel_error_mean']:.3g}  "
          f"params {row['trainable_params']}  {row['wall_seconds']:.0f} s", flush=True)
    return row


def _result(by: dict[str, dict], quick: bool, wall: float, earlier: dict[str, list[dict]]) -> dict:
    get = lambda case, key: by[case][key] if case in by else None  # noqa: E731
    return {
        "quick": quick,
        "definition": "lora_agg_rel_error = sqrt(sum_m ||U_m - U*_m||_F^2) / sqrt(sum_m ||U*_m||_F^2), U*_m = "
                      "mean_i B_i A_i - B_t A_t (weights = examples), U_m = the aggregate's product update; docs/lora.md",
        "machine_note": "each case records the machine it ran on (CPU model, cores, load, whether shared)",
        "cases": [by[c] for c in CASES if c in by],
        "headline": {
            "fedit_aggregation_rel_error": get("fedit-dir", "agg_rel_error_mean"),
            "ffa_aggregation_rel_error": get("ffa-dir", "agg_rel_error_mean"),
            "stack_aggregation_rel_error": get("stack-dir", "agg_rel_error_mean"),
            "accuracy_fedit": get("fedit-dir", "accuracy"),
            "accuracy_ffa": get("ffa-dir", "accuracy"),
            "accuracy_stack": get("stack-dir", "accuracy"),
            "accuracy_hetero_ranks": get("hetero-stack-dir", "accuracy"),
            "partition": "dirichlet alpha=0.1",
        },
        "wall_seconds_last_invocation": wall,
        "earlier": earlier,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-bert on generated text (smoke test)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/lora.json; "
                    "--quick: /tmp/lora_quick.json, kept out of results/)")
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine")
    args = ap.parse_args()
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    out_json = Path(args.out) if args.out else (Path("/tmp/lora_quick.json") if args.quick else ROOT / "benchmarks/results/lora.json")
    t0 = time.perf_counter()
    note = "other work shared the machine: accuracy and errors hold, seconds do not" if args.loaded else ""
    old = json.loads(out_json.read_text()) if out_json.exists() else {}
    by = {r["case"]: r for r in old.get("cases", [])}  # earlier runs' cases are kept; a rerun case replaces its row
    earlier = old.get("earlier", {})  # ... and the row a rerun replaces moves here (keep_row), never lost
    with tempfile.TemporaryDirectory(prefix="secfed-lora-") as tmp:
        for n in names:
            row = run_case(n, args.quick, Path(tmp))
            row["machine"] = machine(args.loaded, note)
            keep_row(by, earlier, n, row)
            result = _result(by, args.quick, time.perf_counter() - t0, earlier)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(result, indent=2))  # after every case: a long run loses nothing
    print(json.dumps(result["headline"], indent=2))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
