"""What secfed puts inside Flower messages: bytes in one ``ConfigRecord``, never pickle.

Every message between the ServerApp and a ClientApp carries a single
``ConfigRecord`` named ``"secfed"`` whose values are ints, strings and raw bytes:

==========  ==================  ===============================================
message     direction           keys
==========  ==================  ===============================================
``query``   server -> client    ``v``, ``fingerprint``
            client -> server    ``v``, ``client``, ``fingerprint``
``train``   server -> client    ``v``, ``round``, ``fingerprint``,
                                ``cohort`` (u32 LE), ``weights`` (``SFW``),
                                ``state`` (JSON of the engine's scalar state),
                                ``dp`` (JSON: the guard's round parameters the
                                node must apply, :func:`encode_dp`); the
                                same content for every node (Flower stores
                                and pushes it once); a ``client`` key, if
                                present, must be the node's own
            client -> server    ``v``, ``round``, ``client``, ``payload`` (the
                                secure sum's bytes, e.g. :mod:`secfed.wire`
                                ``SFU``), ``metrics`` (JSON of floats; ``{}``
                                under a secure sum or DP), ``reason`` (SecAgg+:
                                one fixed out-of-range string or ``""``), or
                                ``refused`` (the node's one-line ConfigError)
==========  ==================  ===============================================

Global weights travel as ``SFW`` (little endian)::

    magic b"SFW" | version u8 (=1) | round u32 | d u32 | d x f32

Every decoder here checks types, lengths, bounds and finiteness before it
allocates and raises :class:`~secfed.errors.MalformedMessage` on anything else.
Flower's own ``ArrayRecord`` is not used: secfed's versioned formats stay the
single source of truth on every transport.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from secfed.errors import MalformedMessage

MAX_DIM = 1 << 30  # as secfed.wire (not imported: this module must stay free of torch for fast queries)

RECORD = "secfed"
PROTOCOL = 1
MAX_COHORT = 1 << 22
MAX_JSON = 1 << 16

_W_HEADER = struct.Struct("<3sBII")
W_MAGIC = b"SFW"


def encode_weights(round_: int, w: Any) -> bytes:
    import torch

    v = w.detach().to(torch.float32).contiguous().numpy()
    return _W_HEADER.pack(W_MAGIC, 1, round_, v.size) + v.astype("<f4").tobytes()


def decode_weights(buf: Any, *, expected_dim: int, round_: int) -> Any:
    """The global weights (a float32 torch tensor) a client received; validated before anything is allocated."""
    import torch

    if not isinstance(buf, (bytes, bytearray)):
        raise MalformedMessage("weights: payload is not bytes")
    if len(buf) < _W_HEADER.size:
        raise MalformedMessage(f"weights: {len(buf)} bytes is shorter than the {_W_HEADER.size}-byte header")
    magic, ver, rnd, d = _W_HEADER.unpack_from(buf)
    if magic != W_MAGIC or ver != 1:
        raise MalformedMessage("weights: bad magic or version")
    if rnd != round_:
        raise MalformedMessage(f"weights: round {rnd} != {round_}")
    if d != expected_dim or d > MAX_DIM or len(buf) != _W_HEADER.size + 4 * d:
        raise MalformedMessage(f"weights: dimension {d} / length {len(buf)} do not match the model ({expected_dim})")
    arr = np.frombuffer(bytes(buf), dtype="<f4", offset=_W_HEADER.size, count=d)
    if not np.isfinite(arr).all():
        raise MalformedMessage("weights: non-finite values")
    return torch.from_numpy(arr.astype(np.float32))


def encode_ids(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def decode_ids(buf: Any, *, num_clients: int) -> list[int]:
    if not isinstance(buf, (bytes, bytearray)) or len(buf) % 4 or len(buf) // 4 > min(num_clients, MAX_COHORT):
        raise MalformedMessage("cohort: not a u32 array of at most num_clients ids")
    ids = np.frombuffer(bytes(buf), dtype="<u4").astype(np.int64).tolist()
    if any(i >= num_clients for i in ids) or ids != sorted(set(ids)):
        raise MalformedMessage("cohort: ids out of range, unsorted or repeated")
    return ids


def get(rec: Any, key: str, kind: type, *, max_len: int | None = None) -> Any:
    """One typed value of a received ``ConfigRecord``."""
    try:
        v = rec[key]
    except (KeyError, TypeError):
        raise MalformedMessage(f"message: missing '{key}'") from None
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise MalformedMessage(f"message: '{key}' is not an int")
    if kind is not int and not isinstance(v, kind):
        raise MalformedMessage(f"message: '{key}' is not {kind.__name__}")
    if max_len is not None and len(v) > max_len:
        raise MalformedMessage(f"message: '{key}' is longer than {max_len}")
    return v


def record_of(content: Any) -> Any:
    """The ``secfed`` record of a message's content, with the protocol version checked."""
    try:
        rec = content.config_records[RECORD]
    except (KeyError, AttributeError, TypeError):
        raise MalformedMessage(f"message: no '{RECORD}' config record") from None
    if get(rec, "v", int) != PROTOCOL:
        raise MalformedMessage(f"message: protocol version {rec['v']} != {PROTOCOL}")
    return rec


