"""Long-term client identities of active SecAgg+: signature schemes, keys, the roster (issue 17).

An identity is a signing key whose public half is on the *roster* (client id ->
public key) that every client and the server hold before the run:

* **simulation**: :class:`Identities` generates one Ed25519 key per client
  (RFC 8032; 64-byte signatures). That is a simulation only: whoever generates
  the keys could sign for every client.
* **deployment**: the identity is the node key the operator registered with
  Flower's node authentication (``flower-supernode --auth-supernode-private-key``;
  ``secfed deploy node-key`` makes ECDSA P-384 keys in OpenSSH format). The node
  loads its private key from its own node config (``identity-key=PATH``,
  :func:`load_private_key`); the server and every node load the public keys the
  operator registered (``server.secure_sum.roster``, :func:`load_roster`) into
  :class:`RosterIdentities`. No private key ever leaves its node, and the server
  generates none.

Schemes (inferred from the key type, never from a message):

============  =======================================  ==========================
scheme        key                                      signature on the wire
============  =======================================  ==========================
ed25519       Ed25519 (RFC 8032)                       64 bytes
ecdsa-p256    ECDSA NIST P-256, SHA-256 (FIPS 186-5)   raw r || s, 64 bytes
ecdsa-p384    ECDSA NIST P-384, SHA-384                raw r || s, 96 bytes
ecdsa-p521    ECDSA NIST P-521, SHA-512                raw r || s, 132 bytes
============  =======================================  ==========================

The curve/hash pairs are those of OpenSSH's ``ecdsa-sha2-nistp*`` keys (RFC 5656
Section 6.2.1), i.e. every key Flower's node authentication loads. ECDSA
signatures travel as fixed-width big-endian ``r || s`` (not DER), so a decoder
knows every length before it allocates (:data:`SIG_SIZES`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from secfed.errors import ConfigError

PrivateKey = Union[Ed25519PrivateKey, ec.EllipticCurvePrivateKey]
PublicKey = Union[Ed25519PublicKey, ec.EllipticCurvePublicKey]

#: curve name -> (scheme, hash, bytes per scalar)
_CURVES: dict[str, tuple[str, type, int]] = {
    "secp256r1": ("ecdsa-p256", hashes.SHA256, 32),
    "secp384r1": ("ecdsa-p384", hashes.SHA384, 48),
    "secp521r1": ("ecdsa-p521", hashes.SHA512, 66),
}
#: scheme -> signature bytes on the wire
SIG_SIZES: dict[str, int] = {"ed25519": 64, **{s: 2 * w for s, _, w in _CURVES.values()}}
MAX_SIG = max(SIG_SIZES.values())
ROSTER_KEY = "server.secure_sum.roster"


def scheme_of(key: Any) -> str:
    """The scheme of a public or private key; ValueError for any other key type or curve."""
    if isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.name in _CURVES:
        return _CURVES[key.curve.name][0]
    name = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__
    raise ValueError(f"unsupported identity key type {name} (use Ed25519 or ECDSA P-256/P-384/P-521)")


def sign(key: PrivateKey, statement: bytes) -> bytes:
    """The wire signature of ``statement``: Ed25519's 64 bytes, or ECDSA's fixed-width raw r || s."""
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(statement)
    scheme_of(key)
    _, hash_, w = _CURVES[key.curve.name]
    r, s = decode_dss_signature(key.sign(statement, ec.ECDSA(hash_())))
    return r.to_bytes(w, "big") + s.to_bytes(w, "big")


def verify_signature(pub: PublicKey, sig: bytes, statement: bytes) -> None:
    """Raise InvalidSignature unless ``sig`` is ``pub``'s signature on ``statement`` (exact length per scheme)."""
    scheme = scheme_of(pub)
    if len(sig) != SIG_SIZES[scheme]:
        raise InvalidSignature(f"{len(sig)}-byte signature for {scheme}")
    if isinstance(pub, Ed25519PublicKey):
        pub.verify(sig, statement)
        return
    _, hash_, w = _CURVES[pub.curve.name]
    der = encode_dss_signature(int.from_bytes(sig[:w], "big"), int.from_bytes(sig[w:], "big"))
    pub.verify(der, statement, ec.ECDSA(hash_()))


