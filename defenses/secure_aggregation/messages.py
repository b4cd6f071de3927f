"""Versioned binary messages of SecAgg+, one per protocol step and direction.

Every message starts with the same header (little endian)::

    magic   b"SFSA"  4 bytes
    version u8       (= 1)
    step    u8       (see ``Step``)
    round   u32
    sender  u32      (client id, or SERVER = 0xFFFFFFFF for server -> client)

then a fixed-layout body:

==============  ====================  ==================================================
step            direction             body
==============  ====================  ==================================================
SETUP           server -> client      t u16, q u8, b u8, R f64, d u32, n u32, n x id u32
ADVERTISE       client -> server      c_pk 32, s_pk 32  (X25519 public keys)
KEYS            server -> client      n u32, n x (id u32, c_pk 32, s_pk 32)
SHARES          client -> server      n u32, n x (receiver u32, nonce 12, ciphertext 94)
FORWARD         server -> client      n u32, n x (sender u32, nonce 12, ciphertext 94)
MASKED          client -> server      b u8, d u32, (d + 1) x b-bit words
SURVIVORS       server -> client      n u32, n x id u32, m u32, m x id u32
UNMASK          client -> server      n u32, n x (owner u32, kind u8, y 33)
==============  ====================  ==================================================

The AES-GCM plaintext of a share is ``sender u32, receiver u32, round u32, y_b 33,
y_s 33`` (78 bytes, 94 with the tag); its associated data binds the same sender,
receiver and round (:func:`share_aad`).

Every decoder checks the exact length before it allocates, the header, that ids are
known, distinct and allowed, that field elements are < p, that public keys are not of
small order; anything wrong raises :class:`~secfed.errors.MalformedMessage`, the one
documented error.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from secfed.errors import MalformedMessage

from . import shamir
from .prg import RING_DTYPES

MAGIC = b"SFSA"
VERSION = 1
SERVER = 0xFFFFFFFF
HEADER = struct.Struct("<4sBBII")
KEY = 32
NONCE = 12
PLAIN = struct.Struct("<III")
PLAIN_LEN = PLAIN.size + 2 * shamir.SHARE_BYTES  # 78
CT_LEN = PLAIN_LEN + 16  # 94
MAX_CLIENTS = 1 << 20
MAX_DIM = 1 << 31
_U32 = struct.Struct("<I")
_SETUP = struct.Struct("<HBBdII")
_ID_KEYS = struct.Struct(f"<I{KEY}s{KEY}s")
_ENC = struct.Struct(f"<I{NONCE}s{CT_LEN}s")
_MASKED = struct.Struct("<BI")
_UNMASK = struct.Struct(f"<IB{shamir.SHARE_BYTES}s")
_PROBE = X25519PrivateKey.from_private_bytes(bytes([9] * 32))


class Step(enum.IntEnum):
    SETUP = 0
    ADVERTISE = 1
    KEYS = 2
    SHARES = 3
    FORWARD = 4
    MASKED = 5
    SURVIVORS = 6
    UNMASK = 7


# ---------------------------------------------------------------------------- helpers
def _pack_header(step: Step, round_: int, sender: int, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, step, round_, sender)


def _read_header(buf: object, step: Step, round_: int, sender: int, version: int = VERSION) -> bytes:
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"{step.name}: payload is not bytes")
    buf = bytes(buf)
    if len(buf) < HEADER.size:
        raise MalformedMessage(f"{step.name}: {len(buf)} bytes is shorter than the header")
    magic, ver, st, rnd, snd = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise MalformedMessage(f"{step.name}: bad magic")
    if ver != version:
        raise MalformedMessage(f"{step.name}: unsupported version {ver}")
    if st != step:
        raise MalformedMessage(f"{step.name}: message is for step {st}, out of order")
    if rnd != round_:
        raise MalformedMessage(f"{step.name}: round {rnd} != current round {round_}")
    if snd != sender:
        raise MalformedMessage(f"{step.name}: claims sender {snd} but came from {sender}")
    return buf


def _count(buf: bytes, off: int, item: int, step: Step, limit: int = MAX_CLIENTS) -> int:
    if len(buf) < off + 4:
        raise MalformedMessage(f"{step.name}: truncated count")
    (n,) = _U32.unpack_from(buf, off)
    if n > limit:
        raise MalformedMessage(f"{step.name}: count {n} exceeds {limit}")
    if len(buf) < off + 4 + n * item:
        raise MalformedMessage(f"{step.name}: truncated list of {n}")
    return n


def _exact(buf: bytes, size: int, step: Step) -> None:
    if len(buf) != size:
        raise MalformedMessage(f"{step.name}: length {len(buf)} != {size}")


def _ids_ok(ids: list[int], allowed: set[int] | None, step: Step, what: str) -> None:
    if len(set(ids)) != len(ids):
        raise MalformedMessage(f"{step.name}: duplicate {what}")
    if allowed is not None:
        bad = [i for i in ids if i not in allowed]
        if bad:
            raise MalformedMessage(f"{step.name}: unknown or unexpected {what} {bad[0]}")


def check_public_key(pk: bytes, step: Step = Step.ADVERTISE) -> None:
    """Reject a public key of small order (its X25519 output would be all zero)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise MalformedMessage(f"{step.name}: public key of small order") from None


