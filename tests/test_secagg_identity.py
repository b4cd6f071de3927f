"""Active SecAgg+ on real SuperNodes (issue 17): signature schemes, node keys, the operator's roster,
a deployment round where every node signs with its own Flower node key, and Sybils refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from _mutations import mutate
from hypothesis import HealthCheck, given, settings, strategies as st

from defenses.secure_aggregation import active as act
from defenses.secure_aggregation import identity as ident
from defenses.secure_aggregation import messages as msg
from defenses.secure_aggregation.secagg import SecAggPlus
from secfed.errors import ConfigError, MalformedMessage
from secfed.flower.deploy import make_node_key
from secfed.rounds import InProcessTransport, drive

from test_secagg_protocol import expected_sum, make_ctx, make_updates

KEYS = {
    "ed25519": Ed25519PrivateKey.generate,
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ecdsa-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
}


# ---------------------------------------------------------------------------- schemes
@pytest.mark.parametrize("scheme", sorted(KEYS))
def test_every_scheme_signs_fixed_width_and_verifies(scheme):
    k = KEYS[scheme]()
    sig = ident.sign(k, b"statement")
    assert ident.scheme_of(k) == scheme and len(sig) == ident.SIG_SIZES[scheme]
    ident.verify_signature(k.public_key(), sig, b"statement")
    with pytest.raises(InvalidSignature):
        ident.verify_signature(k.public_key(), sig, b"statemenT")
    with pytest.raises(InvalidSignature):  # a valid signature of another length (e.g. DER) is refused before parsing
        ident.verify_signature(k.public_key(), sig + b"\0", b"statement")


def test_p384_signature_is_raw_r_s_not_der():
    k = ec.generate_private_key(ec.SECP384R1())
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    sigs = [ident.sign(k, b"x") for _ in range(20)]
    assert {len(s) for s in sigs} == {96}  # fixed width whatever the size of r and s (DER would vary)
    sig = sigs[0]

    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    k.public_key().verify(der, b"x", ec.ECDSA(hashes.SHA384()))  # the same signature, SHA-384 as in RFC 5656


def test_unsupported_keys_are_refused():
    with pytest.raises(ValueError, match="unsupported"):
        ident.scheme_of(rsa.generate_private_key(65537, 2048))
    with pytest.raises(ValueError, match="unsupported"):
        ident.scheme_of(ec.generate_private_key(ec.SECP256K1()))


# ---------------------------------------------------------------------------- node keys and the roster
def _federation(tmp_path: Path, n: int) -> tuple[Path, dict[int, Path]]:
    """n node keys as ``secfed deploy node-key`` makes them; the roster folder holds their public halves."""
    roster = tmp_path / "roster"
    roster.mkdir()
    priv = {}
    for i in range(n):
        priv[i], pub = make_node_key(tmp_path / f"node{i}", "node")
        (roster / f"client-{i}.pub").write_bytes(pub.read_bytes())
    return roster, priv


def test_node_key_is_a_p384_identity_and_the_roster_maps_partition_ids(tmp_path):
    roster, priv = _federation(tmp_path, 3)
    keys = ident.load_roster(roster)
    assert sorted(keys) == [0, 1, 2] and all(ident.scheme_of(k) == "ecdsa-p384" for k in keys.values())
    for i in range(3):
        own = ident.load_private_key(priv[i])
        assert ident.public_bytes(own.public_key()) == ident.public_bytes(keys[i])
    # a roster file of '<id> <OpenSSH public key>' lines gives the same mapping; PEM SPKI and raw Ed25519 work too
    lines = [f"{i} {(roster / f'client-{i}.pub').read_text().strip()}" for i in range(3)]
    (tmp_path / "roster.txt").write_text("# operator's roster\n\n" + "\n".join(lines) + "\n")
    assert {i: ident.public_bytes(k) for i, k in ident.load_roster(tmp_path / "roster.txt").items()} == \
           {i: ident.public_bytes(k) for i, k in keys.items()}
    ed = Ed25519PrivateKey.generate()
    (roster / "7.pem").write_bytes(ed.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    assert ident.scheme_of(ident.load_roster(roster)[7]) == "ed25519"
    assert ident.scheme_of(ident.public_key(ed.public_key().public_bytes_raw())) == "ed25519"


@pytest.mark.parametrize("bad, match", [
    ("notakey", "client-9.pub.*not a raw Ed25519, OpenSSH, PEM or DER public key"),
    ("rsa", "client-9.pub.*unsupported identity key"),
    ("dup", "client-9.pub.*the same key as client 0"),
])
def test_malformed_roster_entry_is_one_config_error_naming_it(tmp_path, bad, match):
    roster, _ = _federation(tmp_path, 2)
    entry = roster / "client-9.pub"
    if bad == "notakey":
        entry.write_text("ecdsa-sha2-nistp384 AAAAnot-base64 x\n")
    elif bad == "rsa":
        entry.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    else:
        entry.write_bytes((roster / "client-0.pub").read_bytes())
    with pytest.raises(ConfigError, match=match) as e:
        ident.load_roster(roster)
    assert "\n" not in str(e.value) and "server.secure_sum.roster" in str(e.value)


def test_roster_names_and_lines_are_checked(tmp_path):
    roster, _ = _federation(tmp_path, 1)
    (roster / "alice.pub").write_text("x")
    with pytest.raises(ConfigError, match="alice.pub is not named"):
        ident.load_roster(roster)
    (tmp_path / "r.txt").write_text("zero ecdsa-sha2-nistp384 AAAA\n")
    with pytest.raises(ConfigError, match=r"r.txt:1 is not '<id> <public key>'"):
        ident.load_roster(tmp_path / "r.txt")
    with pytest.raises(ConfigError, match="neither a folder"):
        ident.load_roster(tmp_path / "missing")


def test_a_node_key_must_be_its_own_roster_entry(tmp_path):
    roster, priv = _federation(tmp_path, 3)
    node = SecAggPlus(roster=str(roster))
    with pytest.raises(ConfigError, match="not client 1's roster entry"):
        node.use_node_identity(str(priv[0]), 1)  # node 0's key claiming partition 1
    with pytest.raises(ConfigError, match="identity-key' is required"):
        node.use_node_identity(None, 1)
    with pytest.raises(ConfigError, match="cannot read"):
        node.use_node_identity(str(tmp_path / "nope.key"), 1)
    with pytest.raises(ConfigError, match="roster' is required"):
        SecAggPlus().use_node_identity(str(priv[0]), 0)  # active, no roster: refused on a real SuperNode
    with pytest.raises(ConfigError, match="only with active = true"):
        SecAggPlus(active=False, roster=str(roster))
    node.use_node_identity(str(priv[1]), 1)
    assert ident.scheme_of(node.identities.key(1)) == "ecdsa-p384"
    with pytest.raises(ConfigError, match="never holds one"):
        SecAggPlus(roster=str(roster)).identities.key(1)  # the server has public keys only
    with pytest.raises(ConfigError, match="drop the roster"):
        SecAggPlus(roster=str(roster)).aggregate(make_updates(3, 4), make_ctx(4))


# ---------------------------------------------------------------------------- a deployment round
def _round(tmp_path: Path, n: int, sybil_key: bool = False, imposter: int | None = None):
    """Server with the roster of n node keys; node sessions that sign with their own node keys.

    ``sybil_key``: one more client (id n, not on the roster) signs with a key of its own.
    ``imposter``: that client's session is replaced by one signing with another (unregistered) key."""
    roster, priv = _federation(tmp_path, n)
    server = SecAggPlus(roster=str(roster))
    server.graph_seed = 3
    ups = make_updates(n + (1 if sybil_key else 0), 6)
    ups = [type(u)(i, u.delta, u.num_examples, u.weight) for i, u in enumerate(ups)]
    ctx = make_ctx(6)
    sessions = {}
    for u in ups:
        if u.client_id < n and u.client_id != imposter:
            node = SecAggPlus(roster=str(roster))
            node.use_node_identity(str(priv[u.client_id]), u.client_id)
            sessions[u.client_id] = node.client_session(u.client_id, ctx.round, ctx.seed, u.delta, u.weight)
        else:  # a node whose key the operator never registered: it builds its own roster to play along
            key = ec.generate_private_key(ec.SECP384R1())
            rogue = SecAggPlus()
            rogue.identities = ident.RosterIdentities({**server.identities.roster(list(range(n))),
                                                       u.client_id: key.public_key()})
            rogue.identities.use_own(u.client_id, key, "rogue")
            sessions[u.client_id] = rogue.client_session(u.client_id, ctx.round, ctx.seed, u.delta, u.weight)
    cand = {u: s.reason for u, s in sessions.items()}
    result = drive(server.serve(cand, ctx), InProcessTransport(sessions), ctx)
    return server, ups, ctx, result