def public_key(entry: Any) -> PublicKey:
    """A roster entry as a public key: a key object, raw Ed25519 (32 bytes), an OpenSSH public key line,
    PEM or DER SubjectPublicKeyInfo. ValueError for anything else (or an unsupported scheme)."""
    if isinstance(entry, (Ed25519PublicKey, ec.EllipticCurvePublicKey)):
        scheme_of(entry)
        return entry
    if not isinstance(entry, (bytes, bytearray)):
        raise ValueError("not bytes")
    data = bytes(entry)
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    text = data.strip()
    try:
        if text.startswith((b"ssh-", b"ecdsa-")):
            key: Any = serialization.load_ssh_public_key(text)
        elif text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise ValueError("not a raw Ed25519, OpenSSH, PEM or DER public key") from None
    scheme_of(key)
    return key


def public_bytes(key: PublicKey) -> bytes:
    """A canonical encoding (DER SubjectPublicKeyInfo) to compare keys."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ============================================================================ loading keys
def load_private_key(path: str | Path, what: str = "node config 'identity-key'") -> PrivateKey:
    """This node's identity key: OpenSSH (what Flower's node auth reads) or PEM PKCS#8, unencrypted."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {p}: {e.strerror or e}") from None
    key: Any = None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = load(data, None)
            break
        except (ValueError, UnsupportedAlgorithm, TypeError):
            continue
    if key is None:
        raise ConfigError(f"{what}: {p} is not an unencrypted OpenSSH or PEM private key")
    try:
        scheme_of(key)
    except ValueError as e:
        raise ConfigError(f"{what}: {p}: {e}") from None
    return key


_NAME = re.compile(r"^(?:[A-Za-z_]+-)?(\d{1,9})\.(?:pub|pem)$")


def load_roster(path: str | Path) -> dict[int, PublicKey]:
    """The roster the operator registered: client (partition) id -> public key.

    ``path`` is either a folder with one file per client, named ``<id>.pub`` or
    ``<prefix>-<id>.pub`` (``.pem`` too; e.g. ``client-3.pub`` is the key of the node
    started with ``partition-id=3``), each an OpenSSH public key line (what
    ``flwr supernode register`` takes), PEM or DER SubjectPublicKeyInfo; or one text
    file with lines ``<id> <OpenSSH public key>`` (``#`` comments and blank lines
    ignored). A malformed entry, a repeated id or one key for two ids is one
    ConfigError naming it.
    """
    p = Path(path).expanduser()
    entries: list[tuple[str, str, bytes]] = []  # (where, id text, key bytes)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix not in (".pub", ".pem"):
                continue
            m = _NAME.match(f.name)
            if not m:
                raise ConfigError(f"config key '{ROSTER_KEY}': roster entry {f} is not named <id>.pub or <name>-<id>.pub")
            try:
                entries.append((str(f), m.group(1), f.read_bytes()))
            except OSError as e:
                raise ConfigError(f"config key '{ROSTER_KEY}': cannot read roster entry {f}: {e.strerror}") from None
    elif p.is_file():
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config key '{ROSTER_KEY}': cannot read {p}: {e}") from None
        for no, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise ConfigError(f"config key '{ROSTER_KEY}': roster entry {p}:{no} is not '<id> <public key>'")
            entries.append((f"{p}:{no}", parts[0], parts[1].encode()))
    else:
        raise ConfigError(f"config key '{ROSTER_KEY}': {p} is neither a folder of public keys nor a roster file")
    roster: dict[int, PublicKey] = {}
    seen: dict[bytes, int] = {}
    for where, ident, data in entries:
        u = int(ident)
        try:
            key = public_key(data)
        except ValueError as e:
            raise ConfigError(f"config key '{ROSTER_KEY}': roster entry {where}: {e}") from None
        canon = public_bytes(key)
        if u in roster:
            raise ConfigError(f"config key '{ROSTER_KEY}': roster entry {where}: client {u} is listed twice")
        if canon in seen:
            raise ConfigError(f"config key '{ROSTER_KEY}': roster entry {where}: the same key as client {seen[canon]}")
        roster[u], seen[canon] = key, u
    if not roster:
        raise ConfigError(f"config key '{ROSTER_KEY}': {p} holds no public keys")
    return roster