# ---------------------------------------------------------------------------- SETUP
@dataclass
class Setup:
    threshold: int
    bits: int
    ring_bits: int
    clip_range: float
    dim: int
    neighbours: list[int]


def encode_setup(round_: int, s: Setup) -> bytes:
    return (_pack_header(Step.SETUP, round_, SERVER)
            + _SETUP.pack(s.threshold, s.bits, s.ring_bits, s.clip_range, s.dim, len(s.neighbours))
            + b"".join(_U32.pack(i) for i in s.neighbours))


def decode_setup(buf: bytes, *, round_: int, me: int) -> Setup:
    buf = _read_header(buf, Step.SETUP, round_, SERVER)
    if len(buf) < HEADER.size + _SETUP.size:
        raise MalformedMessage("SETUP: truncated")
    t, q, b, r, d, n = _SETUP.unpack_from(buf, HEADER.size)
    if n > MAX_CLIENTS:
        raise MalformedMessage("SETUP: too many neighbours")
    _exact(buf, HEADER.size + _SETUP.size + 4 * n, Step.SETUP)
    ids = list(struct.unpack_from(f"<{n}I", buf, HEADER.size + _SETUP.size))
    _ids_ok(ids, None, Step.SETUP, "neighbour")
    if me in ids:
        raise MalformedMessage("SETUP: a client is not its own neighbour")
    if b not in RING_DTYPES or not 2 <= q <= b or not (r > 0 and np.isfinite(r)) or not 0 < d <= MAX_DIM:
        raise MalformedMessage("SETUP: invalid ring, bits, range or dimension")
    if not (n + 1) // 2 + 1 <= t <= n + 1:
        raise MalformedMessage(f"SETUP: threshold {t} is not a strict majority of {n + 1} shares")
    return Setup(t, q, b, r, d, ids)


