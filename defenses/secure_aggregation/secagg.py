"""``SecAggPlus``: the engine's SecureSum by masking (Bonawitz et al. 2017; Bell et al. 2020).

Config (``server.secure_sum = {name = "secagg+", ...}``)::

    clip_range          R: every coordinate of a client's update must lie in [-R, R]
                        (default 1.0); a client outside is told so and left out of the
                        round, never clipped (Flower clips silently to +-8).
    bits                quantisation bits q, or "auto" (the most that fit a 32-bit ring
                        if that is at least 24, else min(64 - headroom, 32) in a 64-bit ring).
    max_weight          bound on a client's integer aggregation weight (examples for
                        FedAvg; use 1 with client.weighting = "uniform").
    threshold           t as a fraction of the k + 1 shares; at least a strict majority
                        (< 0.5 is refused).
    degree              "auto" (Bell et al. parameters), "complete", or k.
    corrupt_fraction    gamma assumed for the auto degree (default 0.05).
    dropout_fraction    delta assumed for the auto degree (default 0.1).
    failure_probability bound on a round failing to recover with delta dropouts (1e-6).
    security_bits       sigma: P[corrupt neighbours hold t shares] <= 2^-sigma (>= 40).
    active              true (default): the actively secure variant (:mod:`.active`):
                        identities on a roster, signed keys, a signed consistency round
                        before unmasking (measured cost with Ed25519 identities: client time
                        x1.16, bytes x1.001, benchmarks/results/secagg.json; P-384 node keys
                        cost more per signature). false: the semi-honest variant.
    roster              active, real SuperNodes: a folder of the public keys the operator
                        registered for the nodes (``<id>.pub`` / ``client-<id>.pub``) or a
                        file of ``<id> <OpenSSH public key>`` lines (:func:`.identity.load_roster`);
                        each node signs with its own key (node config ``identity-key=PATH``).
                        Without it, keys are generated per client: a simulation only
                        (in-process runs and Flower simulations).

The in-process run passes the real bytes of every message between
:class:`~.protocol.SecAggClient` objects and a :class:`~.protocol.SecAggServer`; the
server side only reads those bytes, all of which land in ``SumResult.transcript``.
``ctx.dropouts`` drops clients at "advertise", "share", "masked_input" or "unmask".
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from secfed.errors import ConfigError, MalformedMessage, RoundAborted
from secfed.interfaces import ClientUpdate, RoundContext, SumResult, WireMessage, derive_seed
from secfed.needs import Need
from secfed.rounds import InProcessTransport, Session, drive, failure_reason, round_info

from . import messages as msg
from .graph import choose_degree, graph_digest, neighbour_graph, security_ok, threshold_for
from .prg import MaskExpander
from .active import ActiveSecAggClient, ActiveSecAggServer
from .identity import Identities, RosterIdentities, load_private_key, load_roster
from .protocol import SecAggClient, SecAggServer
from .quantize import OUT_OF_RANGE, Quantizer, Workspace, choose_bits

_KEY = "server.secure_sum"


def ring_codec(updates: list[ClientUpdate]) -> Any:
    """ddgauss: the codec shared by every update's ring elements (``update.ring``), None when no update has them."""
    rings = [getattr(u, "ring", None) for u in updates]
    if all(r is None for r in rings):
        return None
    if any(r is None for r in rings) or len({id(r.codec) for r in rings}) != 1:
        raise ConfigError("config key 'client.pipeline': some clients encoded into the ring (ddgauss) and others did "
                          "not, or with other parameters; every client must run the same pipeline")
    codec = rings[0].codec
    if any(r.values.shape != (codec.ring_dim,) for r in rings):
        raise ConfigError("config key 'client.pipeline': a ddgauss ring vector has the wrong length")
    return codec


