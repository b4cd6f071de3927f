"""secfed SecAgg+ vs Flower's SecAgg+ on the same inputs, plus the AES-CTR keystream limit.

Run:  python benchmarks/secagg.py            (full grid, writes benchmarks/results/secagg.json)
      python benchmarks/secagg.py --quick    (smoke: n=10, d=1e4)
      python benchmarks/secagg.py --active-only [--quick]
                                             (only the active-vs-semi-honest rows at n=100, d=1e6,
                                              or n=10, d=1e4 with --quick; merged into --out)

Active vs semi-honest (issue 17): the same inputs through ``SecAggPlus(active=False)`` and
``SecAggPlus(active=True)`` (Ed25519-signed keys + the signed consistency round), run
alternately ``--active-reps`` times, best of reps; ``headline.active_over_semi_honest_client_time``
is the ratio of per-client compute, ``headline.active_over_semi_honest_bytes`` the ratio of
per-client bytes sent + received. ``active_p384_over_semi_honest_client_time``: the same
with ECDSA P-384 identities, the Flower node keys real SuperNodes sign with.

Active is secfed's default (``secure_sum = "secagg+"``), so
``headline.speedup_vs_flower_client_d1e6_n100`` is the **active** variant's speedup over
Flower's SecAgg+ (``..._semi_honest``: the ``active = false`` variant; ``..._active_p384``:
active with P-384 node keys); ``headline.default_variant`` says which one it is.

Both sides run the whole four-step protocol in one process, every client and the
server, on identical inputs (x_i uniform in [-0.5, 0.5]^d, weight 1, clip range 1,
2^32 modulus) and the identical neighbourhood size: Flower's ``num_shares`` is set
to secfed's k + 1 and its threshold to secfed's t. Dropouts (10%) happen before the
masked-input step, the case that needs pairwise-mask recovery.

Flower side: the client steps are Flower's own functions from
``flwr.client.mod.secure_aggregation.secaggplus_mod`` (``_setup``, ``_share_keys``,
``_collect_masked_vectors``, ``_unmask``, fed the same ConfigRecord contents the
workflow sends); the server side replays ``SecAggPlusWorkflow``'s routing and its
``unmask_stage`` arithmetic with Flower's helpers (``combine_shares``,
``pseudo_rand_gen``, ``generate_shared_key``, ``parameters_*``, ``dequantize``).
Grid/gRPC transport and protobuf framing are not timed on either side; bytes per
client count the payload bytes of the records each client sends.

Client time is the compute of all four steps summed over clients, divided by the
number of clients; server time is routing, share reconstruction and unmasking.
With ``--flower-sample m`` only m clients per configuration run Flower's
masked-input step for timing at d = 1e6 (the server then unmasks synthetic masked
vectors with the real reconstructed keys); the JSON says where that was done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from _machine import machine

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from defenses.secure_aggregation.identity import Identities  # noqa: E402
from defenses.secure_aggregation.prg import MaskExpander  # noqa: E402
from defenses.secure_aggregation.secagg import SecAggPlus  # noqa: E402
from secfed.interfaces import ClientUpdate, DropoutPlan, RoundContext  # noqa: E402
from secfed.spec import ParamSpec  # noqa: E402

CLIP = 1.0


# ----------------------------------------------------------------------------- inputs
def make_inputs(n: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # benchmark data, not crypto
    return [rng.uniform(-0.5, 0.5, d).astype(np.float32) for _ in range(n)]


def dropped_set(n: int, rate: float, seed: int = 0) -> set[int]:
    m = int(math.floor(rate * n + 1e-9))
    return set(np.random.default_rng(seed + 1).permutation(n)[:m].tolist())


# ----------------------------------------------------------------------------- secfed
def run_secfed(xs: list[np.ndarray], drop: set[int], active: bool = False, scheme: str = "ed25519") -> dict:
    """One secfed round; ``scheme``: the active variant's identity keys (ed25519 = simulation, ecdsa-p384 = Flower node keys)."""
    n, d = len(xs), xs[0].size
    ctx = RoundContext(round=1, seed=0, spec=ParamSpec(("w",), ((d,),)), global_weights=torch.zeros(0), cohort=list(range(n)),
                       num_clients=n, sample_rate=None, expected_cohort=float(n),
                       dropouts=DropoutPlan({"masked_input": set(drop)}))
    ups = [ClientUpdate(i, torch.from_numpy(x), 1, 1.0) for i, x in enumerate(xs)]
    sa = SecAggPlus(clip_range=CLIP, max_weight=1, active=active)
    if active:
        sa.identities = Identities(n, scheme)  # keys made before the round, like a deployment's node keys
        sa.identities.ids()
    k, t = sa.parameters(n)
    r = sa.aggregate(ups, ctx)
    plain = np.sum([x.astype(np.float64) for i, x in enumerate(xs) if i not in drop], axis=0)
    err = float(np.abs(r.total.numpy().astype(np.float64) - plain).max())
    return {"k": k, "t": t, "client_s": r.metrics["secagg_client_seconds"], "server_s": r.metrics["secagg_server_seconds"],
            "bytes_up_per_client": float(np.mean(list(r.bytes_up.values()))),
            "bytes_per_client": float(np.mean([r.bytes_up.get(i, 0) + r.bytes_down.get(i, 0) for i in range(n)])),
            "max_abs_error": err,
            "survivors": len(r.client_ids), "ring_bits": r.metrics["secagg_ring_bits"], "bits": r.metrics["secagg_bits"]}


