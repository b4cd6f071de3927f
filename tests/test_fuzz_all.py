"""Every decoder, config loader, checkpoint loader and ledger reader under mutation fuzzing.

Default run: a bounded number of inputs per target (CI). ``pytest -m fuzz``: many more.
The only exception allowed out of a target is its documented error type.
"""

from __future__ import annotations

import pytest

from fuzz_targets import run, targets

TARGETS = {t.name: t for t in targets()}


#: the HE bundle target builds CKKS contexts (about 20 s): in ``pytest -m slow`` with the long fuzzing
SLOW_TARGETS = {"he-bundle"}


@pytest.mark.parametrize("name", [n if n not in SLOW_TARGETS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(TARGETS)])
def test_fuzz_bounded(name):
    n, crashes = run(TARGETS[name], 150)
    assert not crashes, crashes[:3]


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_long(name):
    n, crashes = run(TARGETS[name], 20000, seed=1)
    assert not crashes, crashes[:3]


def test_he_context_that_aborted_seal_is_rejected():
    """Regression: this mutated context made SEAL call std::terminate (SIGABRT of the whole process)."""
    from pathlib import Path

    from defenses.secure_aggregation.he_wire import decode_context
    from secfed.errors import MalformedMessage

    data = (Path(__file__).parent / "data" / "he_context_abort.bin").read_bytes()
    with pytest.raises(MalformedMessage):
        decode_context(data)
