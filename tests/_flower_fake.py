"""A fake Flower grid for tests: Flower ``Message`` objects delivered to secfed's node code in this process.

The server side is the real ServerApp code (:class:`~secfed.flower.server.FlowerEngine`), the node side
the real ``node_train`` / ``node_step`` of :mod:`secfed.flower.client`; only the SuperLink is replaced
(:class:`NodeGrid`). Shared by the parity matrix (issue 21) and the Flower review findings (2 and 7).
"""

from __future__ import annotations

from pathlib import Path


class Reply:
    """What the grid hands the server: a Flower-like reply message (``error``: a node-side failure)."""

    def __init__(self, node: int, values: dict | None, error: str | None = None) -> None:
        from flwr.app import ConfigRecord, RecordDict

        from secfed.flower import codec

        self.metadata = type("M", (), {"src_node_id": node})()
        self.error = type("E", (), {"reason": error or ""})()
        self.content = RecordDict({codec.RECORD: ConfigRecord({"v": codec.PROTOCOL, **(values or {})})})
        self._err = error

    def has_error(self) -> bool:
        return self._err is not None


class NodeGrid:
    """Flower messages delivered to secfed's node code in this process (node id = client id + 1).

    One node runtime serves every client (as a Ray actor may); before each message it forgets
    whatever a previous message left in memory (trainer state), so only ``context.state`` carries
    anything from one message to the next, as with a fresh ClientApp process per message (flwr 1.41).
    ``train_replies`` keeps every train reply, so a test can read what a node sent in the clear."""

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
            out.append(Reply(cid + 1, vals))
        return out


def run_flower(cfg, out: Path):
    """The run over Flower messages (:class:`NodeGrid`) with the engine's own loop; (engine, grid).

    The node runtime is built first, so a config a node refuses fails there, as on a SuperNode; secure-sum
    keys (active SecAgg+ identities, the CKKS client context) are made outside the server (simulation)."""
    from flwr.supercore.task_identity import TaskIdentity

    from secfed.flower.server import FlowerEngine

    grid = NodeGrid(cfg)
    ss = grid.rt.secure_sum
    keys = ss.simulation_keys() if getattr(ss, "needs_keys", False) else None
    if keys:
        ss.use_keys(keys)
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
