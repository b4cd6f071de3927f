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
  how many rounds fit and stops there. With the ``ddgauss`` client stage (the distributed
  discrete Gaussian under SecAgg+, :mod:`defenses.privacy.ddgauss`) it charges that
  mechanism's own RDP bound (Kairouz, Liu & Steinke 2021; Zhu & Wang 2019 for sampling)
  instead of the continuous Gaussian's, and calibrates z against it.
* :class:`DPSGDGuard` -- sample-level DP of DP-SGD on each client (Abadi et al. 2016):
  per client, K_i steps of rate q_i per round in which it is sampled; the reported
  epsilon is the worst over clients.
"""

from __future__ import annotations

import math
from typing import Any

from defenses.privacy.analysis import ACCOUNTANTS, calibrate_noise, calibrate_rounds, epsilon
from defenses.privacy.clipping import round_info
from defenses.privacy.dpsgd import PLAN_KEYS, check_calibration, client_plan, noise_multipliers, plan_mismatch
from secfed import registry
from secfed.aggregation import Mean
from secfed.errors import BudgetExhausted, CheckpointError, ConfigError
from secfed.interfaces import RoundContext
from secfed.needs import DPRole, Need
from secfed.rounds import Accounted, stage_roles, trainer_is_private

KEY = "server.privacy"


def _is(kind: str, name: str, key: str, base: type) -> bool:
    """True when the registry resolves ``name`` to ``base`` or a subclass of it (aliases and subclasses count)."""
    cls = registry.resolve(kind, name, key)
    return isinstance(cls, type) and issubclass(cls, base)


# Who each reported epsilon holds against (review finding 4). The server runs the sampler and
# knows the cohort, so client-level amplification by subsampling never holds against it.
OUTSIDERS = "third parties seeing the released models"
SERVER = "the server"


# The DP stages are recognised by their declared role (secfed.needs.DPRole, ``dp_role`` on the class):
# CLIP (clip, adaptive-clip), SHARE (gaussian-share, ddgauss), RING_SHARE (ddgauss), CENTRAL_NOISE
# (central-gaussian), ADAPTIVE (adaptive-clip, both halves). A subclass or an alias plays its class's role.


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

    mechanism = "dp-fedavg"  # the ledger's name of what it charges
    #: secfed.needs: its noise covers the (linear) sum of clipped updates only, and its accounting
    #: assumes amplification by client subsampling (a cohort no one holding the config can rebuild)
    needs = Need.SUM | Need.SECRET_SAMPLE

    @classmethod
    def config_violations(cls, cfg: Any) -> list[str]:
        """Every setting DP-FedAvg still needs, checked before the guard is built (secfed.engine asks the
        registry's class, so secfed never imports this module)."""
        return dpfedavg_violations(cfg)

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, noise_multiplier: float | None = None,
                 accountant: str = "rdp", sample_rate: float | None = None, rounds: int = 1,
                 min_clients: int = 1, num_clients: int | None = None, dim: int | None = None) -> None:
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
        self._z: float | None = None
        if noise_multiplier is None:  # calibrated on first use (validate_config may pick the ddgauss accountant first)
            self.max_rounds = rounds
        else:
            self.z = float(noise_multiplier)
            if epsilon is not None:
                self.max_rounds = calibrate_rounds(epsilon, self.delta, [(self.z, self.q, 1)], accountant, KEY)
        self.min_clients, self.num_clients = int(min_clients), num_clients
        self.rounds, self.dim, self.given_z = rounds, dim, noise_multiplier
        self.ddgauss: Any = None  # the DDGauss accountant when client.pipeline has 'ddgauss' (validate_config)
        self.history: list[tuple[float, float, int]] = []
        self._eps_spent = 0.0
        self._next: float | None = None
        self._validated = False
        self.noise_placement: str | None = None  # "central" or "distributed" (from the config, or the round)

    def validate_config(self, cfg: Any) -> None:
        """Called by the engine at build time: refusals that need the whole config."""
        refuse_seeded_noise(cfg)
        roles = stage_roles(cfg, "client")
        self.noise_placement = "distributed" if any(DPRole.SHARE in r for r in roles) else "central"
        if any(DPRole.RING_SHARE in r for r in roles) and self.ddgauss is None:
            self._use_ddgauss(cfg)
        _ = self.z  # calibrated now: a budget out of reach is refused when the run is built
        if cfg.server.sampling == "poisson" and not _same(cfg.server.sample_rate, self.q):
            raise ConfigError(f"config key 'server.privacy': accounts for sample rate {self.q}, the server samples at "
                              f"server.sample_rate = {cfg.server.sample_rate}")
        if self.min_clients != cfg.server.min_clients:
            raise ConfigError(f"config key 'server.privacy': accounts for min_clients {self.min_clients}, the run has "
                              f"server.min_clients = {cfg.server.min_clients}")

    @property
    def z(self) -> float:
        """The noise multiplier: given, or calibrated from epsilon for run.rounds by this guard's accountant."""
        if self._z is None:
            self._z = calibrate_noise(self.budget, self.delta, self.q, self.rounds, self.accountant, KEY)
        return self._z

    @z.setter
    def z(self, value: float) -> None:
        self._z = float(value)

    def _use_ddgauss(self, cfg: Any) -> None:
        """Charge the distributed discrete Gaussian (Kairouz et al. 2021) instead of the continuous Gaussian:
        its own RDP bound (defenses.privacy.ddgauss), z recalibrated against it for run.rounds."""
        from defenses.privacy.ddgauss import accountant_from_config

        if self.dim is None:
            raise ConfigError(f"config key '{KEY}': ddgauss accounting needs the model dimension (engine-provided)")
        self.ddgauss = accountant_from_config(cfg, self.dim, self.num_clients or cfg.data.num_clients)
        if self.given_z is None:
            self.z = self.ddgauss.calibrate(self.budget, self.delta, self.q, self.rounds, KEY)
            self.max_rounds = self.rounds
        else:
            self.ddgauss.mechanism(self.z)  # refuses an impossible bit width now, not in round 1
            if self.budget is not None:
                self.max_rounds = self.ddgauss.max_rounds(self.budget, self.delta, self.z, self.q, KEY)

    def _eps(self, history: list[tuple[float, float, int]]) -> float:
        if self.ddgauss is not None:
            return self.ddgauss.epsilon(history, self.delta)
        return epsilon(history, self.delta, self.accountant)

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
        info.noise_multiplier = self.z
        if self.ddgauss is not None:
            info.ddgauss = self.ddgauss.mechanism(self.z)  # the 'ddgauss' stage runs exactly this mechanism
        # what this guard charges; every noise stage checks the values it really uses against it
        info.accounted = Accounted(noise_multiplier=self.z, sample_rate=self.q, min_clients=self.min_clients,
                                   expected_cohort=self.q * ctx.num_clients)
        self._next = self._eps(self.history + [(self.z, self.q, 1)])
        if self.budget is not None and self._next > self.budget * (1 + 1e-9):
            raise BudgetExhausted(f"round {ctx.round} would bring epsilon to {self._next:.4g} > budget {self.budget:g} "
                                  f"(delta={self.delta:g}); the model of round {ctx.round - 1} is the last within budget")

    def record(self, ctx: RoundContext) -> dict[str, Any]:
        info = round_info(ctx)
        if info.distributed:  # the client stage ran: check the shares' divisor against min_clients
            self.noise_placement = "distributed"
            if info.share_min_clients != self.min_clients:
                raise ConfigError(f"config key 'client.pipeline.gaussian-share': the shares were sized for min_clients "
                                  f"{info.share_min_clients}, the run has server.min_clients = {self.min_clients}")
        if self._next is None:
            self._next = self._eps(self.history + [(self.z, self.q, 1)])
        self.history.append((self.z, self.q, 1))
        self._eps_spent, self._next = self._next, None
        entry = {"mechanism": self.mechanism, "accountant": self.accountant, "q": self.q, "z": self.z, "steps": 1,
                 "delta": self.delta, "epsilon": self._eps_spent, "adversary": OUTSIDERS,
                 "noise": self.noise_placement or "central", "epsilon_vs_server": self.epsilon_vs_server()}
        if self.ddgauss is not None:
            entry.update(noise="ddgauss", accountant="ddgauss-rdp", ddgauss=self.ddgauss.mechanism(self.z).describe())
        return entry

    def epsilon_vs_server(self) -> float | None:
        """Epsilon against the server, which knows every cohort: no amplification by client sampling
        (q = 1 in every charged round, as if the client took part in each). None when the server sees
        the un-noised aggregate (central noise): nothing is protected against it then."""
        if (self.noise_placement or "central") not in ("distributed", "ddgauss"):
            return None
        return self._eps([(z, 1.0, k) for z, _, k in self.history]) if self.history else 0.0

    def describe(self) -> dict[str, Any]:
        """What the summary and the report say about who each epsilon holds against."""
        return {"epsilon_adversary": OUTSIDERS, "epsilon_vs_server": self.epsilon_vs_server(),
                "epsilon_vs_server_note": ("the server knows the cohort: no amplification by client sampling"
                                           if self.noise_placement in ("distributed", "ddgauss") else
                                           "not protected: with central noise the server sees the un-noised aggregate")}

    def load(self, entries: list[dict[str, Any]]) -> None:
        self.history = []
        for e in entries:
            if e.get("mechanism") != self.mechanism:
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} is for mechanism {e.get('mechanism')!r}, "
                                      f"this run uses {self.mechanism!r}")
            if (e.get("noise") == "ddgauss") != (self.ddgauss is not None):
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} was charged with noise {e.get('noise')!r}, "
                                      "this run's noise is accounted differently")
            self.history.append((float(e["z"]), float(e["q"]), int(e["steps"])))
            if e.get("noise"):
                self.noise_placement = "distributed" if e["noise"] == "ddgauss" else str(e["noise"])
        self._eps_spent = self._eps(self.history)

    def epsilon(self) -> float:
        return self._eps_spent


