"""User errors give one clear line, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY = """
[run]
name = "t"
rounds = 1
[data]
source = "synthetic-text"
num_clients = 2
test_size = 50
[model]
name = "tiny-bert"
lora_r = 2
"""


def secfed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secfed", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("edit, expect", [
    (("[client]\nbatch_sise = 3\n"), "unknown config key 'client.batch_sise'"),
    (("[client]\nbatch_size = -3\n"), "config key 'client.batch_size'"),
    (("[server]\noptimizer = \"sgd\"\n"), "config key 'server.optimizer'"),
    (("[server]\naggregator = \"krumm\"\n"), "unknown aggregator 'krumm'"),
    (("[server]\naggregator = {name = \"mean\", bogus = 1}\n"), "server.aggregator.bogus"),
])
def test_bad_config_names_the_key(tmp_path, edit, expect):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY + edit)
    line = one_line_error(secfed("run", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path))
    assert expect in line
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.replace('name = "tiny-bert"', 'name = "./no/such/model"'))
    line = one_line_error(secfed("run", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path))
    assert "model path not found" in line
    assert not (tmp_path / "out").exists()


def test_missing_label_column(tmp_path):
    (tmp_path / "d.csv").write_text("text,sentiment\nhello,pos\nbad,neg\n" * 40)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.replace('source = "synthetic-text"', f'source = "csv"\npath = "{tmp_path / "d.csv"}"'))
    line = one_line_error(secfed("run", str(cfg), "--out", str(tmp_path / "out"), cwd=tmp_path))
    assert "column 'label'" in line and "data.label_column" in line
    assert not (tmp_path / "out").exists()


def test_not_toml(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[run\nname=")
    assert "not valid TOML" in one_line_error(secfed("run", str(cfg), cwd=tmp_path))


def test_missing_config_file(tmp_path):
    assert "config file not found" in one_line_error(secfed("run", "nope.toml", cwd=tmp_path))


def test_csv_source_works(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\ngood great fine,pos\nbad awful poor,neg\n" * 60)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.replace('source = "synthetic-text"', f'source = "csv"\npath = "{tmp_path / "d.csv"}"'))
    res = secfed("run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.slow  # builds a datasets folder and runs the CLI (about 25 s)
def test_hf_datasets_local_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["good great fine", "bad awful poor"] * 60, "y": [1, 0] * 60})
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.replace('source = "synthetic-text"',
                                f'source = "hf"\npath = "{tmp_path / "hf"}"\ntext_column = "sentence"\nlabel_column = "y"'))
    res = secfed("run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    bad = tmp_path / "b.toml"
    bad.write_text(TINY.replace('source = "synthetic-text"', f'source = "hf"\npath = "{tmp_path / "hf"}"'))
    line = one_line_error(secfed("run", str(bad), "--out", str(tmp_path / "out2"), cwd=tmp_path))
    assert "column 'text'" in line
