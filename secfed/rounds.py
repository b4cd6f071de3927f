"""The round driver every transport shares: a secure sum is a *protocol session*, a transport moves bytes.

A multi-step secure sum (SecAgg+, semi-honest or active) is written once, as a
server-side generator (the session)::

    replies, failed = yield step, {client: bytes to send}   # one step of the protocol
    ...
    return SumResult                                         # what the server learns

and a client-side object per client with ``handle(step, payload) -> bytes``.
:func:`drive` runs a session over a :class:`Transport`, which only delivers each
step's bytes and brings back the replies (or why a client gave none):

* :class:`InProcessTransport`: the clients are objects in this process;
* ``secfed.flower.server.FlowerTransport``: the clients sit behind SuperNodes
  (Flower Grid messages; the node restores its client object from its own state).

So the in-process engine and a Flower run execute the same protocol code, step
for step, and produce the same sum for the same inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Protocol

from secfed.errors import ConfigError, MalformedMessage
from secfed.needs import DPRole, dp_role, is_private

if TYPE_CHECKING:  # this module stays free of torch (a Flower query imports it)
    from secfed.interfaces import RoundContext, SumResult

#: What a session yields (step name, {client: payload}) and is sent back ({client: reply}, {client: reason}).
Step = tuple[str, dict[int, bytes]]
Replies = tuple[dict[int, bytes], dict[int, str]]
Session = Generator[Step, Replies, "SumResult"]


class Transport(Protocol):
    """Moves one step's bytes to the clients and back; knows nothing of the protocol."""

    def exchange(self, step: str, outgoing: dict[int, bytes], ctx: RoundContext) -> Replies: ...


class ClientSession(Protocol):
    """One client's side of one round of a multi-step secure sum."""

    def handle(self, step: str, payload: bytes) -> bytes: ...


def drive(session: Session, transport: Transport, ctx: RoundContext) -> SumResult:
    """Run ``session`` to its result, every step's messages through ``transport``."""
    try:
        step, outgoing = next(session)
        while True:
            step, outgoing = session.send(transport.exchange(step, outgoing, ctx))
    except StopIteration as done:
        return done.value


class InProcessTransport:
    """Clients as objects of this process: ``clients[u].handle(step, payload)``.

    A :class:`~secfed.errors.MalformedMessage` raised by a client is its refusal of
    what the server sent (the reason comes back as its failure). ``tamper(u, reply)``
    is the fault-injection seam of the tests (a client that sends other bytes); tests
    reach it only through :func:`tampering_transport`, never through round state.
    ``client_seconds`` adds up the time spent in the clients.
    """

    def __init__(self, clients: dict[int, ClientSession],
                 tamper: Callable[[int, bytes], bytes] | None = None) -> None:
        self.clients, self.tamper = clients, tamper
        self.client_seconds = 0.0

    def exchange(self, step: str, outgoing: dict[int, bytes], ctx: RoundContext) -> Replies:
        replies: dict[int, bytes] = {}
        failed: dict[int, str] = {}
        for u in sorted(outgoing):
            t0 = time.perf_counter()
            try:
                out = self.clients[u].handle(step, outgoing[u])
            except MalformedMessage as e:
                failed[u] = str(e)
                continue
            finally:
                self.client_seconds += time.perf_counter() - t0
            replies[u] = self.relay(u, out)
        return replies, failed

    def relay(self, u: int, reply: bytes) -> bytes:
        """Client ``u``'s bytes as the server receives them (through ``tamper`` in fault-injection tests)."""
        return self.tamper(u, reply) if self.tamper is not None else reply


def tampering_transport(tamper: Callable[[int, bytes], bytes]) -> Callable[[dict[int, ClientSession]], InProcessTransport]:
    """**Test only**: a transport factory whose deliveries pass through ``tamper(client, reply) -> bytes``.

    In-process secure sums build their transport with their ``transport_factory`` attribute
    (default :class:`InProcessTransport`, no tamper). A fault-injection test sets
    ``secure_sum.transport_factory = tampering_transport(f)`` on the object it built; the
    round context and the engine's state carry no hook.
    """
    return lambda clients: InProcessTransport(clients, tamper)


def failure_reason(step: str, why: str, protocol: str) -> str:
    """How a client's failure at ``step`` reads in ``SumResult.dropped`` (same words on every transport)."""
    return why if why.startswith(("no reply", "malformed")) else f"refused at {protocol} {step}: {why}"


def step_timer() -> dict[str, Any]:
    """A mutable clock a session uses to add up its own (server-side) seconds between yields."""
    return {"seconds": 0.0, "since": time.perf_counter()}


