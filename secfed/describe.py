"""What a run protected, against whom, on what data, and whether it trained at all.

The figures ``summary.json``, ``report.md``, the progress bar and the CLI's last line
state about a run, computed from the validated config, the privacy guard and the
task's data (``train``/``test``/``root`` :class:`~secfed.data.TensorData` and the
clients' ``shards``), never from the task class itself, so any task that exposes those
attributes is described the same way.

* :func:`guarantee` -- one sentence a privacy officer can sign: mechanism, protected
  unit (one record of one organisation = record-level DP, DP-SGD (Abadi et al. 2016);
  one organisation's whole data = user-level DP, DP-FedAvg (McMahan et al. 2018)),
  epsilon and delta, accountant, noise multiplier, the adversary the guarantee holds
  against (central noise is added by the server, so it does not protect against the
  server; distributed noise under a secure sum does, up to the colluding clients the
  shares were sized for), and every active defence.
* :func:`data_summary` / :func:`check_data` -- class names and counts, split sizes,
  shard sizes; warnings for settings that were capped or clamped; a refusal for a label
  column that is (nearly) unique per row (nothing to learn).
* :func:`failure` -- why a run must not count as a success (no aggregated round,
  non-finite final figures), or None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from secfed import registry
from secfed.errors import DataError
from secfed.needs import DPRole, Need, dp_role, is_private
from secfed.rounds import group_noise_scales

ACCOUNTANT_NAMES = {"rdp": "RDP accountant (Mironov 2017)", "prv": "PRV accountant (Gopi et al. 2021)"}
SECURE_SUMS = {"secagg+": "SecAgg+ secure sum (Bell et al. 2020)", "secagg": "SecAgg+ secure sum (Bell et al. 2020)",
               "he": "homomorphic secure sum", "ckks": "homomorphic secure sum"}  # "ckks": old name of "he"


# ---------------------------------------------------------------------------- data
def _counts(labels: torch.Tensor, k: int) -> list[int]:
    if labels.dim() != 1 or labels.numel() == 0:
        return [0] * k
    return torch.bincount(labels.long(), minlength=k)[:k].tolist()


def _is_classification(train: Any) -> bool:
    return getattr(train, "labels", None) is not None and train.labels.dim() == 1 and train.num_classes > 0


def data_summary(train: Any, test: Any, root: Any = None, shards: list[Any] | None = None,
                 canaries: Any = None) -> dict[str, Any]:
    """Split sizes, class names with train/test counts, and the clients' shard sizes."""
    sizes = [int(len(s)) for s in (shards or [])]
    out: dict[str, Any] = {"train_size": len(train), "test_size": len(test), "root_size": len(root) if root is not None else 0,
                           "canaries": len(canaries) if canaries is not None else 0}
    if sizes:
        out["shard_sizes"] = sizes if len(sizes) <= 100 else None
        out["shards"] = {"clients": len(sizes), "min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes),
                         "empty": sum(1 for s in sizes if s == 0)}
    if _is_classification(train):
        k = int(train.num_classes)
        names = list(getattr(train, "label_names", ()) or [])
        names = [str(n) for n in names] if len(names) == k else [str(i) for i in range(k)]
        tr, te = _counts(train.labels, k), _counts(test.labels, k)
        out["num_classes"] = k
        out["classes"] = [{"name": n, "train": a, "test": b} for n, a, b in zip(names, tr, te)]
    return out


