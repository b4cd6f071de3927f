"""A comparison grid: one base experiment plus named axes of config overrides.

A grid TOML looks like this (paths are relative to the grid file)::

    [grid]
    name = "tradeoffs_digits"
    base = "digits_small.toml"      # an experiment TOML, optional
    seeds = [0, 1]                  # -> run.seed, the innermost axis
    audit = ["membership"]          # post-run attacks on each cell's final model

    [base]                          # inline overrides of the base (optional)
    "run.rounds" = 4

    [axes.defence]                  # axis "defence" with two values
    none = {}
    secagg = { "server.secure_sum" = "secagg+" }

    [axes.attack]
    none = {}
    dlg = { "+server.observers" = ["dlg"] }

    [[study]]                       # optional: run only these crosses
    defence = ["none", "secagg"]
    attack = ["dlg"]

Each axis value is a table of overrides. A key is dotted (``"server.aggregator"``,
quoted so TOML keeps it one key) or nested (``server = {aggregator = "median"}``);
nested tables are merged into the config, except a table with a ``name`` key (a
plug-in) and any list, which replace what was there. A key starting with ``+``
appends to a list (``"+server.observers" = ["dlg"]``), so two axes can both add
observers or client stages. Overrides apply in order: base, axes in the order
they are declared, then the seed.

Without ``[[study]]`` the grid is the full product of all axes. With it, the grid
is the union of the studies' products (an axis a study does not name takes its
first value); identical cells appear once. Every cell is validated before any
run starts, except for plug-ins that are not importable yet: such a cell still
appears and fails cleanly when it runs.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfed.config import ExperimentConfig, parse_config, read_toml
from secfed.errors import ConfigError

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Cell:
    """One run of the grid: its axis labels, its seed and its full config dict."""

    axes: dict[str, str]
    seed: int
    config: dict[str, Any]

    @property
    def setup(self) -> str:
        """The cell's label without the seed (seeds of one setup are aggregated)."""
        return ",".join(f"{k}={v}" for k, v in self.axes.items()) or "base"

    @property
    def id(self) -> str:
        """Folder name: ``defence=none__attack=dlg__seed=0``."""
        parts = [f"{k}={v}" for k, v in self.axes.items()] + [f"seed={self.seed}"]
        return "__".join(parts)

    def parse(self) -> ExperimentConfig:
        return parse_config(self.config, f"cell {self.id}")


@dataclass
class Grid:
    name: str
    base: dict[str, Any]
    axes: dict[str, dict[str, dict[str, Any]]]
    seeds: list[int]
    studies: list[dict[str, list[str]]] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    source: Path | None = None

    def cells(self) -> list[Cell]:
        """Every cell, in a stable order (studies in order, then axes' product, seeds innermost)."""
        names = list(self.axes)
        studies = self.studies or [{a: list(self.axes[a]) for a in names}]
        seen: set[str] = set()
        out: list[Cell] = []
        for st in studies:
            choices = [st.get(a, [next(iter(self.axes[a]))]) for a in names]
            for combo in itertools.product(*choices):
                labels = dict(zip(names, combo))
                for seed in self.seeds:
                    cfg = copy.deepcopy(self.base)
                    for a in names:
                        apply_overrides(cfg, self.axes[a][labels[a]], f"axes.{a}.{labels[a]}")
                    cfg.setdefault("run", {})["seed"] = seed
                    cell = Cell(labels, seed, cfg)
                    if cell.id not in seen:
                        seen.add(cell.id)
                        out.append(cell)
        return out


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and "name" not in v and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Apply one axis value's overrides to a config dict (see the module docstring)."""
    for key, value in overrides.items():
        append = key.startswith("+")
        parts = key.lstrip("+").split(".")
        cur = cfg
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"grid key '{where}.{key}': '{p}' is not a table in the config")
            cur = nxt
        leaf = parts[-1]
        if append:
            old = cur.get(leaf, [])
            if not isinstance(old, list):
                raise ConfigError(f"grid key '{where}.{key}': '+' appends to a list, but '{key[1:]}' is not one")
            cur[leaf] = old + copy.deepcopy(value if isinstance(value, list) else [value])
        elif isinstance(value, dict) and "name" not in value and isinstance(cur.get(leaf), dict):
            _merge(cur[leaf], value)
        else:
            cur[leaf] = copy.deepcopy(value)


def _check_label(kind: str, label: str) -> None:
    if not _LABEL.match(label) or "__" in label:
        raise ConfigError(f"grid {kind} '{label}': use letters, digits and . _ + - (no '__'); it names a folder")


def parse_grid(data: dict[str, Any], source: Path | None = None) -> Grid:
    """Validate a grid table (as read from TOML)."""
    where = str(source) if source else "grid"
    unknown = set(data) - {"grid", "base", "axes", "study"}
    if unknown:
        raise ConfigError(f"{where}: unknown grid section '{sorted(unknown)[0]}' (allowed: grid, base, axes, study)")
    g = data.get("grid", {})
    unknown = set(g) - {"name", "base", "seeds", "audit"}
    if unknown:
        raise ConfigError(f"{where}: unknown key 'grid.{sorted(unknown)[0]}' (allowed: name, base, seeds, audit)")
    base: dict[str, Any] = {}
    if g.get("base"):
        p = Path(g["base"])
        if not p.is_absolute() and source is not None:
            p = source.parent / p
        base = read_toml(p, f"{where}: grid.base: experiment file")
    apply_overrides(base, data.get("base", {}), "base")
    seeds = g.get("seeds", [base.get("run", {}).get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: grid.seeds must be a non-empty list of integers")
    audit = g.get("audit", [])
    if not isinstance(audit, list) or not all(isinstance(a, str) for a in audit):
        raise ConfigError(f"{where}: grid.audit must be a list of attack names, e.g. [\"membership\"]")
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    for name, values in data.get("axes", {}).items():
        _check_label("axis", name)
        if name == "seed":
            raise ConfigError(f"{where}: axes.seed: give seeds as grid.seeds = [...]")
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where}: axes.{name} must be a table of named override tables")
        for label, ov in values.items():
            _check_label(f"axes.{name} value", label)
            if not isinstance(ov, dict):
                raise ConfigError(f"{where}: axes.{name}.{label} must be a table of overrides (use {{}} for none)")
        axes[name] = values
    studies = data.get("study", [])
    if not isinstance(studies, list):
        raise ConfigError(f"{where}: write studies as [[study]] tables")
    for i, st in enumerate(studies):
        for a, labels in st.items():
            if a not in axes:
                raise ConfigError(f"{where}: study[{i}].{a}: no such axis (axes: {', '.join(axes) or 'none'})")
            if isinstance(labels, str):
                st[a] = labels = [labels]
            for lab in labels:
                if lab not in axes[a]:
                    raise ConfigError(f"{where}: study[{i}].{a}: '{lab}' is not a value of axes.{a} "
                                      f"({', '.join(axes[a])})")
    name = g.get("name") or (source.stem if source else "grid")
    _check_label("name", name)
    grid = Grid(name, base, axes, seeds, studies, audit, source)
    for cell in grid.cells():  # a typo anywhere fails now, not an hour into the grid
        try:
            cell.parse()
        except ConfigError as e:
            raise ConfigError(str(e)) from None
    return grid


def load_grid(path: str | Path) -> Grid:
    p = Path(path)
    return parse_grid(read_toml(p, "grid file"), p)
