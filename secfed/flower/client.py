"""The SuperNode side: secfed's client round as a Flower ``ClientApp`` (Message API).

A SuperNode plays exactly one secfed client, its ``partition-id``. For a
``train`` message it runs the engine's own client round for that client
(:class:`secfed.rounds.ClientRound`: load w_t, train, pipeline; then a
non-omniscient adversary's ``poison_updates``) and either encodes the result
(``PlainSum.encode`` -> :mod:`secfed.wire` ``SFU``) or, for a multi-step secure
sum, keeps it in its client session (in the node's own ``context.state``) and
answers the protocol steps that follow as ``query`` messages (:func:`node_step`).

Node config (``flower-supernode --node-config``):

* ``partition-id``: the client id this node plays (required).
* ``config-file``: this organisation's own copy of the experiment TOML. The node
  runs only the plug-ins named there and refuses a server whose config
  fingerprint differs, so a server cannot make a SuperNode import arbitrary code.
* ``data-file``: the node's own shard (``secfed deploy split`` writes them); the
  node never loads anyone else's data. Without it the node derives its shard
  from the config (simulation only).
* ``identity-key``: active SecAgg+ (the default): this node's private signing key,
  the same file as its ``--auth-supernode-private-key``; its public key must be this
  partition's entry in ``server.secure_sum.roster`` (docs/secagg.md).
"""

from __future__ import annotations

import json
from typing import Any

from secfed.config import ExperimentConfig, load_config
from secfed.errors import ConfigError
from secfed.flower import codec


def _node_setup(node_config: dict[str, Any], cfg: ExperimentConfig | None) -> tuple[ExperimentConfig, int, str | None]:
    if "partition-id" not in node_config:
        raise ConfigError("node config 'partition-id' is required (flower-supernode --node-config 'partition-id=0 ...')")
    cid = int(node_config["partition-id"])
    if cfg is None:
        if "config-file" not in node_config:
            raise ConfigError("node config 'config-file' is required: the SuperNode runs only its own copy of the config")
        cfg = load_config(str(node_config["config-file"]))  # TOML, or the JSON `secfed deploy` writes
    if not 0 <= cid < cfg.data.num_clients:
        raise ConfigError(f"node config 'partition-id' = {cid} is outside 0..{cfg.data.num_clients - 1} (data.num_clients)")
    data_file = node_config.get("data-file")
    return cfg, cid, str(data_file) if data_file else None


def make_client_app(cfg: ExperimentConfig | None = None, keys: dict[int, bytes] | None = None) -> Any:
    """The Flower ``ClientApp``. ``cfg`` is given for simulation; a SuperNode reads its node config.

    ``keys`` (simulation only): what the secure sum's clients hold from outside the server (the active
    SecAgg+ variant's Ed25519 identities, the ServerApp's roster; HE's secret-key context).
    """
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def reply(msg: Message, values: dict[str, Any]) -> Message:
        return Message(RecordDict({codec.RECORD: ConfigRecord({"v": codec.PROTOCOL, **values})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Any) -> Message:
        run_cfg, cid, _ = _node_setup(dict(context.node_config), cfg)
        rec = codec.record_of(msg.content)
        if "step" in rec:  # one step of a multi-step secure sum (its client session, secfed.rounds)
            from secfed.flower.runtime import secure_sum_for

            out = node_step(node_identity(secure_sum_for(run_cfg), context.node_config, cid, keys), context.state, rec, cid)
            return reply(msg, {"round": int(rec["round"]), "client": cid, "step": str(rec["step"]), "payload": out})
        return reply(msg, {"client": cid, "fingerprint": run_cfg.fingerprint()})

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        run_cfg, cid, data_file = _node_setup(dict(context.node_config), cfg)
        rec = codec.record_of(msg.content)
        from secfed.flower.runtime import runtime_for  # torch & co. only for real work

        rt = runtime_for(run_cfg, cid, data_file)
        try:
            node_identity(rt.secure_sum, context.node_config, cid, keys)
        except ConfigError as e:  # no identity key / roster: the server stops with this one line
            return reply(msg, {"round": int(rec["round"]), "client": cid, "refused": str(e)[:1000]})
        return reply(msg, node_train(rt, context.state, rec, cid))

    return app


SESSION = "secfed-session"  # the node's own storage of its client session between messages (Flower context.state)


def node_identity(ss: Any, node_config: Any, cid: int, keys: dict[int, bytes] | None) -> Any:
    """The secure sum ``ss`` with the keys this node holds from outside the server: in a simulation the
    generated ``keys``; on a real SuperNode its own identity key (node config ``identity-key``)."""
    if keys is not None:
        ss.use_keys(keys)
    elif hasattr(ss, "use_node_identity"):
        ss.use_node_identity(dict(node_config).get("identity-key"), cid)
    return ss


def node_train(rt: Any, state: Any, rec: Any, cid: int) -> dict[str, Any]:
    """The values of a node's ``train`` reply (shared by the ClientApp and the tests).

    A ConfigError on the node (noise or clip other than the guard's, review finding 2) is answered
    as ``refused``: the server stops the run with that line, as in-process. Under a secure sum or DP
    the reply has no per-client metric and at most one fixed ``reason`` string (review finding 7).
    """
    rt.load_node_state(state)  # a stateful trainer's per-client state (momentum) lives on the node
    try:
        u, ctx = rt.update(rec, cid)
    except ConfigError as e:
        return {"round": int(rec["round"]), "client": cid, "refused": str(e)[:1000]}
    rt.save_node_state(state)
    extra: dict[str, Any] = {}
    from secfed.needs import Need, reveals_of

    if Need.ROWS in reveals_of(rt.secure_sum):
        payload = rt.secure_sum.encode(u, ctx)
    else:  # keep the update on the node in its client session; the protocol steps follow as query messages
        session = rt.secure_sum.client_session(cid, ctx.round, ctx.seed, u.delta, u.weight)
        if u.ring is not None:  # ddgauss: ring elements this node encoded (noise included)
            session.use_ring(u.ring.values)
        save_session(state, session)
        payload = b""
        extra["reason"] = session.reason
    return {"round": int(rec["round"]), "client": cid, "payload": payload, "metrics": json.dumps(rt.metrics(u)), **extra}


def save_session(state: Any, session: Any) -> None:
    from flwr.app import ConfigRecord

    state[SESSION] = ConfigRecord({"json": json.dumps(session.to_state())})


def node_step(secure_sum: Any, state: Any, rec: Any, client_id: int) -> bytes:
    """One protocol step on the node: restore this client's session from the node's own state, answer the
    server's bytes, keep the session (or forget keys, shares and update once the round is over)."""
    from secfed.errors import MalformedMessage

    step = codec.get(rec, "step", str, max_len=16)
    t = codec.get(rec, "round", int)
    payload = codec.get(rec, "payload", bytes)
    if SESSION not in state:
        raise MalformedMessage("secure sum: no trained update on this node for this round")
    kept = json.loads(state[SESSION]["json"])
    if kept["round"] != t or kept["client"] != client_id:
        raise MalformedMessage(f"secure sum: step for round {t}, this node trained round {kept['round']}")
    session = secure_sum.restore_session(kept)
    out = session.handle(step, payload)
    if session.finished:
        del state[SESSION]
    else:
        save_session(state, session)
    return out


# ``flower-supernode`` loads this (see secfed.flower.deploy.write_app).
app = make_client_app()