# ============================================================================ the client's round
def plugin_context(cfg: Any, dim: int) -> dict[str, Any]:
    """The context arguments every plug-in may take (the engine and a SuperNode build plug-ins alike)."""
    c, s, n = cfg.client, cfg.server, cfg.data.num_clients
    return dict(num_clients=n, seed=cfg.run.seed, sample_rate=s.sample_rate if s.sampling == "poisson" else None,
                rounds=cfg.run.rounds, local_epochs=c.local_epochs, local_steps=c.local_steps, batch_size=c.batch_size,
                record_sample_rate=c.record_sample_rate,
                lr=c.lr, optimizer=c.optimizer, momentum=c.momentum, weight_decay=c.weight_decay,
                optimizer_state=c.optimizer_state, physical_batch_size=c.physical_batch_size, dim=dim,
                max_update_norm=s.max_update_norm, min_clients=s.min_clients, cohort_size=s.cohort_size or n)


class ClientRound:
    """One client's side of a round, the same object in-process and on a SuperNode.

    ``run(client_id, ctx)``: load the shipped w_t (``ctx.global_weights``), train on the
    client's own data (a malicious client's data may be poisoned first), take the delta,
    run the client pipeline (clip, noise, ...). The adversary's update step and the
    secure sum's encoding follow in the transport's collect (they may span clients).

    ``truth`` (a :class:`secfed.truth.GroundTruth`, the engine's evaluation record, or None):
    when set, the trainer reports each step's example indices (``train(..., used=)``) and they
    are filed there with the data trained on; a SuperNode keeps none (nothing leaves the node).
    """

    def __init__(self, cfg: Any, task: Any, model: Any, spec: Any, trainer: Any, pipeline: list[Any],
                 adversary: Any, malicious: set[int], lora: Any, truth: Any = None) -> None:
        import inspect

        self.cfg, self.task, self.model, self.spec = cfg, task, model, spec
        self.trainer, self.pipeline, self.adversary, self.malicious, self.lora = trainer, pipeline, adversary, malicious, lora
        self.truth = truth
        self.reports_batches = "used" in inspect.signature(trainer.train).parameters  # a plug-in trainer may not

    def local_update(self, client_id: int, ctx: RoundContext) -> Any:
        """Load w_t, train on the client's own shard, return the delta (before the pipeline)."""
        import torch

        from secfed.interfaces import ClientUpdate, derive_seed

        self.spec.assign(self.model, ctx.global_weights)
        data = self.task.client_data(client_id)
        if client_id in self.malicious and hasattr(self.adversary, "poison_data"):
            data = self.adversary.poison_data(client_id, data)
        torch.manual_seed(derive_seed(self.cfg.run.seed, ctx.round, client_id, "torch"))
        gen = ctx.generator(client_id, "batches")
        used: list[Any] | None = [] if self.truth is not None and self.reports_batches else None
        extra = {} if used is None else {"used": used}
        with self.lora.client_view(self.model, client_id):  # lora.client_ranks: train the first r_i components
            metrics = self.trainer.train(self.model, self.task, data, gen, client_id=client_id, **extra)
            self.lora.truncate_after_training(self.model, client_id)
            delta = self.spec.flatten(self.model) - ctx.global_weights
        if used is not None:  # evaluation only (secfed.truth): never in the update, the wire or the record
            self.truth.record(client_id, data, used)
        weight = float(len(data)) if self.cfg.client.weighting == "examples" else 1.0
        return ClientUpdate(client_id, delta, len(data), weight, dict(metrics))

    def run(self, client_id: int, ctx: RoundContext) -> Any:
        """The client's update after its pipeline (what it hands the adversary step and the secure sum)."""
        u = self.local_update(client_id, ctx)
        if ctx.dropouts.drops(client_id, "pipeline"):
            raise RuntimeError("injected crash before the client pipeline")
        for stage in self.pipeline:
            u = stage(u, ctx)
        return u


# ============================================================================ DP parameters of a round
@dataclass(frozen=True)
class Accounted:
    """What the privacy guard charges this round; every DP mechanism checks the values it really uses against it
    (review finding 1)."""

    noise_multiplier: float
    sample_rate: float
    min_clients: int
    expected_cohort: float


