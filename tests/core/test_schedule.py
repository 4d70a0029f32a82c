"""The jagged cosine schedule (RELORA_SPEC.md section 5)."""

import math

import pytest
import torch
from torch import nn

import relora


def reference_lr(t, total, warmup, restarts, rewarm, min_ratio):
    """The spec's formula, written independently: piecewise, scanning all restarts."""
    def env(u):
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (u - warmup) / (total - warmup)))

    if t < warmup:
        return t / warmup
    for tk in restarts:
        if tk <= t < tk + rewarm:
            return env(tk + rewarm) * (t - tk) / rewarm
    return env(t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_formula_at_every_step_with_three_restarts(seed):
    rng = torch.Generator().manual_seed(seed)
    total = int(torch.randint(300, 600, (1,), generator=rng))
    warmup = int(torch.randint(5, 40, (1,), generator=rng))
    every = (total - 100) // 4
    restarts = [100 + every * k for k in range(1, 4)]
    rewarm = int(torch.randint(3, 20, (1,), generator=rng))
    min_ratio = float(torch.rand(1, generator=rng)) * 0.3
    for t in range(total):
        got = relora.jagged_cosine(t, total_steps=total, warmup_steps=warmup, restart_steps=restarts,
                                   restart_warmup_steps=rewarm, min_ratio=min_ratio)
        assert got == pytest.approx(reference_lr(t, total, warmup, restarts, rewarm, min_ratio), abs=1e-12), t


def test_lr_is_exactly_zero_at_each_restart_and_only_there_after_warmup():
    restarts = [200, 300, 400]
    lrs = [relora.jagged_cosine(t, total_steps=500, warmup_steps=50, restart_steps=restarts, restart_warmup_steps=10)
           for t in range(500)]
    assert [t for t in range(1, 500) if lrs[t] == 0.0] == restarts
    assert lrs[0] == 0.0
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # decays to min_ratio
    assert max(lrs) == pytest.approx(1.0)


def test_without_restarts_it_is_linear_warmup_cosine():
    lrs = [relora.jagged_cosine(t, total_steps=100, warmup_steps=10, min_ratio=0.0) for t in range(100)]
    assert lrs[5] == 0.5 and lrs[10] == 1.0
    assert lrs[55] == pytest.approx(0.5)


def test_scheduler_restarts_coincide_with_controller_restarts():
    """Run the real loop: the LR used at a step is 0 exactly at the steps the controller restarted."""
    total, warm = 120, 30
    cfg = relora.ReLoRAConfig(r=2, reset_every=25, restart_warmup_steps=5, warm_start_steps=warm)
    model = relora.wrap(nn.Sequential(nn.Linear(8, 8)), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = relora.ReLoRA(model, opt, cfg)
    sched = relora.jagged_cosine_scheduler(opt, total_steps=total, warmup_steps=10,
                                           restart_steps=controller.restart_steps(total),
                                           restart_warmup_steps=cfg.restart_warmup_steps)
    restarted_at, zero_lr_at = [], []
    for step in range(total):
        if opt.param_groups[0]["lr"] == 0.0 and step > 0:
            zero_lr_at.append(step)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if controller.step(step + 1).restarted:
            restarted_at.append(step + 1)
    assert restarted_at == [55, 80, 105] == controller.restart_steps(total)
    assert zero_lr_at == restarted_at


def test_scheduler_built_mid_run_continues_the_same_envelope():
    kw = dict(total_steps=200, warmup_steps=20, restart_steps=[100, 150], restart_warmup_steps=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = relora.jagged_cosine_scheduler(opt, start_step=60, **kw)
    for t in range(60, 200):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * relora.jagged_cosine(t, **kw)), t
        opt.step()
        sched.step()


def test_a_restart_inside_the_initial_warmup_also_starts_from_zero_lr():
    """--no-warm-start with reset_every < warmup_steps: restarts at 4 and 8 fall in a 10-step warm-up."""
    total, warmup, rewarm, restarts = 40, 10, 2, [4, 8, 12, 16]

    def plain(u):  # the schedule without restarts, written independently
        if u < warmup:
            return u / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (u - warmup) / (total - warmup)))

    lrs = [relora.jagged_cosine(t, total_steps=total, warmup_steps=warmup, restart_steps=restarts,
                                restart_warmup_steps=rewarm) for t in range(total)]
    assert [t for t in range(1, total) if lrs[t] == 0.0] == restarts
    for t in range(total):
        tk = max((r for r in restarts if r <= t < r + rewarm), default=None)
        expected = plain(t) if tk is None else plain(tk + rewarm) * (t - tk) / rewarm
        assert lrs[t] == pytest.approx(expected, abs=1e-12), t
    assert lrs[5] == pytest.approx(0.3)  # half-way back to the warm-up line's 0.6 at step 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peak_change_steps_the_peak_and_keeps_the_envelope(seed):
    """full-ws-lr's schedule: lr up to step s, then factor * lr on the same cosine envelope (spec formula)."""
    gen = torch.Generator().manual_seed(seed)
    total = int(torch.randint(60, 300, (1,), generator=gen))
    warmup = int(torch.randint(1, total // 4, (1,), generator=gen))
    change_at = int(torch.randint(1, total, (1,), generator=gen))
    factor = float(torch.empty(1).uniform_(0.3, 5.0, generator=gen))
    start = int(torch.randint(0, change_at + 1, (1,), generator=gen))  # also when built mid-run, before s
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = relora.jagged_cosine_scheduler(opt, total_steps=total, warmup_steps=warmup, min_ratio=0.1,
                                           start_step=start, peak_change=(change_at, factor))
    for t in range(start, total):
        peak = 1e-3 * (factor if t >= change_at else 1.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(peak * reference_lr(t, total, warmup, [], 0, 0.1)), t
        opt.step()
        sched.step()
