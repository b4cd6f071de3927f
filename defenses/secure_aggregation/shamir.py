"""Shamir t-of-k secret sharing over the prime field GF(p), p = 2^256 + 297.

Shamir 1979, "How to share a secret": a degree t-1 polynomial f with f(0) = secret
and random other coefficients; share i is (x_i, f(x_i)); any t shares give f(0)
by Lagrange interpolation at 0, fewer reveal nothing.

Convention: p = 2^256 + 297 is the smallest prime above 2^256, so every 32-byte
secret (a 256-bit mask seed or an X25519 private key) is one field element, with
no padding or chunking (Flower splits secrets into 16-byte chunks for PyCryptodome's
GF(2^128) Shamir). A share's y is written as 33 big-endian bytes. Coefficients come
from :mod:`secrets` (the OS CSPRNG). In secfed the x-coordinate of a share is the
holder's client id + 1, so it is never sent and never 0.
"""

from __future__ import annotations

import secrets as _secrets

from secfed.errors import MalformedMessage

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
SHARE_BYTES = 33


def split(secret: bytes, threshold: int, xs: list[int]) -> list[int]:
    """Share ``secret`` (32 bytes) at the points ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in (0, p)")
    coeffs = [int.from_bytes(secret, "big")] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def combine(points: list[tuple[int, int]], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from ``threshold`` of the given (x, y) shares.

    Raises :class:`MalformedMessage` if there are too few shares, duplicate x, values
    outside the field, or the result is not a 32-byte secret (inconsistent shares).
    """
    pts = sorted(dict(points).items())
    if len(pts) != len(points):
        raise MalformedMessage("shamir: duplicate share points")
    if len(pts) < threshold:
        raise MalformedMessage(f"shamir: {len(pts)} shares, {threshold} needed")
    pts = pts[:threshold]
    if any(not (0 < x < PRIME and 0 <= y < PRIME) for x, y in pts):
        raise MalformedMessage("shamir: share outside the field")
    secret = 0
    for j, (xj, yj) in enumerate(pts):
        num, den = 1, 1
        for m, (xm, _) in enumerate(pts):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise MalformedMessage("shamir: shares are inconsistent (result exceeds 256 bits)")
    return secret.to_bytes(SECRET_BYTES, "big")


def y_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def y_from_bytes(b: bytes) -> int:
    y = int.from_bytes(b, "big")
    if len(b) != SHARE_BYTES or y >= PRIME:
        raise MalformedMessage("shamir: share value is not a field element")
    return y
