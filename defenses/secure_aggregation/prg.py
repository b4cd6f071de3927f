"""Mask expansion: AES-256-CTR keyed by the full 256-bit secret, read as Z_{2^b} words.

PRG(s) = AES-256-CTR_{K}(0^{b/8 * d}) with K = HKDF-SHA256(s, info = label || context),
counter block starting at 0; the keystream is read little-endian as d unsigned b-bit
words (b in {32, 64}), which are uniform on Z_{2^b} because 2^b divides 2^128. Each
key is used for exactly one stream (the context binds protocol, purpose, round and
the pair of clients), so a fixed counter start is safe.

Flower's SecAgg+ (``pseudo_rand_gen``) instead XOR-folds the 32-byte seed to 32 bits
and expands it with ``numpy.random.RandomState``: only 2^32 masks exist, which a
server can enumerate. Here the mask has the full 256-bit key as its entropy.

:class:`MaskExpander` adds (or subtracts) masks into an accumulator in place; the
ring arithmetic is numpy's wrap-around of unsigned integers, so the cost is the
keystream plus one vector addition.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_ZERO_IV = bytes(16)


def derive_key(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(secret, salt=None, info) -> 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class MaskExpander:
    """Expands 32-byte keys into ``d`` words of Z_{2^ring_bits}, reusing two buffers."""

    def __init__(self, d: int, ring_bits: int) -> None:
        if ring_bits not in RING_DTYPES:
            raise ValueError("ring_bits must be 32 or 64")
        self.d, self.dtype = d, RING_DTYPES[ring_bits]
        self.nbytes = d * self.dtype.itemsize
        self._zeros = bytes(self.nbytes)
        self._buf = bytearray(self.nbytes + 15)  # cryptography's update_into wants len + block - 1

    def keystream(self, key: bytes) -> np.ndarray:
        """The mask as a view on the internal buffer (valid until the next call)."""
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
        enc.update_into(self._zeros, self._buf)
        return np.frombuffer(self._buf, dtype=self.dtype, count=self.d)

    def expand(self, key: bytes) -> np.ndarray:
        return self.keystream(key).copy()

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc <- acc + sign * PRG(key)  (mod 2^b), in place."""
        m = self.keystream(key)
        if sign >= 0:
            np.add(acc, m, out=acc)
        else:
            np.subtract(acc, m, out=acc)
