"""Parity matrix (issue 21): every shipped experiment family gives the same run in-process and over Flower.

The Flower side is the real ServerApp code (:class:`~secfed.flower.server.FlowerEngine`) and the real
node code (``node_train`` / ``node_step`` of :mod:`secfed.flower.client`) with Flower ``Message`` objects
in between, on a grid that delivers them in this process (``tests/_flower_fake.py``, ``NodeGrid``). Like flwr 1.41's SuperNode
(a fresh ``flwr-clientapp`` process per message), a node keeps nothing in memory between messages but
its Flower ``context.state``. Compared: the final weights (bit for bit), the privacy ledger's entries
and every round record (timings aside). Where the noise is secret (CSPRNG, under a privacy guard) the
weights cannot match: the ledger and the records' keys still must.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from secfed.checkpoint import load_checkpoint  # noqa: E402
from secfed.engine import Engine, read_rounds  # noqa: E402

from _flower_fake import run_flower  # noqa: E402  (the grid: tests/_flower_fake.py NodeGrid)
from conftest import tiny_config  # noqa: E402

# timings, and he_clipped: a count only each client knows (in-process the simulation adds them up)
TIMING = ("seconds", "peak_rss_mb", "secagg_client_seconds", "secagg_server_seconds", "he_clipped")


def _records(run_dir: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING + skip} for r in read_rounds(run_dir)]


def _ledger(run_dir: Path) -> list[dict]:
    p = run_dir / "privacy_ledger.jsonl"
    if not p.exists():
        return []
    skip = ("time", "chain", "prev")
    return [{k: v for k, v in json.loads(l).items() if k not in skip} for l in p.read_text().splitlines() if l.strip()]


def _weights(run_dir: Path) -> torch.Tensor:
    return load_checkpoint(run_dir)[0]["global"]


def _dp_fedavg(pipeline, stages, secure_sum="plain", **server):
    return dict(client={"weighting": "uniform", "pipeline": pipeline, "local_steps": 2},
                server={"sampling": "poisson", "sample_rate": 1.0, "cohort_size": 0, "secure_sum": secure_sum,
                        "aggregator": {"name": "mean", "denominator": "expected"}, "stages": stages,
                        "privacy": {"name": "dp-fedavg", "epsilon": 8.0, "delta": 1e-5}, **server})


#: family -> (config sections, weights must match bit for bit)
FAMILIES = {
    "plain": ({}, True),
    "dp-sgd-seeded": ({"client": {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 0.5,
                                              "noise": "seeded"}}}, True),
    "dp-sgd-guarded": ({"client": {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                        "server": {"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}}}, False),
    "dp-fedavg-central": (_dp_fedavg([{"name": "clip", "clip_norm": 1.0}], ["central-gaussian"]), False),
    "dp-fedavg-distributed": (_dp_fedavg([{"name": "clip", "clip_norm": 1.0}, "gaussian-share"], [],
                                         secure_sum={"name": "secagg+", "clip_range": 64.0}, min_clients=2), False),
    "dp-fedavg-ddgauss": (_dp_fedavg([{"name": "clip", "clip_norm": 1.0}, "ddgauss"], [],
                                     secure_sum={"name": "secagg+", "clip_range": 64.0}, min_clients=2), False),
    "secagg+-semi-honest": ({"server": {"cohort_size": 4, "secure_sum": {"name": "secagg+", "active": False}}}, True),
    "secagg+-active": ({"server": {"cohort_size": 4, "secure_sum": "secagg+"},  # active is the default
                        "faults": {"dropouts": {"consistency": [1]}}}, True),
    "secagg+-dropout": ({"server": {"cohort_size": 4, "secure_sum": "secagg+"},
                         "faults": {"dropouts": {"masked_input": [2]}}}, True),
    "robust-group-sums": ({"data": {"num_clients": 6},
                           "server": {"cohort_size": 6, "secure_sum": "secagg+", "group_size": 2,
                                      "aggregator": "median"}}, True),
    "homomorphic-sum": ({"server": {"secure_sum": "ckks"}}, True),
    "robust-median-plain": ({"server": {"aggregator": "median"}}, True),
    "momentum-trainer": ({"client": {"trainer": {"name": "momentum-sgd", "beta": 0.9}}}, True),
    "attack-observer": ({"server": {"observers": [{"name": "text-inversion", "attack_rounds": [1]}]}}, True),
}


#: in the default suite (one per transport path: plain sum, both SecAgg+ sessions, HE, node-kept state);
#: the other families run with ``pytest -m slow`` (each ~5 s; the default suite stays under 10 minutes)
DEFAULT_FAMILIES = {"plain", "secagg+-active", "homomorphic-sum", "momentum-trainer", "dp-fedavg-ddgauss"}


@pytest.mark.parametrize("family", [f if f in DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(FAMILIES)])
def test_inprocess_and_flower_give_the_same_run(family, tmp_path):
    sections, same_weights = FAMILIES[family]
    cfg = tiny_config(run={"rounds": 2, "threads": 1}, **{k: dict(v) for k, v in sections.items()})
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    eng, grid = run_flower(cfg, tmp_path / "flower")
    # HE: the key context is compressed, so its size (bytes_down) varies by a few bytes with the random key
    skip = ("bytes_down",) if family == "homomorphic-sum" else ()
    a, b = _records(tmp_path / "inprocess", skip), _records(tmp_path / "flower", skip)
    assert len(a) == len(b) == 2 and all(r["status"] == "ok" for r in a + b), (a, b)
    if same_weights:
        assert torch.equal(_weights(tmp_path / "inprocess"), _weights(tmp_path / "flower"))
        assert a == b
    else:  # secret noise: the same keys, counts and accounting; the values differ by the noise
        assert [sorted(r) for r in a] == [sorted(r) for r in b]
        for ra, rb in zip(a, b):
            assert {k: ra[k] for k in ("round", "sampled", "completed", "dropped", "epsilon") if k in ra} == \
                   {k: rb[k] for k in ("round", "sampled", "completed", "dropped", "epsilon") if k in rb}
    assert _ledger(tmp_path / "inprocess") == _ledger(tmp_path / "flower")
    assert grid.train_replies  # the clients did run behind Flower messages


@pytest.mark.slow
@pytest.mark.parametrize("family", ["plain", "dp-sgd-seeded", "secagg+-active", "secagg+-semi-honest"])
def test_real_superlink_and_supernodes_give_the_inprocess_run(family, tmp_path):
    """The same parity with flower-superlink and one flower-supernode per client as OS processes (TLS, node
    authentication, each node reading its own partition file): plain, DP-SGD and SecAgg+ (active: the nodes
    sign with their node keys, LocalFederation's roster; semi-honest)."""
    from secfed.flower.deploy import LocalFederation

    sections, _ = FAMILIES[family]
    cfg = tiny_config(run={"rounds": 1, "threads": 1}, deploy={"round_timeout": 240, "connect_timeout": 120},
                      **{k: dict(v) for k, v in sections.items()})
    with LocalFederation(cfg, tmp_path / "work") as fed:
        fed.run(tmp_path / "flower", timeout=600)
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert torch.equal(_weights(tmp_path / "inprocess"), _weights(tmp_path / "flower"))
    # active: the real nodes sign with P-384 node keys (96-byte signatures), in-process with generated Ed25519 (64)
    skip = ("bytes_up", "bytes_down") if family == "secagg+-active" else ()
    assert _records(tmp_path / "inprocess", skip) == _records(tmp_path / "flower", skip)
    assert _ledger(tmp_path / "inprocess") == _ledger(tmp_path / "flower")


@pytest.mark.slow
def test_ddgauss_on_real_superlink_and_supernodes(tmp_path):
    """The distributed discrete Gaussian over flower-superlink and real flower-supernode processes: each node
    encodes its ring elements with the mechanism it rebuilt from the guard's z, SecAgg+ sums them, the server
    decodes; the ledger and the records' keys are the in-process run's (the noise is secret, so not the weights)."""
    from secfed.flower.deploy import LocalFederation

    sections, _ = FAMILIES["dp-fedavg-ddgauss"]
    cfg = tiny_config(run={"rounds": 1, "threads": 1}, deploy={"round_timeout": 240, "connect_timeout": 120},
                      **{k: dict(v) for k, v in sections.items()})
    with LocalFederation(cfg, tmp_path / "work") as fed:
        fed.run(tmp_path / "flower", timeout=600)
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    a, b = _records(tmp_path / "inprocess"), _records(tmp_path / "flower")
    assert [r["status"] for r in b] == ["ok"] and b[0]["dp_mechanism"] == "ddgauss"
    assert b[0]["secagg_ring_input"] == "ddgauss" and [sorted(r) for r in a] == [sorted(r) for r in b]
    assert _ledger(tmp_path / "inprocess") == _ledger(tmp_path / "flower")
    w0 = load_checkpoint(tmp_path / "flower")[0]["global"]
    assert torch.isfinite(w0).all()