# ---------------------------------------------------------------------------- ADVERTISE
def encode_advertise(round_: int, me: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return _pack_header(Step.ADVERTISE, round_, me) + c_pk + s_pk


def decode_advertise(buf: bytes, *, round_: int, sender: int) -> tuple[bytes, bytes]:
    buf = _read_header(buf, Step.ADVERTISE, round_, sender)
    _exact(buf, HEADER.size + 2 * KEY, Step.ADVERTISE)
    c_pk, s_pk = buf[HEADER.size:HEADER.size + KEY], buf[HEADER.size + KEY:]
    if c_pk == s_pk:
        raise MalformedMessage("ADVERTISE: the two public keys must differ")
    check_public_key(c_pk)
    check_public_key(s_pk)
    return c_pk, s_pk


# ---------------------------------------------------------------------------- KEYS
def encode_keys(round_: int, keys: dict[int, tuple[bytes, bytes]]) -> bytes:
    return (_pack_header(Step.KEYS, round_, SERVER) + _U32.pack(len(keys))
            + b"".join(_ID_KEYS.pack(i, c, s) for i, (c, s) in sorted(keys.items())))


def decode_keys(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes]]:
    buf = _read_header(buf, Step.KEYS, round_, SERVER)
    n = _count(buf, HEADER.size, _ID_KEYS.size, Step.KEYS)
    _exact(buf, HEADER.size + 4 + n * _ID_KEYS.size, Step.KEYS)
    out = [_ID_KEYS.unpack_from(buf, HEADER.size + 4 + i * _ID_KEYS.size) for i in range(n)]
    _ids_ok([e[0] for e in out], allowed, Step.KEYS, "client")
    pks = [k for e in out for k in e[1:]]
    if len(set(pks)) != len(pks):
        raise MalformedMessage("KEYS: public keys are not distinct")
    return {i: (c, s) for i, c, s in out}


# ---------------------------------------------------------------------------- SHARES / FORWARD
def _encode_enc(step: Step, round_: int, sender: int, items: dict[int, tuple[bytes, bytes]]) -> bytes:
    return (_pack_header(step, round_, sender) + _U32.pack(len(items))
            + b"".join(_ENC.pack(i, nonce, ct) for i, (nonce, ct) in sorted(items.items())))


def _decode_enc(buf: bytes, step: Step, round_: int, sender: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes]]:
    buf = _read_header(buf, step, round_, sender)
    n = _count(buf, HEADER.size, _ENC.size, step)
    _exact(buf, HEADER.size + 4 + n * _ENC.size, step)
    out = [_ENC.unpack_from(buf, HEADER.size + 4 + i * _ENC.size) for i in range(n)]
    _ids_ok([e[0] for e in out], allowed, step, "client")
    return {i: (nonce, ct) for i, nonce, ct in out}


def encode_shares(round_: int, me: int, cts: dict[int, tuple[bytes, bytes]]) -> bytes:
    """``cts``: receiver -> (nonce, ciphertext)."""
    return _encode_enc(Step.SHARES, round_, me, cts)


def decode_shares(buf: bytes, *, round_: int, sender: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes]]:
    return _decode_enc(buf, Step.SHARES, round_, sender, allowed)


def encode_forward(round_: int, cts: dict[int, tuple[bytes, bytes]]) -> bytes:
    """``cts``: sender -> (nonce, ciphertext), all addressed to one client."""
    return _encode_enc(Step.FORWARD, round_, SERVER, cts)


def decode_forward(buf: bytes, *, round_: int, allowed: set[int]) -> dict[int, tuple[bytes, bytes]]:
    return _decode_enc(buf, Step.FORWARD, round_, SERVER, allowed)