# ----------------------------------------------------------------------------- Flower
def run_flower(xs: list[np.ndarray], drop: set[int], k: int, t: int, sample: int | None = None) -> dict:
    import random

    from flwr.common import ndarray_to_bytes, bytes_to_ndarray, ndarrays_to_parameters
    import importlib

    fm = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract, get_parameters_shape, parameters_addition, parameters_mod, parameters_subtraction)
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_separate
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    n, d = len(xs), xs[0].size
    nids = list(range(1, n + 1))  # Flower node ids
    qrange, mrange = 1 << 22, 1 << 32
    num_shares = k + 1
    tc = {i: 0.0 for i in nids}
    up = {i: 0 for i in nids}
    ts = 0.0

    # server: setup + graph exactly as SecAggPlusWorkflow.setup_stage
    t0 = time.perf_counter()
    order = nids[:]
    random.Random(0).shuffle(order)
    half = num_shares >> 1
    neigh = {nid: {order[(i + o) % n] for o in range(-half, half + 1)} for i, nid in enumerate(order)}
    cfg0 = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: t, Key.CLIPPING_RANGE: CLIP,
            Key.TARGET_RANGE: qrange, Key.MOD_RANGE: mrange, Key.MAX_WEIGHT: 1.0}
    ts += time.perf_counter() - t0
    states, pks = {}, {}
    for nid in nids:
        t0 = time.perf_counter()
        st = fm.SecAggPlusState()
        st.nid = nid
        res = fm._setup(st, dict(cfg0))
        tc[nid] += time.perf_counter() - t0
        states[nid] = st
        pks[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
        up[nid] += sum(map(len, pks[nid]))
    # share keys
    inbox: dict[int, list[tuple[int, bytes]]] = {i: [] for i in nids}
    for nid in nids:
        cfg = {str(v): pks[v] for v in neigh[nid]}
        t0 = time.perf_counter()
        res = fm._share_keys(states[nid], cfg)
        tc[nid] += time.perf_counter() - t0
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            inbox[dst].append((nid, ct))
            up[nid] += len(ct) + 8
    # masked input
    timed = set(nids) - {nids[i] for i in drop}
    if sample is not None:
        timed = set(sorted(timed)[:sample])
    masked_sum = None
    shapes = [(1,), (d,)]
    n_masked = 0
    for i, nid in enumerate(nids):
        if i in drop:
            continue
        if nid not in timed:  # not timed: store its shares as Flower does, send a stand-in vector (see docstring)
            st = states[nid]
            for src, ct in inbox[nid]:
                _, _, b_share, sk_share = share_keys_plaintext_separate(decrypt(st.ss2_dict[src], ct))
                st.rd_seed_share_dict[src], st.sk1_share_dict[src] = b_share, sk_share
            vec = [np.random.randint(0, mrange, s, dtype=np.int64) for s in shapes]
        else:
            params = ndarrays_to_parameters([xs[i]])
            cfg = {Key.CIPHERTEXT_LIST: [c for _, c in inbox[nid]], Key.SOURCE_LIST: [s for s, _ in inbox[nid]]}
            t0 = time.perf_counter()
            res = fm._collect_masked_vectors(states[nid], cfg, 1, params)
            tc[nid] += time.perf_counter() - t0
            payload = res[Key.MASKED_PARAMETERS]
            up[nid] += sum(map(len, payload))
            n_masked += 1
            t0 = time.perf_counter()
            vec = [bytes_to_ndarray(b) for b in payload]
            ts += time.perf_counter() - t0
        t0 = time.perf_counter()
        masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
        ts += time.perf_counter() - t0
    active = {nids[i] for i in range(n) if i not in drop}
    dead = set(nids) - active
    # unmask (clients)
    collected: dict[int, list[bytes]] = {i: [] for i in nids}
    for nid in sorted(active):
        cfg = {Key.ACTIVE_NODE_ID_LIST: list(neigh[nid] & active), Key.DEAD_NODE_ID_LIST: list(neigh[nid] & dead)}
        t0 = time.perf_counter()
        res = fm._unmask(states[nid], cfg)
        tc[nid] += time.perf_counter() - t0
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST]):
            collected[owner].append(share)
            up[nid] += len(share) + 8
    # unmask (server), as SecAggPlusWorkflow.unmask_stage
    t0 = time.perf_counter()
    mv = masked_sum
    for nid, shares in collected.items():
        if len(shares) < t:
            raise RuntimeError("flower: not enough shares")
        secret = combine_shares(shares)
        if nid in active:
            mv = parameters_subtraction(mv, pseudo_rand_gen(secret, mrange, get_parameters_shape(mv)))
        else:
            for nb in neigh[nid] - {nid}:
                sk = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[nb][0]))
                pm = pseudo_rand_gen(sk, mrange, get_parameters_shape(mv))
                mv = parameters_addition(mv, pm) if nid > nb else parameters_subtraction(mv, pm)
    rec = parameters_mod(mv, mrange)
    q_total, rec = factor_extract(rec)
    agg = dequantize(rec, CLIP, qrange)
    offset = -(len(active) - 1) * CLIP
    for v in agg:
        v += offset
        v *= qrange / q_total
    ts += time.perf_counter() - t0
    out = {"client_s": float(np.mean([tc[nid] for nid in timed])) if sample is not None
           else float(np.mean([tc[i] for i in nids])),
           "server_s": ts, "bytes_up_per_client": float(np.mean([up[i] for i in timed])), "clients_timed": len(timed),
           "masked_input_clients_run": n_masked}
    if sample is None:  # a complete run: check Flower's sum too (its aggregate is the mean * q_total / qrange)
        plain = np.sum([x.astype(np.float64) for i, x in enumerate(xs) if i not in drop], axis=0)
        out["max_abs_error"] = float(np.abs(agg[0] * len(active) - plain).max())
        # note: Flower's result is sum/len(active) after its own rescaling; error is per sum
    return out


