"""Versioned byte formats for homomorphic aggregation: key contexts and ciphertext bundles.

TenSEAL's own bytes (protobuf around SEAL objects) travel inside an envelope whose
sizes are checked before TenSEAL's deserialisers run; anything TenSEAL/SEAL then
rejects (SEAL checks every coefficient against the modulus and the parameter id)
is turned into :class:`~secfed.errors.MalformedMessage`, the one documented error.

Context envelope (little endian)::

    magic b"SFHK" | version u8 | kind u8 (0 = no secret key, 1 = secret key)
    | scheme u8 (0 = bfv, 1 = ckks) | key_id 16 bytes | length u32 | TenSEAL context bytes

Ciphertext bundle (one client's encrypted update, or the server's encrypted sum)::

    magic b"SFHC" | version u8 | scheme u8 | round u32 | sender u32 | key_id 16 bytes
    | count u32 | count x length u32 | the count TenSEAL vectors, concatenated

The sender of the server's sum is 0xFFFFFFFF. ``key_id`` is 16 random bytes the key
holder draws with the keys; a bundle for another key id is refused before parsing.
A bundle encrypted under another key with the *same* id and parameters cannot be
told apart by the server (it holds no key); the key holder's range check on the
decrypted sum catches it and aborts the round (docs/security_ckks.md).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import tenseal as ts

from secfed.errors import MalformedMessage

from defenses.secure_aggregation.he_params import HEParams

CTX_MAGIC, CT_MAGIC, VERSION = b"SFHK", b"SFHC", 1
SCHEMES = {"bfv": 0, "ckks": 1}
SERVER_SENDER = 0xFFFFFFFF
MAX_CONTEXT_BYTES = 64 << 20
_CTX = struct.Struct("<4sBBB16sI")
_CT = struct.Struct("<4sBBII16sI")
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


def encode_context(ctx: ts.Context, scheme: str, key_id: bytes, *, secret: bool) -> bytes:
    """Serialise a context: with the secret key (for encrypting clients) or with no keys at all (server)."""
    if secret:
        body = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    else:
        body = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return _CTX.pack(CTX_MAGIC, VERSION, int(secret), SCHEMES[scheme], key_id, len(body)) + body


@dataclass
class LoadedContext:
    context: ts.Context
    scheme: str
    key_id: bytes
    secret: bool


def _survives_load(body: bytes) -> bool:
    """Load ``body`` in a forked child first: SEAL calls ``std::terminate`` (killing the whole
    process) on some malformed contexts instead of raising (found by ``tests/test_fuzz_all.py``;
    the input is ``tests/data/he_context_abort.bin``). A context is decoded once per run, so
    the fork costs little. Returns False if the child died by a signal."""
    if not hasattr(os, "fork"):
        return True
    pid = os.fork()
    if pid == 0:  # child: only try the load, never return into the caller's code
        import faulthandler

        faulthandler.disable()  # an abort here is the expected finding, not a crash report
        os.close(2)  # SEAL's terminate message would go to the parent's stderr
        try:
            ts.context_from(body)
        except BaseException:  # noqa: BLE001 - a Python error is fine; the parent raises it properly
            pass
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status)


def decode_context(buf: bytes, *, expect_secret: bool | None = None) -> LoadedContext:
    """Validate an envelope and load the TenSEAL context in it."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise MalformedMessage("he context: payload is not bytes")
    buf = bytes(buf)
    if len(buf) < _CTX.size:
        raise MalformedMessage(f"he context: {len(buf)} bytes is shorter than the {_CTX.size}-byte header")
    magic, ver, kind, scheme, key_id, length = _CTX.unpack_from(buf)
    if magic != CTX_MAGIC or ver != VERSION:
        raise MalformedMessage("he context: bad magic or unsupported version")
    if kind not in (0, 1) or scheme not in SCHEMES.values():
        raise MalformedMessage(f"he context: bad kind {kind} or scheme {scheme}")
    if length > MAX_CONTEXT_BYTES or len(buf) != _CTX.size + length:
        raise MalformedMessage(f"he context: length field {length} does not match {len(buf) - _CTX.size} bytes")
    if expect_secret is not None and bool(kind) != expect_secret:
        raise MalformedMessage("he context: secret-key presence differs from what this role expects")
    if not _survives_load(buf[_CTX.size:]):
        raise MalformedMessage("he context: TenSEAL/SEAL aborts the process on it (probed in a child process)")
    try:
        ctx = ts.context_from(buf[_CTX.size:])
        has_sk = ctx.has_secret_key()
    except _TENSEAL_ERRORS as e:
        raise MalformedMessage(f"he context: TenSEAL rejected it: {e}") from None
    if has_sk != bool(kind):
        raise MalformedMessage("he context: the secret key's presence contradicts the header")
    name = next(k for k, v in SCHEMES.items() if v == scheme)
    return LoadedContext(ctx, name, key_id, bool(kind))


