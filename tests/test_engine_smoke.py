from secfed.engine import Engine, read_rounds

from conftest import digits_config, tiny_config


def test_tiny_text_run_writes_outputs(tmp_path):
    summary = Engine(tiny_config(), tmp_path / "run", progress=False).run()
    assert summary["rounds_completed"] == 2
    recs = read_rounds(tmp_path / "run")
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r["completed"] == 4 for r in recs)
    assert (tmp_path / "run" / "report.md").exists()
    assert (tmp_path / "run" / "accuracy_loss.png").exists()


def test_digits_cnn_learns(tmp_path):
    cfg = digits_config(run={"rounds": 4})
    summary = Engine(cfg, tmp_path / "run", progress=False).run()
    assert summary["final_accuracy"] > summary["majority_baseline"] + 0.3
