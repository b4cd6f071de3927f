"""SecAgg+ with active security against a malicious server (issue 17, part 1).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, Section 4 / Figure 4 (the "actively secure" rows), on the
sparse graph of Bell et al., CCS 2020. On top of :mod:`.protocol`:

* **Long-term identities (a PKI).** Every client ``u`` holds an Ed25519 key
  ``d_u``; the *roster* (client id -> Ed25519 public key) is fixed before the run
  and held by every client. ``u`` signs what it advertises,
  ``sig_u = Sign(d_u, "advertise" || round || u || c_u^PK || s_u^PK)``, and every
  client verifies each neighbour's signature against the roster before it
  encrypts a share to that key. The server can therefore neither substitute its
  own keys for a client's (man in the middle) nor add clients the roster does
  not name (Sybils): SETUP neighbours off the roster are refused.
  In simulation the identities are generated per client by :class:`Identities`;
  in a deployment the identity is the node key the operator registered with
  Flower (not wired yet; Flower simulations hand the generated keys to the
  ServerApp and the nodes, real SuperNodes are refused).
* **Consistency check** (new round between MaskedInput and Unmasking). The
  server sends every survivor the same set U3; ``u`` checks ``u in U3``,
  ``U3 & N(u)`` is a subset of the neighbours it masked against and
  ``|U3 & N+(u)| >= t``, then signs ``"consistency" || round || U3`` once per
  round. The server forwards the signatures; ``u`` reveals shares only after it
  holds at least t valid signatures on *its* U3 from roster members of
  ``U3 & N+(u)``, and refuses (drops out) otherwise; any invalid signature in the
  message is a refusal too. Honest clients sign one U3, and t is a strict
  majority of a neighbourhood, so the server cannot show two holders of the same
  client's shares two different survivor sets: it can no longer ask some of them
  for b_v ("v survived") and others for s_v^SK ("v dropped").

Messages (same header as :mod:`.messages`, version 1, new step numbers):

==================  ================  ==================================================
step                direction         body
==================  ================  ==================================================
ADVERTISE_SIGNED    client -> server  c_pk 32, s_pk 32, sig 64
KEYS_SIGNED         server -> client  n u32, n x (id u32, c_pk 32, s_pk 32, sig 64)
CONSISTENCY         server -> client  n u32, n x id u32  (U3, sorted, distinct)
CONSISTENCY_SIG     client -> server  sig 64
SIGNATURES          server -> client  n u32, n x (id u32, sig 64)
==================  ================  ==================================================

Every decoder checks the length before it allocates and raises
:class:`~secfed.errors.MalformedMessage` only.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secfed.errors import MalformedMessage, RoundAborted

from . import messages as msg
from .messages import HEADER, KEY, SERVER, _count, _exact, _ids_ok, _pack_header, _read_header, check_public_key
from .protocol import SecAggClient, SecAggServer, _pub

SIG = 64
_LABEL = b"secfed/secagg+active/v1/"
_U32 = struct.Struct("<I")
_ID_KEYS_SIG = struct.Struct(f"<I{KEY}s{KEY}s{SIG}s")
_ID_SIG = struct.Struct(f"<I{SIG}s")


class ActiveStep(enum.IntEnum):
    ADVERTISE_SIGNED = 8
    KEYS_SIGNED = 9
    CONSISTENCY = 10
    CONSISTENCY_SIG = 11
    SIGNATURES = 12


# ============================================================================ identities
class Identities:
    """Ed25519 long-term keys of a simulated federation; ``roster`` is what every client holds.

    ``num_clients`` > 0: one key per client 0..n-1, so the roster is the whole federation
    (fixed before the run). A simulation over Flower hands the same identities to the
    ServerApp and to each simulated node (:meth:`private_bytes` / :meth:`from_private_bytes`).
    """

    def __init__(self, num_clients: int = 0) -> None:
        self.num_clients = num_clients
        self._sk: dict[int, Ed25519PrivateKey] = {}

    def key(self, client_id: int) -> Ed25519PrivateKey:
        if client_id not in self._sk:
            self._sk[client_id] = Ed25519PrivateKey.generate()
        return self._sk[client_id]

    def ids(self, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Every client with an identity (the federation, the keys made so far and ``extra``, made now)."""
        for u in [*range(self.num_clients), *extra]:
            self.key(u)
        return sorted(self._sk)

    def roster(self, ids: list[int]) -> dict[int, bytes]:
        return {u: self.key(u).public_key().public_bytes_raw() for u in ids}

    def private_bytes(self) -> dict[int, bytes]:
        """The raw private keys (simulation only: to hand the same identities to simulated nodes)."""
        self.ids()
        return {u: k.private_bytes_raw() for u, k in self._sk.items()}

    @classmethod
    def from_private_bytes(cls, keys: dict[int, bytes]) -> "Identities":
        out = cls(0)
        out._sk = {int(u): Ed25519PrivateKey.from_private_bytes(k) for u, k in keys.items()}
        return out


