"""Deployment for real: the Flower App, a local federation, and ``deploy.transport`` (keys: :mod:`secfed.keys`).

``secfed deploy`` (``secfed/flower/cli.py``) wraps these:

* :func:`secfed.partitions.write_partitions` - one ``partition-<i>.safetensors`` per client;
* :func:`write_app` - the Flower App folder (naming secfed's ServerApp and ClientApp) that ``flwr run`` ships;
* :class:`LocalFederation` - ``flower-superlink`` and N SuperNodes (secfed's, :mod:`secfed.flower.worker`)
  on this machine with TLS; submits the run with ``flwr run``; stops everything it started;
* :func:`run_flower` - ``deploy.transport`` (``secfed run --transport``): ``flower-ray`` (Flower's
  simulation runtime on Ray, :mod:`secfed.flower.simulation`) or ``flower`` (a :class:`LocalFederation`);
  ``inprocess`` is the engine's own loop. All three give the same model for the same config and seed.

Each SuperNode gets ``--node-config "partition-id=i config-file=... data-file=..."`` and reads
only its own partition file; under active SecAgg+ also ``identity-key=...`` (the file of its
``--auth-supernode-private-key``; the public keys go to ``work_dir/roster/client-<i>.pub``, which
becomes ``server.secure_sum.roster`` unless the config names one). The SuperNodes verify the
SuperLink's certificate (Fleet, Control and ServerAppIo APIs over HTTPS on one port) against ``ca.crt``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from secfed.config import ExperimentConfig, load_config, parse_config
from secfed.errors import DeployError
from secfed.keys import CA_KEY_DIR, make_certs, make_node_key, write_secret  # noqa: F401 - the deploy CLI's


# ----------------------------------------------------------------------------- the Flower App

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "secfed-app"
version = "1.0.0"
description = "secfed's ServerApp and ClientApp (the code is the installed secfed package)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "secfed"

[tool.flwr.app.components]
serverapp = "secfed.flower.server:app"
clientapp = "secfed.flower.client:app"

[tool.flwr.app.config]
config = ""
out = ""
resume = false
"""


def write_app(app_dir: str | Path) -> Path:
    """The Flower App folder ``flwr run`` packages (a FAB). It holds no code: both apps live in secfed."""
    d = Path(app_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(APP_PYPROJECT)
    (d / "README.md").write_text("secfed Flower App: see docs/deploy.md\n")
    return d


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"'{name}' not found: pip install 'secfed[flower]'")
    return found


