"""Compiled per-coordinate order statistics: a selection network run on 64 coordinates at once.

``middle_stat(X, lo, hi, mode)`` computes, for every column j of a C-contiguous ``(n, d)``
float32/float64 array, one statistic of the order statistics ``lo .. hi-1`` (0-based, ascending):

* ``mode="sum"``:  ``sum_{lo <= r < hi} x_(r)``, accumulated in float64 in ascending rank order,
  rounded once to the input dtype;
* ``mode="mean"``: the same float64 sum divided by ``hi - lo`` (one rounding);
* ``mode="pair_mean"`` (``hi = lo + 2``): ``(x_(lo) + x_(lo+1)) * 0.5`` in the input dtype (the even-n
  median, bit-identical to the torch path's ``(a + b) * 0.5``);
* ``mode="closest_mean"`` (``lo = 0``, ``hi = beta``): Bulyan's second step, the mean of the beta values
  closest to the column's median (the median exactly as ``coordinate_median``, distances
  ``|x - med|`` in the input dtype; float64 sum). In sorted order they form a window
  ``[i, i + beta)``, and i is the number of window positions where the value leaving is strictly
  farther from the median than the one entering (so a tie keeps the lower value).

A column holding a NaN gives NaN (as the torch path).

How: coordinates are processed in groups of ``LANES = 64``. A group is copied into a small
contiguous tile ``t[n][64]`` (row r of the tile = the group's 64 values of client r; 256 bytes
for float32, so the tile stays in L1 up to n ~ 128 and in L2 up to n ~ 2000), then a comparator
network sorts every one of the 64 columns at once: each comparator is one vector ``min`` and one
vector ``max`` over two tile rows (8 ``vminps`` + 8 ``vmaxps`` on AVX2, no branches). 64 lanes
measured faster than 8, 16 or 32 at n = 50, 200 and 1000 (more independent work per comparator).
The network is Batcher's odd-even merge sort (Batcher 1968, "Sorting networks and their
applications") on ``N = 2^ceil(log2 n)`` wires with every comparator touching a wire ``>= n`` dropped (those
wires would hold +inf and each such comparator is a no-op, so the rest sorts n values), then
pruned backwards to the comparators whose outputs reach ranks ``[lo, hi)`` (a comparator
only one of whose outputs is needed becomes a single ``min`` or ``max``). The network is built
in Python once per ``(n, lo, hi)`` and passed to the kernel as arrays, so the compiled kernel
is generic in n: no compile per cohort size. Columns run in parallel (``prange`` over chunks of
groups), the GIL is released.

Cost: O(n log^2 n) vector comparisons per 64 columns, memory O(n d) (input and output) plus one
tile per thread. The comparators are emitted as LLVM vector instructions (``numba.extending
.intrinsic``), because numba's scalar code for ``t[a, l]``/``t[b, l]`` is not vectorised (LLVM
cannot rule out that the rows overlap).

Numba: ``cache=True``. The first call per dtype compiles (5-20 s on a 2-core machine; loading
it from the cache afterwards takes well under a second); the machine code is cached in
``defenses/robust/__pycache__`` (numba's in-tree cache) or, if that directory is not writable,
in ``$NUMBA_CACHE_DIR``, ``~/.cache/secfed/numba`` or a private (0700) directory in the temp
dir (numba's cache index is a pickle, so it is never read from a directory another user could
write). If no such directory is available the kernel runs uncached (compiled once
per process). Threads: as many as torch uses (``torch.get_num_threads()``), capped by numba's
pool. Numba's threading layer defaults to a fork-safe one here (``forksafe``: GNU OpenMP is not
fork-safe and secfed forks warm workers), and calls are serialised by a lock (the fork-safe
``workqueue`` layer is not thread-safe); ``NUMBA_THREADING_LAYER`` overrides it.

Importing this module raises ImportError without numba (or with ``SECFED_NO_NUMBA=1``);
``order_stats`` then uses its pure-torch bitonic network, as it does for other dtypes and devices.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

LANES = 64  # coordinates per vector comparator: eight AVX2 registers of float32 (sixteen of float64)
MODES = {"sum": 0, "pair_mean": 1, "mean": 2, "closest_mean": 3}

_lock = threading.Lock()


def _private_dir(path: Path) -> bool:
    """Create ``path`` (0700) if needed; True if it is a directory owned by us that no one else can write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(path, os.W_OK)