def dpfedavg_violations(cfg: Any) -> list[str]:
    """Every reason the config's DP-FedAvg accounting would not hold, one phrase each naming the key
    (all of them at once, so a hand-written setup is fixed in one go, not one run per missing key)."""
    s, c = cfg.server, cfg.client
    bad: list[str] = []
    if s.sampling != "poisson":
        bad.append("config key 'server.sampling': dp-fedavg needs \"poisson\" (its accounting assumes Poisson sampling)")
    if c.weighting != "uniform":
        bad.append("config key 'client.weighting': dp-fedavg needs \"uniform\" (example weights would raise the sensitivity)")
    if not _is("aggregator", s.aggregator.name, "server.aggregator", Mean) or s.aggregator.params.get("denominator") != "expected":
        bad.append("config key 'server.aggregator': dp-fedavg needs {name = \"mean\", denominator = \"expected\"} "
                   "(the fixed denominator qN)")
    if s.pre_aggregators or s.group_size:
        bad.append("config key 'server.pre_aggregators': dp-fedavg's sensitivity analysis covers the plain mean only")
    client_roles, server_roles = stage_roles(cfg, "client"), stage_roles(cfg, "server")  # declared, not matched by name
    clips = [DPRole.CLIP in r for r in client_roles]
    shares = [DPRole.SHARE in r for r in client_roles]
    ring = any(DPRole.RING_SHARE in r for r in client_roles)
    if not any(clips):
        bad.append("config key 'client.pipeline': dp-fedavg needs a clipping stage ('clip' or 'adaptive-clip')")
    noise_c = any(shares)
    noise_s = any(DPRole.CENTRAL_NOISE in r for r in server_roles)
    if not (noise_c or noise_s):
        bad.append("config key 'server.stages': dp-fedavg needs noise: 'central-gaussian' in server.stages "
                   "or 'gaussian-share' in client.pipeline")
    if noise_c:
        i = shares.index(True)
        if any(clips) and not any(clips[:i]):
            bad.append("config key 'client.pipeline': put the clipping stage before the noise stage")
        if sum(shares) > 1:
            bad.append("config key 'client.pipeline': one distributed noise stage ('gaussian-share' or 'ddgauss')")
        sums_ring = getattr(registry.resolve("secure_sum", s.secure_sum.name, "server.secure_sum"), "sums_ring_inputs", False)
        if ring and not sums_ring:
            bad.append(f"config key 'server.secure_sum': 'ddgauss' needs \"secagg+\" (got '{s.secure_sum.name}'); "
                       "it hands ring elements to the secure sum")
        if ring and noise_s:
            bad.append("config key 'server.stages': 'ddgauss' already adds the noise; drop 'central-gaussian'")
    adaptive_s = any(DPRole.ADAPTIVE in r for r in server_roles)
    adaptive_c = any(DPRole.ADAPTIVE in r for r in client_roles)
    if adaptive_s != adaptive_c:
        bad.append("config key 'server.stages': adaptive clipping needs 'adaptive-clip' in both client.pipeline and server.stages")
    return bad


