"""Parity matrix (issue 21): every shipped experiment family gives the same run in-process and over Flower.

The Flower side is the real ServerApp code (:class:`~secfed.flower.server.FlowerEngine`) and the real
node code (``node_train`` / ``node_step`` of :mod:`secfed.flower.client`) with Flower ``Message`` objects
in between, on a grid that delivers them in this process (:class:`NodeGrid`). Like flwr 1.41's SuperNode
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

from conftest import tiny_config  # noqa: E402

# timings, and he_clipped: a count only each client knows (in-process the simulation adds them up)
TIMING = ("seconds", "peak_rss_mb", "secagg_client_seconds", "secagg_server_seconds", "he_clipped")


class _Reply:
    def __init__(self, node: int, values: dict) -> None:
        from flwr.app import ConfigRecord, RecordDict

        from secfed.flower import codec

        self.metadata = type("M", (), {"src_node_id": node})()
        self.content = RecordDict({codec.RECORD: ConfigRecord({"v": codec.PROTOCOL, **values})})

    def has_error(self) -> bool:
        return False


class NodeGrid:
    """Flower messages delivered to secfed's node code in this process (node id = client id + 1).

    One node runtime serves every client (as a Ray actor may); before each message it forgets
    whatever a previous message left in memory (trainer state), so only ``context.state`` carries
    anything from one message to the next, as with a fresh ClientApp process per message."""

    def __init__(self, cfg, keys=None) -> None:
        from flwr.app import RecordDict

        from secfed.flower.runtime import ClientRuntime
        from secfed.task import Task

        self.cfg = cfg
        self.rt = ClientRuntime(cfg, Task(cfg))
        if keys:
            self.rt.secure_sum.use_keys(keys)
        self.states = {c: RecordDict() for c in range(cfg.data.num_clients)}
        self.train_replies: list[dict] = []

    def get_node_ids(self):
        return [c + 1 for c in range(self.cfg.data.num_clients)]

    def send_and_receive(self, msgs, timeout=None):
        from secfed.flower import codec
        from secfed.flower.client import node_step, node_train

        out = []
        for m in msgs:
            cid = m.metadata.dst_node_id - 1
            rec = codec.record_of(m.content)
            if hasattr(self.rt.client.trainer, "load_state_dict"):
                self.rt.client.trainer.load_state_dict({})  # a fresh process remembers nothing
            if m.metadata.message_type == "train":
                vals = node_train(self.rt, self.states[cid], rec, cid)
                self.train_replies.append(vals)
            elif "step" in rec:
                vals = {"round": rec["round"], "client": cid, "step": rec["step"],
                        "payload": node_step(self.rt.secure_sum, self.states[cid], rec, cid)}
            else:
                vals = {"client": cid, "fingerprint": self.cfg.fingerprint()}
            out.append(_Reply(cid + 1, vals))
        return out


def run_flower(cfg, out: Path):
    """The run over Flower messages with the engine's own loop; (engine, grid)."""
    from flwr.supercore.task_identity import TaskIdentity

    from secfed.flower.server import FlowerEngine

    probe = Engine(cfg, None, progress=False).secure_sum  # keys made outside the server (simulation)
    keys = probe.simulation_keys() if getattr(probe, "needs_keys", False) else None
    grid = NodeGrid(cfg, keys)
    eng = FlowerEngine(cfg, out, grid, progress=False, keys=keys)
    grid.rt.client.truth = eng.truth  # simulation harness: the evaluation-only record (secfed.truth) a node never sends
    names = [n for n in vars(TaskIdentity) if n.startswith("_") and n.endswith("_id")]
    old = {n: getattr(TaskIdentity, n) for n in names}
    for n in names:  # Flower messages need ids outside a SuperLink
        setattr(TaskIdentity, n, old[n] if old[n] is not None else 1)
    try:
        eng.run()
    finally:
        for n, v in old.items():
            setattr(TaskIdentity, n, v)
    return eng, grid


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
DEFAULT_FAMILIES = {"plain", "secagg+-active", "homomorphic-sum", "momentum-trainer"}


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
@pytest.mark.parametrize("family", ["plain", "dp-sgd-seeded", "secagg+"])
def test_real_superlink_and_supernodes_give_the_inprocess_run(family, tmp_path):
    """The same parity with flower-superlink and one flower-supernode per client as OS processes (TLS, node
    authentication, each node reading its own partition file): plain, DP-SGD and SecAgg+."""
    from secfed.flower.deploy import LocalFederation

    sections, _ = FAMILIES[family]
    cfg = tiny_config(run={"rounds": 1, "threads": 1}, deploy={"round_timeout": 240, "connect_timeout": 120},
                      **{k: dict(v) for k, v in sections.items()})
    with LocalFederation(cfg, tmp_path / "work") as fed:
        fed.run(tmp_path / "flower", timeout=600)
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert torch.equal(_weights(tmp_path / "inprocess"), _weights(tmp_path / "flower"))
    assert _records(tmp_path / "inprocess") == _records(tmp_path / "flower")
    assert _ledger(tmp_path / "inprocess") == _ledger(tmp_path / "flower")
