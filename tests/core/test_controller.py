"""The controller: when merges, resets and restarts happen; its state (spec sections 3-4, 7)."""

import copy

import pytest
import torch
from torch import nn

import relora


def setup(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = relora.ReLoRAConfig(**{"r": 2, "restart_warmup_steps": 0, **kw})
    model = relora.wrap(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, relora.ReLoRA(model, opt, cfg)


def train(model, opt, controller, steps, start=0, seed=0):
    events = []
    for step in range(start, start + steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed * 1000 + step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        events.append(controller.step(step + 1))
    return events


def test_relora_merges_and_restarts_every_reset_every_after_warm_start():
    model, opt, ctl = setup(reset_every=5, warm_start_steps=3)
    events = train(model, opt, ctl, 20)
    assert [e.step for e in events if e.merged] == [8, 13, 18] == ctl.merge_steps(21)
    assert [e.step for e in events if e.restarted] == [8, 13, 18]
    assert ctl.merges == ctl.restarts == 3
    assert all(e.pruned_fraction > 0.9 for e in events if e.restarted)


def test_online_relora_merges_often_but_resets_only_every_reset_every():
    model, opt, ctl = setup(reset_every=6, merge_every=2)
    events = train(model, opt, ctl, 18)
    assert [e.step for e in events if e.merged] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [e.step for e in events if e.restarted] == [6, 12, 18]


def test_a_merge_that_is_not_a_reset_leaves_optimizer_state_alone():
    model, opt, ctl = setup(reset_every=6, merge_every=2)
    train(model, opt, ctl, 3)
    before = [opt.state[p]["exp_avg_sq"].clone() for p in relora.adapter_parameters(model)]
    event = ctl.step(4)
    assert event.merged and not event.restarted
    after = [opt.state[p]["exp_avg_sq"] for p in relora.adapter_parameters(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_no_restarts_means_no_merges():
    model, opt, ctl = setup(reset_every=None)
    assert not any(e.merged for e in train(model, opt, ctl, 12))
    assert ctl.restart_steps(100) == []


def test_state_dict_round_trip_and_exact_continuation():
    model, opt, ctl = setup(reset_every=4)
    train(model, opt, ctl, 10)
    state = ctl.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    train(model, opt, ctl, 10, start=10)
    uninterrupted = model.state_dict()

    model2, opt2, ctl2 = setup(reset_every=4, seed=1)  # different init, then restored
    model2.load_state_dict(weights)
    opt2.load_state_dict(opt_state)
    ctl2.load_state_dict(state)
    assert (ctl2.merges, ctl2.restarts, ctl2.last_pruned_fraction) == (2, 2, state["last_pruned_fraction"])
    train(model2, opt2, ctl2, 10, start=10)
    assert ctl2.state_dict() == ctl.state_dict()
    assert all(torch.equal(uninterrupted[k], model2.state_dict()[k]) for k in uninterrupted)


def test_loading_state_from_another_config_fails():
    _, _, ctl = setup(reset_every=4)
    _, _, other = setup(reset_every=8)
    with pytest.raises(ValueError, match="reset_every"):
        other.load_state_dict(ctl.state_dict())


def test_nothing_happens_at_or_after_total_steps():
    torch.manual_seed(0)
    cfg = relora.ReLoRAConfig(r=2, reset_every=5, restart_warmup_steps=0)
    model = relora.wrap(nn.Sequential(nn.Linear(16, 16)), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = relora.ReLoRA(model, opt, cfg, total_steps=15)
    assert ctl.restart_steps() == [5, 10]
    assert [s for s in range(1, 21) if ctl.step(s).merged] == [5, 10]
