"""The plain secure-sum stage: clients send their (weighted) updates in the clear.

Every secure sum (plain, SecAgg+, CKKS) has the same shape: ``aggregate(updates,
ctx) -> SumResult``. Its client side encodes each update to bytes; its server side
sees only those bytes (recorded in the transcript for observers).
"""

from __future__ import annotations

import torch

from secfed.errors import ConfigError, MalformedMessage, RoundAborted
from secfed.interfaces import ClientUpdate, GroupId, RoundContext, SumResult, WireMessage
from secfed.rounds import InProcessTransport
from secfed.needs import Need
from secfed.wire import decode_update, encode_update


class PlainSum:
    """No protection: the server decodes every client's update (individual updates visible)."""

    name = "plain"
    reveals = Need.SUM | Need.ROWS  # secfed.needs: the server decodes every row

    transport_factory = InProcessTransport  # tests only: secfed.rounds.tampering_transport

    def __init__(self, max_update_norm: float = float("inf")) -> None:
        self.max_update_norm = max_update_norm

    # client side ---------------------------------------------------------
    def encode(self, update: ClientUpdate, ctx: RoundContext) -> bytes:
        return encode_update(ctx.round, update.client_id, update.num_examples, update.weight, update.delta)

    # server side ---------------------------------------------------------
    def aggregate(self, updates: list[ClientUpdate], ctx: RoundContext) -> SumResult:
        transport = self.transport_factory({})  # relays each upload (a fault-injection test may tamper with it)
        sent: list[tuple[int, bytes]] = []
        dropped: dict[int, str] = {}
        for u in updates:
            if ctx.dropouts.drops(u.client_id, "upload"):
                dropped[u.client_id] = "dropped before upload"
                continue
            sent.append((u.client_id, transport.relay(u.client_id, self.encode(u, ctx))))
        result = self.decode(sent, ctx)
        result.dropped.update(dropped)
        return result

    def decode(self, received: list[tuple[int, bytes]], ctx: RoundContext) -> SumResult:
        """The server's side: decode each (sender, payload); a malformed one drops its sender."""
        d = ctx.spec.numel
        rows, weights, ids, transcript = [], [], [], []
        dropped: dict[int, str] = {}
        bytes_up: dict[int, int] = {}
        for cid, payload in received:
            transcript.append(WireMessage(cid, "update", payload))
            bytes_up[cid] = len(payload)
            try:
                dec = decode_update(payload, expected_dim=d, round_=ctx.round, sender=cid, max_norm=self.max_update_norm)
            except MalformedMessage as e:
                dropped[cid] = f"malformed: {e}"
                continue
            rows.append(dec.delta)
            weights.append(dec.weight)
            ids.append(dec.client_id)
        if rows:
            X = torch.stack(rows)
            w = torch.tensor(weights, dtype=torch.float32)
            total = (w[:, None] * X).sum(0)
        else:
            X, w, total = torch.zeros(0, d), torch.zeros(0), torch.zeros(d)
        return SumResult(client_ids=ids, total=total, total_weight=float(w.sum()), updates=X, weights=w, update_ids=ids,
                         dropped=dropped, bytes_up=bytes_up, transcript=transcript)


def partition_groups(n: int, group_size: int, generator: torch.Generator) -> list[list[int]]:
    """Positions 0..n-1 in groups of ``group_size`` after a seeded shuffle; the remainder joins the last group.

    Every group has between ``group_size`` and ``2 * group_size - 1`` members (5 clients in
    groups of 2 -> 2 + 3), so no group sum is over fewer clients than the size the operator
    chose (review finding 5). Fewer than ``group_size`` clients: no group at all.
    """
    if group_size < 2:
        raise ConfigError(f"config key 'server.group_size': {group_size} would release sums of one client; use 0 or >= 2")
    perm = torch.randperm(n, generator=generator).tolist()
    groups = [perm[s : s + group_size] for s in range(0, n - n % group_size, group_size)]
    if groups and n % group_size:
        groups[-1].extend(perm[n - n % group_size :])
    return groups


def group_sums(secure_sum, updates: list[ClientUpdate], ctx: RoundContext, group_size: int, min_clients: int) -> SumResult:
    """Robust aggregation over secure group sums: a secure sum per group of ``group_size``.

    Groups are a seeded shuffle of the cohort (:func:`partition_groups`: a remainder joins
    another group). The rows of the result are group *means* (group sum / group weight),
    one per group that completed; the server learns each group's aggregate and nothing
    finer. A secure sum is asked to release a group only if every member of the group is
    still in it (``min_sum`` = the group's size): a group that loses a member to a
    dropout is left out of the round, never released as a smaller sum.
    """
    hides = Need.ROWS not in secure_sum.reveals  # declared (secfed.needs; checked when the run was built)
    groups = [[updates[i] for i in g] for g in partition_groups(len(updates), group_size, ctx.generator("groups"))]
    rows, weights, gid, ids = [], [], [], []
    merged = SumResult(client_ids=[], total=torch.zeros(ctx.spec.numel), total_weight=0.0)
    if not groups:
        for u in updates:
            merged.dropped[u.client_id] = f"fewer than server.group_size = {group_size} clients in the round"
    for g, members in enumerate(groups):
        try:
            r = secure_sum.aggregate(members, ctx, min_sum=len(members)) if hides else secure_sum.aggregate(members, ctx)
        except RoundAborted as e:
            for u in members:
                merged.dropped[u.client_id] = f"group {g} aborted: {e}"
            continue
        merged.dropped.update(r.dropped)
        merged.bytes_up.update(r.bytes_up)
        merged.bytes_down.update(r.bytes_down)
        merged.transcript.extend(r.transcript)
        if not r.client_ids or r.total_weight <= 0:
            continue
        if len(r.client_ids) < len(members):  # a plain sum that lost members: the group is left out
            for u in members:
                merged.dropped.setdefault(u.client_id, f"group {g} left out: below its size")
            continue
        rows.append(r.total / r.total_weight)
        weights.append(r.total_weight)
        gid.append(GroupId(g, tuple(r.client_ids)))  # a group's row is never read as a client's
        ids.extend(r.client_ids)
        merged.total += r.total
        merged.total_weight += r.total_weight
    merged.client_ids = ids
    if len(ids) < min_clients:
        raise RoundAborted(f"only {len(ids)} clients in completed groups, server.min_clients is {min_clients}")
    merged.updates = torch.stack(rows) if rows else torch.zeros(0, ctx.spec.numel)
    merged.weights = torch.tensor(weights, dtype=torch.float32)
    merged.update_ids = gid
    return merged
