"""DP-SGD through Opacus on the LoRA model: per-sample gradients, clipping, noise, clean unwrap."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.privacy.dpsgd import DPSGDTrainer, client_plan, group_noise_scales, resolve_noise_multiplier
from secfed.engine import Engine, read_rounds
from secfed.errors import ConfigError
from secfed.spec import ParamSpec
from secfed.task import Task
from secfed.training import SGDTrainer

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny():
    task = Task(tiny_config())
    return task, task.build_model()


def _per_example_grads(model, task, batch, params):
    rows = []
    for i in range(len(batch["labels"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(task.forward(model, one), one["labels"]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def _check_grad_samples(task, model):
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    # LoRA B starts at zero, which would make A's gradient zero: perturb so every gradient is non-trivial
    g = torch.Generator().manual_seed(0)  # the test's input: seeded
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    data = task.client_data(0)
    mask = data.tensors["attention_mask"].clone()
    batch = data.batch(torch.arange(6))
    batch["attention_mask"] = mask[:6]
    batch["attention_mask"][1, 5:] = 0  # rows of different lengths, as in real batches
    expected = _per_example_grads(model, task, batch, params)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        loss = nn.functional.cross_entropy(task.forward(gsm, batch), batch["labels"], reduction="sum")
        loss.backward()
        got = torch.cat([p.grad_sample.reshape(6, -1) for p in params], dim=1)
    finally:
        gsm._close()
        for p in params:
            p.grad = None
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_opacus_per_sample_gradients_match_per_example_backward_tiny_bert_lora(tiny):
    task, model = tiny
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)
    _check_grad_samples(task, model)
    spec.assign(model, w0)


@pytest.mark.slow
def test_opacus_per_sample_gradients_match_on_minilm_lora():
    cfg = tiny_config(model={"name": "minilm", "lora_r": 8})
    task = Task(cfg)
    _check_grad_samples(task, task.build_model())


def _train(trainer, task, model, data, seed=0):
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)
    torch.manual_seed(0)
    trainer.train(model, task, data, torch.Generator().manual_seed(seed))
    delta = spec.flatten(model) - w0
    spec.assign(model, w0)
    return delta


def test_dpsgd_at_z0_and_huge_clip_is_exactly_plain_sgd(tiny):
    task, model = tiny
    data = task.client_data(1).subset(torch.arange(24))
    # q = 1 (batch >= n): every step sees the whole shard in both trainers
    plain = SGDTrainer(local_steps=3, batch_size=64, lr=0.05, optimizer="sgd")
    dp = DPSGDTrainer(max_grad_norm=1e9, noise_multiplier=0.0, local_steps=3, batch_size=64, lr=0.05, optimizer="sgd")
    a, b = _train(plain, task, model, data), _train(dp, task, model, data)
    assert a.norm() > 0
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    ghost = DPSGDTrainer(max_grad_norm=1e9, noise_multiplier=0.0, ghost_clipping=True, local_steps=3, batch_size=64,
                         lr=0.05, optimizer="sgd")
    torch.testing.assert_close(_train(ghost, task, model, data), a, rtol=1e-4, atol=1e-7)


def test_dpsgd_keeps_each_clients_adam_state_like_the_plain_trainer(tiny):
    """optimizer_state = "keep": at z = 0 and a huge clip, two rounds of DP-SGD (q = 1) with each client's Adam
    state carried over equal two rounds of the plain trainer doing the same; "round" differs from both."""
    task, model = tiny
    data = task.client_data(1).subset(torch.arange(24))
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)

    def two_rounds(trainer):
        spec.assign(model, w0)
        for cid in (0, 1, 0):  # client 1 in between: its state must not leak into client 0's
            torch.manual_seed(0)
            trainer.train(model, task, data, torch.Generator().manual_seed(cid), client_id=cid)
        out = spec.flatten(model) - w0
        spec.assign(model, w0)
        return out

    kw = dict(local_steps=2, batch_size=64, lr=0.01, optimizer="adam")
    plain = two_rounds(SGDTrainer(**kw, optimizer_state="keep"))
    dp = two_rounds(DPSGDTrainer(max_grad_norm=1e9, noise_multiplier=0.0, **kw, optimizer_state="keep"))
    torch.testing.assert_close(dp, plain, rtol=1e-4, atol=1e-7)
    fresh = two_rounds(DPSGDTrainer(max_grad_norm=1e9, noise_multiplier=0.0, **kw))
    assert not torch.allclose(fresh, plain, rtol=1e-4, atol=1e-7)


def test_dpsgd_clips_each_example(tiny):
    task, model = tiny
    data = task.client_data(2).subset(torch.arange(8))
    params = [p for p in model.parameters() if p.requires_grad]
    g = _per_example_grads(model, task, data.batch(torch.arange(8)), params)
    c = 0.25 * float(g.norm(dim=1).min())  # every example gets clipped
    clipped = g * (c / g.norm(dim=1, keepdim=True)).clamp(max=1.0)
    lr = 0.1
    expected = -lr * clipped.sum(0) / 8  # one SGD step, mean over the expected batch (q = 1, n = 8)
    for ghost in (False, True):
        tr = DPSGDTrainer(max_grad_norm=c, noise_multiplier=0.0, ghost_clipping=ghost, local_steps=1, batch_size=8,
                          lr=lr, optimizer="sgd")
        torch.testing.assert_close(_train(tr, task, model, data), expected, rtol=1e-3, atol=1e-7)


def test_group_clipping_clips_each_group_of_each_example(tiny):
    """Hand-built expectation: per example, the head's gradient clipped to s_h C and the rest to s_r C."""
    task, model = tiny
    data = task.client_data(2).subset(torch.arange(8))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g = _per_example_grads(model, task, data.batch(torch.arange(8)), params)
    head = torch.cat([torch.full((p.numel(),), n.startswith("head."), dtype=torch.bool) for n, p in named])
    assert head.any() and (~head).any()
    c, s_h, s_r = 0.5 * float(g.norm(dim=1).min()), 0.6, 0.8
    expected_rows = torch.zeros_like(g)
    for mask, share in ((head, s_h), (~head, s_r)):
        part = g[:, mask]
        expected_rows[:, mask] = part * (share * c / part.norm(dim=1, keepdim=True)).clamp(max=1.0)
    assert (expected_rows.norm(dim=1) <= c * 1.0001).all()
    lr = 0.1
    expected = -lr * expected_rows.sum(0) / 8
    tr = DPSGDTrainer(max_grad_norm=c, noise_multiplier=0.0, local_steps=1, batch_size=8, lr=lr, optimizer="sgd",
                      clip_groups={"head.*": s_h, "*": s_r})
    got = _train(tr, task, model, data)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-7)
    flat = _train(DPSGDTrainer(max_grad_norm=c, noise_multiplier=0.0, local_steps=1, batch_size=8, lr=lr,
                               optimizer="sgd"), task, model, data)
    assert not torch.allclose(flat, got, rtol=1e-3, atol=1e-7)  # the grouping changes the step
    # one group holding everything at share 1 is flat clipping
    torch.testing.assert_close(_train(DPSGDTrainer(max_grad_norm=c, noise_multiplier=0.0, local_steps=1, batch_size=8,
                                                   lr=lr, optimizer="sgd", clip_groups={"*": 1.0}), task, model, data),
                               flat, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("groups, msg", [
    ({"head.*": 0.9, "*": 0.9}, "squared shares sum to 1.62"),
    ({"head.*": 0.0, "*": 1.0}, "clip_groups.head.*': a share"),
    ({"head.*": True}, "a share"),
    ({}, "at least one pattern"),
    ("head", "a table"),
])
def test_clip_group_refusals_at_construction(groups, msg):
    with pytest.raises(ConfigError, match="client.trainer.clip_groups") as e:
        DPSGDTrainer(clip_groups=groups)
    assert msg in str(e.value)
    with pytest.raises(ConfigError, match="ghost_clipping = false"):
        DPSGDTrainer(clip_groups={"*": 1.0}, ghost_clipping=True)


@settings(max_examples=200, deadline=None)
@given(shares=st.lists(st.floats(1e-3, 50.0), min_size=1, max_size=6), z=st.floats(0.05, 50.0),
       clip=st.floats(1e-3, 100.0))
def test_proportional_group_noise_is_the_gaussian_mechanism_with_multiplier_z(shares, z, clip):
    # whiten each group by its noise std: an example clipped to its groups' bounds has norm exactly 1 / z at most
    stds = [z * clip * s for s in group_noise_scales(shares, "proportional")]
    whitened = sum((s * clip / std) ** 2 for s, std in zip(shares, stds)) ** 0.5
    assert whitened == pytest.approx(1 / z, rel=1e-9)
    # uniform: z C everywhere, and the shares' squares sum to <= 1, so the same bound holds
    assert group_noise_scales(shares, "uniform") == [1.0] * len(shares)
    g = len(shares)  # equal shares 1/sqrt(G): proportional is uniform
    assert group_noise_scales([g ** -0.5] * g, "proportional") == pytest.approx([1.0] * g, rel=1e-12)


def test_proportional_group_noise_by_hand():
    # G = 2, shares 3 and 0.5: stds z C 3 sqrt 2 and z C 0.5 sqrt 2; whitened bound sqrt(1/2 + 1/2) / z
    assert group_noise_scales([3.0, 0.5], "proportional") == pytest.approx([4.242640687, 0.707106781])
    with pytest.raises(ValueError):
        group_noise_scales([1.0], "per-layer")


def test_proportional_group_noise_puts_each_groups_std_on_it(tiny):
    # z huge: the step is noise; SGD lr 1 over one step moves each coordinate by its noise / expected batch
    task, model = tiny
    data = task.client_data(1).subset(torch.arange(16))
    head = torch.cat([torch.full((p.numel(),), n.startswith("head."), dtype=torch.bool)
                      for n, p in model.named_parameters() if p.requires_grad])
    z, c, b = 1e4, 0.5, 16
    for shares, mode in (((3.0, 0.5), "proportional"), ((0.6, 0.8), "uniform")):
        tr = DPSGDTrainer(max_grad_norm=c, noise_multiplier=z, local_steps=1, batch_size=64, lr=1.0, optimizer="sgd",
                          noise="seeded", clip_groups={"head.*": shares[0], "*": shares[1]}, group_noise=mode)
        delta = _train(tr, task, model, data)
        scales = group_noise_scales(list(shares), mode)
        for mask, scale in ((head, scales[0]), (~head, scales[1])):
            want = z * c * scale / b
            assert delta[mask].std().item() == pytest.approx(want, rel=0.15), (mode, scale)
    # an empty Poisson batch (q n ~ 1e-5) releases noise only: the same per-group stds
    tr = DPSGDTrainer(max_grad_norm=c, noise_multiplier=1.0, local_steps=1, lr=1.0, optimizer="sgd", noise="seeded",
                      record_sample_rate=1e-6, clip_groups={"head.*": 3.0, "*": 0.5}, group_noise="proportional")
    delta = _train(tr, task, model, data)
    ratio = delta[head].std().item() / delta[~head].std().item()
    assert ratio == pytest.approx(3.0 / 0.5, rel=0.15)
    # equal shares: proportional and uniform draw the same noise (the scale s sqrt(G) = 1 to one rounding)
    eq = {"head.*": 0.5 ** 0.5, "*": 0.5 ** 0.5}
    runs = [_train(DPSGDTrainer(max_grad_norm=c, noise_multiplier=2.0, local_steps=2, batch_size=8, lr=0.1,
                                optimizer="sgd", noise="seeded", clip_groups=eq, group_noise=m), task, model, data)
            for m in ("uniform", "proportional")]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=0.0)


