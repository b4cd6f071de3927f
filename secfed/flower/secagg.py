"""secfed's SecAgg+ (``defenses.secure_aggregation``) as Flower messages, not Flower's SecAgg+.

Flower's own ``secaggplus_mod`` derives masks from a 32-bit-seeded
``numpy.random.RandomState`` and clips to +-8; here every step is secfed's
protocol (:class:`~defenses.secure_aggregation.protocol.SecAggClient` /
``SecAggServer``: X25519, HKDF, AES-GCM shares, AES-CTR masks from the full
256-bit secret), and only its validated bytes cross the network.

One round, as Flower messages (``query`` with ``step`` = ...)::

    train         server -> node: w_t; node trains, runs its pipeline, checks the update fits
                  the quantisation range, keeps delta in its Flower ``context.state``; reply: ok / reason
    advertise     SETUP bytes     -> ADVERTISE (two fresh X25519 public keys)
    share         KEYS bytes      -> SHARES (Shamir shares of b_u and s_u^SK, AES-GCM to each neighbour)
    masked_input  FORWARD bytes   -> MASKED (y_u = x_u + PRG(b_u) +- PRG(s_uv), quantised with the
                                     round's seeded stochastic rounding, as in-process)
    unmask        SURVIVORS bytes -> UNMASK (b-shares of survivors, s^SK-shares of the dropped)

The server side mirrors :meth:`SecAggPlus.aggregate` step for step (same graph,
threshold, bits, dropout handling), so a Flower run gives the in-process sum.
A SuperNode's secret keys and shares live in its own ``context.state`` between
messages (Flower keeps it on the node for the run; it never leaves the node).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from secfed.errors import ConfigError, MalformedMessage, RoundAborted
from secfed.flower import codec
from secfed.interfaces import RoundContext, SumResult, WireMessage

STATE = "secfed-secagg"
STEPS = ("advertise", "share", "masked_input", "unmask")


# ============================================================================ node side
def stash_update(state: Any, round_: int, client_id: int, delta: Any, weight: float, secure_sum: Any) -> str:
    """After local training: keep the update on the node; return '' or the reason it cannot be encoded."""
    from flwr.app import ConfigRecord

    from defenses.secure_aggregation.quantize import Quantizer

    x = delta.detach().float().numpy().astype("<f4")
    from defenses.secure_aggregation.quantize import OUT_OF_RANGE

    reason = Quantizer(secure_sum.clip_range, 16, 32).check(x, weight, secure_sum.max_weight)
    state[STATE] = ConfigRecord({"round": round_, "client": client_id, "delta": x.tobytes(), "weight": float(weight),
                                 "protocol": ""})
    return OUT_OF_RANGE if reason else ""  # one bit: never the magnitude or kind (review finding 7)


def _dump(c: Any, setup_payload: bytes) -> str:
    return json.dumps({
        "setup": setup_payload.hex(),
        "c_sk": c.c_sk.private_bytes_raw().hex() if c.c_sk else "", "s_sk": c.s_sk.private_bytes_raw().hex() if c.s_sk else "",
        "keys": {str(v): [a.hex(), b.hex()] for v, (a, b) in c.keys.items()}, "b": c.b.hex(),
        "own_share": list(c.own_share), "held": {str(v): list(y) for v, y in c.held.items()},
    })


def _load(s: str, me: int, round_: int) -> tuple[Any, bytes]:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from defenses.secure_aggregation.protocol import SecAggClient

    d = json.loads(s)
    c = SecAggClient(me, round_)
    setup = bytes.fromhex(d["setup"])
    c.receive_setup(setup)
    c.c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["c_sk"])) if d["c_sk"] else None
    c.s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["s_sk"])) if d["s_sk"] else None
    c.keys = {int(v): (bytes.fromhex(a), bytes.fromhex(b)) for v, (a, b) in d["keys"].items()}
    c.b = bytes.fromhex(d["b"])
    c.own_share = tuple(d["own_share"])
    c.held = {int(v): tuple(y) for v, y in d["held"].items()}
    return c, setup


def node_step(state: Any, rec: Any, client_id: int, seed: int) -> bytes:
    """One SecAgg+ step on the node: the server's bytes in, this client's bytes out."""
    from defenses.secure_aggregation.prg import MaskExpander
    from defenses.secure_aggregation.protocol import SecAggClient
    from defenses.secure_aggregation.quantize import Quantizer
    from secfed.interfaces import derive_seed

    step = codec.get(rec, "step", str, max_len=16)
    t = codec.get(rec, "round", int)
    payload = codec.get(rec, "payload", bytes)
    if step not in STEPS:
        raise MalformedMessage(f"secagg: unknown step {step[:16]!r}")
    if STATE not in state:
        raise MalformedMessage("secagg: no trained update on this node for this round")
    kept = state[STATE]
    if kept["round"] != t or kept["client"] != client_id:
        raise MalformedMessage(f"secagg: step for round {t}, this node trained round {kept['round']}")
    if step == "advertise":
        c = SecAggClient(client_id, t)
        c.receive_setup(payload)
        out, setup = c.advertise_keys(), payload
    else:
        if not kept["protocol"]:
            raise MalformedMessage(f"secagg: {step} before advertise")
        c, setup = _load(kept["protocol"], client_id, t)
        if step == "share":
            out = c.share_keys(payload)
        elif step == "masked_input":
            s = c.setup
            import torch

            delta = np.frombuffer(kept["delta"], dtype="<f4").astype(np.float32)
            if delta.size != s.dim:
                raise MalformedMessage(f"secagg: SETUP dimension {s.dim} != this node's update ({delta.size})")
            quant = Quantizer(s.clip_range, s.bits, s.ring_bits)
            gen = torch.Generator().manual_seed(derive_seed(seed, t, client_id, "secagg-quantize"))
            x = quant.encode(delta, int(round(kept["weight"])), gen)
            out = c.masked_input(payload, x, MaskExpander(s.dim + 1, s.ring_bits))
        else:
            out = c.unmasking(payload)
    kept["protocol"] = _dump(c, setup)
    if step == "unmask":
        del state[STATE]  # the round is over for this node: forget keys, shares and the update
    return out


# ============================================================================ server side
class FlowerSecAgg:
    """The server side of :class:`SecAggPlus` with every client message exchanged over a Flower grid.

    ``exchange(step, {client: bytes}) -> ({client: reply bytes}, {client: reason})`` sends one step's
    messages to the clients' SuperNodes and collects the answers (FlowerEngine provides it).
    """

    name = "secagg+"
    reveals_individual = False

    def __init__(self, secure_sum: Any, exchange: Callable[[str, dict[int, bytes], RoundContext],
                                                           tuple[dict[int, bytes], dict[int, str]]]) -> None:
        if getattr(secure_sum, "active", False):  # never fall back silently to the semi-honest protocol
            raise ConfigError("config key 'server.secure_sum.active': the actively secure SecAgg+ runs in-process "
                              "only for now (its Flower path is issue 21's shared round driver); set active = false "
                              "or deploy.transport = 'inprocess'")
        self.agg = secure_sum
        self.exchange = exchange

    def aggregate(self, received: list[Any], ctx: RoundContext, min_sum: int | None = None) -> SumResult:
        import torch

        from defenses.secure_aggregation.graph import graph_digest
        from defenses.secure_aggregation import messages as msg
        from defenses.secure_aggregation.prg import MaskExpander
        from defenses.secure_aggregation.protocol import SecAggServer
        from defenses.secure_aggregation.quantize import OUT_OF_RANGE, Quantizer, choose_bits

        agg, d = self.agg, ctx.spec.numel
        dropped: dict[int, str] = {}
        transcript: list[WireMessage] = []
        bytes_up: dict[int, int] = {}
        bytes_down: dict[int, int] = {}
        q, b = choose_bits(max(len(received), 1), agg.max_weight, agg.bits)
        quant = Quantizer(agg.clip_range, q, b)
        ids, out_of_range = [], 0
        for r in received:
            if r.reason:  # whatever the node wrote, the server keeps one bit
                dropped[r.client_id] = f"out of quantisation range: {OUT_OF_RANGE}"
                out_of_range += 1
            else:
                ids.append(r.client_id)
        ids.sort()
        need = agg.min_sum(min_sum)
        if len(ids) < need:
            raise RoundAborted(f"secagg+: {len(ids)} client(s) could take part, this secure sum needs at least {need}")
        k, t = agg.parameters(len(ids))
        graph = agg.draw_graph(ids, k)  # fresh OS randomness once the cohort is fixed (review finding 8)
        setups = {u: msg.Setup(t, q, b, agg.clip_range, d, sorted(graph[u])) for u in ids}
        server = SecAggServer(ctx.round, graph, setups, b, d, t)

        def run_step(step: str, outgoing: dict[int, bytes], server_fn: Callable[[int, bytes], None]) -> None:
            send = {}
            for u in sorted(outgoing):
                if ctx.dropouts.drops(u, step):
                    dropped[u] = f"dropped at secagg+ {step}"
                else:
                    send[u] = outgoing[u]
                    bytes_down[u] = bytes_down.get(u, 0) + len(outgoing[u])
            replies, failed = self.exchange(step, send, ctx)
            for u, why in failed.items():
                dropped[u] = why if why.startswith(("no reply", "malformed")) else f"refused at secagg+ {step}: {why}"
            for u in sorted(replies):
                payload = replies[u]
                transcript.append(WireMessage(u, step, payload))
                bytes_up[u] = bytes_up.get(u, 0) + len(payload)
                try:
                    server_fn(u, payload)
                except MalformedMessage as e:
                    dropped[u] = f"malformed: {e}"

        run_step("advertise", server.setup_messages(), server.receive_advertise)
        run_step("share", server.keys_messages(), server.receive_shares)
        run_step("masked_input", server.forward_messages(), server.receive_masked)
        survivors = set(server.masked)
        if len(survivors) < need:  # never unmask a sum of fewer (review finding 5)
            raise RoundAborted(f"secagg+: {len(survivors)} masked input(s) arrived, this secure sum needs at least {need}")
        asked = server.survivor_messages()
        before = set(dropped)
        run_step("unmask", asked, server.receive_unmask)
        late = {u: dropped.pop(u) for u in set(dropped) - before}  # their input is in the sum already
        acc = server.unmask_sum(MaskExpander(d + 1, b))
        total, total_weight = quant.decode(acc)
        metrics: dict[str, Any] = {"secagg_graph_sha256": graph_digest(graph),
                                   "secagg_degree": k, "secagg_threshold": t, "secagg_bits": q, "secagg_ring_bits": b,
                                   "secagg_out_of_range": out_of_range, "secagg_unmask_dropouts": len(late)}
        return SumResult(client_ids=sorted(survivors), total=torch.from_numpy(total.astype(np.float32)),
                         total_weight=float(total_weight), updates=None, dropped=dropped, bytes_up=bytes_up,
                         bytes_down=bytes_down, transcript=transcript, metrics=metrics)
