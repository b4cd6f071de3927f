"""Import rules (issue 21, docs/design.md): the core never imports its plug-ins, nobody imports another
package's private module. Walks every module's AST (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("secfed", "defenses", "attacks", "benchmarks")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted(p for p in (ROOT / pkg).rglob("*.py") if ".venv" not in p.parts)


def test_secfed_imports_no_defence_and_no_attack():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in _files("secfed") for line, mod in _imports(p)
           if mod.split(".")[0] in ("defenses", "attacks")]
    assert not bad, "secfed/ reaches defences and attacks through the registry only:\n" + "\n".join(bad)


def test_no_module_imports_another_packages_private_module():
    bad = []
    for pkg in PACKAGES:
        for p in _files(pkg):
            own = p.relative_to(ROOT).with_suffix("").parts[:-1]  # the package this module lives in
            for line, mod in _imports(p):
                parts = mod.split(".")
                private = [i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")]
                if not private or parts[0] not in PACKAGES:
                    continue
                container = tuple(parts[: private[0]])  # the package that owns the private module
                if tuple(own[: len(container)]) != container:
                    bad.append(f"{p.relative_to(ROOT)}:{line}: {mod}")
    assert not bad, "private modules are imported from inside their own package only:\n" + "\n".join(bad)


def test_the_rules_catch_what_they_forbid(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from defenses.robust._ops import pairwise_sq_dists\n")
    assert (2, "defenses.robust._ops") in _imports(f)