def test_group_noise_refusals():
    with pytest.raises(ConfigError, match="client.trainer.group_noise': one of"):
        DPSGDTrainer(clip_groups={"*": 1.0}, group_noise="per-layer")
    with pytest.raises(ConfigError, match="set client.trainer.clip_groups"):
        DPSGDTrainer(group_noise="proportional")
    with pytest.raises(ConfigError, match=r"head.\*': a share .* \(got 3.0\); a share above 1 needs .*group_noise"):
        DPSGDTrainer(clip_groups={"head.*": 3.0, "*": 0.5})
    with pytest.raises(ConfigError, match="squared shares sum to 1.1100.*group_noise"):
        DPSGDTrainer(clip_groups={"head.*": 1.0, "*": 0.1 * 11 ** 0.5})
    DPSGDTrainer(clip_groups={"head.*": 3.0, "*": 0.5}, group_noise="proportional")  # any shares: the noise follows
    with pytest.raises(ConfigError, match=r"a share of max_grad_norm in \(0, 1000\]"):
        DPSGDTrainer(clip_groups={"head.*": 0.0, "*": 0.5}, group_noise="proportional")


@pytest.mark.parametrize("groups, msg", [
    ({"head.*": 0.7}, "is in no group"),
    ({"head.*": 0.6, "nothing.*": 0.1, "*": 0.7}, "'nothing.*' matches no trainable parameter"),
])
def test_clip_group_refusals_against_the_model(tiny, groups, msg):
    task, model = tiny
    data = task.client_data(2).subset(torch.arange(8))
    tr = DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=0.0, local_steps=1, batch_size=8, clip_groups=groups)
    with pytest.raises(ConfigError, match="client.trainer.clip_groups") as e:
        _train(tr, task, model, data)
    assert msg in str(e.value)
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # unwrapped cleanly


