"""SECURITY.md names a test for each claim: every test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for p in (ROOT / "tests").glob("test_*.py"):
        names.update(re.findall(r"^\s*def (test_\w+)", p.read_text(), flags=re.M))
    return names


def test_every_test_named_in_security_md_exists():
    text = (ROOT / "SECURITY.md").read_text()
    defined = _defined_tests()
    files = {p.name for p in (ROOT / "tests").glob("*.py")}
    missing = []
    for token in set(re.findall(r"\btest_\w+\*?", text)):
        if token.endswith(".py") or token in files or token + ".py" in files:
            continue
        if token.endswith("*") or token.endswith("_"):
            if not any(d.startswith(token.rstrip("*")) for d in defined):
                missing.append(token)
        elif token not in defined and not any(d.startswith(token) for d in defined):
            missing.append(token)
    for f in set(re.findall(r"tests/(\w+\.py)", text)):
        if f not in files:
            missing.append(f"tests/{f}")
    assert not missing, f"SECURITY.md names tests that do not exist: {sorted(missing)}"
