"""Pruning the adapters' Adam moments (RELORA_SPEC.md section 4)."""

import numpy as np
import pytest
import torch
from torch import nn

import relora


def adam_with_state(shapes=((64, 32), (48, 64)), seed=0, steps=3):
    """An AdamW whose state was filled by a few steps on random gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, params


def moments(opt, p):
    return opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


def test_magnitude_keeps_exactly_the_top_entries_of_v():
    opt, params = adam_with_state()
    before = {p: [t.clone() for t in moments(opt, p)] for p in params}
    fraction = relora.prune_optimizer_state(opt, params, "magnitude", 0.99)
    zeroed = total = 0
    for p in params:
        m0, v0 = before[p]
        m, v = moments(opt, p)
        values = v0.flatten().numpy()
        keep = round(0.01 * values.size)
        survivors = set(np.argsort(values)[::-1][:keep].tolist())  # independent of torch.topk
        kept = set(torch.nonzero(v.flatten()).flatten().tolist())
        assert kept == survivors
        idx = torch.tensor(sorted(survivors))
        assert torch.equal(v.flatten()[idx], v0.flatten()[idx])
        assert torch.equal(m.flatten()[idx], m0.flatten()[idx])  # m kept where v kept ...
        assert int((m != 0).sum()) == keep  # ... and only there
        zeroed += v.numel() - keep
        total += v.numel()
    assert fraction == pytest.approx(zeroed / total)
    assert fraction > 0.98  # pruning really happened on the optimizer's tensors


def test_random_pruning_zeroes_close_to_ratio_with_one_mask():
    opt, params = adam_with_state(shapes=((200, 100),))
    g = torch.Generator().manual_seed(0)
    fraction = relora.prune_optimizer_state(opt, params, "random", 0.7, generator=g)
    m, v = moments(opt, params[0])
    n = v.numel()
    assert abs(fraction - 0.7) < 5 * (0.7 * 0.3 / n) ** 0.5  # five binomial standard deviations
    assert torch.equal(m != 0, v != 0)


def test_full_reset_zeroes_everything():
    opt, params = adam_with_state()
    assert relora.prune_optimizer_state(opt, params, "full", 1.0) == 1.0
    assert all(torch.all(t == 0) for p in params for t in moments(opt, p))


def test_none_leaves_state_untouched():
    opt, params = adam_with_state()
    before = [t.clone() for p in params for t in moments(opt, p)]
    assert relora.prune_optimizer_state(opt, params, "none", 0.99) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, [t for p in params for t in moments(opt, p)]))


def test_other_parameters_state_is_untouched():
    opt, params = adam_with_state()
    other_m, other_v = [t.clone() for t in moments(opt, params[1])]
    relora.prune_optimizer_state(opt, params[:1], "magnitude", 0.99)
    assert torch.equal(moments(opt, params[1])[0], other_m)
    assert torch.equal(moments(opt, params[1])[1], other_v)


def test_parameters_without_state_are_skipped():
    opt, params = adam_with_state()
    fresh = nn.Parameter(torch.randn(3, 3))
    assert relora.prune_optimizer_state(opt, [fresh], "magnitude", 0.99) == 0.0


def orphans(opt, params) -> int:
    """Entries with m != 0 where v == 0: Adam's update there is m / eps."""
    return sum(int(((m != 0) & (v == 0)).sum()) for m, v in (moments(opt, p) for p in params))


@pytest.mark.parametrize("method", ["magnitude", "random", "full"])
def test_one_mask_leaves_no_orphan_first_moments(method):
    opt, params = adam_with_state()
    relora.prune_optimizer_state(opt, params, method, 0.99, generator=torch.Generator().manual_seed(0))
    assert orphans(opt, params) == 0


def test_independent_masks_leave_orphans():
    """The reference code's rule: the check above fails for it."""
    opt, params = adam_with_state()
    relora.prune_optimizer_state(opt, params, "independent", 0.99)
    assert orphans(opt, params) > 0


def _largest_a_move_after_restart(method: str, lr: float = 1e-4) -> float:
    """One Adam step right after a restart, when A's gradient is exactly zero (B = 0)."""
    torch.manual_seed(0)
    cfg = relora.ReLoRAConfig(r=8, reset_every=20, restart_warmup_steps=0, prune=method)
    model = relora.wrap(nn.Sequential(nn.Linear(64, 64, bias=False)), cfg)
    opt = torch.optim.AdamW(relora.adapter_parameters(model), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    controller = relora.ReLoRA(model, opt, cfg)
    # Noisy gradients (fresh random batches), as in real training: m and v
    # then rank entries differently, which is what independent pruning trips on.
    for step in range(1, 21):
        x, target = torch.randn(32, 64), torch.randn(32, 64)
        (model(x) - target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        controller.step(step)
    assert controller.restarts == 1
    a = model[0].lora_A["default"].weight
    a_before = a.detach().clone()
    (model(x) - target).pow(2).mean().backward()
    assert a.grad.abs().max() == 0
    opt.step()
    return float((a.detach() - a_before).abs().max())


def test_one_adam_step_after_restart_moves_a_by_a_few_lr():
    assert _largest_a_move_after_restart("magnitude") < 5 * 1e-4


def test_independent_masks_blow_up_a_after_restart():
    assert _largest_a_move_after_restart("independent") > 100 * 1e-4


def test_bad_method_and_ratio_are_value_errors():
    opt, params = adam_with_state()
    with pytest.raises(ValueError, match="method"):
        relora.prune_optimizer_state(opt, params, "magic", 0.5)
    with pytest.raises(ValueError, match="ratio"):
        relora.prune_optimizer_state(opt, params, "magnitude", 1.5)