# ============================================================================ identity sources
_GENERATE = {"ed25519": Ed25519PrivateKey.generate,
             **{scheme: (lambda c=curve: ec.generate_private_key(getattr(ec, c.upper())()))
                for curve, (scheme, _, _) in _CURVES.items()}}


class Identities:
    """Ed25519 long-term keys of a simulated federation; ``roster`` is what every client holds.

    ``num_clients`` > 0: one key per client 0..n-1, so the roster is the whole federation
    (fixed before the run). A simulation over Flower hands the same identities to the
    ServerApp and to each simulated node (:meth:`private_bytes` / :meth:`from_private_bytes`).
    Simulation only: in a deployment the keys are the nodes' own (:class:`RosterIdentities`).
    """

    def __init__(self, num_clients: int = 0, scheme: str = "ed25519") -> None:
        if scheme not in _GENERATE:
            raise ValueError(f"unknown identity scheme {scheme!r} (one of {sorted(_GENERATE)})")
        self.num_clients, self.scheme = num_clients, scheme
        self._sk: dict[int, Any] = {}

    def key(self, client_id: int) -> Any:
        if client_id not in self._sk:
            self._sk[client_id] = _GENERATE[self.scheme]()
        return self._sk[client_id]

    def ids(self, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Every client with an identity (the federation, the keys made so far and ``extra``, made now)."""
        for u in [*range(self.num_clients), *extra]:
            self.key(u)
        return sorted(self._sk)

    def roster(self, ids: list[int]) -> dict[int, Any]:
        """id -> raw Ed25519 public key (32 bytes), or the public key object for the ECDSA schemes."""
        if self.scheme != "ed25519":
            return {u: self.key(u).public_key() for u in ids}
        return {u: self.key(u).public_key().public_bytes_raw() for u in ids}

    def private_bytes(self) -> dict[int, bytes]:
        """The raw private keys (simulation only: to hand the same identities to simulated nodes)."""
        if self.scheme != "ed25519":
            raise ValueError("only Ed25519 simulation identities are handed to simulated nodes")
        self.ids()
        return {u: k.private_bytes_raw() for u, k in self._sk.items()}

    @classmethod
    def from_private_bytes(cls, keys: dict[int, bytes]) -> "Identities":
        out = cls(0)
        out._sk = {int(u): Ed25519PrivateKey.from_private_bytes(k) for u, k in keys.items()}
        return out


class RosterIdentities:
    """Deployment: the registered public keys (the roster) and at most one private key, this node's own.

    The server holds no private key; a node holds only the one that matches its own roster
    entry (:meth:`use_own`). Ids off the roster never get an identity (:meth:`ids` is the roster).
    """

    def __init__(self, roster: dict[int, PublicKey]) -> None:
        self._roster = dict(roster)
        self._own: tuple[int, PrivateKey] | None = None
        self.num_clients = len(roster)

    def use_own(self, client_id: int, key: PrivateKey, where: str) -> None:
        """This node's private key; refused unless its public half is client ``client_id``'s roster entry."""
        if client_id not in self._roster:
            raise ConfigError(f"config key '{ROSTER_KEY}': client {client_id} (this node's partition-id) is not on the roster")
        if public_bytes(key.public_key()) != public_bytes(self._roster[client_id]):
            raise ConfigError(f"{where}: this key is not client {client_id}'s roster entry in '{ROSTER_KEY}' "
                              "(use the private key whose public key the operator registered for this node)")
        self._own = (client_id, key)

    def key(self, client_id: int) -> PrivateKey:
        if self._own is None or self._own[0] != client_id:
            raise ConfigError(f"active secagg+: no identity key for client {client_id} here (a node needs node config "
                              "'identity-key=PATH', its Flower auth private key; the server never holds one)")
        return self._own[1]

    def ids(self, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
        return sorted(self._roster)

    def roster(self, ids: list[int]) -> dict[int, PublicKey]:
        return {u: self._roster[u] for u in ids if u in self._roster}

    def on_roster(self, u: int) -> bool:
        return u in self._roster
