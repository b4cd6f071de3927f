"""One byte-level mutation for the Hypothesis fuzzers of SecAgg+ messages (tests/test_secagg_active.py,
tests/test_secagg_identity.py): flip a byte, truncate, extend, replace by random bytes, set a byte to a
plausible signature length, or put a huge count after the header (a decoder must not allocate for it)."""

from __future__ import annotations

from hypothesis import strategies as st

SIG_LENGTHS = (0, 63, 64, 96, 132, 255)


def mutate(data: st.DataObject, valid: bytes, kinds: tuple[str, ...], header_size: int, extend_max: int = 80) -> bytes:
    """``valid`` changed by one mutation drawn from ``kinds`` (flip, truncate, extend, random, siglen, count)."""
    buf = bytearray(valid)
    kind = data.draw(st.sampled_from(kinds))
    if kind == "flip":
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif kind == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=extend_max))
    elif kind == "random":
        buf = bytearray(data.draw(st.binary(max_size=300)))
    elif kind == "siglen":  # any byte may be a signature length: set one to a plausible size
        i = data.draw(st.integers(header_size, len(buf) - 1))
        buf[i] = data.draw(st.sampled_from(SIG_LENGTHS))
    elif len(buf) >= header_size + 4:  # "count": a huge count with a short body must not allocate
        buf[header_size:header_size + 4] = data.draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
    return bytes(buf)
