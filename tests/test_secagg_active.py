"""SecAgg+ with active security (issue 17): exact sums under dropouts, the malicious-server
attacks succeed against the semi-honest variant and fail against the active one, fuzzed decoders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from _mutations import mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attacks.malicious_server import forged_keys, inconsistent_views, sybil
from defenses.secure_aggregation import active as act
from defenses.secure_aggregation import messages as msg
from defenses.secure_aggregation.prg import MaskExpander
from defenses.secure_aggregation.secagg import SecAggPlus
from secfed.errors import ConfigError, MalformedMessage

from test_secagg_protocol import expected_sum, make_ctx, make_updates

STEPS = ["advertise", "share", "masked_input", "consistency", "unmask"]


def _active(seed: int = 7) -> SecAggPlus:
    sa = SecAggPlus(active=True)
    sa.graph_seed = seed
    return sa


# ---------------------------------------------------------------------------- honest runs
@pytest.mark.parametrize("n", [4, 40])
@pytest.mark.parametrize("step", STEPS)
def test_honest_active_run_is_exact_with_a_dropout_at_each_step(n, step):
    sa, d = _active(), 33
    ups = make_updates(n, d)
    ctx = make_ctx(d, {step: {100 + n - 1}})
    r = sa.aggregate(ups, ctx)
    late = step in ("consistency", "unmask")  # already in U3: its input is in the sum
    assert (100 + n - 1 in r.client_ids) == late and (100 + n - 1 in r.dropped) != late
    exp, w = expected_sum(sa, ups, ctx, set(r.client_ids))
    assert torch.equal(r.total, exp) and r.total_weight == w and r.metrics["secagg_active"] is True


def test_honest_active_run_is_exact_with_dropouts_at_every_step_at_once():
    sa, d, n = _active(), 20, 14
    ups = make_updates(n, d)
    ctx = make_ctx(d, {s: {100 + i} for i, s in enumerate(STEPS[:3])} | {"consistency": {103}, "unmask": {104}})
    r = sa.aggregate(ups, ctx)
    assert set(r.dropped) == {100, 101, 102} and {103, 104} <= set(r.client_ids)
    exp, w = expected_sum(sa, ups, ctx, set(r.client_ids))
    assert torch.equal(r.total, exp) and r.total_weight == w


def test_active_is_the_default_and_semi_honest_stays_available():
    assert SecAggPlus().active is True and SecAggPlus(active=False).active is False


def test_active_transcript_has_the_consistency_round_and_semi_honest_is_unchanged():
    d = 10
    ups = make_updates(5, d)
    a = _active().aggregate(ups, make_ctx(d))
    s = SecAggPlus(active=False).aggregate(ups, make_ctx(d))
    assert {m.step for m in a.transcript} == set(STEPS)
    assert {m.step for m in s.transcript} == set(STEPS) - {"consistency"} and s.metrics["secagg_active"] is False
    assert torch.equal(a.total, s.total)


def test_active_must_be_a_bool():
    with pytest.raises(ConfigError, match="active"):
        SecAggPlus(active="yes")


# ---------------------------------------------------------------------------- attacks
ATTACKS = {
    "inconsistent_views": lambda v: inconsistent_views(v),
    "forged_keys": lambda v: forged_keys(v, "forged"),
    "replayed_keys": lambda v: forged_keys(v, "replayed"),
    "sybil": lambda v: sybil(v),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_malicious_server_recovers_a_live_input_from_semi_honest_secagg(attack):
    rep = ATTACKS[attack]("semi-honest")
    assert rep.recovered, rep
    assert rep.learnt["max_abs_error_of_recovered_update"] < 1e-6


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_malicious_server_learns_nothing_from_active_secagg(attack):
    rep = ATTACKS[attack]("active")
    assert not rep.recovered, rep
    assert "max_abs_error_of_recovered_update" not in rep.learnt


def test_inconsistent_views_against_active_gets_no_share_of_the_target():
    rep = inconsistent_views("active")
    for strategy, got in rep.learnt.items():
        assert got["b_shares_of_target"] < 3 or all(v < 3 for v in got["mask_key_shares"].values()), strategy


@pytest.mark.parametrize("n,k", [(12, 4), (20, 6)])
def test_inconsistent_views_on_a_sparse_graph(n, k):
    """Bell et al.'s sparse graph: the split-view attack unmasks the target when clients do not check
    signatures, and gets fewer than t shares of anything it needs when each client requires t signatures
    from its own neighbourhood (the counting argument in docs/secagg.md)."""
    assert inconsistent_views("semi-honest", n=n, k=k).recovered
    rep = inconsistent_views("active", n=n, k=k)
    assert not rep.recovered
    t = k // 2 + 1
    for strategy, got in rep.learnt.items():
        assert got["b_shares_of_target"] < t or all(v < t for v in got["mask_key_shares"].values()), strategy


# ---------------------------------------------------------------------------- client checks
def _signed_client(round_: int = 3):
    """Client 0 of 5 (complete graph, t = 3) after a masked input with all four neighbours."""
    ids = list(range(5))
    idk = {u: Ed25519PrivateKey.generate() for u in ids}
    roster = {u: k.public_key().public_bytes_raw() for u, k in idk.items()}
    cl = {u: act.ActiveSecAggClient(u, round_, identity=idk[u], roster=roster) for u in ids}
    adv = {}
    for u in ids:
        cl[u].receive_setup(msg.encode_setup(round_, msg.Setup(3, 8, 32, 1.0, 4, [v for v in ids if v != u])))
        adv[u] = act.decode_advertise_signed(cl[u].advertise_keys(), round_=round_, sender=u)
    shares = {u: msg.decode_shares(cl[u].share_keys(act.encode_keys_signed(round_, {v: adv[v] for v in ids if v != u})),
                                   round_=round_, sender=u, allowed=set(ids) - {u}) for u in ids}
    for u in ids:
        fwd = msg.encode_forward(round_, {v: shares[v][u] for v in ids if v != u})
        cl[u].masked_input(fwd, np.zeros(5, dtype="<u4"), MaskExpander(5, 32))
    return cl, idk


def test_a_client_signs_one_survivor_set_per_round():
    cl, _ = _signed_client()
    cl[0].consistency_check(act.encode_consistency(3, [0, 1, 2, 3, 4]))
    with pytest.raises(MalformedMessage, match="already signed"):
        cl[0].consistency_check(act.encode_consistency(3, [0, 1, 2]))


def test_signatures_from_another_round_or_set_are_refused():
    cl, idk = _signed_client()
    u3 = [0, 1, 2, 3, 4]
    cl[0].consistency_check(act.encode_consistency(3, u3))
    old = {v: idk[v].sign(act.consistency_statement(2, u3)) for v in u3}  # replayed from round 2
    with pytest.raises(MalformedMessage, match="invalid signature"):
        cl[0].unmasking(act.encode_signatures(3, old))
    other = {v: idk[v].sign(act.consistency_statement(3, [0, 1, 2])) for v in u3}  # another U3
    with pytest.raises(MalformedMessage, match="invalid signature"):
        cl[0].unmasking(act.encode_signatures(3, other))
    good = {v: idk[v].sign(act.consistency_statement(3, u3)) for v in [0, 1]}  # too few
    with pytest.raises(MalformedMessage, match="threshold"):
        cl[0].unmasking(act.encode_signatures(3, good))
    good = {v: idk[v].sign(act.consistency_statement(3, u3)) for v in [0, 1, 2]}
    out = cl[0].unmasking(act.encode_signatures(3, good))
    assert msg.decode_unmask(out, round_=3, sender=0, expected={v: msg.SELF_MASK for v in u3})
    with pytest.raises(MalformedMessage, match="already answered"):
        cl[0].unmasking(act.encode_signatures(3, good))


def test_survivor_set_naming_an_unmasked_neighbour_or_too_small_is_refused():
    cl, _ = _signed_client()
    with pytest.raises(MalformedMessage, match="threshold"):
        cl[0].consistency_check(act.encode_consistency(3, [0, 1]))
    cl2, _ = _signed_client()
    cl2[0].held.pop(4)  # pretend 4's share was never forwarded: 0 did not mask against 4
    with pytest.raises(MalformedMessage, match="did not mask against"):
        cl2[0].consistency_check(act.encode_consistency(3, [0, 1, 2, 3, 4]))


# ---------------------------------------------------------------------------- fuzzing
R, ME = 3, 5


def _x():
    return act._pub(X25519PrivateKey.generate())


VALID = {
    "advertise": act.encode_advertise_signed(R, ME, _x(), _x(), os.urandom(64)),
    "keys": act.encode_keys_signed(R, {v: (_x(), _x(), os.urandom(64)) for v in (1, 2, 3)}),
    "consistency": act.encode_consistency(R, [1, 2, ME]),
    "consistency_sig": act.encode_consistency_sig(R, ME, os.urandom(64)),
    "signatures": act.encode_signatures(R, {1: os.urandom(64), 2: os.urandom(64)}),
}
DECODE = {
    "advertise": lambda b: act.decode_advertise_signed(b, round_=R, sender=ME),
    "keys": lambda b: act.decode_keys_signed(b, round_=R, allowed={1, 2, 3}),
    "consistency": lambda b: act.decode_consistency(b, round_=R, allowed={1, 2, 3, ME}),
    "consistency_sig": lambda b: act.decode_consistency_sig(b, round_=R, sender=ME),
    "signatures": lambda b: act.decode_signatures(b, round_=R, allowed={1, 2}),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_active_messages_decode(name):
    DECODE[name](VALID[name])


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_active_messages_raise_only_malformed(name, data):
    buf = mutate(data, VALID[name], ("flip", "truncate", "extend", "random", "count"), msg.HEADER.size, extend_max=80)
    try:
        DECODE[name](buf)
    except MalformedMessage:
        pass


def test_huge_count_is_refused_before_allocating():
    buf = bytearray(VALID["signatures"])
    buf[msg.HEADER.size:msg.HEADER.size + 4] = (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(MalformedMessage, match="exceeds|truncated"):
        DECODE["signatures"](bytes(buf))


# ---------------------------------------------------------------------------- wiring
def test_active_variant_from_config_in_the_engine(tmp_path):
    from conftest import tiny_config
    from secfed.engine import Engine, read_rounds

    cfg = tiny_config(run={"rounds": 1}, server={"secure_sum": {"name": "secagg+", "active": True}},
                      faults={"dropouts": {"consistency": [1]}})
    Engine(cfg, tmp_path / "a", progress=False).run()
    rec = read_rounds(tmp_path / "a")[0]
    assert rec["status"] == "ok" and rec["secagg_active"] is True and rec["completed"] == 4


def test_flower_path_runs_the_active_variant_only_with_the_nodes_identities():
    """Over Flower the active variant runs through the same protocol session as in-process (test_parity_matrix);
    without the nodes' identities on the roster the server refuses, it never downgrades to semi-honest."""
    pytest.importorskip("flwr")
    from conftest import tiny_config
    from secfed.flower.server import FlowerEngine

    cfg = tiny_config(server={"secure_sum": {"name": "secagg+", "active": True}})
    with pytest.raises(ConfigError, match="active"):
        FlowerEngine(cfg, None, grid=None, progress=False)
    keys = SecAggPlus(active=True, num_clients=4).simulation_keys()
    eng = FlowerEngine(cfg, None, grid=None, progress=False, keys=keys)
    assert eng.secure_sum.active and eng.secure_sum.identities.private_bytes() == keys
