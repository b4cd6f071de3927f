"""Versioned binary messages for plain (unprotected) updates.

Layout of an ``UPDATE`` message (little endian)::

    magic  b"SFU"   3 bytes
    version         u8   (= 1)
    round           u32
    client_id       u32
    num_examples    u32
    weight          f64
    d               u32
    values          d x f32

:func:`decode_update` validates everything before it allocates: the exact
length implied by ``d`` (and ``d`` against the expected dimension), version,
round, sender, finiteness, non-negative weight, and a norm bound. Any failure is
:class:`~secfed.errors.MalformedMessage`, the one documented decoder error.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from secfed.errors import MalformedMessage

MAGIC = b"SFU"
VERSION = 1
_HEADER = struct.Struct("<3sBIIIdI")
MAX_DIM = 1 << 30


@dataclass
class DecodedUpdate:
    round: int
    client_id: int
    num_examples: int
    weight: float
    delta: torch.Tensor


def encode_update(round_: int, client_id: int, num_examples: int, weight: float, delta: torch.Tensor) -> bytes:
    v = delta.detach().to(torch.float32).contiguous().numpy()
    return _HEADER.pack(MAGIC, VERSION, round_, client_id, num_examples, float(weight), v.size) + v.astype("<f4").tobytes()


def decode_update(buf: bytes, *, expected_dim: int, round_: int, sender: int, max_norm: float = math.inf) -> DecodedUpdate:
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise MalformedMessage("update: payload is not bytes")
    buf = bytes(buf)
    if len(buf) < _HEADER.size:
        raise MalformedMessage(f"update: {len(buf)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, ver, rnd, cid, n_ex, weight, d = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise MalformedMessage("update: bad magic")
    if ver != VERSION:
        raise MalformedMessage(f"update: unsupported version {ver}")
    if rnd != round_:
        raise MalformedMessage(f"update: round {rnd} != current round {round_}")
    if cid != sender:
        raise MalformedMessage(f"update: claims client {cid} but was sent by {sender}")
    if d != expected_dim or d > MAX_DIM:
        raise MalformedMessage(f"update: dimension {d} != expected {expected_dim}")
    if len(buf) != _HEADER.size + 4 * d:
        raise MalformedMessage(f"update: length {len(buf)} != {_HEADER.size + 4 * d} for d={d}")
    if not math.isfinite(weight) or weight < 0:
        raise MalformedMessage(f"update: invalid weight {weight}")
    arr = np.frombuffer(buf, dtype="<f4", offset=_HEADER.size, count=d)
    if not np.isfinite(arr).all():
        raise MalformedMessage("update: non-finite values")
    t = torch.from_numpy(arr.astype(np.float32))
    norm = float(torch.linalg.vector_norm(t))
    if norm > max_norm:
        raise MalformedMessage(f"update: norm {norm:.3g} exceeds server.max_update_norm {max_norm:.3g}")
    return DecodedUpdate(rnd, cid, n_ex, weight, t)
