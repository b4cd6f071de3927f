"""The seams of a round (DESIGN.md, "One round, as data flows").

Every stage is one small object with one method. The engine builds a list of them
from the config and never imports ``defenses`` or ``attacks`` itself; a plug-in
is any object with the method below, named in the config as ``"module:Class"`` or
by a short registry name (:mod:`secfed.registry`).

==================  ======================================================  =========================
stage               method                                                  plain implementation
==================  ======================================================  =========================
LocalTrainer        ``train(model, task, data, gen, client_id, used)``      :class:`secfed.training.SGDTrainer`
ClientStage         ``__call__(update, ctx) -> ClientUpdate``               (none; e.g. clipping)
Adversary           ``poison_data`` / ``poison_updates`` / ``evaluate``     (none)
SecureSum           ``aggregate(updates, ctx) -> SumResult``                :class:`secfed.secure_sum.PlainSum`
PreAggregator       ``__call__(X) -> X'``  ((n, d) -> (n, d))               (none)
Aggregator          ``__call__(X, weights=None, **kw) -> (d,)``             :class:`secfed.aggregation.Mean`
ServerStage         ``__call__(aggregate, result, ctx) -> aggregate``       (none; e.g. central DP noise)
PrivacyGuard        ``check / record / load / epsilon``                     (none)
Observer            ``__call__(view, ctx) -> dict | None``                  (none)
ServerAdversary     ``craft(w, spec, task, ctx)``, ``recover(view, ctx)``   (none; a malicious server)
==================  ======================================================  =========================

A trainer appends the example indices of every local step to ``used`` (a list, when
given): the engine's evaluation-only ground truth (:mod:`secfed.truth`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from secfed.needs import Need
from secfed.spec import ParamSpec


@dataclass
class ClientUpdate:
    """What one client produced in a round, before encoding for the wire."""

    client_id: int
    delta: torch.Tensor  # flat float32 (d,), w_i - w_t over the trainable params
    num_examples: int
    weight: float = 1.0  # aggregation weight (examples for FedAvg, 1 for uniform)
    metrics: dict[str, float] = field(default_factory=dict)
    ring: Any = None  # ring elements a client stage encoded itself (DDGauss); a secure sum sums them as they are


@dataclass(frozen=True)
class GroupId:
    """The id of one row of a group-mode ``SumResult`` (robust aggregation over secure group sums).

    Not an ``int``: a group's row can never be read as a client's (``task.client_data(GroupId)``
    fails, :meth:`secfed.truth.GroundTruth.of` resolves it to its members). ``members`` are the
    client ids whose updates the group sum holds (the server formed the groups, so it knows them).
    """

    index: int
    members: tuple[int, ...]

    def __str__(self) -> str:
        return f"group{self.index}"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of tags (stable across processes and versions).

    Only for *simulation* randomness (sampling, partitioning, dropout, noise in
    experiments). Cryptographic randomness never comes from here.
    """
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class DropoutPlan:
    """Fault injection: which clients drop out at which protocol step.

    ``steps`` maps a step name (e.g. ``"train"``, ``"advertise"``, ``"share"``,
    ``"masked_input"``, ``"unmask"``, ``"encrypt"``) to the set of client ids that
    vanish at that step. ``rate`` drops each client independently (seeded) before
    training. The engine and the secure-sum protocols ask :meth:`drops`.
    """

    steps: dict[str, set[int]] = field(default_factory=dict)
    rate: float = 0.0

    def drops(self, client_id: int, step: str) -> bool:
        return client_id in self.steps.get(step, set())


