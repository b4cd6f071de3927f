"""Deployment for real: TLS certificates, data partitions, the Flower App, and a local federation.

``secfed deploy`` (``secfed/cli.py``) wraps these:

* :func:`make_certs` - a CA plus a server certificate for the SuperLink (SANs
  ``localhost``, ``127.0.0.1`` and any names given), with ``cryptography``; the
  private keys are created 0600 with ``O_EXCL | O_NOFOLLOW`` (never over an
  existing file or through a symlink; ``force`` replaces atomically), and the CA
  key goes to its own folder ``ca-key-KEEP-OFFLINE/`` for the operator to move offline;
* :func:`secfed.flower.runtime.write_partitions` - one ``partition-<i>.safetensors`` per client;
* :func:`write_app` - the Flower App folder (``pyproject.toml`` naming
  ``secfed.flower.server:app`` and ``secfed.flower.client:app``) that ``flwr run`` ships;
* :class:`LocalFederation` - starts ``flower-superlink`` and N SuperNodes on this
  machine with TLS (secfed's SuperNode, :mod:`secfed.flower.worker`: Flower's
  ``flower-supernode`` with one long-lived ClientApp process each), submits the
  run with ``flwr run`` and stops everything it started.

Each SuperNode gets ``--node-config "partition-id=i config-file=... data-file=..."``
and reads only its own partition file. Under active SecAgg+ (the default secure sum's
variant) it also gets ``identity-key=...``: the same file as its
``--auth-supernode-private-key``; the public keys go to ``work_dir/roster/client-<i>.pub``,
which becomes ``server.secure_sum.roster`` unless the config names one. Flower 1.41 serves the Fleet, Control and
ServerAppIo APIs over HTTPS on one port (uvicorn); the SuperNodes verify the
SuperLink's certificate against ``--root-certificates ca.crt``.
"""

from __future__ import annotations

import datetime
import ipaddress
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

from secfed.config import ExperimentConfig
from secfed.errors import SecfedError


class DeployError(SecfedError):
    """A Flower process failed to start or a run did not finish."""


# ----------------------------------------------------------------------------- certificates

#: Folder (inside the certificates folder) that holds the CA's private key alone: move it offline.
CA_KEY_DIR = "ca-key-KEEP-OFFLINE"


def write_secret(path: str | Path, data: bytes, *, force: bool = False, mode: int = 0o600) -> Path:
    """Write a private key: mode 0600 from the first byte, never through a symlink, never over a key.

    Without ``force`` the file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an
    existing file or a symlink at ``path`` is refused, so a key never keeps an old
    file's 0644 mode and is never written through a planted link) and ``fchmod``-ed
    to 0600 whatever the umask. With ``force`` the key is written the same way to a
    fresh temporary name in the same folder and renamed over ``path``: ``rename``
    replaces a symlink itself, never its target (review finding 12).
    """
    p = Path(path)
    target = p
    if force:
        target = p.with_name(f".{p.name}.{os.urandom(8).hex()}.tmp")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise DeployError(f"{p} already exists (or is a symlink); not overwritten: pass --force to replace it") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(target, p)
    except BaseException:
        if force:
            target.unlink(missing_ok=True)
        raise
    return p


def _refuse_existing(paths: Any, force: bool) -> None:
    for p in () if force else paths:
        if p.exists() or p.is_symlink():
            raise DeployError(f"{p} already exists; not overwritten: pass --force to replace it")


def write_public(path: str | Path, data: bytes, *, force: bool = False) -> Path:
    """Write a certificate or public key (0644) with the same refusal and atomic replacement as :func:`write_secret`."""
    return write_secret(path, data, force=force, mode=0o644)