def check_data(cfg: Any, train: Any, test: Any, root: Any = None, shards: list[Any] | None = None) -> list[str]:
    """Warnings for settings the run capped or clamped; raises :class:`DataError` when the labels cannot mean anything."""
    d, s = cfg.data, cfg.server
    warnings: list[str] = []
    n_all = len(train) + len(test) + (len(root) if root is not None else 0)
    if _is_classification(train):
        k = int(train.num_classes)
        if k > 2 and k > n_all / 2:
            col = f"data.label_column '{d.label_column}'" if d.source in ("csv", "jsonl", "hf") else "the label"
            raise DataError(f"{col} has {k} distinct values in {n_all} rows: a label that (nearly) every row has "
                            "alone cannot be learnt or evaluated; point data.label_column at the class column")
        names = list(train.label_names) if len(getattr(train, "label_names", ()) or ()) == k else list(range(k))
        empty = [str(n) for n, c in zip(names, _counts(train.labels, k)) if c == 0]
        if empty:
            warnings.append(f"{len(empty)} class(es) have no training example: {', '.join(empty[:5])}")
    if d.test_size != len(test):
        warnings.append(f"data.test_size = {d.test_size} but only {len(test)} of {n_all} examples were held out "
                        "for testing (at most a third of the data)")
    n = d.num_clients
    if s.sampling == "cohort" and s.cohort_size > n:
        warnings.append(f"server.cohort_size = {s.cohort_size} > data.num_clients = {n}: every round uses all {n} clients")
    if s.sampling == "poisson":
        p_none = (1.0 - s.sample_rate) ** n
        if p_none > 0.01:
            warnings.append(f"Poisson sampling (server.sample_rate = {s.sample_rate:g}, {n} clients) draws no client "
                            f"in {100 * p_none:.0f}% of rounds; such rounds are aborted")
    expected = s.sample_rate * n if s.sampling == "poisson" else min(s.cohort_size or n, n)
    if s.min_clients > expected:
        warnings.append(f"server.min_clients = {s.min_clients} exceeds the expected cohort ({expected:g}): "
                        "most rounds will abort")
    if s.group_size and s.group_size > expected:
        warnings.append(f"server.group_size = {s.group_size} exceeds the expected cohort ({expected:g}): "
                        "no group completes and rounds abort")
    sizes = [len(x) for x in (shards or [])]
    if sizes and min(sizes) == 0:
        warnings.append(f"{sum(1 for x in sizes if x == 0)} of {len(sizes)} clients have no training example")
    return warnings


# ---------------------------------------------------------------------------- failure
def _finite(v: Any) -> bool:
    return not isinstance(v, (int, float)) or math.isfinite(v)


def failure(recs: list[dict[str, Any]], summary: dict[str, Any], weights: torch.Tensor | None = None) -> str | None:
    """Why the run must end with a non-zero exit, in one line; None when it trained."""
    agg = sum(1 for r in recs if r.get("status") == "ok")
    if agg == 0:
        why = next((r["status"] for r in recs if str(r.get("status", "")).startswith("aborted")), None)
        why = why or summary.get("stopped") or "no round was run"
        return f"no round was aggregated ({len(recs)} attempted; {why}); the model is the untrained one"
    for key in ("final_loss", "final_accuracy"):
        if not _finite(summary.get(key)):
            return f"the final {key.split('_')[1]} is {summary.get(key)} (not finite): training diverged or the weights are corrupt"
    if weights is not None and not bool(torch.isfinite(weights).all()):
        return "the final weights are not finite: training diverged or the weights are corrupt"
    return None


# ---------------------------------------------------------------------------- guarantee
def _names(specs: list[Any]) -> list[str]:
    return [p.name.lower() for p in specs]


def _roles(specs: list[Any], kind: str) -> list[DPRole]:
    """The declared DP role of each stage (secfed.needs.DPRole): an alias or a subclass reads as its class."""
    return [dp_role(registry.find(kind, p.name)) for p in specs]


def _hides_rows(cfg: Any) -> bool:
    """The secure sum declares that the server learns the sum only (secfed.needs: Need.ROWS not in reveals)."""
    reveals = getattr(registry.find("secure_sum", cfg.server.secure_sum.name), "reveals", Need.SUM | Need.ROWS)
    return Need.ROWS not in reveals


def _secure_text(cfg: Any) -> str:
    ss = cfg.server.secure_sum.name.lower()
    if ss in ("he", "ckks"):  # name the scheme it really runs (BFV unless scheme = "ckks")
        return f"{str(cfg.server.secure_sum.params.get('scheme', 'bfv')).upper()} {SECURE_SUMS[ss]} (TenSEAL)"
    return SECURE_SUMS.get(ss, f"the '{ss}' secure sum")


