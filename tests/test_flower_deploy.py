"""The Flower transport for real: flower-superlink + flower-supernode OS processes on loopback with TLS.

Every test starts its own processes on free ports under ``tmp_path`` and stops
them (SIGTERM, then SIGKILL) however it ends. Configs are tiny so that the cost
is Flower's. Each SuperNode is secfed's (``secfed.flower.worker``): one long-lived
ClientApp worker thread handles every message, instead of Flower's fresh
``flwr-clientapp`` process (torch import included) per message.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from secfed.checkpoint import load_checkpoint  # noqa: E402
from secfed.engine import Engine, read_rounds  # noqa: E402
from secfed.flower.deploy import LocalFederation  # noqa: E402

from conftest import digits_config, tiny_config  # noqa: E402


def _digits3(rounds: int = 2, **server):
    # run.threads = 1 on both sides: torch's intra-op thread count changes float summation order in conv layers.
    return digits_config(run={"name": "fl3", "rounds": rounds, "threads": 1}, data={"num_clients": 3, "test_size": 200},
                         client={"local_steps": 2}, server={"cohort_size": 3, **server},
                         deploy={"round_timeout": 240, "connect_timeout": 120})


def _weights(run_dir: Path) -> torch.Tensor:
    return load_checkpoint(Path(run_dir))[0]["global"]


WORKER_LINE = re.compile(r"\[secfed-worker pid=(\d+)\] task done: (\w+) message, (\S+) in [\d.]+ s, (\d+) tasks")


@pytest.mark.slow  # real SuperLink + 3 SuperNodes with TLS (about 50 s); the Flower message path is in the
# default suite through tests/test_parity_matrix.py, the worker through tests/test_flower_worker.py
def test_three_supernodes_over_tls_equal_the_inprocess_run(tmp_path):
    # One round: both messages a node gets (the fingerprint query, then train) are handled by one
    # long-lived worker per SuperNode (no flwr-clientapp process per message); the slow test below
    # runs two rounds across a SuperLink restart.
    cfg = _digits3(rounds=1)
    with LocalFederation(cfg, tmp_path / "work") as fed:
        assert fed.superlink is not None and len(fed.supernodes) == 3
        assert len({p.pid for p in fed.supernodes.values()}) == 3  # three separate OS processes
        launchers = {i: p.pid for i, p in fed.supernodes.items()}
        summary = fed.run(tmp_path / "flower", timeout=420)
    ref = Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert summary["rounds_completed"] == 1
    assert [r["completed"] for r in read_rounds(tmp_path / "flower")] == [3]
    assert torch.equal(_weights(tmp_path / "flower"), _weights(tmp_path / "inprocess"))
    assert summary["final_accuracy"] == ref["final_accuracy"]
    # TLS and node authentication were on: the SuperLink had certificates and refused unknown keys.
    cmd = (tmp_path / "work" / "logs" / "flwr-cli.log").read_text()
    assert cmd.count("registered successfully") == 3
    workers = set()
    for i in range(3):  # each SuperNode read its own partition file only
        log = (tmp_path / "work" / "logs" / f"supernode-{i}.log").read_text()
        assert log.count("Receiving: train message") == 1
        done = WORKER_LINE.findall(log)
        # the worker inside the SuperNode process ran every message this node received, one after the other
        assert {int(pid) for pid, *_ in done} == {launchers[i]}, done
        assert len(done) == log.count("Receiving: ") >= 2, done  # at least the fingerprint query and a train
        assert [int(n) for *_, n in done] == list(range(1, len(done) + 1))
        assert [kind for _, kind, _, _ in done].count("train") == 1
        assert all(status == "completed" for _, _, status, _ in done), done
        assert "Start `flwr-clientapp` process" not in log  # Flower started no per-message process
        workers.add(done[0][0])
    assert len(workers) == 3


@pytest.mark.slow
def test_killed_supernode_is_a_dropout_and_a_restarted_superlink_resumes(tmp_path):
    import threading

    cfg = _digits3(rounds=2, min_clients=2)
    cfg.deploy.round_timeout = 150
    work = tmp_path / "work"
    with LocalFederation(cfg, work, durable=True) as fed:
        # Round 1: SuperNode 2 is killed (SIGKILL, process group) once its training message is out.
        def killer() -> None:
            log = work / "logs" / "supernode-2.log"
            for _ in range(1200):
                if log.exists() and "Receiving: train message" in log.read_text():
                    fed.kill_supernode(2)
                    return
                time.sleep(0.2)

        th = threading.Thread(target=killer)
        th.start()
        fed.run(tmp_path / "flower", rounds=1, timeout=600)
        th.join()
        r1 = read_rounds(tmp_path / "flower")
        assert r1[0]["status"] == "ok" and r1[0]["completed"] == 2 and r1[0]["dropped"] == 1
        assert "2: no reply within deploy.round_timeout" in r1[0]["flower_dropped"]
        ledger_before = (tmp_path / "flower" / "rounds.jsonl").read_text()
        # The SuperLink crashes and comes back on the same port and database; the run resumes at round 2.
        fed.start_supernode(2)
        fed.restart_superlink()
        summary = fed.run(tmp_path / "flower", resume=True, rounds=2, timeout=600)
    recs = read_rounds(tmp_path / "flower")
    assert [r["round"] for r in recs] == [1, 2], recs
    assert recs[1]["status"] == "ok" and recs[1]["completed"] >= 2, recs[1].get("flower_dropped")
    assert summary["rounds_completed"] == 2
    assert (tmp_path / "flower" / "rounds.jsonl").read_text().startswith(ledger_before)  # round 1 kept, not redone


@pytest.mark.slow
def test_ray_simulation_equals_inprocess_and_rejects_garbage(tmp_path):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from secfed.flower import codec
    from secfed.flower.client import make_client_app
    from secfed.flower.server import make_server_app
    from secfed.flower.simulation import run_ray_simulation

    cfg = tiny_config(run={"threads": 1}, data={"num_clients": 4}, deploy={"ray_num_cpus": 2})
    summary = run_ray_simulation(cfg, tmp_path / "ray")
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert summary["rounds_completed"] == 2
    assert torch.equal(_weights(tmp_path / "ray"), _weights(tmp_path / "inprocess"))

    # A client that answers with garbage bytes is rejected (MalformedMessage) and the round goes on.
    honest = make_client_app(cfg)
    liar = ClientApp()

    @liar.query()
    def query(msg, context):
        return honest(msg, context)

    @liar.train()
    def train(msg, context):
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) == 1:
            rec = dict(reply.content.config_records[codec.RECORD])
            rec["payload"] = b"SFU\x01" + b"\xff" * 40
            return Message(RecordDict({codec.RECORD: ConfigRecord(rec)}), reply_to=msg)
        return reply

    result: dict = {}
    run_simulation(make_server_app(cfg, tmp_path / "garbage", result=result), liar, num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    recs = read_rounds(tmp_path / "garbage")
    assert all(r["completed"] == 3 and r["rejected"] == 1 and r["status"] == "ok" for r in recs)


@pytest.mark.slow
def test_secagg_over_ray_equals_inprocess(tmp_path):
    from secfed.flower.simulation import run_ray_simulation

    # run.threads = 1: the ServerApp runs in a thread of its own, whose OpenMP thread count otherwise
    # defaults to every core (the in-process run uses the main thread's setting).
    cfg = tiny_config(run={"threads": 1}, server={"secure_sum": "secagg+"}, deploy={"ray_num_cpus": 2})
    summary = run_ray_simulation(cfg, tmp_path / "ray")
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert summary["rounds_completed"] == 2
    assert all(r["secagg_degree"] == 3 and r["completed"] == 4 for r in read_rounds(tmp_path / "ray"))
    assert torch.equal(_weights(tmp_path / "ray"), _weights(tmp_path / "inprocess"))


@pytest.mark.slow  # real SuperLink + 3 SuperNodes with TLS and node auth (about a minute)
def test_active_secagg_on_real_supernodes_signs_with_the_node_keys(tmp_path):
    """Active SecAgg+ (the default) on three real SuperNodes: each node signs with the key it authenticates
    to the SuperLink with (node config identity-key = its --auth-supernode-private-key), the server verifies
    against the registered public keys (the roster LocalFederation writes), one node drops out after the
    masked input (consistency step), and the weights equal the in-process run's (generated keys)."""
    cfg = digits_config(run={"name": "fl3a", "rounds": 1, "threads": 1}, data={"num_clients": 3, "test_size": 200},
                        client={"local_steps": 2}, server={"cohort_size": 3, "secure_sum": "secagg+"},
                        deploy={"round_timeout": 240, "connect_timeout": 120}, faults={"dropouts": {"consistency": [1]}})
    with LocalFederation(cfg, tmp_path / "work") as fed:
        assert fed.sign_with_node_keys and sorted(p.name for p in (tmp_path / "work" / "roster").iterdir()) == \
            ["client-0.pub", "client-1.pub", "client-2.pub"]
        for i in range(3):  # the roster entry is the key registered for node i's Flower authentication
            assert (tmp_path / "work" / "roster" / f"client-{i}.pub").read_bytes() == \
                (tmp_path / "work" / "nodes" / str(i) / "node.pub").read_bytes()
        summary = fed.run(tmp_path / "flower", timeout=420)
    ref = Engine(cfg, tmp_path / "inprocess", progress=False).run()
    rec = read_rounds(tmp_path / "flower")[0]
    assert summary["rounds_completed"] == 1 and rec["secagg_active"] is True and rec["completed"] == 3
    assert rec["secagg_unmask_dropouts"] == 1  # client 1 dropped after its masked input: its input is in the sum
    assert torch.equal(_weights(tmp_path / "flower"), _weights(tmp_path / "inprocess"))
    assert summary["final_accuracy"] == ref["final_accuracy"]
    assert (tmp_path / "work" / "logs" / "flwr-cli.log").read_text().count("registered successfully") == 3
