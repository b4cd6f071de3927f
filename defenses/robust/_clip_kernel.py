"""Compiled centred-clipping step: ``sum_i c_i x_i`` with ``c_i = min(1, tau / ||x_i - v||) / n`` in one
pass over memory (issue 20).

``CenteredClipping`` needs every row's distance to the centre before it can weight the rows, so the
torch path reads X twice from memory (row distances, then one GEMV). Here the rows go in blocks
that fit in the last-level cache (``BLOCK_BYTES``): a block's distances are computed (the block comes
from memory), then the block is added into the output while it is still in cache, so X is read
from memory about once. Distances: squared differences summed in X's dtype per chunk of
``CHUNK`` coordinates (spread over the vector lanes), chunk sums in float64, in order; the weighted sum in X's dtype (float32), rows added
in order. Results do not depend on the thread count; they differ from the GEMV's by rounding only
(a different summation order).

Numba setup (cache directory, threading layer, the call lock) is ``_select_kernel``'s: importing
this module raises ImportError where that one does, and ``CenteredClipping`` keeps the torch path.
"""

from __future__ import annotations

import numpy as np
import torch

from defenses.robust._select_kernel import _CACHE, _lock, numba

CHUNK = 4096  # coordinates per parallel task
BLOCK_BYTES = 8 << 20  # rows per block: 8 MiB of X, with the (d,) output and centre, stays in L3
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True, fastmath=_FASTMATH)
def _clip_step(X, v, centred, tau, scale, rows_per_block, chunk, out, c, cw):  # noqa: ANN001 - numba signature
    """``out = sum_i c_i x_i`` (c_i = scale * min(1, tau / ||x_i - v||), written to ``c`` in float64 and to
    ``cw`` in X's dtype, the weight actually applied); v is read only when ``centred``."""
    n, d = X.shape
    nchunks = (d + chunk - 1) // chunk
    part = np.zeros((rows_per_block, nchunks), dtype=np.float64)
    for b0 in range(0, n, rows_per_block):
        b1 = min(n, b0 + rows_per_block)
        for t in numba.prange(nchunks):
            s = t * chunk
            e = min(d, s + chunk)
            for i in range(b0, b1):
                acc = X[i, s] * 0  # X's dtype
                if centred:
                    for k in range(s, e):
                        u = X[i, k] - v[k]
                        acc += u * u
                else:
                    for k in range(s, e):
                        acc += X[i, k] * X[i, k]
                part[i - b0, t] = acc
        for i in range(b0, b1):
            sq = 0.0
            for t in range(nchunks):
                sq += part[i - b0, t]
            dist = np.sqrt(sq)
            c[i] = scale * (1.0 if dist <= tau else tau / max(dist, 1e-30))
            cw[i] = c[i]
        for t in numba.prange(nchunks):
            s = t * chunk
            e = min(d, s + chunk)
            for i in range(b0, b1):
                w = cw[i]
                for k in range(s, e):
                    out[k] += w * X[i, k]


def supports(X: torch.Tensor) -> bool:
    """CPU float32/float64 without a gradient."""
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and not X.requires_grad


def clipped_sum(X: torch.Tensor, v: torch.Tensor | None, tau: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i c_i x_i, c)`` with ``c_i = scale * min(1, tau / ||x_i - v||)`` (v = None: the origin); c in
    float64."""
    Xn = X.detach().contiguous().numpy()
    n, d = Xn.shape
    vn = Xn[0] if v is None else v.detach().to(X.dtype).contiguous().numpy()
    out = np.zeros(d, dtype=Xn.dtype)
    c = np.zeros(n, dtype=np.float64)
    cw = np.zeros(n, dtype=Xn.dtype)
    rows = max(1, min(n, BLOCK_BYTES // max(1, d * Xn.itemsize)))
    with _lock:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _clip_step(Xn, vn, v is not None, float(tau), float(scale), rows, CHUNK, out, c, cw)
    return torch.from_numpy(out), torch.from_numpy(c)
