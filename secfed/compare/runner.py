"""Run every cell of a grid, each in its own process and folder; resumable.

Layout under the output folder (default ``runs/compare/<grid name>``)::

    grid.json                 the expanded grid (cells, axes, overrides)
    cells/<cell id>/cell.json the cell's axes, seed and full config
    cells/<cell id>/run/      the engine's run directory (summary.json, rounds.jsonl, checkpoint/)
    cells/<cell id>/status.json  done | failed (with the error line and attempts)
    cells/<cell id>/log.txt   the cell's stderr (tracebacks land here)
    results.jsonl, results.csv, report.md, *.png   (secfed.compare.report)

Resuming: a cell whose ``run/summary.json`` matches its config (same fingerprint
and number of rounds) and whose post-run audits are present is skipped; a cell
with a checkpoint but no summary (killed mid-run) continues from its checkpoint;
anything else runs from the start. A crashed cell is retried once; a cell that
fails on a user error (bad config, a plug-in that does not exist yet, missing
data) is not retried, since the same error would come back. Either way it is
recorded as failed with its one-line error and the grid goes on; the next
``secfed compare`` tries failed cells again.

Each cell runs in a child process, so its peak memory is its own, a crash cannot
take the grid down, and killing ``secfed compare`` kills the running cell with it
(``PR_SET_PDEATHSIG``). On Linux the child is forked from the parent after the
heavy imports (torch, transformers) are done once, which saves seconds per cell;
elsewhere (or with ``fork=False``) it is a fresh ``python -m secfed.compare CELL_DIR``.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from secfed.compare.grid import Cell, Grid
from secfed.errors import CheckpointError, ConfigError, DataError, ModelLoadError, SecfedError

NOT_RETRIED = (ConfigError, DataError, ModelLoadError)
ROUND_TAG = "@@secfed-round "


# ---------------------------------------------------------------------------- child side
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_cell(cell_dir: Path) -> int:
    """Child entry point: run (or resume) one cell, then its post-run audits."""
    from secfed.compare.post_run import audit_run
    from secfed.config import parse_config
    from secfed.engine import Engine

    spec = json.loads((cell_dir / "cell.json").read_text())
    run_dir = cell_dir / "run"
    try:
        cfg = parse_config(spec["config"], f"cell {cell_dir.name}")
        summary_p = run_dir / "summary.json"
        if not _summary_matches(summary_p, cfg):
            def tick(t: int) -> None:
                print(f"{ROUND_TAG}{t} {cfg.run.rounds}", flush=True)

            resume = (run_dir / "checkpoint").exists() or (run_dir / "checkpoint.old").exists()
            try:
                engine = Engine(cfg, run_dir, resume=resume, progress=False, on_round_end=tick)
                engine.run()
            except CheckpointError:  # another config's or a corrupt checkpoint: start over (old run is kept aside)
                if not resume:
                    raise
                Engine(cfg, run_dir, resume=False, progress=False, on_round_end=tick).run()
        if spec.get("audit"):
            audit_run(run_dir, spec["audit"], out=run_dir / "audit", progress=False)
    except Exception as e:  # noqa: BLE001 - the parent records one line, the traceback goes to log.txt
        line = str(e) if isinstance(e, SecfedError) else f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        _write_json(cell_dir / "error.json", {"error": line.splitlines()[0] if line else type(e).__name__,
                                               "retry": not isinstance(e, NOT_RETRIED)})
        return 3
    return 0


def _summary_matches(path: Path, cfg: Any) -> bool:
    if not path.exists():
        return False
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return s.get("fingerprint") == cfg.fingerprint() and s.get("rounds_planned") == cfg.run.rounds


def cell_done(cell_dir: Path, cell: Cell, audits: list[str]) -> bool:
    """True when the cell's summary belongs to this exact config and its audits exist."""
    try:
        cfg = cell.parse()
    except ConfigError:
        return False
    run = cell_dir / "run"
    if not _summary_matches(run / "summary.json", cfg):
        return False
    if not audits:
        return True
    try:
        done = json.loads((run / "audit" / "audit.json").read_text()).get("attacks_run", [])
    except (OSError, json.JSONDecodeError):
        return False
    return set(audits) <= set(done)