def test_dpsgd_noise_scales_with_z(tiny):
    task, model = tiny
    data = task.client_data(3).subset(torch.arange(8))
    lr, c = 0.1, 0.5
    base = _train(DPSGDTrainer(max_grad_norm=c, noise_multiplier=0.0, local_steps=1, batch_size=8, lr=lr, optimizer="sgd"),
                  task, model, data)
    for z in (0.5, 2.0):
        tr = DPSGDTrainer(max_grad_norm=c, noise_multiplier=z, local_steps=1, batch_size=8, lr=lr, optimizer="sgd")
        diff = _train(tr, task, model, data) - base
        # one step: delta = -lr (sum of clipped grads + N(0, (zC)^2)) / 8. The noise comes from the OS (never a
        # seed), so the bounds are >= 6 standard errors (false failure < 1e-8): the sample std's relative standard
        # error is 1 / sqrt(2 d) = 0.021 at d = 1123 (0.15 = 7 SE), the mean's is std / sqrt(d).
        assert float(diff.std()) == pytest.approx(lr * z * c / 8, rel=0.15)
        assert abs(float(diff.mean())) < 6 * lr * z * c / 8 / diff.numel() ** 0.5


def test_dpsgd_leaves_no_hooks_and_frozen_weights_untouched(tiny):
    # opacus #820 (silently corrupted LoRA weights) and the engine's shared model object
    task, model = tiny
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=1.0, local_steps=2, batch_size=8, lr=0.01)
    delta = _train(tr, task, model, task.client_data(0))
    assert torch.isfinite(delta).all() and delta.norm() > 0
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._backward_hooks and not mod._forward_pre_hooks
    for n, p in model.named_parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None, n
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_client_plan():
    assert client_plan(320, 32, 1, 0) == (0.1, 10)
    assert client_plan(20, 32, 2, 0) == (1.0, 2)
    assert client_plan(100, 10, 1, 7) == (0.1, 7)
    assert client_plan(0, 10, 1, 0) == (0.0, 0)


