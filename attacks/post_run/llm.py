"""Post-run attacks of ``secfed audit`` on a causal-LM (instruction-tuning) run, issue 19.

* ``llm-membership`` -- :func:`attacks.membership.llm.llm_membership` on the final model
  (loss, zlib, min-k%, reference-calibrated against the base model with the adapter off).
* ``exposure`` -- the secret sharer's exposure of the canaries the run's ``secret-sharer``
  adversary planted (:mod:`attacks.memorisation.secret_sharer`).
* ``extraction`` -- the fraction of the PII records that adversary planted (``pii``) that
  greedy prompting with their prefix recovers verbatim (:mod:`attacks.memorisation.extraction`),
  and, as a control, the same on as many records no client ever held (should be 0).
"""

from __future__ import annotations

from typing import Any

import torch

LLM_ATTACKS = ("llm-membership", "exposure", "extraction")


def _planted(cfg: Any) -> Any:
    """The run's secret-sharer plug-in rebuilt from its config (its canaries are seeded), or None."""
    from secfed import registry

    a = cfg.attack.adversary
    if a is None:
        return None
    adv = registry.build("adversary", a, "attack.adversary", num_clients=cfg.data.num_clients, seed=cfg.run.seed)
    return adv if hasattr(adv, "exposures") else None


def is_causal(task: Any) -> bool:
    return hasattr(task, "token_nll") and hasattr(task, "greedy")


def run_llm_attack(name: str, cfg: Any, model: torch.nn.Module, task: Any, max_examples: int = 500) -> dict[str, Any]:
    """One of :data:`LLM_ATTACKS` on the final model of a run (a note when it does not apply)."""
    if not is_causal(task):
        return {"note": f"'{name}' audits causal-LM runs; this run's task is {getattr(task, 'kind', '?')}"}
    if name == "llm-membership":
        from attacks.membership.llm import llm_membership

        return llm_membership(model, task, max_examples=max_examples, seed=cfg.run.seed)
    adv = _planted(cfg)
    if adv is None:
        return {"note": "the run planted no secrets (attack.adversary = 'secret-sharer'); nothing to measure"}
    if name == "exposure":
        return adv.exposures(model, task) if adv.canaries else {"note": "the run planted no canaries"}
    if name == "extraction":
        if not adv.pii:
            return {"note": "the run planted no PII records (attack.adversary.pii = 0)"}
        from attacks.memorisation.extraction import extraction_rate, make_pii

        out = adv.extraction(model, task)
        out.update(extraction_rate(model, task, make_pii(len(adv.pii), cfg.run.seed, tag="control", digits=len(adv.pii[0].phone)), "control"))
        return out
    raise ValueError(f"unknown LLM attack {name!r}")
