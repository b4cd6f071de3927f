"""Attacks on federated LLM fine-tuning (issue 19): exposure, membership, extraction, backdoor.

    python benchmarks/attacks_llm.py                 # SmolLM2 on the construction FAQ (hours on 2 CPU cores)
    python benchmarks/attacks_llm.py --tiny          # smoke: tiny-llama on generated records (minutes)
    python benchmarks/attacks_llm.py --only exposure,backdoor
    python benchmarks/attacks_llm.py --only dager    # DAGER grid only (parts accumulate in the JSON)
    python benchmarks/attacks_llm.py --only exposure,backdoor --resume   # skip the runs the JSON already holds

Each part is a federated run (``secfed.engine.Engine``) of ``experiments/instruct_faq.toml``
with overrides, audited by ``secfed.compare.post_run.audit_run``:

* ``exposure`` -- secret-sharer canaries (x1, x4, x16) + 20 PII records in client 0's data, no DP
  and DP-SGD at epsilon 8: canary exposure (bits), extraction fraction, LLM membership inference.
* ``backdoor`` -- instruct-backdoor on 2 of 6 clients under the mean, the coordinate median, the trimmed mean,
  centered clipping, and SecAgg+ with centered clipping over group sums (``ROBUST``).
* ``dager`` -- DAGER (attacks/inversion/dager_lm.py) on one client's LoRA update (one SGD step from
  an adapter with B != 0) for LoRA rank {8, 32, 64} x batch {1, 4, 16, 32}, plus a DP-SGD row
  (z = 1, C = 1, batch 1, largest rank): exact-sequence rate, ROUGE-1/2, token recall/precision and
  the rank bound per cell. SecAgg+ is blocked by construction (no per-client update; tested).

Writes benchmarks/results/attacks_llm.json (``--tiny``: /tmp/attacks_llm_tiny.json, kept out of
results/ because headlines.py quotes every file there) and merges its ``headline`` into
benchmarks/results/attacks.json's (other keys untouched): dager_lora_exact_recovery_bs4 (+ _setup),
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
sys.path.append(str(ROOT / "benchmarks"))  # after ROOT: benchmarks/attacks.py must not shadow the attacks package

from secfed.compare.post_run import audit_run  # noqa: E402
from secfed.config import parse_config, read_toml  # noqa: E402
from secfed.engine import Engine  # noqa: E402

from _machine import machine  # noqa: E402

# Each malicious client poisons this share of its records (0.5 gave ASR 0.05 against the mean on 2026-12-02: 4 rounds
# of 5 steps did not implant the trigger, so no defence could be compared).
POISON_FRACTION = 1.0
# The backdoor part's robust setups (label -> server overrides), after the mean; "secagg-groups-cc": SecAgg+ sums of
# groups of 2 (the server never sees one client's update) with centered clipping over the 3 group sums.
ROBUST = {"median": {"aggregator": "median"}, "trimmed-mean": {"aggregator": "trimmed-mean"},
          "centered-clipping": {"aggregator": {"name": "centered-clipping", "tau": 0.5, "L": 1}},
          "secagg-groups-cc": {"secure_sum": "secagg+", "group_size": 2,
                               "aggregator": {"name": "centered-clipping", "tau": 0.5, "L": 1}}}


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


def part_exposure(base: dict, workdir: Path, tiny: bool, done: dict | None = None, save=None) -> dict:
    sharer = {"name": "secret-sharer", "ids": [0], "model": model_name(base), "insertions": [1, 4, 16],
              "pii": 20, "system_prompt": base["data"].get("system_prompt")}
    if tiny:
        sharer.update({"format": "my PIN is # # #", "pii": 4, "samples": 200})
    out = dict(done or {})
    for label, overrides in (("no_dp", {}),
                             ("dp_eps8", {"client": {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                                          "server": {"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}}})):
        if label in out:
            log(f"exposure_{label}: kept from the earlier run (--resume)")
            continue
        raw = copy.deepcopy(base)
        raw.setdefault("attack", {})["adversary"] = sharer
        for sec, vals in overrides.items():
            raw.setdefault(sec, {}).update(vals)
        out[label] = run_and_audit(raw, ["llm-membership", "exposure", "extraction"], workdir, f"exposure_{label}")
        if save is not None:
            save("exposure", out)
    return out


def part_backdoor(base: dict, workdir: Path, tiny: bool, done: dict | None = None, save=None) -> dict:
    out = dict(done or {})
    for agg, server in {"mean": {"aggregator": "mean"}, **ROBUST}.items():
        if agg in out:
            log(f"backdoor_{agg}: kept from the earlier run (--resume)")
            continue
        raw = copy.deepcopy(base)
        raw.setdefault("attack", {})["adversary"] = {"name": "instruct-backdoor", "ids": [1, 2],
                                                     "model": model_name(base), "poison_fraction": POISON_FRACTION}
        raw["server"].update(server)
        out[agg] = run_and_audit(raw, ["backdoor"], workdir, f"backdoor_{agg}")
        if save is not None:
            save("backdoor", out)
    return out


DAGER_RANKS = (8, 32, 64)
DAGER_BATCHES = (1, 4, 16, 32)


def dager_cell(raw: dict, rank: int, batch: int, lr: float, warm_b: float, dp_z: float | None = None,
               max_beam: int = 64) -> dict:
    """One client update (one local SGD step on ``batch`` records from a global adapter with B != 0) and DAGER on it.

    B ~ N(0, warm_b^2) stands for an adapter after some rounds (PEFT's B = 0 at initialisation makes
    the first step's dA zero); ``dp_z``: the step is DP-SGD (per-example clip 1.0, noise z)."""
    import numpy as np
    import torch

    from attacks.inversion.dager_lm import dager_lm, describe_bound, summarise
    from secfed.spec import ParamSpec
    from secfed.task import Task
    from secfed.training import SGDTrainer

    cfg_raw = copy.deepcopy(raw)
    cfg_raw["model"]["lora_r"] = rank
    task = Task(parse_config(cfg_raw, f"dager_r{rank}"))
    model = task.build_model()
    spec = ParamSpec.from_module(model)
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(warm_b * torch.randn(p.shape, generator=g))
    w0 = spec.flatten(model)
    data = task.train.subset(np.arange(min(batch, len(task.train))))
    t0 = time.perf_counter()
    if dp_z is None:
        SGDTrainer(local_steps=1, batch_size=len(data), lr=lr, optimizer="sgd").train(
            model, task, data, torch.Generator().manual_seed(0))
    else:
        from defenses.privacy.dpsgd import DPSGDTrainer

        DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=dp_z, local_steps=1, batch_size=len(data), lr=lr,
                     optimizer="sgd").train(model, task, data, torch.Generator().manual_seed(0))
    delta = spec.flatten(model) - w0
    spec.assign(model, w0)
    model.eval()
    t1 = time.perf_counter()
    truth = [row[m.bool()].tolist() for row, m in zip(data.tensors["input_ids"], data.tensors["attention_mask"])]
    res = dager_lm(model, spec.names, spec.shapes, delta, task.cfg.data.max_length, max_beam=max_beam, keep=len(truth))
    m = summarise(res, truth, set(task.tokenizer.all_special_ids))
    m.update(rank=rank, batch=len(truth), dp_noise_multiplier=dp_z, step_seconds=t1 - t0,
             attack_seconds=time.perf_counter() - t1,
             bound=describe_bound(len([x for x in spec.names if ".layers.0." in x and "lora_A" in x]) * rank,
                                  m["distinct_tokens"], m["distinct_prefixes"]))
    log(f"dager r={rank} bs={len(truth)} z={dp_z}: exact {m['exact']:.2f} rouge1 {m['rouge1']:.2f} "
        f"rouge2 {m['rouge2']:.2f} tokens R/P {m['token_recall']:.2f}/{m['token_precision']:.2f} "
        f"({m['bound']}; {m['attack_seconds']:.0f} s)")
    return m