def _flat_json(s: Any, what: str, max_items: int = 1024) -> dict[str, Any]:
    """A short JSON object of at most ``max_items`` scalar (number, string, bool) values."""
    if not isinstance(s, str) or len(s) > MAX_JSON:
        raise MalformedMessage(f"{what}: not a short JSON string")
    try:
        d = json.loads(s)
    except json.JSONDecodeError:
        raise MalformedMessage(f"{what}: not JSON") from None
    if not isinstance(d, dict) or len(d) > max_items or not all(
            isinstance(v, (float, str, bool)) or (isinstance(v, int) and abs(v) < 2**63) for v in d.values()):
        raise MalformedMessage(f"{what}: not a flat JSON object of at most {max_items} scalar entries")
    return d


def decode_metrics(s: Any) -> dict[str, float]:
    """Client-reported metrics: a flat JSON object of at most 64 finite numbers."""
    out = {}
    for k, v in _flat_json(s, "metrics", 64).items():
        if isinstance(v, (bool, str)) or not math.isfinite(v) or len(k) > 64:
            raise MalformedMessage(f"metrics: '{k[:64]}' is not a finite number")
        out[k] = float(v)
    return out


def encode_state(state: dict[str, Any]) -> str:
    """The engine's JSON-able scalar state (what client stages may read, e.g. a clip bound)."""
    return json.dumps({k: v for k, v in state.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))},
                      sort_keys=True)


def decode_state(s: Any) -> dict[str, Any]:
    return _flat_json(s, "state")


def encode_dp(params: Any) -> str:
    """The DP parameters the server's guard and stages fixed for this round (:class:`secfed.rounds.DPRoundParams`
    or its dict), for the nodes to apply."""
    from secfed.rounds import DPRoundParams

    return json.dumps(DPRoundParams.of(params).items(), sort_keys=True)


def decode_dp(s: Any) -> Any:
    """Validated :class:`~secfed.rounds.DPRoundParams`: known keys only, finite positive numbers, an int
    divisor, a bool flag."""
    from secfed.rounds import DPRoundParams

    out: dict[str, Any] = {}
    for k, v in _flat_json(s, "dp").items():
        kind = DPRoundParams.KINDS.get(k)
        if kind is None:
            raise MalformedMessage(f"dp: unknown key '{k[:32]}'")
        if kind is bool:
            if not isinstance(v, bool):
                raise MalformedMessage(f"dp: '{k}' is not a bool")
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_COHORT:
                raise MalformedMessage(f"dp: '{k}' is not a positive int")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise MalformedMessage(f"dp: '{k}' is not a finite positive number")
        out[k] = kind(v)
    return DPRoundParams(**out)


# Which runs keep per-client metrics on the client (review finding 7): one rule for every transport.
from secfed.rounds import metrics_stay_on_node, pipeline_is_dp, run_is_dp  # noqa: E402,F401