def _cache_dir() -> str | None:
    """Where numba may cache the kernel: "" = its default (in-tree ``__pycache__`` or the user's
    ``NUMBA_CACHE_DIR``), a private directory, or None (do not cache)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return ""
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    if os.access(pycache if pycache.exists() else here, os.W_OK):
        return ""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for cand in (Path(home) / "secfed" / "numba", Path(tempfile.gettempdir()) / f"secfed-numba-{os.getuid()}"):
        if _private_dir(cand):
            return str(cand)
    return None


if os.environ.get("SECFED_NO_NUMBA"):
    raise ImportError("SECFED_NO_NUMBA is set")

_CACHE = _cache_dir()

import numba  # noqa: E402 - after the cache directory is chosen
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

if _CACHE:
    numba.config.CACHE_DIR = _CACHE
if not os.environ.get("NUMBA_THREADING_LAYER") and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "forksafe"


def _vec_type(context: Any, ary_type: Any) -> Any:
    return ir.VectorType(context.get_data_type(ary_type.dtype), LANES)


def _vec_ptr(context: Any, builder: Any, ary_type: Any, ary: Any, offset: Any) -> Any:
    data = context.make_array(ary_type)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), _vec_type(context, ary_type).as_pointer())


def _comparator(which: str) -> Any:
    """t[a:a+LANES], t[b:b+LANES] <- min, max (``which`` = "both", "min": only a, "max": only b)."""

    @intrinsic
    def op(typingctx: Any, t: Any, a: Any, b: Any) -> Any:
        if not (isinstance(t, types.Array) and t.dtype in (types.float32, types.float64)):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            pa = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
            pb = _vec_ptr(context, builder, sig.args[0], args[0], args[2])
            x = builder.load(pa, align=4)
            y = builder.load(pb, align=4)
            if which != "max":  # x < y ? x : y is exactly vminps(x, y)
                builder.store(builder.select(builder.fcmp_ordered("<", x, y), x, y), pa, align=4)
            if which != "min":
                builder.store(builder.select(builder.fcmp_ordered("<", y, x), x, y), pb, align=4)
            return context.get_dummy_value()

        return types.void(t, a, b), codegen

    return op


@intrinsic
def _copy_lanes(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any) -> Any:
    """dst[doff:doff+LANES] = src.flat[soff:soff+LANES]; returns the bit mask of lanes that are NaN."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ps = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        pd = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(ps, align=4)
        builder.store(v, pd, align=4)
        nan = builder.fcmp_unordered("uno", v, v)
        return builder.zext(builder.bitcast(nan, ir.IntType(LANES)), ir.IntType(64))

    return types.int64(dst, doff, src, soff), codegen


