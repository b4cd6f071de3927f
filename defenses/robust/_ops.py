"""Vectorised building blocks shared by the robust aggregators.

Everything works on an ``(n, d)`` float tensor of updates, one row per client,
with memory O(n d + n^2): pairwise distances come from one Gram matrix
(``gram64``: a compiled kernel for CPU float32, else one matrix product);
per-coordinate order statistics (median, trimmed mean) from the selection
networks of ``order_stats``.
"""

from __future__ import annotations

import functools
import importlib
import math
import mmap
import types

import torch

#: Outputs from this size on come from :func:`empty_rows`' huge-page mapping (below it, torch's allocator).
HUGE_MIN_BYTES = 16 << 20
_HUGE = 2 << 20


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor for a large aggregator output, backed by transparent huge pages where the
    kernel offers them (``madvise(MADV_HUGEPAGE)``; Linux with THP in "madvise" or "always" mode).

    A fresh ``(n, d)`` output from torch's allocator is a new anonymous mapping every call (glibc maps
    blocks over 32 MiB with ``mmap``), first touched one 4 KiB page fault at a time: measured on a 2-core
    EPYC VM, allocating and filling a (50, 1e6) float32 output took 165-260 ms against 31-50 ms for the same
    copy into a warm buffer, and 45-70 ms with 2 MiB pages (issue 20: StaticClip's and NNM's outputs).
    The memory is returned when the tensor is freed (the mapping lives as long as the tensor's storage).
    Below ``HUGE_MIN_BYTES``, or where ``madvise`` is missing, this is ``torch.empty``."""
    numel = math.prod(int(s) for s in shape)
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // _HUGE) * _HUGE
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(m, dtype=dtype, count=numel).view(shape)


def rows_out(shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor | None:
    """An ``out=`` tensor from :func:`empty_rows` for an op on ``inputs`` (plain CPU tensors of one dtype, no
    autograd), else None: the op then allocates its own result as usual."""
    dtype = inputs[0].dtype
    if any(t.device.type != "cpu" or t.requires_grad or t.dtype != dtype for t in inputs):
        return None
    return empty_rows(tuple(shape), dtype)


def check_updates(X: torch.Tensor, name: str) -> torch.Tensor:
    """Validate the ``(n, d)`` input of an aggregator; returns it as float."""
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"{name}: expected an (n, d) tensor of updates, got {getattr(X, 'shape', type(X))}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: no updates to aggregate")
    return X if X.is_floating_point() else X.float()


def check_f(f: int, name: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: f must be a non-negative integer (got {f!r})")
    return f


def pairwise_sq_dists(X: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = ||x_i - x_j||^2`` through one ``n x n x d`` matrix product (float64 result).

    ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` loses precision when two rows are much closer to
    each other than to the origin (float32 Gram entries carry an error of about
    1e-6 (|x_i|^2 + |x_j|^2)). If any pair is that close, the Gram matrix is recomputed
    on rows centred on their mean (translation invariant, an extra (n, d) copy), which
    removes the common offset. The diagonal is exactly 0 and D is symmetric.
    """
    G = gram64(X)
    D = _sq_dists_from_gram(G)
    G_diag = G.diagonal()  # |x_i|^2 from the same product: no second pass over X for the norms
    scale = G_diag[:, None] + G_diag[None, :]
    if bool((D < 1e-3 * scale).fill_diagonal_(False).any()):
        Xc = X - X.mean(0, keepdim=True)
        D = _sq_dists_from_gram(gram64(Xc))
    return D


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> types.ModuleType | None:
    """The numba kernel module ``defenses.robust.<name>`` (``_select_kernel``, ``_gram_kernel``,
    ``_clip_kernel``, ``_rows_kernel``), or None (numba missing or unusable, or ``SECFED_NO_NUMBA`` set): the caller then takes
    its torch path. Imported on first use, not with the package: numba costs ~0.5 s to import."""
    try:
        return importlib.import_module(f"defenses.robust.{name}")
    except Exception:  # noqa: BLE001 - any failure to load numba means the torch path
        return None


def gram64(X: torch.Tensor) -> torch.Tensor:
    """``G = X X^T`` in float64, exactly symmetric.

    CPU float32 input goes to the compiled lower-triangle kernel (``_gram_kernel``: float32 sums
    over chunks of 2048 coordinates, float64 across chunks; measured ``max |G - G_exact| <= 1e-8
    max_ij |G_ij|`` at n = 50, d = 1e6, and about 2x faster than MKL's sgemm); anything else is one
    matrix product in X's dtype (MKL sgemm on float32: ``<= 2.3e-6 max_ij |G_ij|``). Callers budget
    for the BLAS bound: a quantity formed from G, like ``|x_i|^2 + |x_j|^2 - 2 G_ij``, carries an
    absolute error of about ``5e-6 (|x_i|^2 + |x_j|^2)``; they guard against cancellation.
    """
    kernel = compiled("_gram_kernel")
    if kernel is not None and kernel.supports(X):
        return kernel.gram(X)
    G = (X @ X.T).double()
    return 0.5 * (G + G.T)


def _sq_dists_from_gram(G: torch.Tensor) -> torch.Tensor:
    """Squared distances from a ``gram64`` matrix (float64, exactly symmetric)."""
    sq = G.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min_(0.0)
    D.fill_diagonal_(0.0)
    return D


def row_norms(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(X, dim=1)


DIST_BLOCK = 1 << 14  # columns per block in dists_to: an (n, 16384) difference stays in cache


def dists_to(X: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``||x_i - z||`` for every row, exact (no ``|x|^2 - 2 x.z + |z|^2`` cancellation when rows are close
    to z): the differences are formed one cache-sized block of columns at a time, so there is no
    (n, d) temporary, and the squared block norms are accumulated in float64."""
    n, d = X.shape
    z = z.reshape(-1).to(X.dtype)
    acc = torch.zeros(n, dtype=torch.float64)
    for s in range(0, d, DIST_BLOCK):
        acc += torch.linalg.vector_norm(X[:, s:s + DIST_BLOCK] - z[s:s + DIST_BLOCK], dim=1).double() ** 2
    return acc.sqrt_().to(X.dtype)


def clip_rows(X: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Scale each row to norm at most ``max_norm``: ``x * min(1, C / ||x||)`` (a large output in huge pages)."""
    norms = row_norms(X)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    return torch.mul(X, scale[:, None], out=rows_out(X.shape, X, scale))

