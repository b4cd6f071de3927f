"""Privacy guards: the budget, the accountant and the ledger entries of a run.

The engine calls, every round: ``check(ctx)`` before any work (raises
:class:`BudgetExhausted` if the round would exceed the budget, so the run ends with the
last model inside it), ``record(ctx)`` for the ledger entry (appended and fsynced
*before* the round's aggregate is computed or released), and ``load(entries)`` on
``--resume``. Every ledger entry is charged, so a round re-executed after a crash is
counted twice: the ledger may over-count, never under-count.

* :class:`DPFedAvgGuard` -- user-level DP of DP-FedAvg (McMahan et al. 2018): one
  Poisson-subsampled Gaussian (q, z) per round. Give ``epsilon`` (+ ``delta``) and
  secfed calibrates z for ``run.rounds``; give ``noise_multiplier`` too and it computes
  how many rounds fit and stops there.
* :class:`DPSGDGuard` -- sample-level DP of DP-SGD on each client (Abadi et al. 2016):
  per client, K_i steps of rate q_i per round in which it is sampled; the reported
  epsilon is the worst over clients.
"""

from __future__ import annotations

import math
from typing import Any

from defenses.privacy.analysis import ACCOUNTANTS, calibrate_noise, calibrate_rounds, epsilon
from defenses.privacy.clipping import round_info
from defenses.privacy.dpsgd import client_plan, resolve_noise_multiplier
from secfed import registry
from secfed.errors import BudgetExhausted, CheckpointError, ConfigError
from secfed.interfaces import RoundContext

KEY = "server.privacy"


def _target(kind: str, name: str) -> str:
    return registry.REGISTRY.get(kind, {}).get(name.lower(), name)


def _check_common(epsilon_: float | None, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"config key '{KEY}.accountant': one of {ACCOUNTANTS} (got {accountant!r})")
    if not 0 < delta < 1:
        raise ConfigError(f"config key '{KEY}.delta': must be in (0, 1) (got {delta})")
    if epsilon_ is not None and not (epsilon_ > 0 and math.isfinite(epsilon_)):
        raise ConfigError(f"config key '{KEY}.epsilon': must be a positive number (got {epsilon_})")


class DPFedAvgGuard:
    """Budget and accountant of DP-FedAvg (user-level DP).

    Args:
        epsilon: the budget (None: no budget, only report epsilon; needs noise_multiplier).
        delta: the delta at which epsilon is reported.
        noise_multiplier: z; None calibrates it from epsilon and run.rounds.
        accountant: "rdp" (default) or "prv".
    """

    mechanism = "dp-fedavg"

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, noise_multiplier: float | None = None,
                 accountant: str = "rdp", sample_rate: float | None = None, rounds: int = 1) -> None:
        _check_common(epsilon, delta, accountant)
        if sample_rate is None:
            raise ConfigError("config key 'server.sampling': dp-fedavg needs Poisson client sampling "
                              "(server.sampling = \"poisson\", server.sample_rate = q); its accounting assumes it")
        if noise_multiplier is None and epsilon is None:
            raise ConfigError(f"config key '{KEY}': give epsilon (and delta), or noise_multiplier, or both")
        if noise_multiplier is not None and not noise_multiplier > 0:
            raise ConfigError(f"config key '{KEY}.noise_multiplier': must be > 0 (got {noise_multiplier})")
        self.budget, self.delta, self.accountant, self.q = epsilon, float(delta), accountant, float(sample_rate)
        self.max_rounds: int | None = None
        if noise_multiplier is None:
            self.z = calibrate_noise(epsilon, self.delta, self.q, rounds, accountant, KEY)
            self.max_rounds = rounds
        else:
            self.z = float(noise_multiplier)
            if epsilon is not None:
                self.max_rounds = calibrate_rounds(epsilon, self.delta, [(self.z, self.q, 1)], accountant, KEY)
        self.history: list[tuple[float, float, int]] = []
        self._eps = 0.0
        self._next: float | None = None
        self._validated = False

    # ------------------------------------------------------------------ engine hooks
    def check(self, ctx: RoundContext) -> None:
        if not self._validated:
            cfg = getattr(ctx.task, "cfg", None)
            if cfg is not None:
                validate_dpfedavg_config(cfg)
            self._validated = True
        round_info(ctx)["noise_multiplier"] = self.z
        self._next = epsilon(self.history + [(self.z, self.q, 1)], self.delta, self.accountant)
        if self.budget is not None and self._next > self.budget * (1 + 1e-9):
            raise BudgetExhausted(f"round {ctx.round} would bring epsilon to {self._next:.4g} > budget {self.budget:g} "
                                  f"(delta={self.delta:g}); the model of round {ctx.round - 1} is the last within budget")

    def record(self, ctx: RoundContext) -> dict[str, Any]:
        if self._next is None:
            self._next = epsilon(self.history + [(self.z, self.q, 1)], self.delta, self.accountant)
        self.history.append((self.z, self.q, 1))
        self._eps, self._next = self._next, None
        return {"mechanism": self.mechanism, "accountant": self.accountant, "q": self.q, "z": self.z, "steps": 1,
                "delta": self.delta, "epsilon": self._eps}

    def load(self, entries: list[dict[str, Any]]) -> None:
        self.history = []
        for e in entries:
            if e.get("mechanism") != self.mechanism:
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} is for mechanism {e.get('mechanism')!r}, "
                                      f"this run uses {self.mechanism!r}")
            self.history.append((float(e["z"]), float(e["q"]), int(e["steps"])))
        self._eps = epsilon(self.history, self.delta, self.accountant)

    def epsilon(self) -> float:
        return self._eps


