"""SecAgg+ end to end: exact sums under dropouts, clean aborts, uniform masked inputs, replay/redirect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from defenses.secure_aggregation import messages as msg
from defenses.secure_aggregation import protocol, secagg
from defenses.secure_aggregation.quantize import Quantizer, choose_bits
from defenses.secure_aggregation.secagg import SecAggPlus
from secfed.errors import ConfigError, MalformedMessage, RoundAborted
from secfed.interfaces import ClientUpdate, DropoutPlan, RoundContext
from secfed.spec import ParamSpec

STEPS = ["advertise", "share", "masked_input", "unmask"]


def make_ctx(d: int, drops: dict[str, set[int]] | None = None, round_: int = 1, state=None) -> RoundContext:
    return RoundContext(round=round_, seed=0, spec=ParamSpec(("w",), ((d,),)), global_weights=torch.zeros(d), cohort=[],
                        num_clients=0, sample_rate=None, expected_cohort=0.0, dropouts=DropoutPlan(drops or {}),
                        state=state if state is not None else {})


def make_updates(n: int, d: int, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(100 + i, (torch.rand(d, generator=g) - 0.5) * 0.2, 10, float(i % 5 + 1)) for i in range(n)]


def expected_sum(sa: SecAggPlus, ups: list[ClientUpdate], ctx: RoundContext, members: set[int]):
    """The plain sum of the quantised inputs (same stochastic rounding), decoded."""
    q, b = choose_bits(len(ups), sa.max_weight, sa.bits)
    quant = Quantizer(sa.clip_range, q, b)
    acc = np.zeros(ctx.spec.numel + 1, dtype=f"<u{b // 8}")
    for u in ups:
        if u.client_id in members:
            acc += quant.encode(u.delta.numpy(), int(u.weight), ctx.generator(u.client_id, "secagg-quantize"))
    total, w = quant.decode(acc)
    return torch.from_numpy(total.astype(np.float32)), w


def graph_of(sa: SecAggPlus, ids: list[int], ctx: RoundContext) -> tuple[dict[int, set[int]], int, int]:
    """The graph ``sa`` will draw: the graph is fresh OS randomness (finding 8), so these tests pin it."""
    sa.graph_seed = 12345
    k, t = sa.parameters(len(ids))
    return sa.draw_graph(sorted(ids), k), k, t


def max_drops(sa: SecAggPlus, ups, d: int, extra: int) -> list[int]:
    """Clients to drop: as many as one neighbourhood tolerates (k + 1 - t), plus ``extra``."""
    ids = [u.client_id for u in ups]
    g, k, t = graph_of(sa, ids, make_ctx(d))
    victim = ids[0]
    return sorted(g[victim])[: k + 1 - t + extra]


@pytest.mark.parametrize("n", [3, 10, 100])
@pytest.mark.parametrize("step", STEPS)
def test_exact_sum_with_dropouts_up_to_threshold(n, step):
    d = 24
    ups = make_updates(n, d)
    sa = SecAggPlus()
    gone = max_drops(sa, ups, d, 0)
    ctx = make_ctx(d, {step: set(gone)})
    r = sa.aggregate(ups, ctx)
    in_sum = {u.client_id for u in ups} - (set(gone) if step != "unmask" else set())
    total, w = expected_sum(sa, ups, ctx, in_sum)
    assert set(r.client_ids) == in_sum
    assert torch.equal(r.total, total) and r.total_weight == w  # exact, not approximate
    assert set(r.dropped) == (set(gone) if step != "unmask" else set())
    assert r.updates is None and r.metrics["secagg_unmask_dropouts"] == (len(gone) if step == "unmask" else 0)
    plain = sum(u.weight * u.delta for u in ups if u.client_id in in_sum)
    assert torch.allclose(r.total, plain, atol=1e-5)


@pytest.mark.parametrize("n", [3, 10, 100])
@pytest.mark.parametrize("step", STEPS)
def test_one_more_dropout_aborts_cleanly(n, step):
    d = 8
    ups = make_updates(n, d)
    sa = SecAggPlus()
    gone = max_drops(sa, ups, d, 1)
    with pytest.raises(RoundAborted, match="secagg"):
        sa.aggregate(ups, make_ctx(d, {step: set(gone)}))


def test_dropouts_spread_over_all_steps_n100():
    d, ups, sa = 16, make_updates(100, 16, seed=3), SecAggPlus()
    gone = max_drops(sa, ups, d, 0)
    plan = {s: set(gone[i::4]) for i, s in enumerate(STEPS)}
    ctx = make_ctx(d, plan)
    r = sa.aggregate(ups, ctx)
    in_sum = {u.client_id for u in ups} - set(gone) | plan["unmask"]
    total, w = expected_sum(sa, ups, ctx, in_sum)
    assert torch.equal(r.total, total) and r.total_weight == w
    assert r.metrics["secagg_degree"] < 99  # a sparse graph at n = 100


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_masked_input_is_uniform_on_the_ring(ring_bits):
    d = 32768
    ups = [ClientUpdate(i, torch.full((d,), 0.01 * (i + 1)), 1, 1.0) for i in range(3)]
    sa = SecAggPlus(max_weight=1 if ring_bits == 32 else 1 << 20)
    r = sa.aggregate(ups, make_ctx(d))
    assert r.metrics["secagg_ring_bits"] == ring_bits
    masked = [m for m in r.transcript if m.step == "masked_input" and m.client_id == 0][0]
    y = msg.decode_masked(masked.payload, round_=1, sender=0, dim=d, ring_bits=ring_bits)
    top = (y >> np.uint64(ring_bits - 8)).astype(np.int64) if ring_bits == 64 else (y >> np.uint32(24)).astype(np.int64)
    low = (y & 0xFF).astype(np.int64)
    # the masks come from the OS: for a uniform input the p-value is uniform on [0, 1], so a threshold of 1e-9
    # is a false-failure probability of 1e-9 per check (it was 1e-4); a non-uniform input gives p < 1e-10 (below)
    for vals in (top, low):
        assert chisquare(np.bincount(vals, minlength=256)).pvalue > 1e-9
    # the test has power: the unmasked quantised input is far from uniform
    q, b = choose_bits(3, sa.max_weight, "auto")
    x = Quantizer(1.0, q, b).encode(ups[0].delta.numpy(), 1, torch.Generator().manual_seed(0))
    assert chisquare(np.bincount((x >> (b - 8)).astype(np.int64), minlength=256)).pvalue < 1e-10


def test_server_sees_only_masked_inputs_and_the_sum():
    d = 16
    ups = make_updates(5, d)
    r = SecAggPlus(active=False).aggregate(ups, make_ctx(d))  # the active variant: tests/test_secagg_active.py
    assert {m.step for m in r.transcript} == set(STEPS)
    assert all(len(m.payload) > 0 for m in r.transcript)
    raw = [u.delta.numpy().tobytes() for u in ups]
    assert not any(x in m.payload for x in raw for m in r.transcript)
    assert all(r.bytes_up[u.client_id] > 0 and r.bytes_down[u.client_id] > 0 for u in ups)


# ------------------------------------------------------------------ replay / redirect
def _pair():
    a, b, c = (protocol.X25519PrivateKey.generate() for _ in range(3))
    return a, b, c


def test_replayed_share_into_another_round_is_rejected():
    a, b, _ = _pair()
    k = protocol.share_key(a, protocol._pub(b), 1, 1, 2)
    nonce, ct = protocol.encrypt_share(k, 1, 1, 2, 5, 6)
    assert protocol.decrypt_share(k, nonce, ct, 1, 1, 2) == (5, 6)
    with pytest.raises(MalformedMessage, match="tag"):
        protocol.decrypt_share(k, nonce, ct, 2, 1, 2)  # same key, other round: associated data differs


def test_redirected_share_is_rejected():
    a, b, c = _pair()
    k_ab = protocol.share_key(a, protocol._pub(b), 1, 1, 2)
    nonce, ct = protocol.encrypt_share(k_ab, 1, 1, 2, 5, 6)
    with pytest.raises(MalformedMessage):  # same key, claimed for another receiver
        protocol.decrypt_share(k_ab, nonce, ct, 1, 1, 3)
    with pytest.raises(MalformedMessage):  # same key, claimed from another sender
        protocol.decrypt_share(k_ab, nonce, ct, 1, 3, 2)
    k_cb = protocol.share_key(c, protocol._pub(b), 1, 3, 2)
    with pytest.raises(MalformedMessage):  # delivered to / decrypted by someone else's key
        protocol.decrypt_share(k_cb, nonce, ct, 1, 3, 2)


def test_server_redirecting_a_share_makes_the_client_refuse(monkeypatch):
    class Redirecting(protocol.SecAggServer):
        def forward_messages(self):
            out = super().forward_messages()
            # hand client 1 the ciphertext client 2 sent to client 3, relabelled as from 2 to 1
            fwd = msg.decode_forward(out[1], round_=self.round, allowed=self.graph[1])
            fwd[2] = self.shares[2][3]
            out[1] = msg.encode_forward(self.round, fwd)
            return out

    monkeypatch.setattr(secagg, "SecAggServer", Redirecting)
    d = 8
    ups = [ClientUpdate(i, torch.full((d,), 0.1), 1, 1.0) for i in range(6)]
    r = SecAggPlus(active=False).aggregate(ups, make_ctx(d))  # the semi-honest server class is the one patched
    assert "bad AES-GCM tag" in r.dropped[1] and 1 not in r.client_ids
    assert torch.allclose(r.total, torch.full((d,), 0.5), atol=1e-6)  # the other 5 still sum correctly


def test_replayed_message_from_earlier_round_and_duplicates_are_rejected():
    d = 8
    ups = make_updates(4, d)
    r1 = SecAggPlus(active=False).aggregate(ups, make_ctx(d, round_=1))  # a version-1 ADVERTISE
    old = [m for m in r1.transcript if m.step == "advertise"][0]
    g = {u.client_id: {v.client_id for v in ups} - {u.client_id} for u in ups}
    server = protocol.SecAggServer(2, g, {}, 64, d, 3)
    with pytest.raises(MalformedMessage, match="round"):
        server.receive_advertise(old.client_id, old.payload)
    fresh = protocol.SecAggClient(old.client_id, 2).advertise_keys()
    server.receive_advertise(old.client_id, fresh)
    with pytest.raises(MalformedMessage, match="duplicate"):
        server.receive_advertise(old.client_id, fresh)
    with pytest.raises(MalformedMessage, match="unknown client"):
        server.receive_advertise(999, protocol.SecAggClient(999, 2).advertise_keys())
    with pytest.raises(MalformedMessage, match="claims sender"):
        server.receive_advertise(ups[1].client_id, protocol.SecAggClient(ups[2].client_id, 2).advertise_keys())
    with pytest.raises(MalformedMessage, match="did not share keys"):
        server.receive_masked(old.client_id, msg.encode_masked(2, old.client_id, np.zeros(d + 1, "<u8"), 64))


def test_tampered_masked_input_drops_that_client_only():
    d = 8
    ups = [ClientUpdate(i, torch.full((d,), 0.1), 1, 1.0) for i in range(6)]

    def tamper(cid, payload):
        return payload[:-1] if cid == 4 and payload[5] == msg.Step.MASKED else payload

    from secfed.rounds import tampering_transport

    ss = SecAggPlus()
    ss.transport_factory = tampering_transport(tamper)  # the test-only seam; no hook in the round state
    r = ss.aggregate(ups, make_ctx(d))
    assert r.dropped[4].startswith("malformed") and 4 not in r.client_ids
    assert torch.allclose(r.total, torch.full((d,), 0.5), atol=1e-6)


def test_out_of_range_client_is_reported_and_left_out():
    d = 4
    ups = [ClientUpdate(i, torch.full((d,), 0.1), 1, 1.0) for i in range(5)]
    ups[2].delta[1] = 3.0
    r = SecAggPlus(clip_range=1.0).aggregate(ups, make_ctx(d))
    assert "outside [-clip_range, clip_range]" in r.dropped[2] and r.metrics["secagg_out_of_range"] == 1
    assert torch.allclose(r.total, torch.full((d,), 0.4), atol=1e-6)


# ------------------------------------------------------------------ weak parameters are refused
@pytest.mark.parametrize("kw,key", [({"threshold": 0.4}, "threshold"), ({"security_bits": 20}, "security_bits"),
                                    ({"clip_range": 0.0}, "clip_range"), ({"bits": 1}, "bits"),
                                    ({"corrupt_fraction": 0.6}, "corrupt_fraction"),
                                    ({"failure_probability": 0.5}, "failure_probability"), ({"degree": 1}, "degree")])
def test_weak_or_invalid_parameters_are_refused(kw, key):
    with pytest.raises(ConfigError, match=f"server.secure_sum.{key}"):
        SecAggPlus(**kw)


def test_too_small_explicit_degree_is_refused_at_round_time():
    with pytest.raises(ConfigError, match="degree"):
        SecAggPlus(degree=4).parameters(100)
    k, t = SecAggPlus(degree="complete").parameters(100)
    assert (k, t) == (99, 51)


def test_a_sum_of_one_client_is_refused():
    d = 4
    with pytest.raises(RoundAborted, match="at least 2"):
        SecAggPlus().aggregate(make_updates(1, d), make_ctx(d))
    ups = make_updates(2, d)
    ups[0].delta[0] = 5.0  # out of range: left out, leaving one
    with pytest.raises(RoundAborted, match="at least 2"):
        SecAggPlus().aggregate(ups, make_ctx(d))
