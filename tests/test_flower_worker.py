"""secfed's SuperNode (secfed.flower.worker): the flwr internals it leans on, its idle-poll clock, the FAB check.

The end-to-end behaviour (one worker thread in each SuperNode process handles every message
of a run over TLS) is ``tests/test_flower_deploy.py::test_three_supernodes_over_tls_equal_the_inprocess_run``.
"""

from __future__ import annotations

import io
import threading
import zipfile
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from secfed.flower import worker as W  # noqa: E402
from secfed.flower.deploy import APP_PYPROJECT  # noqa: E402


def test_installed_flwr_is_the_one_the_worker_follows():
    # Fails loudly on a flwr upgrade: the worker replays run_clientapp's Runtime API calls and the
    # launcher replaces the literals of start_client_internal's sleeps. Re-read both, then extend TESTED_FLWR.
    from flwr.supercore.version import package_version
    from flwr.supernode.runtime import run_clientapp as rc

    assert package_version.rsplit(".", 1)[0] in W.TESTED_FLWR, package_version
    assert W.poll_patch_problem() is None
    for name in ("pull_task_input", "push_message", "push_task_output"):
        assert callable(getattr(rc, name)), name


def test_poll_patch_problem_names_a_moved_symbol(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.delattr(sci, "_pull_and_store_message")
    assert "_pull_and_store_message" in W.poll_patch_problem()


def test_poll_clock_backs_off_when_idle_and_resets_on_a_message(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(W, "_time", SimpleNamespace(sleep=slept.append, monotonic=lambda: 7.0))
    clock = W.PollClock(idle_min=0.1, idle_max=0.3, reply_wait=0.02)
    for _ in range(5):
        clock.sleep(3)  # flwr's idle sleep
    clock.sleep(0.5)  # flwr's reply wait: a message came in
    clock.sleep(3)  # so the next idle poll is fast again
    clock.sleep(1.25)  # anything else is unchanged
    assert slept == pytest.approx([0.1, 0.15, 0.225, 0.3, 0.3, 0.02, 0.1, 1.25])
    assert clock.monotonic() == 7.0  # other attributes are the time module's


def test_patch_supernode_polling_installs_the_clock(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    clock = W.PollClock(idle_min=0.05, idle_max=1.0)
    assert W.patch_supernode_polling(clock)
    assert sci.time is clock and W.poll_patch_problem() is None  # installed, and may be installed again


def _fab(pyproject: str) -> SimpleNamespace:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return SimpleNamespace(content=buf.getvalue())


def test_worker_runs_secfeds_clientapp_only():
    W.TaskWorker.check_fab(_fab(APP_PYPROJECT))  # the bundle `secfed deploy app` writes
    other = APP_PYPROJECT.replace('clientapp = "secfed.flower.client:app"', 'clientapp = "evil.app:app"')
    with pytest.raises(W.ForeignAppError, match="evil.app:app"):
        W.TaskWorker.check_fab(_fab(other))
    with pytest.raises(W.ForeignAppError, match="cannot be read"):
        W.TaskWorker.check_fab(SimpleNamespace(content=b"not a zip"))


def test_supernode_launcher_refuses_subprocess_isolation():
    with pytest.raises(SystemExit, match="isolation process"):
        W.supernode_main(["--superlink", "127.0.0.1:1", "--isolation", "subprocess"])


def test_supernode_settings_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("SECFED_SUPERNODE_POLL_MIN", "abc")
    with pytest.raises(SystemExit, match="SECFED_SUPERNODE_POLL_MIN must be a number of seconds"):
        W.supernode_main(["--superlink", "127.0.0.1:1", "--insecure"])
    monkeypatch.delenv("SECFED_SUPERNODE_POLL_MIN")
    monkeypatch.setenv("SECFED_WORKER_RUNTIME", "grpc")
    with pytest.raises(SystemExit, match="SECFED_WORKER_RUNTIME must be 'direct' or 'http'"):
        W.supernode_main(["--superlink", "127.0.0.1:1", "--insecure"])
    monkeypatch.delenv("SECFED_WORKER_RUNTIME")
    with pytest.raises(SystemExit, match="cannot read .*nope.secret"):
        W.supernode_main(["--superlink", "127.0.0.1:1", "--superexec-auth-secret-file", str(tmp_path / "nope.secret")])


def test_object_pull_backoff_is_shortened_with_the_same_patience(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils as iu

    for f in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(f, "__kwdefaults__", dict(f.__kwdefaults__))  # restored after the test
        assert f.__kwdefaults__["initial_backoff"] == 1  # flwr 1.41's default: 1 s before the first retry
    assert W.shorten_object_pull_backoff()
    for f in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        kw = f.__kwdefaults__
        assert (kw["initial_backoff"], kw["backoff_cap"]) == (W.PULL_INITIAL_BACKOFF, W.PULL_BACKOFF_CAP)
        assert kw["max_tries_per_object"] * kw["backoff_cap"] >= 500 * 10  # no less patient than flwr's

    monkeypatch.setattr(iu.random, "uniform", lambda a, b: 0.0)
    waits: list[float] = []

    class RecordingEvent(threading.Event):
        """flwr backs off with ``early_stop.wait(s)``: record the waits it asks for (no wall-clock assertion)."""

        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)

    monkeypatch.setattr(iu, "threading", SimpleNamespace(Lock=threading.Lock, Event=RecordingEvent))
    tries = iter(range(3))

    def pull(obj_id: str) -> bytes:  # unavailable twice, then there
        if next(tries) < 2:
            raise iu.ObjectUnavailableError(obj_id)
        return b"x"

    assert iu.pull_objects(["a"], pull) == {"a": b"x"}
    # two backoffs of 0.01 s and 0.02 s (no jitter); flwr's default would wait 1 s + 2 s
    assert waits == pytest.approx([W.PULL_INITIAL_BACKOFF, 2 * W.PULL_INITIAL_BACKOFF])


def test_one_worker_runs_several_tasks_with_one_clientapp_and_reports_errors(monkeypatch):
    """run_task as flwr-clientapp would: the task input in, the reply and the Context out; the same ClientApp
    object serves every task of the process, and an exception becomes an Error reply (the worker lives on)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SubStatus
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp as rc

    for k, v in (("_run_id", 1), ("_node_id", 2), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, k, v, raising=False)
    fab = _fab(APP_PYPROJECT)
    pushed: list[tuple[str, object]] = []

    class Client:
        def SendTaskHeartbeat(self, req):  # noqa: N802 - flwr's method name
            pushed.append(("heartbeat", None))

        def close(self) -> None:
            pushed.append(("closed", None))

    def pull_task_input(client):
        msg = Message(RecordDict({"secfed": ConfigRecord({"v": 1})}), dst_node_id=2, message_type="query")
        ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        return msg, ctx, None, fab

    monkeypatch.setattr(rc, "pull_task_input", pull_task_input)
    monkeypatch.setattr(rc, "push_message", lambda client, reply, context: pushed.append(("reply", reply)))
    monkeypatch.setattr(rc, "push_task_output",
                        lambda client, context, sub_status, details: pushed.append(("output", (sub_status, context))))
    seen: list[int] = []

    def app(message, context):
        seen.append(id(app))
        if len(seen) == 3:
            raise ValueError("boom")
        context.state["n"] = ConfigRecord({"n": len(seen)})  # the Context goes back to the SuperNode
        return Message(RecordDict({"secfed": ConfigRecord({"ok": len(seen)})}), reply_to=message)

    worker = W.TaskWorker("127.0.0.1:1", app=app)
    monkeypatch.setattr(worker, "_client", lambda token=None: Client())
    assert [worker.run_task(t) for t in ("a", "b", "c")] == [SubStatus.COMPLETED] * 2 + [SubStatus.FAILED]
    assert worker.handled == 3 and len(set(seen)) == 1  # one ClientApp object, three tasks
    replies = [r for k, r in pushed if k == "reply"]
    outputs = [o for k, o in pushed if k == "output"]
    assert [r.content["secfed"]["ok"] for r in replies[:2]] == [1, 2]
    assert replies[2].has_error() and "boom" in replies[2].error.reason
    assert outputs[1][1].state["n"]["n"] == 2
    assert [k for k, _ in pushed].count("closed") == 3 and ("heartbeat", None) not in pushed  # short tasks: no beat

    other = _fab(APP_PYPROJECT.replace('clientapp = "secfed.flower.client:app"', 'clientapp = "evil.app:app"'))
    monkeypatch.setattr(rc, "pull_task_input", lambda client: (*pull_task_input(client)[:3], other))
    assert worker.run_task("d") == SubStatus.FAILED and len(seen) == 3  # the foreign app was never called
    assert "evil.app:app" in [r for k, r in pushed if k == "reply"][-1].error.reason


def test_supernode_stops_when_its_worker_dies(monkeypatch, capsys):
    # The worker is a thread of the SuperNode process: should it ever end, the SuperNode must not stay
    # connected and silent (every round would wait for deploy.round_timeout); it stops itself, loudly.
    import os
    import signal

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    worker = W.TaskWorker("127.0.0.1:1")

    def serve() -> None:
        raise ImportError("no torch here")

    monkeypatch.setattr(worker, "serve", serve)
    worker.serve_or_stop()
    assert killed == [(os.getpid(), signal.SIGTERM)]
    assert "the ClientApp worker stopped (ImportError: no torch here); stopping this SuperNode" in capsys.readouterr().err


def test_one_round_sends_every_node_the_same_train_content(tmp_path, monkeypatch):
    """Issue 20: Flower stores and pushes a message's content as content-addressed objects, so a round whose
    train messages share one content pushes the weights once, not once per SuperNode (n + 2 objects, not 3n)."""
    from conftest import tiny_config
    from _flower_fake import NodeGrid, run_flower

    sent: list = []
    deliver = NodeGrid.send_and_receive

    def record(self, msgs, timeout=None):
        sent.extend(m for m in msgs if m.metadata.message_type == "train")
        return deliver(self, msgs, timeout)

    monkeypatch.setattr(NodeGrid, "send_and_receive", record)
    eng, _ = run_flower(tiny_config(run={"rounds": 1, "threads": 1}, data={"num_clients": 3},
                                    server={"cohort_size": 3}), tmp_path / "flower")
    assert len(sent) == 3 and len({m.metadata.dst_node_id for m in sent}) == 3
    assert len({m.content.object_id for m in sent}) == 1  # one RecordDict (and ConfigRecord) for all three
    rounds = (eng.out / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 1 and "flower_dropped" not in rounds[0]  # every node trained and was accepted


def test_json_fields_with_huge_integers_are_malformed_not_a_traceback():
    # json.loads reads a 400-digit number as an int that math.isfinite cannot take (OverflowError before)
    from secfed.errors import MalformedMessage
    from secfed.flower import codec

    huge = "1" + "0" * 400
    for decode, key in ((codec.decode_metrics, "loss"), (codec.decode_dp, "noise_multiplier"),
                        (codec.decode_state, "round")):
        with pytest.raises(MalformedMessage, match="flat JSON object"):
            decode(f'{{"{key}": {huge}}}')
    assert codec.decode_state('{"round": 3}') == {"round": 3}


# ----------------------------------------------------------------------------- the Runtime API in-process

def test_direct_runtime_matches_the_installed_flwr():
    # Fails on a flwr upgrade that moves what InProcessRuntime calls (the routes, the handlers' arguments,
    # the hook on _start_supernode_http_api): re-read them, then extend TESTED_FLWR.
    assert W.direct_runtime_problem() is None


def test_direct_runtime_problem_names_a_changed_handler(monkeypatch):
    from flwr.supernode.servicer.runtime import runtime_handlers as h

    monkeypatch.setattr(h, "pull_object", lambda request, state: None)
    assert "runtime_handlers.pull_object no longer takes (request, state, task)" == W.direct_runtime_problem()
    monkeypatch.undo()
    monkeypatch.setattr(W._flower_supernode_module(), "_start_supernode_http_api", lambda cfg, factory: None)
    assert "_start_supernode_http_api(config, state_factory) is gone" in W.direct_runtime_problem()
    monkeypatch.undo()
    from flwr.supernode.runtime import run_clientapp as rc

    def push_task_output(client, context, sub_status, details):  # a flwr that makes a call InProcessRuntime lacks
        client.RecordTaskUsage(None)

    monkeypatch.setattr(rc, "push_task_output", push_task_output)
    assert "lacks: ['RecordTaskUsage']" in W.direct_runtime_problem()


def _node_state_with_one_task(monkeypatch, run_id: int = 7):
    """A SuperNode's NodeState as flwr's Fleet loop leaves it after pulling one message: run, FAB, context,
    the message with its objects, and one pending flwr-clientapp task."""
    import hashlib

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.constant import TaskType
    from flwr.supercore.fab import Fab
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.start_client_internal import _insert_message

    for k, v in (("_run_id", run_id), ("_node_id", 1), ("_task_id", 3)):  # restored after the test (run_task sets them)
        monkeypatch.setattr(TaskIdentity, k, v, raising=False)
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state, store = factory.state(), factory.objectstore_factory.store()
    state.set_node_id(2)
    content = _fab(APP_PYPROJECT).content
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    run = Run.create_empty(run_id)
    run.fab_hash = fab.hash_str
    state.store_run(run)
    state.store_fab(fab)
    state.set_run_series_context(run.series_id, Context(run_id=run_id, node_id=2, node_config={"partition-id": 0},
                                                        state=RecordDict(), run_config={}))
    msg = Message(RecordDict({"secfed": ConfigRecord({"v": 1})}), dst_node_id=2, message_type="query")
    _insert_message(msg, state, store)
    state.create_task(task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash=fab.hash_str)
    return factory, state, msg


def test_worker_runs_a_task_through_the_supernode_state_without_http(monkeypatch):
    """The worker inside the SuperNode calls the Runtime API handlers directly: it claims the task, reads the
    message, and its reply and the updated Context land in the SuperNode's state for the Fleet loop to push."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SubStatus

    factory, state, sent = _node_state_with_one_task(monkeypatch)
    hook = W.NodeStateHook()
    hook.factory = factory
    hook.ready.set()

    def app(message, context):
        assert message.content["secfed"]["v"] == 1
        context.state["seen"] = ConfigRecord({"n": 1})
        return Message(RecordDict({"secfed": ConfigRecord({"ok": 1})}), reply_to=message)

    worker = W.TaskWorker("127.0.0.1:1", app=app, node_state=hook)
    worker.state = hook.wait()
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = worker._client().AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    assert res.token and worker.run_task(res.token) == SubStatus.COMPLETED
    replies = state.get_messages_legacy(is_reply=True)
    assert len(replies) == 1 and replies[0].metadata.reply_to_message_id == sent.metadata.message_id
    assert state.get_run_series_context(0).state["seen"]["n"] == 1  # the Context went back to the node
    assert not worker._client().AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])).token


def test_in_process_runtime_checks_the_task_token_like_the_http_route(monkeypatch):
    from flwr.proto.runtime_pb2 import PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.error import FlowerError

    _, state, _ = _node_state_with_one_task(monkeypatch)
    for token in (None, "", "not-a-token"):
        with pytest.raises(FlowerError, match="authentication failed"):
            W.InProcessRuntime(state, token).PullTaskInput(PullTaskInputRequest())


def test_node_state_hook_takes_the_factory_flower_supernode_starts_its_api_with(monkeypatch):
    fs = W._flower_supernode_module()
    started: list = []

    def _start_supernode_http_api(config, state_factory):  # flwr's signature
        started.append((config, state_factory))
        return "server", "thread"

    monkeypatch.setattr(fs, "_start_supernode_http_api", _start_supernode_http_api)
    hook = W.NodeStateHook()
    assert hook.install()
    factory = SimpleNamespace(state=lambda: "the node state")
    assert fs._start_supernode_http_api("cfg", factory) == ("server", "thread")  # flwr's call goes through
    assert started == [("cfg", factory)] and hook.wait() == "the node state"
