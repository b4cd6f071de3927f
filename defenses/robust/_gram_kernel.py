"""Compiled Gram matrix ``G = X X^T`` of a float32 ``(n, d)`` array with n << d (issue 20).

Krum, Multi-Krum, NNM and the geometric median need every pairwise inner product of n client
updates of d coordinates: ``n (n + 1) / 2 * d`` multiply-adds. A BLAS ``sgemm`` computes all
``n^2`` (twice the symmetric work) and, for this shape (tiny output, huge inner dimension),
runs far from the machine's peak (MKL on a 2-core AMD EPYC: ~38 GFLOP/s, 65 ms at n = 50,
d = 1e6, three passes over memory); it also accumulates 1e6 products in float32 (relative
error about 2e-6 of ``max |G|``).

This kernel computes the lower triangle only, register-blocked 4 rows x 2 rows (eight
accumulators; LLVM vectorises the inner loop over coordinates with ``fastmath`` reassociation),
on chunks of ``CHUNK`` coordinates whose n row segments stay in L2. Each chunk's products are
summed in float32 (at most ``CHUNK`` terms, spread over the vector lanes), chunk sums in float64.
Measured at n = 50, d = 1e6: about 2x faster than MKL and ~300x more accurate (max error 1e-8 of
``max |G|`` against a float64 product).

Determinism: chunk ``c`` always adds into slot ``c % SLOTS`` and the slots are summed in a fixed
order, so the result does not depend on the thread count (a BLAS result may).

Numba setup (cache directory, threading layer, the call lock) is ``_select_kernel``'s: importing
this module raises ImportError where that one does, and ``_ops.gram64`` then uses ``X @ X.T``.
"""

from __future__ import annotations

import numpy as np
import torch

from defenses.robust._select_kernel import _CACHE, kernel_threads, numba, plain_cpu

CHUNK = 2048  # coordinates per chunk: n = 50 row segments of 8 KiB = 400 KiB, in L2
SLOTS = 16  # partial Gram matrices, one per chunk residue: the sum order is fixed
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True, fastmath=_FASTMATH)
def _lower_gram(X, chunk, out):  # noqa: ANN001 - numba signature
    """``out[s, i, j] += sum over chunks c = s (mod SLOTS) of X[i, c] . X[j, c]`` for j <= i (plus a few
    j = i + 1 entries of the diagonal blocks, discarded by the caller)."""
    n, d = X.shape
    slots = out.shape[0]
    nchunks = (d + chunk - 1) // chunk
    n4 = n - n % 4
    for slot in numba.prange(slots):
        acc = out[slot]
        for c in range(slot, nchunks, slots):
            s = c * chunk
            e = min(d, s + chunk)
            for i in range(0, n4, 4):
                x0 = X[i, s:e]
                x1 = X[i + 1, s:e]
                x2 = X[i + 2, s:e]
                x3 = X[i + 3, s:e]
                for j in range(0, i + 4, 2):  # j + 1 <= i + 3 < n
                    y0 = X[j, s:e]
                    y1 = X[j + 1, s:e]
                    a00 = np.float32(0.0)
                    a01 = np.float32(0.0)
                    a10 = np.float32(0.0)
                    a11 = np.float32(0.0)
                    a20 = np.float32(0.0)
                    a21 = np.float32(0.0)
                    a30 = np.float32(0.0)
                    a31 = np.float32(0.0)
                    for k in range(e - s):
                        v0 = y0[k]
                        v1 = y1[k]
                        u = x0[k]
                        a00 += u * v0
                        a01 += u * v1
                        u = x1[k]
                        a10 += u * v0
                        a11 += u * v1
                        u = x2[k]
                        a20 += u * v0
                        a21 += u * v1
                        u = x3[k]
                        a30 += u * v0
                        a31 += u * v1
                    acc[i, j] += a00
                    acc[i, j + 1] += a01
                    acc[i + 1, j] += a10
                    acc[i + 1, j + 1] += a11
                    acc[i + 2, j] += a20
                    acc[i + 2, j + 1] += a21
                    acc[i + 3, j] += a30
                    acc[i + 3, j + 1] += a31
            for i in range(n4, n):  # the last n % 4 rows, one pair at a time
                xi = X[i, s:e]
                for j in range(i + 1):
                    xj = X[j, s:e]
                    a = np.float32(0.0)
                    for k in range(e - s):
                        a += xi[k] * xj[k]
                    acc[i, j] += a


def supports(X: torch.Tensor) -> bool:
    """CPU float32 without a gradient (float64 and other devices keep the BLAS product)."""
    return plain_cpu(X) and X.dim() == 2


def gram(X: torch.Tensor) -> torch.Tensor:
    """``X X^T`` in float64, exactly symmetric. X must pass ``supports``."""
    Xn = X.detach().contiguous().numpy()
    n = Xn.shape[0]
    out = np.zeros((SLOTS, n, n), dtype=np.float64)
    if Xn.shape[1]:
        with kernel_threads():
            _lower_gram(Xn, CHUNK, out)
    L = np.tril(out.sum(0))
    return torch.from_numpy(L + np.tril(L, -1).T)
