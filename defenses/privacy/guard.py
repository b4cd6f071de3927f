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


# Who each reported epsilon holds against (review finding 4). The server runs the sampler and
# knows the cohort, so client-level amplification by subsampling never holds against it.
OUTSIDERS = "third parties seeing the released models"
SERVER = "the server"


def refuse_seeded_noise(cfg: Any) -> None:
    """Review finding 9: ``noise = "seeded"`` is rebuilt by anyone holding the config, so it never
    carries an epsilon: refused in every plug-in table of a run with a privacy guard (one line)."""
    if cfg is None or cfg.server.privacy is None:
        return
    c, s = cfg.client, cfg.server
    tables = [("client.trainer", c.trainer)] + [(f"client.pipeline[{i}]", p) for i, p in enumerate(c.pipeline)]
    tables += [(f"server.stages[{i}]", p) for i, p in enumerate(s.stages)]
    for key, spec in tables:
        if spec.params.get("noise") == "seeded":
            raise ConfigError(f"config key '{key}.noise': \"seeded\" noise can be rebuilt from the config and carries no "
                              f"epsilon; it is refused with server.privacy = '{s.privacy.name}' (leave it out: \"csprng\")")


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


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
                 accountant: str = "rdp", sample_rate: float | None = None, rounds: int = 1,
                 min_clients: int = 1, num_clients: int | None = None) -> None:
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
        self.min_clients, self.num_clients = int(min_clients), num_clients
        self.history: list[tuple[float, float, int]] = []
        self._eps = 0.0
        self._next: float | None = None
        self._validated = False
        self.noise_placement: str | None = None  # "central" or "distributed" (from the config, or the round)

    def validate_config(self, cfg: Any) -> None:
        """Called by the engine at build time: refusals that need the whole config."""
        refuse_seeded_noise(cfg)
        shares = any(_target("client_stage", p.name) == "defenses.privacy.dpfedavg:DistributedGaussianNoise"
                     for p in cfg.client.pipeline)
        self.noise_placement = "distributed" if shares else "central"
        if cfg.server.sampling == "poisson" and not _same(cfg.server.sample_rate, self.q):
            raise ConfigError(f"config key 'server.privacy': accounts for sample rate {self.q}, the server samples at "
                              f"server.sample_rate = {cfg.server.sample_rate}")
        if self.min_clients != cfg.server.min_clients:
            raise ConfigError(f"config key 'server.privacy': accounts for min_clients {self.min_clients}, the run has "
                              f"server.min_clients = {cfg.server.min_clients}")

    def _check_mechanism(self, ctx: RoundContext) -> None:
        """Review finding 1: what the run really does must be what this guard charges."""
        if ctx.sample_rate is None or not _same(ctx.sample_rate, self.q):
            raise ConfigError(f"config key 'server.sample_rate': the server samples at {ctx.sample_rate}, "
                              f"server.privacy accounts for {self.q}")
        if not _same(ctx.expected_cohort, self.q * ctx.num_clients):
            raise ConfigError(f"config key 'server.aggregator': the mean divides by {ctx.expected_cohort}, "
                              f"dp-fedavg accounts for qN = {self.q * ctx.num_clients}")
        if self.num_clients is not None and ctx.num_clients != self.num_clients:
            raise ConfigError(f"config key 'data.num_clients': the run has {ctx.num_clients} clients, "
                              f"server.privacy accounts for {self.num_clients}")

    # ------------------------------------------------------------------ engine hooks
    def check(self, ctx: RoundContext) -> None:
        if not self._validated:
            cfg = getattr(ctx.task, "cfg", None)
            if cfg is not None:
                self.noise_placement = validate_dpfedavg_config(cfg)
                self.validate_config(cfg)
            self._validated = True
        self._check_mechanism(ctx)
        info = round_info(ctx)
        info["noise_multiplier"] = self.z
        # what this guard charges; every noise stage checks the values it really uses against it
        info["accounted"] = {"noise_multiplier": self.z, "sample_rate": self.q, "min_clients": self.min_clients,
                             "expected_cohort": self.q * ctx.num_clients}
        self._next = epsilon(self.history + [(self.z, self.q, 1)], self.delta, self.accountant)
        if self.budget is not None and self._next > self.budget * (1 + 1e-9):
            raise BudgetExhausted(f"round {ctx.round} would bring epsilon to {self._next:.4g} > budget {self.budget:g} "
                                  f"(delta={self.delta:g}); the model of round {ctx.round - 1} is the last within budget")

    def record(self, ctx: RoundContext) -> dict[str, Any]:
        info = round_info(ctx)
        if info.get("distributed"):  # the client stage ran: check the shares' divisor against min_clients
            self.noise_placement = "distributed"
            if info.get("share_min_clients") != self.min_clients:
                raise ConfigError(f"config key 'client.pipeline.gaussian-share': the shares were sized for min_clients "
                                  f"{info.get('share_min_clients')}, the run has server.min_clients = {self.min_clients}")
        if self._next is None:
            self._next = epsilon(self.history + [(self.z, self.q, 1)], self.delta, self.accountant)
        self.history.append((self.z, self.q, 1))
        self._eps, self._next = self._next, None
        return {"mechanism": self.mechanism, "accountant": self.accountant, "q": self.q, "z": self.z, "steps": 1,
                "delta": self.delta, "epsilon": self._eps, "adversary": OUTSIDERS,
                "noise": self.noise_placement or "central", "epsilon_vs_server": self.epsilon_vs_server()}

    def epsilon_vs_server(self) -> float | None:
        """Epsilon against the server, which knows every cohort: no amplification by client sampling
        (q = 1 in every charged round, as if the client took part in each). None when the server sees
        the un-noised aggregate (central noise): nothing is protected against it then."""
        if (self.noise_placement or "central") != "distributed":
            return None
        return epsilon([(z, 1.0, k) for z, _, k in self.history], self.delta, self.accountant) if self.history else 0.0

    def describe(self) -> dict[str, Any]:
        """What the summary and the report say about who each epsilon holds against."""
        return {"epsilon_adversary": OUTSIDERS, "epsilon_vs_server": self.epsilon_vs_server(),
                "epsilon_vs_server_note": ("the server knows the cohort: no amplification by client sampling"
                                           if self.noise_placement == "distributed" else
                                           "not protected: with central noise the server sees the un-noised aggregate")}

    def load(self, entries: list[dict[str, Any]]) -> None:
        self.history = []
        for e in entries:
            if e.get("mechanism") != self.mechanism:
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} is for mechanism {e.get('mechanism')!r}, "
                                      f"this run uses {self.mechanism!r}")
            self.history.append((float(e["z"]), float(e["q"]), int(e["steps"])))
            if e.get("noise"):
                self.noise_placement = str(e["noise"])
        self._eps = epsilon(self.history, self.delta, self.accountant)

    def epsilon(self) -> float:
        return self._eps