# ----------------------------------------------------------------------------- keystream
def keystream_throughput(d: int = 1_000_000, ring_bits: int = 32, reps: int = 30) -> dict:
    key = os.urandom(32)
    nbytes = d * ring_bits // 8
    zeros, buf = bytes(nbytes), bytearray(nbytes + 15)
    raw = []
    for _ in range(reps):
        t0 = time.perf_counter()
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, buf)
        raw.append(time.perf_counter() - t0)
    ex = MaskExpander(d, ring_bits)
    acc = np.zeros(d, dtype=f"<u{ring_bits // 8}")
    mask = []
    for i in range(reps):
        t0 = time.perf_counter()
        ex.add(acc, key, 1 if i % 2 else -1)
        mask.append(time.perf_counter() - t0)
    raw_gbs = nbytes / min(raw) / 1e9
    mask_gbs = nbytes / min(mask) / 1e9
    return {"d": d, "ring_bits": ring_bits, "raw_keystream_GBps": raw_gbs, "mask_expansion_GBps": mask_gbs,
            "fraction": mask_gbs / raw_gbs, "raw_median_GBps": nbytes / float(np.median(raw)) / 1e9,
            "mask_median_GBps": nbytes / float(np.median(mask)) / 1e9,
            "note": "best of reps (least disturbed by other processes); medians alongside"}


