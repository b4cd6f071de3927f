"""Every decoder, config loader, checkpoint loader and ledger reader under mutation fuzzing.

Default run: a bounded number of inputs per target (CI). ``pytest -m fuzz``: many more.
The only exception allowed out of a target is its documented error type.
"""

from __future__ import annotations

import pytest

from fuzz_targets import run, targets

TARGETS = {t.name: t for t in targets()}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_bounded(name):
    n, crashes = run(TARGETS[name], 150)
    assert not crashes, crashes[:3]


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_long(name):
    n, crashes = run(TARGETS[name], 20000, seed=1)
    assert not crashes, crashes[:3]