def test_one_record_sample_rate_accounts_every_shard_at_that_rate(tmp_path):
    """client.record_sample_rate q: every organisation samples its records at q (expected batch q n_i), so the
    calibration sees one plan; with batch_size, the smallest shard's rate batch_size / n_min sets z for all."""
    from opacus.accountants.utils import get_noise_multiplier

    from secfed.training import batch_size_for

    assert client_plan(846, 512, 1, 4, 0.14) == (0.14, 4) and client_plan(6390, 512, 1, 4, 0.14) == (0.14, 4)
    assert client_plan(846, 512, 1, 4) == (512 / 846, 4)
    assert batch_size_for(6390, 512, 0.14) == 895 and batch_size_for(846, 512, None) == 512
    shards = [846, 1008, 3427, 6390]
    base = {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 4, "batch_size": 512}
    priv = {"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}}
    z_rate = resolve_noise_multiplier(tiny_config(run={"rounds": 5}, client={**base, "record_sample_rate": 0.14},
                                                  server=priv), shards)
    z_batch = resolve_noise_multiplier(tiny_config(run={"rounds": 5}, client=base, server=priv), shards)
    ref = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.14, steps=20, accountant="rdp")
    assert z_rate == pytest.approx(ref, rel=0.01) and z_rate < 0.5 * z_batch  # 0.83 against 1.91 (q = 0.605)
    # the guard and the trainer must agree on the rate, and a run charges every client at q
    with pytest.raises(ConfigError, match="record_sample_rate.*client.record_sample_rate"):  # engine-owned key
        Engine(tiny_config(client={**base, "record_sample_rate": 0.2, "trainer": {**base["trainer"],
                                                                                   "record_sample_rate": 0.3}},
                           server=priv), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="record_sample_rate"):  # the guard accounts for another rate
        Engine(tiny_config(client={**base, "record_sample_rate": 0.2},
                           server={"privacy": {**priv["privacy"], "record_sample_rate": 0.3}}), tmp_path / "y",
               progress=False)
    cfg = tiny_config(run={"rounds": 1}, client={**base, "batch_size": 16, "record_sample_rate": 0.25}, server=priv)
    eng = Engine(cfg, tmp_path / "r", progress=False)
    eng.run()
    entry = json.loads((tmp_path / "r" / "privacy_ledger.jsonl").read_text().splitlines()[0])
    assert {tuple(v) for v in entry["clients"].values()} == {(0.25, 4)}  # every client charged at q, K


