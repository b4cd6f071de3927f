"""Attacks on federated LLM fine-tuning (issue 19): exposure, membership, extraction, backdoor.

    python benchmarks/attacks_llm.py                 # SmolLM2 on the construction FAQ (hours on 2 CPU cores)
    python benchmarks/attacks_llm.py --tiny          # smoke: tiny-llama on generated records (minutes)
    python benchmarks/attacks_llm.py --only exposure,backdoor

Each part is a federated run (``secfed.engine.Engine``) of ``experiments/instruct_faq.toml``
with overrides, audited by ``secfed.compare.audit.audit_run``:

* ``exposure`` -- secret-sharer canaries (x1, x4, x16) + 20 PII records in client 0's data, no DP
  and DP-SGD at epsilon 8: canary exposure (bits), extraction fraction, LLM membership inference.
* ``backdoor`` -- instruct-backdoor on 2 of 6 clients under the mean and robust aggregators.

Writes benchmarks/results/attacks_llm.json (``--tiny``: /tmp/attacks_llm_tiny.json, kept out of
results/ because headlines.py quotes every file there) with a ``headline``:
canary_exposure_bits_no_dp, canary_exposure_bits_dp_eps8 (16 insertions), llm_mia_auc_ref_calibrated,
llm_mia_tpr_at_1pct_fpr, extraction_fraction_no_dp, backdoor_asr_mean, backdoor_asr_best_robust.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from secfed.compare.audit import audit_run  # noqa: E402
from secfed.config import parse_config, read_toml  # noqa: E402
from secfed.engine import Engine  # noqa: E402

ROBUST = ("median", "trimmed-mean")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_config(tiny: bool, workdir: Path) -> dict:
    raw = read_toml(ROOT / "experiments" / "instruct_faq.toml", "instruct_faq.toml")
    raw["run"]["name"] = "attacks_llm"
    if tiny:  # generated free-text records and the tiny random Llama
        import numpy as np

        rng = np.random.default_rng(0)
        words = "river stone cloud amber maple violet copper harbor meadow falcon lantern cedar".split()
        rows = [{"instruction": f"Describe item {i}.", "output": " ".join(rng.choice(words, 5)),
                 "category": f"c{i % 4}"} for i in range(160)]
        path = workdir / "records.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        raw["data"] = {"source": "jsonl", "path": str(path), "task": "instruct", "category_column": "category",
                       "num_clients": 6, "test_size": 40, "max_length": 48, "generate_examples": 4,
                       "max_new_tokens": 8, "partition": "iid"}
        raw["model"] = {"name": "tiny-llama", "lora_r": 4}
        raw["run"].update({"rounds": 2, "eval_every": 2})
        raw["client"].update({"local_steps": 2, "batch_size": 8, "lr": 1e-2})
    return raw


def model_name(raw: dict) -> str:
    return raw["model"]["name"]


def run_and_audit(raw: dict, attacks: list[str], workdir: Path, label: str) -> dict:
    t0 = time.perf_counter()
    out = workdir / label
    summary = Engine(parse_config(raw, label), out / "run", progress=False).run()
    report = audit_run(out / "run", attacks, out / "audit", progress=False)
    res = {"final_accuracy": summary.get("final_accuracy"), "epsilon": summary.get("epsilon"),
           "seconds": time.perf_counter() - t0}
    for name, r in report["results"].items():
        res.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
    log(f"{label}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()})}")
    return res


def part_exposure(base: dict, workdir: Path, tiny: bool) -> dict:
    sharer = {"name": "secret-sharer", "ids": [0], "model": model_name(base), "insertions": [1, 4, 16],
              "pii": 20, "system_prompt": base["data"].get("system_prompt")}
    if tiny:
        sharer.update({"format": "my PIN is # # #", "pii": 4, "samples": 200})
    out = {}
    for label, overrides in (("no_dp", {}),
                             ("dp_eps8", {"client": {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                                          "server": {"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}}})):
        raw = copy.deepcopy(base)
        raw.setdefault("attack", {})["adversary"] = sharer
        for sec, vals in overrides.items():
            raw.setdefault(sec, {}).update(vals)
        out[label] = run_and_audit(raw, ["llm-membership", "exposure", "extraction"], workdir, f"exposure_{label}")
    return out


def part_backdoor(base: dict, workdir: Path, tiny: bool) -> dict:
    out = {}
    for agg in ("mean",) + ROBUST:
        raw = copy.deepcopy(base)
        raw.setdefault("attack", {})["adversary"] = {"name": "instruct-backdoor", "ids": [1, 2],
                                                     "model": model_name(base), "poison_fraction": 0.5}
        raw["server"]["aggregator"] = agg
        out[agg] = run_and_audit(raw, ["backdoor"], workdir, f"backdoor_{agg}")
    return out


def headline(res: dict) -> dict:
    h: dict = {}
    ex = res.get("exposure", {})
    if ex:
        h["canary_exposure_bits_no_dp"] = ex["no_dp"].get("canary_exposure_bits_x16")
        h["canary_exposure_bits_dp_eps8"] = ex["dp_eps8"].get("canary_exposure_bits_x16")
        h["llm_mia_auc_ref_calibrated"] = ex["no_dp"].get("llm_mia_auc_ref_calibrated")
        h["llm_mia_tpr_at_1pct_fpr"] = ex["no_dp"].get("llm_mia_tpr_at_1pct_fpr")
        h["extraction_fraction_no_dp"] = ex["no_dp"].get("extraction_fraction")
    bd = res.get("backdoor", {})
    if bd:
        h["backdoor_asr_mean"] = bd["mean"].get("backdoor_asr")
        robust = {a: bd[a].get("backdoor_asr") for a in ROBUST if bd.get(a, {}).get("backdoor_asr") is not None}
        if robust:
            best = min(robust, key=robust.get)
            h["backdoor_asr_best_robust"] = robust[best]
            h["backdoor_best_robust_aggregator"] = best
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run on tiny-llama")
    ap.add_argument("--only", default="exposure,backdoor", help="comma list of parts: exposure,backdoor")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    out = Path(args.out) if args.out else (Path("/tmp/attacks_llm_tiny.json") if args.tiny
                                           else ROOT / "benchmarks" / "results" / "attacks_llm.json")
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="secfed-attacks-llm-") as td:
        work = Path(td)
        base = base_config(args.tiny, work)
        if "exposure" in parts:
            res["exposure"] = part_exposure(base, work, args.tiny)
        if "backdoor" in parts:
            res["backdoor"] = part_backdoor(base, work, args.tiny)
    res["headline"] = headline(res)
    res["meta"] = {"model": model_name(base), "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps(res, indent=2, default=float))
    log(f"headline: {res['headline']}\nwrote {out}")


if __name__ == "__main__":
    main()
