"""Result rows that are replaced, never lost: one rule for every benchmark that merges runs into its JSON."""

from __future__ import annotations


def keep_row(runs: dict, earlier: dict, key: str, row: dict) -> None:
    """Record a run's row; a row it replaces (a rerun, or a run at other settings) moves to ``earlier[key]``."""
    if key in runs:
        earlier[key] = [*earlier.get(key, []), runs[key]]
    runs[key] = row
