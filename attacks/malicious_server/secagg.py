"""Malicious-server attacks on SecAgg+, each against the semi-honest and the active variant.

The server here is the attacker: it drives real :class:`~defenses.secure_aggregation.protocol.SecAggClient`
(semi-honest) or :class:`~defenses.secure_aggregation.active.ActiveSecAggClient` objects
with bytes it chooses, and tries to recover one live client's (the target's) encoded
input x_v exactly. Every attack returns an :class:`AttackReport` with ``recovered``
(x_v recovered bit for bit) and what the server learnt (which shares, which refusals).

(a) :func:`inconsistent_views` -- inconsistent survivor views with a minimal FORWARD set
    (the attack Bonawitz et al. CCS 2017 add the consistency round against). The server
    forwards to the target v only t - 1 neighbours' shares (F), so v masks against F
    alone. At unmasking it tells every holder h "v survived, F \\ {h} dropped": from
    those answers it gets t shares of b_v and, for each w in F, t shares of s_w^SK
    from holders other than w. Each client answers the unmask step only once (review
    finding 13) and is never asked for both shares of the *same* client, so that fix
    does not stop it: the two kinds of shares are of different clients (b_v, s_w).
    Then x_v = y_v - PRG(b_v) -+ sum_{w in F} PRG(KA(s_w^SK, s_v^PK)).
    Against the active variant the server must show each holder t signatures of its
    neighbours on the one U3 that holder signed; it tries (1) per-holder views,
    forwarding whatever signatures match, (2) one consistent U3 = all \\ F, and (3)
    filling missing signatures with forgeries.
(b) :func:`forged_keys` -- key substitution (man in the middle) with forged or replayed
    advertisements: v's neighbours' public keys are replaced by keys the server holds,
    so v encrypts every share of b_v and s_v^SK to the server. "forged": fresh keys
    signed with the server's own Ed25519 key; "replayed": a neighbour's genuinely
    signed advertisement from the previous round whose ephemeral keys leaked.
(c) :func:`sybil` -- Sybil clients not on the roster: v's SETUP names only server-run
    clients as neighbours; all shares of v go to the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from defenses.secure_aggregation import active as act
from defenses.secure_aggregation import messages as msg
from defenses.secure_aggregation import shamir
from defenses.secure_aggregation.active import ActiveSecAggClient, Identities
from defenses.secure_aggregation.graph import harary, threshold_for
from defenses.secure_aggregation.prg import MaskExpander
from defenses.secure_aggregation.protocol import (SecAggClient, _pub, decrypt_share, encrypt_share, pair_mask_key,
                                                  self_mask_key, share_key)
from defenses.secure_aggregation.quantize import Quantizer, choose_bits
from secfed.errors import MalformedMessage

VARIANTS = ("semi-honest", "active")


@dataclass
class AttackReport:
    """What a deviating server got out of one attack."""

    attack: str
    variant: str
    recovered: bool  # the target's encoded input, bit for bit
    target: int
    learnt: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================ a cohort
class _Cohort:
    """n honest clients with ids 0..n-1 on H(k, n) (complete if k is None), t a strict majority of k + 1."""

    def __init__(self, variant: str, n: int, d: int, round_: int, seed: int = 0, k: int | None = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        self.variant, self.n, self.d, self.round = variant, n, d, round_
        self.ids = list(range(n))
        self.k = n - 1 if k is None else k
        self.t = threshold_for(self.k, 0.5)
        self.graph = {u: sorted(nb) for u, nb in enumerate(harary(n, self.k))}
        self.q, self.b = choose_bits(n, 1, "auto")
        self.quant = Quantizer(1.0, self.q, self.b)
        rng = np.random.default_rng(seed)
        self.deltas = {u: rng.uniform(-0.5, 0.5, d).astype(np.float32) for u in self.ids}
        self.x = {u: self.quant.encode(self.deltas[u], 1, torch.Generator().manual_seed(seed * 1000 + u)) for u in self.ids}
        self.identities = Identities()
        self.roster = self.identities.roster(self.ids)
        self.expander = MaskExpander(d + 1, self.b)

    def client(self, u: int) -> SecAggClient:
        if self.variant == "active":
            return ActiveSecAggClient(u, self.round, identity=self.identities.key(u), roster=self.roster)
        return SecAggClient(u, self.round)

    def setup(self, u: int, neighbours: list[int], t: int | None = None) -> bytes:
        s = msg.Setup(t or self.t, self.q, self.b, 1.0, self.d, sorted(neighbours))
        return msg.encode_setup(self.round, s)

    def decode_advertise(self, u: int, payload: bytes) -> tuple[bytes, bytes, bytes]:
        if self.variant == "active":
            return act.decode_advertise_signed(payload, round_=self.round, sender=u)
        return (*msg.decode_advertise(payload, round_=self.round, sender=u), b"")

    def keys(self, entries: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
        if self.variant == "active":
            return act.encode_keys_signed(self.round, entries)
        return msg.encode_keys(self.round, {v: (c, s) for v, (c, s, _) in entries.items()})

    def unmask_input(self, y: np.ndarray, v: int, b_v: bytes, s_pk_v: bytes, partners: dict[int, bytes]) -> np.ndarray:
        """y_v - PRG(b_v) -+ PRG(s_vw) for each partner w, given s_vw's key material (s_w^SK or s_v^SK)."""
        acc = np.array(y, copy=True)
        self.expander.add(acc, self_mask_key(b_v, self.round, v), -1)
        for w, key in partners.items():
            self.expander.add(acc, key, -1 if v < w else +1)
        return acc

    def report(self, attack: str, target: int, x_rec: np.ndarray | None, learnt: dict, reason: str) -> AttackReport:
        ok = x_rec is not None and np.array_equal(x_rec, self.x[target])
        if ok:
            learnt["max_abs_error_of_recovered_update"] = float(np.max(np.abs(
                self.quant.decode(x_rec)[0] - self.deltas[target])))
        return AttackReport(attack, self.variant, bool(ok), target, learnt, reason)


