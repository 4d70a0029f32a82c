"""Pruning the adapters' Adam moments (RELORA_SPEC.md section 4)."""

import math

import numpy as np
import pytest
import torch
from conftest import dense_moments
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


def test_parameters_outside_the_optimizer_are_an_error():
    """Pruning state the optimizer does not hold (built before relora.wrap, say) would prune nothing."""
    opt, params = adam_with_state()
    fresh = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="not in the param groups of AdamW"):
        relora.prune_optimizer_state(opt, [fresh], "magnitude", 0.99)
    assert relora.prune_optimizer_state(opt, [fresh], "none", 0.99) == 0.0  # none accepts anything


def test_parameters_never_stepped_have_no_state_to_prune():
    """The one legitimately empty case: a parameter the optimizer holds but has not updated yet."""
    opt, params = adam_with_state()
    fresh = nn.Parameter(torch.randn(3, 3))
    opt.add_param_group({"params": [fresh]})
    fraction = relora.prune_optimizer_state(opt, [params[0], fresh], "magnitude", 0.99)
    n = params[0].numel()
    assert fraction == (n - round(0.01 * n)) / n  # counted over the tensor that had state only
    assert fresh not in opt.state


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


# ---------------------------------------------------------------- every optimizer: pruned with one mask, or refused
def _filled(make, shapes=((64, 128), (8, 16)), steps=3, seed=0):
    """An optimizer built by ``make`` whose state was filled by a few steps on random gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, params


def _bnb(name):
    import bitsandbytes as bnb

    return lambda params: getattr(bnb.optim, name)(params, lr=1e-3)


OPTIMIZERS = {
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    "torch-adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),
    "hf-adafactor-beta1": lambda params: __import__("transformers").optimization.Adafactor(
        params, lr=1e-3, beta1=0.9, relative_step=False, scale_parameter=False),
    "bnb-adamw8bit": _bnb("AdamW8bit"),  # (64, 128) in 8 bits with block scales, (8, 16) in 32 bits
    "bnb-paged-adamw8bit": _bnb("PagedAdamW8bit"),
    "bnb-adamw32bit": _bnb("AdamW"),
}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_known_optimizer_is_pruned_by_magnitude_with_one_mask(name):
    opt, params = _filled(OPTIMIZERS[name])
    before = {p: dense_moments(opt.state[p]) for p in params}
    fraction = relora.prune_optimizer_state(opt, params, "magnitude", 0.9)
    zero = total = 0
    for p in params:
        m0, (v0, *others0) = before[p]
        m, (v, *others) = dense_moments(opt.state[p])
        kept, pruned = v != 0, v == 0
        n = v.numel()
        if name.endswith("adafactor") or name.endswith("adafactor-beta1"):
            # A block of rows x columns, the rows and columns with the largest factors, reconstructed exactly.
            rows, cols = kept.any(1), kept.any(0)
            assert torch.equal(kept, rows[:, None] & cols[None, :])
            assert 0.5 * 0.1 * n <= int(kept.sum()) <= 2 * 0.1 * n
            row_stat, col_stat = v0.sum(1), v0.sum(0)
            assert row_stat[rows].min() >= row_stat[~rows].max() and col_stat[cols].min() >= col_stat[~cols].max()
        else:
            assert int(kept.sum()) == round(0.1 * n)  # exactly the count asked for ...
            assert v0[kept].min() >= v0[pruned].max()  # ... of the largest v (ties of 8-bit codes allowed)
            for o, o0 in zip(others, others0):  # AMSGrad's max_exp_avg_sq: the same mask
                assert torch.equal(o != 0, kept) and torch.equal(o[kept], o0[kept])
        assert torch.allclose(v[kept], v0[kept], rtol=1e-6, atol=0)  # kept entries keep their values
        if m is not None:
            assert int(((m != 0) & (v == 0)).sum()) == 0  # no orphan first moment
            assert torch.equal(m[kept], m0[kept]) and torch.all(m[pruned] == 0)
        everything_zero = pruned if m is None else pruned & (m == 0)
        zero += int(everything_zero.sum())
        total += n
    assert fraction == pytest.approx(zero / total, abs=1e-12)  # counted on the optimizer's own tensors
    assert fraction > 0.8


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("method", ["random", "full"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_known_optimizer_leaves_no_orphan_moments(name, method):
    opt, params = _filled(OPTIMIZERS[name])
    fraction = relora.prune_optimizer_state(opt, params, method, 0.7, generator=torch.Generator().manual_seed(0))
    zero = total = 0
    for p in params:
        m, vs = dense_moments(opt.state[p])
        v_zero = vs[0] == 0
        for other in vs[1:]:
            assert torch.equal(other == 0, v_zero)
        if m is not None:
            assert int(((m != 0) & v_zero).sum()) == 0
            v_zero = v_zero & (m == 0)
        zero += int(v_zero.sum())
        total += v_zero.numel()
    assert fraction == pytest.approx(zero / total, abs=1e-12)
    assert fraction == 1.0 if method == "full" else abs(fraction - 0.7) < 0.15


def test_amsgrad_max_exp_avg_sq_is_pruned_with_the_moments():
    """v_hat = max(max_exp_avg_sq, v): left whole, it would ignore the reset."""
    opt, params = _filled(OPTIMIZERS["adamw-amsgrad"])
    relora.prune_optimizer_state(opt, params, "magnitude", 0.99)
    for p in params:
        state = opt.state[p]
        assert torch.equal(state["max_exp_avg_sq"] != 0, state["exp_avg_sq"] != 0)


class _MomentumOnly(torch.optim.Optimizer):
    """A custom optimizer with one per-entry buffer (Lion-like): nothing relora could prune safely."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                buf.lerp_(p.grad, 0.1)
                p.add_(buf.sign(), alpha=-group["lr"])


