"""``python -m secfed.compare CELL_DIR``: run one grid cell (the child process of ``secfed compare``)."""

import sys
from pathlib import Path

from secfed.compare.runner import run_cell

sys.exit(run_cell(Path(sys.argv[1])))