@dataclass
class DPRound:
    """This round's DP bookkeeping shared by the guard and the DP stages, typed (the stage order and the
    parameters are checked through these fields, never through an untyped dict)."""

    round: int
    noise_multiplier: float | None = None  # the guard's z (DP-FedAvg)
    accounted: Accounted | None = None  # set by a guard: what it charges
    ddgauss: Any = None  # the guard's ddgauss mechanism (defenses.privacy.ddgauss), when it charges that one
    ddgauss_codec: Any = None  # the round's ddgauss encoder (shared by the clients of the round)
    clip_norm: float | None = None  # C the client pipeline clipped to
    adaptive: bool = False  # adaptive clipping ran on the clients
    unclipped: dict[int, float] = field(default_factory=dict)  # adaptive clipping: b_i of each client
    distributed: bool = False  # a client stage added a distributed noise share
    share_divisor: int | None = None  # the shares' divisor h
    share_min_clients: int | None = None  # the min_clients the shares were sized for
    share_grid_step: float | None = None  # gaussian-share's grid step
    count_noise_std: float | None = None  # adaptive clipping's server half ran (sigma_b)
    noise_added: bool = False  # the central noise stage ran

    def update(self, **values: Any) -> None:
        """Set several fields at once; a name that is not a field is an error (never a new untyped key)."""
        for k, v in values.items():
            if k not in self.__dataclass_fields__:
                raise AttributeError(f"DPRound has no field {k!r}")
            setattr(self, k, v)


def round_info(ctx: RoundContext) -> DPRound:
    """This round's :class:`DPRound` (a fresh one when the round changes; never checkpointed)."""
    info = ctx.state.get("_dp_round")
    if not isinstance(info, DPRound) or info.round != ctx.round:
        info = DPRound(ctx.round)
        ctx.state["_dp_round"] = info
    return info


@dataclass(frozen=True)
class DPRoundParams:
    """The DP parameters the server's guard and stages fixed for one round; every client applies exactly these.

    In-process the stages read them from :func:`round_info`; over Flower they travel in the
    ``train`` message (``secfed.flower.codec.encode_dp``) and the node seeds its own
    :func:`round_info` with them before any noise is drawn (review finding 2).
    """

    noise_multiplier: float | None = None  # z of the client noise stage (gaussian-share), the guard's
    clip_norm: float | None = None  # C the client pipeline clips to
    share_divisor: int | None = None  # n of the distributed noise shares
    distributed: bool = False  # noise placement: shares on the clients
    dpsgd_noise_multiplier: float | None = None  # DP-SGD's z (the guard's calibration over all shards)
    max_grad_norm: float | None = None  # DP-SGD's per-example clip
    dpsgd_per_client: bool = False  # DP-SGD's z calibrated per client: each node computes its own from the config

    KINDS: ClassVar[dict[str, type]] = {"noise_multiplier": float, "clip_norm": float, "share_divisor": int, "distributed": bool,
             "dpsgd_noise_multiplier": float, "max_grad_norm": float, "dpsgd_per_client": bool}

    @classmethod
    def of(cls, values: "DPRoundParams | dict[str, Any] | None") -> "DPRoundParams":
        if isinstance(values, DPRoundParams):
            return values
        return cls(**{k: v for k, v in (values or {}).items() if k in cls.KINDS and v is not None})

    def items(self) -> dict[str, Any]:
        """The set fields (what goes on the wire)."""
        return {k: getattr(self, k) for k in self.KINDS if getattr(self, k) not in (None, False)}

    def __bool__(self) -> bool:
        return bool(self.items())

    def check_applied(self, ctx: RoundContext) -> None:
        """After the pipeline: the clip norm and noise placement the client applied are the server's."""
        info = round_info(ctx)
        for k in ("clip_norm", "share_divisor", "distributed"):
            mine, theirs = getattr(info, k), getattr(self, k)
            mine, theirs = (None if mine is False else mine), (None if theirs is False else theirs)
            same = mine == theirs if not isinstance(mine, float) or theirs is None else math.isclose(mine, theirs,
                                                                                                     rel_tol=1e-9)
            if not same:
                raise ConfigError(f"client.pipeline: this node applied {k} = {mine}, the server's guard "
                                  f"accounts for {theirs}; the node refuses the round")


def round_context(cfg: Any, t: int, cohort: list[int], spec: Any, global_w: Any, state: dict[str, Any], task: Any,
                  run_dir: Any = None) -> "RoundContext":
    """Round ``t``'s context (the engine's and a SuperNode's alike): cohort, expected size, injected dropouts."""
    import torch

    from secfed.interfaces import DropoutPlan, RoundContext, derive_seed

    s, n = cfg.server, cfg.data.num_clients
    expected = s.sample_rate * n if s.sampling == "poisson" else float(min(s.cohort_size or n, n))
    drops = DropoutPlan({k: set(v) for k, v in cfg.faults.dropouts.items()}, cfg.faults.dropout_rate)
    if drops.rate > 0:
        g = torch.Generator().manual_seed(derive_seed(cfg.run.seed, t, "dropout"))
        drops.steps.setdefault("train", set()).update(
            c for c, r in zip(cohort, torch.rand(len(cohort), generator=g).tolist()) if r < drops.rate)
    return RoundContext(round=t, seed=cfg.run.seed, spec=spec, global_weights=global_w, cohort=cohort, num_clients=n,
                        sample_rate=s.sample_rate if s.sampling == "poisson" else None, expected_cohort=expected,
                        run_dir=run_dir, state=state, dropouts=drops, task=task)