UNKNOWN = {
    "SGD": (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), "momentum_buffer"),
    "Lion": (_bnb("Lion"), "state1"),
    "_MomentumOnly": (lambda params: _MomentumOnly(params), "exp_avg"),
}


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_optimizer_state_is_refused_naming_class_and_keys(name):
    make, key = UNKNOWN[name]
    opt, params = _filled(make)
    with pytest.raises(ValueError, match=rf"{name} \(state keys: .*{key}"):
        relora.prune_optimizer_state(opt, params, "magnitude", 0.99)
    assert relora.prune_optimizer_state(opt, params, "none", 0.99) == 0.0


def test_independent_pruning_of_a_factored_moment_is_refused():
    opt, params = _filled(OPTIMIZERS["torch-adafactor"])
    with pytest.raises(ValueError, match="independent"):
        relora.prune_optimizer_state(opt, params, "independent", 0.99)


def _wrapped(cfg):
    torch.manual_seed(0)
    return relora.wrap(nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)), cfg)


@pytest.mark.parametrize("name", UNKNOWN)
def test_controller_refuses_an_unprunable_optimizer_before_the_first_step(name):
    """No state exists yet: the check probes the optimizer's class with the group's hyper-parameters."""
    cfg = relora.ReLoRAConfig(r=4, reset_every=10, restart_warmup_steps=2)
    model = _wrapped(cfg)
    opt = UNKNOWN[name][0](relora.adapter_parameters(model))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"{name} \(state keys: .*{UNKNOWN[name][1]}"):
        relora.ReLoRA(model, opt, cfg)
    assert not opt.state  # the probe stepped a twin, not this optimizer ...
    assert torch.equal(torch.get_rng_state(), rng)  # ... and drew no random numbers
    relora.ReLoRA(model, opt, relora.ReLoRAConfig(r=4, reset_every=10, restart_warmup_steps=2, prune="none"))
    relora.ReLoRA(model, opt, relora.ReLoRAConfig(r=4, reset_every=None, restart_warmup_steps=0))  # never prunes


def test_controller_refuses_an_optimizer_without_state():
    cfg = relora.ReLoRAConfig(r=4, reset_every=10, restart_warmup_steps=2)
    model = _wrapped(cfg)
    with pytest.raises(ValueError, match="keeps no per-parameter state"):
        relora.ReLoRA(model, torch.optim.SGD(relora.adapter_parameters(model), lr=0.1), cfg)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_controller_accepts_adam_before_any_state_exists(amsgrad):
    cfg = relora.ReLoRAConfig(r=4, reset_every=10, restart_warmup_steps=2)
    model = _wrapped(cfg)
    opt = torch.optim.AdamW(relora.adapter_parameters(model), lr=1e-3, amsgrad=amsgrad)
    relora.ReLoRA(model, opt, cfg)
    assert not opt.state


class _NeedsArgument(_MomentumOnly):
    """A constructor with a required argument: the probe cannot build a twin."""

    def __init__(self, params, lr):
        super().__init__(params, lr)


def test_controller_checks_the_first_state_when_the_optimizer_cannot_be_probed(caplog):
    cfg = relora.ReLoRAConfig(r=4, reset_every=10, restart_warmup_steps=2)
    model = _wrapped(cfg)
    opt = _NeedsArgument(relora.adapter_parameters(model), 1e-3)
    controller = relora.ReLoRA(model, opt, cfg)
    assert "could not probe" in caplog.text
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"_NeedsArgument \(state keys: exp_avg"):
        controller.step(1)  # the first step, not the first restart (step 10)


