"""client.physical_batch_size: a logical batch in several forward/backward passes, shortest rows first. The same
gradient as one pass (plain SGD: the batch mean; DP-SGD: the same per-example clipping, the same noise, the same
accounting), each pass trimmed to its own longest row."""

from __future__ import annotations

import json

import pytest
import torch

from defenses.privacy.dpsgd import DPSGDTrainer
from secfed.data import TensorData
from secfed.engine import Engine
from secfed.errors import ConfigError
from secfed.spec import ParamSpec
from secfed.task import Task
from secfed.training import SGDTrainer, physical_batches

from conftest import tiny_config


def _data(n: int = 40, length: int = 16, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lens[:, None]).long()
    ids = torch.randint(1000, 5000, (n, length), generator=g) * mask
    return TensorData({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)},
                      3, ("a", "b", "c"))


def test_physical_batches_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    data = TensorData({"attention_mask": mask, "labels": torch.zeros(5, dtype=torch.long)}, 1, ("a",))
    idx = torch.tensor([0, 1, 2, 3, 4])
    # lengths 3, 1, 4, 2, 1: shortest first, ties in batch order (stable)
    assert [p.tolist() for p in physical_batches(data, idx, 2)] == [[1, 4], [3, 0], [2]]
    assert [p.tolist() for p in physical_batches(data, idx, 0)] == [[0, 1, 2, 3, 4]]  # 0: one pass, order kept
    assert [p.tolist() for p in physical_batches(data, idx, 5)] == [[0, 1, 2, 3, 4]]
    images = TensorData({"pixels": torch.zeros(5, 1, 2, 2), "labels": torch.zeros(5, dtype=torch.long)}, 1, ("a",))
    assert [p.tolist() for p in physical_batches(images, idx, 2)] == [[0, 1], [2, 3], [4]]  # no mask: order kept


class _Recording:
    """The tiny task, recording the width of every pass's input."""

    def __init__(self, task: Task) -> None:
        self.task, self.widths = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def per_example_loss(self, model, batch):
        self.widths.append((len(batch["labels"]), int(self.task.inputs(batch)["input_ids"].shape[1]),
                            int(batch["attention_mask"].sum(1).max())))
        return self.task.per_example_loss(model, batch)

    def loss(self, model, batch):
        return self.per_example_loss(model, batch).mean()


@pytest.fixture
def tiny():
    task = Task(tiny_config())
    return task, task.build_model()


def _delta(trainer, task, model, data, seed=3):
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)
    metrics = trainer.train(model, task, data, torch.Generator().manual_seed(seed))
    delta = spec.flatten(model) - w0
    spec.assign(model, w0)
    return delta, metrics


TRAINERS = {
    "sgd": lambda pb: SGDTrainer(local_steps=3, batch_size=24, lr=1e-2, physical_batch_size=pb),
    "dp-sgd": lambda pb: DPSGDTrainer(max_grad_norm=0.05, noise_multiplier=1.3, noise="seeded", local_steps=3,
                                      batch_size=24, lr=1e-2, physical_batch_size=pb),
    "dp-sgd groups, proportional noise": lambda pb: DPSGDTrainer(
        max_grad_norm=0.05, noise_multiplier=1.3, noise="seeded", local_steps=3, batch_size=24, lr=1e-2,
        physical_batch_size=pb, clip_groups={"head.*": 2.0, "*": 0.5}, group_noise="proportional"),
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_passes_give_the_one_pass_update(tiny, name):
    task, model = tiny
    data = _data()
    one, m1 = _delta(TRAINERS[name](0), task, model, data)
    rec = _Recording(task)
    split, m2 = _delta(TRAINERS[name](5), rec, model, data)
    assert one.abs().max() > 1e-4  # it trained (and, under DP-SGD, clipped: C = 0.05 is below every gradient)
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6)  # same batches, same clipping, same seeded noise
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5) and m2["steps"] == m1["steps"] == 3
    assert all(n <= 5 for n, _, _ in rec.widths) and len(rec.widths) > 3
    assert all(width == longest for _, width, longest in rec.widths)  # each pass trimmed to its own longest row
    assert min(w for _, w, _ in rec.widths) < 16  # the short rows' passes are narrower than the padded batch


def test_ghost_clipping_with_passes_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^config key 'client.physical_batch_size': ghost clipping"):
        DPSGDTrainer(ghost_clipping=True, physical_batch_size=8)


def test_the_config_key_reaches_the_trainer_and_the_ledger_is_unchanged(tmp_path):
    client = {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2}
    priv = {"privacy": {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5}}
    ledgers = []
    for pb in (0, 4):
        eng = Engine(tiny_config(run={"rounds": 1}, client={**client, "physical_batch_size": pb}, server=priv),
                     tmp_path / f"r{pb}", progress=False)
        assert eng.trainer.physical_batch_size == pb
        eng.run()
        entry = json.loads((tmp_path / f"r{pb}" / "privacy_ledger.jsonl").read_text().splitlines()[0])
        ledgers.append((entry["clients"], entry.get("z")))
    assert ledgers[0] == ledgers[1]  # the passes change no privacy parameter
    with pytest.raises(ConfigError, match="physical_batch_size.*client.physical_batch_size"):  # engine-owned
        Engine(tiny_config(client={**client, "trainer": {**client["trainer"], "physical_batch_size": 3}}, server=priv),
               tmp_path / "x", progress=False)
