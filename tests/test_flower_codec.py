"""The Flower transport without processes: message formats, decoders under garbage, certificates,
partitions, and what a SuperNode refuses."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import ConfigRecord  # noqa: E402

from secfed.errors import ConfigError, DataError, MalformedMessage  # noqa: E402
from secfed.flower import codec  # noqa: E402
from secfed.flower.server import Received, WirePlainSum  # noqa: E402
from secfed.interfaces import ClientUpdate  # noqa: E402
from secfed.secure_sum import PlainSum  # noqa: E402
from secfed.wire import encode_update  # noqa: E402

from conftest import tiny_config  # noqa: E402


def test_weights_roundtrip_and_golden_header():
    w = torch.tensor([1.0, -2.5, 0.0])
    buf = codec.encode_weights(7, w)
    # b"SFW", version 1, round 7 (u32 LE), d = 3 (u32 LE), then 3 x f32 LE
    assert buf[:12] == b"SFW\x01" + (7).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert buf[12:16] == bytes.fromhex("0000803f")  # 1.0f
    assert torch.equal(codec.decode_weights(buf, expected_dim=3, round_=7), w)
    for bad, why in ((buf[:-1], "length"), (buf[:4] + (8).to_bytes(4, "little") + buf[8:], "round"),
                     (b"SFX" + buf[3:], "magic"), (buf[:12] + bytes.fromhex("0000c07f") + buf[16:], "nan")):
        with pytest.raises(MalformedMessage):
            codec.decode_weights(bad, expected_dim=3, round_=7)
    with pytest.raises(MalformedMessage):
        codec.decode_weights(buf, expected_dim=4, round_=7)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5))
def test_decoders_raise_only_malformed_message(buf, d):
    for fn in (lambda: codec.decode_weights(buf, expected_dim=d, round_=1),
               lambda: codec.decode_ids(buf, num_clients=d + 1),
               lambda: codec.decode_metrics(buf.decode("latin-1")),
               lambda: codec.decode_state(buf.decode("latin-1"))):
        try:
            fn()
        except MalformedMessage:
            pass


def test_ids_metrics_state_validation():
    assert codec.decode_ids(codec.encode_ids([0, 2, 5]), num_clients=6) == [0, 2, 5]
    for ids in ([2, 1], [1, 1], [6]):
        with pytest.raises(MalformedMessage):
            codec.decode_ids(codec.encode_ids(ids), num_clients=6)
    assert codec.decode_metrics('{"train_loss": 0.5}') == {"train_loss": 0.5}
    for bad in ('{"x": NaN}', '{"x": "a"}', "[1]", '{"x": true}', "{" * 10):
        with pytest.raises(MalformedMessage):
            codec.decode_metrics(bad)
    assert codec.decode_state(codec.encode_state({"clip": 0.5, "_tamper": 1, "center": torch.zeros(2)})) == {"clip": 0.5}
    rec = ConfigRecord({"v": 1, "round": True})
    with pytest.raises(MalformedMessage):
        codec.get(rec, "round", int)  # a bool is not a round number
    with pytest.raises(MalformedMessage):
        codec.get(rec, "payload", bytes)


def test_wire_plain_sum_equals_plain_sum_and_rejects_garbage(tiny_cfg):
    from secfed.engine import Engine

    eng = Engine(tiny_cfg, None, progress=False)
    ctx = eng.context(1, [0, 1, 2])
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(i, torch.randn(eng.spec.numel, generator=g), 10 + i, float(10 + i)) for i in range(3)]
    ref = PlainSum().aggregate(ups, ctx)
    rec = [Received(u.client_id, encode_update(1, u.client_id, u.num_examples, u.weight, u.delta)) for u in ups]
    got = WirePlainSum().aggregate(rec, ctx)
    assert torch.equal(got.total, ref.total) and got.client_ids == [0, 1, 2]
    rec[1] = Received(1, rec[1].payload[:-4])  # truncated
    rec[2] = Received(2, encode_update(1, 0, 1, 1.0, ups[2].delta))  # claims to be client 0
    got = WirePlainSum().aggregate(rec, ctx)
    assert got.client_ids == [0] and set(got.dropped) == {1, 2}
    assert all(r.startswith("malformed") for r in got.dropped.values())


def test_certificates_chain_and_private_key_modes(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from secfed.flower.deploy import make_certs, make_node_key

    p = make_certs(tmp_path / "certs", ("superlink.example.org",))
    ca = x509.load_pem_x509_certificate(p["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(p["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "superlink.example.org" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(i) for i in sans.get_values_for_type(x509.IPAddress)}
    for k in ("key", "ca_key"):
        assert stat.S_IMODE(os.stat(p[k]).st_mode) == 0o600
    priv, pub = make_node_key(tmp_path / "node", "n0")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert isinstance(load_ssh_private_key(priv.read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key(pub.read_bytes()), ec.EllipticCurvePublicKey)


def test_partitions_hold_exactly_each_clients_shard(tmp_path, tiny_cfg):
    from secfed.partitions import PartitionTask, write_partitions
    from secfed.task import Task

    paths = write_partitions(tiny_cfg, tmp_path)
    full = Task(tiny_cfg)
    for i, p in enumerate(paths):
        part = PartitionTask(tiny_cfg, p, i)
        assert len(part.train) == len(full.client_data(i))
        for k, v in full.client_data(i).tensors.items():
            assert torch.equal(part.client_data(i).tensors[k], v)
    with pytest.raises(DataError, match="partition"):
        PartitionTask(tiny_cfg, paths[0], 1)  # node 1 handed node 0's file
    with pytest.raises(DataError, match="different config"):
        PartitionTask(tiny_config(run={"seed": 1}), paths[0], 0)


def test_supernode_refuses_foreign_config_wrong_client_and_bad_weights(tmp_path, tiny_cfg):
    from secfed.flower.runtime import ClientRuntime
    from secfed.task import Task

    rt = ClientRuntime(tiny_cfg, Task(tiny_cfg))
    good = {"v": 1, "round": 1, "client": 0, "fingerprint": tiny_cfg.fingerprint(), "cohort": codec.encode_ids([0, 1]),
            "weights": codec.encode_weights(1, rt.global_w), "state": "{}"}
    from flwr.app import RecordDict

    from secfed.flower.client import node_train

    out = node_train(rt, RecordDict(), ConfigRecord(good), 0)
    payload, metrics = out["payload"], json.loads(out["metrics"])
    assert len(payload) == 28 + 4 * rt.spec.numel and "train_loss" in metrics  # SFU header is 28 bytes
    for change in ({"fingerprint": "0" * 16}, {"client": 1}, {"cohort": codec.encode_ids([1, 2])},
                   {"weights": codec.encode_weights(2, rt.global_w)}, {"round": 0}, {"state": "[]"}):
        with pytest.raises(MalformedMessage):
            node_train(rt, RecordDict(), ConfigRecord({**good, **change}), 0)


def test_node_config_is_checked(tiny_cfg, tmp_path):
    from secfed.flower.client import _node_setup

    with pytest.raises(ConfigError, match="partition-id"):
        _node_setup({}, tiny_cfg)
    with pytest.raises(ConfigError, match="outside"):
        _node_setup({"partition-id": 9}, tiny_cfg)
    with pytest.raises(ConfigError, match="config-file"):
        _node_setup({"partition-id": 0}, None)
    f = tmp_path / "exp.json"
    f.write_text(json.dumps(tiny_cfg.model_dump(mode="json")))
    cfg, cid, data = _node_setup({"partition-id": 2, "config-file": str(f)}, None)
    assert cfg.fingerprint() == tiny_cfg.fingerprint() and cid == 2 and data is None


def test_flower_engine_refuses_what_does_not_run_over_flower_yet():
    from secfed.flower.server import FlowerEngine

    with pytest.raises(ConfigError, match="server.secure_sum"):
        FlowerEngine(tiny_config(server={"secure_sum": "ckks"}), None, grid=None, progress=False)
    with pytest.raises(ConfigError, match="omniscient"):
        FlowerEngine(tiny_config(attack={"adversary": "alie"}), None, grid=None, progress=False)


@pytest.mark.parametrize("active,drop_step", [(False, None), (False, "masked_input"), (False, "unmask"),
                                              (True, None), (True, "consistency")])
def test_secagg_over_flower_messages_equals_inprocess_secagg(active, drop_step):
    """secfed's SecAgg+ (both variants) as one protocol session: the server's session over Flower-like messages,
    each node restoring its client session from its own context.state, gives the in-process sum, with the same
    recovery when a client vanishes at a step (its SuperNode never answers)."""
    from flwr.app import RecordDict

    from secfed.engine import Engine
    from secfed.flower.client import node_step, save_session
    from secfed.flower.server import SessionSum

    faults = {"dropouts": {drop_step: [2]}} if drop_step else {}
    cfg = tiny_config(data={"num_clients": 5}, server={"cohort_size": 5, "secure_sum": {"name": "secagg+", "active": active}},
                      faults=faults)
    eng = Engine(cfg, None, progress=False)
    ctx = eng.context(1, [0, 1, 2, 3, 4])
    ups, _ = eng.collect(ctx)
    ref = eng.secure_sum.aggregate(ups, ctx)
    node_sum = Engine(cfg, None, progress=False).secure_sum  # the nodes' own copy of the config's secure sum
    node_sum.use_keys(eng.secure_sum.identities.private_bytes() if active else {})
    states = {u.client_id: RecordDict() for u in ups}
    rec = []
    for u in ups:
        session = node_sum.client_session(u.client_id, 1, cfg.run.seed, u.delta, u.weight)
        save_session(states[u.client_id], session)
        rec.append(Received(u.client_id, b"", {}, session.reason))
    seen: list[str] = []

    class Nodes:
        def exchange(self, step, outgoing, ctx):
            seen.append(step)
            return {c: node_step(node_sum, states[c], ConfigRecord({"step": step, "round": 1, "client": c, "payload": p}),
                                 c) for c, p in outgoing.items()}, {}

    got = SessionSum(eng.secure_sum, Nodes()).aggregate(rec, ctx)
    assert seen == ["advertise", "share", "masked_input"] + (["consistency"] if active else []) + ["unmask"]
    assert torch.equal(got.total, ref.total) and got.total_weight == ref.total_weight
    assert got.client_ids == ref.client_ids and set(got.dropped) == set(ref.dropped)
    assert got.metrics["secagg_active"] is active
    assert got.updates is None  # the server never holds an individual update
    assert all(len(s) == 0 for s in states.values()) or drop_step  # nodes forget keys and updates after unmask
    # A node refuses a step out of order or for a round it did not train.
    fresh = RecordDict()
    with pytest.raises(MalformedMessage):
        node_step(node_sum, fresh, ConfigRecord({"step": "share", "round": 1, "client": 0, "payload": b""}), 0)
    s0 = RecordDict()
    save_session(s0, node_sum.client_session(0, 1, cfg.run.seed, ups[0].delta, ups[0].weight))
    with pytest.raises(MalformedMessage, match="before advertise"):
        node_step(node_sum, s0, ConfigRecord({"step": "share", "round": 1, "client": 0, "payload": b""}), 0)


def test_transport_switch_is_not_part_of_the_fingerprint():
    a, b = tiny_config(), tiny_config(deploy={"transport": "flower-ray"})
    assert a.fingerprint() == b.fingerprint()
    with pytest.raises(ConfigError, match="deploy.transport"):
        tiny_config(deploy={"transport": "carrier-pigeon"})