def active_vs_semi_honest(n: int, d: int, reps: int = 1, rate: float = 0.0) -> dict:
    """The two secfed variants side by side on the same inputs (alternating, best of ``reps``)."""
    xs, drop = make_inputs(n, d), dropped_set(n, rate)
    runs: dict[str, list[dict]] = {"semi_honest": [], "active": [], "active_p384": []}
    for _ in range(reps):
        runs["semi_honest"].append(run_secfed(xs, drop, active=False))
        runs["active"].append(run_secfed(xs, drop, active=True))
        runs["active_p384"].append(run_secfed(xs, drop, active=True, scheme="ecdsa-p384"))
    best = {k: min(v, key=lambda r: r["client_s"]) for k, v in runs.items()}
    sh, ac, ap = best["semi_honest"], best["active"], best["active_p384"]
    row = {"n": n, "d": d, "dropout": rate, "reps": reps, "k": sh["k"], "t": sh["t"], "semi_honest": sh, "active": ac,
           "active_p384": ap, "client_time_ratio_p384": ap["client_s"] / sh["client_s"],
           "bytes_ratio_p384": ap["bytes_per_client"] / sh["bytes_per_client"],
           "client_time_ratio": ac["client_s"] / sh["client_s"], "server_time_ratio": ac["server_s"] / sh["server_s"],
           "bytes_ratio": ac["bytes_per_client"] / sh["bytes_per_client"],
           "bytes_up_ratio": ac["bytes_up_per_client"] / sh["bytes_up_per_client"],
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"active vs semi-honest n={n} d={d} drop={rate}: client x{row['client_time_ratio']:.3f} "
          f"({ac['client_s']*1e3:.1f} vs {sh['client_s']*1e3:.1f} ms), server x{row['server_time_ratio']:.3f}, "
          f"bytes x{row['bytes_ratio']:.4f} ({ac['bytes_per_client']:.0f} vs {sh['bytes_per_client']:.0f}); "
          f"P-384 identities: client x{row['client_time_ratio_p384']:.3f}", flush=True)
    return row


def _active_headline(result: dict, rows: list[dict], quick: bool) -> None:
    head = max((r for r in rows if r["dropout"] == 0.0), key=lambda r: (r["d"], r["n"]))
    result.setdefault("headline", {}).update({"active_over_semi_honest_client_time": head["client_time_ratio"],
                                              "active_over_semi_honest_bytes": head["bytes_ratio"]})
    if "client_time_ratio_p384" in head:
        result["headline"]["active_p384_over_semi_honest_client_time"] = head["client_time_ratio_p384"]
    result.setdefault("headline_source", {})["active"] = (
        f"n={head['n']}, d={head['d']}, dropout 0%, secfed active / secfed semi-honest, per-client compute "
        f"(best of {head['reps']}) and per-client bytes sent + received" + (" (QUICK smoke size)" if quick else ""))
    result["active_vs_semi_honest"] = rows


