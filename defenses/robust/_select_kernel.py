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
vector ``max`` over two tile rows (8 ``vminps`` + 8 ``vmaxps`` on AVX2, no branches; on x86 emitted
as those intrinsics, see ``_simd_isa``). 64 lanes measured faster than 8, 16 or 32 at n = 50, 200
and 1000 (more independent work per comparator).
The network is data (an int array of ops, built in Python once per ``(n, lo, hi)``), so the
compiled kernel is generic in n: no compile per cohort size. Two families (``selection_network``),
the cheaper by a store-count model: Batcher's odd-even merge sort (Batcher 1968, "Sorting networks
and their applications") on ``N = 2^ceil(log2 n)`` wires with every comparator touching a wire
``>= n`` dropped (those wires would hold +inf, so the rest sorts n values), or Batcher's bitonic
sort on N wires (rows n..N-1 of the tile hold +inf) whose consecutive half-cleaner steps are fused
into blocks of 4 or 8 wires done in registers (an 8-wire block loads and stores 8 rows for 12
comparators; single comparators store 2 rows each, and the stores bound the network: the fused
bitonic network is ~1.4x faster at n = 500-1000). Both are pruned backwards to the ops whose outputs
reach ranks ``[lo, hi)`` (a lone comparator only one of whose outputs is needed becomes a single
``min`` or ``max``). Columns run in parallel (``prange`` over chunks of groups), the GIL is released.
While a group is copied, the same rows of a later group are prefetched (the n row streams are
too many for the hardware prefetcher; the copy took 1.6-2x one ``X.sum(0)`` without it).

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

import contextlib
import functools
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

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