def advertise_statement(round_: int, u: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return _LABEL + b"advertise" + struct.pack("<II", round_, u) + c_pk + s_pk


def consistency_statement(round_: int, u3: list[int]) -> bytes:
    return _LABEL + b"consistency" + struct.pack("<II", round_, len(u3)) + b"".join(_U32.pack(i) for i in sorted(u3))


def verify(roster: dict[int, bytes], u: int, sig: bytes, statement: bytes, what: str) -> None:
    """Ed25519 verification against the roster; any failure is one MalformedMessage."""
    if u not in roster:
        raise MalformedMessage(f"{what}: client {u} is not on the roster")
    try:
        Ed25519PublicKey.from_public_bytes(roster[u]).verify(sig, statement)
    except (InvalidSignature, ValueError):
        raise MalformedMessage(f"{what}: invalid signature of client {u}") from None


# ============================================================================ messages
def encode_advertise_signed(round_: int, me: int, c_pk: bytes, s_pk: bytes, sig: bytes) -> bytes:
    return _pack_header(ActiveStep.ADVERTISE_SIGNED, round_, me) + c_pk + s_pk + sig


def decode_advertise_signed(buf: bytes, *, round_: int, sender: int) -> tuple[bytes, bytes, bytes]:
    buf = _read_header(buf, ActiveStep.ADVERTISE_SIGNED, round_, sender)
    _exact(buf, HEADER.size + 2 * KEY + SIG, ActiveStep.ADVERTISE_SIGNED)
    o = HEADER.size
    c_pk, s_pk, sig = buf[o:o + KEY], buf[o + KEY:o + 2 * KEY], buf[o + 2 * KEY:]
    if c_pk == s_pk:
        raise MalformedMessage("ADVERTISE_SIGNED: the two public keys must differ")
    check_public_key(c_pk, ActiveStep.ADVERTISE_SIGNED)
    check_public_key(s_pk, ActiveStep.ADVERTISE_SIGNED)
    return c_pk, s_pk, sig


def encode_keys_signed(round_: int, keys: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
    return (_pack_header(ActiveStep.KEYS_SIGNED, round_, SERVER) + _U32.pack(len(keys))
            + b"".join(_ID_KEYS_SIG.pack(i, c, s, g) for i, (c, s, g) in sorted(keys.items())))


def decode_keys_signed(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes, bytes]]:
    st = ActiveStep.KEYS_SIGNED
    buf = _read_header(buf, st, round_, SERVER)
    n = _count(buf, HEADER.size, _ID_KEYS_SIG.size, st)
    _exact(buf, HEADER.size + 4 + n * _ID_KEYS_SIG.size, st)
    out = [_ID_KEYS_SIG.unpack_from(buf, HEADER.size + 4 + i * _ID_KEYS_SIG.size) for i in range(n)]
    _ids_ok([e[0] for e in out], allowed, st, "client")
    pks = [k for e in out for k in e[1:3]]
    if len(set(pks)) != len(pks):
        raise MalformedMessage("KEYS_SIGNED: public keys are not distinct")
    for e in out:
        check_public_key(e[1], st)
        check_public_key(e[2], st)
    return {i: (c, s, g) for i, c, s, g in out}


def _encode_ids(step: ActiveStep, round_: int, ids: list[int]) -> bytes:
    return _pack_header(step, round_, SERVER) + _U32.pack(len(ids)) + b"".join(_U32.pack(i) for i in sorted(ids))


def encode_consistency(round_: int, u3: list[int]) -> bytes:
    return _encode_ids(ActiveStep.CONSISTENCY, round_, u3)


def decode_consistency(buf: bytes, *, round_: int, allowed: set[int]) -> list[int]:
    st = ActiveStep.CONSISTENCY
    buf = _read_header(buf, st, round_, SERVER)
    n = _count(buf, HEADER.size, 4, st)
    _exact(buf, HEADER.size + 4 + 4 * n, st)
    ids = list(struct.unpack_from(f"<{n}I", buf, HEADER.size + 4))
    _ids_ok(ids, allowed, st, "client")
    if ids != sorted(ids):
        raise MalformedMessage("CONSISTENCY: survivor set is not sorted")
    return ids


def encode_consistency_sig(round_: int, me: int, sig: bytes) -> bytes:
    return _pack_header(ActiveStep.CONSISTENCY_SIG, round_, me) + sig


def decode_consistency_sig(buf: bytes, *, round_: int, sender: int) -> bytes:
    buf = _read_header(buf, ActiveStep.CONSISTENCY_SIG, round_, sender)
    _exact(buf, HEADER.size + SIG, ActiveStep.CONSISTENCY_SIG)
    return buf[HEADER.size:]


def encode_signatures(round_: int, sigs: dict[int, bytes]) -> bytes:
    return (_pack_header(ActiveStep.SIGNATURES, round_, SERVER) + _U32.pack(len(sigs))
            + b"".join(_ID_SIG.pack(i, g) for i, g in sorted(sigs.items())))


def decode_signatures(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, bytes]:
    st = ActiveStep.SIGNATURES
    buf = _read_header(buf, st, round_, SERVER)
    n = _count(buf, HEADER.size, _ID_SIG.size, st)
    _exact(buf, HEADER.size + 4 + n * _ID_SIG.size, st)
    out = [_ID_SIG.unpack_from(buf, HEADER.size + 4 + i * _ID_SIG.size) for i in range(n)]
    _ids_ok([i for i, _ in out], allowed, st, "signer")
    return dict(out)


# ============================================================================ client
@dataclass
class ActiveSecAggClient(SecAggClient):
    """A client that signs what it advertises and reveals shares only for a U3 that t neighbours signed."""

    identity: Ed25519PrivateKey | None = None
    roster: dict[int, bytes] = field(default_factory=dict)
    u3: list[int] | None = None  # the one survivor set this client signed this round

    def to_state(self) -> dict:
        return {**super().to_state(), "u3": self.u3}

    @classmethod
    def from_state(cls, d: dict, **extra) -> "ActiveSecAggClient":
        c = super().from_state(d, **extra)
        c.u3 = None if d.get("u3") is None else [int(i) for i in d["u3"]]
        return c

    def receive_setup(self, payload: bytes) -> None:
        super().receive_setup(payload)
        off = [v for v in self.setup.neighbours if v not in self.roster]
        if off or self.me not in self.roster:
            raise MalformedMessage(f"SETUP: neighbour {off[0] if off else self.me} is not on the roster")

    def advertise_keys(self) -> bytes:
        """Round 0, signed: Sign(d_u, advertise || round || u || c_pk || s_pk)."""
        super().advertise_keys()
        c, s = _pub(self.c_sk), _pub(self.s_sk)
        sig = self.identity.sign(advertise_statement(self.round, self.me, c, s))
        return encode_advertise_signed(self.round, self.me, c, s, sig)

    def share_keys(self, keys_payload: bytes) -> bytes:
        """Round 1 after every neighbour's advertised keys verify against the roster."""
        signed = decode_keys_signed(keys_payload, round_=self.round, allowed=set(self.setup.neighbours))
        for v, (c, s, sig) in signed.items():
            verify(self.roster, v, sig, advertise_statement(self.round, v, c, s), "KEYS_SIGNED")
        return self._share_with({v: (c, s) for v, (c, s, _) in signed.items()})

    def consistency_check(self, payload: bytes) -> bytes:
        """Consistency round: sign the server's U3 once, if it is a survivor set this client can accept."""
        if self.u3 is not None:
            raise MalformedMessage("CONSISTENCY: this client already signed a survivor set this round")
        u3 = decode_consistency(payload, round_=self.round, allowed=set(self.roster))
        if self.me not in u3:
            raise MalformedMessage("CONSISTENCY: this client is listed as dropped")
        mine = set(u3) & set(self.setup.neighbours)
        if not mine <= set(self.held):
            raise MalformedMessage("CONSISTENCY: survivor set names a neighbour this client did not mask against")
        if len(mine) + 1 < self.setup.threshold:
            raise MalformedMessage(f"CONSISTENCY: {len(mine) + 1} survivors in the neighbourhood, "
                                   f"threshold is {self.setup.threshold}")
        self.u3 = u3
        return encode_consistency_sig(self.round, self.me, self.identity.sign(consistency_statement(self.round, u3)))

    def unmasking(self, signatures_payload: bytes) -> bytes:
        """Round 3: only with >= t valid signatures on this client's U3 from U3 & N+(u)."""
        if self.u3 is None:
            raise MalformedMessage("SIGNATURES: this client signed no survivor set this round")
        hood = (set(self.u3) & set(self.setup.neighbours)) | {self.me}
        sigs = decode_signatures(signatures_payload, round_=self.round, allowed=hood)
        statement = consistency_statement(self.round, self.u3)
        for v, sig in sigs.items():
            verify(self.roster, v, sig, statement, "SIGNATURES")
        if len(sigs) < self.setup.threshold:
            raise MalformedMessage(f"SIGNATURES: {len(sigs)} valid signatures on the survivor set, "
                                   f"threshold is {self.setup.threshold}")
        alive = sorted(set(self.u3) & (set(self.held) | {self.me}))
        dropped = sorted(set(self.held) - set(self.u3))
        return self._unmask(alive, dropped)


# ============================================================================ server
@dataclass
class ActiveSecAggServer(SecAggServer):
    """The honest server of the active variant: one U3 for all, forwards the signatures."""

    roster: dict[int, bytes] = field(default_factory=dict)
    sigs: dict[int, bytes] = field(default_factory=dict)  # advertise signatures
    u3: list[int] = field(default_factory=list)
    signed: dict[int, bytes] = field(default_factory=dict)  # consistency signatures (U4)

    def receive_advertise(self, sender: int, payload: bytes) -> None:
        self._once(self.pks, sender, "ADVERTISE_SIGNED")
        c, s, sig = decode_advertise_signed(payload, round_=self.round, sender=sender)
        verify(self.roster, sender, sig, advertise_statement(self.round, sender, c, s), "ADVERTISE_SIGNED")
        if any(c in p or s in p for p in self.pks.values()):
            raise MalformedMessage("ADVERTISE_SIGNED: public key reused by another client")
        self.pks[sender], self.sigs[sender] = (c, s), sig

    def keys_messages(self) -> dict[int, bytes]:
        u1 = set(self.pks)
        self._require(u1, u1, "advertise")
        return {u: encode_keys_signed(self.round, {v: (*self.pks[v], self.sigs[v]) for v in self.graph[u] & u1})
                for u in u1}

    def consistency_messages(self) -> dict[int, bytes]:
        u3 = set(self.masked)
        if not u3:
            raise RoundAborted("secagg+ masked_input: no masked input arrived")
        self._require(u3, u3, "masked_input")
        self.u3 = sorted(u3)
        return {u: encode_consistency(self.round, self.u3) for u in self.u3}

    def receive_consistency(self, sender: int, payload: bytes) -> None:
        self._once(self.signed, sender, "CONSISTENCY_SIG")
        if sender not in self.u3:
            raise MalformedMessage(f"CONSISTENCY_SIG: client {sender} is not in the survivor set")
        sig = decode_consistency_sig(payload, round_=self.round, sender=sender)
        verify(self.roster, sender, sig, consistency_statement(self.round, self.u3), "CONSISTENCY_SIG")
        self.signed[sender] = sig

    def signature_messages(self) -> dict[int, bytes]:
        """To each signer u: the signatures of U4 & N+(u); what u will be asked to reveal."""
        u2, u3, u4 = set(self.shares), set(self.u3), set(self.signed)
        self._require(u4, u4, "consistency")
        out = {}
        for u in sorted(u4):
            held = self.graph[u] & u2
            alive, dropped = sorted((held & u3) | {u}), sorted(held - u3)
            self._asked[u] = {**{v: msg.SELF_MASK for v in alive}, **{v: msg.MASK_KEY for v in dropped}}
            out[u] = encode_signatures(self.round, {v: self.signed[v] for v in (self.graph[u] | {u}) & u4})
        return out