# ---------------------------------------------------------------------------- parent side
def preflight(cell: Cell) -> str | None:
    """The error line if one of the cell's plug-ins cannot be resolved (not importable, no such class)."""
    import importlib

    from secfed import registry

    importlib.invalidate_caches()  # a plug-in may have landed while the grid ran
    try:
        cfg = cell.parse()
        c, s = cfg.client, cfg.server
        named = [("trainer", c.trainer, "client.trainer"), ("secure_sum", s.secure_sum, "server.secure_sum"),
                 ("aggregator", s.aggregator, "server.aggregator")]
        named += [("client_stage", p, f"client.pipeline[{i}]") for i, p in enumerate(c.pipeline)]
        named += [("pre_aggregator", p, f"server.pre_aggregators[{i}]") for i, p in enumerate(s.pre_aggregators)]
        named += [("server_stage", p, f"server.stages[{i}]") for i, p in enumerate(s.stages)]
        named += [("observer", p, f"server.observers[{i}]") for i, p in enumerate(s.observers)]
        if s.privacy is not None:
            named.append(("privacy", s.privacy, "server.privacy"))
        if cfg.attack.adversary is not None:
            named.append(("adversary", cfg.attack.adversary, "attack.adversary"))
        for kind, spec, key in named:
            registry.resolve(kind, spec.name, key)
    except ConfigError as e:
        return str(e)
    return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class GridLock:
    """One ``secfed compare`` per output folder at a time (an advisory ``flock``)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "GridLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SecfedError(f"another 'secfed compare' is writing to {self.path.parent}; wait for it or use --out") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


class GridRunner:
    """Runs a :class:`Grid` into ``out``; ``run()`` returns ``{cell id: status dict}``."""

    def __init__(self, grid: Grid, out: str | Path, *, progress: bool = True, retries: int = 1,
                 cell_timeout: float | None = None, python: str | None = None, fork: bool | None = None) -> None:
        self.grid = grid
        self.out = Path(out)
        self.progress = progress
        self.retries = retries
        self.cell_timeout = cell_timeout
        self.python = python or sys.executable
        self._lock_fd: int | None = None
        self.fork = (python is None and sys.platform == "linux") if fork is None else fork

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id

    def _write_specs(self, cells: list[Cell]) -> None:
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "grid.json", {
            "name": self.grid.name, "source": str(self.grid.source) if self.grid.source else None,
            "axes": {a: list(v) for a, v in self.grid.axes.items()}, "seeds": self.grid.seeds,
            "audit": self.grid.audit, "overrides": self.grid.axes, "cells": [c.id for c in cells]})
        for c in cells:
            d = self.cell_dir(c)
            d.mkdir(exist_ok=True)
            _write_json(d / "cell.json", {"id": c.id, "setup": c.setup, "axes": c.axes, "seed": c.seed,
                                          "audit": self.grid.audit, "config": c.config})

    def run(self) -> dict[str, dict[str, Any]]:
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        cells = self.grid.cells()
        statuses: dict[str, dict[str, Any]] = {}
        with GridLock(self.out) as lock:
            self._lock_fd = lock.fd
            self._write_specs(cells)
            if self.fork:
                _warm_up()
            todo = [c for c in cells if not cell_done(self.cell_dir(c), c, self.grid.audit)]
            for c in cells:
                if c not in todo:
                    statuses[c.id] = {"status": "done", "skipped": True}
            bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"{self.grid.name} cells", unit="cell",
                       position=0, disable=not self.progress, dynamic_ncols=True)
            rbar = tqdm(total=0, desc="rounds", unit="round", position=1, leave=False,
                        disable=not self.progress, dynamic_ncols=True)
            try:
                for c in todo:
                    bar.set_postfix_str(c.id[:60])
                    statuses[c.id] = self._run_with_retry(c, rbar)
                    if statuses[c.id]["status"] == "failed":
                        tqdm.write(f"cell {c.id} failed: {statuses[c.id]['error']}") if self.progress else None
                    bar.update(1)
            finally:
                rbar.close()
                bar.close()
        return statuses

    def _spawn(self, d: Path, log: Any) -> _Child:
        if self.fork:
            r, w = os.pipe()
            log.flush()
            pid = os.fork()
            if pid == 0:  # the cell: stdout -> the pipe (round ticks), stderr -> log.txt
                code = 70
                try:
                    _die_with_parent()
                    if self._lock_fd is not None:
                        os.close(self._lock_fd)  # the grid's lock dies with the parent, not with this cell
                    os.close(r)
                    os.dup2(w, 1)
                    os.dup2(log.fileno(), 2)
                    sys.stdout = os.fdopen(1, "w", buffering=1)
                    sys.stderr = os.fdopen(2, "w", buffering=1)
                    code = run_cell(d)
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            os.close(w)
            return _Child(pid, os.fdopen(r, "r"))
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.Popen([self.python, "-m", "secfed.compare", str(d)], stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env, preexec_fn=_die_with_parent)
        return _Child(proc.pid, proc.stdout, proc)

    def _run_with_retry(self, cell: Cell, rbar: Any) -> dict[str, Any]:
        d = self.cell_dir(cell)
        attempts, err, t0 = 0, None, time.perf_counter()
        missing = preflight(cell)
        if missing:  # a plug-in that does not exist (yet): fail now, without a process
            status = {"status": "failed", "error": missing, "attempts": 1, "seconds": time.perf_counter() - t0}
            _write_json(d / "status.json", status)
            return status
        while attempts <= self.retries:
            attempts += 1
            err = self._run_child(cell, d, rbar)
            if err is None:
                status = {"status": "done", "attempts": attempts, "seconds": time.perf_counter() - t0}
                _write_json(d / "status.json", status)
                return status
            if not err.get("retry", True):
                break
        status = {"status": "failed", "error": err["error"] if err else "unknown", "attempts": attempts,
                  "seconds": time.perf_counter() - t0}
        _write_json(d / "status.json", status)
        return status

    def _run_child(self, cell: Cell, d: Path, rbar: Any) -> dict[str, Any] | None:
        (d / "error.json").unlink(missing_ok=True)
        (d / "status.json").unlink(missing_ok=True)
        rbar.reset(total=cell.config.get("run", {}).get("rounds", 0) or 0)
        rbar.set_description_str(f"rounds {cell.id[:40]}")
        start = time.monotonic()
        with (d / "log.txt").open("a") as log:
            proc = self._spawn(d, log)
            for line in proc.lines():
                if line.startswith(ROUND_TAG):
                    t, total = (int(x) for x in line[len(ROUND_TAG):].split())
                    rbar.total = total
                    rbar.n = t
                    rbar.refresh()
                else:
                    log.write(line)
                if self.cell_timeout and time.monotonic() - start > self.cell_timeout:
                    proc.kill()
            rc = proc.wait()
        if rc == 0:
            if not _summary_matches(d / "run" / "summary.json", cell.parse()):
                return {"error": "the cell's process exited without writing run/summary.json", "retry": True}
            return None
        ej = d / "error.json"
        if ej.exists():
            return json.loads(ej.read_text())
        return {"error": f"the cell's process exited with code {rc}" + (" (killed by a signal)" if rc < 0 else ""),
                "retry": True}


class _Child:
    """A cell's process: forked from the warm parent (fast: torch is imported once) or a fresh interpreter."""

    def __init__(self, pid: int | None, stream: Any, popen: subprocess.Popen | None = None) -> None:
        self.pid, self.stream, self.popen = pid, stream, popen

    def lines(self) -> Any:
        yield from self.stream

    def kill(self) -> None:
        if self.popen is not None:
            self.popen.kill()
        elif self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        self.stream.close()
        if self.popen is not None:
            return self.popen.wait()
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _warm_up() -> None:
    """Import what every cell needs once in the parent, so forked cells start in well under a second."""
    import secfed.compare.post_run  # noqa: F401  (torch, numpy)
    import secfed.engine  # noqa: F401  (transformers, peft, the engine)
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: fork stays safe


def run_grid(grid: Grid, out: str | Path, *, progress: bool = True, retries: int = 1) -> dict[str, dict[str, Any]]:
    """Run (or resume) a grid, then write its report. Returns the cells' statuses."""
    from secfed.compare.report import write_report

    statuses = GridRunner(grid, out, progress=progress, retries=retries).run()
    write_report(Path(out))
    return statuses