def _try(fn, *args):
    """(result, None) or (None, the client's refusal)."""
    try:
        return fn(*args), None
    except MalformedMessage as e:
        return None, str(e)


def _combine(points: list[tuple[int, int]], t: int) -> bytes | None:
    if len(points) < t:
        return None
    try:
        return shamir.combine(points, t)
    except MalformedMessage:
        return None


# ============================================================================ (a)
def _honest_until_masked(co: _Cohort, target: int, forward_to_target: list[int]):
    """Rounds 0-2 with one deviation: the target's FORWARD carries only ``forward_to_target``."""
    clients = {u: co.client(u) for u in co.ids}
    adv = {}
    for u in co.ids:
        clients[u].receive_setup(co.setup(u, co.graph[u]))
        adv[u] = co.decode_advertise(u, clients[u].advertise_keys())
    shares = {}
    for u in co.ids:
        shares[u] = msg.decode_shares(clients[u].share_keys(co.keys({v: adv[v] for v in co.graph[u]})),
                                      round_=co.round, sender=u, allowed=set(co.graph[u]))
    y = {}
    for u in co.ids:
        senders = forward_to_target if u == target else co.graph[u]
        fwd = msg.encode_forward(co.round, {v: shares[v][u] for v in senders})
        y[u] = msg.decode_masked(clients[u].masked_input(fwd, co.x[u].copy(), co.expander), round_=co.round,
                                 sender=u, dim=co.d, ring_bits=co.b)
    return clients, adv, y