@intrinsic
def _add_lanes(typingctx: Any, acc: Any, t: Any, off: Any) -> Any:
    """acc[0:LANES] += float64(t[off:off+LANES])."""
    if not (isinstance(acc, types.Array) and acc.dtype == types.float64 and isinstance(t, types.Array)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pacc = _vec_ptr(context, builder, sig.args[0], args[0], context.get_constant(types.intp, 0))
        pt = _vec_ptr(context, builder, sig.args[1], args[1], args[2])
        v = builder.load(pt, align=4)
        if sig.args[1].dtype != types.float64:
            v = builder.fpext(v, ir.VectorType(ir.DoubleType(), LANES))
        builder.store(builder.fadd(builder.load(pacc, align=8), v), pacc, align=8)
        return context.get_dummy_value()

    return types.void(acc, t, off), codegen


_both, _only_min, _only_max = _comparator("both"), _comparator("min"), _comparator("max")


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True)
def _kernel(X, lo, hi, ca, cb, ck, mode, chunk, out):  # noqa: ANN001 - numba signature
    n, d = X.shape
    L = LANES
    groups = (d + L - 1) // L
    tasks = (groups + chunk - 1) // chunk
    for task in numba.prange(tasks):
        t = np.empty(n * L, X.dtype)
        acc = np.empty(L, np.float64)
        flat = X.reshape(n * d)
        for g in range(task * chunk, min(groups, (task + 1) * chunk)):
            s = g * L
            w = min(L, d - s)
            nan = 0
            if w == L:
                for r in range(n):
                    nan |= _copy_lanes(t, r * L, flat, r * d + s)
            else:  # the ragged last group: pad with the group's first column
                for r in range(n):
                    for l in range(L):
                        v = X[r, s + l] if l < w else X[r, s]
                        t[r * L + l] = v
                        if v != v:
                            nan |= 1 << l
            for c in range(ca.shape[0]):
                k = ck[c]
                if k == 0:
                    _both(t, ca[c], cb[c])
                elif k == 1:
                    _only_min(t, ca[c], cb[c])
                else:
                    _only_max(t, ca[c], cb[c])
            if mode == 3:  # Bulyan: mean of the `hi` values closest to the median (the column is sorted)
                for l in range(w):
                    if n % 2:
                        out[s + l] = t[(n // 2) * L + l]
                    else:  # the even-n median exactly as coordinate_median: rounded to the dtype
                        out[s + l] = (t[(n // 2 - 1) * L + l] + t[(n // 2) * L + l]) * 0.5
                    m = out[s + l]
                    # The hi closest values are a window [i, i + hi) of the sorted column; sliding it right
                    # pays while the value leaving is farther from m than the one entering, a prefix of i.
                    start = 0
                    for i in range(n - hi):
                        if abs(t[i * L + l] - m) > abs(t[(i + hi) * L + l] - m):
                            start += 1
                    total = 0.0
                    for r in range(start, start + hi):
                        total += t[r * L + l]
                    out[s + l] = total / hi
            elif mode == 1:
                for l in range(w):
                    # a + b in the input dtype, then * 0.5 (exact; one rounding when stored)
                    out[s + l] = (t[lo * L + l] + t[(lo + 1) * L + l]) * 0.5
            else:
                acc[:] = 0.0
                for r in range(lo, hi):
                    _add_lanes(acc, t, r * L)
                for l in range(w):
                    out[s + l] = acc[l] / (hi - lo) if mode == 2 else acc[l]
            if nan:
                for l in range(w):
                    if (nan >> l) & 1:
                        out[s + l] = np.nan


def supports(X: torch.Tensor) -> bool:
    """The kernel handles CPU float32/float64 tensors that do not need a gradient."""
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and not X.requires_grad


def oddeven_merge_sort(N: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort on N = 2^k wires, as (i, j) comparators with i < j (min to i),
    in an order where each comparator runs after the ones it depends on."""
    pairs = []
    p = 1
    while p < N:
        k = p
        while k >= 1:
            for j in range(k % p, N - k, 2 * k):
                for i in range(min(k, N - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=64)
def selection_network(n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Comparators that put ranks ``[lo, hi)`` of n values in place: ``(a, b, kind)`` arrays, tile
    offsets ``a * LANES`` and ``b * LANES``; kind 0 = min to a and max to b, 1 = only the min (b is
    not read again), 2 = only the max.

    Batcher's network on the next power of two with the comparators on wires >= n dropped (+inf
    padding never moves), then pruned from the outputs back: a comparator neither of whose
    outputs is needed later is dropped."""
    N = 1 << max(0, (n - 1).bit_length())
    need = [lo <= r < hi for r in range(n)]
    kept = []
    for a, b in reversed([(a, b) for a, b in oddeven_merge_sort(N) if b < n]):
        if need[a] or need[b]:
            kept.append((a * LANES, b * LANES, 0 if need[a] and need[b] else (1 if need[a] else 2)))
            need[a] = need[b] = True
    kept.reverse()
    arr = np.array(kept, dtype=np.int64).reshape(-1, 3)
    return tuple(np.ascontiguousarray(arr[:, i]) for i in range(3))  # type: ignore[return-value]


def middle_stat(X: torch.Tensor, lo: int, hi: int, mode: str) -> torch.Tensor:
    """See the module docstring; X must pass ``supports``. Returns a new (d,) tensor of X's dtype."""
    n, d = X.shape
    if mode == "pair_mean" and hi != lo + 2:
        raise ValueError("pair_mean needs hi = lo + 2")
    if mode == "closest_mean" and not (lo == 0 and 1 <= hi <= n):
        raise ValueError("closest_mean needs lo = 0 and 1 <= hi (the count) <= n")
    Xn = X.detach().contiguous().numpy()
    out = np.empty(d, dtype=Xn.dtype)
    if d == 0:
        return torch.from_numpy(out)
    ca, cb, ck = selection_network(n, 0, n) if mode == "closest_mean" else selection_network(n, lo, hi)
    with _lock:
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
        groups = -(-d // LANES)
        chunk = max(1, min(256, groups // (4 * threads)))  # >= 4 tasks per thread for balance
        _kernel(Xn, lo, hi, ca, cb, ck, MODES[mode], chunk, out)
    return torch.from_numpy(out)
