"""Golden vectors for the poisoning attacks, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.poisoning import (ALIE, IPM, Adaptive, Backdoor, GaussianNoise, LabelFlip, Mimic, MinMax, MinSum,
                               ModelReplacement, SignFlip)
from attacks.poisoning.data import insert_tokens, stamp_pixels
from attacks.poisoning.model import alie_z
from defenses.robust import CoordinateMedian
from secfed.data import TensorData
from secfed.interfaces import ClientUpdate, RoundContext
from secfed.needs import Need
from secfed.spec import ParamSpec


def ctx(n=4, rnd=1):
    spec = ParamSpec.from_module(torch.nn.Linear(1, 1))
    return RoundContext(round=rnd, seed=0, spec=spec, global_weights=torch.zeros(2), cohort=list(range(n)),
                        num_clients=n, sample_rate=None, expected_cohort=float(n))


def ups(rows, start=0):
    return [ClientUpdate(start + i, torch.tensor(r, dtype=torch.float32), 10) for i, r in enumerate(rows)]


def test_malicious_selection():
    assert LabelFlip(ids=[3, 1]).malicious(10, 0) == {1, 3}
    bad = SignFlip(fraction=0.2).malicious(25, seed=7)
    assert len(bad) == 5 and bad == SignFlip(fraction=0.2).malicious(25, seed=7) and all(0 <= i < 25 for i in bad)
    with pytest.raises(ValueError):
        SignFlip(ids=[30]).malicious(10, 0)


def test_alie_z_from_the_paper_formula():
    # n=25, f=5: s = floor(13.5) - 5 = 8; Phi^-1(17/25 = 0.68) = 0.46770
    assert alie_z(25, 5) == pytest.approx(0.467699, abs=1e-5)
    # n=50, f=24 (Baruch et al.'s example): s = 26 - 24 = 2; Phi^-1(48/50) = 1.75069
    assert alie_z(50, 24) == pytest.approx(1.750686, abs=1e-5)


def test_alie_vector():
    # honest [0, 4] and [2, 0]: mu = [1, 2], sigma (ddof 1) = [sqrt2, 2*sqrt2]; z given = 1 -> mu - sigma
    bad = ALIE(z=1.0).poison_updates(ups([[9, 9]], 10), ups([[0, 4], [2, 0]]), ctx(3))
    s2 = math.sqrt(2)
    assert torch.allclose(bad[0].delta, torch.tensor([1 - s2, 2 - 2 * s2]))
    assert bad[0].client_id == 10
    # paper z for n = 3 clients, f = 1: s = floor(2.5) - 1 = 1 -> Phi^-1(2/3)
    c = ctx(3)
    ALIE().poison_updates(ups([[9, 9]], 10), ups([[0, 4], [2, 0]]), c)
    assert c.metrics["alie_z"] == pytest.approx(0.430727, abs=1e-5)
    # not omniscient: statistics of its own (honestly trained) updates
    own = ALIE(z=1.0, omniscient=False)
    assert own.needs == Need.NONE and ALIE(z=1.0).needs == Need.HONEST_ROWS  # declared (secfed.needs)
    bad = own.poison_updates(ups([[0, 4], [2, 0]], 10), [], ctx(5))
    assert torch.allclose(bad[1].delta, torch.tensor([1 - s2, 2 - 2 * s2]))


def test_ipm_sign_flip_scaling_mimic():
    honest = ups([[2, 4], [4, 8]])
    assert torch.allclose(IPM(epsilon=0.5).poison_updates(ups([[0, 0]], 9), honest, ctx())[0].delta, torch.tensor([-1.5, -3.0]))
    assert torch.equal(SignFlip().poison_updates(ups([[1, -2]], 9), [], ctx())[0].delta, torch.tensor([-1.0, 2.0]))
    mr = ModelReplacement(scale=None, backdoor=False)
    assert torch.equal(mr.poison_updates(ups([[1, -2]], 9), [], ctx(n=10))[0].delta, torch.tensor([10.0, -20.0]))
    assert torch.equal(ModelReplacement(server_lr=2.0).poison_updates(ups([[1, 1]]), [], ctx(n=10))[0].delta,
                       torch.tensor([5.0, 5.0]))
    m = Mimic(target=1).poison_updates(ups([[0, 0], [0, 0]], 9), ups([[1, 1], [2, 2], [3, 3]]), ctx())
    assert all(torch.equal(u.delta, torch.tensor([2.0, 2.0])) for u in m) and [u.client_id for u in m] == [9, 10]
    # pca: the update farthest along the top principal direction: 100 on the x axis
    m = Mimic(target="pca").poison_updates(ups([[0, 0]], 9), ups([[0, 0], [1, 0], [100, 0], [2, 1]]), ctx())
    assert torch.equal(m[0].delta, torch.tensor([100.0, 0.0]))


def test_gaussian_is_reproducible_and_has_the_right_moments():
    c = ctx()
    a = GaussianNoise(mean=1.0, std=2.0).poison_updates(ups([[0.0] * 20000], 5), [], c)[0].delta
    b = GaussianNoise(mean=1.0, std=2.0).poison_updates(ups([[0.0] * 20000], 5), [], c)[0].delta
    assert torch.equal(a, b)
    assert float(a.mean()) == pytest.approx(1.0, abs=0.05) and float(a.std()) == pytest.approx(2.0, abs=0.05)


def test_min_max_and_min_sum_closed_form():
    # honest [0,0] and [2,0], p = unit = [-1, 0]. Min-Sum: A = 1 + 1 = 2, T = max_i sum_j d_ij = 4, h = 2, c = 1
    # -> gamma = sqrt((4 - 2) / 2) = 1 -> [0, 0]. Min-Max: a = [1, 1], b = [-1, 1], T = 4:
    # gamma_i = -b_i + sqrt(b_i^2 + 3) = [3, 1] -> 1 -> [0, 0]
    honest = ups([[0, 0], [2, 0]])
    for cls in (MinMax, MinSum):
        c = ctx()
        v = cls(perturbation="unit").poison_updates(ups([[5, 5]], 9), honest, c)[0].delta
        assert torch.allclose(v, torch.tensor([0.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("kind", ["unit", "std", "sign"])
def test_min_max_min_sum_constraints_are_tight_on_random_updates(kind):
    g = torch.Generator().manual_seed(1)
    G = torch.randn(8, 30, generator=g) + 1.0
    honest = [ClientUpdate(i, r, 1) for i, r in enumerate(G)]
    D = torch.cdist(G.double(), G.double()) ** 2
    v = MinMax(perturbation=kind).poison_updates(ups([[0.0] * 30], 50), honest, ctx(9))[0].delta.double()
    worst = float(((G.double() - v) ** 2).sum(1).max())
    assert worst == pytest.approx(float(D.max()), rel=1e-4)
    v = MinSum(perturbation=kind).poison_updates(ups([[0.0] * 30], 50), honest, ctx(9))[0].delta.double()
    total = float(((G.double() - v) ** 2).sum())
    assert total == pytest.approx(float(D.sum(1).max()), rel=1e-4)


def test_adaptive_picks_the_most_damaging_candidate():
    honest = ups([[1, 0], [3, 0], [2, 1]])
    c = ctx(5)
    # against a plain mean the damage grows with gamma: the largest gamma of the grid wins
    bad = Adaptive(aggregator="mean", directions=["unit"], gammas=[0.0, 1.0, 2.0]).poison_updates(ups([[0, 0], [0, 0]], 9), honest, c)
    mu = torch.tensor([2.0, 1 / 3])
    assert torch.allclose(bad[0].delta, mu - 2.0 * mu / mu.norm())
    assert c.metrics["adaptive_gamma"] == 2.0
    # against the median its objective is at least that of every fixed candidate
    adv = Adaptive(aggregator={"name": "median"}, directions=["std", "unit"])
    c = ctx(5)
    bad = adv.poison_updates(ups([[0, 0], [0, 0]], 9), honest, c)
    X = torch.stack([u.delta for u in honest] + [bad[0].delta] * 2)
    best = float((CoordinateMedian()(X) - mu).norm())
    ipm = torch.stack([u.delta for u in honest] + [-0.1 * mu] * 2)
    assert best >= float((CoordinateMedian()(ipm) - mu).norm()) - 1e-6


def test_label_flip():
    d = TensorData({"x": torch.zeros(4, 1), "labels": torch.tensor([0, 1, 2, 2])}, 3)
    assert torch.equal(LabelFlip().poison_data(0, d).labels, torch.tensor([2, 1, 0, 0]))
    assert torch.equal(LabelFlip(source=2, target=0).poison_data(0, d).labels, torch.tensor([0, 1, 0, 0]))
    assert torch.equal(d.labels, torch.tensor([0, 1, 2, 2]))  # the client's data itself is not modified


def test_pixel_trigger_and_backdoor_data():
    px = torch.zeros(2, 1, 4, 4)
    out = stamp_pixels(px, 2)
    assert out[0, 0, 2:, 2:].eq(1).all() and out[0, 0, :2].eq(0).all() and out[0, 0, :, :2].eq(0).all()
    d = TensorData({"pixels": torch.zeros(10, 1, 8, 8), "labels": torch.arange(10) % 3}, 3)
    p = Backdoor(target=1, poison_fraction=0.5, trigger_size=2).poison_data(4, d)
    hit = p.tensors["pixels"][:, 0, -1, -1] == 1
    assert int(hit.sum()) == 5 and p.labels[hit].eq(1).all()
    assert torch.equal(p.labels[~hit], d.labels[~hit])


def test_token_trigger_insertion():
    ids = torch.tensor([[101, 5, 6, 102, 0, 0], [101, 7, 8, 9, 10, 102]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    new_ids, new_mask = insert_tokens(ids, mask, torch.tensor([42, 43]))
    assert new_ids.tolist() == [[101, 42, 43, 5, 6, 102], [101, 42, 43, 7, 8, 9]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_backdoor_asr_evaluation():
    class Task:
        test = TensorData({"pixels": torch.zeros(6, 1, 4, 4), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}, 3)

        @staticmethod
        def forward(model, batch):
            return model(batch["pixels"])

    class Detector(torch.nn.Module):  # predicts class 2 iff the trigger corner is lit
        def forward(self, x):
            lit = x[:, 0, -1, -1]
            return torch.stack([1 - lit, torch.zeros_like(lit), 2 * lit], 1)

    assert Backdoor(target=2, trigger_size=1).evaluate(Detector(), Task) == {"backdoor_asr": 1.0}
    assert Backdoor(target=1, trigger_size=1).evaluate(Detector(), Task) == {"backdoor_asr": 0.0}
