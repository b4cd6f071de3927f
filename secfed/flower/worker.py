"""A SuperNode whose ClientApp stays alive across messages (issue 20): no process start-up per message.

Flower 1.41 runs a ClientApp as one ``flwr-clientapp`` process *per message*
(``flower-superexec`` launches it; ``run_clientapp`` pulls one task, runs the
app, pushes the reply and exits), so every message pays a Python start, the
torch/flwr/secfed imports and the rebuild of the model and partition: about
15 s per message on a loaded 2-core machine, five messages per SecAgg+ round.
This module replaces that launcher, with Flower's own ``--isolation process``
mode, which exists for exactly this: "a separate independent process gets
created outside of SuperNode" and claims the SuperNode's tasks.

* :class:`TaskWorker` (``python -m secfed.flower.worker clientapp``) is that
  process: it polls the SuperNode's Runtime API for ``flwr-clientapp`` tasks
  (``AcquireTask``, as ``flower-superexec`` does) and runs each task *in this
  process* with the same Runtime API calls as ``flwr-clientapp``
  (``PullTaskInput`` + messages in, the reply + ``PushTaskOutput`` with the
  updated ``Context`` out), minus its FAB installation and ``flwr_exit``. The
  ClientApp object, and with it secfed's per-process caches (model, partition,
  trainer), lives as long as the worker. It runs *secfed's* ClientApp only
  (``secfed.flower.client:app``): a task whose Flower App names another
  ClientApp is answered with an error, so a server cannot make the worker load
  code from the bundle it ships (``flwr-clientapp`` installs and imports it).
  Nothing is unpickled: Flower's task input is protobuf, secfed's payloads are
  validated by :mod:`secfed.flower.codec`.
* :func:`supernode_main` (``python -m secfed.flower.worker supernode ARGS``) is
  ``flower-supernode ARGS --isolation process`` plus one worker as its child
  (``--parent-pid``: the worker stops with the SuperNode), with the SuperNode's
  hard-coded idle sleep shortened (:class:`PollClock`). The worker's
  ``AcquireTask`` calls are signed (Flower's SuperExec auth) with a fresh random
  secret only the two processes know, so no other local process can claim the
  node's tasks. Every other argument, TLS to the SuperLink and node
  authentication included, is Flower's own.

Polling. The SuperNode's idle sleep: ``start_client_internal`` sleeps ``time.sleep(3)``
whenever a pull from the SuperLink is empty, and ``time.sleep(0.5)`` while it
waits for the ClientApp's reply; flwr 1.41 has no setting for either. The
launcher replaces that module's ``time`` by a :class:`PollClock` that turns the
3 s idle sleep into a back-off from ``SECFED_SUPERNODE_POLL_MIN`` (default
0.05 s) to ``SECFED_SUPERNODE_POLL_MAX`` (default 1 s, x1.5 per empty pull, back
to the minimum after a message) and the 0.5 s reply wait into 0.02 s; and flwr's
object pulls, which retry after 1 s, 2 s, ... when a message's objects are not
there yet (a worker claims a task as soon as its header is stored), retry after
10 ms, doubling up to 0.25 s (:func:`shorten_object_pull_backoff`). This leans
on flwr internals: :data:`TESTED_FLWR` names the versions it was written
against, :func:`poll_patch_problem` checks the patched code is still what it
expects (else the SuperNode runs unpatched with a warning: slower, not wrong),
and ``tests/test_flower_worker.py`` fails loudly when a flwr upgrade moves it.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
    """Claim a SuperNode's ``flwr-clientapp`` tasks and run each in this process with one long-lived ClientApp.

    ``runtime_api_address`` is the SuperNode's Runtime API (``--host``/``--port`` of
    ``flower-supernode``). ``root_certificates`` verifies it when it serves HTTPS
    (``flower-supernode --ssl-certfile``); ``auth_secret`` signs ``AcquireTask``
    when the SuperNode was started with ``--superexec-auth-secret-file``.
    Polling backs off from ``poll_min`` to ``poll_max`` seconds (x1.5 per empty
    poll) and returns to ``poll_min`` after a task.
    """

    HEARTBEAT_EVERY = 20.0  # seconds between task heartbeats (flwr expires a task 60 s after its last one)

    def __init__(self, runtime_api_address: str, *, root_certificates: bytes | None = None,
                 auth_secret: bytes | None = None, poll_min: float = 0.01, poll_max: float = 0.2,
                 app: Any = None) -> None:
        self.address, self.root_certificates, self.auth_secret = runtime_api_address, root_certificates, auth_secret
        self.poll_min, self.poll_max = poll_min, max(poll_min, poll_max)
        self._app = app
        self.handled = 0  # tasks run by this process (reported in every log line)

    def _client(self, token: str | None = None) -> Any:
        """A Runtime API client: SuperExec's (``AcquireTask``, signed) without ``token``, a task's with it."""
        from flwr.supercore import interceptors as i
        from flwr.supercore.runtime import RuntimeHttpClient

        if token is not None:
            chain = [i.RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), i.RuntimeTokenHttpInterceptor(token)]
        else:
            chain = [i.RuntimeVersionHttpInterceptor(component_name="SuperExec")]
            if self.auth_secret:
                chain.append(i.SuperExecAuthHttpInterceptor(master_secret=self.auth_secret,
                                                            protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        # No retry invoker: flwr's simple one SIGINTs the process on a 401 (fine for a
        # one-task flwr-clientapp, fatal for a long-lived worker). Errors surface here instead.
        return RuntimeHttpClient.from_server_address(server_address=self.address, interceptors=chain,
                                                     insecure=self.root_certificates is None,
                                                     root_certificates=self.root_certificates, retry_invoker=None)

    @property
    def app(self) -> Any:
        """secfed's ClientApp, imported once (its caches live as long as this process)."""
        if self._app is None:
            from secfed.flower.client import app

            self._app = app
        return self._app

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
        """Run one task as ``flwr-clientapp`` would (``run_clientapp``), in this process; return its sub-status."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client, done, t0 = self._client(token), threading.Event(), _time.perf_counter()

        def heartbeat() -> None:
            # A task expires 60 s after activation unless heartbeats extend it. The first beat comes after
            # HEARTBEAT_EVERY s (a short task costs no extra request); unlike flwr's heartbeat fn this never
            # SIGINTs the process (a task that is gone ends this task only).
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
        """Poll the SuperNode (``AcquireTask``) and run its tasks, for as long as this process lives."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        client, request = self._client(), AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        wait, down = self.poll_min, False
        try:
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
                    wait = min(wait * 1.5, self.poll_max)
                    continue
                self.run_task(token)
                wait = self.poll_min
        finally:
            client.close()


