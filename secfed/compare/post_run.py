"""``secfed audit``: attack a finished run and check its figures against its claimed epsilon.

Three kinds of attack, chosen by name (``--attacks membership,dlg``):

* ``membership`` -- loss-threshold membership inference on the run's final model
  (Yeom et al. 2018, "Privacy risk in machine learning"): score = -loss; members are
  the clients' training examples, non-members the held-out test split. Reports AUC,
  TPR at 1% and 0.1% FPR (Carlini et al. 2022 ask for low-FPR figures), and an
  empirical epsilon lower bound from hypothesis testing (Kairouz et al. 2015;
  Jagielski et al. 2020): any (eps, delta)-DP mechanism has TPR <= e^eps FPR + delta,
  so with a threshold picked on one half of the examples and Clopper-Pearson
  bounds (95%) on the other half, eps_lb = log((TPR_lo - delta) / FPR_hi) (and the
  same with the roles of members and non-members swapped). Member/non-member
  status comes from the run's seeded split, not from a fresh coin per example, so
  this is an audit *heuristic*; the rigorous one-run audit is the ``dp-audit``
  observer (Steinke, Nasr & Jagielski 2023), whose figures are read as well.
  When the run planted ``data.canaries`` (``secfed.data.plant_canaries``: training
  examples with a wrong label, each in the training data by its own coin of
  probability 1/2), the same attack scores every canary against its wrong label:
  ``canary_auc`` and ``canary_eps_lower_bound`` measure worst-case memorisation
  (only memorising fits a wrong label), in the auditing game of Jagielski et al.
  (2020) with a coin per canary.
* ``backdoor`` -- the run's adversary's own ``evaluate`` (e.g. backdoor success) on the
  final model.
* any observer name of the registry (``dlg``, ``text-inversion``, ``dp-audit``, or
  ``module:Class``) -- *replay*: one more round of the run's own protocol from its
  final checkpoint, with the observer attached. The observer gets exactly what that
  run's server sees (``ServerView``): individual updates under ``plain``, nothing per
  client under SecAgg+ or CKKS. The replay writes to a scratch copy; the run's own
  checkpoint and ledger are never touched.
* a malicious-server attack of the registry (``imprint``; kind ``server_adversary``) --
  the same replay, but the server ships the round's model crafted by the attack and
  reads only what the secure sum releases (``attack.server``; the run's clients and
  their ``client.verify_model`` setting are unchanged).

Figures that observers recorded *during* the run (``rounds.jsonl``) are always
collected. ``audit.md`` marks in red every empirical epsilon lower bound that
exceeds the claimed epsilon (a contradiction: the claim or its implementation is
wrong), and says what the run did not claim.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfed import registry
from secfed.errors import ConfigError, SecfedError


def _tool(name: str) -> Any:
    """An attack function of the audit, found through the registry (secfed never imports ``attacks``)."""
    return registry.resolve("audit_tool", name, "audit")


def is_causal(task: Any) -> bool:
    return _tool("is-causal")(task)


def run_llm_attack(*args: Any, **kw: Any) -> Any:
    return _tool("run-llm-attack")(*args, **kw)


def attack_metrics(*args: Any, **kw: Any) -> Any:
    return _tool("attack-metrics")(*args, **kw)


def loss_scores(*args: Any, **kw: Any) -> Any:
    return _tool("loss-scores")(*args, **kw)


def model_logits(*args: Any, **kw: Any) -> Any:
    return _tool("model-logits")(*args, **kw)


def threshold_epsilon_lower_bound(*args: Any, **kw: Any) -> Any:
    return _tool("threshold-epsilon")(*args, **kw)


LLM_ATTACKS: tuple[str, ...] = tuple(_tool("llm-attacks"))

RED = "🔴"
GREEN = "🟢"
# Keys of a round record that the engine itself writes; everything else numeric came from a plug-in.
ENGINE_KEYS = {"round", "sampled", "malicious", "status", "completed", "dropped", "rejected", "bytes_up", "bytes_down",
               "train_loss", "accuracy", "loss", "epsilon", "seconds", "peak_rss_mb"}
POST_RUN = ("membership", "backdoor") + LLM_ATTACKS  # LLM_ATTACKS: causal-LM runs (attacks.post_run.llm)


# ---------------------------------------------------------------------------- membership
def membership_attack(model: torch.nn.Module, task: Any, delta: float, max_examples: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Loss-threshold membership inference (``attacks.membership``; see the module docstring):
    up to ``max_examples`` natural training examples against as many test examples, and, when
    the run planted ``data.canaries``, every canary (in vs out by its coin)."""
    rng = np.random.default_rng(seed)
    coin = getattr(task, "canary_in", None)
    natural = len(task.train) - (int(coin.sum()) if coin is not None else 0)  # included canaries are the last rows
    n = min(natural, len(task.test), max_examples)
    members = task.train.subset(np.sort(rng.permutation(natural)[:n]))
    non = task.test.subset(np.sort(rng.permutation(len(task.test))[:n]))

    def scores(data: Any) -> np.ndarray:
        return loss_scores(model_logits(task, model, data), data.labels)

    s_in, s_out = scores(members), scores(non)
    m = attack_metrics(np.r_[s_in, s_out], np.r_[np.ones(n, bool), np.zeros(n, bool)])
    out = {"membership_auc": m["auc"], "membership_tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
           "membership_tpr_at_0.1pct_fpr": m["tpr_at_0.1pct_fpr"],
           "membership_eps_lower_bound": threshold_epsilon_lower_bound(s_in, s_out, delta),
           "membership_examples": float(2 * n)}
    if coin is not None and 0 < coin.sum() < len(coin):
        s = scores(task.canaries)
        c = attack_metrics(s, coin)
        out.update({"canary_auc": c["auc"], "canary_tpr_at_1pct_fpr": c["tpr_at_1pct_fpr"],
                    "canary_eps_lower_bound": threshold_epsilon_lower_bound(s[coin], s[~coin], delta),
                    "canaries": float(len(coin))})
    return out


