"""Fixed-point encoding of weighted updates into the ring Z_{2^b}.

Client i sends the b-bit words of ``(W_i * z_i, W_i)`` where

    z_i = floor(delta_i * s + U),  U ~ Uniform[0, 1)^d,   s = (2^(q-1) - 1) / R

is stochastic rounding onto the grid of step 1/s (unbiased: E[z_i] = s * delta_i),
R = ``clip_range`` bounds every coordinate (|delta_i|_inf <= R, so |z_i| <= 2^(q-1) - 1),
and W_i is the client's integer aggregation weight (examples for FedAvg, 1 for
uniform), 0 <= W_i <= ``max_weight``. The server reads the ring sum as signed b-bit
integers: sum_i W_i z_i / s ~ sum_i W_i delta_i, and sum_i W_i exactly.

No wrap-around: |sum_i W_i z_i| <= n * max_weight * (2^(q-1) - 1) < 2^(b-1) holds iff
q + ceil(log2(n * max_weight)) <= b, which :func:`choose_bits` enforces.

The product delta * s is computed in float64 and the level clamped to
+-(2^(q-1) - 1), so a float32 delta of exactly +-R cannot round one level past the
bound (under NumPy 2 a float32 array times a Python float is computed in float32;
review finding 11).

A client whose update leaves [-R, R] (or is not finite, or whose weight is not an
integer in [0, max_weight]) is told so by :meth:`Quantizer.check` and the round
reports it; nothing is clipped. Flower's SecAgg+ silently clips to +-8 instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from secfed.errors import ConfigError

from .prg import RING_DTYPES

_SIGNED = {32: np.int32, 64: np.int64}

#: The only out-of-range reason a client states: one bit, never the magnitude of its update.
OUT_OF_RANGE = "update outside [-clip_range, clip_range] (not clipped; raise clip_range or clip the update)"



def choose_bits(n: int, max_weight: int, bits: int | str = "auto") -> tuple[int, int]:
    """(q, b): quantisation bits and ring bits so that the sum of n clients cannot wrap."""
    headroom = max(1, math.ceil(math.log2(max(2, n * max_weight))))
    if bits == "auto":
        if 32 - headroom >= 24:
            return 32 - headroom, 32
        if 64 - headroom < 16:
            raise ConfigError(f"config key 'server.secure_sum.max_weight': {max_weight} x {n} clients leaves "
                              "fewer than 16 quantisation bits in a 64-bit ring; lower max_weight")
        return min(64 - headroom, 32), 64
    q = int(bits)
    for b in (32, 64):
        if q + headroom <= b:
            return q, b
    raise ConfigError(f"config key 'server.secure_sum.bits': {q} bits + {headroom} bits of headroom for {n} clients "
                      f"x max_weight {max_weight} exceed the 64-bit ring; lower bits or max_weight")


@dataclass(frozen=True)
class Quantizer:
    clip_range: float
    bits: int
    ring_bits: int

    @property
    def max_level(self) -> int:
        """The largest |z| the no-wrap bound of :func:`choose_bits` allows: 2^(q-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    @property
    def scale(self) -> float:
        return self.max_level / self.clip_range

    def check(self, delta: np.ndarray, weight: float, max_weight: int) -> str | None:
        """None if the update can be encoded, else the reason it cannot (told to the client)."""
        hi, lo = (float(delta.max()), float(delta.min())) if delta.size else (0.0, 0.0)
        if not (math.isfinite(hi) and math.isfinite(lo)):  # max/min propagate NaN and inf
            return "update has non-finite values"
        # float32 rounding of R itself (e.g. float32(0.1) > 0.1) is not a violation: the encoder clamps it.
        # The reason never states the magnitude (review finding 7).
        if max(hi, -lo) > self.clip_range * (1 + 2.0**-22):
            return OUT_OF_RANGE
        if not (math.isfinite(weight) and weight >= 0 and abs(weight - round(weight)) < 1e-9 and round(weight) <= max_weight):
            return f"weight {weight} is not an integer in [0, max_weight={max_weight}]"
        return None

    def encode(self, delta: np.ndarray, weight: int, generator: torch.Generator, ws: "Workspace | None" = None) -> np.ndarray:
        """The (d + 1,) ring vector (W * z, W) of one client (``ws.out`` when a workspace is given).

        U is simulation randomness (not a secret the protocol relies on): a PCG64
        stream seeded from ``generator`` (the run's per-client, per-round generator),
        drawn in float32 (24 random bits), so P[round up] is within 2^-24 of the exact
        fraction. A deployed client would draw U from its own RNG.
        """
        ws = ws or Workspace(delta.shape[0], self.ring_bits)
        np.random.Generator(np.random.PCG64(generator.initial_seed())).random(dtype=np.float32, out=ws.u)
        v = ws.v
        np.copyto(v, delta, casting="unsafe")  # float64 first: NumPy 2 would multiply a float32 delta in float32
        np.multiply(v, self.scale, out=v)  # and round R * s = 2^(q-1) - 1 up to 2^(q-1), one above the bound
        np.add(v, ws.u, out=v)
        np.floor(v, out=v)
        np.clip(v, -self.max_level, self.max_level, out=v)  # |z| <= 2^(q-1) - 1 whatever the rounding did
        np.copyto(ws.z, v, casting="unsafe")  # exact: |v| < 2^62
        if weight != 1:
            np.multiply(ws.z, int(weight), out=ws.z)
        np.copyto(ws.out[:-1], ws.z, casting="unsafe")  # two's complement wrap into Z_{2^b}
        ws.out[-1] = int(weight)
        return ws.out

    def decode(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """(sum_i W_i delta_i as float64, sum_i W_i) from the unmasked ring sum."""
        signed = ring_sum.view(_SIGNED[self.ring_bits])
        return signed[:-1].astype(np.float64) / self.scale, int(signed[-1])


class Workspace:
    """Buffers reused across encodings of d coordinates (no fresh 8-byte-per-coordinate arrays per client)."""

    def __init__(self, d: int, ring_bits: int) -> None:
        self.u = np.empty(d, dtype=np.float32)
        self.v = np.empty(d, dtype=np.float64)
        self.z = np.empty(d, dtype=np.int64)
        self.out = np.empty(d + 1, dtype=RING_DTYPES[ring_bits])
