"""Compiled per-coordinate order statistics: a selection network run on 64 coordinates at once
(and, for medians of large cohorts, sample-pivot selection on the same tile).

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
``min`` or ``max``). The bitonic network's runs of ops that stay inside one 64-wire block are
scheduled block by block (``block_major``: 16 KiB of float32 rows stay in L1 through the run; measured
~5-10% at n = 200-1000). Columns run in parallel (``prange`` over chunks of groups), the GIL is released.
While a group is copied, the same rows of a later group are prefetched (the n row streams are
too many for the hardware prefetcher; the copy took 1.6-2x one ``X.sum(0)`` without it).

Large cohorts, medians: the selection path (``_select_group``; Floyd & Rivest 1975, "Algorithm 489:
the algorithm SELECT", CACM 18(3), sample-based pivots). The network costs O(log^2 n) comparators
per value; from n = 257 (``SELECT_MIN_N``) a median is found in a few branch-free passes over the
tile already in cache, for float32 windows of at most ``SELECT_MAX_WINDOW`` = 2 ranks (the odd
median as a one-rank sum, the even one as ``pair_mean``), in ``_kernel_select``:

1. Sample: 64 evenly spaced rows of the tile, sorted per lane by the 64-wire network.
2. Narrow: per lane, a cell ``[s_i, s_(i+w))`` of the sorted sample (``s_0`` read as -inf, ``s_64``
   as "no upper end") with ``count(x < s_i) <= r < count(x < s_(i+w))`` for the needed rank r;
   three levels (w = 64 -> 16 -> 4 -> 1) each count, in one pass, the values below 3 sample values
   splitting the cell and keep the quarter holding r (``_count_pass``: a vector compare and an
   integer subtract per pivot and 8 lanes; 6 pivots when the two ranks of a window lie in
   different cells). The final bracket ``[a, b)`` lies between two neighbouring sample values:
   about n / 64 values.
3. Collect (``_mask_pass``, one pass): a bit mask per row of the values strictly inside each
   bracket, and the number equal to its lower end a (ties: any number of copies of a cost
   nothing); the few masked values go (scalar, lowest set bit first) into a small tile of B rows
   (B = the largest count over the lanes, rounded up to a multiple of 8; +inf padding), sorted per
   lane by a B-value network (``bracket_networks``).
   The bracket in sorted order is ``e`` copies of a, then that tile: rank r is at ``r - count(x < a)``,
   and rank r + 1 at the upper end b itself when ``r + 1 = count(x < b)`` (b is a value of the lane).
4. Wider windows (sums, when ``SELECT_MAX_WINDOW`` lets them through; off by default: measured
   1.0-1.25x the network's time per tile at n = 500-1000, slower below): a bracket for rank lo
   and one for hi - 1, and ``_mask_kept_pass`` (the collect pass) also sums, in float64, the
   values between the two brackets (all kept) in row order. That equals the ascending-order sum
   bit for bit when every partial sum, in any order, is exact: all summed float32 values are
   multiples of ``Q = ulp(min nonzero |x|)`` and every partial sum lies within ``[-N, P]`` (the
   sums of the negative / positive values), so the float64 sums are exact if ``max(P, N) <
   2^53 Q`` (checked with one bit of slack, the float32 sums P, N widened by ``n 2^-22``):
   values within ~2^(29 - log2 n) of each other in magnitude.

A tile goes to the network (correct always; ``last_fallbacks`` counts them for the last call)
where a bracket holds more than ``cap`` (~n/4) values or a sum is not proven exact (a wider
dynamic range, an inf), and where it holds a NaN. Every result is the network's: the same value,
NaN where a column has one (which zero a tie of -0.0 and +0.0 leaves at a rank is unspecified in
both). Measured on this 2-core EPYC, busy, in one process (``X.sum(0)`` multiples, 2 threads,
d = 1e5, median): n = 1000 selection 2.1-2.7, the network 3.1-4.4; n = 300-384 1.7-2.3 against
2.1-3.1 (/work/notes/helper-selectn.md).

Cost: O(n log^2 n) vector comparisons per 64 columns (the selection path: O(n) per column), memory
O(n d) (input and output) plus one tile and O(n) scratch per thread. The comparators and passes
are emitted as LLVM vector instructions (``numba.extending.intrinsic``), because numba's scalar
code for ``t[a, l]``/``t[b, l]`` is not vectorised (LLVM cannot rule out that the rows overlap).

Numba: ``cache=True``. The first call per dtype compiles (5-20 s on a 2-core machine; loading
it from the cache afterwards takes well under a second). The selection path is a second kernel
(``_kernel_select``, float32), compiled by the first call that takes it (another 10-20 s, once).
The machine code is cached in ``defenses/robust/__pycache__`` (numba's in-tree cache) or, if
that directory is not writable, in ``$NUMBA_CACHE_DIR``, ``~/.cache/secfed/numba`` or a private
(0700) directory in the temp dir (numba's cache index is a pickle, so it is never read from a
directory another user could write). If no such directory is available the kernel runs uncached
(compiled once per process). Threads: as many as torch uses (``torch.get_num_threads()``), capped by numba's
pool. Numba's threading layer defaults to a fork-safe one here (``forksafe``: GNU OpenMP is not
fork-safe and secfed forks warm workers): oneTBB (the ``tbb`` wheel, a dependency on Linux x86-64;
``_load_tbb`` makes its library visible to numba, which pip installs do not), else ``workqueue``.
The layer sets the fixed cost of every parallel call: measured on a 2-core EPYC VM, ~120 us per
launch with ``workqueue`` (its idle workers sleep: two thread wake-ups per call) against ~4 us with
TBB; at d = 1e5 that was half of a median's time, and the cache-blocked centred-clipping step, which
launches twice per block of rows, spent 6 of its 13 ms on launches. Calls are serialised by a lock
(``workqueue`` is not thread-safe); ``NUMBA_THREADING_LAYER`` overrides the choice
(``threading_layer()`` says which one runs).

Importing this module raises ImportError without numba (or with ``SECFED_NO_NUMBA=1``);
``order_stats`` then uses its pure-torch bitonic network, as it does for other dtypes and devices.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
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


def _load_tbb() -> str | None:
    """Load oneTBB's ``libtbb.so.12`` from the installed ``tbb`` wheel (globally, so that numba's TBB
    threading layer, linked against that soname without a path to it, finds it). Returns its path, or
    None where the wheel is absent or the platform names the library differently (numba then falls back)."""
    import ctypes
    from importlib.metadata import PackageNotFoundError, files

    try:
        libs = [f for f in files("tbb") or () if f.name == "libtbb.so.12"]
    except PackageNotFoundError:
        return None
    for f in libs:
        path = str(f.locate())
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


TBB_LIBRARY = _load_tbb()

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


# --- the sample-pivot selection path for large n (Floyd & Rivest 1975, "Algorithm 489") ---------------

SAMPLE = 64  # rows sampled per tile; sorted by the 64-wire network, their values are the pivots
W = 8  # lanes per LLVM vector in the counting passes (one AVX register of float32)
PIVOTS_PER_LOOP = 6  # pivots per loop over the rows (8 pivots + 8 counters + the row spill AVX registers)
last_fallbacks = -1  # tiles of the last call that fell back from the selection path to the network (-1: not used)
SELECT_MIN_N = 257  # cohorts from this size take the selection path (float32; measured: at n <= 256 the network
#                     is as fast or faster; above, it pads to 512 wires and the selection measured 1.25-1.8x faster)
SELECT_MAX_WINDOW = 2  # ... for windows hi - lo up to this (medians; wider sums measured 1.0-1.25x the network)


def _data(context: Any, builder: Any, ary_type: Any, ary: Any) -> Any:
    return context.make_array(ary_type)(context, builder, ary).data


def _vptr(builder: Any, data: Any, index: Any, vt: Any) -> Any:
    return builder.bitcast(builder.gep(data, [index]), vt.as_pointer())


def _row_loop(builder: Any, nrows: Any, init: list, body: Any) -> list:
    """``for r in range(nrows)`` (nrows >= 1) in LLVM IR, carrying the values ``init`` (phi nodes);
    ``body(r, values)`` returns the next values. Returns the values after the last row."""
    i64 = nrows.type
    pre = builder.block
    loop = builder.append_basic_block("rows")
    after = builder.append_basic_block("rows_end")
    builder.branch(loop)
    builder.position_at_end(loop)
    r = builder.phi(i64)
    r.add_incoming(ir.Constant(i64, 0), pre)
    phis = []
    for v in init:
        p = builder.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    new = body(r, phis)
    r1 = builder.add(r, ir.Constant(i64, 1))
    end = builder.block
    r.add_incoming(r1, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", r1, nrows), loop, after)
    builder.position_at_end(after)
    return new


def _count_pass(K: int) -> Any:
    """cnt[k*LANES + l] = #{r < n : t[r*LANES + l] < piv[k*LANES + l]} for k < K (int32), one pass over
    the tile, branch-free: a vector compare and a vector subtract per pivot, W lanes at a time."""

    @intrinsic
    def op(typingctx: Any, t: Any, n: Any, piv: Any, cnt: Any) -> Any:
        if not (_float_array(t) and isinstance(piv, types.Array) and piv.dtype == t.dtype
                and isinstance(cnt, types.Array) and cnt.dtype == types.int32):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            tty, _, pty, cty = sig.args
            vt = ir.VectorType(context.get_data_type(tty.dtype), W)
            it = ir.VectorType(ir.IntType(32), W)
            td, pd, cd = (_data(context, builder, ty, a) for ty, a in ((tty, args[0]), (pty, args[2]), (cty, args[3])))
            i64 = args[1].type
            for c, k0 in itertools.product(range(0, LANES, W), range(0, K, PIVOTS_PER_LOOP)):
                ks = range(k0, min(K, k0 + PIVOTS_PER_LOOP))
                pv = [builder.load(_vptr(builder, pd, ir.Constant(i64, k * LANES + c), vt), align=4) for k in ks]

                def body(r: Any, accs: list, c: int = c, pv: list = pv) -> list:
                    off = builder.add(builder.mul(r, ir.Constant(i64, LANES)), ir.Constant(i64, c))
                    x = builder.load(_vptr(builder, td, off, vt), align=4)
                    return [builder.sub(a, builder.sext(builder.fcmp_ordered("<", x, p), it)) for a, p in zip(accs, pv)]

                fin = _row_loop(builder, args[1], [ir.Constant(it, None)] * len(ks), body)
                for k, v in zip(ks, fin):
                    builder.store(v, _vptr(builder, cd, ir.Constant(i64, k * LANES + c), it), align=4)
            return context.get_dummy_value()

        return types.void(t, n, piv, cnt), codegen

    return op


_count3, _count6 = _count_pass(3), _count_pass(6)


def _pass(name: str, doc: str, nbnd: int, out_dtypes: Any, init: Any, body: Any, store: Any) -> Any:
    """An intrinsic ``name(t, n, bnd, out1, out2)``: per chunk of W lanes, one loop over the tile's n rows
    with ``nbnd`` bound vectors (``bnd[k * LANES + l]``) and the loop-carried values ``init(elem)``;
    ``body(builder, x, r, c, bounds, values, outs)`` gives the next values, ``store`` writes the last.
    ``out_dtypes(t.dtype)``: the dtypes out1 and out2 must have."""

    def typer2(typingctx: Any, t: Any, n: Any, bnd: Any, out1: Any, out2: Any) -> Any:
        return check_and_build(t, n, bnd, (out1, out2))

    def typer4(typingctx: Any, t: Any, n: Any, bnd: Any, out1: Any, out2: Any, out3: Any, out4: Any) -> Any:
        return check_and_build(t, n, bnd, (out1, out2, out3, out4))

    def check_and_build(t: Any, n: Any, bnd: Any, outs: tuple) -> Any:
        if not (_float_array(t) and isinstance(bnd, types.Array) and bnd.dtype == t.dtype
                and all(isinstance(o, types.Array) for o in outs)
                and tuple(o.dtype for o in outs) == out_dtypes(t.dtype)):
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            elem = context.get_data_type(sig.args[0].dtype)
            vt = ir.VectorType(elem, W)
            i64 = args[1].type
            td = _data(context, builder, sig.args[0], args[0])
            bd = _data(context, builder, sig.args[2], args[2])
            od = [_data(context, builder, ty, a) for ty, a in zip(sig.args[3:], args[3:])]
            for c in range(0, LANES, W):
                bounds = [builder.load(_vptr(builder, bd, ir.Constant(i64, k * LANES + c), vt), align=4)
                          for k in range(nbnd)]

                def step(r: Any, vals: list, c: int = c, bounds: list = bounds) -> list:
                    off = builder.add(builder.mul(r, ir.Constant(i64, LANES)), ir.Constant(i64, c))
                    x = builder.load(_vptr(builder, td, off, vt), align=4)
                    return body(builder, x, r, c, bounds, vals, od)

                store(builder, c, _row_loop(builder, args[1], init(elem), step), od)
            return context.get_dummy_value()

        return types.void(t, n, bnd, *outs), codegen

    typer = typer4 if len(out_dtypes(types.float32)) == 4 else typer2
    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


_I32 = ir.VectorType(ir.IntType(32), W)
_F64 = ir.VectorType(ir.DoubleType(), W)


def _store_at(builder: Any, data: Any, index: int, value: Any, align: int) -> Any:
    builder.store(value, _vptr(builder, data, ir.Constant(ir.IntType(64), index), value.type), align=align)


def _mask_body(builder: Any, x: Any, r: Any, c: int, bounds: list, vals: list, od: list) -> list:
    a1, b1, a2, b2 = bounds
    e1, e2 = vals
    in1 = builder.and_(builder.fcmp_ordered(">", x, a1), builder.not_(builder.fcmp_ordered(">=", x, b1)))
    in2 = builder.and_(builder.fcmp_ordered(">", x, a2), builder.not_(builder.fcmp_ordered(">=", x, b2)))
    e1 = builder.sub(e1, builder.sext(builder.fcmp_ordered("==", x, a1), _I32))
    e2 = builder.sub(e2, builder.sext(builder.fcmp_ordered("==", x, a2), _I32))
    for j, inj in enumerate((in1, in2)):  # byte c / 8 of the little-endian int64 rowmask[2r + j]
        idx = builder.add(builder.mul(r, ir.Constant(r.type, 16)), ir.Constant(r.type, 8 * j + c // 8))
        builder.store(builder.bitcast(inj, ir.IntType(W)), builder.gep(od[1], [idx]))
    return [e1, e2]


def _mask_store(builder: Any, c: int, vals: list, od: list) -> None:
    _store_at(builder, od[0], c, vals[0], 4)
    _store_at(builder, od[0], LANES + c, vals[1], 4)


_mask_pass = _pass(
    "_mask_pass", """``_mask_pass(t, n, bnd, eqc, rowmask)``, brackets a1 = bnd[l], b1 = bnd[64 + l], a2 = bnd[128 + l],
    b2 = bnd[192 + l] (b = NaN: no upper end): eqc[l] = #{x == a1}, eqc[64 + l] = #{x == a2} (int32); bit l of
    ``rowmask.view(int64)[2r]`` (rowmask: uint8, 16 n bytes) set where x is in (a1, b1), of ``[2r + 1]`` where
    x is in (a2, b2): the values to collect.""",
    4, lambda dt: (types.int32, types.uint8), lambda elem: [ir.Constant(_I32, None)] * 2, _mask_body, _mask_store)


def _kept_body(builder: Any, x: Any, r: Any, c: int, bounds: list, vals: list, od: list) -> list:
    b1, a2 = bounds[1], bounds[2]
    total, pos, neg, am = vals
    zero = ir.Constant(x.type, None)
    inf = ir.Constant(x.type, [ir.Constant(x.type.element, float("inf"))] * W)
    kept = builder.and_(builder.fcmp_ordered(">=", x, b1), builder.fcmp_ordered("<", x, a2))
    xk = builder.select(kept, x, zero)
    xp = builder.select(builder.fcmp_ordered(">", xk, zero), xk, zero)
    xn = builder.select(builder.fcmp_ordered("<", xk, zero), xk, zero)
    ax = builder.fsub(xp, xn)  # |xk| (one of the two is zero)
    cand = builder.select(builder.fcmp_ordered("==", ax, zero), inf, ax)
    wide = builder.fpext(xk, _F64) if x.type.element != ir.DoubleType() else xk
    return [builder.fadd(total, wide), builder.fadd(pos, xp), builder.fadd(neg, xn),
            builder.select(builder.fcmp_ordered("<", cand, am), cand, am)]


def _kept_store(builder: Any, c: int, vals: list, od: list) -> None:
    _store_at(builder, od[0], c, vals[0], 8)
    for k in range(3):
        _store_at(builder, od[1], k * LANES + c, vals[1 + k], 4)


def _mask_kept_body(builder: Any, x: Any, r: Any, c: int, bounds: list, vals: list, od: list) -> list:
    return (_mask_body(builder, x, r, c, bounds, vals[:2], od[:2])
            + _kept_body(builder, x, r, c, bounds, vals[2:], od[2:]))


def _mask_kept_store(builder: Any, c: int, vals: list, od: list) -> None:
    _mask_store(builder, c, vals[:2], od[:2])
    _kept_store(builder, c, vals[2:], od[2:])


_mask_kept_pass = _pass(
    "_mask_kept_pass", """``_mask_kept_pass(t, n, bnd, eqc, rowmask, sums, aux)``: ``_mask_pass``, and over the x in
    [b1, a2) (the values kept for sure): sums[l] = their float64 sum; in the input dtype, aux[l] / aux[64 + l]
    = the sums of the positive / negative ones (bounds on every partial sum), aux[128 + l] = min |x| over
    the nonzero ones (+inf if none). One pass over the tile (8 lanes at a time, no branches).""",
    4, lambda dt: (types.int32, types.uint8, types.float64, dt),
    lambda elem: [ir.Constant(_I32, None)] * 2 + [ir.Constant(_F64, None)]
    + [ir.Constant(ir.VectorType(elem, W), None)] * 2
    + [ir.Constant(ir.VectorType(elem, W), [ir.Constant(elem, float("inf"))] * W)],
    _mask_kept_body, _mask_kept_store)


@intrinsic
def _inf_row(typingctx: Any, t: Any, off: Any) -> Any:
    """t[off:off+LANES] = +inf (one vector store)."""
    if not _float_array(t):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        elem = context.get_data_type(sig.args[0].dtype)
        vt = ir.VectorType(elem, LANES)
        builder.store(ir.Constant(vt, [ir.Constant(elem, float("inf"))] * LANES),
                      _vec_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.void(t, off), codegen


@intrinsic
def _ctz(typingctx: Any, m: Any) -> Any:
    """Index of the lowest set bit of a nonzero int64."""
    if not isinstance(m, types.Integer):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ty = args[0].type
        fn = builder.module.globals.get("llvm.cttz.i64") or ir.Function(
            builder.module, ir.FunctionType(ty, [ty, ir.IntType(1)]), "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.int64(types.int64), codegen


@numba.njit(cache=_CACHE is not None, nogil=True)
def _run_net(t, net, start, stop):  # noqa: ANN001 - numba signature
    """Apply the ops ``start .. stop-1`` of ``net`` (``selection_network`` rows) to the tile t."""
    for c in range(start, stop):
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


_run_net_inline = numba.njit(cache=_CACHE is not None, nogil=True, inline="always")(_run_net.py_func)


@numba.njit(cache=_CACHE is not None, nogil=True)
def _sorted_at(q, a, e, buf, l):  # noqa: ANN001 - numba signature
    """Value at position q of lane l's sorted first bracket: e copies of a, then the sorted buffer rows."""
    return a if q < e else buf[(q - e) * LANES + l]