# ---------------------------------------------------------------------------- the run
def load_run(run_dir: Path) -> tuple[Any, Any, torch.nn.Module, dict[str, Any]]:
    """(config, task, model with the final global weights, checkpoint state) of a run directory."""
    from secfed.checkpoint import load_checkpoint
    from secfed.config import parse_config
    from secfed.spec import ParamSpec
    from secfed.task import Task

    cj = run_dir / "config.json"
    if not cj.is_file():
        raise ConfigError(f"{run_dir}: no config.json; point 'secfed audit' at a run directory (runs/<name>)")
    try:
        cfg = parse_config(json.loads(cj.read_text()), str(cj))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cj}: not valid JSON: {e}") from None
    tensors, state = load_checkpoint(run_dir)
    task = Task(cfg)
    model = task.build_model()
    spec = ParamSpec.from_module(model)
    w = tensors.get("global")
    if w is None or w.dtype != torch.float32 or tuple(w.shape) != (spec.numel,) or not bool(torch.isfinite(w).all()):
        raise ConfigError(f"{run_dir}/checkpoint: the global weights do not fit the model of config.json")
    spec.assign(model, w)
    return cfg, task, model, state


def replay_round(run_dir: Path, observers: list[str], scratch: Path) -> dict[str, Any]:
    """One more round of the run's protocol, from its final checkpoint, with ``observers`` attached."""
    from secfed.checkpoint import load_checkpoint, save_checkpoint, split_state
    from secfed.config import parse_config
    from secfed.engine import Engine, read_rounds

    raw = json.loads((run_dir / "config.json").read_text())
    tensors, state = load_checkpoint(run_dir)
    t = int(state["round"])
    from secfed import registry

    server_attacks = [o for o in observers if o.lower() in registry.REGISTRY.get("server_adversary", {})]
    observers = [o for o in observers if o not in server_attacks]
    if server_attacks:  # a malicious server (issue 17): it crafts the replayed round's model and reads the sum
        raw.setdefault("attack", {})["server"] = {"name": server_attacks[0], "attack_rounds": [t + 1]}
    had = [o if isinstance(o, str) else o.get("name") for o in raw["server"].get("observers", [])]
    new = [o for o in observers if o not in had]  # an observer the run already had continues with its state
    raw["server"]["observers"] = list(raw["server"].get("observers", [])) + [{"name": o} for o in new]
    raw["run"]["rounds"] = t + 1
    cfg = parse_config(raw, f"audit replay of {run_dir}")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    engine = Engine(cfg, scratch, resume=True, progress=False)
    plugins = dict(state.get("plugins", {}))
    tensors = dict(tensors)
    for i in range(len(had), len(engine.observers)):  # fresh state for the added observers
        obs = engine.observers[i]
        if hasattr(obs, "state_dict") and hasattr(obs, "load_state_dict"):
            obs_tensors, plugins[f"observer{i}"] = split_state(f"observer{i}", obs.state_dict())
            tensors.update(obs_tensors)
    save_checkpoint(scratch, tensors, {**state, "plugins": plugins, "fingerprint": cfg.fingerprint()})
    (scratch / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    if (run_dir / "privacy_ledger.jsonl").exists():
        shutil.copy2(run_dir / "privacy_ledger.jsonl", scratch / "privacy_ledger.jsonl")
    summary = engine.run()
    recs = [r for r in read_rounds(scratch) if r["round"] == t + 1]
    if not recs:
        return {"replay": f"no round was run ({summary.get('stopped') or 'unknown reason'})"}
    rec = recs[-1]
    out = {k: v for k, v in rec.items() if k not in ENGINE_KEYS}
    out["replay_round"] = t + 1
    return out


def history(run_dir: Path) -> dict[str, dict[str, float]]:
    """Plug-in figures recorded during the run: last, max and mean over rounds per numeric key."""
    from secfed.engine import read_rounds

    vals: dict[str, list[float]] = {}
    for r in read_rounds(run_dir):
        for k, v in r.items():
            if k not in ENGINE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                vals.setdefault(k, []).append(float(v))
    return {k: {"last": v[-1], "max": max(v), "mean": float(np.mean(v)), "rounds": len(v)} for k, v in vals.items()}


def _claim(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    s = cfg.server
    return {"epsilon": summary.get("epsilon"), "delta": summary.get("delta"),
            "privacy": s.privacy.name if s.privacy else None, "trainer": cfg.client.trainer.name,
            "pipeline": [p.name for p in cfg.client.pipeline], "secure_sum": s.secure_sum.name,
            "aggregator": s.aggregator.name, "stages": [p.name for p in s.stages],
            "adversary": cfg.attack.adversary.name if cfg.attack.adversary else None}


def validate_attacks(attacks: list[str]) -> None:
    """Every name must be a post-run attack or an observer of the registry (``module:Class`` too):
    checked before anything is run or written."""
    import difflib

    from secfed import registry

    if not attacks:
        raise ConfigError("--attacks: give at least one attack, e.g. --attacks membership")
    known = sorted(set(POST_RUN) | set(registry.REGISTRY.get("observer", {}))
                   | set(registry.REGISTRY.get("server_adversary", {})))
    if sum(a.lower() in registry.REGISTRY.get("server_adversary", {}) for a in attacks) > 1:
        raise ConfigError("--attacks: one malicious-server attack per audit (the replayed round ships one model)")
    for a in attacks:
        if a in POST_RUN or a.lower() in registry.REGISTRY.get("observer", {}) or \
                a.lower() in registry.REGISTRY.get("server_adversary", {}):
            continue
        if ":" in a:
            registry.resolve("observer", a, "--attacks")
            continue
        close = difflib.get_close_matches(a, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--attacks: unknown attack '{a}' (known: {', '.join(known)}, or 'module:Class'){hint}")


def _move_aside(out: Path) -> Path | None:
    """A previous audit in ``out`` is renamed to ``out.prev-<k>`` (nothing is overwritten or deleted)."""
    if not out.exists() or not any(out.iterdir()):
        return None
    k = 1
    while out.with_name(f"{out.name}.prev-{k}").exists():
        k += 1
    backup = out.with_name(f"{out.name}.prev-{k}")
    out.rename(backup)
    return backup


def audit_run(run_dir: str | Path, attacks: list[str], out: str | Path | None = None, *,
              progress: bool = True) -> dict[str, Any]:
    """Run ``attacks`` against the finished run in ``run_dir``; write ``audit.json`` and ``audit.md`` to ``out``.

    The attack names and the run are checked before anything is written; a previous audit in
    ``out`` is moved to ``out.prev-<k>``."""
    run_dir = Path(run_dir)
    validate_attacks(attacks)
    out = Path(out) if out else run_dir / "audit"
    cfg, task, model, state = load_run(run_dir)
    backup = _move_aside(out)
    out.mkdir(parents=True, exist_ok=True)
    sp = run_dir / "summary.json"
    summary = json.loads(sp.read_text()) if sp.exists() else {}
    claim = _claim(cfg, summary)
    delta = claim["delta"] if isinstance(claim["delta"], (int, float)) and claim["delta"] else 1e-5
    results: dict[str, Any] = {}
    observers = [a for a in attacks if a not in POST_RUN]
    for a in attacks:
        if a in LLM_ATTACKS or (a == "membership" and is_causal(task)):  # generative task: issue 19
            results[a] = run_llm_attack("llm-membership" if a == "membership" else a, cfg, model, task)
        elif a == "membership":
            results[a] = membership_attack(model, task, delta, seed=cfg.run.seed)
        elif a == "backdoor":
            from secfed import registry

            if cfg.attack.adversary is None:
                results[a] = {"note": "the run had no adversary; nothing to evaluate"}
            else:
                adv = registry.build("adversary", cfg.attack.adversary, "attack.adversary",
                                     num_clients=cfg.data.num_clients, seed=cfg.run.seed)
                results[a] = dict(getattr(adv, "evaluate", lambda m, t: {})(model, task) or {})
    if observers:
        try:
            results["replay"] = replay_round(run_dir, observers, out / "replay")
        except SecfedError as e:
            results["replay"] = {"error": str(e)}
    hist = history(run_dir)
    report = {"run": str(run_dir), "round": state.get("round"), "claimed": claim, "attacks_run": list(attacks),
              "previous_audit": str(backup) if backup else None,
              "results": results, "during_run": hist, "final_accuracy": summary.get("final_accuracy")}
    report["verdicts"] = verdicts(report)
    (out / "audit.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "audit.md").write_text(audit_markdown(report))
    return report


def _is_lb(k: str) -> bool:
    return "eps_lower" in k or "epsilon_lower" in k or k.endswith("eps_lb")


def _lower_bounds(report: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    """Every empirical epsilon lower bound in the audit: (name, value, the claim its own source states or None).

    An auditing observer (``dp-audit``) audits the mechanism it was configured with and reports that
    mechanism's claimed epsilon next to its bound (``audit_claimed_eps``); its bound is judged against that.
    """
    lbs = []
    for name, res in report["results"].items():
        own = next((float(v) for k, v in res.items() if "claimed_eps" in k and isinstance(v, (int, float))), None)
        for k, v in res.items():
            if isinstance(v, (int, float)) and _is_lb(k):
                lbs.append((f"{name}: {k}", float(v), own))
    hist = report["during_run"]
    own = next((v["last"] for k, v in hist.items() if "claimed_eps" in k), None)
    for k, v in hist.items():
        if _is_lb(k):
            lbs.append((f"during run: {k} (max over rounds)", v["max"], own))
    return lbs


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each empirical lower bound against its claim: the auditing observer's own, else the run's ledger epsilon."""
    run_eps = report["claimed"]["epsilon"]
    out = []
    for name, lb, own in _lower_bounds(report):
        eps, src = (own, "the audited mechanism's claimed epsilon") if own is not None else (run_eps, "claimed epsilon")
        if eps is None:
            out.append({"figure": name, "value": lb, "verdict": "no claim",
                        "text": "the run claims no epsilon (no privacy guard): nothing to contradict"})
        elif lb > eps:
            out.append({"figure": name, "value": lb, "verdict": "contradicts",
                        "text": f"empirical lower bound {lb:.3g} > {src} {eps:.3g}"})
        else:
            out.append({"figure": name, "value": lb, "verdict": "consistent",
                        "text": f"empirical lower bound {lb:.3g} <= {src} {eps:.3g}"})
    return out


def _f(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def audit_markdown(report: dict[str, Any]) -> str:
    c = report["claimed"]
    lines = [f"# Audit of `{report['run']}`", ""]
    bad = [v for v in report["verdicts"] if v["verdict"] == "contradicts"]
    if bad:
        lines.append(f"{RED} **<span style=\"color:red\">{len(bad)} empirical figure(s) contradict the claimed epsilon"
                     "</span>**: the guarantee or its implementation is wrong.")
    elif c["epsilon"] is not None:
        lines.append(f"{GREEN} No empirical figure contradicts the claimed epsilon = {c['epsilon']:.4g} "
                     f"(delta = {_f(c['delta'])}). A lower bound below the claim does not prove the claim.")
    else:
        lines.append("The run claims **no formal privacy guarantee** (no `server.privacy` guard); the figures below "
                     "measure what leaks.")
    lines += ["", "## The claim", "",
              f"- epsilon = {_f(c['epsilon'])}, delta = {_f(c['delta'])} (guard: {_f(c['privacy'])}, "
              f"trainer: {c['trainer']})",
              f"- client pipeline: {', '.join(c['pipeline']) or 'none'}; secure sum: {c['secure_sum']}; "
              f"aggregator: {c['aggregator']}; server stages: {', '.join(c['stages']) or 'none'}",
              f"- adversary in the run: {_f(c['adversary'])}; final accuracy {_f(report.get('final_accuracy'))} "
              f"after round {report['round']}", ""]
    if report["verdicts"]:
        lines += ["## Empirical epsilon vs the claim", "", "| figure | value | verdict |", "|---|---|---|"]
        for v in report["verdicts"]:
            mark = {"contradicts": f"{RED} <span style=\"color:red\">**{v['text']}**</span>",
                    "consistent": f"{GREEN} {v['text']}"}.get(v["verdict"], v["text"])
            lines.append(f"| {v['figure']} | {v['value']:.4g} | {mark} |")
        lines.append("")
    lines += ["## What the attacks got", "", "| attack | figure | value |", "|---|---|---|"]
    for name, res in report["results"].items():
        status = next((str(v) for k, v in res.items() if k.endswith("status") and str(v).startswith("not run")), None)
        for k, v in res.items():
            shown = (status or "not run") if v is None else _f(v)  # an attack that did not run is not a 0
            lines.append(f"| {name} | {k} | {shown} |")
    for k, v in report["during_run"].items():
        lines.append(f"| during run | {k} (last / max / mean over {v['rounds']} rounds) | "
                     f"{_f(v['last'])} / {_f(v['max'])} / {_f(v['mean'])} |")
    lines += ["", "## Limits", "",
              "- `membership` is a loss-threshold attack (Yeom et al. 2018); stronger attacks (LiRA with shadow "
              "models) can only raise the leakage it shows. On natural examples its epsilon lower bound treats "
              "the seeded train/test split as the membership coin (a heuristic); on canaries (`data.canaries`) each "
              "canary has its own coin, which is the auditing game the bound assumes.",
              "- A replayed observer sees one more round of this run's protocol from its final checkpoint, i.e. "
              "what the server would see next; it does not see the rounds already run (their transcripts are "
              "not stored).",
              "- An empirical lower bound below the claim does not show the claim holds; only a contradiction "
              "(red) is conclusive.", ""]
    return "\n".join(lines)