def dpfedavg_violations(cfg: Any) -> list[str]:
    """Every reason the config's DP-FedAvg accounting would not hold, one phrase each naming the key
    (all of them at once, so a hand-written setup is fixed in one go, not one run per missing key)."""
    s, c = cfg.server, cfg.client
    bad: list[str] = []
    if s.sampling != "poisson":
        bad.append("config key 'server.sampling': dp-fedavg needs \"poisson\" (its accounting assumes Poisson sampling)")
    if c.weighting != "uniform":
        bad.append("config key 'client.weighting': dp-fedavg needs \"uniform\" (example weights would raise the sensitivity)")
    if _target("aggregator", s.aggregator.name) != "secfed.aggregation:Mean" or s.aggregator.params.get("denominator") != "expected":
        bad.append("config key 'server.aggregator': dp-fedavg needs {name = \"mean\", denominator = \"expected\"} "
                   "(the fixed denominator qN)")
    if s.pre_aggregators or s.group_size:
        bad.append("config key 'server.pre_aggregators': dp-fedavg's sensitivity analysis covers the plain mean only")
    clip = {"defenses.privacy.clipping:ClipUpdate", "defenses.privacy.dpfedavg:AdaptiveClipClient"}
    client_targets = [_target("client_stage", p.name) for p in c.pipeline]
    server_targets = [_target("server_stage", p.name) for p in s.stages]
    if not any(t in clip for t in client_targets):
        bad.append("config key 'client.pipeline': dp-fedavg needs a clipping stage ('clip' or 'adaptive-clip')")
    noise_c = "defenses.privacy.dpfedavg:DistributedGaussianNoise" in client_targets
    noise_s = "defenses.privacy.dpfedavg:CentralGaussianNoise" in server_targets
    if not (noise_c or noise_s):
        bad.append("config key 'server.stages': dp-fedavg needs noise: 'central-gaussian' in server.stages "
                   "or 'gaussian-share' in client.pipeline")
    if noise_c:
        i = client_targets.index("defenses.privacy.dpfedavg:DistributedGaussianNoise")
        if any(t in clip for t in client_targets) and not any(t in clip for t in client_targets[:i]):
            bad.append("config key 'client.pipeline': put the clipping stage before 'gaussian-share'")
    adaptive_s = "defenses.privacy.dpfedavg:AdaptiveClipServer" in server_targets
    adaptive_c = "defenses.privacy.dpfedavg:AdaptiveClipClient" in client_targets
    if adaptive_s != adaptive_c:
        bad.append("config key 'server.stages': adaptive clipping needs 'adaptive-clip' in both client.pipeline and server.stages")
    return bad


