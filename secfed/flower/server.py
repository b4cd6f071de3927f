"""The SuperLink side: secfed's server round as a Flower ``ServerApp`` (Message API).

:class:`FlowerEngine` is the in-process :class:`~secfed.engine.Engine` with two
pieces swapped: ``collect`` sends each sampled client's SuperNode a ``train``
message (global weights as ``SFW`` bytes) and waits for the replies, and
``secure_aggregate`` decodes the reply bytes (:class:`WirePlainSum`) or, for a
multi-step secure sum (SecAgg+ both variants, the homomorphic sum), drives the
secure sum's own protocol session over the nodes (:class:`SessionSum`,
:mod:`secfed.rounds`: the code the in-process run executes). Sampling,
the privacy guard and its fsynced ledger, robust aggregation, server stages, the
server optimizer, observers, evaluation and checkpoints are the engine's own
code, so the same config and seed give the same model on either transport.

Failures: no answer within ``deploy.round_timeout`` s (a node killed, partitioned),
a Flower error or a reply that fails validation (:class:`~secfed.errors.MalformedMessage`)
drops the client for that round; the round goes on if ``server.min_clients`` holds.
A restarted ServerApp with ``resume = true`` continues from the checkpoint and ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secfed.config import ExperimentConfig
from secfed.engine import Engine
from secfed.errors import ConfigError, MalformedMessage
from secfed.flower import codec
from secfed.interfaces import ClientUpdate, RoundContext, SumResult
from secfed.needs import DPRole, Need, is_private, needs_of
from secfed.rounds import DPRoundParams, dpsgd_per_client, drive, round_info, stage_roles
from secfed.secure_sum import PlainSum

POLL_START, POLL_MAX = 0.02, 0.2  # seconds between pulls for replies (FlowerEngine._exchange)


@dataclass
class Received:
    """One client's reply as the server got it: the sender and its raw bytes."""

    client_id: int
    payload: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # SecAgg+: why the node's update cannot be encoded ('' = it can)


class SessionSum:
    """A multi-step secure sum (e.g. SecAgg+, both variants) over Flower: its own protocol session
    (``secure_sum.serve``, :mod:`secfed.rounds`), every step's bytes exchanged with the SuperNodes."""

    def __init__(self, secure_sum: Any, transport: Any) -> None:
        self.secure_sum, self.transport = secure_sum, transport
        self.reveals = secure_sum.reveals  # what the session reveals is what the secure sum declares

    def aggregate(self, received: list[Received], ctx: RoundContext, min_sum: int | None = None) -> SumResult:
        candidates = {r.client_id: r.reason for r in received}
        return drive(self.secure_sum.serve(candidates, ctx, min_sum), self.transport, ctx)


class WirePlainSum(PlainSum):
    """Server side of :class:`secfed.secure_sum.PlainSum` over bytes that arrived from SuperNodes."""

    def aggregate(self, received: list[Received], ctx: RoundContext) -> SumResult:  # type: ignore[override]
        dropped = {r.client_id: "dropped before upload" for r in received if ctx.dropouts.drops(r.client_id, "upload")}
        result = self.decode([(r.client_id, r.payload) for r in received if r.client_id not in dropped], ctx)
        result.dropped.update(dropped)
        return result