def validate_dpfedavg_config(cfg: Any) -> str:
    """Refuse configs whose accounting would not hold (every violation in one line); the noise placement."""
    bad = dpfedavg_violations(cfg)
    if bad:
        raise ConfigError("; ".join(bad))
    return "distributed" if any(DPRole.SHARE in r for r in stage_roles(cfg, "client")) else "central"


class DPSGDGuard:
    """Budget and accountant of sample-level DP-SGD on the clients.

    The noise multiplier is the trainer's (``client.trainer.noise_multiplier``) or
    calibrated from this guard's epsilon for run.rounds, assuming every client trains
    every round (:func:`defenses.privacy.dpsgd.resolve_noise_multiplier`): one z for every
    client (``calibration = "shared"``, the worst plan's), or each client's own
    (``"per-client"``). Each round charges every client of the cohort (dropped ones too)
    K_i steps at rate q_i with its z_i.
    """

    mechanism = "dp-sgd"  # the ledger's name of what it charges
    #: secfed.needs: a trainer that clips per example and adds noise (``private = True``, DP-SGD or a subclass)
    needs = Need.PRIVATE_TRAINER

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, accountant: str = "rdp",
                 batch_size: int = 16, local_epochs: int = 1, local_steps: int = 0,
                 record_sample_rate: float | None = None, calibration: str = "shared") -> None:
        _check_common(epsilon, delta, accountant)
        self.calibration = check_calibration(calibration)
        self.budget, self.delta, self.accountant = epsilon, float(delta), accountant
        self.batch_size, self.local_epochs, self.local_steps = batch_size, local_epochs, local_steps
        self.record_sample_rate = record_sample_rate
        self.z: float | None = None  # the shared z (None before the first round and under per-client calibration)
        self.z_of: dict[int, float] = {}  # client id -> z_i
        self.histories: dict[int, list[tuple[float, float, int]]] = {}
        self._eps: dict[int, float] = {}
        self._next: dict[int, float] = {}
        self._plan: dict[int, tuple[float, int]] = {}

    def validate_config(self, cfg: Any) -> None:
        """Called by the engine at build time (and on the first round): refusals that need the whole config."""
        refuse_seeded_noise(cfg)
        bad = plan_mismatch(self, cfg.client)
        if bad:
            k, mine, real = bad
            raise ConfigError(f"config key 'server.privacy': accounts for {k} = {mine}, the clients train with "
                              f"client.{k} = {real}")
        trainer = cfg.client.trainer.params
        for k in PLAN_KEYS:
            v = getattr(self, k)
            if k in trainer and trainer[k] != v:
                raise ConfigError(f"config key 'client.trainer.{k}': {trainer[k]} differs from client.{k} = {v}, "
                                  "which server.privacy accounts for")

    def _setup(self, ctx: RoundContext) -> None:
        task = ctx.task
        if task is None:
            raise ConfigError(f"config key '{KEY}': dp-sgd needs the task (shard sizes) to account")
        if not self.z_of:
            self.validate_config(task.cfg)
            if not trainer_is_private(task.cfg):
                raise ConfigError("config key 'client.trainer': server.privacy = \"dp-sgd\" needs client.trainer = \"dp-sgd\"")
            zs = noise_multipliers(task.cfg, [len(s) for s in task.shards])
            if not all(z > 0 for z in zs):
                raise ConfigError("config key 'client.trainer.noise_multiplier': must be > 0 for a privacy guarantee")
            self.z_of = dict(enumerate(zs))
            self.z = zs[0] if zs and self.calibration == "shared" else None

    def check(self, ctx: RoundContext) -> None:
        self._setup(ctx)
        self._plan = {cid: client_plan(len(ctx.task.shards[cid]), self.batch_size, self.local_epochs, self.local_steps,
                                       self.record_sample_rate) for cid in ctx.cohort}
        self._next = {cid: epsilon(self.histories.get(cid, []) + [(self.z_of[cid], q, k)], self.delta, self.accountant)
                      for cid, (q, k) in self._plan.items()}
        worst = max(self._next.values(), default=0.0)
        if self.budget is not None and worst > self.budget * (1 + 1e-9):
            raise BudgetExhausted(f"round {ctx.round} would bring epsilon to {worst:.4g} > budget {self.budget:g} "
                                  f"(delta={self.delta:g}); the model of round {ctx.round - 1} is the last within budget")

    def record(self, ctx: RoundContext) -> dict[str, Any]:
        if not self._plan:
            self.check(ctx)
        for cid, (q, k) in self._plan.items():
            self.histories.setdefault(cid, []).append((self.z_of[cid], q, k))
            self._eps[cid] = self._next[cid]
        # shared: [q_i, K_i] under the entry's z; per-client: [q_i, K_i, z_i] (z = None)
        clients = {str(cid): [q, k] if self.z is not None else [q, k, self.z_of[cid]] for cid, (q, k) in self._plan.items()}
        self._plan, self._next = {}, {}
        return {"mechanism": self.mechanism, "accountant": self.accountant, "z": self.z, "clients": clients,
                "delta": self.delta, "epsilon": self.epsilon(), "adversary": self.ADVERSARY,
                "epsilon_vs_server": self.epsilon()}

    # Poisson batches are drawn inside the client from the OS CSPRNG, so the server learns them no
    # more than an outsider: the same epsilon holds against both.
    ADVERSARY = "anyone seeing a client's updates (the server included) or the released models"

    def describe(self) -> dict[str, Any]:
        out = {"epsilon_adversary": self.ADVERSARY, "epsilon_vs_server": self.epsilon(),
               "epsilon_vs_server_note": "per record; the server sees each update but not the secret Poisson batches"}
        if self.calibration == "per-client":
            zs = sorted(set(self.z_of.values()))
            out["noise_multiplier"] = ("each organisation's own z_i, " + (f"{zs[0]:.4g} to {zs[-1]:.4g}" if zs else
                                                                         "calibrated at the first round"))
        return out

    def load(self, entries: list[dict[str, Any]]) -> None:
        self.histories = {}
        for e in entries:
            if e.get("mechanism") != self.mechanism:
                raise CheckpointError(f"privacy ledger: entry {e.get('seq')} is for mechanism {e.get('mechanism')!r}, "
                                      f"this run uses {self.mechanism!r}")
            for cid, plan in e["clients"].items():
                q, k, z = (plan[0], plan[1], plan[2] if len(plan) == 3 else e["z"])
                self.histories.setdefault(int(cid), []).append((float(z), float(q), int(k)))
        self._eps = {cid: epsilon(h, self.delta, self.accountant) for cid, h in self.histories.items()}

    def epsilon(self) -> float:
        return max(self._eps.values(), default=0.0)
