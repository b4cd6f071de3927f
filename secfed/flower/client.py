"""The SuperNode side: secfed's client round as a Flower ``ClientApp`` (Message API).

A SuperNode plays exactly one secfed client, its ``partition-id``. For a
``train`` message it does what the in-process engine does for that client
(:meth:`secfed.engine.Engine.local_update`, the client pipeline, a
non-omniscient adversary's ``poison_updates``), encodes the result with the
secure sum's client side (``PlainSum.encode`` -> :mod:`secfed.wire` ``SFU``) and
replies with those bytes.

Node config (``flower-supernode --node-config``):

* ``partition-id``: the client id this node plays (required).
* ``config-file``: this organisation's own copy of the experiment TOML. The node
  runs only the plug-ins named there and refuses a server whose config
  fingerprint differs, so a server cannot make a SuperNode import arbitrary code.
* ``data-file``: the node's own shard (``secfed deploy split`` writes them); the
  node never loads anyone else's data. Without it the node derives its shard
  from the config (simulation only).
"""

from __future__ import annotations

import json
from typing import Any

from secfed.config import ExperimentConfig, load_config, parse_config
from secfed.errors import ConfigError
from secfed.flower import codec


def load_experiment(path: str) -> ExperimentConfig:
    """An experiment config from TOML, or from the JSON that ``secfed deploy`` writes (overrides applied)."""
    if str(path).endswith(".json"):
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        return parse_config(data, str(path))
    return load_config(path)


def _node_setup(node_config: dict[str, Any], cfg: ExperimentConfig | None) -> tuple[ExperimentConfig, int, str | None]:
    if "partition-id" not in node_config:
        raise ConfigError("node config 'partition-id' is required (flower-supernode --node-config 'partition-id=0 ...')")
    cid = int(node_config["partition-id"])
    if cfg is None:
        if "config-file" not in node_config:
            raise ConfigError("node config 'config-file' is required: the SuperNode runs only its own copy of the config")
        cfg = load_experiment(str(node_config["config-file"]))
    if not 0 <= cid < cfg.data.num_clients:
        raise ConfigError(f"node config 'partition-id' = {cid} is outside 0..{cfg.data.num_clients - 1} (data.num_clients)")
    data_file = node_config.get("data-file")
    return cfg, cid, str(data_file) if data_file else None


def make_client_app(cfg: ExperimentConfig | None = None) -> Any:
    """The Flower ``ClientApp``. ``cfg`` is given for simulation; a SuperNode reads its node config."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def reply(msg: Message, values: dict[str, Any]) -> Message:
        return Message(RecordDict({codec.RECORD: ConfigRecord({"v": codec.PROTOCOL, **values})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Any) -> Message:
        run_cfg, cid, _ = _node_setup(dict(context.node_config), cfg)
        rec = codec.record_of(msg.content)
        if "step" in rec:  # one step of secfed's SecAgg+ (secfed.flower.secagg)
            from secfed.flower.secagg import node_step

            out = node_step(context.state, rec, cid, run_cfg.run.seed)
            return reply(msg, {"round": int(rec["round"]), "client": cid, "step": str(rec["step"]), "payload": out})
        return reply(msg, {"client": cid, "fingerprint": run_cfg.fingerprint()})

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        run_cfg, cid, data_file = _node_setup(dict(context.node_config), cfg)
        rec = codec.record_of(msg.content)
        from secfed.flower.runtime import runtime_for  # torch & co. only for real work

        rt = runtime_for(run_cfg, cid, data_file)
        return reply(msg, node_train(rt, context.state, rec, cid))

    return app


def node_train(rt: Any, state: Any, rec: Any, cid: int) -> dict[str, Any]:
    """The values of a node's ``train`` reply (shared by the ClientApp and the tests).

    A ConfigError on the node (its noise or clip differs from the server guard's,
    review finding 2) is answered as ``refused`` with the one line, and the server
    stops the run with it, as the in-process engine would. Under a secure sum or DP
    the reply carries no per-client metric and, for SecAgg+, at most the one fixed
    out-of-range string (review finding 7).
    """
    from secfed.errors import ConfigError

    try:
        u, ctx = rt.update(rec, cid)
    except ConfigError as e:
        return {"round": int(rec["round"]), "client": cid, "refused": str(e)[:1000]}
    extra: dict[str, Any] = {}
    if getattr(rt.secure_sum, "reveals_individual", True):
        payload = rt.secure_sum.encode(u, ctx)
    else:  # SecAgg+: keep the update on the node; the masking steps follow as query messages
        from secfed.flower.secagg import stash_update

        payload = b""
        extra["reason"] = stash_update(state, ctx.round, cid, u.delta, u.weight, rt.secure_sum)
    return {"round": int(rec["round"]), "client": cid, "payload": payload, "metrics": json.dumps(rt.metrics(u)), **extra}


# ``flower-supernode`` loads this (see secfed.flower.deploy.write_app).
app = make_client_app()
