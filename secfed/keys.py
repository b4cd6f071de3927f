"""Key material for a deployment: TLS certificates (SuperLink) and node keys (SuperNodes), written safely.

``secfed deploy certs`` / ``secfed deploy node-key`` (:mod:`secfed.flower.cli`). Private keys are
created 0600 with ``O_EXCL | O_NOFOLLOW`` (never over an existing file or through a symlink;
``force`` replaces atomically); the CA key goes to its own folder ``ca-key-KEEP-OFFLINE/`` for the
operator to move offline (review finding 12).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

from secfed.errors import DeployError

#: Folder (inside the certificates folder) that holds the CA's private key alone: move it offline.
CA_KEY_DIR = "ca-key-KEEP-OFFLINE"


def write_secret(path: str | Path, data: bytes, *, force: bool = False, mode: int = 0o600) -> Path:
    """Write a private key (``mode`` 0600; 0644 for a certificate or public key) from the first byte, never
    through a symlink, never over an existing file.

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
    for p, c in ((paths["ca"], ca), (paths["cert"], cert)):
        write_secret(p, c.public_bytes(pem), force=force, mode=0o644)
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
    write_secret(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
                 force=force, mode=0o644)
    return priv, pub