def encode_bundle(scheme: str, round_: int, sender: int, key_id: bytes, blobs: list[bytes]) -> bytes:
    head = _CT.pack(CT_MAGIC, VERSION, SCHEMES[scheme], round_, sender, key_id, len(blobs))
    return head + struct.pack(f"<{len(blobs)}I", *(len(b) for b in blobs)) + b"".join(blobs)


def chunk_sizes(d: int, params: HEParams) -> list[int]:
    """Slots used by each ciphertext for a flat vector of d values plus the weight slot."""
    total, s = d + 1, params.slots
    return [min(s, total - i) for i in range(0, total, s)]


def decode_bundle(buf: bytes, ctx: ts.Context, params: HEParams, *, d: int, round_: int, sender: int,
                  key_id: bytes) -> list:
    """Validate a bundle and deserialise its vectors against ``ctx``; returns TenSEAL vectors."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise MalformedMessage("he bundle: payload is not bytes")
    buf = bytes(buf)
    if len(buf) < _CT.size:
        raise MalformedMessage(f"he bundle: {len(buf)} bytes is shorter than the {_CT.size}-byte header")
    magic, ver, scheme, rnd, snd, kid, count = _CT.unpack_from(buf)
    if magic != CT_MAGIC or ver != VERSION:
        raise MalformedMessage("he bundle: bad magic or unsupported version")
    if scheme != SCHEMES[params.scheme]:
        raise MalformedMessage(f"he bundle: scheme {scheme} is not {params.scheme}")
    if rnd != round_:
        raise MalformedMessage(f"he bundle: round {rnd} != current round {round_}")
    if snd != sender:
        raise MalformedMessage(f"he bundle: claims sender {snd} but came from {sender}")
    if kid != key_id:
        raise MalformedMessage("he bundle: encrypted for another key (key id differs)")
    sizes = chunk_sizes(d, params)
    if count != len(sizes):
        raise MalformedMessage(f"he bundle: {count} ciphertexts, expected {len(sizes)} for d={d}")
    table_end = _CT.size + 4 * count
    if len(buf) < table_end:
        raise MalformedMessage("he bundle: truncated length table")
    lengths = struct.unpack_from(f"<{count}I", buf, _CT.size)
    max_len = params.raw_ciphertext_bytes() + 4096  # SEAL's compression only shrinks it
    if any(not 64 <= n <= max_len for n in lengths):
        raise MalformedMessage(f"he bundle: a ciphertext length is outside 64..{max_len} bytes")
    if len(buf) != table_end + sum(lengths):
        raise MalformedMessage(f"he bundle: {len(buf)} bytes, the length table says {table_end + sum(lengths)}")
    load = ts.bfv_vector_from if params.scheme == "bfv" else ts.ckks_vector_from
    out, pos = [], table_end
    for k, (n, size) in enumerate(zip(lengths, sizes)):
        try:
            v = load(ctx, buf[pos : pos + n])
            got = v.size()
        except _TENSEAL_ERRORS as e:
            raise MalformedMessage(f"he bundle: ciphertext {k} rejected by TenSEAL: {e}") from None
        if got != size:
            raise MalformedMessage(f"he bundle: ciphertext {k} holds {got} values, expected {size}")
        out.append(v)
        pos += n
    return out
