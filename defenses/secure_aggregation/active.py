"""SecAgg+ with active security against a malicious server (issue 17, part 1).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, Section 4 / Figure 4 (the "actively secure" rows), on the
sparse graph of Bell et al., CCS 2020. On top of :mod:`.protocol`:

* **Long-term identities (a PKI).** Every client ``u`` holds a signing key
  ``d_u`` (:mod:`.identity`: Ed25519, or ECDSA P-256/P-384/P-521 = a Flower node
  key); the *roster* (client id -> public key) is fixed before the run
  and held by every client. ``u`` signs what it advertises,
  ``sig_u = Sign(d_u, "advertise" || round || u || c_u^PK || s_u^PK)``, and every
  client verifies each neighbour's signature against the roster before it
  encrypts a share to that key. The server can therefore neither substitute its
  own keys for a client's (man in the middle) nor add clients the roster does
  not name (Sybils): SETUP neighbours off the roster are refused.
  In simulation the identities are generated per client (:class:`~.identity.Identities`,
  Ed25519); in a deployment the identity is the node key the operator registered with
  Flower's node authentication, loaded by the node from ``identity-key=PATH`` in its
  node config, and the roster is the registered public keys
  (``server.secure_sum.roster``, :class:`~.identity.RosterIdentities`).
* **Consistency check** (new round between MaskedInput and Unmasking). The
  server sends every survivor the same set U3; ``u`` checks ``u in U3``,
  ``U3 & N(u)`` is a subset of the neighbours it masked against and
  ``|U3 & N+(u)| >= t``, then signs ``"consistency" || round || U3`` once per
  round. The server forwards the signatures; ``u`` reveals shares only after it
  holds at least t valid signatures on *its* U3 from roster members of
  ``U3 & N+(u)`` (its own included), and refuses (drops out) otherwise; an invalid
  signature met before t valid ones is a refusal too. Honest clients sign one U3, and t is a strict
  majority of a neighbourhood, so the server cannot show two holders of the same
  client's shares two different survivor sets: it can no longer ask some of them
  for b_v ("v survived") and others for s_v^SK ("v dropped").

Messages (same header as :mod:`.messages`, **version 2**, new step numbers; the
steps shared with the semi-honest variant stay version 1). ``sig`` is
``len u8, len bytes`` with ``len`` one of the schemes' fixed sizes (64 Ed25519 or
ECDSA P-256, 96 ECDSA P-384, 132 ECDSA P-521: raw r || s, never DER), checked
before anything is sliced; verification also checks that the length is the one of
the signer's roster key (:func:`~.identity.verify_signature`):

==================  ================  ==================================================
step                direction         body
==================  ================  ==================================================
ADVERTISE_SIGNED    client -> server  c_pk 32, s_pk 32, sig
KEYS_SIGNED         server -> client  n u32, n x (id u32, c_pk 32, s_pk 32, sig)
CONSISTENCY         server -> client  n u32, n x id u32  (U3, sorted, distinct)
CONSISTENCY_SIG     client -> server  sig
SIGNATURES          server -> client  n u32, n x (id u32, sig)
==================  ================  ==================================================

Every decoder checks the length before it allocates and raises
:class:`~secfed.errors.MalformedMessage` only. Version 1 of these messages (fixed
64-byte Ed25519 signatures) is refused.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature

from secfed.errors import MalformedMessage, RoundAborted

from . import messages as msg
from .identity import MAX_SIG, SIG_SIZES, Identities, RosterIdentities, public_key, sign, verify_signature
from .messages import HEADER, KEY, SERVER, _ids_ok, check_public_key
from .protocol import SecAggClient, SecAggServer, _pub

__all__ = ["ActiveSecAggClient", "ActiveSecAggServer", "Identities", "RosterIdentities", "ActiveStep", "VERSION"]

VERSION = 2  # 1: fixed 64-byte Ed25519 signatures; 2: length-prefixed signatures of any identity scheme
SIG = 64  # an Ed25519 signature (the simulation's identities)
_SIG_LENS = frozenset(SIG_SIZES.values())
_MIN_SIG = 1 + min(_SIG_LENS)
_LABEL = b"secfed/secagg+active/v2/"
_U32 = struct.Struct("<I")
_ID_KEYS = struct.Struct(f"<I{KEY}s{KEY}s")


class ActiveStep(enum.IntEnum):
    ADVERTISE_SIGNED = 8
    KEYS_SIGNED = 9
    CONSISTENCY = 10
    CONSISTENCY_SIG = 11
    SIGNATURES = 12


def advertise_statement(round_: int, u: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return _LABEL + b"advertise" + struct.pack("<II", round_, u) + c_pk + s_pk


def consistency_statement(round_: int, u3: list[int]) -> bytes:
    return _LABEL + b"consistency" + struct.pack("<II", round_, len(u3)) + b"".join(_U32.pack(i) for i in sorted(u3))


def verify(roster: dict[int, Any], u: int, sig: bytes, statement: bytes, what: str) -> None:
    """Verification against ``u``'s roster key (any scheme of :mod:`.identity`); any failure is one MalformedMessage."""
    if u not in roster:
        raise MalformedMessage(f"{what}: client {u} is not on the roster")
    try:
        verify_signature(public_key(roster[u]), sig, statement)
    except (InvalidSignature, ValueError):
        raise MalformedMessage(f"{what}: invalid signature of client {u}") from None