def test_deployment_round_with_node_keys_is_exact(tmp_path):
    server, ups, ctx, r = _round(tmp_path, 4)
    exp, w = expected_sum(server, ups, ctx, {0, 1, 2, 3})
    assert torch.equal(r.total, exp) and r.total_weight == w and r.client_ids == [0, 1, 2, 3]
    assert r.metrics["secagg_active"] is True
    # the node keys signed: every advertisement carries a 96-byte P-384 signature
    adv = [m.payload for m in r.transcript if m.step == "advertise"]
    assert len(adv) == 4 and all(len(p) == msg.HEADER.size + 64 + 1 + 96 for p in adv)


def test_a_sybil_off_the_roster_is_refused_and_the_round_goes_on(tmp_path):
    server, ups, ctx, r = _round(tmp_path, 4, sybil_key=True)
    assert r.dropped == {4: "not on the secagg+ roster"} and r.client_ids == [0, 1, 2, 3]
    exp, w = expected_sum(server, ups, ctx, {0, 1, 2, 3})
    assert torch.equal(r.total, exp) and r.total_weight == w


def test_a_node_signing_with_an_unregistered_key_is_dropped(tmp_path):
    server, ups, ctx, r = _round(tmp_path, 4, imposter=2)
    assert "invalid signature of client 2" in r.dropped[2] and r.client_ids == [0, 1, 3]
    exp, w = expected_sum(server, ups, ctx, {0, 1, 3})
    assert torch.equal(r.total, exp) and r.total_weight == w