class FlowerEngine(Engine):
    """The engine with its clients behind a Flower ``Grid`` (SuperLink or the simulation runtime)."""

    shares_honest_rows = False  # SuperNodes never share a client's update with another (secfed.needs.check_needs)

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None, grid: Any, *, keys: dict[int, bytes] | None = None,
                 **kw: Any) -> None:
        super().__init__(cfg, out_dir, **kw)
        hides = Need.ROWS not in self.secure_sum.reveals  # declared (secfed.needs)
        if hides and not hasattr(self.secure_sum, "serve"):
            raise ConfigError(f"config key 'server.secure_sum': '{cfg.server.secure_sum.name}' has no protocol session "
                              "to run over Flower yet; use deploy.transport = 'inprocess'")
        if getattr(self.secure_sum, "needs_keys", False):  # active SecAgg+'s roster, HE's key holder
            if keys is None and getattr(self.secure_sum, "active", False):
                raise ConfigError("config key 'server.secure_sum.roster' is required for active secagg+ on real "
                                  "SuperNodes: the public keys the operator registered for the nodes (docs/secagg.md); "
                                  "or set active = false")
            if keys is None:
                raise ConfigError(f"config key 'server.secure_sum': '{cfg.server.secure_sum.name}' needs client keys "
                                  "distributed outside the server (HE key holder), wired for Flower "
                                  "simulations only; run it in-process or with deploy.transport = 'flower-ray'")
            self.secure_sum.use_keys(keys)
        if any(DPRole.ADAPTIVE in r for r in stage_roles(cfg, "client")):  # declared role, any alias
            raise ConfigError("config key 'client.pipeline': adaptive clipping over Flower would send every node's "
                              "clipping bit to the server in the clear; use 'clip', or deploy.transport = 'inprocess'")
        self.grid = grid
        self.wire: Any = SessionSum(self.secure_sum, self) if hides else WirePlainSum(cfg.server.max_update_norm)
        self.private_metrics = codec.metrics_stay_on_node(cfg, not hides)
        self.nodes: dict[int, int] = {}  # client id -> Flower node id

    def _log(self, msg: str) -> None:
        print(f"secfed: {msg}", flush=True)  # the ServerApp's stdout is the Flower run log

    def _exchange(self, msgs: list[Any], timeout: float) -> list[Any]:
        """Push ``msgs`` and collect their replies until all are in or ``timeout`` seconds pass.

        ``grid.send_and_receive`` does the same, but flwr 1.41's gRPC/HTTP grid sleeps 3 s between
        pulls, so every exchange took a multiple of 3 s (SecAgg+ makes five per round). Here the
        pull interval starts at ``POLL_START`` seconds and grows by half each time up to ``POLL_MAX``:
        quick replies are seen within tens of milliseconds, a long training round costs a pull
        every 0.2 s (a reply waits at most that long; measured, issue 20: a SuperLink RPC costs ~12 ms CPU)."""
        if not msgs:
            return []
        if not hasattr(self.grid, "pull_messages"):  # a grid with only the blocking call (test doubles)
            return list(self.grid.send_and_receive(msgs, timeout=timeout))
        pending = set(self.grid.push_messages(msgs))
        replies: list[Any] = []
        deadline = time.monotonic() + timeout
        wait = POLL_START
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(POLL_MAX, wait * 1.5)
        return replies

    # ------------------------------------------------------------------ nodes
    def connect(self) -> None:
        """Wait for SuperNodes, then ask each which client (partition) it plays and check its config."""
        n = self.cfg.data.num_clients
        deadline = time.monotonic() + self.cfg.deploy.connect_timeout
        while len(ids := list(self.grid.get_node_ids())) < n and time.monotonic() <= deadline:
            time.sleep(1.0)
        # a node running another config fails the echo of its fingerprint ("reply for another fingerprint")
        records, failed = self._ask("query", {i: {"fingerprint": self.cfg.fingerprint()} for i in ids}, "connect",
                                    ("fingerprint",), {i: i for i in ids}, "connect_timeout")
        for nid, rec in records.items():
            try:
                cid = codec.get(rec, "client", int)
            except MalformedMessage as e:
                failed[nid] = str(e)
                continue
            if not 0 <= cid < n or cid in self.nodes:
                failed[nid] = f"claims client {cid} (out of range or taken)"
            else:
                self.nodes[cid] = nid
        for nid, why in failed.items():
            self._log(f"node {nid}: {why}; ignored")
        missing = n - len(self.nodes)
        self._log(f"{len(self.nodes)} of {n} clients connected" + (f" ({missing} missing: dropped when sampled)" if missing else ""))

    def _message(self, values: dict[str, Any], kind: str, node_id: int, group: str) -> Any:
        from flwr.app import ConfigRecord, Message, RecordDict

        content = RecordDict({codec.RECORD: ConfigRecord({"v": codec.PROTOCOL, **values})})
        return Message(content=content, message_type=kind, dst_node_id=node_id, group_id=group,
                       ttl=max(self.cfg.deploy.round_timeout, self.cfg.deploy.connect_timeout) + 60)

    # ------------------------------------------------------------------ one round
    def run(self) -> dict[str, Any]:
        if not self.nodes:
            self.connect()
        return super().run()

    def round_params(self, ctx: RoundContext) -> DPRoundParams:
        """The DP parameters every node must apply this round (review finding 2), fixed by the server.

        The server runs its copy of the client pipeline on a zero update: the stages make the in-process
        checks here (a noise multiplier other than the guard's fails before any node trains) and record
        the clip norm and noise placement the nodes will apply. The nodes get these in the ``train``
        message and refuse to train with anything else.
        """
        probe = ClientUpdate(-1, torch.zeros(self.spec.numel), 0, 1.0)
        for stage in self.pipeline:
            probe = stage(probe, ctx)
        info = round_info(ctx)
        params = {k: getattr(info, k) for k in ("noise_multiplier", "clip_norm", "share_divisor", "distributed")}
        if is_private(self.trainer):  # DP-SGD
            if dpsgd_per_client(self.cfg):  # each node calibrates its z_i from the (fingerprinted) config and its shard
                params["dpsgd_per_client"] = True
            else:  # the z the guard charges (or the trainer's own)
                guard_z = self.privacy.z if Need.PRIVATE_TRAINER in needs_of(self.privacy) else None
                params["dpsgd_noise_multiplier"] = (guard_z if guard_z is not None
                                                    else self.trainer.resolved_noise_multiplier(self.task))
            params["max_grad_norm"] = getattr(self.trainer, "max_grad_norm", None)
        return DPRoundParams.of(params)

    def collect(self, ctx: RoundContext, bar: Any = None) -> tuple[list[Received], dict[int, str]]:
        t = ctx.round
        base = {"round": t, "fingerprint": self.cfg.fingerprint(), "cohort": codec.encode_ids(ctx.cohort),
                "weights": codec.encode_weights(t, self.global_w), "state": codec.encode_state(self.state),
                "dp": codec.encode_dp(self.round_params(ctx))}
        dropped = {c: "dropped during training" for c in ctx.cohort if ctx.dropouts.drops(c, "train")}
        values = {c: base for c in ctx.cohort if c not in dropped}  # one content: Flower pushes it once (issue 20)
        records, failed = self._ask("train", values, str(t), ("round", "client"))
        dropped.update(failed)
        got: dict[int, Received] = {}
        refusals: dict[int, str] = {}
        for cid, rec in records.items():
            try:
                if "refused" in rec:  # the in-process engine would have stopped with this ConfigError
                    refusals[cid] = codec.get(rec, "refused", str, max_len=1000)
                    continue
                metrics = codec.decode_metrics(codec.get(rec, "metrics", str))
                got[cid] = Received(cid, codec.get(rec, "payload", bytes),
                                    {} if self.private_metrics else metrics,  # finding 7: never kept
                                    codec.get(rec, "reason", str, max_len=512) if "reason" in rec else "")
            except MalformedMessage as e:
                dropped[cid] = f"malformed: {e}"
        if refusals:
            cid = min(refusals)
            raise ConfigError(f"{refusals[cid]} (refused by the SuperNode of client {cid})")
        for cid, why in sorted(dropped.items()):
            self._log(f"round {t}: client {cid} dropped: {why}")
        if dropped:  # lands in rounds.jsonl with the round's record
            ctx.metrics["flower_dropped"] = "; ".join(f"{c}: {w}" for c, w in sorted(dropped.items()))[:2000]
        return [got[c] for c in ctx.cohort if c in got], dropped

    def exchange(self, step: str, outgoing: dict[int, bytes], ctx: RoundContext) -> tuple[dict[int, bytes], dict[int, str]]:
        """One step of a multi-step secure sum: ``outgoing[client]`` to each client's SuperNode; (replies, failures)."""
        t = ctx.round
        values = {c: {"round": t, "client": c, "step": step, "payload": p} for c, p in outgoing.items()}
        records, failed = self._ask("query", values, f"{t}.{step}", ("round", "client", "step"))
        got: dict[int, bytes] = {}
        for cid, rec in records.items():
            try:
                got[cid] = codec.get(rec, "payload", bytes)
            except MalformedMessage as e:
                failed[cid] = f"malformed: {e}"
        return got, failed

    def _ask(self, kind: str, values: dict[int, dict[str, Any]], group: str, echo: tuple[str, ...],
             nodes: dict[int, int] | None = None, timeout: str = "round_timeout") -> tuple[dict[int, Any], dict[int, str]]:
        """Send ``values[client]`` to each client's SuperNode (``nodes``: client -> node id, default the
        connected ones; a client without one fails) as a ``kind`` message: (each reply's validated record,
        why the others failed). A reply must echo the sent ``echo`` values (round, client, step); an error
        reply, a malformed one or none within ``deploy.<timeout>`` seconds (the key named in the reason)
        is a failure."""
        nodes, seconds = nodes or self.nodes, getattr(self.cfg.deploy, timeout)
        failed = {c: "no SuperNode connected for this client" for c in values if c not in nodes}
        node_of = {nodes[c]: c for c in values if c in nodes}
        got: dict[int, Any] = {}
        msgs = [self._message(v, kind, nodes[c], group) for c, v in values.items() if c in nodes]
        for r in self._exchange(msgs, seconds):
            cid = node_of.get(r.metadata.src_node_id)
            if cid is None or cid in got or cid in failed:
                continue
            if r.has_error():
                failed[cid] = f"client error: {r.error.reason[:200]}"
                continue
            try:
                rec = codec.record_of(r.content)
                sent = {**values[cid], "client": cid}
                if any(codec.get(rec, k, type(sent[k])) != sent[k] for k in echo):
                    raise MalformedMessage(f"reply for another {', '.join(echo)}")
                got[cid] = rec
            except MalformedMessage as e:
                failed[cid] = f"malformed: {e}"
        failed.update({c: f"no reply within deploy.{timeout} = {seconds:g} s"
                       for c in values if c not in got and c not in failed})
        return got, failed

    def secure_aggregate(self, received: list[Received], ctx: RoundContext) -> SumResult:
        from secfed.secure_sum import group_sums

        if self.cfg.server.group_size > 0:
            return group_sums(self.wire, received, ctx, self.cfg.server.group_size, self.cfg.server.min_clients)
        return self.wire.aggregate(received, ctx)


def make_server_app(cfg: ExperimentConfig | None = None, out_dir: str | Path | None = None, *,
                    resume: bool = False, result: dict[str, Any] | None = None,
                    keys: dict[int, bytes] | None = None) -> Any:
    """The Flower ``ServerApp``. Given ``cfg`` for simulation; under ``flwr run`` it reads the run config
    keys ``config`` (path of the experiment TOML or JSON on the SuperLink's machine), ``out`` and
    ``resume``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        run_cfg, out, res = cfg, out_dir, resume
        if run_cfg is None:
            from secfed.config import load_config
            from secfed.flower.worker import shorten_object_pull_backoff

            shorten_object_pull_backoff()  # replies: retry missing objects after 10 ms, not 1 s, 2 s, ... (helper F)
            rc = dict(context.run_config)
            run_cfg = load_config(str(rc["config"]))
            out = str(rc.get("out") or "") or None
            res = bool(rc.get("resume", False))
        engine = FlowerEngine(run_cfg, out, grid, resume=res, progress=False, keys=keys)
        summary = engine.run()
        if result is not None:
            result.update(summary)
            result["out"] = str(engine.out)

    return app


# ``flwr run`` loads this (see secfed.flower.deploy.write_app).
app = make_server_app()
