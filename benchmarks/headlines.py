"""Copy the headline figures of benchmarks/results/*.json into README.md.

README quotes the result files, never typed-in numbers: this script rewrites the
block between ``<!-- headlines:start -->`` and ``<!-- headlines:end -->``.

    python benchmarks/headlines.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- headlines:start -->", "<!-- headlines:end -->"


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def table() -> str:
    rows = ["| result file | figure | value |", "| --- | --- | --- |"]
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        try:
            head = json.loads(p.read_text()).get("headline")
        except json.JSONDecodeError:
            continue
        if not isinstance(head, dict):
            continue
        for k, v in head.items():
            items = v.items() if isinstance(v, dict) else [(None, v)]
            for sub, val in items:
                name = k if sub is None else f"{k}: {sub}"
                rows.append(f"| `{p.relative_to(ROOT)}` | `{name}` | {fmt(val)} |")
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit("README.md has no headline markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
    print(table())


if __name__ == "__main__":
    main()