# ============================================================================ messages
def _head(step: ActiveStep, round_: int, sender: int) -> bytes:
    return msg._pack_header(step, round_, sender, VERSION)


def _read(buf: bytes, step: ActiveStep, round_: int, sender: int) -> bytes:
    return msg._read_header(buf, step, round_, sender, VERSION)


def _sig_field(sig: bytes) -> bytes:
    if len(sig) > MAX_SIG:
        raise ValueError(f"a {len(sig)}-byte signature is longer than any scheme's")
    return bytes([len(sig)]) + sig


def _take_sig(buf: bytes, off: int, step: ActiveStep) -> tuple[bytes, int]:
    """A length-prefixed signature at ``off``: (signature, offset after it); the length is checked first."""
    if len(buf) < off + 1:
        raise MalformedMessage(f"{step.name}: truncated signature length")
    n = buf[off]
    if n not in _SIG_LENS:
        raise MalformedMessage(f"{step.name}: signature length {n} is no scheme's ({sorted(_SIG_LENS)})")
    if len(buf) < off + 1 + n:
        raise MalformedMessage(f"{step.name}: truncated signature")
    return buf[off + 1:off + 1 + n], off + 1 + n


def _count(buf: bytes, step: ActiveStep, min_item: int) -> int:
    """The list count after the header, at most what the remaining bytes can hold (no allocation before)."""
    if len(buf) < HEADER.size + 4:
        raise MalformedMessage(f"{step.name}: truncated count")
    (n,) = _U32.unpack_from(buf, HEADER.size)
    if n > msg.MAX_CLIENTS:
        raise MalformedMessage(f"{step.name}: count {n} exceeds {msg.MAX_CLIENTS}")
    if n * min_item > len(buf) - HEADER.size - 4:
        raise MalformedMessage(f"{step.name}: truncated list of {n}")
    return n


def _end(buf: bytes, off: int, step: ActiveStep) -> None:
    if off != len(buf):
        raise MalformedMessage(f"{step.name}: {len(buf) - off} trailing bytes")


def encode_advertise_signed(round_: int, me: int, c_pk: bytes, s_pk: bytes, sig: bytes) -> bytes:
    return _head(ActiveStep.ADVERTISE_SIGNED, round_, me) + c_pk + s_pk + _sig_field(sig)


def decode_advertise_signed(buf: bytes, *, round_: int, sender: int) -> tuple[bytes, bytes, bytes]:
    st = ActiveStep.ADVERTISE_SIGNED
    buf = _read(buf, st, round_, sender)
    o = HEADER.size
    if len(buf) < o + 2 * KEY:
        raise MalformedMessage(f"{st.name}: truncated public keys")
    c_pk, s_pk = buf[o:o + KEY], buf[o + KEY:o + 2 * KEY]
    sig, end = _take_sig(buf, o + 2 * KEY, st)
    _end(buf, end, st)
    if c_pk == s_pk:
        raise MalformedMessage("ADVERTISE_SIGNED: the two public keys must differ")
    check_public_key(c_pk, st)
    check_public_key(s_pk, st)
    return c_pk, s_pk, sig


def encode_keys_signed(round_: int, keys: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
    return (_head(ActiveStep.KEYS_SIGNED, round_, SERVER) + _U32.pack(len(keys))
            + b"".join(_ID_KEYS.pack(i, c, s) + _sig_field(g) for i, (c, s, g) in sorted(keys.items())))


def decode_keys_signed(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes, bytes]]:
    st = ActiveStep.KEYS_SIGNED
    buf = _read(buf, st, round_, SERVER)
    n = _count(buf, st, _ID_KEYS.size + _MIN_SIG)
    out, o = [], HEADER.size + 4
    for _ in range(n):
        if len(buf) < o + _ID_KEYS.size:
            raise MalformedMessage(f"{st.name}: truncated entry")
        i, c, s = _ID_KEYS.unpack_from(buf, o)
        g, o = _take_sig(buf, o + _ID_KEYS.size, st)
        out.append((i, c, s, g))
    _end(buf, o, st)
    _ids_ok([e[0] for e in out], allowed, st, "client")
    pks = [k for e in out for k in e[1:3]]
    if len(set(pks)) != len(pks):
        raise MalformedMessage("KEYS_SIGNED: public keys are not distinct")
    for e in out:
        check_public_key(e[1], st)
        check_public_key(e[2], st)
    return {i: (c, s, g) for i, c, s, g in out}