def main_active(args) -> None:
    n, d = (10, 10_000) if args.quick else ((args.n or [100])[0], (args.d or [1_000_000])[0])
    rows = [active_vs_semi_honest(n, d, args.active_reps, rate) for rate in (0.0, 0.1)]
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    _active_headline(result, rows, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: n=10, d=1e4")
    ap.add_argument("--flower-sample", type=int, default=None,
                    help="at d=1e6 time Flower's masked-input step on this many clients only")
    ap.add_argument("--n", type=int, nargs="*", help="subset of cohort sizes (default 10 50 100)")
    ap.add_argument("--d", type=int, nargs="*", help="subset of dimensions (default 100000 1000000)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing --out file that this run does not re-measure")
    ap.add_argument("--active-only", action="store_true",
                    help="only the active-vs-semi-honest rows (n=100, d=1e6; n=10, d=1e4 with --quick)")
    ap.add_argument("--skip-active", action="store_true", help="full grid without the active-vs-semi-honest rows")
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine")
    ap.add_argument("--active-reps", type=int, default=2, help="alternating repetitions of each variant")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "secagg.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.active_only:
        return main_active(args)
    grid_n, grid_d = ([10], [10_000]) if args.quick else (args.n or [10, 50, 100], args.d or [100_000, 1_000_000])
    out = Path(args.out)
    old_rows = json.loads(out.read_text())["rows"] if args.merge and out.exists() else []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for d in grid_d:
        for n in grid_n:
            xs = make_inputs(n, d)
            for rate in (0.0, 0.1):
                drop = dropped_set(n, rate)
                s = run_secfed(xs, drop)
                sample = args.flower_sample if d >= 1_000_000 else None
                f = run_flower(xs, drop, s["k"], s["t"], sample)
                a = run_secfed(xs, drop, active=True)  # the actively secure variant (the default), same inputs
                a384 = run_secfed(xs, drop, active=True, scheme="ecdsa-p384")  # ... signing with Flower node keys
                row = {"n": n, "d": d, "dropout": rate, "k": s["k"], "t": s["t"], "measured": stamp,
                       "flower_clients_timed": "all" if sample is None else f"{sample} (masked-input step)",
                       "secfed": s, "flower": f, "secfed_active": a, "secfed_active_p384": a384,
                       "client_speedup": f["client_s"] / s["client_s"], "server_speedup": f["server_s"] / s["server_s"],
                       "client_speedup_active": f["client_s"] / a["client_s"],
                       "client_speedup_active_p384": f["client_s"] / a384["client_s"]}
                rows.append(row)
                print(f"n={n:4d} d={d:8d} drop={rate:.1f} k={s['k']:3d}  client secfed {s['client_s']*1e3:8.1f} ms "
                      f"flower {f['client_s']*1e3:8.1f} ms (x{row['client_speedup']:.1f})  server secfed "
                      f"{s['server_s']:.2f} s flower {f['server_s']:.2f} s  bytes/client {s['bytes_up_per_client']:.0f} "
                      f"vs {f['bytes_up_per_client']:.0f}  active x{row['client_speedup_active']:.1f}", flush=True)
    done = {(r["n"], r["d"], r["dropout"]) for r in rows}
    rows = sorted([r for r in old_rows if (r["n"], r["d"], r["dropout"]) not in done] + rows,
                  key=lambda r: (r["d"], r["n"], r["dropout"]))
    ks = keystream_throughput(d=1_000_000 if not args.quick else 10_000)
    print(f"AES-256-CTR keystream {ks['raw_keystream_GBps']:.2f} GB/s, mask expansion {ks['mask_expansion_GBps']:.2f} GB/s "
          f"({100 * ks['fraction']:.0f}%)")
    big = [r for r in rows if r["dropout"] == 0.0]
    head = max(big, key=lambda r: (r["d"], r["n"]))  # n = 100, d = 1e6 in the full grid
    result = {
        "headline": {"default_variant": "active",
                     "speedup_vs_flower_client_d1e6_n100": head["client_speedup_active"],  # the default variant
                     "speedup_vs_flower_client_d1e6_n100_active": head["client_speedup_active"],
                     "speedup_vs_flower_client_d1e6_n100_active_p384": head["client_speedup_active_p384"],
                     "speedup_vs_flower_client_d1e6_n100_semi_honest": head["client_speedup"],
                     "mask_expansion_fraction_of_keystream": ks["fraction"]},
        "headline_source": {"speedup": f"n={head['n']}, d={head['d']}, dropout 0%, per-client compute, Flower / secfed's "
                                       "default variant (active = true, Ed25519 identities; _active_p384: ECDSA P-384 "
                                       "node keys as on real SuperNodes; _semi_honest: active = false)",
                            "fraction": "best-of-30 mask expansion (keystream + ring add) / raw AES-256-CTR keystream, d=1e6, 32-bit ring"},
        "quick": args.quick,
        "flower_sample": args.flower_sample,
        "machine": machine(loaded=args.loaded),
        "keystream": ks,
        "rows": rows,
    }
    if not args.skip_active:
        an, ad = (10, 10_000) if args.quick else (100, 1_000_000)
        _active_headline(result, [active_vs_semi_honest(an, ad, args.active_reps, rate) for rate in (0.0, 0.1)],
                         args.quick)
    elif args.merge and out.exists():  # keep the active rows of an earlier run
        prev = json.loads(out.read_text())
        if "active_vs_semi_honest" in prev:
            _active_headline(result, prev["active_vs_semi_honest"], "QUICK" in prev["headline_source"].get("active", ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
