"""Ground truth kept outside the attacks (issue 21): trainers report the examples they used into the
engine's evaluation-only record (secfed.truth); observers read it and never rebuild a batch schedule;
a group's row is never scored against one client's data."""

from __future__ import annotations

import pytest
import torch

from secfed.data import TensorData
from secfed.engine import Engine
from secfed.interfaces import GroupId, RoundContext, ServerView
from secfed.needs import Need
from secfed.spec import ParamSpec
from secfed.training import batch_schedule
from secfed.truth import GroundTruth, chosen_rows

from conftest import tiny_config


class SpyObserver:
    """An evaluation observer that keeps what the engine handed it (the test reads it back)."""

    needs = Need.ROWS | Need.GROUND_TRUTH

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def __call__(self, view: ServerView, ctx: RoundContext, truth: GroundTruth | None = None) -> dict:
        self.rounds.append({"update_ids": list(view.update_ids or []), "cohort": list(ctx.cohort),
                            "steps": {c: [s.clone() for s in t.steps] for c, t in truth.clients.items()},
                            "truth": truth, "owners": {u: [o.client_id for o in truth.of(u)]
                                                       for u in view.update_ids or []}})
        return {}


SPY = {"name": "test_ground_truth:SpyObserver"}


def _spy_on(engine: Engine, method: str) -> list[torch.Tensor]:
    """Record the input_ids of every batch the trainer really computes a loss on (task.<method>)."""
    seen: list[torch.Tensor] = []
    original = getattr(engine.task, method)

    def spy(model, batch):
        seen.append(batch["input_ids"].clone())
        return original(model, batch)

    setattr(engine.task, method, spy)
    return seen


def _truth_batches(record: dict, cohort: list[int]) -> list[torch.Tensor]:
    t = record["truth"]
    return [t.clients[c].data.batch(s)["input_ids"] for c in cohort for s in t.clients[c].steps if s.numel()]


def test_sgd_trainer_reports_exactly_the_batches_it_trained_on(tmp_path):
    eng = Engine(tiny_config(run={"rounds": 1}, server={"cohort_size": 3, "observers": [SPY]}), tmp_path / "r",
                 progress=False)
    seen = _spy_on(eng, "loss")
    eng.run()
    rec = eng.observers[0].rounds[0]
    assert sorted(rec["steps"]) == sorted(rec["cohort"]) and all(len(s) == 3 for s in rec["steps"].values())
    truth = _truth_batches(rec, rec["cohort"])
    assert len(truth) == len(seen) and all(torch.equal(a, b) for a, b in zip(truth, seen))


def test_dp_sgd_poisson_truth_is_what_the_trainer_used_not_a_rebuilt_schedule(tmp_path):
    """Secret (CSPRNG) Poisson batches: only the trainer knows them. The observer's truth equals the
    batches DP-SGD really computed per-example losses on; the seeded schedule an attack used to rebuild
    is something else."""
    cfg = tiny_config(run={"rounds": 1}, client={"batch_size": 4, "local_steps": 3,
                                                 "trainer": {"name": "dp-sgd", "max_grad_norm": 1.0,
                                                             "noise_multiplier": 0.5}},
                      server={"cohort_size": 2, "observers": [SPY]})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    seen = _spy_on(eng, "per_example_loss")
    eng.run()
    rec = eng.observers[0].rounds[0]
    truth = _truth_batches(rec, rec["cohort"])
    assert truth and len(truth) == len(seen) and all(torch.equal(a, b) for a, b in zip(truth, seen))
    assert all(len(rec["steps"][c]) == 3 for c in rec["cohort"])  # K steps each, empty Poisson batches included
    ctx = eng.context(1, rec["cohort"])
    for c in rec["cohort"]:
        n = len(eng.task.client_data(c))
        rebuilt = batch_schedule(n, 4, 1, 3, ctx.generator(c, "batches"))
        used = rec["steps"][c]
        assert not all(r.numel() == u.numel() and torch.equal(r, u) for r, u in zip(rebuilt, used))


def test_group_mode_rows_are_groups_and_resolve_to_their_members(tmp_path):
    cfg = tiny_config(run={"rounds": 1}, data={"num_clients": 6},
                      server={"cohort_size": 6, "group_size": 2, "aggregator": "median", "observers": [SPY]})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    eng.run()
    rec = eng.observers[0].rounds[0]
    ids = rec["update_ids"]
    assert len(ids) == 3 and all(isinstance(u, GroupId) and not isinstance(u, int) for u in ids)
    members = [c for u in ids for c in u.members]
    assert sorted(members) == sorted(rec["cohort"])  # every client in exactly one group
    assert all(rec["owners"][u] == list(u.members) for u in ids)
    with pytest.raises((TypeError, IndexError)):  # a group id is no client id: it cannot pick a client's data
        eng.task.client_data(ids[0])
    with pytest.raises(TypeError):
        rec["truth"].of("0")