# ----------------------------------------------------------------------------- the SuperNode's idle sleep

class PollClock:
    """Stands in for the ``time`` module inside flwr's ``start_client_internal`` (see the module docstring).

    ``sleep(3)`` (nothing pulled from the SuperLink) sleeps the current idle
    interval, which grows x1.5 per empty pull from ``idle_min`` to ``idle_max``;
    :meth:`activity` (a message arrived) resets it. ``sleep(0.5)`` (waiting for
    the ClientApp's reply or its objects) sleeps ``reply_wait``. Any other call
    or attribute is the real ``time`` module's.
    """

    IDLE, REPLY = 3, 0.5  # the literals in flwr 1.41's start_client_internal.py

    def __init__(self, idle_min: float = 0.05, idle_max: float = 1.0, reply_wait: float = 0.02) -> None:
        self.idle_min, self.idle_max, self.reply_wait = idle_min, max(idle_min, idle_max), reply_wait
        self._idle = idle_min

    def activity(self) -> None:
        self._idle = self.idle_min

    def sleep(self, seconds: float) -> None:
        if seconds == self.IDLE:
            _time.sleep(self._idle)
            self._idle = min(self._idle * 1.5, self.idle_max)
        elif seconds == self.REPLY:
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

    pull = sci._pull_and_store_message
    if not getattr(pull, "_secfed_wrapped", False):
        def pull_and_note(*args: Any, **kwargs: Any) -> Any:
            run_id = pull(*args, **kwargs)
            if run_id is not None:
                clock.activity()
            return run_id

        pull_and_note._secfed_wrapped = True  # type: ignore[attr-defined]
        sci._pull_and_store_message = pull_and_note
    sci.time = clock  # type: ignore[assignment]
    return True


