"""``dp-audit``: the one-run canary audit as an engine observer (white-box auditor).

Each round the observer takes the clients' decoded updates the server saw (the
background), adds its ``m`` canary clients (each in with probability 1/2, update
``C u_k``), runs DP-FedAvg's Gaussian mechanism on them (clip every row to ``C``,
sum, add ``N(0, (z C)^2)``; ``forget_noise = true`` is the planted bug) and scores
the canaries against the noisy sum. Its rounds.jsonl metrics are the running
audited lower bound ``audit_eps_lower_bound`` next to the claimed
``audit_claimed_eps`` (the ledger's RDP accountant, sampling rate 1, one step per round).

Canaries live in the first ``canary_dim`` coordinates of the update vector (the
whole vector when it is shorter) so that ``m`` orthonormal canaries fit in memory.
Config::

    [[server.observers]]
    name = "dp-audit"
    m = 1000
    clip = 1.0
    noise_multiplier = 1.0
    delta = 1e-5
"""

from __future__ import annotations

from typing import Any

import torch

from attacks.dp_audit.canary import CanaryAudit, gaussian_sum
from attacks.dp_audit.one_run import claimed_epsilon
from secfed.errors import ConfigError
from secfed.interfaces import RoundContext, ServerView, derive_seed
from secfed.needs import Need


class CanaryAuditObserver:
    needs = Need.ROWS  # the decoded rows as background when the secure sum reveals them (else canaries alone)

    def __init__(self, m: int = 1000, clip: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                 confidence: float = 0.95, forget_noise: bool = False, canary_dim: int = 4096,
                 dim: int = 0, seed: int = 0) -> None:
        if m < 1 or clip <= 0 or noise_multiplier < 0 or not 0 < delta < 1 or not 0 < confidence < 1:
            raise ConfigError("server.observers dp-audit: need m >= 1, clip > 0, noise_multiplier >= 0, "
                              "0 < delta < 1, 0 < confidence < 1")
        self.m, self.clip, self.z, self.delta = int(m), float(clip), float(noise_multiplier), float(delta)
        self.confidence, self.forget_noise = float(confidence), bool(forget_noise)
        self.k = min(int(canary_dim), int(dim)) if dim else int(canary_dim)
        self.seed = seed
        self.audit = CanaryAudit(self.m, self.k, self.clip, derive_seed(seed, "canaries"))

    def __call__(self, view: ServerView, ctx: RoundContext) -> dict[str, Any]:
        rows = self.audit.canary_rows()
        status = "ok"
        if view.updates is not None and len(view.updates):
            bg = view.updates[:, : self.k].float()
            rows = torch.cat([bg, rows])
        else:
            status = "no per-client update: canaries audited alone"
        z = 0.0 if self.forget_noise else self.z
        self.audit.observe(gaussian_sum(rows, self.clip, z, ctx.generator("dp-audit")))
        res = self.audit.result(self.delta, self.confidence)
        return {"audit_eps_lower_bound": res.eps_lower_bound,
                "audit_claimed_eps": claimed_epsilon(self.z, 1.0, self.audit.rounds, self.delta),
                "audit_correct": res.correct, "audit_guesses": res.guesses, "audit_status": status}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.audit.scores.clone(), "rounds": self.audit.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.audit.scores = state["scores"].double().clone()
        self.audit.rounds = int(state["rounds"])
