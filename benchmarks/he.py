"""Homomorphic aggregation side by side: NVFLARE's CKKS parameters vs secfed's default (issue 5).

One run, same machine, same updates (d = 1e6 by default, n = 10 clients, each a
random unit-norm vector, uniform weights):

- ``nvflare``: TenSEAL exactly as NVFLARE calls it (``nvflare/lighter/impl/he.py``
  HEBuilder: CKKS, N = 8192, moduli [60, 40, 40], scale 2^40, symmetric encryption,
  clients hold the secret key; ``HEModelEncryptor``: one ``ts.ckks_vector`` per
  layer; ``HEInTimeAccumulateWeightedAggregator``: ``ckks_vector_from`` + ``+``, then
  ``* (1 / count)``; the client decrypts). NVFLARE itself is not installed: its
  TenSEAL calls are replicated here.
- ``secfed_default``: :class:`~defenses.secure_aggregation.ckks.CKKSSum`'s default
  (quantised BFV, N = 4096, [60, 40], 44-bit t) through its own KeyHolder /
  HEClient / HEServer with the validated wire format.
- ``secfed_ckks_4096``: the ``scheme = "ckks"`` option (N = 4096, [60, 40], 2^40).
- ``secagg+``: :class:`~defenses.secure_aggregation.secagg.SecAggPlus` end to end
  (masking instead of HE), if it is importable.

Times: ``encrypt`` is all n clients' encode + encrypt + serialise (sequential here;
divide by n for one client), ``server_add`` is deserialise + validate + add (+ the
1/count multiply for NVFLARE), ``decrypt`` is the key holder's deserialise +
decrypt + decode. The machine is shared (2 cores), so timings are noisy; the
median of ``--repeats`` runs is reported.

    python benchmarks/he.py            # d = 1e6, n = 10, 3 repeats -> benchmarks/results/he.json
    python benchmarks/he.py --quick    # d = 1e5, 1 repeat, prints only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tenseal as ts
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defenses.secure_aggregation.ckks import HEClient, HEServer, KeyHolder  # noqa: E402
from defenses.secure_aggregation.he_params import DEFAULT, NVFLARE, HEParams  # noqa: E402
from secfed.interfaces import ClientUpdate, RoundContext  # noqa: E402
from secfed.spec import ParamSpec  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "he.json"


def make_updates(d: int, n: int, seed: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(d, generator=g)
        out.append(ClientUpdate(i, x / x.norm(), 100, weight=1.0))
    return out


def rel_error(mean: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(mean.astype(np.float64) - true) / np.linalg.norm(true))


def run_nvflare(updates: list[ClientUpdate], true: np.ndarray) -> dict:
    p = NVFLARE
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=p.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes), encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()
    ctx.global_scale = 2 ** p.scale_bits
    client_ctx = ts.context_from(ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                               save_relin_keys=True))
    server_ctx = ts.context_from(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                               save_relin_keys=True))
    t0 = time.perf_counter()
    msgs = [ts.ckks_vector(client_ctx, (u.delta.double().numpy() * u.weight).tolist()).serialize() for u in updates]
    t1 = time.perf_counter()
    total = None
    for m in msgs:
        v = ts.ckks_vector_from(server_ctx, m)
        total = v if total is None else total + v
    agg = (total * (1.0 / sum(u.weight for u in updates))).serialize()
    t2 = time.perf_counter()
    mean = np.asarray(ts.ckks_vector_from(client_ctx, agg).decrypt())
    t3 = time.perf_counter()
    d = len(true)
    return {"encrypt_s": t1 - t0, "server_add_s": t2 - t1, "decrypt_s": t3 - t2,
            "bytes_per_param": float(np.mean([len(m) for m in msgs])) / d, "relative_error": rel_error(mean, true)}


def run_secfed(updates: list[ClientUpdate], true: np.ndarray, params: HEParams) -> dict:
    kh = KeyHolder(params)
    d = len(true)
    t0 = time.perf_counter()
    client = HEClient(kh.client_context(), params)  # key distribution happens once per run, not per round
    msgs = [client.encode(u, 1)[0] for u in updates]
    t1 = time.perf_counter()
    server = HEServer(kh.server_context(), params, d=d)
    for u, m in zip(updates, msgs):
        server.add(m, round_=1, sender=u.client_id)
    agg = server.result(1)
    t2 = time.perf_counter()
    total, weight = kh.decrypt_sum(agg, d=d, round_=1, n=len(updates))
    mean = total.numpy() / weight
    t3 = time.perf_counter()
    return {"encrypt_s": t1 - t0, "server_add_s": t2 - t1, "decrypt_s": t3 - t2,
            "bytes_per_param": float(np.mean([len(m) for m in msgs])) / d, "relative_error": rel_error(mean, true)}


def run_secagg(updates: list[ClientUpdate], true: np.ndarray) -> dict | None:
    try:
        from defenses.secure_aggregation.secagg import SecAggPlus
    except ImportError:
        return None
    d, n = len(true), len(updates)
    ctx = RoundContext(round=1, seed=0, spec=ParamSpec(("w",), ((d,),)), global_weights=torch.zeros(d),
                       cohort=list(range(n)), num_clients=n, sample_rate=None, expected_cohort=float(n))
    t0 = time.perf_counter()
    r = SecAggPlus(clip_range=1.0, max_weight=1).aggregate(updates, ctx)
    el = time.perf_counter() - t0
    mean = r.total.numpy() / r.total_weight
    return {"end_to_end_s": el, "client_s_per_client": r.metrics.get("secagg_client_seconds"),
            "server_s": r.metrics.get("secagg_server_seconds"),
            "bytes_per_param": float(np.mean(list(r.bytes_up.values()))) / d, "relative_error": rel_error(mean, true)}


def median_row(rows: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "relative_error"}
    out["relative_error"] = max(r["relative_error"] for r in rows)  # worst case over repeats
    if "encrypt_s" in out:
        out["end_to_end_s"] = statistics.median(r["encrypt_s"] + r["server_add_s"] + r["decrypt_s"] for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    d, n, reps = (100_000, args.clients, 1) if args.quick else (args.dim, args.clients, args.repeats)
    torch.set_num_threads(1)
    ckks4096 = HEParams(scheme="ckks", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40), scale_bits=40)
    runs: dict[str, list[dict]] = {"nvflare": [], "secfed_default": [], "secfed_ckks_4096": [], "secagg+": []}
    for rep in range(reps):
        updates = make_updates(d, n, seed=rep)
        true = (sum(u.weight * u.delta.double() for u in updates) / sum(u.weight for u in updates)).numpy()
        runs["nvflare"].append(run_nvflare(updates, true))
        runs["secfed_default"].append(run_secfed(updates, true, DEFAULT))
        runs["secfed_ckks_4096"].append(run_secfed(updates, true, ckks4096))
        sa = run_secagg(updates, true)
        if sa is not None:
            runs["secagg+"].append(sa)
        print(f"repeat {rep + 1}/{reps} done", flush=True)
    table = {k: median_row(v) for k, v in runs.items() if v}
    for k, r in table.items():
        extra = "".join(f"  {s} {r[s]:.2f}s" for s in ("encrypt_s", "server_add_s", "decrypt_s") if s in r)
        print(f"{k:17s} {r['bytes_per_param']:6.2f} B/param  end-to-end {r['end_to_end_s']:6.2f}s{extra}  "
              f"rel.err {r['relative_error']:.2e}")
    nv, sf = table["nvflare"], table["secfed_default"]
    headline = {"bytes_per_param_vs_nvflare": sf["bytes_per_param"] / nv["bytes_per_param"],
                "speedup_vs_nvflare": nv["end_to_end_s"] / sf["end_to_end_s"],
                "max_relative_error": sf["relative_error"]}
    print("headline", json.dumps(headline))
    if args.quick:
        return
    p = DEFAULT.validate()
    result = {
        "headline": headline,
        "setting": {"dim": d, "clients": n, "repeats": reps, "updates": "random unit-norm vectors, uniform weights",
                    "relative_error": "||decrypted mean - float64 mean||_2 / ||float64 mean||_2, worst repeat",
                    "times": "median over repeats; encrypt = all clients sequentially"},
        "targets": {"bytes_per_param_vs_nvflare": "<= 1/3", "speedup_vs_nvflare": ">= 2",
                    "accuracy": "relative error <= nvflare's"},
        "targets_met": {"bytes": headline["bytes_per_param_vs_nvflare"] <= 1 / 3,
                        "speed": headline["speedup_vs_nvflare"] >= 2,
                        "accuracy": sf["relative_error"] <= nv["relative_error"]},
        "parameters": {
            "nvflare": {"scheme": "ckks", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40},
            "secfed_default": {"scheme": "bfv", "poly_modulus_degree": p.poly_modulus_degree,
                               "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes), "plain_modulus": p.plain_modulus,
                               "max_value": p.max_value, "max_clients": p.max_clients, "step": p.step},
            "secfed_ckks_4096": {"scheme": "ckks", "poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40], "scale_bits": 40},
        },
        "table": table,
        "raw": runs,
        "machine": {"python": platform.python_version(), "tenseal": ts.__version__, "cpus": "2 shared (noisy)",
                    "platform": platform.platform()},
        "command": "python benchmarks/he.py",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