@numba.njit(cache=_CACHE is not None, nogil=True)
def _scratch(t, n, cap):  # noqa: ANN001 - numba signature
    """The selection path's per-thread arrays for a tile like t (n = 0: only the result row)."""
    L = LANES
    m = L if n else 0
    return (np.empty(SAMPLE * m, t.dtype), np.empty(6 * m, t.dtype), np.empty(6 * m, np.int32),
            np.empty(4 * m, t.dtype), np.empty(2 * m, np.float64), np.empty(3 * m, t.dtype), np.empty(2 * m, np.int32),
            np.empty(16 * n, np.uint8), np.empty(2 * m * cap, t.dtype), np.empty(8 * m, np.int64),
            np.empty(L, np.float64))


@numba.njit(cache=_CACHE is not None, nogil=True)
def _select_group(t, n, lo, hi, mode, snet, scratch, cap, bnets, boff, bsize, brows):  # noqa: ANN001 - numba signature
    """The selection path on one tile (no NaN in it); False where it cannot finish (a bracket over
    ``cap`` values, or a sum whose exactness in any order is not proven): the caller runs the network.
    The result for lane l goes to ``scratch[-1][l]`` (float64). Float32 tiles only (the exactness
    bound below assumes 24-bit significands; ``middle_stat`` routes nothing else here).

    Per-lane state, row k of ``meta`` (``meta[k * LANES + l]``): 0 / 1 = count(x < a1) / count(x < b1)
    (bracket 1, rank lo), 2 / 3 the same for bracket 2 (rank hi - 1), 4 / 5 = values collected into
    bracket 1 / 2, 6 / 7 = first sample index of the rank's cell. ``bnd`` rows: a1, b1, a2, b2."""
    L = LANES
    samp, piv, cnt, bnd, sums, aux, eqc, rowmask, buf, meta, res = scratch
    for i in range(SAMPLE):  # evenly spaced rows, sorted per lane by the 64-wire network
        r = ((2 * i + 1) * n) // (2 * SAMPLE)
        for l in range(L):
            samp[i * L + l] = t[r * L + l]
    _run_net(samp, snet, 0, snet.shape[0])
    # Per lane and rank j (r_0 = lo; r_1 = hi - 1, or lo for pair_mean: rank lo + 1 is settled from lo's
    # bracket), a cell [s_i, s_(i+w)) of the sorted sample (s_0 read as -inf, s_64 as "no upper end")
    # holding the rank: count(x < lower end) <= r_j < count(x < upper end). Each level splits the cell
    # at 3 sample values and counts (one pass), keeping the quarter that holds the rank: w = 64, 16, 4, 1.
    for l in range(L):
        for j in range(2):
            meta[(6 + j) * L + l] = 0  # the cell's first sample index
            meta[2 * j * L + l] = 0  # count below its lower end
            meta[(2 * j + 1) * L + l] = n  # count below its upper end
    w = SAMPLE
    two = mode != 1 and hi - 1 != lo
    while w > 1:
        q = w // 4
        split = False  # do the two ranks' cells differ in some lane (then 6 pivots, else 3)?
        for l in range(L):
            split = split or (two and meta[6 * L + l] != meta[7 * L + l])
        for j in range(2 if split else 1):
            for k in range(3):
                for l in range(L):
                    piv[(3 * j + k) * L + l] = samp[(meta[(6 + j) * L + l] + q * (k + 1)) * L + l]
        if split:
            _count6(t, n, piv, cnt)
        else:
            _count3(t, n, piv, cnt)
        for j in range(2 if two else 1):
            rank = lo if j == 0 else hi - 1
            jj = j if split else 0  # the pivot set this rank's cell was split with
            for l in range(L):  # branch-free: the counts are ascending in k
                m = 0
                below = meta[2 * j * L + l]
                above = meta[(2 * j + 1) * L + l]
                for k in range(2, -1, -1):
                    c = np.int64(cnt[(3 * jj + k) * L + l])
                    le = c <= rank
                    m += le
                    below = max(below, c) if le else below
                    above = above if le else c
                meta[2 * j * L + l] = below
                meta[(2 * j + 1) * L + l] = above
                meta[(6 + j) * L + l] += q * m
        w = q
    for l in range(L):  # the brackets' ends as values
        for j in range(2):
            jj = j if two else 0
            if j == 1 and not two:
                meta[2 * L + l] = meta[l]
                meta[3 * L + l] = meta[L + l]
            i = meta[(6 + jj) * L + l]
            bnd[2 * j * L + l] = -np.inf if i == 0 else samp[i * L + l]
            bnd[(2 * j + 1) * L + l] = np.nan if i + 1 == SAMPLE else samp[(i + 1) * L + l]
        if meta[l] == meta[2 * L + l]:  # one bracket holds both ranks: the second, (a2, a2), is empty
            bnd[3 * L + l] = bnd[2 * L + l]
    two_brackets = False
    for l in range(L):
        two_brackets = two_brackets or meta[l] != meta[2 * L + l]
    kept = mode != 1 and hi - lo > 1 and two_brackets  # some lane has two brackets: sum what lies between
    if kept:
        _mask_kept_pass(t, n, bnd, eqc, rowmask, sums, aux)
    else:
        _mask_pass(t, n, bnd, eqc, rowmask)
        for l in range(L):
            sums[l] = 0.0
            aux[l] = 0.0
            aux[L + l] = 0.0
            aux[2 * L + l] = np.inf
    k1max = 0
    k2max = 0
    for l in range(L):  # values to collect per bracket, known before collecting
        same = meta[l] == meta[2 * L + l]
        k1 = meta[L + l] - meta[l] - eqc[l]
        k2 = 0 if same else meta[3 * L + l] - meta[2 * L + l] - eqc[L + l]
        if k1 < 0 or k1 > cap or k2 < 0 or k2 > cap:
            return False
        k1max = max(k1max, k1)
        k2max = max(k2max, k2)
        meta[4 * L + l] = 0
        meta[5 * L + l] = 0
    # bracket j's values go to a tile of rows_j rows (+inf padding), sorted per lane by the smallest
    # network of bracket_networks for >= kmax_j values: row q then holds the bracket's q-th smallest
    # value above its lower end
    i1 = 0
    while bsize[i1] < k1max:
        i1 += 1
    i2 = 0
    while bsize[i2] < k2max:
        i2 += 1
    for r in range(brows[i1]):
        _inf_row(buf, r * L)
    for r in range(brows[i2] if k2max else 0):
        _inf_row(buf, (cap + r) * L)
    masks = rowmask.view(np.int64)
    for r in range(n):  # collect the values inside the brackets (few), lowest set bit first
        for j in range(2 if k2max else 1):
            m = masks[2 * r + j]
            while m != 0:
                l = _ctz(m)
                m &= m - 1
                q = meta[(4 + j) * L + l]
                if q < cap:
                    buf[(j * cap + q) * L + l] = t[r * L + l]
                meta[(4 + j) * L + l] = q + 1
    for l in range(L):
        ca1, cb1, ca2, cb2 = meta[l], meta[L + l], meta[2 * L + l], meta[3 * L + l]
        if meta[4 * L + l] != cb1 - ca1 - eqc[l] or meta[5 * L + l] != (0 if ca1 == ca2 else cb2 - ca2 - eqc[L + l]):
            return False  # cannot happen (the vector and the scalar tests agree); never trust it blindly
    for j in range(2):  # one call site: the network code is large
        i = i1 if j == 0 else i2
        _run_net(buf[j * cap * L:], bnets, boff[i], boff[i + 1])
    for l in range(L):
        ca1, cb1, ca2 = meta[l], meta[L + l], meta[2 * L + l]
        e1, e2 = eqc[l], eqc[L + l]
        same = ca1 == ca2
        a1, b1, a2 = bnd[l], bnd[L + l], bnd[2 * L + l]
        x1 = _sorted_at(lo - ca1, a1, e1, buf, l)
        if mode == 1:
            x2 = _sorted_at(lo + 1 - ca1, a1, e1, buf, l) if lo + 1 < cb1 else b1
            res[l] = (x1 + x2) * 0.5  # as the network path: a + b in float32, then * 0.5
            continue
        if hi - lo == 1:
            res[l] = 0.0 + np.float64(x1)
            continue
        # the kept values' float64 sum, and bounds on the positive / negative parts of any partial sum
        # (float32 sums of n terms of one sign: short of the true ones by a relative ~n 2^-24, widened
        # by 4x that, valid for n < 2^22)
        total = sums[l]
        slack = 1.0 + n * 2.0 ** -22
        pos = np.float64(aux[l]) * slack
        neg = np.float64(aux[L + l]) * slack
        am = np.float64(aux[2 * L + l])
        stop1 = hi - ca1 if same else cb1 - ca1
        for j, q0, q1, a, e in ((0, lo - ca1, stop1, a1, e1), (1, 0, 0 if same else hi - ca2, a2, e2)):
            base = j * cap * L + l
            reps = max(0, min(q1, e) - q0)  # copies of a picked, then the sorted collected values
            if reps > 0 and a != 0:
                v = reps * np.float64(a)
                total += v
                if a > 0:
                    pos += v
                else:
                    neg += v
                am = min(am, abs(np.float64(a)))
            for q in range(max(q0, e), q1):  # branch-free (the signs are data)
                v = np.float64(buf[base + (q - e) * L])
                total += v
                pos += max(v, 0.0)
                neg += min(v, 0.0)
                am = min(am, abs(v) if v != 0 else np.inf)
        # exact in any order (so equal to the ascending-order sum) if every partial sum fits 53 bits
        # of the quantum ulp(am): |partial| <= max(pos, -neg) < 2^52 ulp(am) (one bit of slack)
        if am == np.inf:
            if pos != 0 or neg != 0:
                return False
        else:
            ex = math.frexp(am)[1]  # am = m 2^ex, 0.5 <= m < 1: ulp(am) = 2^(ex - 24) (float32, >= 2^-149)
            lim = math.ldexp(1.0, max(ex - 24, -149) + 52)
            if not (pos < lim and -neg < lim):
                return False
        res[l] = total / (hi - lo) if mode == 2 else total
    return True