def validate_dpfedavg_config(cfg: Any) -> str:
    """Refuse configs whose accounting would not hold (every violation in one line); the noise placement."""
    bad = dpfedavg_violations(cfg)
    if bad:
        raise ConfigError("; ".join(bad))
    client_targets = [_target("client_stage", p.name) for p in cfg.client.pipeline]
    return "distributed" if "defenses.privacy.dpfedavg:DistributedGaussianNoise" in client_targets else "central"


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

    def validate_config(self, cfg: Any) -> None:
        """Called by the engine at build time (and on the first round): refusals that need the whole config."""
        refuse_seeded_noise(cfg)
        c = cfg.client
        real = {"batch_size": c.batch_size, "local_epochs": c.local_epochs, "local_steps": c.local_steps}
        mine = {"batch_size": self.batch_size, "local_epochs": self.local_epochs, "local_steps": self.local_steps}
        for k, v in real.items():
            if mine[k] != v:
                raise ConfigError(f"config key 'server.privacy': accounts for {k} = {mine[k]}, the clients train with "
                                  f"client.{k} = {v}")
        trainer = c.trainer.params
        for k, v in mine.items():
            if k in trainer and trainer[k] != v:
                raise ConfigError(f"config key 'client.trainer.{k}': {trainer[k]} differs from client.{k} = {v}, "
                                  "which server.privacy accounts for")

    def _setup(self, ctx: RoundContext) -> None:
        task = ctx.task
        if task is None:
            raise ConfigError(f"config key '{KEY}': dp-sgd needs the task (shard sizes) to account")
        if self.z is None:
            self.validate_config(task.cfg)
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
                "delta": self.delta, "epsilon": self.epsilon(), "adversary": self.ADVERSARY,
                "epsilon_vs_server": self.epsilon()}

    # Poisson batches are drawn inside the client from the OS CSPRNG, so the server learns them no
    # more than an outsider: the same epsilon holds against both.
    ADVERSARY = "anyone seeing a client's updates (the server included) or the released models"

    def describe(self) -> dict[str, Any]:
        return {"epsilon_adversary": self.ADVERSARY, "epsilon_vs_server": self.epsilon(),
                "epsilon_vs_server_note": "per record; the server sees each update but not the secret Poisson batches"}

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
