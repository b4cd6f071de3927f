"""Every place the outside reaches, as a fuzz target: valid bytes plus the parser.

Used by ``tests/test_fuzz_all.py`` (bounded in CI, ``-m fuzz`` for long runs) and
by ``benchmarks/hardening.py`` (counts inputs and crashes for the headline). A
*crash* is any exception other than the target's documented error type.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from secfed.errors import CheckpointError, ConfigError, MalformedMessage


@dataclass
class Target:
    name: str
    valid: Callable[[], bytes]
    parse: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...] = (MalformedMessage,)


def mutate(rng: random.Random, buf: bytes) -> bytes:
    """Structure-aware mutations: bit flips, cuts, extensions, 4-byte field overwrites with extreme values."""
    b = bytearray(buf)
    op = rng.choice(["flip", "cut", "extend", "field", "dup", "random"])
    if op == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "cut":
        b = b[: rng.randrange(len(b) + 1)]
    elif op == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == "field" and len(b) >= 4:
        i = rng.randrange(len(b) - 3)
        v = rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2_500_000_000, rng.getrandbits(32)])
        b[i : i + 4] = v.to_bytes(4, "little")
    elif op == "dup" and b:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        b = b[:j] + b[i:j] + b[j:]
    else:
        b = bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    return bytes(b)


def run(target: Target, n: int, seed: int = 0) -> tuple[int, list[str]]:
    """Feed ``n`` mutated inputs; return (inputs, crashes as one-line descriptions)."""
    rng = random.Random(f"{target.name}/{seed}")
    valid = target.valid()
    target.parse(valid)  # the valid input must parse
    crashes = []
    for _ in range(n):
        data = mutate(rng, valid)
        try:
            target.parse(data)
        except target.allowed:
            pass
        except Exception as e:  # noqa: BLE001 - that is the finding
            crashes.append(f"{target.name}: {type(e).__name__}: {str(e)[:120]} on {data[:32].hex()}")
    return n, crashes


# ------------------------------------------------------------------ plain updates
def _plain() -> Target:
    from secfed.wire import decode_update, encode_update

    return Target("plain-update", lambda: encode_update(3, 5, 10, 10.0, torch.linspace(-1, 1, 33)),
                  lambda b: decode_update(b, expected_dim=33, round_=3, sender=5, max_norm=1e6))


# ------------------------------------------------------------------ SecAgg+
def _secagg() -> list[Target]:
    from test_secagg_fuzz import DECODE, VALID

    out = [Target(f"secagg-{k}", (lambda k=k: VALID[k]), DECODE[k]) for k in sorted(DECODE)]
    from test_secagg_active import DECODE as ADECODE, VALID as AVALID  # the active variant (issue 17)

    from test_secagg_identity import DECODE as MDECODE, MIXED  # v2 messages mixing Ed25519 / ECDSA signatures

    return (out + [Target(f"secagg-active-{k}", (lambda k=k: AVALID[k]), ADECODE[k]) for k in sorted(ADECODE)]
            + [Target(f"secagg-active-mixed-{k}", (lambda k=k: MIXED[k]), MDECODE[k]) for k in sorted(MDECODE)])


# ------------------------------------------------------------------ HE
@functools.cache
def _he_fixture():
    from defenses.secure_aggregation.ckks import HEClient, KeyHolder
    from defenses.secure_aggregation.he_params import DEFAULT
    from secfed.interfaces import ClientUpdate

    p = DEFAULT.validate()
    kh = KeyHolder(p)
    client = HEClient(kh.client_context(), p)
    bundle = client.encode(ClientUpdate(0, torch.linspace(-0.5, 0.5, 300), 1, 1.0), 1)[0]
    return p, kh, bundle


def _he() -> list[Target]:
    from defenses.secure_aggregation.ckks import HEServer
    from defenses.secure_aggregation.he_wire import decode_context

    def add(b: bytes) -> None:
        p, kh, _ = _he_fixture()
        HEServer(kh.server_context(), p, d=300).add(b, round_=1, sender=0)

    return [Target("he-bundle", lambda: _he_fixture()[2], add),
            Target("he-context", lambda: _he_fixture()[1].server_context(), decode_context)]


# ------------------------------------------------------------------ Flower payloads
def _flower() -> list[Target]:
    from secfed.flower import codec

    w = codec.encode_weights(2, torch.linspace(-1, 1, 17))
    return [
        Target("flower-weights", lambda: w, lambda b: codec.decode_weights(b, expected_dim=17, round_=2)),
        Target("flower-ids", lambda: codec.encode_ids([1, 4, 7]), lambda b: codec.decode_ids(b, num_clients=10)),
        Target("flower-state", lambda: codec.encode_state({"round": 3, "x": [1, 2]}).encode(),
               lambda b: codec.decode_state(b.decode("utf-8", "replace"))),
        Target("flower-dp", lambda: codec.encode_dp({"noise_multiplier": 1.1, "clip_norm": 1.0, "share_divisor": 3,
                                                     "distributed": True}).encode(),
               lambda b: codec.decode_dp(b.decode("utf-8", "replace"))),
    ]


# ------------------------------------------------------------------ files
_QUICK = (Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml").read_bytes()


def _config(b: bytes) -> None:
    from secfed.config import load_config

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.toml"
        p.write_bytes(b)
        load_config(p)


@functools.cache
def _checkpoint_bytes() -> tuple[bytes, bytes]:
    from secfed.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d), {"global": torch.arange(40, dtype=torch.float32)}, {"round": 3, "fingerprint": "x"})
        return ((Path(d) / "checkpoint" / "tensors.safetensors").read_bytes(),
                (Path(d) / "checkpoint" / "state.json").read_bytes())


def _checkpoint(b: bytes) -> None:
    from secfed.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "checkpoint").mkdir()
        (Path(d) / "checkpoint" / "tensors.safetensors").write_bytes(b)
        (Path(d) / "checkpoint" / "state.json").write_bytes(_checkpoint_bytes()[1])
        load_checkpoint(Path(d))


def _ledger_bytes() -> bytes:
    from secfed.ledger import PrivacyLedger

    with tempfile.TemporaryDirectory() as d:
        led = PrivacyLedger(Path(d) / "l.jsonl")
        for r in range(3):
            led.append({"round": r + 1, "epsilon": 0.5 * r})
        return (Path(d) / "l.jsonl").read_bytes()


def _ledger(b: bytes) -> None:
    from secfed.ledger import PrivacyLedger

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "l.jsonl").write_bytes(b)
        PrivacyLedger(Path(d) / "l.jsonl")


def targets() -> list[Target]:
    out = [_plain(), Target("config-toml", lambda: _QUICK, _config, (ConfigError,)),
           Target("checkpoint-safetensors", lambda: _checkpoint_bytes()[0], _checkpoint, (CheckpointError,)),
           Target("privacy-ledger", _ledger_bytes, _ledger, (CheckpointError,))]
    for group in (_secagg, _he, _flower):
        try:
            out.extend(group())
        except ImportError:  # a component that is not installed is not a target
            pass
    return out


if __name__ == "__main__":
    for t in targets():
        print(t.name, json.dumps(run(t, 50)[1][:3]))