# ----------------------------------------------------------------------------- object pulls

#: Back-off of flwr's object pulls in secfed's SuperNode and worker (flwr 1.41: 1 s, doubling, capped at 10 s).
PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP = 0.01, 0.25


def shorten_object_pull_backoff(initial: float = PULL_INITIAL_BACKOFF, cap: float = PULL_BACKOFF_CAP) -> bool:
    """Make flwr's object pulls retry after ``initial`` s (doubling up to ``cap``) instead of 1 s, 2 s, 4 s...

    A SuperNode creates the task as soon as a message's header arrives and then
    pulls the message's objects from the SuperLink, so a worker that claims the
    task at once finds them missing and flwr's ``pull_objects`` waits its initial
    back-off of 1 s (then 2 s): measured 1.2-3.4 s per message here. The same
    holds for the SuperNode pulling from the SuperLink. Only the defaults of
    ``pull_objects`` / ``pull_and_inflate_object_from_tree`` change (keyword-only
    arguments); False, and nothing changed, when they are not where flwr 1.41 has them.
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
        # the same patience as flwr's (its 500 tries at up to 10 s): the overall max_time (2 h) still bounds a pull
        tries = f.__kwdefaults__.get("max_tries_per_object") or 500
        f.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap,
                                max_tries_per_object=max(int(tries), int(tries * 10.0 / cap)))
    return True


# ----------------------------------------------------------------------------- command lines

def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0.001 <= v <= 60:
        raise SystemExit(f"error: {name} must be a number of seconds in [0.001, 60], got {raw!r}")
    return v


def _read(path: str | None, what: str) -> bytes | None:
    """The bytes of an operator-given file (None without a path); one line on error."""
    if not path:
        return None
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read {what} {path}: {e.strerror}") from None
    if not data:
        raise SystemExit(f"error: {what} {path} is empty")
    return data


def worker_main(argv: list[str] | None = None) -> None:
    """``python -m secfed.flower.worker clientapp``: one long-lived ClientApp worker for a SuperNode."""
    p = argparse.ArgumentParser(prog="python -m secfed.flower.worker clientapp",
                                description="Run secfed's ClientApp for a SuperNode started with --isolation process.")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's --host:--port")
    p.add_argument("--root-certificates", help="CA of the Runtime API's certificate (a SuperNode serving HTTPS)")
    p.add_argument("--superexec-auth-secret-file", help="the SuperNode's SuperExec auth secret")
    p.add_argument("--parent-pid", type=int, help="stop when this process exits")
    a = p.parse_args(argv)
    _need_flwr()
    worker = TaskWorker(a.runtime_api_address, root_certificates=_read(a.root_certificates, "--root-certificates"),
                        auth_secret=_read(a.superexec_auth_secret_file, "the SuperExec auth secret"),
                        poll_min=_env_float("SECFED_WORKER_POLL_MIN", 0.01),
                        poll_max=_env_float("SECFED_WORKER_POLL_MAX", 0.2))
    if a.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(a.parent_pid)
    shorten_object_pull_backoff()
    t0 = _time.perf_counter()
    worker.app  # noqa: B018 - import secfed's ClientApp now, not when the first message waits for it
    try:
        import secfed.flower.runtime  # noqa: F401 - torch & co., which the first train message needs
    except ImportError:
        pass
    _say("ready in %.1f s: serving %s's flwr-clientapp tasks with %s", _time.perf_counter() - t0,
         a.runtime_api_address, SECFED_CLIENTAPP)
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass


def supernode_main(argv: list[str] | None = None) -> None:
    """``python -m secfed.flower.worker supernode ARGS``: ``flower-supernode ARGS --isolation process`` + a worker."""
    args = list(sys.argv[2:] if argv is None else argv)
    _need_flwr()
    if any(a in ("-h", "--help") for a in args):
        print("usage: secfed deploy supernode [flower-supernode arguments]   (or python -m secfed.flower.worker "
              "supernode ...)\n\nflower-supernode ARGS --isolation process, plus one long-lived secfed ClientApp "
              "worker and short idle polling.\nEvery argument is flower-supernode's: see flower-supernode --help.")
        return
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    p = argparse.ArgumentParser(add_help=False)  # the flower-supernode arguments the worker needs
    for name, default in (("host", UVICORN_DEFAULT_HOST), ("port", str(SUPERNODE_UVICORN_DEFAULT_PORT)),
                          ("ssl-ca-certfile", None), ("superexec-auth-secret-file", None), ("isolation", None)):
        p.add_argument(f"--{name}", default=default)
    known = p.parse_known_args(args)[0]
    if known.isolation not in (None, "process"):
        raise SystemExit("error: secfed's SuperNode runs its ClientApp in a long-lived worker (--isolation process); "
                         "use flower-supernode itself for --isolation subprocess")
    host = known.host if known.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    shorten_object_pull_backoff()
    patch_supernode_polling(PollClock(idle_min=_env_float("SECFED_SUPERNODE_POLL_MIN", 0.05),
                                      idle_max=_env_float("SECFED_SUPERNODE_POLL_MAX", 1.0)))
    secret_dir = None
    if not known.superexec_auth_secret_file:
        # Sign the worker's AcquireTask calls (flwr's SuperExec auth) with a fresh secret that only this
        # SuperNode and its worker know, so no other local process can claim this node's tasks.
        from secfed.flower.deploy import write_secret

        secret_dir = Path(tempfile.mkdtemp(prefix="secfed-supernode-"))  # 0700
        known.superexec_auth_secret_file = str(write_secret(secret_dir / "superexec.secret", os.urandom(32).hex().encode()))
        args += ["--superexec-auth-secret-file", known.superexec_auth_secret_file]
    cmd = [sys.executable, "-m", "secfed.flower.worker", "clientapp", "--parent-pid", str(os.getpid()),
           "--runtime-api-address", f"[{host}]:{known.port}" if ":" in host else f"{host}:{known.port}",
           "--superexec-auth-secret-file", known.superexec_auth_secret_file]
    if known.ssl_ca_certfile:
        cmd += ["--root-certificates", known.ssl_ca_certfile]
    worker = subprocess.Popen(cmd)  # same stdout/stderr and process group as this SuperNode
    stopping = threading.Event()

    def stop_worker() -> None:
        stopping.set()
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
        if secret_dir is not None:
            shutil.rmtree(secret_dir, ignore_errors=True)

    def watch_worker() -> None:
        # a SuperNode whose worker died would stay connected and never answer: stop it, loudly
        code = worker.wait()
        if not stopping.is_set():
            _say("the ClientApp worker exited (%s); stopping this SuperNode", code)
            os.kill(os.getpid(), signal.SIGTERM)

    from flwr.supercore.exit import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    threading.Thread(target=watch_worker, name="secfed-worker-watch", daemon=True).start()
    add_exit_handler(stop_worker)  # flwr_exit (SIGTERM/SIGINT) ends the process without unwinding to us
    sys.argv = ["flower-supernode", *args] + ([] if known.isolation else ["--isolation", "process"])
    try:
        flower_supernode()
    finally:
        stop_worker()


def _need_flwr() -> None:
    try:
        import flwr.supercore.version  # noqa: F401
    except ImportError:
        raise SystemExit("error: flwr is not installed: pip install 'secfed[flower]'") from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("supernode", "clientapp"):
        raise SystemExit("usage: python -m secfed.flower.worker supernode [flower-supernode arguments]\n"
                         "       python -m secfed.flower.worker clientapp --runtime-api-address HOST:PORT [...]")
    (supernode_main if argv[0] == "supernode" else worker_main)(argv[1:])


if __name__ == "__main__":
    main()
