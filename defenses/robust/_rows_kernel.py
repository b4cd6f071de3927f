"""Compiled mean of selected rows of a float32 ``(n, d)`` array, one pass over those rows (issue 20).

Multi-Krum (Blanchard et al. 2017) averages the ``m`` updates it selects. Written as ``w @ X`` with
zero weights for the others, a GEMV reads all n rows (and MKL's transposed GEMV reaches about 0.6x the
bandwidth of one ``X.sum(0)``: 32 ms at n = 50, d = 1e6 against 20 ms); ``X[idx].mean(0)`` copies the
m rows first. Here threads take chunks of ``CHUNK`` coordinates and add the m row segments into a
float64 accumulator that stays in L1, so only the selected rows cross the memory bus, once.

Arithmetic: per coordinate, the selected rows are added in the order given, in float64 (a float32
value converts exactly), then divided by m and rounded once to float32: at most half an ulp from the
exact mean where the float64 sum is exact (always for m <= 2^29 / 2^(e_max - e_min)), and never worse
than the float32 GEMV it replaces. Nothing depends on the thread count (threads split coordinates).
Numba setup (cache directory, threading layer, the call lock: ``kernel_threads``) is ``_select_kernel``'s:
importing this module raises ImportError where that one does, and ``MultiKrum`` keeps ``w @ X``.
"""

from __future__ import annotations

import numpy as np
import torch

from defenses.robust._select_kernel import _CACHE, kernel_threads, numba, plain_cpu

CHUNK = 2048  # coordinates a thread takes at a time: a 16 KiB float64 accumulator, in L1
MIN_BYTES = 8 << 20  # below this the whole X is cache-resident and ``w @ X`` costs as little


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True)
def _rows_mean(X, idx, chunk, out):  # noqa: ANN001 - numba signature
    """``out[c] = float32(sum_k X[idx[k], c] / m)`` with the sum in float64, in the order of ``idx``."""
    d = X.shape[1]
    m = idx.shape[0]
    nch = (d + chunk - 1) // chunk
    for ch in numba.prange(nch):
        a = ch * chunk
        b = min(d, a + chunk)
        acc = np.zeros(b - a, dtype=np.float64)
        for k in range(m):
            x = X[idx[k], a:b]
            for t in range(b - a):
                acc[t] += x[t]
        for t in range(b - a):
            out[a + t] = np.float32(acc[t] / m)


def supports(X: torch.Tensor) -> bool:
    """CPU float32 of at least ``MIN_BYTES`` without a gradient (anything else keeps ``w @ X``)."""
    return plain_cpu(X) and X.dim() == 2 and X.numel() * 4 >= MIN_BYTES


def rows_mean(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The mean of rows ``idx`` of X (X must pass ``supports``; ``idx`` non-empty, in range)."""
    Xn = X.detach().contiguous().numpy()
    ix = idx.detach().to(torch.int64).contiguous().numpy()
    if ix.size == 0 or ix.min() < 0 or ix.max() >= Xn.shape[0]:
        raise ValueError("rows_mean: the row indices must be non-empty and within X")
    out = np.empty(Xn.shape[1], np.float32)
    if Xn.shape[1]:
        with kernel_threads():
            _rows_mean(Xn, ix, CHUNK, out)
    return torch.from_numpy(out)