def test_sample_level_guard_calibrates_and_reports(tmp_path):
    cfg = tiny_config(run={"rounds": 2}, client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2},
                      server={"privacy": {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5}})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    s = eng.run()
    assert s["rounds_completed"] == 2 and 0 < s["epsilon"] <= 4.0
    z = resolve_noise_multiplier(cfg, [len(x) for x in eng.task.shards])
    assert eng.trainer._own[None] == pytest.approx(z) and eng.privacy.z == pytest.approx(z)
    eps = [r["epsilon"] for r in read_rounds(tmp_path / "r")]
    assert eps[0] < eps[1] <= 4.0


def test_ghost_clipping_matches_per_sample_clipping_with_trainable_embeddings():
    # opacus 1.6.0's embedding norm-sampler needs contiguous inputs: the trainer makes them so
    task = Task(tiny_config(model={"name": "tiny-bert", "lora_r": 4, "train_embeddings": True}))
    model = task.build_model()
    data = task.client_data(0).subset(torch.arange(8))
    out = []
    for ghost in (False, True):
        tr = DPSGDTrainer(max_grad_norm=0.01, noise_multiplier=0.0, ghost_clipping=ghost, local_steps=1, batch_size=8,
                          lr=0.1, optimizer="sgd")
        out.append(_train(tr, task, model, data))
    assert out[0].abs().max() > 0
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-8)


