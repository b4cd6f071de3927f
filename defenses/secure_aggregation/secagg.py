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
    active              false (default): semi-honest server. true: the actively secure
                        variant (:mod:`.active`): Ed25519 identities on a roster, signed
                        keys, a signed consistency round before unmasking (in-process only;
                        the Flower path is issue 21's shared round driver).

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
from secfed.interfaces import ClientUpdate, RoundContext, SumResult, WireMessage

from . import messages as msg
from .graph import choose_degree, graph_digest, neighbour_graph, security_ok, threshold_for
from .prg import MaskExpander
from .active import ActiveSecAggClient, ActiveSecAggServer, Identities
from .protocol import SecAggClient, SecAggServer
from .quantize import Quantizer, Workspace, choose_bits

_KEY = "server.secure_sum"


class SecAggPlus:
    """Secure sum by pairwise + self masks with Shamir dropout recovery (semi-honest server)."""

    name = "secagg+"
    reveals_individual = False

    def __init__(self, clip_range: float = 1.0, bits: int | str = "auto", max_weight: int = 65536,
                 threshold: float = 0.5, degree: int | str = "auto", corrupt_fraction: float = 0.05,
                 dropout_fraction: float = 0.1, failure_probability: float = 1e-6, security_bits: int = 40,
                 min_clients: int = 1, active: bool = False) -> None:
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
        self.active = active
        self.identities = Identities() if active else None  # simulation: one Ed25519 key per client, fixed for the run
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

    #: Tests only: a seed that pins the neighbour graph (None: fresh OS randomness every round).
    graph_seed: int | None = None

    def draw_graph(self, ids: list[int], k: int) -> dict[int, set[int]]:
        """The round's neighbour graph over the fixed cohort ``ids``: fresh OS randomness (finding 8)."""
        gen = None if self.graph_seed is None else torch.Generator().manual_seed(self.graph_seed)
        return neighbour_graph(ids, k, gen)

    # ------------------------------------------------------------------ one round
    def aggregate(self, updates: list[ClientUpdate], ctx: RoundContext, min_sum: int | None = None) -> SumResult:
        d = ctx.spec.numel
        need = self.min_sum(min_sum)
        dropped: dict[int, str] = {}
        transcript: list[WireMessage] = []
        bytes_up: dict[int, int] = {}
        bytes_down: dict[int, int] = {}
        tamper = ctx.state.get("_tamper")
        t_client = t_server = 0.0

        q, b = choose_bits(max(len(updates), 1), self.max_weight, self.bits)
        quant = Quantizer(self.clip_range, q, b)
        inputs: dict[int, tuple[np.ndarray, int]] = {}
        out_of_range = 0
        for u in updates:  # the client checks its own update and is told if it cannot be encoded
            delta = u.delta.detach().to(torch.float32).numpy()
            reason = quant.check(delta, u.weight, self.max_weight)
            if reason is not None:
                dropped[u.client_id] = f"out of quantisation range: {reason}"
                out_of_range += 1
            else:
                inputs[u.client_id] = (delta, int(round(u.weight)))
        ids = sorted(inputs)
        if len(ids) < need:  # a "sum" of one update is the update itself (review finding 5)
            raise RoundAborted(f"secagg+: {len(ids)} client(s) could take part, this secure sum needs at least {need}")
        k, t = self.parameters(len(ids))
        graph = self.draw_graph(ids, k)
        setups = {u: msg.Setup(t, q, b, self.clip_range, d, sorted(graph[u])) for u in ids}
        if self.active:  # the roster is fixed before the round and held by every client
            roster = self.identities.roster(sorted(set(ids) | set(self.identities._sk)))
            server = ActiveSecAggServer(ctx.round, graph, setups, b, d, t, roster=roster)
            clients = {u: ActiveSecAggClient(u, ctx.round, identity=self.identities.key(u), roster=roster) for u in ids}
        else:
            server = SecAggServer(ctx.round, graph, setups, b, d, t)
            clients = {u: SecAggClient(u, ctx.round) for u in ids}
        expander = MaskExpander(d + 1, b)
        workspace = Workspace(d, b)  # the in-process clients run one after another and share buffers

        def down(u: int, payload: bytes) -> bytes:
            bytes_down[u] = bytes_down.get(u, 0) + len(payload)
            return payload

        def up(u: int, step: str, payload: bytes) -> bytes:
            if tamper is not None:
                payload = tamper(u, payload)
            transcript.append(WireMessage(u, step, payload))
            bytes_up[u] = bytes_up.get(u, 0) + len(payload)
            return payload

        def run_step(step: str, outgoing: dict[int, bytes], client_fn, server_fn) -> None:
            nonlocal t_client, t_server
            for u in sorted(outgoing):
                if ctx.dropouts.drops(u, step):
                    dropped[u] = f"dropped at secagg+ {step}"
                    continue
                t0 = time.perf_counter()
                try:
                    payload = client_fn(u, down(u, outgoing[u]))
                except MalformedMessage as e:  # the client refuses what the server sent
                    dropped[u] = f"refused at secagg+ {step}: {e}"
                    continue
                t1 = time.perf_counter()
                t_client += t1 - t0
                try:
                    server_fn(u, up(u, step, payload))
                except MalformedMessage as e:
                    dropped[u] = f"malformed: {e}"
                t_server += time.perf_counter() - t1

        def timed(fn):
            nonlocal t_server
            t0 = time.perf_counter()
            out = fn()
            t_server += time.perf_counter() - t0
            return out

        def setup_and_advertise(u: int, payload: bytes) -> bytes:
            clients[u].receive_setup(payload)
            return clients[u].advertise_keys()

        def masked(u: int, payload: bytes) -> bytes:
            delta, w = inputs[u]
            x = quant.encode(delta, w, ctx.generator(u, "secagg-quantize"), workspace)
            return clients[u].masked_input(payload, x, expander)

        run_step("advertise", timed(server.setup_messages), setup_and_advertise, server.receive_advertise)
        run_step("share", timed(server.keys_messages), lambda u, p: clients[u].share_keys(p), server.receive_shares)
        run_step("masked_input", timed(server.forward_messages), masked, server.receive_masked)
        survivors = set(server.masked)
        if len(survivors) < need:  # never unmask a sum of fewer clients (review finding 5)
            raise RoundAborted(f"secagg+: {len(survivors)} masked input(s) arrived, this secure sum needs at least {need}")
        before = set(dropped)  # later dropouts are in U3: their input is in the sum already
        if self.active:
            run_step("consistency", timed(server.consistency_messages), lambda u, p: clients[u].consistency_check(p),
                     server.receive_consistency)
            asked = timed(server.signature_messages)
        else:
            asked = timed(server.survivor_messages)
        run_step("unmask", asked, lambda u, p: clients[u].unmasking(p), server.receive_unmask)
        late = {u: dropped.pop(u) for u in set(dropped) - before}  # their input is in the sum already
        acc = timed(lambda: server.unmask_sum(expander))
        total, total_weight = quant.decode(acc)
        metrics: dict[str, Any] = {
            "secagg_graph_sha256": graph_digest(graph),
            "secagg_active": self.active, "secagg_degree": k, "secagg_threshold": t, "secagg_bits": q, "secagg_ring_bits": b,
            "secagg_out_of_range": out_of_range, "secagg_unmask_dropouts": len(late),
            "secagg_client_seconds": t_client / max(len(ids), 1), "secagg_server_seconds": t_server,
        }
        return SumResult(client_ids=sorted(survivors), total=torch.from_numpy(total.astype(np.float32)),
                         total_weight=float(total_weight), updates=None, dropped=dropped, bytes_up=bytes_up,
                         bytes_down=bytes_down, transcript=transcript, metrics=metrics)