# ---------------------------------------------------------------- magnitude pruning of small tensors
def test_magnitude_keeps_at_least_one_entry_of_small_tensors():
    """round(0.01 * 30) = 0 would reset a 30-entry tensor completely, a full reset nobody asked for."""
    opt, params = adam_with_state(shapes=((5, 6), (2, 3)))
    before = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    fraction = relora.prune_optimizer_state(opt, params, "magnitude", 0.99)
    for p, v0 in zip(params, before):
        m, v = moments(opt, p)
        assert torch.nonzero(v.flatten()).flatten().tolist() == [int(np.argmax(v0.flatten().numpy()))]
        assert int((m != 0).sum()) == 1
    assert fraction == pytest.approx((29 + 5) / 36)  # one entry of 30 and one of 6 kept
    assert relora.prune_optimizer_state(opt, params, "magnitude", 1.0) == 1.0  # ratio 1 still zeroes everything


# ---------------------------------------------------------------- Adam's step counter after a prune
def _adam_update_sizes(restart_step: bool, *, t0=5000, after=(1, 10, 100), lr=1e-3, betas=(0.9, 0.999)):
    """|update| / lr of pruned and kept entries k steps after a prune at step t0, constant gradients (float64)."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, dtype=torch.float64, generator=g)  # constant over time, different per entry
    param = nn.Parameter(torch.zeros(64, dtype=torch.float64))
    opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=1e-8, weight_decay=0.0)
    param.grad = grad.clone()
    for _ in range(t0):
        opt.step()
    relora.prune_optimizer_state(opt, [param], "random", 0.5, generator=g, restart_step=restart_step)
    pruned = opt.state[param]["exp_avg_sq"] == 0
    sizes = {}
    for k in range(1, max(after) + 1):
        before = param.detach().clone()
        opt.step()
        if k in after:
            sizes[k] = ((param.detach() - before).abs() / lr, pruned)
    return sizes, grad


def _expected_update(n, t, betas=(0.9, 0.999), eps=1e-8, g=1.0):
    """Adam's |update| / lr with moments accumulated from zero over n steps of constant gradient g, at step t."""
    b1, b2 = betas
    m, v = (1 - b1**n) * g, (1 - b2**n) * g * g  # geometric sums of the same gradient
    return abs((m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps))


@pytest.mark.parametrize("setting", ["keep", "reset"])
def test_update_size_of_pruned_entries_after_a_restart(setting):
    """Spec section 4: under keep, a pruned entry moves 3.2x lr one step after the restart (beta2 = 0.999),
    6.5x after 10 and still 3.2x after 100; reset restarts bias correction, so it moves lr (and a kept
    entry, whose moments are not fresh, moves less: 0.32x, 0.15x, 0.31x)."""
    t0 = 5000
    sizes, grad = _adam_update_sizes(setting == "reset", t0=t0)
    for k, (size, pruned) in sizes.items():
        assert 10 < int(pruned.sum()) < 54
        t = k if setting == "reset" else t0 + k  # the step Adam's bias correction uses
        for where, accumulated in ((pruned, k), (~pruned, t0 + k)):  # moments from zero at the prune, or at step 0
            expected = torch.tensor([_expected_update(accumulated, t, g=float(x)) for x in grad[where]],
                                    dtype=torch.float64)
            assert torch.allclose(size[where], expected, rtol=1e-6, atol=0), k
    ratios = {k: float(size[pruned].mean()) for k, (size, pruned) in sizes.items()}
    if setting == "keep":
        assert ratios[1] == pytest.approx(3.15, abs=0.02) and ratios[10] == pytest.approx(6.5, abs=0.05)
        assert ratios[100] == pytest.approx(3.2, abs=0.05)
    else:
        assert all(r == pytest.approx(1.0, abs=1e-6) for r in ratios.values())


def test_restart_adam_step_reset_restarts_only_the_adapters_counters():
    cfg = relora.ReLoRAConfig(r=4, reset_every=3, restart_warmup_steps=0, restart_adam_step="reset")
    torch.manual_seed(0)
    model = relora.wrap(nn.Sequential(nn.Linear(16, 16, bias=False), nn.LayerNorm(16)), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    controller = relora.ReLoRA(model, opt, cfg)
    for step in range(1, 4):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        controller.step(step)
    adapters = {id(p) for p in relora.adapter_parameters(model)}
    steps = {id(p): float(opt.state[p]["step"]) for p in opt.state}
    assert controller.restarts == 1
    assert {steps[i] for i in adapters} == {0.0}
    assert {s for i, s in steps.items() if i not in adapters} == {3.0}  # the LayerNorm keeps its own
