"""Compiled one-pass centered clipping (numba, ``cache=True``).

``clip_step(X, v, tau)``: one centered-clipping step (Karimireddy, He & Jaggi 2021),
``v + (1/n) sum_i c_i (x_i - v)`` with ``c_i = min(1, tau / ||x_i - v||)``. The torch path reads X
twice from memory (the row distances, then the weighted sum ``c @ X``). Here the rows are taken in
groups of ``R`` (``R d`` values ~ 8 MiB, so a group stays in the last-level cache): a group's
distances (phase A, the one read from memory), then, in the next parallel region, its clipped
differences are added to a float64 accumulator (phase B, the group read again from cache) while
phase A of the next group runs. Distances and the sum are float64 (``(x - v)^2`` and ``c (x - v)``
per element), so the result is the exact value rounded once to the input dtype; the torch path
rounds the differences, the block norms and the GEMV's partial sums to float32, so the two agree to a
few float32 ulps, not bit for bit.

Generic in n and d (one compile per dtype). Columns are split into blocks over numba's threads
(``prange``), as many as torch uses (``torch.get_num_threads()``), serialised by ``_select_kernel``'s
lock, which also chose numba's cache directory and fork-safe threading layer. Memory: the (d,) float64
accumulator and an (R, blocks) table of partial distances; no (n, d) temporary. First call per dtype:
a compile (measured 33 s on a 2-core machine at load 15; a few seconds idle), then loaded from numba's
cache. Importing raises ImportError without numba (or with ``SECFED_NO_NUMBA=1``): the caller keeps
its torch path then.
"""

from __future__ import annotations

import numpy as np
import torch

from defenses.robust._select_kernel import _CACHE, _lock, numba

COL_BLOCK = 1 << 13  # columns per parallel task: 8192 float64 accumulators = 64 KiB, stays in L2
GROUP_BYTES = 1 << 23  # rows per clip group: R * d * itemsize ~ 8 MiB, re-read from cache in phase B


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def _clip_kernel(X, v, has_v, tau, R, cb, out, dist):  # noqa: ANN001 - numba signature
    """out (float64, zeroed) += sum_i c_i (x_i - v); dist[i] = ||x_i - v|| (float64).

    Step k is one parallel region over column blocks: phase B of row group k-1 (its c_i known,
    its rows still in cache from step k-1) and phase A (partial squared distances) of group k,
    so there are ceil(n / R) + 1 regions, not two per group."""
    n, d = X.shape
    nb = (d + cb - 1) // cb
    ng = (n + R - 1) // R
    part = np.zeros((R, nb))
    c = np.zeros(R)
    for k in range(ng + 1):
        a0 = k * R
        a1 = min(n, a0 + R) if k < ng else a0
        b0 = (k - 1) * R
        b1 = min(n, b0 + R) if k > 0 else b0
        for b in numba.prange(nb):
            s = b * cb
            e = min(d, s + cb)
            for r in range(b0, b1):  # phase B of group k-1; 0 * inf = NaN for an infinite row, as torch
                cr = c[r - b0]
                if has_v:
                    for j in range(s, e):
                        out[j] += cr * (np.float64(X[r, j]) - np.float64(v[j]))
                else:
                    for j in range(s, e):
                        out[j] += cr * np.float64(X[r, j])
            for r in range(a0, a1):  # phase A of group k
                acc = 0.0
                if has_v:
                    for j in range(s, e):
                        t = np.float64(X[r, j]) - np.float64(v[j])
                        acc += t * t
                else:
                    for j in range(s, e):
                        t = np.float64(X[r, j])
                        acc += t * t
                part[r - a0, b] = acc
        for r in range(a0, a1):
            total = 0.0
            for b in range(nb):  # a fixed order: the result does not depend on the thread count
                total += part[r - a0, b]
            dist[r] = np.sqrt(total)
            c[r - a0] = min(1.0, tau / max(dist[r], 1e-30))


MIN_BYTES = 1 << 23  # below this X stays in cache between torch's two passes: the kernel's launch would not pay


def supports(X: torch.Tensor) -> bool:
    """CPU float32/float64 tensors that do not need a gradient and are larger than ``MIN_BYTES``."""
    return (X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and not X.requires_grad
            and X.numel() * X.element_size() >= MIN_BYTES)


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def clip_step(X: torch.Tensor, v: torch.Tensor | None, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One centered-clipping step from ``v`` (None = zeros): returns ``(v_new, dists)``, v_new in X's dtype,
    ``dists[i] = ||x_i - v||`` (float64)."""
    n, d = X.shape
    Xn = X.detach().contiguous().numpy()
    vn = np.zeros(1, dtype=Xn.dtype) if v is None else v.detach().to(X.dtype).contiguous().numpy()
    out = np.zeros(d)
    dist = np.empty(n)
    R = max(1, min(n, GROUP_BYTES // max(1, d * Xn.itemsize)))
    with _lock:
        _threads()
        _clip_kernel(Xn, vn, v is not None, float(tau), R, COL_BLOCK, out, dist)
    out /= n
    if v is not None:
        out += vn
    return torch.from_numpy(out.astype(Xn.dtype)), torch.from_numpy(dist)

