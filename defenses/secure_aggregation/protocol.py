"""The SecAgg+ protocol, one method per step, client and server side.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017 (rounds 0-3 below), on the sparse graph of Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020.
N(u) are u's neighbours in the graph, N+(u) = N(u) + {u}; U1 >= U2 >= U3 >= U4 are
the clients still present after each round.

0. AdvertiseKeys.   u draws two X25519 key pairs, (c_u^SK, c_u^PK) to encrypt shares
                    and (s_u^SK, s_u^PK) for pairwise masks, and sends both public keys.
1. ShareKeys.       u draws the self-mask seed b_u (32 bytes, os.urandom), Shamir-shares
                    b_u and s_u^SK t-of-|N+(u) & U1| (x = id + 1), and sends each
                    neighbour v its two shares under AES-256-GCM with key
                    HKDF(X25519(c_u^SK, c_v^PK)) and associated data (round, u, v).
2. MaskedInput.     y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2, u<v} PRG(s_uv)
                                       - sum_{v in N(u) & U2, u>v} PRG(s_uv)   (mod 2^b),
                    s_uv = HKDF(X25519(s_u^SK, s_v^PK), round, min(u,v), max(u,v)).
3. Unmasking.       for each neighbour v, u reveals its share of b_v if v in U3, else of
                    s_v^SK (never both). The server reconstructs b_v for v in U3 and
                    s_v^SK for v in U2 \\ U3, and removes those masks from sum_{U3} y_u.

Semi-honest model: no signatures on the advertised keys; Bonawitz's active-security
variant (PKI + consistency round) is :mod:`.active` (``secure_sum.active = true``). The server aborts (:class:`RoundAborted`)
as soon as some client still needed has fewer than t of N+(u) left.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secfed.errors import MalformedMessage, RoundAborted

from . import messages as msg
from . import shamir
from .prg import RING_DTYPES, MaskExpander, derive_key

_LABEL = b"secfed/secagg+/v1/"
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def _pub(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(**_RAW)


def _agree(sk: X25519PrivateKey, pk: bytes) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise MalformedMessage("X25519: public key of small order") from None


def share_key(c_sk: X25519PrivateKey, peer_c_pk: bytes, round_: int, u: int, v: int) -> bytes:
    """The AES-GCM key that u and v share for the shares sent between them."""
    return derive_key(_agree(c_sk, peer_c_pk), _LABEL + b"share-key" + struct.pack("<III", round_, min(u, v), max(u, v)))


def pair_mask_key(s_sk: X25519PrivateKey, peer_s_pk: bytes, round_: int, u: int, v: int) -> bytes:
    """The AES-CTR key of the pairwise mask PRG(s_uv)."""
    return derive_key(_agree(s_sk, peer_s_pk), _LABEL + b"pair-mask" + struct.pack("<III", round_, min(u, v), max(u, v)))


def self_mask_key(b: bytes, round_: int, u: int) -> bytes:
    """The AES-CTR key of the self mask PRG(b_u)."""
    return derive_key(b, _LABEL + b"self-mask" + struct.pack("<II", round_, u))


def encrypt_share(key: bytes, round_: int, sender: int, receiver: int, y_b: int, y_s: int) -> tuple[bytes, bytes]:
    nonce = os.urandom(msg.NONCE)
    pt = msg.encode_share_plaintext(round_, sender, receiver, y_b, y_s)
    return nonce, AESGCM(key).encrypt(nonce, pt, msg.share_aad(round_, sender, receiver))


def decrypt_share(key: bytes, nonce: bytes, ct: bytes, round_: int, sender: int, receiver: int) -> tuple[int, int]:
    """(y_b, y_s); a replayed (other round) or redirected (other sender/receiver) share fails here."""
    try:
        pt = AESGCM(key).decrypt(nonce, ct, msg.share_aad(round_, sender, receiver))
    except InvalidTag:
        raise MalformedMessage(f"share from {sender} to {receiver}: bad AES-GCM tag") from None
    return msg.decode_share_plaintext(pt, round_=round_, sender=sender, receiver=receiver)


# ============================================================================ client
@dataclass
class SecAggClient:
    """One client's side of one round. Every input is the bytes the server sent."""

    me: int
    round: int
    setup: msg.Setup | None = None
    c_sk: X25519PrivateKey | None = None
    s_sk: X25519PrivateKey | None = None
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    b: bytes = b""
    own_share: tuple[int, int] = (0, 0)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # owner -> (y_b, y_s)
    unmasked: bool = False  # answered SURVIVORS once this round: a second answer could hand out both shares

    setup_bytes: bytes = b""  # the SETUP as received (kept so that a node can restore this object)

    def receive_setup(self, payload: bytes) -> None:
        self.setup = msg.decode_setup(payload, round_=self.round, me=self.me)
        self.setup_bytes = bytes(payload)

    # ------------------------------------------------------------------ persistence on a node
    def to_state(self) -> dict:
        """This round's secrets as a JSON-able dict, for a node that keeps them between messages in its own
        storage (Flower's ``context.state``: it never leaves the node). :meth:`from_state` restores it."""
        raw = (lambda k: k.private_bytes_raw().hex() if k is not None else "")
        return {"me": self.me, "round": self.round, "setup": self.setup_bytes.hex(), "c_sk": raw(self.c_sk),
                "s_sk": raw(self.s_sk), "keys": {str(v): [a.hex(), b.hex()] for v, (a, b) in self.keys.items()},
                "b": self.b.hex(), "own_share": list(self.own_share),
                "held": {str(v): list(y) for v, y in self.held.items()}, "unmasked": self.unmasked}

    @classmethod
    def from_state(cls, d: dict, **extra) -> "SecAggClient":
        """The client :meth:`to_state` saved (``extra``: fields a subclass does not persist, e.g. its identity)."""
        key = (lambda h: X25519PrivateKey.from_private_bytes(bytes.fromhex(h)) if h else None)
        c = cls(int(d["me"]), int(d["round"]), **extra)
        if d["setup"]:
            c.receive_setup(bytes.fromhex(d["setup"]))
        c.c_sk, c.s_sk = key(d["c_sk"]), key(d["s_sk"])
        c.keys = {int(v): (bytes.fromhex(a), bytes.fromhex(b)) for v, (a, b) in d["keys"].items()}
        c.b = bytes.fromhex(d["b"])
        c.own_share = tuple(d["own_share"])
        c.held = {int(v): tuple(y) for v, y in d["held"].items()}
        c.unmasked = bool(d["unmasked"])
        return c

    def advertise_keys(self) -> bytes:
        """Round 0: two fresh X25519 key pairs per round."""
        self.c_sk, self.s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        return msg.encode_advertise(self.round, self.me, _pub(self.c_sk), _pub(self.s_sk))

    def share_keys(self, keys_payload: bytes) -> bytes:
        """Round 1: Shamir-share b_u and s_u^SK among N+(u) & U1, encrypt each share to its holder."""
        s = self.setup
        keys = msg.decode_keys(keys_payload, round_=self.round, allowed=set(s.neighbours))
        return self._share_with(keys)

    def _share_with(self, keys: dict[int, tuple[bytes, bytes]]) -> bytes:
        """Round 1 once the neighbours' keys are decoded (and, in the active variant, verified)."""
        s = self.setup
        if len(keys) + 1 < s.threshold:
            raise MalformedMessage(f"KEYS: {len(keys)} neighbours left, threshold is {s.threshold}")
        self.keys = keys
        self.b = os.urandom(32)
        holders = sorted(keys) + [self.me]
        xs = [h + 1 for h in holders]
        yb = shamir.split(self.b, s.threshold, xs)
        ys = shamir.split(self.s_sk.private_bytes_raw(), s.threshold, xs)
        self.own_share = (yb[-1], ys[-1])
        cts = {}
        for v, y1, y2 in zip(holders[:-1], yb, ys):
            k = share_key(self.c_sk, keys[v][0], self.round, self.me, v)
            cts[v] = encrypt_share(k, self.round, self.me, v, y1, y2)
        return msg.encode_shares(self.round, self.me, cts)

    def masked_input(self, forward_payload: bytes, x: np.ndarray, expander: MaskExpander) -> bytes:
        """Round 2: y_u = x_u + PRG(b_u) +- PRG(s_uv) for every neighbour v that shared (U2).

        ``x`` (the encoded input, a ring vector) is masked in place.
        """
        fwd = msg.decode_forward(forward_payload, round_=self.round, allowed=set(self.keys))
        if len(fwd) + 1 < self.setup.threshold:
            raise MalformedMessage(f"FORWARD: shares from {len(fwd)} neighbours, threshold is {self.setup.threshold}")
        for v, (nonce, ct) in fwd.items():
            k = share_key(self.c_sk, self.keys[v][0], self.round, v, self.me)
            self.held[v] = decrypt_share(k, nonce, ct, self.round, v, self.me)
        y = x if x.dtype == RING_DTYPES[self.setup.ring_bits] else x.astype(RING_DTYPES[self.setup.ring_bits])
        expander.add(y, self_mask_key(self.b, self.round, self.me), +1)
        for v in sorted(self.held):
            expander.add(y, pair_mask_key(self.s_sk, self.keys[v][1], self.round, self.me, v), +1 if self.me < v else -1)
        return msg.encode_masked(self.round, self.me, y, self.setup.ring_bits)

    def unmasking(self, survivors_payload: bytes) -> bytes:
        """Round 3: b-shares of the survivors, s^SK-shares of the dropped; never both for one client."""
        if self.unmasked:  # a second SURVIVORS list (e.g. "v dropped" after "v alive") would leak both shares of v
            raise MalformedMessage("SURVIVORS: this client already answered the unmask step of this round")
        alive, dropped = msg.decode_survivors(survivors_payload, round_=self.round, allowed=set(self.held) | {self.me})
        return self._unmask(alive, dropped)

    def _unmask(self, alive: list[int], dropped: list[int]) -> bytes:
        """Round 3 once the survivor view is decoded (and, in the active variant, signed by t neighbours)."""
        if self.unmasked:
            raise MalformedMessage("SURVIVORS: this client already answered the unmask step of this round")
        if self.me not in alive:
            raise MalformedMessage("SURVIVORS: this client is listed as dropped")
        if len(alive) < self.setup.threshold:
            raise MalformedMessage(f"SURVIVORS: {len(alive)} survivors in the neighbourhood, threshold is {self.setup.threshold}")
        out = {}
        for v in alive:
            out[v] = (msg.SELF_MASK, (self.own_share if v == self.me else self.held[v])[0])
        for v in dropped:
            out[v] = (msg.MASK_KEY, self.held[v][1])
        self.unmasked = True
        return msg.encode_unmask(self.round, self.me, out)