def _record_level(guard: Any) -> bool:
    """A guard that accounts for a private trainer's noise (declares Need.PRIVATE_TRAINER: DP-SGD)."""
    return Need.PRIVATE_TRAINER in getattr(guard, "needs", Need.NONE)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def defences(cfg: Any) -> list[str]:
    """Every active defence of the config, one phrase each (the DP mechanism itself excluded)."""
    c, s = cfg.client, cfg.server
    out: list[str] = []
    if _hides_rows(cfg):
        out.append(f"{_secure_text(cfg)}: the server learns only the sum of the updates, not one organisation's update")
    if s.group_size:
        out.append(f"robust aggregation over secure sums of groups of {s.group_size} organisations "
                   "(the server sees each group's sum)")
    if s.pre_aggregators:
        out.append("robust pre-aggregation " + ", ".join(_names(s.pre_aggregators)))
    if Need.ROWS in getattr(registry.find("aggregator", s.aggregator.name), "needs", Need.NONE):
        out.append(f"robust aggregation rule '{s.aggregator.name}'")
    for p, role in zip(c.pipeline, _roles(c.pipeline, "client_stage")):
        if DPRole.ADAPTIVE in role:
            out.append(f"adaptive clipping of each update (initial L2 norm {_fmt(p.params.get('initial_clip_norm', 0.1))})")
        elif DPRole.CLIP in role:
            out.append(f"clipping of each organisation's update to L2 norm {_fmt(p.params.get('clip_norm'))}")
    if is_private(registry.find("trainer", c.trainer.name)):
        clip = c.trainer.params.get("max_grad_norm", 1.0)
        groups = c.trainer.params.get("clip_groups")
        text = f"per-example gradient clipping to L2 norm {_fmt(clip)}"
        if isinstance(groups, dict) and groups:
            text += " (group-wise: " + ", ".join(f"{k} to {_fmt(float(v) * float(clip))}" for k, v in groups.items())
            if c.trainer.params.get("group_noise") == "proportional":
                scales = group_noise_scales([float(v) for v in groups.values()], "proportional")
                text += "; noise per group proportional to its bound, z C x " + ", ".join(_fmt(round(v, 3)) for v in scales)
            text += ")"
        out.append(text)
    if s.max_update_norm < 1e6:
        out.append(f"updates above L2 norm {_fmt(s.max_update_norm)} are rejected")
    return out


def _guard_facts(guard: Any) -> dict[str, Any]:
    """The guard's own figures, plus what its ``describe()`` says (who each epsilon holds against)."""
    facts = {"mechanism": getattr(guard, "mechanism", None), "epsilon": guard.epsilon(),
             "delta": getattr(guard, "delta", None), "accountant": getattr(guard, "accountant", None),
             "noise_multiplier": getattr(guard, "z", None), "epsilon_budget": getattr(guard, "budget", None),
             "sample_rate": getattr(guard, "q", None)}
    if hasattr(guard, "describe"):
        facts.update(dict(guard.describe()))
    return facts