def test_group_clipping_from_a_toml_config_runs_under_the_guard(tmp_path):
    """The README's spelling (quoted fnmatch keys in TOML) reaches the trainer; the guard accounts it like flat
    clipping (same z for the same plan), and a pattern that matches nothing stops the run with one line."""
    from secfed.config import load_config

    toml = tmp_path / "g.toml"
    toml.write_text('''
[run]
name = "groups"
rounds = 1
[data]
source = "synthetic-text"
num_clients = 3
test_size = 60
max_length = 16
[model]
name = "tiny-bert"
lora_r = 2
[client]
batch_size = 16
local_steps = 2
trainer = { name = "dp-sgd", max_grad_norm = 1.0, clip_groups = { "head.*" = 0.6, "*" = 0.8 } }
[server]
cohort_size = 3
privacy = { name = "dp-sgd", epsilon = 8.0, delta = 1e-5 }
''')
    cfg = load_config(toml)
    from secfed.describe import defences

    assert "per-example gradient clipping to L2 norm 1 (group-wise: head.* to 0.6, * to 0.8)" in defences(cfg)
    eng = Engine(cfg, tmp_path / "r", progress=False)
    assert eng.trainer.clip_groups == {"head.*": 0.6, "*": 0.8}
    s = eng.run()
    assert s["rounds_completed"] == 1 and 0 < s["epsilon"] <= 8.0
    flat = load_config(toml, {"client.trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}})
    assert eng.privacy.z == pytest.approx(resolve_noise_multiplier(flat, [len(x) for x in eng.task.shards]))
    bad = load_config(toml, {"client.trainer.clip_groups": {"head.*": 0.6, "lora_B*": 0.8}})  # names start "encoder."
    with pytest.raises(ConfigError, match=r"clip_groups': trainable parameter '.*' is in no group|"
                                          r"clip_groups': pattern"):
        Engine(bad, tmp_path / "b", progress=False).run()
    prop = load_config(toml, {"client.trainer.clip_groups": {"head.*": 3.0, "*": 0.5},
                              "client.trainer.group_noise": "proportional"})
    assert ("per-example gradient clipping to L2 norm 1 (group-wise: head.* to 3, * to 0.5; noise per group "
            "proportional to its bound, z C x 4.243, 0.707)") in defences(prop)
    eng = Engine(prop, tmp_path / "p", progress=False)
    s = eng.run()  # the same z as the flat guard: the guarantee does not change
    assert s["rounds_completed"] == 1 and 0 < s["epsilon"] <= 8.0
    assert eng.privacy.z == pytest.approx(resolve_noise_multiplier(flat, [len(x) for x in eng.task.shards]))


def test_per_client_calibration_meets_epsilon_for_each_plan_alone():
    """server.privacy.calibration = "per-client": each client's z_i is the smallest meeting epsilon for its own plan
    (q_i = B / n_i, K_i steps a round); the shared z is the worst plan's, so the smallest shard keeps it and a large
    shard gets Opacus's own calibration for its rate (0.83 against 1.91 on the tweets split's extremes)."""
    from opacus.accountants.utils import get_noise_multiplier

    from defenses.privacy.analysis import epsilon
    from defenses.privacy.dpsgd import noise_multipliers

    shards = [6390, 846, 3427, 1008, 846]
    base = {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 4, "batch_size": 512}
    priv = {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}
    per = tiny_config(run={"rounds": 5}, client=base, server={"privacy": {**priv, "calibration": "per-client"}})
    shared = tiny_config(run={"rounds": 5}, client=base, server={"privacy": priv})
    zs = noise_multipliers(per, shards)
    z_shared = resolve_noise_multiplier(shared, shards)
    assert noise_multipliers(shared, shards) == [z_shared] * 5
    assert zs[1] == zs[4] == pytest.approx(z_shared, rel=2e-3) and zs[0] < zs[2] < zs[3] < zs[1]
    for n, z in zip(shards, zs):  # each plan within epsilon, and 1% less noise would not be
        assert epsilon([(z, 512 / n, 20)], 1e-5, "rdp") <= 8.0 < epsilon([(0.99 * z, 512 / n, 20)], 1e-5, "rdp")
    ref = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=512 / 6390, steps=20, accountant="rdp")
    assert zs[0] == pytest.approx(ref, rel=0.01) and zs[0] < 0.5 * z_shared


def test_per_client_calibration_runs_accounts_and_resumes(tmp_path):
    """In a run: the trainer adds each client's own z_i (the guard's), the ledger records [q_i, K_i, z_i], every
    client ends within epsilon and a resumed guard reads the same epsilons back from the ledger."""
    from defenses.privacy.guard import DPSGDGuard
    from secfed.describe import guarantee

    cfg = tiny_config(run={"rounds": 2}, data={"partition": "dirichlet", "alpha": 0.5},
                      client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2},
                      server={"privacy": {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5, "calibration": "per-client"}})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    s = eng.run()
    sizes = [len(x) for x in eng.task.shards]
    assert len(set(sizes)) == 4 and s["rounds_completed"] == 2 and 0 < s["epsilon"] <= 4.0
    g = eng.privacy
    assert g.z is None and len(set(g.z_of.values())) == 4
    assert eng.trainer._own == {n: g.z_of[c] for c, n in enumerate(sizes)}
    assert max(g.z_of, key=lambda c: sizes[c]) == min(g.z_of, key=g.z_of.get)  # the largest shard, the least noise
    assert all(3.9 < e <= 4.0 for e in g._eps.values())  # each client spends its budget, none more
    entries = [json.loads(x) for x in (tmp_path / "r" / "privacy_ledger.jsonl").read_text().splitlines()]
    assert entries[0]["z"] is None
    assert {int(c): v[2] for c, v in entries[0]["clients"].items()} == g.z_of
    again = DPSGDGuard(epsilon=4.0, batch_size=16, local_steps=2, calibration="per-client")
    again.load(entries)
    assert again._eps == pytest.approx(g._eps)
    assert "each organisation's own z_i" in guarantee(cfg, g)["sentence"]