# ============================================================================ server
@dataclass
class SecAggServer:
    """The server's side of one round; it only ever reads client bytes."""

    round: int
    graph: dict[int, set[int]]
    setup: dict[int, msg.Setup]
    ring_bits: int
    dim: int
    threshold: int
    pks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1
    shares: dict[int, dict[int, tuple[bytes, bytes]]] = field(default_factory=dict)  # U2: sender -> receiver -> ct
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # U3
    revealed: dict[int, dict[int, int]] = field(default_factory=dict)  # U4: sender -> owner -> y
    _asked: dict[int, dict[int, int]] = field(default_factory=dict)

    def _once(self, store: dict, sender: int, step: str) -> None:
        if sender not in self.graph:
            raise MalformedMessage(f"{step}: unknown client {sender}")
        if sender in store:
            raise MalformedMessage(f"{step}: duplicate message from client {sender}")

    def _require(self, alive: set[int], who: set[int], step: str) -> None:
        for u in sorted(who):
            have = len((self.graph[u] | {u}) & alive)
            if have < self.threshold:
                raise RoundAborted(f"secagg+ {step}: client {u} has {have} of its neighbourhood left, "
                                   f"{self.threshold} needed to recover its masks")

    def setup_messages(self) -> dict[int, bytes]:
        return {u: msg.encode_setup(self.round, s) for u, s in self.setup.items()}

    def receive_advertise(self, sender: int, payload: bytes) -> None:
        self._once(self.pks, sender, "ADVERTISE")
        c, s = msg.decode_advertise(payload, round_=self.round, sender=sender)
        if any(c in p or s in p for p in self.pks.values()):
            raise MalformedMessage("ADVERTISE: public key reused by another client")
        self.pks[sender] = (c, s)

    def keys_messages(self) -> dict[int, bytes]:
        u1 = set(self.pks)
        self._require(u1, u1, "advertise")
        return {u: msg.encode_keys(self.round, {v: self.pks[v] for v in self.graph[u] & u1}) for u in u1}

    def receive_shares(self, sender: int, payload: bytes) -> None:
        self._once(self.shares, sender, "SHARES")
        if sender not in self.pks:
            raise MalformedMessage(f"SHARES: client {sender} did not advertise keys")
        allowed = self.graph[sender] & set(self.pks)
        cts = msg.decode_shares(payload, round_=self.round, sender=sender, allowed=allowed)
        if set(cts) != allowed:
            raise MalformedMessage(f"SHARES: client {sender} did not send a share to every neighbour")
        self.shares[sender] = cts

    def forward_messages(self) -> dict[int, bytes]:
        u2 = set(self.shares)
        self._require(u2, u2, "share")
        return {v: msg.encode_forward(self.round, {u: self.shares[u][v] for u in self.graph[v] & u2}) for v in u2}

    def receive_masked(self, sender: int, payload: bytes) -> None:
        self._once(self.masked, sender, "MASKED")
        if sender not in self.shares:
            raise MalformedMessage(f"MASKED: client {sender} did not share keys")
        self.masked[sender] = msg.decode_masked(payload, round_=self.round, sender=sender, dim=self.dim, ring_bits=self.ring_bits)

    def survivor_messages(self) -> dict[int, bytes]:
        u2, u3 = set(self.shares), set(self.masked)
        if not u3:
            raise RoundAborted("secagg+ masked_input: no masked input arrived")
        self._require(u3, u3, "masked_input")
        out = {}
        for u in u3:
            held = self.graph[u] & u2
            alive, dropped = sorted((held & u3) | {u}), sorted(held - u3)
            self._asked[u] = {**{v: msg.SELF_MASK for v in alive}, **{v: msg.MASK_KEY for v in dropped}}
            out[u] = msg.encode_survivors(self.round, alive, dropped)
        return out

    def receive_unmask(self, sender: int, payload: bytes) -> None:
        self._once(self.revealed, sender, "UNMASK")
        if sender not in self._asked:
            raise MalformedMessage(f"UNMASK: client {sender} was not asked to unmask")
        got = msg.decode_unmask(payload, round_=self.round, sender=sender, expected=self._asked[sender])
        if set(got) != set(self._asked[sender]):
            raise MalformedMessage(f"UNMASK: client {sender} did not send every share it was asked for")
        self.revealed[sender] = got

    def _reconstruct(self, owner: int) -> bytes:
        pts = [(h + 1, ys[owner]) for h, ys in self.revealed.items() if owner in ys]
        if len(pts) < self.threshold:
            raise RoundAborted(f"secagg+ unmask: {len(pts)} shares of client {owner}'s secret, {self.threshold} needed")
        return shamir.combine(pts, self.threshold)

    def unmask_sum(self, expander: MaskExpander) -> np.ndarray:
        """sum_{u in U3} x_u (mod 2^b): the masked sum minus the reconstructed masks."""
        u2, u3 = set(self.shares), set(self.masked)
        acc = np.zeros(self.dim + 1, dtype=RING_DTYPES[self.ring_bits])
        for u in sorted(u3):
            np.add(acc, self.masked[u], out=acc)
        try:
            for v in sorted(u3):
                expander.add(acc, self_mask_key(self._reconstruct(v), self.round, v), -1)
            for v in sorted(u2 - u3):
                partners = self.graph[v] & u3
                if not partners:
                    continue
                s_sk = X25519PrivateKey.from_private_bytes(self._reconstruct(v))
                if _pub(s_sk) != self.pks[v][1]:
                    raise RoundAborted(f"secagg+ unmask: shares of client {v}'s mask key are inconsistent")
                for u in sorted(partners):  # u added +PRG(s_uv) if u < v
                    expander.add(acc, pair_mask_key(s_sk, self.pks[u][1], self.round, v, u), -1 if u < v else +1)
        except MalformedMessage as e:
            raise RoundAborted(f"secagg+ unmask: {e}") from None
        return acc