@numba.njit(cache=_CACHE is not None, nogil=True, inline="always")
def _copy_group(X, sel, flat, t, s, w, ahead):  # noqa: ANN001 - numba signature
    """Copy columns s .. s+w-1 of the rows ``sel`` of X into the tile t (tile row r = X row sel[r], at
    t[r * LANES:]; a ragged last group is padded with its first column); returns the bit mask of lanes
    holding a NaN."""
    n = sel.shape[0]
    d = X.shape[1]
    L = LANES
    nan = 0
    t[n * L:] = np.inf  # padding wires of a bitonic network (a pruned network leaves them mixed)
    if w == L:
        for r in range(n):
            nan |= _copy_lanes(t, r * L, flat, sel[r] * d + s, ahead)
    else:  # the ragged last group: pad with the group's first column
        for r in range(n):
            q = sel[r]
            for l in range(L):
                v = X[q, s + l] if l < w else X[q, s]
                t[r * L + l] = v
                if v != v:
                    nan |= 1 << l
    return nan


@numba.njit(cache=_CACHE is not None, nogil=True, inline="always")
def _network_result(t, n, lo, hi, net, mode, acc, med, start, out, s, w, nan):  # noqa: ANN001 - numba signature
    """Run the network on the tile and write the group's results out[s:s+w] (NaN where ``nan`` says).
    ``acc``, ``med`` and ``start`` are per-lane scratch (float64, the input dtype, int64).
    Inlined (as ``_copy_group``) into the kernels: a call per group costs ~0.1 sums at n = 5."""
    L = LANES
    _run_net_inline(t, net, 0, net.shape[0])
    if mode == 3:  # Bulyan: mean of the `hi` values closest to the median (the column is sorted)
        h = n // 2
        for l in range(L):  # the median exactly as coordinate_median (even n: rounded to the dtype)
            med[l] = t[h * L + l] if n % 2 else (t[(h - 1) * L + l] + t[h * L + l]) * 0.5
        # The hi closest values are a window [i, i + hi) of the sorted column; sliding it right pays
        # while the value leaving is farther from the median than the one entering, a prefix of i.
        # Lane-parallel loops (vectorised): the count, then a masked sum in row order over the window.
        start[:] = 0
        for i in range(n - hi):
            a = i * L
            b = (i + hi) * L
            for l in range(L):
                start[l] += abs(t[a + l] - med[l]) > abs(t[b + l] - med[l])
        acc[:] = 0.0
        for r in range(n):  # adding +0.0 outside the window changes no sum (+0.0 + -0.0 is +0.0 either way)
            a = r * L
            for l in range(L):
                acc[l] += t[a + l] if start[l] <= r < start[l] + hi else 0.0
        for l in range(w):
            out[s + l] = acc[l] / hi
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


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True)
def _kernel(X, sel, lo, hi, net, rows, mode, chunk, ahead, out):  # noqa: ANN001 - numba signature
    n = sel.shape[0]
    d = X.shape[1]
    L = LANES
    groups = (d + L - 1) // L
    tasks = (groups + chunk - 1) // chunk
    for task in numba.prange(tasks):
        t = np.empty(rows * L, X.dtype)
        acc = np.empty(L, np.float64)
        med = np.empty(L, X.dtype)
        start = np.empty(L, np.int64)
        flat = X.reshape(X.shape[0] * d)
        for g in range(task * chunk, min(groups, (task + 1) * chunk)):
            s = g * L
            w = min(L, d - s)
            nan = _copy_group(X, sel, flat, t, s, w, ahead)
            _network_result(t, n, lo, hi, net, mode, acc, med, start, out, s, w, nan)