# ---------------------------------------------------------------------------- Flower wiring
def test_flower_server_needs_the_roster_on_real_supernodes_not_generated_keys(tmp_path):
    pytest.importorskip("flwr")
    from conftest import tiny_config
    from secfed.flower.server import FlowerEngine

    cfg = tiny_config(server={"secure_sum": "secagg+"})  # active by default
    with pytest.raises(ConfigError, match="server.secure_sum.roster' is required"):
        FlowerEngine(cfg, None, grid=None, progress=False)
    roster, _ = _federation(tmp_path, 4)
    cfg = tiny_config(server={"secure_sum": {"name": "secagg+", "roster": str(roster)}})
    eng = FlowerEngine(cfg, None, grid=None, progress=False)  # no keys: public keys only
    assert isinstance(eng.secure_sum.identities, ident.RosterIdentities) and not eng.secure_sum.needs_keys


def test_supernode_without_identity_key_is_one_line(tmp_path):
    pytest.importorskip("flwr")
    from secfed.flower.client import node_identity

    roster, priv = _federation(tmp_path, 2)
    ss = SecAggPlus(roster=str(roster))
    with pytest.raises(ConfigError, match="node config 'identity-key' is required"):
        node_identity(ss, {"partition-id": 0}, 0, None)
    node_identity(ss, {"partition-id": 1, "identity-key": str(priv[1])}, 1, None)
    assert ss.identities.key(1) is not None
    node_identity(SecAggPlus(active=False), {}, 0, None)  # semi-honest: no identity needed


def test_local_federation_wires_the_node_keys_as_roster(tmp_path):
    pytest.importorskip("flwr")
    from conftest import tiny_config
    from secfed.flower.deploy import LocalFederation

    fed = LocalFederation(tiny_config(server={"secure_sum": "secagg+"}), tmp_path / "w", node_auth=False)
    assert fed.sign_with_node_keys and fed.cfg.server.secure_sum.params["roster"] == str(tmp_path.resolve() / "w" / "roster")
    semi = LocalFederation(tiny_config(server={"secure_sum": {"name": "secagg+", "active": False}}), tmp_path / "s",
                           node_auth=False)
    assert not semi.sign_with_node_keys and "roster" not in semi.cfg.server.secure_sum.params


# ---------------------------------------------------------------------------- fuzzing the v2 messages
R, ME = 3, 5
_P384 = ec.generate_private_key(ec.SECP384R1())


def _x():
    return act._pub(X25519PrivateKey.generate())


MIXED = {  # signatures of several schemes in one message (a roster may mix them)
    "keys": act.encode_keys_signed(R, {1: (_x(), _x(), os.urandom(96)), 2: (_x(), _x(), os.urandom(64)),
                                       3: (_x(), _x(), os.urandom(132))}),
    "signatures": act.encode_signatures(R, {1: os.urandom(132), 2: os.urandom(96), 4: os.urandom(64)}),
    "advertise": act.encode_advertise_signed(R, ME, _x(), _x(), ident.sign(_P384, b"s")),
    "consistency_sig": act.encode_consistency_sig(R, ME, os.urandom(96)),
}
DECODE = {
    "keys": lambda b: act.decode_keys_signed(b, round_=R, allowed={1, 2, 3}),
    "signatures": lambda b: act.decode_signatures(b, round_=R, allowed={1, 2, 4}),
    "advertise": lambda b: act.decode_advertise_signed(b, round_=R, sender=ME),
    "consistency_sig": lambda b: act.decode_consistency_sig(b, round_=R, sender=ME),
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_scheme_messages_round_trip(name):
    out = DECODE[name](MIXED[name])
    if name == "signatures":
        assert sorted(len(s) for s in out.values()) == [64, 96, 132]


def test_version_1_and_odd_signature_lengths_are_refused():
    buf = bytearray(MIXED["consistency_sig"])
    buf[4] = 1  # version 1: fixed 64-byte Ed25519 fields
    with pytest.raises(MalformedMessage, match="unsupported version 1"):
        DECODE["consistency_sig"](bytes(buf))
    bad = act._head(act.ActiveStep.CONSISTENCY_SIG, R, ME) + bytes([70]) + os.urandom(70)
    with pytest.raises(MalformedMessage, match="signature length 70 is no scheme's"):
        DECODE["consistency_sig"](bad)
    with pytest.raises(MalformedMessage, match="trailing"):
        DECODE["consistency_sig"](MIXED["consistency_sig"] + b"\0")


@pytest.mark.parametrize("name", sorted(MIXED))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_mixed_scheme_messages_raise_only_malformed(name, data):
    buf = mutate(data, MIXED[name], ("flip", "truncate", "extend", "siglen", "count"), msg.HEADER.size, extend_max=140)
    try:
        DECODE[name](buf)
    except MalformedMessage:
        pass