def inconsistent_views(variant: str, n: int = 5, d: int = 64, target: int = 0, round_: int = 3,
                       k: int | None = None) -> AttackReport:
    """Attack (a): minimal FORWARD to the target, then "v survived" + "F dropped" to every holder.

    ``k``: neighbours per client on the Harary graph H(k, n) (default: the complete graph).
    """
    strategies = ["per-holder views"] if variant == "semi-honest" else ["per-holder views", "one U3 = all \\ F",
                                                                       "forged signatures"]
    learnt: dict[str, Any] = {}
    best = None
    for strategy in strategies:
        co = _Cohort(variant, n, d, round_, k=k)
        F = co.graph[target][: co.t - 1]
        clients, adv, y = _honest_until_masked(co, target, F)
        holders = [h for h in co.ids if h != target]
        views = {}  # holder -> (alive, dropped) the server wants it to act on
        for h in holders:
            dropped = [w for w in F if w != h and w in co.graph[h]]
            views[h] = ([v for v in co.graph[h] + [h] if v not in dropped], dropped)
        answers: dict[int, dict[int, int]] = {}
        refusals: dict[int, str] = {}
        if variant == "semi-honest":
            for h in holders:
                alive, dropped = views[h]
                out, err = _try(clients[h].unmasking, msg.encode_survivors(co.round, alive, dropped))
                if err:
                    refusals[h] = err
                else:
                    answers[h] = {o: yv for o, (_, yv) in _decode_unmask_any(out, co.round, h).items()}
        else:
            u3_of = {h: sorted(v for v in co.ids if v not in (views[h][1] if strategy != "one U3 = all \\ F" else F))
                     for h in holders}
            sigs: dict[int, tuple[list[int], bytes]] = {}
            for h in holders:
                out, err = _try(clients[h].consistency_check, act.encode_consistency(co.round, u3_of[h]))
                if err:
                    refusals[h] = err
                else:
                    sigs[h] = (u3_of[h], act.decode_consistency_sig(out, round_=co.round, sender=h))
            server_key = Ed25519PrivateKey.generate()
            for h in sorted(sigs):
                hood = set(co.graph[h]) | {h}  # the client accepts signatures of its neighbourhood only
                same = {s: g for s, (u3, g) in sigs.items() if u3 == u3_of[h] and s in hood}
                if strategy == "forged signatures":  # pad with signatures of the other U3 members: forged
                    for s in sorted(set(u3_of[h]) & hood):
                        same.setdefault(s, server_key.sign(act.consistency_statement(co.round, u3_of[h])))
                out, err = _try(clients[h].unmasking, act.encode_signatures(co.round, same))
                if err:
                    refusals[h] = err
                else:
                    answers[h] = _decode_unmask_any(out, co.round, h)
                    answers[h] = {o: yv for o, (_, yv) in answers[h].items()}
            # what the answers are: b-shares for U3 members, s-shares for held \ U3
            views = {h: (u3_of[h], [w for w in F if w not in u3_of[h]]) for h in holders}
        b_pts = [(h + 1, a[target]) for h, a in answers.items() if target in a and target in views[h][0]]
        b_v = _combine(b_pts, co.t)
        partners, s_got = {}, {}
        for w in F:
            pts = [(h + 1, a[w]) for h, a in answers.items() if w in a and w in views[h][1]]
            s_got[w] = len(pts)
            s_w = _combine(pts, co.t)
            if s_w is not None:
                sk = X25519PrivateKey.from_private_bytes(s_w)
                if _pub(sk) == adv[w][1]:
                    partners[w] = pair_mask_key(sk, adv[target][1], co.round, w, target)
        x_rec = None
        if b_v is not None and len(partners) == len(F):
            x_rec = co.unmask_input(y[target], target, b_v, adv[target][1], partners)
        learnt[strategy] = {"forward_set": F, "b_shares_of_target": len(b_pts), "mask_key_shares": s_got,
                            "refusals": len(refusals), "first_refusal": next(iter(refusals.values()), "")}
        rep = co.report("inconsistent_views", target, x_rec, learnt, "")
        if best is None or rep.recovered:
            best = rep
        if rep.recovered:
            break
    best.learnt = learnt
    best.reason = ("target's input recovered from b_v and the mask keys of its minimal FORWARD set" if best.recovered
                   else "too few shares: the holders refused or saw one consistent survivor set")
    return best


def _decode_unmask_any(out: bytes, round_: int, sender: int) -> dict[int, tuple[int, int]]:
    """Parse an UNMASK reply without an expectation (the attacker reads every share it got)."""
    buf = bytes(out)
    n = int.from_bytes(buf[msg.HEADER.size:msg.HEADER.size + 4], "little")
    res = {}
    for i in range(n):
        o, k, y = msg._UNMASK.unpack_from(buf, msg.HEADER.size + 4 + i * msg._UNMASK.size)
        res[o] = (k, shamir.y_from_bytes(y))
    return res