def make_certs(out_dir: str | Path, names: tuple[str, ...] = ("localhost",), days: int = 30, *,
               force: bool = False) -> dict[str, Path]:
    """A self-signed CA and a server certificate/key it signs (ECDSA P-256, SHA-256).

    ``names`` are DNS names or IP addresses of the SuperLink; ``localhost``,
    ``127.0.0.1`` and ``::1`` are always included. Returns the paths
    ``ca`` (``ca.crt``), ``cert`` (``server.pem``), ``key`` (``server.key``) and
    ``ca_key`` (``ca-key-KEEP-OFFLINE/ca.key``: the CA's private key, in its own
    0700 folder, apart from what the SuperLink needs; move it offline). Existing
    files are refused unless ``force`` (see :func:`write_secret`).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secfed test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(("localhost", "127.0.0.1", "::1") + tuple(names)):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_dir = out / CA_KEY_DIR
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    if ca_dir.is_symlink() or not ca_dir.is_dir():
        raise DeployError(f"{ca_dir} is not a plain folder; refusing to write the CA key there")
    os.chmod(ca_dir, 0o700)
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key", "ca_key": ca_dir / "ca.key"}
    _refuse_existing(paths.values(), force)  # before writing anything, so a refusal leaves no half-made set
    pem = serialization.Encoding.PEM
    for p, k in ((paths["ca_key"], ca_key), (paths["key"], key)):
        write_secret(p, k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), force=force)
    write_public(paths["ca"], ca.public_bytes(pem), force=force)
    write_public(paths["cert"], cert.public_bytes(pem), force=force)
    return paths


def make_node_key(out_dir: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair (OpenSSH format) that authenticates one SuperNode to the SuperLink.

    The private key (mode 0600) stays with the SuperNode (``--auth-supernode-private-key``);
    the public key is registered with ``flwr supernode register``. The SuperLink, started
    with ``--enable-supernode-auth``, refuses nodes whose key is not registered.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / f"{name}.key", out / f"{name}.pub"
    _refuse_existing((priv, pub), force)
    write_secret(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), force=force)
    write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
                 force=force)
    return priv, pub


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


class LocalFederation:
    """A SuperLink and one SuperNode per client on this machine, with TLS (loopback by default).

    Use as a context manager: every process it starts is stopped (SIGTERM, then
    SIGKILL) on exit. Logs go to ``work_dir/logs``. ``FLWR_HOME`` points into
    ``work_dir`` so nothing is written to the user's ``~/.flwr``.
    """

    def __init__(self, cfg: ExperimentConfig | str | Path, work_dir: str | Path, *, num_nodes: int | None = None,
                 host: str = "127.0.0.1", port: int | None = None, certs: dict[str, Path] | None = None,
                 env: dict[str, str] | None = None, node_auth: bool = True, persistent: bool = True) -> None:
        from secfed.flower.client import load_experiment

        self.cfg: ExperimentConfig = cfg if isinstance(cfg, ExperimentConfig) else load_experiment(str(cfg))
        self.work = Path(work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.sign_with_node_keys = self._wire_roster()  # active SecAgg+: node key = identity key
        self.cfg_path = self.work / "experiment.json"  # what the ServerApp and every SuperNode read
        self.cfg_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        (self.work / "logs").mkdir(exist_ok=True)
        self.num_nodes = num_nodes if num_nodes is not None else self.cfg.data.num_clients
        self.host = host
        self.port = port or free_port()
        self.certs = certs or self._certs()
        # flower-superlink starts flower-superexec by name: put this interpreter's bin folder on PATH
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        # flower-superexec (started by each SuperNode) polls for tasks every 1 s by default: 0.1 s here
        self.env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", **os.environ, "PATH": path,
                    "FLWR_HOME": str(self.work / "flwr_home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.node_auth = node_auth
        self.persistent = persistent
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.app_dir = write_app(self.work / "app")
        self._write_flower_config()

    def _wire_roster(self) -> bool:
        """Active SecAgg+: the nodes sign with their node keys; without a configured roster, the roster is the
        folder ``work_dir/roster`` that :meth:`start_supernode` fills with each node's public key."""
        from secfed.config import parse_config
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
        if all(have[k].is_file() and not have[k].is_symlink() for k in ("ca", "cert", "key")):
            return have
        return make_certs(d)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_flower_config(self) -> None:
        home = self.work / "flwr_home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            "[superlink]\ndefault = \"secfed-local\"\n\n[superlink.secfed-local]\n"
            f"address = \"{self.address}\"\nroot-certificates = \"{self.certs['ca']}\"\n")

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
                                      str(self.port), "--database", str(self.work / "superlink.db"),
                                      "--disable-runtime-dependency-installation"]
                                     + (["--enable-supernode-auth"] if self.node_auth else []), "superlink.log")
        self._wait_port()

    def partitions(self) -> list[Path]:
        d = self.work / "partitions"
        paths = [d / f"partition-{i}.safetensors" for i in range(self.cfg.data.num_clients)]
        if not all(p.exists() for p in paths):
            from secfed.flower.runtime import write_partitions

            paths = write_partitions(self.cfg, d)
        return paths

    def start_supernode(self, i: int) -> None:
        """SuperNode ``i``: its own FLWR_HOME, its own partition file, its own auth key (registered once).

        ``persistent`` (the default): secfed's SuperNode (:mod:`secfed.flower.worker`), i.e.
        ``flower-supernode --isolation process`` with one long-lived ClientApp worker (its
        ``AcquireTask`` calls signed with a fresh per-node SuperExec secret) and short idle
        polling. Otherwise plain ``flower-supernode``: one ``flwr-clientapp`` process per message.
        """
        part = self.partitions()[i]
        node_dir = self.work / "nodes" / str(i)
        node_dir.mkdir(parents=True, exist_ok=True)
        launcher = ([sys.executable, "-m", "secfed.flower.worker", "supernode"] if self.persistent
                    else [_bin("flower-supernode")])
        args = [*launcher, "--superlink", self.address, "--root-certificates", str(self.certs["ca"]),
                "--node-config", f'partition-id={i} config-file="{self.cfg_path}" data-file="{part}"',
                "--host", "127.0.0.1", "--port", str(free_port())]
        priv = node_dir / "node.key"
        if (self.node_auth or self.sign_with_node_keys) and not priv.exists():
            priv, pub = make_node_key(node_dir, "node")
            if self.node_auth:
                self._flwr("supernode", "register", str(pub), "secfed-local", "--name", f"secfed-client-{i}")
            roster = self.work / "roster"
            if self.sign_with_node_keys and roster.is_dir():  # the operator's roster entry: the key it registered
                write_public(roster / f"client-{i}.pub", pub.read_bytes(), force=True)
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
        rc = [f'config="{self.cfg_path}"', f'out="{out}"', f"resume={'true' if resume else 'false'}"]
        args = ["run", str(self.app_dir), "secfed-local"]
        for r in rc:
            args += ["--run-config", r]
        self._flwr(*args)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if summary.exists() and summary.stat().st_mtime >= started - 1:
                return json.loads(summary.read_text())
            if self.superlink is not None and self.superlink.poll() is not None:
                raise DeployError(f"the SuperLink exited ({self.superlink.returncode}); see {self.work / 'logs'}")
            time.sleep(1.0)
        raise DeployError(f"the run did not finish within {timeout:g} s; see {self.work / 'logs'}")

    def kill_supernode(self, i: int) -> None:
        """Kill SuperNode ``i`` and its ClientApp process group (SIGKILL: a crash, not a shutdown)."""
        p = self.supernodes.pop(i, None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def restart_superlink(self) -> None:
        """Crash the SuperLink (SIGKILL, with its ServerApp) and start a new one on the same port,
        database and certificates; the running SuperNodes reconnect to it."""
        if self.superlink is not None and self.superlink.poll() is None:
            os.killpg(self.superlink.pid, signal.SIGKILL)
            self.superlink.wait(10)
        self.superlink = None
        self.start_superlink()

    @staticmethod
    def _terminate(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def stop(self) -> None:
        """SuperNodes first (they deactivate at the SuperLink), then the SuperLink."""
        self._terminate(list(self.supernodes.values()))
        self._terminate([self.superlink] if self.superlink else [])
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