#: The DP roles whose presence makes a run DP (their parameters come from the server's guard); plain
#: clipping alone does not (it also serves robustness).
DP_ROLES = DPRole.ADAPTIVE | DPRole.SHARE | DPRole.RING_SHARE | DPRole.CENTRAL_NOISE


def stage_roles(cfg: Any, side: str) -> list[DPRole]:
    """The declared :class:`~secfed.needs.DPRole` of each ``client.pipeline`` (side "client") or ``server.stages``
    (side "server") entry, from the registry-resolved classes (an alias or a subclass plays its class's role)."""
    from secfed import registry

    kind, key, specs = (("client_stage", "client.pipeline", cfg.client.pipeline) if side == "client"
                        else ("server_stage", "server.stages", cfg.server.stages))
    return [dp_role(registry.resolve(kind, p.name, f"{key}[{i}]")) for i, p in enumerate(specs)]


def trainer_is_private(cfg: Any) -> bool:
    """True when ``client.trainer`` resolves to a class that declares ``private = True`` (DP-SGD, any alias)."""
    from secfed import registry

    return is_private(registry.resolve("trainer", cfg.client.trainer.name, "client.trainer"))


def dpsgd_per_client(cfg: Any) -> bool:
    """True when the privacy guard calibrates DP-SGD's z per client (``server.privacy.calibration = "per-client"``;
    the value is checked when the guard is built: :func:`defenses.privacy.dpsgd.check_calibration`)."""
    priv = cfg.server.privacy
    return priv is not None and priv.params.get("calibration") == "per-client"


#: how DP-SGD's noise is spread over clip groups (``client.trainer.group_noise``; :func:`group_noise_scales`)
GROUP_NOISE = ("uniform", "proportional")


def group_noise_scales(shares: list[float], group_noise: str) -> list[float]:
    """Each clip group's noise std as a multiple of z C, for the Gaussian mechanism with multiplier z.

    ``uniform``: 1 for every group (the shares' squares sum to <= 1, so an example's clipped gradient has norm
    <= C: McMahan et al. 2018's per-layer clipping, noise z C). ``proportional``: s_g sqrt(G) for group g of G
    (share s_g, bound c_g = s_g C), any shares. Dividing group g by its std sigma_g = z C s_g sqrt(G) (a fixed
    invertible map: post-processing either way) leaves unit Gaussian noise on a sum whose per-example term has
    norm <= sqrt(sum_g (c_g / sigma_g)^2) = sqrt(G / (z^2 G)) = 1 / z: the Gaussian mechanism with multiplier z, so
    the accountant's z and epsilon hold unchanged. Equal shares 1/sqrt(G) give z C for every group (uniform); with
    unequal shares a group with a large bound (a fresh classifier head) no longer sets the noise of a group with a
    small one (the adapters)."""
    if group_noise == "uniform":
        return [1.0] * len(shares)
    if group_noise == "proportional":
        root = math.sqrt(len(shares))
        return [float(s) * root for s in shares]
    raise ValueError(f"group_noise must be one of {GROUP_NOISE} (got {group_noise!r})")


def pipeline_is_dp(cfg: Any) -> bool:
    """True when a client stage adds DP noise or clips adaptively (its parameters come from the guard)."""
    return any(r & DP_ROLES for r in stage_roles(cfg, "client"))


def run_is_dp(cfg: Any) -> bool:
    """True when the run promises DP: a privacy guard, a noise or adaptive-clip stage, or a private trainer."""
    return (cfg.server.privacy is not None or trainer_is_private(cfg) or pipeline_is_dp(cfg)
            or any(r & DP_ROLES for r in stage_roles(cfg, "server")))


def metrics_stay_on_node(cfg: Any, reveals_rows: bool) -> bool:
    """Review finding 7: under a secure sum or DP no per-client metric leaves a client in the clear
    (and the round record carries no cohort statistic of them), on every transport."""
    return not reveals_rows or run_is_dp(cfg)