def test_per_client_calibration_refusals(tmp_path):
    base = {"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2}
    priv = {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5}
    with pytest.raises(ConfigError, match=r"server.privacy.calibration': 'per-organisation' is not one of"):
        Engine(tiny_config(client=base, server={"privacy": {**priv, "calibration": "per-organisation"}}),
               tmp_path / "a", progress=False).run()
    with pytest.raises(ConfigError, match=r"calibration': \"per-client\" calibrates each client's z from epsilon; drop "
                                          r"client.trainer.noise_multiplier"):
        Engine(tiny_config(client={**base, "trainer": {**base["trainer"], "noise_multiplier": 1.0}},
                           server={"privacy": {**priv, "calibration": "per-client"}}), tmp_path / "b",
               progress=False).run()


def test_per_client_calibration_over_flower_each_node_calibrates_its_own_z(tmp_path):
    """Over Flower the server sends no z under per-client calibration, only the flag: each node computes its z_i
    from the fingerprinted config and its shard, the same the server's guard charges; a node whose config does not
    calibrate per client refuses the flag, a per-client node refuses a shared z, and no node trains with a z below
    what its own config needs (a malicious server asking for less noise)."""
    pytest.importorskip("flwr")
    from _flower_fake import run_flower

    from secfed.flower.runtime import ClientRuntime

    priv = {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5, "calibration": "per-client"}
    cfg = tiny_config(run={"rounds": 1}, data={"partition": "dirichlet", "alpha": 0.5},
                      client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2},
                      server={"privacy": priv})
    eng, grid = run_flower(cfg, tmp_path / "f")
    sizes = [len(x) for x in eng.task.shards]
    assert eng.privacy.z is None and len(set(eng.privacy.z_of.values())) == 4
    assert grid.rt.trainer._own == {n: eng.privacy.z_of[c] for c, n in enumerate(sizes)}
    assert 3.9 < eng.privacy.epsilon() <= 4.0
    shared = tiny_config(client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                         server={"privacy": {**priv, "calibration": "shared"}})
    rt = ClientRuntime(shared, Task(shared))
    with pytest.raises(ConfigError, match="calibration: the server's guard calibrates DP-SGD per client"):
        rt.apply_dp({"dpsgd_per_client": True, "max_grad_norm": 1.0}, rt.context(1, [0, 1]))
    # a server asking for less noise than the node's own config needs is refused, per client or shared
    with pytest.raises(ConfigError, match="the server's DP-SGD z = 0.01 is below the"):
        rt.apply_dp({"dpsgd_noise_multiplier": 0.01, "max_grad_norm": 1.0}, rt.context(1, [0, 1]))
    rt.apply_dp({"dpsgd_noise_multiplier": 5.0, "max_grad_norm": 1.0}, rt.context(1, [0, 1]))  # more noise: fine
    assert rt.trainer.resolved_noise_multiplier(rt.task) == 5.0
    per = ClientRuntime(cfg, Task(cfg))
    with pytest.raises(ConfigError, match="this node calibrates its own z .*the server sent a shared z = 5"):
        per.apply_dp({"dpsgd_noise_multiplier": 5.0, "max_grad_norm": 1.0}, per.context(1, [0, 1]))