@numba.njit(cache=_CACHE is not None, nogil=True, parallel=True)
def _kernel_select(X, sel, lo, hi, net, rows, mode, chunk, ahead, out, snet, cap, bnets, boff, bsize, brows,  # noqa: ANN001
                   fallbacks):
    """``_kernel`` with the selection path first (``_select_group``; the network where it gives up);
    a separate kernel, so that only the first call that takes this path compiles it (float32 only)."""
    n = sel.shape[0]
    d = X.shape[1]
    L = LANES
    groups = (d + L - 1) // L
    tasks = (groups + chunk - 1) // chunk
    for task in numba.prange(tasks):
        t = np.empty(rows * L, X.dtype)
        acc = np.empty(L, np.float64)
        med = np.empty(L, X.dtype)
        start = np.empty(L, np.int64)
        scratch = _scratch(t, n, cap)
        res = scratch[-1]
        flat = X.reshape(X.shape[0] * d)
        for g in range(task * chunk, min(groups, (task + 1) * chunk)):
            s = g * L
            w = min(L, d - s)
            nan = _copy_group(X, sel, flat, t, s, w, ahead)
            if nan == 0:
                if _select_group(t, n, lo, hi, mode, snet, scratch, cap, bnets, boff, bsize, brows):
                    for l in range(w):
                        out[s + l] = res[l]
                    continue
                fallbacks[task] += 1
            _network_result(t, n, lo, hi, net, mode, acc, med, start, out, s, w, nan)


