"""``secfed compare`` (grids of runs, their report) and ``secfed audit`` (attacks on a finished run)."""

from secfed.compare.grid import Cell, Grid, load_grid, parse_grid
from secfed.compare.runner import GridRunner, run_grid

__all__ = ["Cell", "Grid", "GridRunner", "load_grid", "parse_grid", "run_grid"]