# ============================================================================ (b), (c)
def _steal_all_shares(co: _Cohort, target: int, fake: dict[int, tuple[X25519PrivateKey, X25519PrivateKey, bytes]],
                      setup: bytes, learnt: dict) -> np.ndarray | None:
    """The target shares with neighbours whose key pairs the server holds: decrypt, combine, unmask."""
    v = co.client(target)
    _, err = _try(v.receive_setup, setup)
    if err:
        learnt["refusal"] = err
        return None
    adv_v = co.decode_advertise(target, v.advertise_keys())
    entries = {w: (_pub(c), _pub(s), sig) for w, (c, s, sig) in fake.items()}
    out, err = _try(v.share_keys, co.keys(entries))
    if err:
        learnt["refusal"] = err
        return None
    cts = msg.decode_shares(out, round_=co.round, sender=target, allowed=set(fake))
    b_pts, s_pts = [], []
    for w, (nonce, ct) in cts.items():
        yb, ys = decrypt_share(share_key(fake[w][0], adv_v[0], co.round, w, target), nonce, ct, co.round, target, w)
        b_pts.append((w + 1, yb))
        s_pts.append((w + 1, ys))
    learnt["shares_decrypted"] = len(cts)
    b_v, s_v = _combine(b_pts, v.setup.threshold), _combine(s_pts, v.setup.threshold)
    # the target's masked input: FORWARD made-up shares from the fake neighbours (the server holds their c keys)
    fwd = {w: encrypt_share(share_key(fake[w][0], adv_v[0], co.round, w, target), co.round, w, target, 1, 1)
           for w in fake}
    out, err = _try(v.masked_input, msg.encode_forward(co.round, fwd), co.x[target].copy(), co.expander)
    if err or b_v is None or s_v is None:
        learnt["refusal"] = err or "too few shares"
        return None
    y = msg.decode_masked(out, round_=co.round, sender=target, dim=co.d, ring_bits=co.b)
    s_sk = X25519PrivateKey.from_private_bytes(s_v)
    partners = {w: pair_mask_key(s_sk, _pub(fake[w][1]), co.round, target, w) for w in fake}
    return co.unmask_input(y, target, b_v, adv_v[1], partners)


def forged_keys(variant: str, mode: str = "forged", n: int = 5, d: int = 64, target: int = 0,
                round_: int = 3) -> AttackReport:
    """Attack (b): substitute the target's neighbours' keys ("forged" signatures or "replayed" advertisements)."""
    co = _Cohort(variant, n, d, round_)
    neighbours = [w for w in co.ids if w != target]
    server_id = Ed25519PrivateKey.generate()
    fake = {}
    for w in neighbours:
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        if mode == "forged":
            sig = server_id.sign(act.advertise_statement(co.round, w, _pub(c), _pub(s))) if variant == "active" else b""
        elif mode == "replayed":  # w's own, genuinely signed advertisement of the previous round; its keys leaked
            old = co.client(w)
            old.round = co.round - 1
            old.receive_setup(msg.encode_setup(co.round - 1, msg.Setup(co.t, co.q, co.b, 1.0, co.d,
                                                                        [x for x in co.ids if x != w])))
            payload = old.advertise_keys()
            sig = payload[-act.SIG:] if variant == "active" else b""
            c, s = old.c_sk, old.s_sk
        else:
            raise ValueError("mode is 'forged' or 'replayed'")
        fake[w] = (c, s, sig)
    learnt: dict[str, Any] = {"mode": mode}
    x_rec = _steal_all_shares(co, target, fake, co.setup(target, neighbours), learnt)
    return co.report(f"{mode}_keys", target, x_rec, learnt,
                     "every share of the target went to keys the server holds" if x_rec is not None
                     else "the target refused the substituted keys")


def sybil(variant: str, n: int = 5, d: int = 64, target: int = 0, round_: int = 3) -> AttackReport:
    """Attack (c): the target's SETUP names only Sybils (ids not on the roster) run by the server."""
    co = _Cohort(variant, n, d, round_)
    sybils = [10_000 + i for i in range(co.k)]
    server_id = Ed25519PrivateKey.generate()
    fake = {}
    for w in sybils:
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        sig = server_id.sign(act.advertise_statement(co.round, w, _pub(c), _pub(s))) if variant == "active" else b""
        fake[w] = (c, s, sig)
    learnt: dict[str, Any] = {"sybils": len(sybils)}
    x_rec = _steal_all_shares(co, target, fake, co.setup(target, sybils), learnt)
    return co.report("sybil", target, x_rec, learnt,
                     "all of the target's share holders were Sybils" if x_rec is not None
                     else "the target refused neighbours that are not on the roster")


def run_all(d: int = 64) -> list[dict[str, Any]]:
    """Every attack against both variants (the table in docs/secagg.md)."""
    out = []
    for variant in VARIANTS:
        out.append(inconsistent_views(variant, d=d).as_dict())
        out.append(forged_keys(variant, "forged", d=d).as_dict())
        out.append(forged_keys(variant, "replayed", d=d).as_dict())
        out.append(sybil(variant, d=d).as_dict())
    return out


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps([{k: r[k] for k in ("attack", "variant", "recovered", "reason")} for r in run_all()], indent=1))
