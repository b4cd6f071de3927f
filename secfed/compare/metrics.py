"""Metrics of one grid cell, read from its run directory, and their aggregation over seeds.

Utility: final ``accuracy`` and ``loss`` (``summary.json``). Privacy: claimed
``epsilon``/``delta`` (the ledger, via the summary); empirical leakage from the
attack observers' round records and the post-run audit (``audit/audit.json``):
reconstruction ``psnr``/``ssim`` (the curious server's best round), ``malicious_psnr`` (a malicious
server's reconstructions through the secure sum, e.g. ``imprint``), ``token_recovery``,
``membership_auc`` (natural training vs test examples), ``canary_auc`` (planted
mislabelled canaries, in vs out: worst-case memorisation), ``eps_lower_bound``.
Causal-LM audits (issue 19): ``canary_exposure`` (secret-sharer bits, the most exposed insertion
count), ``canary_gain`` (what training added over the base model), ``control_exposure`` (never-inserted
canaries), ``extraction`` (PII recovered verbatim). An adversary plug-in that declares ``honest``
(a secret holder) is recorded as ``planted``, not as an attack: its run is the setup's honest run.
Robustness: ``accuracy`` of cells with an adversary is the accuracy under attack;
``backdoor_success``. Cost:
``seconds_per_round``, ``bytes_up_per_client``/``bytes_down_per_client`` (per
round, per participating client), ``peak_rss_mb`` of the cell's process.

Plug-ins name their figures freely, so leakage figures are found by name: the
round-record or audit key containing e.g. ``psnr`` gives the PSNR (the largest, where
several do). ``CANONICAL`` lists the patterns; every other numeric plug-in figure is
kept in ``extra``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from secfed.compare.post_run import ENGINE_KEYS

# canonical name -> (substrings a plug-in key must contain (any), how to reduce over rounds, higher is worse?)
CANONICAL: dict[str, tuple[tuple[str, ...], str]] = {
    "malicious_psnr": (("imprint_psnr", "server_attack_psnr"), "max"),  # before "psnr": a malicious server's figure
    "malicious_token_recovery": (("lora_trap_token_recall",), "max"),  # before "token_recovery", likewise
    "psnr": (("psnr",), "max"),
    "ssim": (("ssim",), "max"),
    "token_recovery": (("token_recovery", "token_recall", "tokens_recovered", "token_f1", "token_rate"), "max"),
    "membership_auc": (("membership_auc", "mia_auc", "member_auc"), "max"),
    "canary_auc": (("canary_auc",), "max"),
    "eps_lower_bound": (("eps_lower", "epsilon_lower", "eps_lb"), "max"),
    "backdoor_success": (("backdoor_asr", "backdoor_success", "attack_success", "backdoor"), "last"),
    # causal-LM audits (issue 19): secret-sharer exposure in bits (the largest over insertion counts), what
    # training added to it over the base model (the largest), the never-inserted controls' mean, PII extracted
    "canary_exposure": (("canary_exposure_bits_x",), "max"),
    "canary_gain": (("canary_gain_bits_x",), "max"),
    "control_exposure": (("control_exposure_bits_mean",), "max"),
    "extraction": (("extraction_fraction",), "max"),
}
INVERSION_OBSERVERS = ("dlg", "idlg", "inverting", "inversion", "text-inversion", "geiping", "dager")
TEXT_INVERSION_OBSERVERS = ("text-inversion", "dager")
METRICS = ("accuracy", "loss", "epsilon", "delta", "psnr", "malicious_psnr", "ssim", "token_recovery",
           "malicious_token_recovery", "membership_auc",
           "canary_auc", "eps_lower_bound", "backdoor_success", "canary_exposure", "canary_gain", "control_exposure",
           "extraction", "seconds_per_round",
           "bytes_up_per_client", "bytes_down_per_client", "peak_rss_mb")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _canonical(key: str) -> str | None:
    k = key.lower()
    for name, (pats, _) in CANONICAL.items():
        if any(p in k for p in pats):
            return name
    return None


def _offer(row: dict[str, Any], name: str, value: float, key: str) -> None:
    """Record one source's figure for a canonical metric. Where several sources give one (a round
    record and the audit, or two audit attacks), a ``max`` metric keeps the largest: the strongest
    attack's leakage, the largest valid epsilon lower bound. A ``last`` metric keeps the first."""
    if row.get(name) is None or (CANONICAL[name][1] == "max" and value > row[name]):
        row[name] = value
        row[f"{name}_key"] = key