def threading_layer() -> str:
    """The numba threading layer the kernels run on (``tbb``, ``omp`` or ``workqueue``); starts numba's
    thread pool if no kernel has yet."""
    numba.get_num_threads()  # launches the pool, which picks the layer
    return numba.threading_layer()


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


def block_major(ops: list[tuple[int, ...]], block: int = 64) -> list[tuple[int, ...]]:
    """The same network with each run of consecutive ops that stay inside one ``block``-wire block
    reordered block by block (stable): ops in different blocks touch different wires, so results are
    unchanged, and a block's rows (64 x 256 bytes for float32) stay in L1 through the run instead of
    the whole tile streaming through it once per step."""
    out: list[tuple[int, ...]] = []
    run: list[tuple[int, ...]] = []
    for op in ops + [None]:  # type: ignore[list-item]
        inside = op is not None and min(op) // block == max(op) // block
        if inside:
            run.append(op)
            continue
        out.extend(sorted(run, key=lambda o: min(o) // block))  # stable: a block's ops keep their order
        run = []
        if op is not None:
            out.append(op)
    return out


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
        ops, rows = _prune(block_major(bitonic_sort(N, n)), n, lo, hi), N
    else:
        raise ValueError(f"unknown network family {family!r}")
    net = np.zeros((len(ops), 9), dtype=np.int64)
    for i, op in enumerate(ops):
        net[i, 0] = op[0]
        net[i, 1:len(op)] = [w * LANES for w in op[1:]]
    return net, rows


@functools.lru_cache(maxsize=8)
def bracket_networks(cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorting networks for the brackets' tiles (cap a power of two >= 64): for B in ``bsize`` = 1,
    8, 16, ..., 128, 160, ..., 256, then 512, 1024, ..., cap values, ``selection_network(B, 0, B)`` (none for B = 1) is
    rows ``boff[i] .. boff[i+1]-1`` of ``nets``, on a tile of ``brows[i]`` rows (B, or a power of two
    with +inf padding). Returns (nets, boff, bsize, brows)."""
    sizes = [1] + [b for b in [*range(8, 128, 8), *range(128, 257, 32), *(1 << i for i in range(9, cap.bit_length()))]
                   if b <= cap]
    built = [(np.zeros((0, 9), np.int64), 1)] + [selection_network(b, 0, b) for b in sizes[1:]]
    boff = np.cumsum([0] + [len(net) for net, _ in built]).astype(np.int64)
    return (np.concatenate([net for net, _ in built]), boff, np.array(sizes, np.int64),
            np.array([rows for _, rows in built], np.int64))


def middle_stat(X: torch.Tensor, lo: int, hi: int, mode: str, index: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring; X must pass ``supports``. Returns a new (d,) tensor of X's dtype.
    ``index`` (int row indices into X, repeats allowed): the statistic of ``X[index]``, read in place
    (no ``(len(index), d)`` copy)."""
    if index is None:
        sel_rows = np.arange(X.shape[0], dtype=np.int64)
    else:
        sel_rows = index.detach().to("cpu", torch.int64).reshape(-1).numpy().copy()
        if sel_rows.size and not (0 <= sel_rows.min() and sel_rows.max() < X.shape[0]):
            raise IndexError(f"middle_stat: row indices must lie in [0, {X.shape[0]})")
    n, d = len(sel_rows), X.shape[1]
    if mode == "pair_mean" and hi != lo + 2:
        raise ValueError("pair_mean needs hi = lo + 2")
    if mode == "closest_mean" and not (lo == 0 and 1 <= hi <= n):
        raise ValueError("closest_mean needs lo = 0 and 1 <= hi (the count) <= n")
    Xn = X.detach().contiguous().numpy()
    out = np.empty(d, dtype=Xn.dtype)
    if d == 0:
        return torch.from_numpy(out)
    net, rows = selection_network(n, 0, n) if mode == "closest_mean" else selection_network(n, lo, hi)
    sel = (max(SELECT_MIN_N, SAMPLE) <= n < 1 << 22 and hi - lo <= SELECT_MAX_WINDOW and mode != "closest_mean"
           and Xn.dtype == np.float32)  # n < 2^22: the exactness bound's slack (_select_group)
    if sel:
        snet = selection_network(SAMPLE, 0, SAMPLE)[0]
        cap = 1 << max(6, (n // 4 - 1).bit_length())  # values a bracket may hold before its tile falls back
        bnets, boff, bsize, brows = bracket_networks(cap)
    with kernel_threads() as threads:
        groups = -(-d // LANES)
        chunk = max(1, min(256, groups // (4 * threads)))  # >= 4 tasks per thread for balance
        # prefetch 2 groups ahead, 1 when 2 groups of n rows would not stay in L2 (256 KiB assumed)
        ahead = LANES * (2 if 2 * n * LANES * Xn.itemsize <= 1 << 17 else 1)
        global last_fallbacks
        if sel:
            fallbacks = np.zeros(-(-groups // chunk), np.int64)
            _kernel_select(Xn, sel_rows, lo, hi, net, rows, MODES[mode], chunk, ahead, out, snet, cap, bnets, boff, bsize,
                           brows, fallbacks)
            last_fallbacks = int(fallbacks.sum())
        else:
            _kernel(Xn, sel_rows, lo, hi, net, rows, MODES[mode], chunk, ahead, out)
            last_fallbacks = -1
    return torch.from_numpy(out)
