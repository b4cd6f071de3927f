"""The README's "Run across machines" commands, run as written (bash, real processes, fixed ports 9093, 9110-9112).

Slow (about 2-4 minutes on 2 cores): the block starts a SuperLink and three secfed SuperNodes
(`secfed deploy supernode`) in the background, submits experiments/flower_local.toml and waits for
its summary. The test then stops every process the block left running (its process group).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]


def readme_block() -> str:
    """The second bash block of the README's "## Run across machines" section (the across-machines commands)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run across machines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "README 'Run across machines' lost its commands block"
    return blocks[1]


def test_readme_block_uses_secfeds_supernode():
    code = "\n".join(line.split("#", 1)[0] for line in readme_block().splitlines())  # commands, not comments
    assert "secfed deploy supernode --superlink" in code
    assert "flower-supernode " not in code  # Flower's own SuperNode starts a process per message


@pytest.mark.slow
def test_readme_run_across_machines_commands_as_written(tmp_path):
    for port in (9093, 9110, 9111, 9112):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use; the README's commands need it")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    script = tmp_path / "readme.sh"
    script.write_text("set -e\n" + readme_block())
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    env.pop("FLWR_HOME", None)
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the block leaves the SuperLink and SuperNodes running
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5)
    fl = tmp_path / "fl"
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((fl / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 3, summary
    for i in range(3):
        log = (fl / f"node{i}.log").read_text()
        pids = set(re.findall(r"\[secfed-worker pid=(\d+)\] task done: \w+ message, completed", log))
        assert len(pids) == 1, log[-2000:]  # one ClientApp process served all of this node's messages
        assert log.count("Receiving: train message") == 3