def cell_metrics(cell_dir: Path) -> dict[str, Any]:
    """One row of ``results.jsonl``: axes, seed, status, canonical metrics and extras."""
    spec = json.loads((cell_dir / "cell.json").read_text())
    row: dict[str, Any] = {"cell": spec["id"], "setup": spec["setup"], **{f"axis.{k}": v for k, v in spec["axes"].items()},
                           "seed": spec["seed"]}
    st = cell_dir / "status.json"
    status = json.loads(st.read_text()) if st.exists() else {"status": "not run"}
    run = cell_dir / "run"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    row["status"] = "done" if summary is not None and status.get("status") != "failed" else status.get("status", "not run")
    if status.get("status") == "failed":
        row["error"] = status.get("error")
    elif summary is not None and summary.get("failed"):  # it ran, but trained nothing or ended non-finite (issue 22)
        row["status"], row["error"] = "failed", f"run failed: {summary['failed']}"
    cfg = spec["config"]
    server = cfg.get("server", {})
    row["adversary"] = _plugin_name(cfg.get("attack", {}).get("adversary"))
    row["planted"] = None  # an honest adversary (secret holder): its run is the setup's honest run
    if row["adversary"] and _honest_adversary(row["adversary"]):
        row["planted"], row["adversary"] = row["adversary"], None
    row["server_attack"] = _plugin_name(cfg.get("attack", {}).get("server"))  # a malicious server (issue 17)
    row["secure_sum"] = _plugin_name(server.get("secure_sum")) or "plain"
    observers = [_plugin_name(o) or "" for o in server.get("observers", [])]
    inv = [o.lower() for o in observers if any(p in o.lower() for p in INVERSION_OBSERVERS)]
    # truthy when an inversion observer ran; "text" when it recovers tokens (its column is token recovery)
    row["inversion_attack"] = ("text" if any(p in o for o in inv for p in TEXT_INVERSION_OBSERVERS) else "image") \
        if inv else False
    if summary is None:
        return row
    row.update({"accuracy": _num(summary.get("final_accuracy")), "loss": _num(summary.get("final_loss")),
                "epsilon": _num(summary.get("epsilon")), "delta": _num(summary.get("delta")),
                "seconds_per_round": _num(summary.get("seconds_per_round")), "peak_rss_mb": _num(summary.get("peak_rss_mb")),
                "rounds_completed": summary.get("rounds_completed"), "stopped": summary.get("stopped"),
                "majority_baseline": _num(summary.get("majority_baseline")),
                "zero_shot_accuracy": _num(summary.get("zero_shot_accuracy"))})
    recs = [json.loads(l) for l in (run / "rounds.jsonl").read_text().splitlines() if l.strip()] \
        if (run / "rounds.jsonl").exists() else []
    up = [r["bytes_up"] / r["completed"] for r in recs if r.get("completed")]
    down = [r["bytes_down"] / r["sampled"] for r in recs if r.get("sampled")]
    row["bytes_up_per_client"] = float(np.mean(up)) if up else None
    row["bytes_down_per_client"] = float(np.mean(down)) if down else None
    row["aborted_rounds"] = sum(1 for r in recs if str(r.get("status", "ok")) != "ok")
    extra: dict[str, list[float]] = {}
    for r in recs:
        for k, v in r.items():
            if k not in ENGINE_KEYS and _num(v) is not None:
                extra.setdefault(k, []).append(float(v))
    row["extra"] = {k: {"last": v[-1], "max": max(v)} for k, v in extra.items()}
    notes = [str(r[k]) for r in recs for k in r if k.endswith("_status") and str(r[k]) != "ok"]
    if notes:
        row["attack_status"] = notes[-1]
    for k, v in extra.items():
        name = _canonical(k)
        if name:
            _offer(row, name, v[-1] if CANONICAL[name][1] == "last" else max(v), k)
    audit = run / "audit" / "audit.json"
    if audit.exists():
        a = json.loads(audit.read_text())
        for res in a.get("results", {}).values():
            for k, v in res.items():
                name = _canonical(k)
                if name and _num(v) is not None:
                    _offer(row, name, float(v), f"audit:{k}")
        row["audit_verdicts"] = [v["verdict"] for v in a.get("verdicts", [])]
    # blocked = the observer ran and had no per-client update to attack (SecAgg+, CKKS)
    row["inversion_blocked"] = bool(row["inversion_attack"] and row.get("psnr") is None
                                    and row.get("token_recovery") is None
                                    and ("per-client" in row.get("attack_status", "") or _hides_rows(row["secure_sum"])))
    return row


def _hides_rows(name: str) -> bool:
    """The named secure sum declares that the server learns the sum only (secfed.needs); one this install
    cannot resolve (a run of another install's plug-in) is judged by its name."""
    from secfed import registry
    from secfed.needs import Need

    reveals = getattr(registry.find("secure_sum", name), "reveals", None)
    return name != "plain" if reveals is None else Need.ROWS not in reveals


def _honest_adversary(name: str) -> bool:
    """The named adversary plug-in declares that its clients train honestly (``honest``, attacks.poisoning.base);
    one this install cannot resolve counts as an attack."""
    from secfed import registry

    return bool(getattr(registry.find("adversary", name), "honest", False))


def _plugin_name(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else v.get("name")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seeds of one setup -> mean, spread (sample std, ddof=1; 0 for one seed) and count per metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["setup"], []).append(r)
    out = []
    for setup, rs in groups.items():
        done = [r for r in rs if r["status"] == "done"]
        g: dict[str, Any] = {"setup": setup, **{k: v for k, v in rs[0].items() if k.startswith("axis.")},
                             "seeds": len(rs), "done": len(done), "failed": sum(r["status"] == "failed" for r in rs),
                             "errors": sorted({r["error"] for r in rs if r.get("error")}),
                             "adversary": rs[0]["adversary"], "planted": rs[0].get("planted"),
                             "secure_sum": rs[0]["secure_sum"],
                             "server_attack": rs[0].get("server_attack"),
                             "inversion_attack": rs[0]["inversion_attack"],
                             "attack_status": next((r["attack_status"] for r in done if r.get("attack_status")), None),
                             "inversion_blocked": bool(done) and all(r.get("inversion_blocked") for r in done),
                             "majority_baseline": next((r["majority_baseline"] for r in done
                                                        if r.get("majority_baseline") is not None), None),
                             "zero_shot_accuracy": next((r["zero_shot_accuracy"] for r in done
                                                         if r.get("zero_shot_accuracy") is not None), None)}
        for m in METRICS:
            vals = [r[m] for r in done if r.get(m) is not None]
            if vals:
                g[m] = float(np.mean(vals))
                g[f"{m}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                g[f"{m}_n"] = len(vals)
        out.append(g)
    return out