def validate_dpfedavg_config(cfg: Any) -> None:
    """Refuse configs whose accounting would not hold (one line each, naming the key)."""
    s, c = cfg.server, cfg.client
    if s.sampling != "poisson":
        raise ConfigError("config key 'server.sampling': dp-fedavg needs \"poisson\" (its accounting assumes Poisson sampling)")
    if c.weighting != "uniform":
        raise ConfigError("config key 'client.weighting': dp-fedavg needs \"uniform\" (example weights would raise the sensitivity)")
    if _target("aggregator", s.aggregator.name) != "secfed.aggregation:Mean" or s.aggregator.params.get("denominator") != "expected":
        raise ConfigError("config key 'server.aggregator': dp-fedavg needs {name = \"mean\", denominator = \"expected\"} "
                          "(the fixed denominator qN)")
    if s.pre_aggregators or s.group_size:
        raise ConfigError("config key 'server.pre_aggregators': dp-fedavg's sensitivity analysis covers the plain mean only")
    clip = {"defenses.privacy.clipping:ClipUpdate", "defenses.privacy.dpfedavg:AdaptiveClipClient"}
    client_targets = [_target("client_stage", p.name) for p in c.pipeline]
    server_targets = [_target("server_stage", p.name) for p in s.stages]
    if not any(t in clip for t in client_targets):
        raise ConfigError("config key 'client.pipeline': dp-fedavg needs a clipping stage ('clip' or 'adaptive-clip')")
    noise_c = "defenses.privacy.dpfedavg:DistributedGaussianNoise" in client_targets
    noise_s = "defenses.privacy.dpfedavg:CentralGaussianNoise" in server_targets
    if not (noise_c or noise_s):
        raise ConfigError("config key 'server.stages': dp-fedavg needs noise: 'central-gaussian' in server.stages "
                          "or 'gaussian-share' in client.pipeline")
    if noise_c:
        i = client_targets.index("defenses.privacy.dpfedavg:DistributedGaussianNoise")
        if not any(t in clip for t in client_targets[:i]):
            raise ConfigError("config key 'client.pipeline': put the clipping stage before 'gaussian-share'")
    adaptive_s = "defenses.privacy.dpfedavg:AdaptiveClipServer" in server_targets
    adaptive_c = "defenses.privacy.dpfedavg:AdaptiveClipClient" in client_targets
    if adaptive_s != adaptive_c:
        raise ConfigError("config key 'server.stages': adaptive clipping needs 'adaptive-clip' in both client.pipeline and server.stages")