class SecAggPlus:
    """Secure sum by pairwise + self masks with Shamir dropout recovery; actively secure by default (``active``)."""

    name = "secagg+"
    reveals = Need.SUM  # secfed.needs: the server learns the sum only
    sums_ring_inputs = True  # a client stage may hand it ring elements it encoded itself (ddgauss, update.ring)
    transport_factory = InProcessTransport  # tests only: secfed.rounds.tampering_transport

    def __init__(self, clip_range: float = 1.0, bits: int | str = "auto", max_weight: int = 65536,
                 threshold: float = 0.5, degree: int | str = "auto", corrupt_fraction: float = 0.05,
                 dropout_fraction: float = 0.1, failure_probability: float = 1e-6, security_bits: int = 40,
                 min_clients: int = 1, active: bool = True, num_clients: int = 0, roster: str | None = None) -> None:
        if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range > 0):
            raise ConfigError(f"config key '{_KEY}.clip_range': must be a positive number, got {clip_range!r}")
        if bits != "auto" and not (isinstance(bits, int) and 2 <= bits <= 62):
            raise ConfigError(f"config key '{_KEY}.bits': 'auto' or an integer in [2, 62], got {bits!r}")
        if not (isinstance(max_weight, int) and max_weight >= 1):
            raise ConfigError(f"config key '{_KEY}.max_weight': a positive integer, got {max_weight!r}")
        if not (isinstance(threshold, (int, float)) and 0.5 <= threshold <= 1):
            raise ConfigError(f"config key '{_KEY}.threshold': {threshold!r} is below the security bound; t must be a "
                              "strict majority of the shares (a fraction in [0.5, 1]; Bonawitz et al. 2017)")
        if not (degree in ("auto", "complete") or (isinstance(degree, int) and degree >= 2)):
            raise ConfigError(f"config key '{_KEY}.degree': 'auto', 'complete' or an integer >= 2, got {degree!r}")
        for key, v in (("corrupt_fraction", corrupt_fraction), ("dropout_fraction", dropout_fraction)):
            if not (isinstance(v, (int, float)) and 0 <= v < 0.5):
                raise ConfigError(f"config key '{_KEY}.{key}': a fraction in [0, 0.5), got {v!r}")
        if not (isinstance(failure_probability, (int, float)) and 0 < failure_probability <= 0.01):
            raise ConfigError(f"config key '{_KEY}.failure_probability': in (0, 0.01], got {failure_probability!r}")
        if not (isinstance(security_bits, int) and security_bits >= 40):
            raise ConfigError(f"config key '{_KEY}.security_bits': at least 40 (statistical security 2^-40), got {security_bits!r}")
        if not isinstance(active, bool):
            raise ConfigError(f"config key '{_KEY}.active': true or false, got {active!r}")
        if roster is not None and not (isinstance(roster, str) and roster and active):
            raise ConfigError(f"config key '{_KEY}.roster': a path (folder or file of public keys), and only with "
                              f"active = true; got {roster!r}")
        self.active, self.roster = active, roster
        # deployment: the operator's roster of registered node keys, no private key here (a node adds its own);
        # simulation: one Ed25519 key per client, fixed for the run (a Flower simulation shares them with its nodes)
        self.identities: Identities | RosterIdentities | None = (
            RosterIdentities(load_roster(roster)) if roster else Identities(num_clients) if active else None)
        self.clip_range, self.bits, self.max_weight = float(clip_range), bits, max_weight
        self.threshold, self.degree = float(threshold), degree
        self.corrupt_fraction, self.dropout_fraction = float(corrupt_fraction), float(dropout_fraction)
        self.failure_probability, self.security_bits = float(failure_probability), security_bits
        self.min_clients = int(min_clients)  # server.min_clients (engine-provided)

    # ------------------------------------------------------------------ parameters
    def parameters(self, n: int) -> tuple[int, int]:
        """(k, t) for a cohort of n: neighbours per client and the Shamir threshold over k + 1 shares."""
        if n <= 2:
            k = max(n - 1, 0)
            return k, k + 1
        if self.degree == "auto":
            return choose_degree(n, self.corrupt_fraction, self.dropout_fraction, self.failure_probability,
                                 self.security_bits, self.threshold)
        k = n - 1 if self.degree == "complete" else min(int(self.degree), n - 1)
        if k < n - 1 and k % 2 and n % 2:
            k += 1  # the Harary graph H(k, n) needs k or n even
        t = threshold_for(k, self.threshold)
        if k < n - 1 and not security_ok(n, k, t, self.corrupt_fraction, self.security_bits):
            raise ConfigError(f"config key '{_KEY}.degree': k = {k} neighbours with t = {t} for {n} clients does not give "
                              f"2^-{self.security_bits} security against a {self.corrupt_fraction} corrupt fraction; "
                              "use 'auto' or a larger degree")
        return k, t

    def min_sum(self, override: int | None = None) -> int:
        """The fewest clients whose sum this secure sum releases: max(2, server.min_clients), or a group's size."""
        return max(2, self.min_clients, override or 0)

    @property
    def needs_keys(self) -> bool:
        """Active without a roster: the identities are generated, so a Flower run needs them handed out (simulation)."""
        return self.active and self.roster is None

    def use_keys(self, private_keys: dict[int, bytes]) -> None:
        """Simulation over Flower: the ServerApp and every simulated node sign with the same generated keys."""
        if self.needs_keys:
            self.identities = Identities.from_private_bytes(private_keys)

    def simulation_keys(self) -> dict[int, bytes]:
        """Fresh Ed25519 keys for every client of a simulation (raw private bytes; simulation only)."""
        return Identities(self.identities.num_clients).private_bytes() if self.needs_keys else {}

    def use_node_identity(self, path: str | None, client_id: int) -> None:
        """A real SuperNode: sign as ``client_id`` with its own key (node config ``identity-key``), which must be
        that client's entry on ``roster``. One ConfigError line when the key or the roster is missing."""
        if not self.active:
            return
        if self.roster is None:
            raise ConfigError(f"config key '{_KEY}.roster' is required for active secagg+ on real SuperNodes: the "
                              "public keys the operator registered for the nodes (docs/secagg.md); or set active = false")
        if not path:
            raise ConfigError("node config 'identity-key' is required for active secagg+: the path of this node's "
                              "private key (the file given to --auth-supernode-private-key)")
        ids = self.identities  # a RosterIdentities: built from ``roster`` in __init__
        if getattr(self, "_identity_path", None) != (path, client_id) and isinstance(ids, RosterIdentities):
            ids.use_own(client_id, load_private_key(path), f"node config 'identity-key' ({path})")
            self._identity_path = (path, client_id)

    #: Tests only: a seed that pins the neighbour graph (None: fresh OS randomness every round).
    graph_seed: int | None = None

    def draw_graph(self, ids: list[int], k: int) -> dict[int, set[int]]:
        """The round's neighbour graph over the fixed cohort ``ids``: fresh OS randomness (finding 8)."""
        gen = None if self.graph_seed is None else torch.Generator().manual_seed(self.graph_seed)
        return neighbour_graph(ids, k, gen)

    # ------------------------------------------------------------------ client side
    def client_session(self, client_id: int, round_: int, seed: int, delta: torch.Tensor, weight: float,
                       workspace: Workspace | None = None) -> "SecAggClientSession":
        """Client ``client_id``'s side of this round, holding its update (it never leaves the client unmasked)."""
        identity = roster = None
        if self.active:
            identity, roster = self.identities.key(client_id), self.identities.roster(self.identities.ids())
        return SecAggClientSession(client_id, round_, seed, delta.detach().to(torch.float32).numpy(), float(weight),
                                   self.clip_range, self.max_weight, self.active, identity, roster, workspace)

    def restore_session(self, state: dict) -> "SecAggClientSession":
        """A client side that :meth:`SecAggClientSession.to_state` saved (a node between two messages)."""
        identity = roster = None
        if self.active:
            me = int(state["client"])
            identity, roster = self.identities.key(me), self.identities.roster(self.identities.ids())
        return SecAggClientSession.from_state(state, self.clip_range, self.max_weight, self.active, identity, roster)

    # ------------------------------------------------------------------ one round
    def aggregate(self, updates: list[ClientUpdate], ctx: RoundContext, min_sum: int | None = None) -> SumResult:
        """In-process: every client's side is an object here; the session runs over :class:`InProcessTransport`."""
        d = ctx.spec.numel
        if isinstance(self.identities, RosterIdentities):
            raise ConfigError(f"config key '{_KEY}.roster': the nodes' own keys sign on real SuperNodes "
                              "(deploy.transport = 'flower'); an in-process run generates keys per client: drop the roster")
        if self.active:
            self.identities.ids([u.client_id for u in updates])  # every roster member has its key before the round
        workspace = Workspace(d, choose_bits(max(len(updates), 1), self.max_weight, self.bits)[1])
        clients = {u.client_id: self.client_session(u.client_id, ctx.round, ctx.seed, u.delta, u.weight, workspace)
                   for u in updates}  # the in-process clients run one after another and share buffers
        codec = ring_codec(updates)  # ddgauss: clients encoded into the ring themselves, no second quantisation
        if codec is not None:
            for u in updates:
                clients[u.client_id].use_ring(u.ring.values)
        transport = self.transport_factory(clients)  # InProcessTransport (tests: secfed.rounds.tampering_transport)
        result = drive(self.serve({u: c.reason for u, c in clients.items()}, ctx, min_sum, codec), transport, ctx)
        result.metrics["secagg_client_seconds"] = transport.client_seconds / max(len(clients), 1)
        return result

    def serve(self, candidates: dict[int, str], ctx: RoundContext, min_sum: int | None = None,
              codec: Any = None) -> Session:
        """The server's side of one round, as a protocol session (:mod:`secfed.rounds`) over any transport.

        ``candidates``: each client that trained -> ``''`` if its update can be encoded, else the
        (one fixed) reason it cannot. ``codec``: the ddgauss ring codec the clients encoded with; by default
        the round's (``round_info(ctx).ddgauss_codec``: set by the ddgauss stage where it ran, over Flower by
        the server's own run of the pipeline), None without ddgauss. Steps: advertise, share, masked_input,
        [consistency], unmask.
        """
        d = ctx.spec.numel
        need = self.min_sum(min_sum)
        dropped: dict[int, str] = {}
        transcript: list[WireMessage] = []
        bytes_up: dict[int, int] = {}
        bytes_down: dict[int, int] = {}
        clock = {"server": 0.0, "since": time.perf_counter()}

        def step(name: str, outgoing: dict[int, bytes], server_fn):
            send = {}
            for u in sorted(outgoing):
                if ctx.dropouts.drops(u, name):
                    dropped[u] = f"dropped at secagg+ {name}"
                else:
                    send[u] = outgoing[u]
                    bytes_down[u] = bytes_down.get(u, 0) + len(outgoing[u])
            clock["server"] += time.perf_counter() - clock["since"]
            replies, failed = yield name, send
            clock["since"] = time.perf_counter()
            for u, why in failed.items():
                dropped[u] = failure_reason(name, why, "secagg+")
            for u in sorted(replies):
                payload = replies[u]
                transcript.append(WireMessage(u, name, payload))
                bytes_up[u] = bytes_up.get(u, 0) + len(payload)
                try:
                    server_fn(u, payload)
                except MalformedMessage as e:
                    dropped[u] = f"malformed: {e}"

        q, b = choose_bits(max(len(candidates), 1), self.max_weight, self.bits)
        codec = codec if codec is not None else round_info(ctx).ddgauss_codec
        if codec is not None:  # ddgauss: the clients' ring and dimension (rotation padding), see ring_codec
            q, b, d = codec.bits, codec.ring_bits, codec.ring_dim - 1
        quant = Quantizer(self.clip_range, q, b)
        out_of_range = 0
        for u, reason in candidates.items():  # whatever a client said, the server keeps one bit (finding 7)
            if reason:
                dropped[u] = f"out of quantisation range: {OUT_OF_RANGE}"
                out_of_range += 1
        for u in sorted(candidates):  # deployment: a client the operator did not register (a Sybil) takes no part
            if isinstance(self.identities, RosterIdentities) and not self.identities.on_roster(u):
                dropped[u] = "not on the secagg+ roster"
        ids = sorted(u for u, reason in candidates.items() if not reason and u not in dropped)
        if len(ids) < need:  # a "sum" of one update is the update itself (review finding 5)
            raise RoundAborted(f"secagg+: {len(ids)} client(s) could take part, this secure sum needs at least {need}")
        k, t = self.parameters(len(ids))
        graph = self.draw_graph(ids, k)  # fresh OS randomness once the cohort is fixed (review finding 8)
        setups = {u: msg.Setup(t, q, b, self.clip_range, d, sorted(graph[u])) for u in ids}
        if self.active:  # the roster is fixed before the round and held by every client
            roster = self.identities.roster(self.identities.ids(ids))
            server: SecAggServer = ActiveSecAggServer(ctx.round, graph, setups, b, d, t, roster=roster)
        else:
            server = SecAggServer(ctx.round, graph, setups, b, d, t)
        yield from step("advertise", server.setup_messages(), server.receive_advertise)
        yield from step("share", server.keys_messages(), server.receive_shares)
        yield from step("masked_input", server.forward_messages(), server.receive_masked)
        survivors = set(server.masked)
        if len(survivors) < need:  # never unmask a sum of fewer clients (review finding 5)
            raise RoundAborted(f"secagg+: {len(survivors)} masked input(s) arrived, this secure sum needs at least {need}")
        before = set(dropped)  # later dropouts are in U3: their input is in the sum already
        if self.active:
            yield from step("consistency", server.consistency_messages(), server.receive_consistency)
            asked = server.signature_messages()
        else:
            asked = server.survivor_messages()
        yield from step("unmask", asked, server.receive_unmask)
        late = {u: dropped.pop(u) for u in set(dropped) - before}
        acc = server.unmask_sum(MaskExpander(d + 1, b))
        total, total_weight = codec.decode(acc) if codec is not None else quant.decode(acc)  # ddgauss
        clock["server"] += time.perf_counter() - clock["since"]
        metrics: dict[str, Any] = {
            "secagg_graph_sha256": graph_digest(graph),
            "secagg_active": self.active, "secagg_ring_input": "ddgauss" if codec is not None else "quantised", "secagg_degree": k, "secagg_threshold": t, "secagg_bits": q, "secagg_ring_bits": b,
            "secagg_out_of_range": out_of_range, "secagg_unmask_dropouts": len(late),
            "secagg_server_seconds": clock["server"],
        }
        return SumResult(client_ids=sorted(survivors), total=torch.from_numpy(total.astype(np.float32)),
                         total_weight=float(total_weight), updates=None, dropped=dropped, bytes_up=bytes_up,
                         bytes_down=bytes_down, transcript=transcript, metrics=metrics)