def _terminate(procs: list[subprocess.Popen | None], sig: int = signal.SIGTERM) -> None:
    """Signal each process group, then wait (15 s, then SIGKILL)."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    for p in live:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


class LocalFederation:
    """A SuperLink and one SuperNode per client on this machine, with TLS (loopback by default).

    Use as a context manager: every process it starts is stopped (SIGTERM, then
    SIGKILL) on exit. Logs go to ``work_dir/logs``. ``FLWR_HOME`` points into
    ``work_dir`` so nothing is written to the user's ``~/.flwr``. The SuperLink keeps Flower's in-memory
    state unless ``durable=True`` (``--database work_dir/superlink.db``, which ``restart_superlink`` needs):
    with the sqlite state the SuperLink spent most of its time in sqlite and rounds took about 2x longer
    (issue 20, measured on 2 cores). secfed's own crash safety (ledger, checkpoints, ``resume``) does not
    depend on it.
    """

    def __init__(self, cfg: ExperimentConfig | str | Path, work_dir: str | Path, *, num_nodes: int | None = None,
                 host: str = "127.0.0.1", port: int | None = None, certs: dict[str, Path] | None = None,
                 env: dict[str, str] | None = None, node_auth: bool = True, durable: bool = False) -> None:
        self.durable = durable  # the SuperLink's state in work_dir/superlink.db (sqlite), else Flower's in-memory state
        self.cfg: ExperimentConfig = cfg if isinstance(cfg, ExperimentConfig) else load_config(cfg)
        self.work = Path(work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.sign_with_node_keys = self._wire_roster()  # active SecAgg+: node key = identity key
        self.cfg_path = self.work / "experiment.json"  # what the ServerApp and every SuperNode read
        self.cfg_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        (self.work / "logs").mkdir(exist_ok=True)
        self.num_nodes = num_nodes if num_nodes is not None else self.cfg.data.num_clients
        self.host, self.port = host, port or free_port()
        self.address = f"{self.host}:{self.port}"
        self.certs = certs or self._certs()
        # flower-superlink starts flower-superexec (which runs the ServerApp) by name: this interpreter's bin
        # folder goes on PATH. It polls the SuperLink for a ServerApp task every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
        # s for as long as the SuperLink runs, rounds included: Flower's 1 s here (0.1 s made ~10% of a round's
        # SuperLink requests, issue 20), which costs a run at most 1 s before its ServerApp starts.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", **os.environ, "PATH": path,
                    "FLWR_HOME": str(self.work / "flwr_home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.node_auth = node_auth
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.app_dir = write_app(self.work / "app")
        (self.work / "flwr_home").mkdir(exist_ok=True)  # `flwr` (the operator's CLI) finds the SuperLink here
        (self.work / "flwr_home" / "config.toml").write_text(
            "[superlink]\ndefault = \"secfed-local\"\n\n[superlink.secfed-local]\n"
            f"address = \"{self.address}\"\nroot-certificates = \"{self.certs['ca']}\"\n")

    def _wire_roster(self) -> bool:
        """Active SecAgg+: the nodes sign with their node keys; without a configured roster, the roster is the
        folder ``work_dir/roster`` that :meth:`start_supernode` fills with each node's public key."""
        from secfed.flower.runtime import secure_sum_for

        ss = secure_sum_for(self.cfg)
        if not hasattr(ss, "use_node_identity") or not getattr(ss, "active", False):
            return False
        if getattr(ss, "roster", None) is None:
            roster = self.work / "roster"
            roster.mkdir(exist_ok=True)
            data = self.cfg.model_dump(mode="json")
            data["server"]["secure_sum"]["roster"] = str(roster)
            self.cfg = parse_config(data, "LocalFederation")
        return True

    def _certs(self) -> dict[str, Path]:
        """This work folder's certificates: made once, reused by a later federation on the same folder."""
        d = self.work / "certs"
        have = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key", "ca_key": d / CA_KEY_DIR / "ca.key"}
        made = all(have[k].is_file() and not have[k].is_symlink() for k in ("ca", "cert", "key"))
        return have if made else make_certs(d)

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.work / "logs" / log, "ab") as f:
            return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.work,
                                    start_new_session=True)

    def _flwr(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout)
        with open(self.work / "logs" / "flwr-cli.log", "a") as f:
            f.write(f"$ flwr {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise DeployError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed ({proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-800:]}")
        return proc.stdout

    # ------------------------------------------------------------------ lifecycle
    def start_superlink(self) -> None:
        c = self.certs
        self.superlink = self._spawn([_bin("flower-superlink"), "--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile",
                                      str(c["cert"]), "--ssl-keyfile", str(c["key"]), "--host", self.host, "--port",
                                      str(self.port), "--disable-runtime-dependency-installation"]
                                     + (["--database", str(self.work / "superlink.db")] if self.durable else [])
                                     + (["--enable-supernode-auth"] if self.node_auth else []), "superlink.log")
        self._wait_port()

    def partitions(self) -> list[Path]:
        d = self.work / "partitions"
        paths = [d / f"partition-{i}.safetensors" for i in range(self.cfg.data.num_clients)]
        if not all(p.exists() for p in paths):
            from secfed.partitions import write_partitions

            paths = write_partitions(self.cfg, d)
        return paths

    def start_supernode(self, i: int) -> None:
        """SuperNode ``i`` (secfed's, :mod:`secfed.flower.worker`): its own FLWR_HOME, partition file and auth
        key (registered once)."""
        part = self.partitions()[i]
        node_dir = self.work / "nodes" / str(i)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "secfed.flower.worker", "supernode", "--superlink", self.address,
                "--root-certificates", str(self.certs["ca"]),
                "--node-config", f'partition-id={i} config-file="{self.cfg_path}" data-file="{part}"',
                "--host", "127.0.0.1", "--port", str(free_port())]
        priv = node_dir / "node.key"
        if (self.node_auth or self.sign_with_node_keys) and not priv.exists():
            priv, pub = make_node_key(node_dir, "node")
            if self.node_auth:
                self._flwr("supernode", "register", str(pub), "secfed-local", "--name", f"secfed-client-{i}")
            roster = self.work / "roster"
            if self.sign_with_node_keys and roster.is_dir():  # the operator's roster entry: the key it registered
                write_secret(roster / f"client-{i}.pub", pub.read_bytes(), force=True, mode=0o644)
        if self.node_auth:
            args += ["--auth-supernode-private-key", str(priv)]
        if self.sign_with_node_keys:  # active SecAgg+ signs with the same node key
            args[args.index("--node-config") + 1] += f' identity-key="{priv}"'
        env = {**self.env, "FLWR_HOME": str(node_dir / "flwr_home")}
        self.supernodes[i] = self._spawn(args, f"supernode-{i}.log", env)

    def start(self) -> "LocalFederation":
        self.partitions()
        self.start_superlink()
        for i in range(self.num_nodes):
            self.start_supernode(i)
        return self

    def run(self, out_dir: str | Path, *, resume: bool = False, rounds: int | None = None,
            timeout: float = 1800) -> dict[str, Any]:
        """Submit the experiment with ``flwr run`` and wait for its ``summary.json``.

        ``rounds`` changes ``run.rounds`` (the only key a resumed run may change) before submitting.
        """
        if rounds is not None:
            self.cfg = self.cfg.model_copy(update={"run": self.cfg.run.model_copy(update={"rounds": rounds})})
            self.cfg_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        out = Path(out_dir).resolve()
        summary = out / "summary.json"
        started = time.time()
        self._flwr("run", str(self.app_dir), "secfed-local", "--run-config",
                   f'config="{self.cfg_path}" out="{out}" resume={"true" if resume else "false"}')
        deadline = time.time() + timeout
        while time.time() < deadline:
            if summary.exists() and summary.stat().st_mtime >= started - 1:
                return json.loads(summary.read_text())
            if self.superlink is not None and self.superlink.poll() is not None:
                raise DeployError(f"the SuperLink exited ({self.superlink.returncode}); see {self.work / 'logs'}")
            time.sleep(1.0)
        raise DeployError(f"the run did not finish within {timeout:g} s; see {self.work / 'logs'}")

    def kill_supernode(self, i: int) -> None:
        """Kill SuperNode ``i`` and its process group (SIGKILL: a crash, not a shutdown)."""
        _terminate([self.supernodes.pop(i, None)], signal.SIGKILL)

    def restart_superlink(self) -> None:
        """Crash the SuperLink (SIGKILL, with its ServerApp) and start a new one on the same port,
        database and certificates; the running SuperNodes reconnect to it. Needs ``durable=True``."""
        if not self.durable:
            raise DeployError("restart_superlink: the SuperLink keeps its state in memory (LocalFederation(durable=True) "
                              "keeps it in work_dir/superlink.db)")
        _terminate([self.superlink], signal.SIGKILL)
        self.start_superlink()

    def stop(self) -> None:
        """SuperNodes first (they deactivate at the SuperLink), then the SuperLink."""
        _terminate(list(self.supernodes.values()))
        _terminate([self.superlink])
        self.supernodes.clear()
        self.superlink = None

    def _wait_port(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise DeployError(f"flower-superlink exited ({self.superlink.returncode}); see {self.work / 'logs' / 'superlink.log'}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.3)
        raise DeployError(f"flower-superlink did not open {self.address} within {timeout:g} s")

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_flower(cfg: ExperimentConfig, out_dir: str | Path | None = None, *, resume: bool = False,
               work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` on its Flower transport; returns the summary (with ``out``, the run directory)."""
    out = Path(out_dir or cfg.run.out or f"runs/{cfg.run.name}")
    if cfg.deploy.transport == "flower-ray":
        from secfed.flower.simulation import run_ray_simulation

        return run_ray_simulation(cfg, out, resume=resume)
    with LocalFederation(cfg, work_dir or out.with_name(out.name + ".deploy")) as fed:
        summary = fed.run(out, resume=resume)
    summary["out"] = str(out)
    return summary
