"""Image gradient inversion: metrics, iDLG labels, DLG/IG convergence on tiny cases, observer."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn import functional as F

from attacks.inversion.dlg import (dlg, dlg_init, dp_defense, gaussian_defense, idlg_label, inverting_gradients,
                                   model_gradients, total_variation, unrolled_update)
from attacks.inversion.metrics import mse, psnr, ssim
from attacks.inversion.observer import GradientInversionObserver
from secfed.data import load_digits
from secfed.models import LeNetSigmoid


def test_psnr_mse_golden():
    x = torch.zeros(1, 4, 4)
    y = torch.full((1, 4, 4), 0.1)  # MSE 0.01 -> 20 dB
    assert mse(x, y) == pytest.approx(0.01)
    assert psnr(x, y) == pytest.approx(20.0)
    assert psnr(x, x) == math.inf


def test_ssim_golden_constant_images_and_identity():
    # constant images a, b: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    assert ssim(torch.full((1, 16, 16), a), torch.full((1, 16, 16), b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    x = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)) < 0.8


def test_total_variation_golden():
    x = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert float(total_variation(x)) == pytest.approx(0.0 + 1.0)  # vertical diffs 0, horizontal 1


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 9), st.integers(0, 50))
def test_idlg_label_always_right_for_one_example(label, idx):
    model = LeNetSigmoid(10, 8, 1)
    x = load_digits(8).tensors["pixels"][idx : idx + 1]
    g = model_gradients(model, x, torch.tensor([label]))
    assert idlg_label(g[-2]) == label


def test_dlg_recovers_a_digit_and_noise_defeats_it():
    torch.manual_seed(0)
    model = dlg_init(LeNetSigmoid(10, 8, 1), seed=0)
    x, y = load_digits(8).tensors["pixels"][3:4], torch.tensor([3])
    g = model_gradients(model, x, y)
    r = dlg(model, g, x.shape, 10, label=torch.tensor([idlg_label(g[-2])]), iterations=40)
    assert psnr(r.x, x) > 30
    gn = gaussian_defense(g, 0.1, torch.Generator().manual_seed(0))
    rn = dlg(model, gn, x.shape, 10, label=torch.tensor([idlg_label(gn[-2])]), iterations=40)
    assert psnr(rn.x, x) < psnr(r.x, x) - 10


def test_dp_defense_clips_then_adds_noise():
    g = [torch.full((10,), 3.0), torch.full((6,), 4.0)]
    out = dp_defense(g, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert float(torch.sqrt(sum((o**2).sum() for o in out))) == pytest.approx(1.0, rel=1e-5)


def test_unrolled_update_equals_sgd():
    torch.manual_seed(0)
    model = LeNetSigmoid(10, 8, 1)
    x, y = load_digits(8).tensors["pixels"][:2], torch.tensor([0, 1])
    upd = unrolled_update(model, x, y, local_steps=3, lr=0.1, batch_size=1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[k % 2 : k % 2 + 1]), y[k % 2 : k % 2 + 1]).backward()
        opt.step()
    for u, (n, p) in zip(upd, model.named_parameters()):
        assert torch.allclose(u, p.detach() - w0[n], atol=1e-6)


def test_inverting_gradients_improves_match():
    torch.manual_seed(1)
    model = LeNetSigmoid(10, 8, 1)
    x, y = load_digits(8).tensors["pixels"][5:6], torch.tensor([5])
    g = model_gradients(model, x, y)
    r = inverting_gradients(model, g, x.shape, y, iterations=60, lr=0.1)
    assert r.history[-1] < r.history[0]
    assert float(r.x.min()) >= 0 and float(r.x.max()) <= 1


def test_observer_reports_no_update_under_secure_sum():
    from secfed.interfaces import RoundContext, ServerView
    from secfed.spec import ParamSpec

    spec = ParamSpec(("w",), ((2,),))
    view = ServerView(1, [], None, None, None, torch.zeros(2), torch.zeros(2), torch.zeros(2), spec, None)
    ctx = RoundContext(1, 0, spec, torch.zeros(2), [0, 1], 2, None, 2.0)
    assert GradientInversionObserver()(view, ctx) == {"dlg_psnr": None, "dlg_status": "no per-client update"}


def test_observer_in_engine_writes_png(tmp_path):
    from conftest import digits_config
    from secfed.engine import Engine, read_rounds

    cfg = digits_config(model={"name": "lenet"}, run={"rounds": 1},
                        client={"optimizer": "sgd", "lr": 0.1, "batch_size": 1, "local_steps": 1},
                        server={"cohort_size": 2, "observers": [{"name": "dlg", "method": "ig", "iterations": 40}]})
    Engine(cfg, tmp_path / "run", progress=False).run()
    rec = read_rounds(tmp_path / "run")[0]
    assert rec["dlg_status"] == "ok" and rec["dlg_label_acc"] == 1.0 and rec["dlg_psnr"] > 8
    assert list((tmp_path / "run" / "attacks").glob("ig_round1_client*.png"))