def _simd_isa() -> str:
    """Which min/max instructions the comparators are emitted with: "avx" (8 float32 / 4 float64 per
    instruction), "sse" (x86-64 baseline, 4 / 2) or "generic" (another architecture).

    On x86 the comparators call the ``vminps``/``vmaxps`` intrinsics directly: written as
    ``select(x < y, x, y)``, LLVM rewrites "store the select of the old value" into a masked store
    (``vmaskmovps``), which is microcoded on AMD and made the whole network ~5x slower. The
    instructions' semantics are exactly the select's (``min(x, y) = x < y ? x : y``, ``max(x, y) =
    x > y ? x : y``: with a NaN or a -0/+0 tie the second operand), so results do not depend on the
    choice. The decision follows the CPU numba compiles for (numba keys its cache on it)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:  # a user-chosen (portable) target: baseline only
        return "sse"
    from llvmlite import binding

    try:
        return "avx" if binding.get_host_cpu_features().get("avx") else "sse"
    except RuntimeError:
        return "sse"


ISA = _simd_isa()
_X86_MINMAX = {("avx", "float"): "llvm.x86.avx.{op}.ps.256", ("avx", "double"): "llvm.x86.avx.{op}.pd.256",
               ("sse", "float"): "llvm.x86.sse.{op}.ps", ("sse", "double"): "llvm.x86.sse2.{op}.pd"}


def _min_max(builder: Any, op: str, x: Any, y: Any) -> Any:
    """Lane-wise ``x < y ? x : y`` (op "min") or ``x > y ? x : y`` (op "max") of two native vectors."""
    name = _X86_MINMAX.get((ISA, str(x.type.element)))
    if name is None:
        first, second = (x, y) if op == "min" else (y, x)
        return builder.select(builder.fcmp_ordered("<", first, second), x, y)
    name = name.format(op=op)
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(x.type, [x.type, x.type]), name)
    return builder.call(fn, [x, y])


def _comparator(which: str) -> Any:
    """t[a:a+LANES], t[b:b+LANES] <- min, max (``which`` = "both", "min": only a, "max": only b),
    as LANES / w native vectors of w lanes (w = 32 bytes for AVX, 16 otherwise)."""

    @intrinsic
    def op(typingctx: Any, t: Any, a: Any, b: Any) -> Any:
        if not (isinstance(t, types.Array) and t.dtype in (types.float32, types.float64)):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            aty = sig.args[0]
            elem = context.get_data_type(aty.dtype)
            w = (32 if ISA == "avx" else 16) // (4 if aty.dtype == types.float32 else 8)
            vt = ir.VectorType(elem, w)
            data = context.make_array(aty)(context, builder, args[0]).data
            for v in range(0, LANES, w):
                off = ir.Constant(args[1].type, v)
                pa = builder.bitcast(builder.gep(data, [builder.add(args[1], off)]), vt.as_pointer())
                pb = builder.bitcast(builder.gep(data, [builder.add(args[2], off)]), vt.as_pointer())
                x = builder.load(pa, align=4)
                y = builder.load(pb, align=4)
                if which != "max":
                    builder.store(_min_max(builder, "min", x, y), pa, align=4)
                if which != "min":
                    builder.store(_min_max(builder, "max", x, y), pb, align=4)
            return context.get_dummy_value()

        return types.void(t, a, b), codegen

    return op


@intrinsic
def _copy_lanes(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, ahead: Any) -> Any:
    """dst[doff:doff+LANES] = src.flat[soff:soff+LANES]; returns the bit mask of lanes that are NaN.
    Also prefetches the LANES values at ``soff + ahead`` (the same row, a later group): the n row
    streams of a tile outrun the hardware prefetcher (measured: the copy took 1.6-2x one ``X.sum(0)``
    at n = 50 without it, 1x with it)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ps = _vec_ptr(context, builder, sig.args[2], args[2], args[3])
        pd = _vec_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(ps, align=4)
        builder.store(v, pd, align=4)
        i8p = ir.IntType(8).as_pointer()
        name = "llvm.prefetch.p0i8"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3), name)
        line = 64 // (sig.args[2].dtype.bitwidth // 8)  # values per 64-byte cache line
        data = context.make_array(sig.args[2])(context, builder, args[2]).data
        i32 = ir.IntType(32)
        for e in range(0, LANES, line):  # a prefetch never faults, even past the array's end
            q = builder.gep(data, [builder.add(builder.add(args[3], args[4]), ir.Constant(args[3].type, e))])
            builder.call(fn, [builder.bitcast(q, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        nan = builder.fcmp_unordered("uno", v, v)
        return builder.zext(builder.bitcast(nan, ir.IntType(LANES)), ir.IntType(64))

    return types.int64(dst, doff, src, soff, ahead), codegen


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

# A fused block of a bitonic network: wires w[0..m) (m = 4 or 8, tile offsets), log2(m) half-cleaner
# steps done in registers: step s compares w[i] with w[i + m / 2^(s+1)] (min to the first) for every i
# whose bit m / 2^(s+1) is clear. m wires are loaded once and stored once for m/2 * log2(m) comparators,
# where single comparators load and store two wires each: the network is bound by its stores.
BLOCK_PAIRS = {m: [(i, i + h) for h in (m // 2, m // 4, m // 8) if h for i in range(m) if not i & h]
               for m in (4, 8)}


def _block_codegen(m: int) -> Any:
    pairs = BLOCK_PAIRS[m]

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        aty = sig.args[0]
        width = (32 if ISA == "avx" else 16) // (4 if aty.dtype == types.float32 else 8)
        vt = ir.VectorType(context.get_data_type(aty.dtype), width)
        data = context.make_array(aty)(context, builder, args[0]).data
        for v in range(0, LANES, width):
            off = ir.Constant(args[1].type, v)
            ptrs = [builder.bitcast(builder.gep(data, [builder.add(a, off)]), vt.as_pointer()) for a in args[1:]]
            regs = [builder.load(q, align=4) for q in ptrs]
            for i, j in pairs:
                lo_, hi_ = _min_max(builder, "min", regs[i], regs[j]), _min_max(builder, "max", regs[i], regs[j])
                regs[i], regs[j] = lo_, hi_
            for q, r in zip(ptrs, regs):
                builder.store(r, q, align=4)
        return context.get_dummy_value()

    return codegen


def _float_array(t: Any) -> bool:
    return isinstance(t, types.Array) and t.dtype in (types.float32, types.float64)


@intrinsic
def _block4(typingctx: Any, t: Any, w0: Any, w1: Any, w2: Any, w3: Any) -> Any:
    """The fused 4-wire block (two half-cleaner steps) on tile offsets w0..w3."""
    return (types.void(t, w0, w1, w2, w3), _block_codegen(4)) if _float_array(t) else None


@intrinsic
def _block8(typingctx: Any, t: Any, w0: Any, w1: Any, w2: Any, w3: Any, w4: Any, w5: Any, w6: Any,
            w7: Any) -> Any:
    """The fused 8-wire block (three half-cleaner steps) on tile offsets w0..w7."""
    return (types.void(t, w0, w1, w2, w3, w4, w5, w6, w7), _block_codegen(8)) if _float_array(t) else None


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True)
def _kernel(X, lo, hi, net, rows, mode, chunk, ahead, out):  # noqa: ANN001 - numba signature
    n, d = X.shape
    L = LANES
    groups = (d + L - 1) // L
    tasks = (groups + chunk - 1) // chunk
    for task in numba.prange(tasks):
        t = np.empty(rows * L, X.dtype)
        acc = np.empty(L, np.float64)
        flat = X.reshape(n * d)
        for g in range(task * chunk, min(groups, (task + 1) * chunk)):
            s = g * L
            w = min(L, d - s)
            nan = 0
            t[n * L:] = np.inf  # padding wires of a bitonic network (a pruned network leaves them mixed)
            if w == L:
                for r in range(n):
                    nan |= _copy_lanes(t, r * L, flat, r * d + s, ahead)
            else:  # the ragged last group: pad with the group's first column
                for r in range(n):
                    for l in range(L):
                        v = X[r, s + l] if l < w else X[r, s]
                        t[r * L + l] = v
                        if v != v:
                            nan |= 1 << l
            for c in range(net.shape[0]):
                k = net[c, 0]
                if k == 0:
                    _both(t, net[c, 1], net[c, 2])
                elif k == 8:
                    _block8(t, net[c, 1], net[c, 2], net[c, 3], net[c, 4], net[c, 5], net[c, 6], net[c, 7], net[c, 8])
                elif k == 4:
                    _block4(t, net[c, 1], net[c, 2], net[c, 3], net[c, 4])
                elif k == 1:
                    _only_min(t, net[c, 1], net[c, 2])
                else:
                    _only_max(t, net[c, 1], net[c, 2])
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


def plain_cpu(X: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """A CPU tensor of one of ``dtypes`` that needs no gradient: what every numba kernel here can read."""
    return X.device.type == "cpu" and X.dtype in dtypes and not X.requires_grad


@contextlib.contextmanager
def kernel_threads() -> Iterator[int]:
    """Hold the call lock with numba set to torch's thread count (capped by numba's pool); yields the count.
    Every kernel call of ``defenses.robust`` runs inside it."""
    with _lock:
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
        yield threads


def supports(X: torch.Tensor) -> bool:
    """The kernel handles CPU float32/float64 tensors that do not need a gradient."""
    return plain_cpu(X, (torch.float32, torch.float64))


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


def bitonic_sort(N: int, n: int | None = None) -> list[tuple[int, ...]]:
    """Batcher's bitonic sort on N = 2^k wires (alternating directions), as fused blocks: each tuple
    is the wire list of one comparator (2 wires) or one ``BLOCK_PAIRS`` block (4 or 8 wires); the
    minimum goes to the first-listed wire, so a descending block lists its wires in reverse. Stage
    ``k`` (sorting blocks of k wires) has half-cleaner steps j = k/2, ..., 1; consecutive steps are
    fused three (8 wires) or two (4 wires) at a time. With ``n`` (< N real wires, the rest +inf),
    a stage skips its blocks that lie wholly on padding: they hold only +inf, sorted either way."""
    ops: list[tuple[int, ...]] = []
    k = 2
    while k <= N:
        j = k // 2
        while j >= 1:
            s = min(3, j.bit_length())  # steps fused: j, j/2, ... (3 at most, and not below distance 1)
            m = 1 << s
            span = [sum(((idx >> (s - 1 - b)) & 1) * (j >> b) for b in range(s)) for idx in range(m)]
            mask = sum(j >> b for b in range(s))
            for base in range(N):
                if base & mask or (n is not None and base & ~(k - 1) >= n):
                    continue
                wires = tuple(base + o for o in span)
                ops.append(wires if (base & k) == 0 or k == N else wires[::-1])
            j >>= s
        k *= 2
    return ops


def _prune(ops: list[tuple[int, ...]], n: int, lo: int, hi: int) -> list[tuple[int, ...]]:
    """Drop, from the outputs back, every op none of whose wires reaches ranks [lo, hi)."""
    need = [lo <= r < hi for r in range(n)] + [False] * max(0, max((max(o) for o in ops), default=0) + 1 - n)
    kept = []
    for op in reversed(ops):
        if any(need[w] for w in op):
            if len(op) == 2:  # a lone comparator whose other output is dead becomes a min or a max
                a, b = op
                kept.append((0 if need[a] and need[b] else (1 if need[a] else 2), a, b))
            else:
                kept.append((len(op),) + op)
            for w in op:
                need[w] = True
    kept.reverse()
    return kept


# Relative cost of an op (kind -> units, one unit ~ one vector store): a comparator loads and stores
# its two wires; a block of m wires stores m and does m/2 log2(m) min/max pairs (two per unit).
OP_COST = {0: 2, 1: 1, 2: 1, 4: 4, 8: 12}


@functools.lru_cache(maxsize=64)
def selection_network(n: int, lo: int, hi: int, family: str = "auto") -> tuple[np.ndarray, int]:
    """Ops that put ranks ``[lo, hi)`` of n values in place, and the tile rows they need.

    Returns ``(net, rows)``: ``net`` is an int64 ``(m, 9)`` array, one op per row: kind, then up to
    8 tile offsets (wire * LANES). Kind 0 = comparator (min to the first wire, max to the second),
    1 = only its min (the second wire is not read again), 2 = only its max, 4 / 8 = a fused block
    of 4 / 8 wires (``BLOCK_PAIRS``). ``family``: "oddeven" = Batcher's odd-even merge sort on the
    next power of two with every comparator on a wire >= n dropped (+inf padding never moves; rows
    = n); "bitonic" = the fused bitonic sort on N = 2^ceil(log2 n) wires, rows n..N-1 holding +inf
    (rows = N); "auto" = the cheaper by ``OP_COST``. Both are pruned from the outputs back: an op
    none of whose outputs reaches [lo, hi) is dropped."""
    if family == "auto":
        cands = [selection_network(n, lo, hi, f) for f in ("oddeven", "bitonic")]
        return min(cands, key=lambda c: int(sum(OP_COST[int(k)] for k in c[0][:, 0])))
    N = 1 << max(0, (n - 1).bit_length())
    if family == "oddeven":
        ops, rows = _prune([(a, b) for a, b in oddeven_merge_sort(N) if b < n], n, lo, hi), n
    elif family == "bitonic":
        ops, rows = _prune(bitonic_sort(N, n), n, lo, hi), N
    else:
        raise ValueError(f"unknown network family {family!r}")
    net = np.zeros((len(ops), 9), dtype=np.int64)
    for i, op in enumerate(ops):
        net[i, 0] = op[0]
        net[i, 1:len(op)] = [w * LANES for w in op[1:]]
    return net, rows


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
    net, rows = selection_network(n, 0, n) if mode == "closest_mean" else selection_network(n, lo, hi)
    with kernel_threads() as threads:
        groups = -(-d // LANES)
        chunk = max(1, min(256, groups // (4 * threads)))  # >= 4 tasks per thread for balance
        # prefetch 2 groups ahead, 1 when 2 groups of n rows would not stay in L2 (256 KiB assumed)
        ahead = LANES * (2 if 2 * n * LANES * Xn.itemsize <= 1 << 17 else 1)
        _kernel(Xn, lo, hi, net, rows, MODES[mode], chunk, ahead, out)
    return torch.from_numpy(out)