def part_dager(base: dict, tiny: bool) -> dict:
    """Exact-sequence recovery and ROUGE-1/2 vs batch size and LoRA rank; DP-SGD and SecAgg+ rows."""
    ranks, batches = ((8, 16), (1, 4)) if tiny else (DAGER_RANKS, DAGER_BATCHES)
    raw = copy.deepcopy(base)
    lr, warm_b = (0.05, 0.05) if tiny else (0.05, 0.02)
    rows = [dager_cell(raw, r, b, lr, warm_b) for r in ranks for b in batches]
    if not tiny:  # the other side of the rank bound: 2r = 256 > one record's ~150 prefixes
        rows += [dager_cell(raw, 128, b, lr, warm_b) for b in (1, 4)]
    rows.append(dager_cell(raw, ranks[-1], 1, lr, warm_b, dp_z=1.0))
    return {"rows": rows, "lr": lr, "warm_b_std": warm_b, "optimizer": "sgd", "local_steps": 1,
            "targets": base["model"].get("target_modules", ["q_proj", "v_proj"]),
            "secagg_plus": "blocked: the server sees no per-client update (tests/test_attacks_dager.py::"
                           "test_dager_observer_is_blocked_by_secagg_plus)"}


def headline(res: dict) -> dict:
    h: dict = {}
    dg = res.get("dager", {})
    if dg:
        bs4 = [r for r in dg["rows"] if r["batch"] == 4 and r["dp_noise_multiplier"] is None]
        if bs4:
            best = max(bs4, key=lambda r: (r["exact"], r["rank"]))
            h["dager_lora_exact_recovery_bs4"] = best["exact"]
            h["dager_lora_exact_recovery_bs4_setup"] = (f"{res.get('meta_model', '')} LoRA rank {best['rank']} "
                                                        f"(q,v), one SGD step, batch 4")
    ex = res.get("exposure", {})
    if ex:  # a part stopped half-way (see --resume) gives the keys of the labels it finished
        no_dp, dp8 = ex.get("no_dp", {}), ex.get("dp_eps8", {})
        h["canary_exposure_bits_no_dp"] = no_dp.get("canary_exposure_bits_x16")
        h["canary_exposure_bits_dp_eps8"] = dp8.get("canary_exposure_bits_x16")
        h["llm_mia_auc_ref_calibrated"] = no_dp.get("llm_mia_auc_ref_calibrated")
        h["llm_mia_tpr_at_1pct_fpr"] = no_dp.get("llm_mia_tpr_at_1pct_fpr")
        h["extraction_fraction_no_dp"] = no_dp.get("extraction_fraction")
    bd = res.get("backdoor", {})
    if bd:
        h["backdoor_asr_mean"] = bd.get("mean", {}).get("backdoor_asr")
        robust = {a: bd[a].get("backdoor_asr") for a in ROBUST if bd.get(a, {}).get("backdoor_asr") is not None}
        if robust:
            best = min(robust, key=robust.get)
            h["backdoor_asr_best_robust"] = robust[best]
            h["backdoor_best_robust_aggregator"] = best
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run on tiny-llama")
    ap.add_argument("--only", default="dager,exposure,backdoor", help="comma list of parts: dager,exposure,backdoor")
    ap.add_argument("--out", default=None)
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine")
    ap.add_argument("--resume", action="store_true",
                    help="keep the exposure/backdoor runs the JSON already holds (each run is saved when it ends)")
    ap.add_argument("--merge-into", default=None,
                    help="attacks.json whose headline gains this run's keys (default: benchmarks/results/attacks.json; "
                         "--tiny: none)")
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    out = Path(args.out) if args.out else (Path("/tmp/attacks_llm_tiny.json") if args.tiny
                                           else ROOT / "benchmarks" / "results" / "attacks_llm.json")
    # parts run separately accumulate in one file: a part replaces only its own entry
    res: dict = json.loads(out.read_text()) if out.exists() else {}
    if res.get("meta", {}).get("tiny", args.tiny) != args.tiny:
        res = {}
    def write() -> None:
        res["headline"] = headline(res)
        res["meta"] = {"model": res.get("meta_model"), "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "threads": torch_threads(), "machine": machine(loaded=args.loaded)}
        out.write_text(json.dumps(res, indent=2, default=float))

    def save(part: str, entry: dict) -> None:  # after every federated run: a stopped run keeps what it finished
        res[part] = entry
        res.setdefault("machine_by_part", {})[part] = machine(loaded=args.loaded)  # parts may come from other runs
        write()

    with tempfile.TemporaryDirectory(prefix="secfed-attacks-llm-") as td:
        work = Path(td)
        base = base_config(args.tiny, work)
        res["meta_model"] = model_name(base)
        if "dager" in parts:
            save("dager", part_dager(base, args.tiny))
        for part, fn in (("exposure", part_exposure), ("backdoor", part_backdoor)):
            if part in parts:
                save(part, fn(base, work, args.tiny, res.get(part) if args.resume else None, save))
    log(f"headline: {res['headline']}\nwrote {out}")
    merge = Path(args.merge_into) if args.merge_into else (None if args.tiny else ROOT / "benchmarks" / "results" / "attacks.json")
    if merge is not None:
        merge_headline(merge, res["headline"], out)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def merge_headline(path: Path, keys: dict, source: Path) -> None:
    """Add this run's headline keys to ``path``'s headline (other keys and sections untouched)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("headline", {}).update({k: v for k, v in keys.items() if v is not None})
    doc.setdefault("meta", {})["llm_attacks_source"] = str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source)
    path.write_text(json.dumps(doc, indent=2, default=float))
    log(f"merged {sorted(keys)} into {path}")


if __name__ == "__main__":
    main()