class SecAggClientSession:
    """One client's side of one SecAgg+ round: its update, its protocol object, one method per step.

    ``reason`` is ``''`` when the update fits the quantisation range, else the one fixed
    string :data:`~.quantize.OUT_OF_RANGE` (never its magnitude, review finding 7). The
    masked input quantises with the round's seeded stochastic rounding
    (``derive_seed(seed, round, client, "secagg-quantize")``) and the SETUP's parameters.
    """

    STEPS = ("advertise", "share", "masked_input", "consistency", "unmask")

    def __init__(self, client_id: int, round_: int, seed: int, delta: np.ndarray, weight: float, clip_range: float,
                 max_weight: int, active: bool, identity: Any = None, roster: dict[int, bytes] | None = None,
                 workspace: Workspace | None = None, reason: str | None = None) -> None:
        self.client_id, self.round, self.seed = client_id, round_, seed
        self.delta, self.weight, self.active, self.workspace = delta, weight, active, workspace
        if reason is None:
            reason = OUT_OF_RANGE if Quantizer(clip_range, 16, 32).check(delta, weight, max_weight) else ""
        self.reason = reason
        if active:
            self.protocol: SecAggClient = ActiveSecAggClient(client_id, round_, identity=identity, roster=roster or {})
        else:
            self.protocol = SecAggClient(client_id, round_)

    def handle(self, step: str, payload: bytes) -> bytes:
        c = self.protocol
        if step not in self.STEPS or (step == "consistency" and not self.active):
            raise MalformedMessage(f"secagg: unknown step {step[:16]!r}")
        if self.reason:
            raise MalformedMessage("secagg: this client's update is out of range; it takes no part")
        if step != "advertise" and c.c_sk is None:
            raise MalformedMessage(f"secagg: {step} before advertise")
        if step == "advertise":
            if c.c_sk is not None:
                raise MalformedMessage("secagg: advertise twice in one round")
            c.receive_setup(payload)
            return c.advertise_keys()
        if step == "share":
            return c.share_keys(payload)
        if step == "masked_input" and self.ring is not None:  # ddgauss: ring elements the client encoded itself
            if self.ring.size != c.setup.dim + 1:
                raise MalformedMessage(f"secagg: SETUP dimension {c.setup.dim} != this client's ring input")
            return c.masked_input(payload, self.ring, MaskExpander(c.setup.dim + 1, c.setup.ring_bits))
        if step == "masked_input":
            s = c.setup
            if self.delta.size != s.dim:
                raise MalformedMessage(f"secagg: SETUP dimension {s.dim} != this client's update ({self.delta.size})")
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.client_id, "secagg-quantize"))
            x = Quantizer(s.clip_range, s.bits, s.ring_bits).encode(self.delta, int(round(self.weight)), gen,
                                                                     self.workspace)
            return c.masked_input(payload, x, MaskExpander(s.dim + 1, s.ring_bits))
        if step == "consistency":
            return c.consistency_check(payload)
        return c.unmasking(payload)

    #: ddgauss: the (d' + 1,) ring vector this client hands over instead of its quantised update
    ring: np.ndarray | None = None

    def use_ring(self, values: np.ndarray) -> None:
        """Take part with ring elements encoded by a client stage (ddgauss); the float update is not used.
        A copy: the masked-input step masks its input in place, and the update's own ring stays as encoded."""
        self.ring, self.reason = np.array(values, copy=True), ""

    @property
    def finished(self) -> bool:
        return self.protocol.unmasked

    # ------------------------------------------------------------------ persistence on a node
    def to_state(self) -> dict:
        """JSON-able: the update, weight and protocol secrets, for the node's own storage between messages."""
        return {"client": self.client_id, "round": self.round, "seed": self.seed, "weight": self.weight,
                "reason": self.reason, "delta": self.delta.astype("<f4").tobytes().hex(),
                "protocol": self.protocol.to_state(),
                **({} if self.ring is None else {"ring": self.ring.astype(self.ring.dtype.newbyteorder("<")).tobytes().hex(),
                                                 "ring_bits": self.ring.dtype.itemsize * 8})}

    @classmethod
    def from_state(cls, d: dict, clip_range: float, max_weight: int, active: bool, identity: Any = None,
                   roster: dict[int, bytes] | None = None) -> "SecAggClientSession":
        delta = np.frombuffer(bytes.fromhex(d["delta"]), dtype="<f4").astype(np.float32)
        s = cls(int(d["client"]), int(d["round"]), int(d["seed"]), delta, float(d["weight"]), clip_range, max_weight,
                active, identity, roster, reason=str(d["reason"]))
        extra = {"identity": identity, "roster": roster or {}} if active else {}
        s.protocol = type(s.protocol).from_state(d["protocol"], **extra)
        if "ring" in d:  # ddgauss: the ring elements the node encoded (uint32 or uint64, little-endian)
            dtype = {32: "<u4", 64: "<u8"}.get(int(d["ring_bits"]))
            raw = bytes.fromhex(d["ring"])
            if dtype is None or len(raw) % (int(d["ring_bits"]) // 8):
                raise MalformedMessage("secagg: the node's saved ring input is unreadable")
            s.use_ring(np.frombuffer(raw, dtype=dtype).astype(dtype[1:]))
        return s