def share_aad(round_: int, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data: protocol, version, round, sender, receiver."""
    return MAGIC + bytes([VERSION]) + PLAIN.pack(round_, sender, receiver)


def encode_share_plaintext(round_: int, sender: int, receiver: int, y_b: int, y_s: int) -> bytes:
    return PLAIN.pack(sender, receiver, round_) + shamir.y_to_bytes(y_b) + shamir.y_to_bytes(y_s)


def decode_share_plaintext(pt: bytes, *, round_: int, sender: int, receiver: int) -> tuple[int, int]:
    if len(pt) != PLAIN_LEN:
        raise MalformedMessage("share: wrong plaintext length")
    s, r, rnd = PLAIN.unpack_from(pt)
    if (s, r, rnd) != (sender, receiver, round_):
        raise MalformedMessage("share: sender, receiver or round does not match")
    o = PLAIN.size
    return shamir.y_from_bytes(pt[o:o + shamir.SHARE_BYTES]), shamir.y_from_bytes(pt[o + shamir.SHARE_BYTES:])


# ---------------------------------------------------------------------------- MASKED
def encode_masked(round_: int, me: int, y: np.ndarray, ring_bits: int) -> bytes:
    y = np.ascontiguousarray(y, dtype=RING_DTYPES[ring_bits])
    return b"".join((_pack_header(Step.MASKED, round_, me), _MASKED.pack(ring_bits, y.size - 1), y.data))


def decode_masked(buf: bytes, *, round_: int, sender: int, dim: int, ring_bits: int) -> np.ndarray:
    buf = _read_header(buf, Step.MASKED, round_, sender)
    if len(buf) < HEADER.size + _MASKED.size:
        raise MalformedMessage("MASKED: truncated")
    b, d = _MASKED.unpack_from(buf, HEADER.size)
    if b != ring_bits or d != dim:
        raise MalformedMessage(f"MASKED: ring {b} / dimension {d} != expected {ring_bits} / {dim}")
    dt = RING_DTYPES[ring_bits]
    _exact(buf, HEADER.size + _MASKED.size + (d + 1) * dt.itemsize, Step.MASKED)
    return np.frombuffer(buf, dtype=dt, offset=HEADER.size + _MASKED.size, count=d + 1)


# ---------------------------------------------------------------------------- SURVIVORS
def encode_survivors(round_: int, alive: list[int], dropped: list[int]) -> bytes:
    return (_pack_header(Step.SURVIVORS, round_, SERVER) + _U32.pack(len(alive)) + b"".join(_U32.pack(i) for i in sorted(alive))
            + _U32.pack(len(dropped)) + b"".join(_U32.pack(i) for i in sorted(dropped)))


def decode_survivors(buf: bytes, *, round_: int, allowed: set[int]) -> tuple[list[int], list[int]]:
    buf = _read_header(buf, Step.SURVIVORS, round_, SERVER)
    n = _count(buf, HEADER.size, 4, Step.SURVIVORS)
    off = HEADER.size + 4 + 4 * n
    m = _count(buf, off, 4, Step.SURVIVORS)
    _exact(buf, off + 4 + 4 * m, Step.SURVIVORS)
    alive = list(struct.unpack_from(f"<{n}I", buf, HEADER.size + 4))
    dropped = list(struct.unpack_from(f"<{m}I", buf, off + 4))
    _ids_ok(alive + dropped, allowed, Step.SURVIVORS, "client")  # also: disjoint, never both shares
    return alive, dropped


# ---------------------------------------------------------------------------- UNMASK
SELF_MASK, MASK_KEY = 0, 1


def encode_unmask(round_: int, me: int, shares: dict[int, tuple[int, int]]) -> bytes:
    """``shares``: owner -> (kind, y) with kind SELF_MASK (b share) or MASK_KEY (s^SK share)."""
    return (_pack_header(Step.UNMASK, round_, me) + _U32.pack(len(shares))
            + b"".join(_UNMASK.pack(o, k, shamir.y_to_bytes(y)) for o, (k, y) in sorted(shares.items())))


def decode_unmask(buf: bytes, *, round_: int, sender: int, expected: dict[int, int]) -> dict[int, int]:
    """``expected``: owner -> kind the server asked this client for. Returns owner -> y."""
    buf = _read_header(buf, Step.UNMASK, round_, sender)
    n = _count(buf, HEADER.size, _UNMASK.size, Step.UNMASK)
    _exact(buf, HEADER.size + 4 + n * _UNMASK.size, Step.UNMASK)
    out = [_UNMASK.unpack_from(buf, HEADER.size + 4 + i * _UNMASK.size) for i in range(n)]
    _ids_ok([o for o, _, _ in out], set(expected), Step.UNMASK, "share owner")
    res = {}
    for o, k, y in out:
        if k != expected[o]:
            raise MalformedMessage(f"UNMASK: share of kind {k} for client {o}, expected kind {expected[o]}")
        res[o] = shamir.y_from_bytes(y)
    return res
