"""Hypothesis fuzzing of every SecAgg+ decoder: the only error is MalformedMessage."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defenses.secure_aggregation import messages as msg
from defenses.secure_aggregation import protocol, shamir
from secfed.errors import MalformedMessage

R = 3
ME = 5
NB = {1, 2, 3, 4, 6}


def _keys():
    return protocol._pub(protocol.X25519PrivateKey.generate())


C_PK, S_PK = _keys(), _keys()
KEYS = {v: (_keys(), _keys()) for v in sorted(NB)}
ENC = {v: (os.urandom(12), os.urandom(msg.CT_LEN)) for v in sorted(NB)}
SHARE_KEY = os.urandom(32)
NONCE, CT = protocol.encrypt_share(SHARE_KEY, R, 2, ME, 12345, shamir.PRIME - 1)

VALID = {
    "setup": msg.encode_setup(R, msg.Setup(4, 16, 32, 1.0, 10, sorted(NB))),
    "advertise": msg.encode_advertise(R, ME, C_PK, S_PK),
    "keys": msg.encode_keys(R, KEYS),
    "shares": msg.encode_shares(R, ME, ENC),
    "forward": msg.encode_forward(R, ENC),
    "masked": msg.encode_masked(R, ME, np.arange(11, dtype="<u4"), 32),
    "survivors": msg.encode_survivors(R, [1, 2, ME], [3]),
    "unmask": msg.encode_unmask(R, ME, {1: (0, 7), 2: (0, 8), ME: (0, 9), 3: (1, 10)}),
    "plaintext": msg.encode_share_plaintext(R, 2, ME, 1, 2),
    "ciphertext": CT,
}
DECODE = {
    "setup": lambda b: msg.decode_setup(b, round_=R, me=ME),
    "advertise": lambda b: msg.decode_advertise(b, round_=R, sender=ME),
    "keys": lambda b: msg.decode_keys(b, round_=R, allowed=NB),
    "shares": lambda b: msg.decode_shares(b, round_=R, sender=ME, allowed=NB),
    "forward": lambda b: msg.decode_forward(b, round_=R, allowed=NB),
    "masked": lambda b: msg.decode_masked(b, round_=R, sender=ME, dim=10, ring_bits=32),
    "survivors": lambda b: msg.decode_survivors(b, round_=R, allowed=NB | {ME}),
    "unmask": lambda b: msg.decode_unmask(b, round_=R, sender=ME, expected={1: 0, 2: 0, ME: 0, 3: 1}),
    "plaintext": lambda b: msg.decode_share_plaintext(b, round_=R, sender=2, receiver=ME),
    "ciphertext": lambda b: protocol.decrypt_share(SHARE_KEY, NONCE, b, R, 2, ME),
}


def _mutate(data: st.DataObject, buf: bytes) -> bytes:
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice", "random"]))
    b = bytearray(buf)
    if op == "flip" and b:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        b = b[: data.draw(st.integers(0, max(len(b) - 1, 0)))]
    elif op == "extend":
        b += data.draw(st.binary(min_size=1, max_size=64))
    elif op == "splice" and b:
        i = data.draw(st.integers(0, len(b)))
        b[i:i + 4] = data.draw(st.binary(min_size=4, max_size=4))
    else:
        b = bytearray(data.draw(st.binary(max_size=400)))
    return bytes(b)


def test_valid_messages_decode():
    for name, buf in VALID.items():
        DECODE[name](buf)


def _fuzz(name: str, data) -> None:
    buf = _mutate(data, VALID[name])
    try:
        DECODE[name](buf)
    except MalformedMessage:
        pass  # the one documented error; anything else fails the test


@pytest.mark.parametrize("name", sorted(DECODE))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoders_raise_only_malformed(name, data):
    _fuzz(name, data)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(DECODE))
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoders_raise_only_malformed_long(name, data):
    _fuzz(name, data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_share_value_decoder(b):
    try:
        y = shamir.y_from_bytes(b)
        assert len(b) == shamir.SHARE_BYTES and y < shamir.PRIME
    except MalformedMessage:
        pass


def test_header_errors_are_specific():
    adv = bytearray(VALID["advertise"])
    with pytest.raises(MalformedMessage, match="version"):
        DECODE["advertise"](bytes(adv[:4]) + b"\x02" + bytes(adv[5:]))
    with pytest.raises(MalformedMessage, match="out of order"):
        DECODE["advertise"](VALID["keys"])
    with pytest.raises(MalformedMessage, match="small order"):
        DECODE["advertise"](msg.encode_advertise(R, ME, bytes(32), S_PK))
    with pytest.raises(MalformedMessage, match="unexpected"):
        msg.decode_shares(VALID["shares"], round_=R, sender=ME, allowed={1, 2})
    with pytest.raises(MalformedMessage, match="duplicate"):
        msg.decode_survivors(msg.encode_survivors(R, [1, 2], [2]), round_=R, allowed=NB)
    with pytest.raises(MalformedMessage, match="kind"):
        msg.decode_unmask(VALID["unmask"], round_=R, sender=ME, expected={1: 1, 2: 0, ME: 0, 3: 1})
    with pytest.raises(MalformedMessage, match="strict majority"):
        msg.decode_setup(msg.encode_setup(R, msg.Setup(2, 16, 32, 1.0, 10, sorted(NB))), round_=R, me=ME)
