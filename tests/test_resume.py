"""A run killed with SIGKILL mid-way and resumed ends with bit-identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secfed.engine import Engine

from conftest import tiny_config

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from secfed.engine import Engine
    cfg = tiny_config(run={{"rounds": 4}}, server={{"optimizer": "fedadam", "lr": 0.05, "cohort_size": 3}},
                      client={{"optimizer_state": {keep!r}}})
    def die(t):
        if t == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)
    Engine(cfg, {out!r}, resume={resume}, progress=False, on_round_end=die).run()
""")


def _run(out: Path, kill_after: int, resume: bool, keep: str = "round") -> int:
    code = SCRIPT.format(tests=str(Path(__file__).parent), kill_after=kill_after, out=str(out), resume=resume, keep=keep)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode


@pytest.mark.parametrize("keep", ["round", "keep"])  # "keep": each client's Adam state is checkpointed too
def test_sigkill_and_resume_is_bit_identical(tmp_path, keep):
    cfg = tiny_config(run={"rounds": 4}, server={"optimizer": "fedadam", "lr": 0.05, "cohort_size": 3},
                      client={"optimizer_state": keep})
    Engine(cfg, tmp_path / "ref", progress=False).run()
    ref = load_file(str(tmp_path / "ref" / "checkpoint" / "tensors.safetensors"))
    assert any(k.startswith("trainer.o") for k in ref) == (keep == "keep")

    rc = _run(tmp_path / "killed", kill_after=2, resume=False, keep=keep)
    assert rc == -signal.SIGKILL
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
    assert _run(tmp_path / "killed", kill_after=-1, resume=True, keep=keep) == 0
    got = load_file(str(tmp_path / "killed" / "checkpoint" / "tensors.safetensors"))
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    rounds = [json.loads(l)["round"] for l in (tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_resume_refuses_other_config(tmp_path):
    import pytest
    from secfed.errors import CheckpointError

    Engine(tiny_config(), tmp_path / "r", progress=False).run()
    with pytest.raises(CheckpointError, match="different config"):
        Engine(tiny_config(client={"lr": 0.5}), tmp_path / "r", resume=True, progress=False).run()


def test_rerun_moves_old_run_aside(tmp_path):
    Engine(tiny_config(run={"rounds": 1}), tmp_path / "r", progress=False).run()
    Engine(tiny_config(run={"rounds": 1}), tmp_path / "r", progress=False).run()
    assert (tmp_path / "r.prev-1" / "summary.json").exists()
    assert (tmp_path / "r" / "summary.json").exists()