def encode_consistency(round_: int, u3: list[int]) -> bytes:
    return (_head(ActiveStep.CONSISTENCY, round_, SERVER) + _U32.pack(len(u3))
            + b"".join(_U32.pack(i) for i in sorted(u3)))


def decode_consistency(buf: bytes, *, round_: int, allowed: set[int]) -> list[int]:
    st = ActiveStep.CONSISTENCY
    buf = _read(buf, st, round_, SERVER)
    n = _count(buf, st, 4)
    msg._exact(buf, HEADER.size + 4 + 4 * n, st)
    ids = list(struct.unpack_from(f"<{n}I", buf, HEADER.size + 4))
    _ids_ok(ids, allowed, st, "client")
    if ids != sorted(ids):
        raise MalformedMessage("CONSISTENCY: survivor set is not sorted")
    return ids


def encode_consistency_sig(round_: int, me: int, sig: bytes) -> bytes:
    return _head(ActiveStep.CONSISTENCY_SIG, round_, me) + _sig_field(sig)


def decode_consistency_sig(buf: bytes, *, round_: int, sender: int) -> bytes:
    st = ActiveStep.CONSISTENCY_SIG
    buf = _read(buf, st, round_, sender)
    sig, end = _take_sig(buf, HEADER.size, st)
    _end(buf, end, st)
    return sig


def encode_signatures(round_: int, sigs: dict[int, bytes]) -> bytes:
    return (_head(ActiveStep.SIGNATURES, round_, SERVER) + _U32.pack(len(sigs))
            + b"".join(_U32.pack(i) + _sig_field(g) for i, g in sorted(sigs.items())))


def decode_signatures(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, bytes]:
    st = ActiveStep.SIGNATURES
    buf = _read(buf, st, round_, SERVER)
    n = _count(buf, st, 4 + _MIN_SIG)
    out, o = [], HEADER.size + 4
    for _ in range(n):
        if len(buf) < o + 4:
            raise MalformedMessage(f"{st.name}: truncated entry")
        (i,) = _U32.unpack_from(buf, o)
        g, o = _take_sig(buf, o + 4, st)
        out.append((i, g))
    _end(buf, o, st)
    _ids_ok([i for i, _ in out], allowed, st, "signer")
    return dict(out)


# ============================================================================ client
@dataclass
class ActiveSecAggClient(SecAggClient):
    """A client that signs what it advertises and reveals shares only for a U3 that t neighbours signed."""

    identity: Any = None  # this client's private key (any scheme of .identity)
    roster: dict[int, Any] = field(default_factory=dict)  # id -> public key (object, raw Ed25519 or SPKI bytes)
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
        sig = sign(self.identity, advertise_statement(self.round, self.me, c, s))
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
        return encode_consistency_sig(self.round, self.me, sign(self.identity, consistency_statement(self.round, u3)))

    def unmasking(self, signatures_payload: bytes) -> bytes:
        """Round 3: only with >= t valid signatures on this client's U3 from U3 & N+(u)."""
        if self.u3 is None:
            raise MalformedMessage("SIGNATURES: this client signed no survivor set this round")
        hood = (set(self.u3) & set(self.setup.neighbours)) | {self.me}
        sigs = decode_signatures(signatures_payload, round_=self.round, allowed=hood)
        statement = consistency_statement(self.round, self.u3)
        # this client signed its U3 itself (consistency_check); the others are verified in id order until t hold
        # (an invalid one met first is a refusal): t distinct signers is the condition, more costs time only
        # (about 1 ms per ECDSA P-384 verification with Flower node keys)
        valid = {self.me}
        for v in sorted(sigs):
            if len(valid) >= self.setup.threshold:
                break
            if v != self.me:
                verify(self.roster, v, sigs[v], statement, "SIGNATURES")
                valid.add(v)
        if len(valid) < self.setup.threshold:
            raise MalformedMessage(f"SIGNATURES: {len(valid)} valid signatures on the survivor set, "
                                   f"threshold is {self.setup.threshold}")
        alive = sorted(set(self.u3) & (set(self.held) | {self.me}))
        dropped = sorted(set(self.held) - set(self.u3))
        return self._unmask(alive, dropped)


# ============================================================================ server
@dataclass
class ActiveSecAggServer(SecAggServer):
    """The honest server of the active variant: one U3 for all, forwards the signatures."""

    roster: dict[int, Any] = field(default_factory=dict)
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