def test_selected_rows_follow_clients_into_their_groups():
    g0, g1 = GroupId(0, (3, 5)), GroupId(1, (0, 2))
    assert chosen_rows([g0, g1], [0], 1) == [g1]  # client 0 sits in group 1, not in "group 0"
    assert chosen_rows([g0, g1], [], 1) == [g0]
    assert chosen_rows([4, 0, 2], [0, 2], 5) == [0, 2]


def test_inversion_observer_scores_a_group_against_its_members_not_client_with_the_same_index(monkeypatch):
    """The row of group 0 (members 1 and 2) must be scored against clients 1 and 2, never client 0."""
    from attacks.inversion.observer import GradientInversionObserver

    class ImageTask:
        image_inputs, num_classes = True, 2

        def __init__(self) -> None:
            self.train = TensorData({"pixels": torch.zeros(1, 1, 4, 4), "labels": torch.zeros(1, dtype=torch.long)}, 2)

        def build_model(self) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))

    def shard(value: float, k: int) -> TensorData:
        px = torch.full((k, 1, 4, 4), value)
        px[:, 0, 0, 0] = torch.arange(k) / 10.0
        return TensorData({"pixels": px, "labels": torch.ones(k, dtype=torch.long)}, 2)

    task = ImageTask()
    spec = ParamSpec.from_module(task.build_model())
    truth = GroundTruth()
    truth.start(1)
    for c, v in ((0, 0.0), (1, 0.5), (2, 0.9)):
        truth.record(c, shard(v, 3), [torch.tensor([1])])
    target = truth.clients[2].batch()["pixels"][:1].clone()  # an example of member 2
    monkeypatch.setattr(GradientInversionObserver, "_attack",
                        lambda self, *a, **k: (target.clone(), torch.tensor([1])))
    g = GroupId(0, (1, 2))
    view = ServerView(1, [], torch.zeros(1, spec.numel), [g], torch.ones(1), torch.zeros(spec.numel),
                      torch.zeros(spec.numel), torch.zeros(spec.numel), spec, task)
    ctx = RoundContext(1, 0, spec, torch.zeros(spec.numel), [0, 1, 2], 3, None, 3.0)
    obs = GradientInversionObserver(optimizer="sgd", save_images=False)
    out = obs(view, ctx, truth=truth)
    assert out["dlg_clients"] == 1 and out["dlg_psnr"] == float("inf") and out["dlg_label_acc"] == 1.0
    # without a record the observer says so and scores nothing (it never rebuilds one)
    assert obs(view, ctx, truth=None)["dlg_status"].startswith("no ground truth")


def test_the_truth_never_leaves_through_the_update_or_the_record(tmp_path):
    eng = Engine(tiny_config(run={"rounds": 1}, server={"observers": [SPY]}), tmp_path / "r", progress=False)
    ctx = eng.context(1, [0])
    eng.truth.start(1)
    u = eng.client_round.run(0, ctx)
    assert 0 in eng.truth.clients and not hasattr(u, "used_indices")
    assert set(u.metrics) <= {"train_loss", "steps", "examples_seen"}
    no_eval = Engine(tiny_config(run={"rounds": 1}), tmp_path / "s", progress=False)
    assert no_eval.truth is None  # nothing recorded when no plug-in evaluates against it


@pytest.mark.parametrize("trainer", ["sgd", "momentum"])
def test_every_local_trainer_reports_each_step_in_order(trainer):
    """SGD and the momentum trainer report the indices of each step, in order (K steps)."""
    from defenses.robust.momentum import MomentumTrainer
    from secfed.training import SGDTrainer

    class LinearTask:
        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])

    data = TensorData({"x": torch.randn(10, 3), "labels": torch.randint(0, 2, (10,))}, 2)
    model = torch.nn.Linear(3, 2)
    tr = SGDTrainer(local_steps=4, batch_size=3) if trainer == "sgd" else MomentumTrainer(local_steps=4, batch_size=3)
    used: list[torch.Tensor] = []
    m = tr.train(model, LinearTask(), data, torch.Generator().manual_seed(7), used=used)
    assert m["steps"] == len(used) == 4 and all(len(u) == 3 for u in used)
    expected = batch_schedule(10, 3, 1, 4, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(used, expected))