@dataclass
class RoundContext:
    """Everything a stage may know about the current round."""

    round: int
    seed: int
    spec: ParamSpec
    global_weights: torch.Tensor
    cohort: list[int]
    num_clients: int  # population size N
    sample_rate: float | None  # Poisson rate q, or None for a fixed cohort
    expected_cohort: float  # qN for Poisson, k for a fixed cohort
    run_dir: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)  # engine-carried stage state
    dropouts: DropoutPlan = field(default_factory=DropoutPlan)
    task: Any = None  # the Task (server knows the architecture)
    metrics: dict[str, Any] = field(default_factory=dict)  # stages may add round metrics

    def generator(self, *tags: Any) -> torch.Generator:
        """A torch generator seeded from (run seed, round, tags): reproducible, not secret."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.round, *tags))


@dataclass
class WireMessage:
    """One message as the server received it (what an observer may see)."""

    client_id: int
    step: str
    payload: bytes


@dataclass
class SumResult:
    """The server's view after decoding / secure summation.

    ``total`` is sum_i w_i * delta_i over ``client_ids``, ``total_weight`` is sum_i w_i.
    ``updates``/``weights`` hold the individual (n, d) vectors only when the secure
    sum reveals them (plain), or group sums in group mode; otherwise ``None``.
    """

    client_ids: list[int]
    total: torch.Tensor
    total_weight: float
    updates: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    update_ids: list[int | GroupId] | None = None  # client id (or GroupId in group mode) of each row of ``updates``
    dropped: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    transcript: list[WireMessage] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class SecureSum(Protocol):
    """Turns the cohort's updates into what the server learns (a :class:`SumResult`).

    The implementation runs both sides in-process, but its server side must only
    use the bytes the clients sent (recorded in ``SumResult.transcript``).
    """

    name: str
    reveals: Need  # what the server learns (secfed.needs): Need.SUM, or Need.SUM | Need.ROWS for the plain sum

    def aggregate(self, updates: list[ClientUpdate], ctx: RoundContext) -> SumResult: ...


@runtime_checkable
class Aggregator(Protocol):
    """``(n, d)`` updates (and optional ``(n,)`` weights) -> ``(d,)`` aggregate.

    Declares ``needs`` (:class:`secfed.needs.Need`, required): ``Need.ROWS`` needs the
    rows of X, so it cannot run on a secure sum unless group mode is on; without ROWS
    it must implement ``from_sum(total, total_weight, expected_weight)``.
    ``Need.CENTRE``: the engine passes ``center=`` (the previous round's aggregate) and
    stores the new one. ``Need.REFERENCE``: the engine passes ``reference=`` (the
    server's update on its root dataset, FLTrust). See :func:`secfed.needs.call_aggregator`.
    """

    needs: Need

    def __call__(self, X: torch.Tensor, weights: torch.Tensor | None = None, **kw: Any) -> torch.Tensor: ...


class ClientStage(Protocol):
    def __call__(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate: ...


class ServerStage(Protocol):
    def __call__(self, aggregate: torch.Tensor, result: SumResult, ctx: RoundContext) -> torch.Tensor: ...


class PrivacyGuard(Protocol):
    """Privacy accounting hooks. The engine owns the ledger file; the guard owns the maths.

    Order in a round: ``check(ctx)`` before any work (raise BudgetExhausted to stop);
    ``record(ctx) -> dict`` gives the ledger entry, which the engine appends and
    fsyncs *before* the round's model is released or checkpointed; ``load(entries)``
    replays a ledger on resume; ``epsilon()`` reports the spend so far.
    """

    def check(self, ctx: RoundContext) -> None: ...
    def record(self, ctx: RoundContext) -> dict[str, Any]: ...
    def load(self, entries: list[dict[str, Any]]) -> None: ...
    def epsilon(self) -> float: ...


@dataclass
class ServerView:
    """Exactly what the server had after a round (handed to observers)."""

    round: int
    transcript: list[WireMessage]
    updates: torch.Tensor | None  # individual decoded updates if the secure sum revealed them
    update_ids: list[int | GroupId] | None  # client ids; GroupId objects in group mode (never a client's id)
    weights: torch.Tensor | None
    aggregate: torch.Tensor
    global_before: torch.Tensor
    global_after: torch.Tensor
    spec: ParamSpec
    task: Any


class Observer(Protocol):
    def __call__(self, view: ServerView, ctx: RoundContext) -> dict[str, Any] | None: ...


class Adversary(Protocol):
    """Malicious clients. All methods optional except ``malicious``.

    ``malicious(num_clients, seed) -> set[int]``;
    ``poison_data(client_id, data) -> data`` (before local training);
    ``poison_updates(malicious, honest, ctx) -> list[ClientUpdate]`` (after the
    client pipeline, before the secure sum; ``honest`` is empty unless ``needs``
    has ``Need.HONEST_ROWS``, an omniscient attacker); ``evaluate(model, task) -> dict``
    (e.g. backdoor success). ``needs`` (:class:`secfed.needs.Need`) is required.
    """

    needs: Need

    def malicious(self, num_clients: int, seed: int) -> set[int]: ...


class ServerAdversary(Protocol):
    """A malicious server that manipulates the model it ships (``attack.server``; issue 17).

    ``craft(global_w, spec, task, ctx) -> weights`` is what the clients receive this round
    (``ctx.global_weights``: they train from it and their delta is relative to it; return
    ``global_w`` itself in rounds it does not attack). ``recover(view, ctx) -> dict | None``
    reads only the :class:`ServerView` (under a secure sum: the aggregate) and returns
    round-record figures. In a crafted round the engine keeps its own model. Optional:
    ``check(spec, task)`` raises ConfigError, when the run is built, for a model it cannot craft.
    """

    def craft(self, global_w: torch.Tensor, spec: ParamSpec, task: Any, ctx: RoundContext) -> torch.Tensor: ...
    def recover(self, view: "ServerView", ctx: RoundContext) -> dict[str, Any] | None: ...