class DPSGDGuard:
    """Budget and accountant of sample-level DP-SGD on the clients.

    The noise multiplier is the trainer's (``client.trainer.noise_multiplier``) or
    calibrated from this guard's epsilon for run.rounds, assuming every client trains
    every round (:func:`defenses.privacy.dpsgd.resolve_noise_multiplier`). Each round
    charges every client of the cohort (dropped ones too) K_i steps at rate q_i.
    """

    mechanism = "dp-sgd"

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, accountant: str = "rdp",
                 batch_size: int = 16, local_epochs: int = 1, local_steps: int = 0) -> None:
        _check_common(epsilon, delta, accountant)
        self.budget, self.delta, self.accountant = epsilon, float(delta), accountant
        self.batch_size, self.local_epochs, self.local_steps = batch_size, local_epochs, local_steps
        self.z: float | None = None
        self.histories: dict[int, list[tuple[float, float, int]]] = {}
        self._eps: dict[int, float] = {}
        self._next: dict[int, float] = {}
        self._plan: dict[int, tuple[float, int]] = {}

    def _setup(self, ctx: RoundContext) -> None:
        task = ctx.task
        if task is None:
            raise ConfigError(f"config key '{KEY}': dp-sgd needs the task (shard sizes) to account")
        if self.z is None:
            if _target("trainer", task.cfg.client.trainer.name) != "defenses.privacy.dpsgd:DPSGDTrainer":
                raise ConfigError("config key 'client.trainer': server.privacy = \"dp-sgd\" needs client.trainer = \"dp-sgd\"")
            self.z = resolve_noise_multiplier(task.cfg, [len(s) for s in task.shards])
            if not self.z > 0:
                raise ConfigError("config key 'client.trainer.noise_multiplier': must be > 0 for a privacy guarantee")

    def check(self, ctx: RoundContext) -> None:
        self._setup(ctx)
        self._plan = {cid: client_plan(len(ctx.task.shards[cid]), self.batch_size, self.local_epochs, self.local_steps)
                      for cid in ctx.cohort}
        self._next = {cid: epsilon(self.histories.get(cid, []) + [(self.z, q, k)], self.delta, self.accountant)
                      for cid, (q, k) in self._plan.items()}
        worst = max(self._next.values(), default=0.0)
        if self.budget is not None and worst > self.budget * (1 + 1e-9):
            raise BudgetExhausted(f"round {ctx.round} would bring epsilon to {worst:.4g} > budget {self.budget:g} "
                                  f"(delta={self.delta:g}); the model of round {ctx.round - 1} is the last within budget")

    def record(self, ctx: RoundContext) -> dict[str, Any]:
        if not self._plan:
            self.check(ctx)
        for cid, (q, k) in self._plan.items():
            self.histories.setdefault(cid, []).append((self.z, q, k))
            self._eps[cid] = self._next[cid]
        clients = {str(cid): [q, k] for cid, (q, k) in self._plan.items()}
        self._plan, self._next = {}, {}
        return {"mechanism": self.mechanism, "accountant": self.accountant, "z": self.z, "clients": clients,
                "delta": self.delta, "epsilon": self.epsilon()}

    def load(self, entries: list[dict[str, Any]]) -> None:
        self.histories = {}
        for e in entries:
            if e.get("mechanism") != self.mechanism:
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} is for mechanism {e.get('mechanism')!r}, "
                                      f"this run uses {self.mechanism!r}")
            for cid, (q, k) in e["clients"].items():
                self.histories.setdefault(int(cid), []).append((float(e["z"]), float(q), int(k)))
        self._eps = {cid: epsilon(h, self.delta, self.accountant) for cid, h in self.histories.items()}

    def epsilon(self) -> float:
        return max(self._eps.values(), default=0.0)
