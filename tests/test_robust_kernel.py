"""The numba order-statistics kernel (``defenses/robust/_select_kernel.py``): its selection
networks, its results against ``torch.sort`` and the pure-torch path, NaN, odd shapes, threads,
the fallback and the cache directory rule."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

K = pytest.importorskip("defenses.robust._select_kernel", reason="numba missing or SECFED_NO_NUMBA set",
                        exc_type=ImportError)

from defenses.robust import order_stats  # noqa: E402
from defenses.robust.order_stats import (closest_to_median_mean, coordinate_median, middle_sum,  # noqa: E402
                                         middle_sum_torch, trimmed_mean)


def run_network(values: list[int], n: int, lo: int, hi: int, family: str) -> list[int]:
    """The kernel's op list run in Python on one column (padding wires hold +inf)."""
    net, rows = K.selection_network(n, lo, hi, family)
    v = list(values) + [math.inf] * (rows - n)
    for op in net.tolist():
        kind, wires = op[0], [o // K.LANES for o in op[1:]]
        if kind in (0, 1, 2):
            a, b = wires[:2]
            x, y = v[a], v[b]
            if kind != 2:
                v[a] = min(x, y)
            if kind != 1:
                v[b] = max(x, y)
        else:
            for i, j in K.BLOCK_PAIRS[kind]:
                a, b = wires[i], wires[j]
                v[a], v[b] = min(v[a], v[b]), max(v[a], v[b])
    return v


@pytest.mark.parametrize("family", ["oddeven", "bitonic"])
@pytest.mark.parametrize("n", range(1, 12))
def test_networks_select_every_window_of_every_0_1_input(n, family):
    """0-1 principle (Knuth, TAOCP 5.3.4): a comparator network that places ranks [lo, hi) correctly for
    every 0/1 input does so for every input."""
    windows = [(0, n), (n // 2, n // 2 + 1), ((n - 1) // 2, n // 2 + 1), (n // 4, n - n // 4)]
    for lo, hi in {w for w in windows if 0 <= w[0] < w[1] <= n}:
        for bits in itertools.product((0, 1), repeat=n):
            assert run_network(list(bits), n, lo, hi, family)[lo:hi] == sorted(bits)[lo:hi], (n, lo, hi, bits)


@pytest.mark.parametrize("n", [13, 20, 33, 64, 100, 200, 300])
def test_bitonic_blocks_sort_random_inputs(n):
    """The fused bitonic network (blocks of 4 and 8 wires, skipped padding blocks) sorts larger n."""
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        vals = torch.randint(-20, 20, (n,), generator=g).tolist()
        assert run_network(vals, n, 0, n, "bitonic")[:n] == sorted(vals)


def test_block_major_order_keeps_every_wires_op_sequence():
    """Reordering runs of in-block ops block by block is only a schedule: every wire sees the same ops in
    the same order, and the cross-block ops stay where they were (checked on the 512-wire network)."""
    ops = K.bitonic_sort(512, 300)
    moved = K.block_major(ops)
    assert sorted(moved) == sorted(ops) and moved != ops
    def per_wire(seq):
        seen: dict = {}
        for i, op in enumerate(seq):
            for w in op:
                seen.setdefault(w, []).append(op)
        return seen
    assert per_wire(moved) == per_wire(ops)
    assert [o for o in moved if min(o) // 64 != max(o) // 64] == [o for o in ops if min(o) // 64 != max(o) // 64]


def test_pruning_removes_comparators_but_the_kernel_is_generic_in_n():
    for family in ("oddeven", "bitonic"):
        assert len(K.selection_network(50, 25, 26, family)[0]) < len(K.selection_network(50, 0, 50, family)[0])
    coordinate_median(torch.randn(3, 40))
    coordinate_median(torch.randn(K.SELECT_MIN_N, 40))  # the selection path's kernel
    before = len(K._kernel.signatures), len(K._kernel_select.signatures)
    for n in (4, 17, 50, 129, 600, 1001):  # new cohort sizes, windows and network families compile nothing new
        coordinate_median(torch.randn(n, 40))
        trimmed_mean(torch.randn(n, 40), 1)
    assert (len(K._kernel.signatures), len(K._kernel_select.signatures)) == before


def test_auto_picks_the_fused_bitonic_network_for_large_cohorts():
    assert K.selection_network(1000, 500, 501)[1] == 1024  # bitonic: padded to a power of two
    assert K.selection_network(1000, 500, 501)[0][:, 0].max() == 8  # with fused 8-wire blocks


@pytest.mark.parametrize("family", ["oddeven", "bitonic"])
@pytest.mark.parametrize("n", [5, 24, 100])
def test_both_families_give_identical_results(n, family, monkeypatch):
    g = torch.Generator().manual_seed(n)
    X = torch.round(torch.randn(n, K.LANES * 80 + 7, generator=g) * 4) / 4  # tasks of several groups:
    X[1, 3] = math.inf  # the padding must be refilled per group (a pruned network leaves it mixed)
    S = torch.sort(X, dim=0).values
    build = K.selection_network
    monkeypatch.setattr(K, "selection_network", lambda n, lo, hi: build(n, lo, hi, family))
    med = S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) * 0.5
    assert torch.equal(coordinate_median(X), med)
    f = n // 5
    assert torch.equal(trimmed_mean(X, f), (S[f:n - f].double().sum(0) / (n - 2 * f)).float())


@pytest.mark.parametrize("isa", ["avx", "sse", "generic"])
def test_min_max_instructions_keep_the_select_semantics(isa, monkeypatch):
    """x86 min/max intrinsics (used so LLVM cannot turn the comparator into masked stores) and the
    portable select: min(x, y) = x < y ? x : y and max = x > y ? x : y, lane by lane, for ties of
    -0/+0 and NaN too (a NaN column is overwritten with NaN afterwards, but no lane may leak)."""
    import numba
    import numpy as np

    if isa == "avx" and K.ISA != "avx":
        pytest.skip("this CPU has no AVX")
    if isa != "generic" and K.ISA == "generic":
        pytest.skip("not an x86 CPU")
    monkeypatch.setattr(K, "ISA", isa)
    both = K._comparator("both")  # a new intrinsic: compiled now, with the patched ISA

    @numba.njit
    def apply(t):
        both(t, 0, K.LANES)

    specials = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 2.5]
    pairs = list(itertools.product(specials, repeat=2))
    pairs += [(pairs[i % len(pairs)][0], pairs[i % len(pairs)][1]) for i in range(K.LANES * 2 - len(pairs))]
    for dtype in (np.float32, np.float64):
        for start in (0, K.LANES):
            chunk = pairs[start:start + K.LANES]
            t = np.array([x for x, _ in chunk] + [y for _, y in chunk], dtype=dtype)
            apply(t)
            for lane, (x, y) in enumerate(chunk):
                want_min, want_max = (x if x < y else y), (x if x > y else y)
                got_min, got_max = t[lane], t[K.LANES + lane]
                for got, want in ((got_min, want_min), (got_max, want_max)):
                    assert (math.isnan(got) and math.isnan(want)) or (
                        got == want and math.copysign(1, got) == math.copysign(1, want)), (isa, x, y, got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 15, 16, 17, 50, 64, 65, 200])
def test_kernel_matches_sort_exactly(n, dtype):
    g = torch.Generator().manual_seed(n)
    X = torch.round(torch.randn(n, K.LANES * 3 + 5, generator=g, dtype=dtype) * 4) / 4  # ties, a ragged last group
    X[0, 3], X[n - 1, 100] = math.inf, -math.inf
    S = torch.sort(X, dim=0).values
    med = S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) * 0.5
    assert torch.equal(coordinate_median(X), med)
    for f in {0, 1, n // 5, (n - 1) // 2}:
        if 2 * f < n:
            ref = (S[f:n - f].double().sum(0) / (n - 2 * f)).to(dtype)
            got = trimmed_mean(X, f)
            assert got.dtype == dtype
            assert torch.equal(got[~ref.isnan()], ref[~ref.isnan()])
    assert torch.equal(middle_sum(X, 0, n), S.double().sum(0).to(dtype))


@pytest.mark.parametrize("n", [5, 6, 31, 32, 33, 100])
def test_median_bit_identical_to_the_torch_network(n):
    g = torch.Generator().manual_seed(100 + n)
    X = torch.randn(n, 3001, generator=g) * torch.logspace(-30, 30, 3001)  # wide range of magnitudes
    X[:, :50] = torch.round(X[:, :50])  # ties
    X[1, 7] = math.inf
    torch_path = middle_sum_torch(X, n // 2, n // 2 + 1) if n % 2 else \
        middle_sum_torch(X, n // 2 - 1, n // 2 + 1).mul_(0.5)
    assert torch.equal(coordinate_median(X), torch_path)


def test_even_median_keeps_the_float32_sum_rounding():
    X = torch.tensor([[3e38], [3e38], [-1.0], [3e38]])  # middle two: 3e38 + 3e38 overflows in float32
    assert torch.equal(coordinate_median(X), middle_sum_torch(X, 1, 3).mul_(0.5))


def test_nan_marks_only_its_column_in_full_and_ragged_groups():
    X = torch.randn(9, K.LANES * 3 + 3)
    X[4, 5] = math.nan
    X[0, K.LANES * 3 + 1] = math.nan  # in the ragged last group
    X[2, K.LANES - 1] = math.nan  # the last lane of a full group (the mask's top bit)
    for out in (coordinate_median(X), trimmed_mean(X, 2), middle_sum(X, 0, 9)):
        assert torch.isnan(out[[5, K.LANES - 1, K.LANES * 3 + 1]]).all()
        keep = [j for j in range(X.shape[1]) if j not in (5, K.LANES - 1, K.LANES * 3 + 1)]
        assert not torch.isnan(out[keep]).any()


def test_non_contiguous_and_integer_like_inputs():
    X = torch.randn(40, 11)
    assert torch.equal(coordinate_median(X.T.contiguous().T), coordinate_median(X.contiguous()))
    assert torch.equal(coordinate_median(X[::2]), torch.sort(X[::2], 0).values[9:11].sum(0) * 0.5)
    assert coordinate_median(torch.randn(5, 0)).shape == (0,)


def test_fallback_without_numba_gives_the_same_medians(monkeypatch):
    X = torch.randn(13, 500)
    with_kernel = coordinate_median(X)
    monkeypatch.setattr(order_stats, "compiled", lambda name: None)
    assert torch.equal(coordinate_median(X), with_kernel)
    assert torch.allclose(trimmed_mean(X, 3), torch.sort(X, 0).values[3:10].mean(0), atol=1e-6)


def test_secfed_no_numba_makes_the_import_fail(monkeypatch):
    monkeypatch.setenv("SECFED_NO_NUMBA", "1")
    spec = importlib.util.spec_from_file_location("_select_kernel_copy", K.__file__)
    with pytest.raises(ImportError, match="SECFED_NO_NUMBA"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_concurrent_calls_from_threads():
    Xs = [torch.randn(21, 2000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refs = [torch.sort(X, 0).values[10] for X in Xs]
    outs: list = [None] * 4

    def work(i: int) -> None:
        for _ in range(3):
            outs[i] = coordinate_median(Xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))


def test_threading_layer_is_tbb_where_the_wheel_is_installed():
    """pip's tbb wheel puts libtbb.so.12 where numba's TBB layer cannot find it; ``_load_tbb`` loads it, so
    the kernels launch on TBB (~4 us a call) rather than workqueue (~120 us: a thread wake-up each way)."""
    try:
        from importlib.metadata import files
        has_lib = any(f.name == "libtbb.so.12" for f in files("tbb") or ())
    except Exception:  # noqa: BLE001 - PackageNotFoundError: no wheel
        has_lib = False
    if not has_lib:
        pytest.skip("no tbb wheel with libtbb.so.12 (not Linux x86-64?)")
    if os.environ.get("NUMBA_THREADING_LAYER") not in (None, "", "default", "tbb", "safe", "forksafe", "threadsafe"):
        pytest.skip("NUMBA_THREADING_LAYER picks another layer")
    assert K.TBB_LIBRARY is not None
    assert K.threading_layer() == "tbb"


def test_a_forked_child_runs_the_kernels_after_the_parent_did():
    """secfed forks warm workers after the server may have aggregated: the child's kernels must run (GNU
    OpenMP would hang here, which is why the layer is a fork-safe one) and give the parent's results."""
    X = torch.randn(51, 3000, generator=torch.Generator().manual_seed(0))
    ref = coordinate_median(X)
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the kernel ran and agreed
        code = 1
        try:
            code = 0 if torch.equal(coordinate_median(X), ref) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's kernel call hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(coordinate_median(X), ref)


def test_cache_directory_must_be_private(tmp_path):
    ok = tmp_path / "mine"
    assert K._private_dir(ok) and (ok.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # another user could plant a pickled index there
    assert not K._private_dir(shared)


@pytest.mark.parametrize("n,beta", [(1, 1), (5, 3), (8, 4), (30, 10), (50, 10), (51, 51)])
def test_closest_to_median_mean_matches_topk(n, beta):
    X = torch.randn(n, K.LANES * 2 + 9, generator=torch.Generator().manual_seed(n))  # no ties (continuous)
    med = torch.sort(X, 0).values
    med = med[n // 2] if n % 2 else (med[n // 2 - 1] + med[n // 2]) * 0.5
    idx = torch.topk((X - med).abs(), beta, dim=0, largest=False).indices
    ref = torch.gather(X, 0, idx).double().mean(0).float()
    assert torch.allclose(closest_to_median_mean(X, beta), ref, rtol=1e-6, atol=1e-7)


def closest_mean_reference(X: torch.Tensor, beta: int) -> torch.Tensor:
    """The kernel's rule column by column in Python: sort, median as coordinate_median, slide the window
    [i, i + beta) right while the value leaving is strictly farther than the one entering, float64 sum in
    ascending order, one rounding to the dtype."""
    n = X.shape[0]
    S = torch.sort(X, 0).values
    out = torch.empty(X.shape[1], dtype=X.dtype)
    for j in range(X.shape[1]):
        col = S[:, j]
        m = col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) * 0.5  # in X's dtype
        start = sum(1 for i in range(n - beta) if abs(col[i] - m) > abs(col[i + beta] - m))
        total = 0.0
        for r in range(start, start + beta):
            total += float(col[r])
        out[j] = total / beta
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,beta,values", [(5, 2, "ties"), (7, 3, "normal"), (10, 4, "ties"), (30, 10, "normal"),
                                           (31, 5, "ties"), (43, 21, "zeros")])
def test_closest_to_median_mean_is_bit_identical_to_the_scalar_rule(n, beta, values, dtype):
    g = torch.Generator().manual_seed(n * 7 + beta)
    d = K.LANES + 13  # a full group and a ragged one
    if values == "ties":  # few distinct values: equal distances at the window's ends
        X = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    elif values == "zeros":  # signed zeros and tiny values
        X = torch.randint(-1, 2, (n, d), generator=g).to(dtype) * torch.tensor(1e-30, dtype=dtype)
        X[X == 0] = torch.where(torch.rand(int((X == 0).sum()), generator=g) < 0.5, -0.0, 0.0).to(dtype)
    else:
        X = torch.randn(n, d, generator=g, dtype=dtype)
    got = closest_to_median_mean(X, beta)
    assert torch.equal(got, closest_mean_reference(X, beta))
    assert torch.equal(torch.signbit(got), torch.signbit(closest_mean_reference(X, beta)))


def test_closest_to_median_mean_reads_an_index_in_place():
    """Bulyan's second step on the rows Krum chose: ``index`` gives exactly the result of the copied rows
    (repeats allowed), and an index outside X is refused before the kernel reads memory."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3 * K.LANES + 5, generator=g)
    idx = torch.tensor([5, 0, 39, 7, 7, 12, 3, 21, 30, 2, 11])
    assert torch.equal(closest_to_median_mean(X, 5, idx), closest_to_median_mean(X[idx].clone(), 5))
    assert torch.equal(K.middle_stat(X, 5, 6, "sum", idx), K.middle_stat(X[idx].clone(), 5, 6, "sum"))
    for bad in (torch.tensor([0, 40]), torch.tensor([-1, 2])):
        with pytest.raises(IndexError, match="row indices"):
            closest_to_median_mean(X, 1, bad)


def test_closest_to_median_mean_ties_keep_the_lower_value():
    X = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])  # median 3; 2 and 4 are equally close
    assert float(closest_to_median_mean(X, 2)) == 2.5
    assert float(closest_to_median_mean(X, 3)) == 3.0
    with pytest.raises(ValueError, match="beta"):
        closest_to_median_mean(X, 6)


# --- the sample-pivot selection path (large n; _select_group) -------------------------------------


@pytest.fixture
def selection_everywhere(monkeypatch):
    """Route every float32 window of n >= 64 (sums of wide windows too) to the selection path."""
    monkeypatch.setattr(K, "SELECT_MIN_N", 64)
    monkeypatch.setattr(K, "SELECT_MAX_WINDOW", 10**9)


def network_path(fn, *args):
    """``fn(*args)`` with the selection path switched off (the comparator network for every tile)."""
    old = K.SELECT_MIN_N
    K.SELECT_MIN_N = 10**9
    try:
        return fn(*args)
    finally:
        K.SELECT_MIN_N = old


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and equal NaN positions (-0.0 == 0.0, as torch.equal)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def windows(n: int) -> list[tuple[int, int]]:
    f = n // 5
    return sorted({(n // 2, n // 2 + 1), (n // 2 - 1, n // 2 + 1), (f, n - f), (1, n - 1), (0, n), (0, 1),
                   (n - 1, n), (n // 3, n // 3 + 2), ((n - 1) // 2, (n - 1) // 2 + 3)})


@pytest.mark.parametrize("n", [128, 200, 257, 1000])
def test_selection_path_matches_sort_and_the_network_bit_for_bit(n, selection_everywhere):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, K.LANES * 6 + 5, generator=g)  # several groups and a ragged last one
    X[:, :K.LANES] *= torch.logspace(-3, 3, K.LANES)  # per-column scales
    S = torch.sort(X, dim=0).values
    med = S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) * 0.5
    assert torch.equal(coordinate_median(X), med)
    assert K.last_fallbacks == 0  # random data: every tile finished by selection
    assert torch.equal(coordinate_median(X), network_path(coordinate_median, X))
    for lo, hi in windows(n):
        ref = S[lo:hi].double().sum(0).float()  # float64, ascending rank order, rounded once
        got = middle_sum(X, lo, hi)
        assert K.last_fallbacks >= 0 and torch.equal(got, ref), (lo, hi)
        assert torch.equal(got, network_path(middle_sum, X, lo, hi))
    f = n // 5
    assert torch.equal(trimmed_mean(X, f), (S[f:n - f].double().sum(0) / (n - 2 * f)).float())


def adversarial_inputs(n: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7 * n)
    base = torch.randn(n, d, generator=g)
    zeros = torch.zeros(n, d)
    zeros[torch.rand(n, d, generator=g) < 0.5] = -0.0
    half_equal = base.clone()
    half_equal[: n // 2 + 3] = 0.25  # more than half the column is one value: it holds the median
    special = torch.round(base * 2)
    special[torch.rand(n, d, generator=g) < 0.03] = math.inf
    special[torch.rand(n, d, generator=g) < 0.03] = -math.inf
    special[torch.rand(n, d, generator=g) < 0.05] = -0.0
    return {
        "duplicates": torch.round(base * 3),  # a few dozen distinct values
        "two_values": (torch.rand(n, d, generator=g) < 0.5).float(),
        "all_equal": torch.full((n, d), 1.5),
        "signed_zeros": zeros,
        "half_equal": half_equal,
        "wide_exponents": base * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)][:, None],
        "tiny_values": torch.where(torch.rand(n, d, generator=g) < 0.02, 1e-30, base),  # sums not provably exact
        "specials": special,
        "sorted_rows": torch.sort(base, dim=0).values,
        "reverse_sorted_rows": torch.sort(base, dim=0, descending=True).values,
        "one_outlier_row": torch.cat([base[:-1], torch.full((1, d), 3e38)]),
        "subnormals": base * 1e-40,
    }


@pytest.mark.parametrize("n", [128, 257])
def test_selection_path_on_adversarial_inputs(n, selection_everywhere):
    """Ties, all-equal and +-0 columns, 60 decades of magnitude, inf, subnormals, sorted rows: every result
    equals the network's and the sorted reference; the inputs that defeat the selection make tiles fall back."""
    fell_back = set()
    for name, X in adversarial_inputs(n, K.LANES * 3 + 1).items():
        S = torch.sort(X, dim=0).values
        for lo, hi in windows(n):
            got = middle_sum(X, lo, hi)
            fell_back.update([name] if K.last_fallbacks > 0 else [])
            assert same_bits(got, network_path(middle_sum, X, lo, hi)), (name, lo, hi)
            assert same_bits(got, S[lo:hi].double().sum(0).float()), (name, lo, hi)
        med = S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) * 0.5
        assert same_bits(coordinate_median(X), med), name
    # sums over 60 decades, with a 1e-30 among values ~1, or with an inf are not provably exact in
    # another order than the ascending one: those tiles go to the network
    assert {"wide_exponents", "tiny_values", "specials"} <= fell_back


@pytest.mark.parametrize("n", [128, 200])
def test_selection_path_nan_marks_only_its_column(n, selection_everywhere):
    X = torch.randn(n, K.LANES * 2 + 3, generator=torch.Generator().manual_seed(n))
    X[5, 3] = math.nan
    X[n - 1, K.LANES * 2 + 1] = math.nan  # the ragged last group
    for out in (coordinate_median(X), middle_sum(X, n // 4, n - n // 4)):
        assert torch.isnan(out[[3, K.LANES * 2 + 1]]).all()
        keep = [j for j in range(X.shape[1]) if j not in (3, K.LANES * 2 + 1)]
        assert not torch.isnan(out[keep]).any()


def test_signed_zero_median_is_a_zero():
    """A column of +-0 ties: both paths give a zero (which sign a tie leaves at the median rank is not
    specified, by the network either); a single-rank sum is +0.0 (0.0 + x), as the network's."""
    X = torch.zeros(600, K.LANES)
    X[::3] = -0.0
    med = coordinate_median(X)
    assert K.last_fallbacks == 0 and bool((med == 0).all())
    one = middle_sum(X[1:], 299, 300)
    assert K.last_fallbacks == 0 and torch.equal(torch.signbit(one), torch.zeros(K.LANES, dtype=torch.bool))


def test_selection_routing_medians_of_large_float32_cohorts_only():
    X = torch.randn(K.SELECT_MIN_N + 1, 100, generator=torch.Generator().manual_seed(3))
    coordinate_median(X)
    assert K.last_fallbacks == 0  # taken, and finished
    coordinate_median(X[:-1])  # even n: the pair mean
    assert K.last_fallbacks == 0
    for small_or_other in (lambda: trimmed_mean(X, 50), lambda: coordinate_median(X[: K.SELECT_MIN_N - 1]),
                           lambda: coordinate_median(X.double()), lambda: closest_to_median_mean(X, 10)):
        small_or_other()
        assert K.last_fallbacks == -1  # the network


@contextlib.contextmanager
def selection_for_all_windows():
    old = K.SELECT_MIN_N, K.SELECT_MAX_WINDOW
    K.SELECT_MIN_N, K.SELECT_MAX_WINDOW = 64, 10**9
    try:
        yield
    finally:
        K.SELECT_MIN_N, K.SELECT_MAX_WINDOW = old


@settings(max_examples=25, deadline=None)
@given(n=st.integers(64, 300), d=st.integers(1, 70), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_selection_path_property_every_window_matches_sort(n, d, seed, data):
    g = torch.Generator().manual_seed(seed)
    X = torch.round(torch.randn(n, d, generator=g) * data.draw(st.sampled_from([1.0, 3.0, 1000.0])))  # ties
    if data.draw(st.booleans()):
        X[torch.rand(n, d, generator=g) < 0.02] = math.inf
        X[torch.rand(n, d, generator=g) < 0.02] = -math.inf
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    with selection_for_all_windows():
        got = middle_sum(X, lo, hi)
        med = coordinate_median(X)
    S = torch.sort(X, dim=0).values
    assert same_bits(got, S[lo:hi].double().sum(0).float())
    assert same_bits(med, S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) * 0.5)


# --- the Gram kernel (defenses/robust/_gram_kernel.py, issue 20) ---------------------------------

G = pytest.importorskip("defenses.robust._gram_kernel", exc_type=ImportError)


@pytest.mark.parametrize("n, d", [(1, 5), (2, 0), (3, 2049), (4, 4096), (5, 7), (6, 33), (7, 3000), (9, 100),
                                  (10, 2048), (11, 4097), (12, 50), (13, 10007), (17, 300), (50, 4099)])
def test_gram_kernel_matches_a_float64_product(n, d):
    """Every shape class: n below/at/above the 6-row block and the 4-column block, remainder rows (n % 6 from 1
    to 5, with and without a full 4-column group), d = 0, a partial last chunk."""
    g = torch.Generator().manual_seed(n * 1000 + d)
    X = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None] + 0.5
    ref = X.double() @ X.double().T
    got = G.gram(X)
    assert got.dtype == torch.float64 and got.shape == (n, n)
    assert torch.equal(got, got.T)
    # float32 sums of at most CHUNK products: far inside the BLAS bound gram64 documents (2.3e-6)
    scale = ref.diagonal()[:, None].sqrt() * ref.diagonal()[None, :].sqrt()
    assert bool(((got - ref).abs() <= 1e-6 * scale + 1e-30).all())


def test_gram_kernel_is_independent_of_the_thread_count():
    X = torch.randn(9, 3 * G.CHUNK * G.SLOTS + 17)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = G.gram(X)
        torch.set_num_threads(2)
        two = G.gram(X)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_gram64_routes_float32_to_the_kernel_and_other_dtypes_to_blas(monkeypatch):
    from defenses.robust import _ops

    calls = []
    monkeypatch.setattr(G, "gram", lambda X: calls.append(X.dtype) or (X.double() @ X.double().T))
    _ops.gram64(torch.randn(3, 10))
    _ops.gram64(torch.randn(3, 10, dtype=torch.float64))
    _ops.gram64(torch.randn(3, 10, requires_grad=True))
    assert calls == [torch.float32]


def test_krum_selection_is_the_same_with_the_blas_gram(monkeypatch):
    """The kernel changes G by far less than Krum's score gaps: the same winners as ``X @ X.T``."""
    from defenses.robust import _ops
    from defenses.robust.aggregators import Krum

    g = torch.Generator().manual_seed(3)
    X = torch.randn(31, 20000, generator=g) + 0.5 * torch.randn(1, 20000, generator=g)
    X[:6] += 0.3  # six attackers off to one side
    fast = Krum(f=6).select(X, 25)
    monkeypatch.setattr(_ops, "compiled", lambda name: None)
    assert torch.equal(fast, Krum(f=6).select(X, 25))



# --- the centred-clipping kernel (defenses/robust/_clip_kernel.py, issue 20) --------------------

CK = pytest.importorskip("defenses.robust._clip_kernel", exc_type=ImportError)


def cclip_step64(X: torch.Tensor, v: torch.Tensor | None, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The step and weights in float64, straight from the formula."""
    X64 = X.double()
    diff = X64 if v is None else X64 - v.double()
    c = torch.clamp(tau / torch.linalg.vector_norm(diff, dim=1).clamp_min(1e-30), max=1.0)
    return (c[:, None] * X64).sum(0) / X.shape[0], c


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("n, d, block", [(1, 5, None), (2, 0, None), (3, 70001, None), (5, 7, 8), (13, 10007, 4 * 10007 * 3),
                                         (50, 4099, 4 * 4099 * 7), (50, 2 * 32768 + 3, None)])
def test_clip_kernel_matches_the_formula_in_float64(n, d, block, centred, monkeypatch):
    """Every shape class: one block, several blocks with a short last one (``BLOCK_BYTES`` lowered), d = 0,
    a partial last chunk; rows inside and outside the clipping radius; with and without a centre."""
    if block is not None:
        monkeypatch.setattr(CK, "BLOCK_BYTES", block)
    g = torch.Generator().manual_seed(n * 1000 + d)
    X = torch.randn(n, d, generator=g) * torch.logspace(-3, 1, n)[:, None] / max(1, d) ** 0.5
    v = 0.1 * torch.randn(d, generator=g) / max(1, d) ** 0.5 if centred else None
    tau = 0.5
    step, c = CK.clip_step(X, v, tau)
    ref, c_ref = cclip_step64(X, v, tau)
    assert step.dtype == torch.float32 and step.shape == (d,)
    assert torch.allclose(c, c_ref, rtol=1e-6, atol=0)
    assert torch.allclose(step.double(), ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()) if d else 0)
    if n > 1 and d:
        assert 0 < int((c < 1).sum()) < n  # some rows clipped, some not


def test_clip_kernel_is_independent_of_the_thread_count():
    X = torch.randn(9, 3 * CK.CHUNK + 17)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CK.clip_step(X, X[0], 1.0)
        torch.set_num_threads(2)
        two = CK.clip_step(X, X[0], 1.0)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_centered_clipping_routes_float32_to_the_kernel_and_agrees_with_torch(monkeypatch):
    from defenses.robust import _ops, aggregators
    from defenses.robust.aggregators import CenteredClipping

    g = torch.Generator().manual_seed(5)
    X = torch.randn(20, 5000, generator=g)
    center = 0.3 * torch.randn(5000, generator=g)
    assert not CK.supports(X, center)  # 400 KB: torch's two passes run from cache
    monkeypatch.setattr(CK, "MIN_BYTES", 0)
    calls = []
    real = CK.clip_step
    monkeypatch.setattr(CK, "clip_step", lambda X, v, tau: calls.append(X.dtype) or real(X, v, tau))
    fast = CenteredClipping(tau=20.0, L=3)(X, center=center)
    CenteredClipping(tau=20.0)(X.double(), center=center.double())
    CenteredClipping(tau=20.0)(X.requires_grad_(True), center=center)
    assert calls == [torch.float32] * 3
    monkeypatch.setattr(aggregators, "compiled", lambda name: None)
    slow = CenteredClipping(tau=20.0, L=3)(X.detach(), center=center)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert _ops.compiled("_clip_kernel") is CK
