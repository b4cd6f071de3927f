"""secfed's SuperNode: one long-lived ClientApp for every message (issue 20; docs/deploy.md).

:func:`supernode_main` (``secfed deploy supernode ARGS``) runs ``flower-supernode
ARGS --isolation process`` in this process plus a :class:`TaskWorker` thread that
claims the SuperNode's ``flwr-clientapp`` tasks over its Runtime API (``AcquireTask``,
signed with a fresh in-memory SuperExec secret) and runs each with secfed's ClientApp
only, so the model, partition and trainer stay in memory across messages. It also
shortens flwr's hard-coded idle sleeps (:class:`PollClock`) and object-pull back-off,
leaning on the flwr internals of :data:`TESTED_FLWR` (``poll_patch_problem``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys
import threading
import time as _time
from pathlib import Path
from typing import Any

#: The only ClientApp a worker runs: the bundle's ``clientapp`` component must name it.
SECFED_CLIENTAPP = "secfed.flower.client:app"
#: flwr versions whose internals (Runtime API calls, ``start_client_internal``'s sleeps) this module follows.
TESTED_FLWR = ("1.41",)

log = logging.getLogger("secfed.flower.worker")


def _say(msg: str, *args: Any) -> None:
    """One line on stderr (the SuperNode's log), flushed: the tests and operators read it."""
    print("[secfed-worker pid=%d] " % os.getpid() + (msg % args if args else msg), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the worker

class ForeignAppError(PermissionError):
    """The run's Flower App names a ClientApp other than secfed's: the worker refuses to run it."""


class TaskWorker:
    """Claim a SuperNode's ``flwr-clientapp`` tasks and run each with one long-lived ClientApp.

    ``runtime_api_address`` is the SuperNode's Runtime API (``--host``/``--port``);
    ``root_certificates`` verifies it when it serves HTTPS; ``auth_secret`` signs
    ``AcquireTask`` (Flower's SuperExec auth). Polling backs off from ``POLL_MIN`` to
    ``POLL_MAX`` seconds (x1.5 per empty poll) and returns to ``POLL_MIN`` after a task.
    """

    HEARTBEAT_EVERY = 20.0  # seconds between task heartbeats (flwr expires a task 60 s after its last one)
    POLL_MIN, POLL_MAX = 0.01, 0.2

    def __init__(self, runtime_api_address: str, *, root_certificates: bytes | None = None,
                 auth_secret: bytes | None = None, app: Any = None, node_state: "NodeStateHook | None" = None) -> None:
        self.address, self.root_certificates, self.auth_secret = runtime_api_address, root_certificates, auth_secret
        self.app = app  # secfed's ClientApp (imported by serve): its caches live as long as this process
        self.handled = 0  # tasks run by this worker (reported in every log line)
        self.node_state = node_state  # this SuperNode's NodeState, when the worker calls its Runtime API directly
        self.state: Any = None  # set by serve() from node_state: then every call is an InProcessRuntime call

    def _client(self, token: str | None = None) -> Any:
        """A Runtime API client: SuperExec's (``AcquireTask``, signed) without ``token``, a task's with it.
        In the SuperNode's own process (``self.state`` known) the same calls go to its handlers directly."""
        if self.state is not None:
            return InProcessRuntime(self.state, token)
        from flwr.supercore import interceptors as i
        from flwr.supercore.runtime import RuntimeHttpClient

        if token is not None:
            chain = [i.RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), i.RuntimeTokenHttpInterceptor(token)]
        else:
            chain = [i.RuntimeVersionHttpInterceptor(component_name="SuperExec")]
            if self.auth_secret:
                chain.append(i.SuperExecAuthHttpInterceptor(master_secret=self.auth_secret,
                                                            protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        # No retry invoker: flwr's simple one SIGINTs the process on a 401. Errors surface here instead.
        return RuntimeHttpClient.from_server_address(server_address=self.address, interceptors=chain,
                                                     insecure=self.root_certificates is None,
                                                     root_certificates=self.root_certificates, retry_invoker=None)

    @staticmethod
    def check_fab(fab: Any) -> None:
        """Refuse a Flower App whose ClientApp is not secfed's: the worker never loads code from a bundle."""
        from flwr.common.config import get_fab_config

        try:
            ref = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"]
        except Exception as e:  # noqa: BLE001 - any malformed bundle is a refusal
            raise ForeignAppError(f"the Flower App bundle cannot be read ({type(e).__name__})") from None
        if ref != SECFED_CLIENTAPP:
            raise ForeignAppError(f"the Flower App names ClientApp {str(ref)[:200]!r}; this secfed worker runs "
                                  f"{SECFED_CLIENTAPP!r} only")

    def run_task(self, token: str) -> str:
        """Run one task as ``flwr-clientapp`` would (``run_clientapp``), here; return its sub-status."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client, done, t0 = self._client(token), threading.Event(), _time.perf_counter()

        def heartbeat() -> None:  # unlike flwr's, never SIGINTs the process (a task that is gone ends this task only)
            while not done.wait(self.HEARTBEAT_EVERY):
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception:  # noqa: BLE001 - transport trouble: try again next time
                    pass

        beat = threading.Thread(target=heartbeat, name="secfed-task-heartbeat", daemon=True)
        beat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, _, fab = pull_task_input(client)
            self.check_fab(fab)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - as run_clientapp: the error goes back to the server as a reply
            code, details = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, ForeignAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, str(ex)
            log.error("ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as ex:  # noqa: BLE001 - the SuperNode's task expiry handles a lost reply
                _say("could not push the reply: %s", ex)
                status = SubStatus.FAILED
            finally:
                done.set()
                beat.join()
                client.close()
        self.handled += 1
        _say("task done: %s message, %s in %.3f s, %d tasks in this process",
             message.metadata.message_type if message is not None else "?", status, _time.perf_counter() - t0,
             self.handled)
        return str(status)

    def serve(self) -> None:
        """Import the ClientApp, then poll the SuperNode (``AcquireTask``) and run its tasks, forever."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        t0 = _time.perf_counter()
        import secfed.flower.runtime  # noqa: F401 - torch & co., before the first message waits for them
        from secfed.flower.client import app

        self.app = self.app or app
        if self.node_state is not None:
            self.state = self.node_state.wait()
        _say("ready in %.1f s: serving %s's flwr-clientapp tasks with %s (%s)", _time.perf_counter() - t0,
             self.address, SECFED_CLIENTAPP,
             "Runtime API calls in-process" if self.state is not None else "Runtime API over HTTP")
        client, request = self._client(), AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        wait, down = self.POLL_MIN, False
        while True:
            try:
                res = client.AcquireTask(request)
                token, down = (str(res.token) if res.HasField("task") and res.token else None), False
            except Exception as e:  # noqa: BLE001 - SuperNode not up yet, or restarting (logged once)
                if not down:
                    _say("Runtime API at %s refused or not answering (%s: %s); retrying", self.address,
                         type(e).__name__, str(e)[:200])
                down, token = True, None
            if token is None:
                _time.sleep(wait)
                wait = min(wait * 1.5, self.POLL_MAX)
                continue
            self.run_task(token)
            wait = self.POLL_MIN

    def serve_or_stop(self) -> None:
        """:meth:`serve`; should it ever end, stop this SuperNode, loudly (a connected node that never
        answers would stall every round until ``deploy.round_timeout``)."""
        try:
            self.serve()
        except BaseException as e:  # noqa: BLE001 - whatever ended the worker, the node must not stay up silent
            _say("the ClientApp worker stopped (%s: %s); stopping this SuperNode", type(e).__name__, e)
        os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------------------- the Runtime API without HTTP

#: Runtime API handlers (``flwr.supernode.servicer.runtime.runtime_handlers``) an InProcessRuntime calls with
#: (request, state, task); AcquireTask takes (request, state), SendTaskHeartbeat is flwr.supercore's.
TASK_HANDLERS = {"PullTaskInput": "pull_task_input", "PullMessages": "pull_messages", "PullObject": "pull_object",
                 "ConfirmMessageReceived": "confirm_message_received", "PushMessages": "push_messages",
                 "PushObject": "push_object", "PushTaskOutput": "push_task_output"}


class InProcessRuntime:
    """The SuperNode's Runtime API as plain calls, for the worker thread inside the SuperNode's own process.

    Each method is the Runtime API route of the same name (``flwr.supercore.routers.runtime.router``)
    without the HTTP: the same task-token check as the route (``authenticate_task``: an unknown, expired
    or missing token is refused with Flower's ``RUNTIME_AUTHENTICATION_FAILED``), then the SuperNode's own
    handler on its ``NodeState``. Measured (issue 20, 3 nodes, one plain round): the worker made about 70
    loopback HTTP requests to its own SuperNode (task, message and objects in, reply out, ``AcquireTask``
    polls), each costing that process milliseconds of CPU in uvicorn and FastAPI's middleware; a direct
    call costs microseconds. No network hop, so no SuperExec secret is needed for ``AcquireTask`` here
    (the HTTP route keeps requiring it from any other process).
    """

    def __init__(self, state: Any, token: str | None = None) -> None:
        self.state, self.token = state, token

    def _task(self) -> Any:
        from flwr.supercore.error import ApiErrorCode, FlowerError

        task = self.state.get_task_by_token(self.token) if self.token else None
        if task is None:
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED, "Runtime task-token authentication failed.")
        return task

    def AcquireTask(self, request: Any) -> Any:  # noqa: N802 - the Runtime API's method names
        from flwr.supernode.servicer.runtime import runtime_handlers as h

        return h.acquire_task(request, self.state)

    def SendTaskHeartbeat(self, request: Any) -> Any:  # noqa: N802
        from flwr.supercore.servicer.runtime import runtime_handlers as core

        return core.send_task_heartbeat(request, self.state, self._task())

    def __getattr__(self, method: str) -> Any:
        """``PullTaskInput``, ``PushMessages``, ... (``TASK_HANDLERS``): the handler on (request, state, task)."""
        if method not in TASK_HANDLERS:
            raise AttributeError(method)

        def call(request: Any) -> Any:
            from flwr.supernode.servicer.runtime import runtime_handlers as h

            return getattr(h, TASK_HANDLERS[method])(request, self.state, self._task())

        return call

    def close(self) -> None:
        """Nothing to close (no connection)."""


def _flower_supernode_module() -> Any:
    """The module ``flwr.supernode.cli.flower_supernode`` (its package exports a function of the same name)."""
    import importlib

    return importlib.import_module("flwr.supernode.cli.flower_supernode")


def direct_runtime_problem() -> str | None:
    """Why the worker cannot call its SuperNode's Runtime API in-process on the installed flwr (None when it can).

    It checks what :class:`InProcessRuntime` and :class:`NodeStateHook` lean on: ``flower_supernode`` hands its
    ``NodeStateFactory`` to ``_start_supernode_http_api(config, state_factory)``; each route the worker uses only
    authenticates the task and calls ``handlers.<name>(request, state, task)``; the handlers take those arguments;
    ``run_clientapp``'s helpers call no other Runtime API method."""
    import importlib
    import re

    try:
        fs = _flower_supernode_module()
        router = importlib.import_module("flwr.supercore.routers.runtime.router")  # the package shadows it too
        from flwr.supercore.servicer.runtime import runtime_handlers as core
        from flwr.supernode.nodestate import NodeState
        from flwr.supernode.runtime import run_clientapp as rc
        from flwr.supernode.servicer.runtime import runtime_handlers as h
    except ImportError as e:
        return f"a flwr module the in-process Runtime API needs cannot be imported ({e})"
    start = getattr(fs, "_start_supernode_http_api", None)
    if start is None or list(inspect.signature(start).parameters)[:2] != ["config", "state_factory"]:
        return "flower_supernode._start_supernode_http_api(config, state_factory) is gone"
    try:
        main_src = inspect.getsource(fs.flower_supernode)
        routes = {n: inspect.getsource(getattr(router, n)) for n in [*TASK_HANDLERS.values(), "acquire_task"]}
        calls = set().union(*(re.findall(r"client\.([A-Z][A-Za-z]+)", inspect.getsource(getattr(rc, n)))
                              for n in ("pull_task_input", "push_message", "push_task_output")))
    except (OSError, TypeError, AttributeError) as e:
        return f"flwr's Runtime API source is not readable ({e})"
    if "_start_supernode_http_api(config, state_factory)" not in main_src:
        return "flower_supernode no longer starts its Runtime API with _start_supernode_http_api(config, state_factory)"
    for name, src in routes.items():
        args = "(request, state)" if name == "acquire_task" else "(request, state, task)"
        if f"handlers.{name}{args}" not in src:
            return f"the Runtime API route {name} no longer just calls handlers.{name}{args}"
    for name in TASK_HANDLERS.values():
        if list(inspect.signature(getattr(h, name)).parameters) != ["request", "state", "task"]:
            return f"runtime_handlers.{name} no longer takes (request, state, task)"
    if list(inspect.signature(core.send_task_heartbeat).parameters) != ["request", "state", "task"]:
        return "send_task_heartbeat no longer takes (request, state, task)"
    if not hasattr(NodeState, "get_task_by_token"):
        return "NodeState.get_task_by_token is gone"
    if lacking := calls - {*TASK_HANDLERS, "SendTaskHeartbeat", "AcquireTask"}:
        return f"run_clientapp calls Runtime API methods InProcessRuntime lacks: {sorted(lacking)}"
    if not calls:
        return "run_clientapp's helpers no longer call a Runtime API client as `client.<Method>`"
    return None


class NodeStateHook:
    """Receives the SuperNode's ``NodeStateFactory`` when ``flower_supernode`` starts its Runtime API, so that
    the worker thread can call that API in-process (:class:`InProcessRuntime`)."""

    def __init__(self) -> None:
        self.factory: Any = None
        self.ready = threading.Event()

    def install(self) -> bool:
        """Wrap ``flower_supernode._start_supernode_http_api``; False (flwr untouched) when
        :func:`direct_runtime_problem` objects: the worker then uses the Runtime API over HTTP."""
        problem = direct_runtime_problem()
        if problem is not None:
            _say("WARNING: the worker calls its SuperNode's Runtime API over HTTP: %s", problem)
            return False
        fs = _flower_supernode_module()
        start = fs._start_supernode_http_api

        def start_and_share(config: Any, state_factory: Any) -> Any:
            self.factory = state_factory
            self.ready.set()
            return start(config, state_factory)

        fs._start_supernode_http_api = start_and_share
        return True

    def wait(self) -> Any:
        """The SuperNode's ``NodeState`` (the one its Runtime API and Fleet loop use), once it exists."""
        self.ready.wait()
        return self.factory.state()


# ----------------------------------------------------------------------------- the SuperNode's idle sleep

class PollClock:
    """Stands in for the ``time`` module inside flwr's ``start_client_internal``.

    ``sleep(3)`` (nothing pulled from the SuperLink) sleeps the current idle
    interval, which grows x1.5 per empty pull from ``idle_min`` to ``idle_max``.
    ``sleep(0.5)`` (a message came in: waiting for the ClientApp's reply or its
    objects) sleeps ``reply_wait`` and resets the idle interval to ``idle_min``.
    Any other call or attribute is the real ``time`` module's.
    """

    IDLE, REPLY = 3, 0.5  # the literals in flwr 1.41's start_client_internal.py

    def __init__(self, idle_min: float = 0.05, idle_max: float = 1.0, reply_wait: float = 0.02) -> None:
        self.idle_min, self.idle_max, self.reply_wait = idle_min, max(idle_min, idle_max), reply_wait
        self._idle = idle_min

    def sleep(self, seconds: float) -> None:
        if seconds == self.IDLE:
            _time.sleep(self._idle)
            self._idle = min(self._idle * 1.5, self.idle_max)
        elif seconds == self.REPLY:
            self._idle = self.idle_min
            _time.sleep(self.reply_wait)
        else:
            _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def poll_patch_problem() -> str | None:
    """Why :func:`patch_supernode_polling` cannot be applied to the installed flwr (None when it can)."""
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError as e:
        return f"flwr.supernode.start_client_internal cannot be imported ({e})"
    if not hasattr(sci, "_pull_and_store_message") or not hasattr(sci, "_push_messages"):
        return "flwr.supernode.start_client_internal has no _pull_and_store_message/_push_messages"
    if getattr(sci, "time", None) is not _time and not isinstance(getattr(sci, "time", None), PollClock):
        return "flwr.supernode.start_client_internal no longer imports the time module as `time`"
    try:
        loop, push = inspect.getsource(sci.start_client_internal), inspect.getsource(sci._push_messages)
    except (OSError, TypeError) as e:
        return f"flwr's source is not readable ({e})"
    if loop.count("time.sleep(3)") != 1 or "_pull_and_store_message(" not in loop:
        return "start_client_internal's idle sleep is no longer one `time.sleep(3)` after `_pull_and_store_message`"
    if "time.sleep(0.5)" not in push:
        return "_push_messages no longer waits with `time.sleep(0.5)`"
    return None


def patch_supernode_polling(clock: PollClock) -> bool:
    """Install ``clock`` in flwr's SuperNode loop; False (flwr untouched) when :func:`poll_patch_problem` objects."""
    problem = poll_patch_problem()
    if problem is not None:
        _say("WARNING: SuperNode polling left at flwr's defaults (3 s idle sleep): %s", problem)
        return False
    import flwr.supernode.start_client_internal as sci

    sci.time = clock  # type: ignore[assignment]
    return True


#: Back-off of flwr's object pulls in secfed's SuperNode and ServerApp (flwr 1.41: 1 s, doubling, capped at 10 s).
PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP = 0.01, 0.25


def shorten_object_pull_backoff(initial: float = PULL_INITIAL_BACKOFF, cap: float = PULL_BACKOFF_CAP) -> bool:
    """Make flwr's object pulls retry after ``initial`` s (doubling up to ``cap``) instead of 1 s, 2 s, 4 s...

    A worker claims a task as soon as its header is stored, while the SuperNode still pulls the
    message's objects (flwr waited 1 s, then 2 s: 1.2-3.4 s per message). Only the keyword defaults
    change, with flwr's overall patience; False, and nothing changed, when flwr 1.41's are not there.
    """
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return False
    fns = [getattr(iu, n, None) for n in ("pull_objects", "pull_and_inflate_object_from_tree")]
    if not all(f is not None and {"initial_backoff", "backoff_cap"} <= set(f.__kwdefaults__ or {}) for f in fns):
        _say("WARNING: flwr's object pull back-off left at its defaults (1 s): pull_objects moved")
        return False
    for f in fns:
        tries = f.__kwdefaults__.get("max_tries_per_object") or 500  # flwr's 500 tries at up to 10 s
        f.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap,
                                max_tries_per_object=max(int(tries), int(tries * 10.0 / cap)))
    return True


# ----------------------------------------------------------------------------- the command line

def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        if 0.001 <= float(raw) <= 60:
            return float(raw)
    except ValueError:
        pass
    raise SystemExit(f"error: {name} must be a number of seconds in [0.001, 60], got {raw!r}")


def supernode_main(argv: list[str]) -> None:
    """``secfed deploy supernode ARGS``: ``flower-supernode ARGS --isolation process`` plus a worker thread."""
    try:
        from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST
    except ImportError:
        raise SystemExit("error: flwr is not installed: pip install 'secfed[flower]'") from None
    p = argparse.ArgumentParser(add_help=False)  # the flower-supernode arguments the worker needs
    for name, default in (("host", UVICORN_DEFAULT_HOST), ("port", str(SUPERNODE_UVICORN_DEFAULT_PORT)),
                          ("ssl-ca-certfile", None), ("superexec-auth-secret-file", None), ("isolation", "process")):
        p.add_argument(f"--{name}", default=default)
    known = p.parse_known_args(argv)[0]
    if known.isolation != "process":
        raise SystemExit("error: secfed's SuperNode runs its ClientApp in a long-lived worker (--isolation process); "
                         "use flower-supernode itself for --isolation subprocess")
    clock = PollClock(idle_min=_env_float("SECFED_SUPERNODE_POLL_MIN", 0.05),
                      idle_max=_env_float("SECFED_SUPERNODE_POLL_MAX", 1.0))
    direct = os.environ.get("SECFED_WORKER_RUNTIME", "direct")  # "http": the worker's Runtime API calls over HTTP
    if direct not in ("direct", "http"):
        raise SystemExit(f"error: SECFED_WORKER_RUNTIME must be 'direct' or 'http', got {direct!r}")
    try:
        ca = Path(known.ssl_ca_certfile).read_bytes() if known.ssl_ca_certfile else None
        secret = Path(known.superexec_auth_secret_file).expanduser().read_bytes() if known.superexec_auth_secret_file else None
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename}: {e.strerror}") from None
    args = [*argv, "--isolation", "process"]
    if secret is None:  # a fresh secret, handed to Flower through a pipe: never on disk, known to this process only
        secret = os.urandom(32).hex().encode()
        r, w = os.pipe()
        os.write(w, secret)
        os.close(w)
        args += ["--superexec-auth-secret-file", f"/dev/fd/{r}"]
    shorten_object_pull_backoff()
    patch_supernode_polling(clock)
    host = known.host if known.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    hook = NodeStateHook()
    worker = TaskWorker(f"[{host}]:{known.port}" if ":" in host else f"{host}:{known.port}", root_certificates=ca,
                        auth_secret=secret, node_state=hook if direct == "direct" and hook.install() else None)
    threading.Thread(target=worker.serve_or_stop, name="secfed-clientapp-worker", daemon=True).start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    if sys.argv[1:2] != ["supernode"]:
        raise SystemExit("usage: python -m secfed.flower.worker supernode [flower-supernode arguments]")
    supernode_main(sys.argv[2:])