def guarantee(cfg: Any, guard: Any = None) -> dict[str, Any]:
    """The run's privacy guarantee as data plus ``sentence`` (report.md) and ``short`` (progress bar)."""
    c, s = cfg.client, cfg.server
    active = defences(cfg)
    pipe_roles, stage_roles = _roles(c.pipeline, "client_stage"), _roles(s.stages, "server_stage")
    shares = any(DPRole.SHARE in r for r in pipe_roles)
    ring = any(DPRole.RING_SHARE in r for r in pipe_roles)
    ss, hides = s.secure_sum.name.lower(), _hides_rows(cfg)
    g: dict[str, Any] = {"defences": active}
    if guard is None:
        g.update(mechanism=None, protected_unit=None, holds_against=None, epsilon=None, delta=None)
        dp = (" DP-SGD noise is added but no guard accounts for it, so no epsilon is claimed."
              if is_private(registry.find("trainer", c.trainer.name)) else "")
        g["sentence"] = ("This run claims no formal privacy guarantee (no server.privacy guard)." + dp +
                         (" Active defences: " + "; ".join(active) + "." if active else " No defence is active."))
        g["short"] = "no DP"
        return g
    facts = _guard_facts(guard)
    g.update(facts)
    if facts.get("noise_multiplier") is None and c.trainer.params.get("noise_multiplier") is not None:
        g["noise_multiplier"] = float(c.trainer.params["noise_multiplier"])
    record_level = _record_level(guard)
    colluding = next((int(p.params.get("colluding", 0)) for p, r in zip(c.pipeline, pipe_roles) if DPRole.SHARE in r), 0)
    if record_level:
        g["mechanism_text"] = "DP-SGD on each organisation's own machine (per-example clipping and Gaussian noise)"
        g["protected_unit"] = "one record (training example) of one organisation"
        g["level"] = "record-level"
        g["holds_against"] = ("the server, the other organisations and anyone who sees the updates or the final model "
                              "(the noise is added before an update leaves the organisation)")
        g["not_against"] = "properties of an organisation's data set as a whole (only single records are protected)"
    elif shares:
        g["mechanism_text"] = ("DP-FedAvg with the distributed discrete Gaussian (each organisation adds a share in the "
                               "ring, Kairouz et al. 2021) under " if ring else
                               "DP-FedAvg with distributed Gaussian noise (each organisation adds a share) under "
                               ) + (SECURE_SUMS.get(ss, f"the '{ss}' sum"))
        g["protected_unit"] = "one organisation's whole data"
        g["level"] = "user-level"
        if hides:
            h = s.min_clients - colluding
            g["holds_against"] = "the other organisations and anyone who sees the released or final models"
            vs = facts.get("epsilon_vs_server")
            vs_s = f"epsilon = {vs:.3g}" if isinstance(vs, (int, float)) else "a larger epsilon"
            who = ("the server alone (no colluding organisation)" if colluding == 0 else
                   f"the server and up to {colluding} organisation(s) colluding with it")
            g["server_clause"] = (f"against {who}: {vs_s} (the server knows who was sampled: no amplification by "
                                  "sampling), as "
                                  f"long as every round completes with at least {s.min_clients} organisations (the "
                                  f"shares of {h} honest ones make up the noise)")
            g["not_against"] = ("the server colluding with any organisation" if colluding == 0 else
                                f"more than {colluding} organisations colluding with the server")
        else:
            g["holds_against"] = "anyone who sees only the final model"
            g["not_against"] = ("the server: under the plain sum each update carries only part of the noise "
                                "(allow_plain is for tests)")
    else:
        central = any(DPRole.CENTRAL_NOISE in r for r in stage_roles)
        g["mechanism_text"] = ("DP-FedAvg with central Gaussian noise added by the server" if central
                               else "DP-FedAvg")
        g["protected_unit"] = "one organisation's whole data"
        g["level"] = "user-level"
        g["holds_against"] = "the other organisations and anyone who sees the released models or the final model"
        g["not_against"] = ("the server, which sees " + ("the sum of the updates" if hides else "every update")
                            + " before it adds the noise")
    eps, delta, budget = facts.get("epsilon"), facts.get("delta"), facts.get("epsilon_budget")
    acc = ACCOUNTANT_NAMES.get(str(facts.get("accountant")), str(facts.get("accountant")))
    z = g.get("noise_multiplier")
    eps_s = f"epsilon = {eps:.3g}" if isinstance(eps, (int, float)) else "epsilon = ?"
    if isinstance(budget, (int, float)):
        eps_s += f" (of a budget of {budget:g})"
    parts = [f"z = {z:.4g}" if isinstance(z, (int, float)) else z if isinstance(z, str)
             else "noise multiplier calibrated at the first round"]
    if facts.get("sample_rate") is not None and g["level"] == "user-level":
        parts.append(f"client sampling rate q = {facts['sample_rate']:g}")
    parts.append(acc)
    worst = "; epsilon is the worst over the organisations" if record_level else ""
    g["sentence"] = (f"{g['level'].capitalize()} differential privacy: {g['protected_unit']} is protected with "
                     f"{eps_s}, delta = {delta:g} by {g['mechanism_text']} (noise multiplier {', '.join(parts)}{worst}), "
                     f"against {g['holds_against']}; "
                     + (f"{g['server_clause']}; " if g.get("server_clause") else "")
                     + f"not against {g['not_against']}. "
                     + ("Active defences: " + "; ".join(active) + "." if active else "No other defence is active."))
    where = "local noise" if record_level else ("distributed noise" if shares else "central noise, not vs server")
    b = f" eps<={budget:g}" if isinstance(budget, (int, float)) else ""
    g["short"] = f"{g['level']} DP ({where}){b} delta={delta:g}"
    return g


# ---------------------------------------------------------------------------- resume
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


IGNORED_ON_RESUME = ("run.rounds", "run.out", "deploy.")


def changed_keys(run_dir: Any, cfg: Any) -> str:
    """``": client.lr (0.01 -> 0.5)"``: the keys in which ``cfg`` differs from the run's ``config.json``
    (empty when that file is missing or unreadable)."""
    import json
    from pathlib import Path

    try:
        old = _flat(json.loads((Path(run_dir) / "config.json").read_text()))
    except (OSError, ValueError):
        return ""
    new = _flat(cfg.model_dump(mode="json"))
    keys = [k for k in sorted(set(old) | set(new))
            if not k.startswith(IGNORED_ON_RESUME) and old.get(k, "<unset>") != new.get(k, "<unset>")]
    if not keys:
        return ""
    shown = [f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})" for k in keys[:6]]
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    return ": changed " + ", ".join(shown) + more
