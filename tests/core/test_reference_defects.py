"""The study-only reference defects (``reference_defects``): each reproduces exactly one defect of the
reference / relora-pico code (RELORA_SPEC.md sections 2-4, docs/method.md "Reference defects")."""

import math

import pytest
import torch
import yaml
from conftest import tiny_llama
from torch import nn

import relora
from relora.core.adapters import ADAPTER, lora_layers
from relora.errors import ConfigError

DEFECTS = ("zero-init-a", "unscaled-merge", "independent-masks")


def config(*defects, **kw) -> relora.ReLoRAConfig:
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)  # s = 2, as relora-pico's r 16, alpha 32
    kw.setdefault("reset_every", 3)
    kw.setdefault("restart_warmup_steps", 0)
    kw.setdefault("prune", "random")
    return relora.ReLoRAConfig(reference_defects=defects, **kw)


def adapters(layer):
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in relora.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def adamw(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model, opt, tokens):
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad()


def is_kaiming_a(a: torch.Tensor) -> bool:
    bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return bool(a.abs().max() <= bound and a.abs().max() > 0.8 * bound)


# ---------------------------------------------------------------- zero-init-a

def test_zero_init_a_keeps_a_and_b_exactly_zero_until_the_first_merge(model, tokens):
    cfg = config("zero-init-a")
    relora.wrap(model, cfg)
    opt = adamw(model)
    controller = relora.ReLoRA(model, opt, cfg)
    layers = lora_layers(model)
    weights = [layer.get_base_layer().weight.clone() for layer in layers]
    embedding = model.get_input_embeddings().weight.clone()
    assert all(torch.all(t == 0) for layer in layers for t in adapters(layer))
    for step in (1, 2):  # reset_every = 3: the first merge is at step 3
        model(tokens, labels=tokens).loss.backward()
        assert all(torch.all(t.grad == 0) for layer in layers for t in adapters(layer))  # no gradient at all
        opt.step()
        opt.zero_grad()
        assert not controller.step(step).merged
        assert all(torch.all(t == 0) for layer in layers for t in adapters(layer)), step
    assert not torch.equal(model.get_input_embeddings().weight, embedding)  # the rest of the model trains
    train_step(model, opt, tokens)
    assert controller.step(3).merged
    for layer, w in zip(layers, weights):
        a, b = adapters(layer)
        assert torch.equal(layer.get_base_layer().weight, w)  # the first merge folds in nothing
        assert is_kaiming_a(a) and torch.all(b == 0)  # re-inits are Kaiming, as in the reference code
    before = [adapters(layer)[1].clone() for layer in layers]
    train_step(model, opt, tokens)
    assert any(not torch.equal(adapters(layer)[1], b) for layer, b in zip(layers, before))  # adapters now learn


def test_without_zero_init_a_a_is_kaiming_at_wrap(model):
    relora.wrap(model, config())
    assert all(is_kaiming_a(adapters(layer)[0]) for layer in lora_layers(model))


# ---------------------------------------------------------------- unscaled-merge

def merge_through_controller(model, cfg):
    opt = torch.optim.AdamW(relora.adapter_parameters(model), lr=1e-3)
    controller = relora.ReLoRA(model, opt, cfg)
    assert controller.step(cfg.reset_every).merged


@pytest.mark.parametrize("defects, scale", [(("unscaled-merge",), 1.0), ((), 2.0)])
def test_merge_adds_b_a_times_scale(model, defects, scale):
    """unscaled-merge: W <- W + B A; without it W <- W + s B A (s = alpha / r = 2 here)."""
    cfg = config(*defects)
    relora.wrap(model, cfg)
    randomize_adapters(model)
    expected = []
    for layer in lora_layers(model):
        a, b = adapters(layer)
        expected.append(layer.get_base_layer().weight.double() + scale * (b.double() @ a.double()))
    merge_through_controller(model, cfg)
    for layer, ref in zip(lora_layers(model), expected):
        torch.testing.assert_close(layer.get_base_layer().weight.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("defects", [("unscaled-merge",), ()])
def test_unscaled_merge_changes_a_linear_map_by_one_minus_s_b_a(defects):
    """Before the merge y = W x + s B A x; after it y = (W + B A) x: the change is (1 - s) B A x."""
    torch.manual_seed(0)
    cfg = config(*defects)
    model = relora.wrap(nn.Sequential(nn.Linear(40, 24, bias=False)), cfg)
    randomize_adapters(model, seed=1)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    a, b = (t.detach().double().clone() for t in adapters(model[0]))
    with torch.no_grad():
        before = model(x).double()
        merge_through_controller(model, cfg)
        after = model(x).double()
    s = cfg.scaling
    assert s == 2.0
    predicted = (1 - s) * (x.double() @ a.T @ b.T) if defects else torch.zeros_like(before)
    assert (after - before).abs().max() > 0.1 if defects else True  # a change far above the tolerance below
    torch.testing.assert_close(after - before, predicted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("defects", [("unscaled-merge",), ()])
def test_logits_after_a_merge_equal_the_model_with_w_plus_merged_delta(defects, tokens):
    """The whole model after a merge computes what the dense model with W + B A (defect) or W + s B A does."""
    model = tiny_llama()
    cfg = config(*defects)
    relora.wrap(model, cfg)
    randomize_adapters(model)
    with torch.no_grad():
        before = model(tokens).logits
        reference = tiny_llama()  # the same initial weights, built independently of the wrapped model
        modules = dict(reference.named_modules())
        factor = 1.0 if defects else cfg.scaling
        for name, layer in model.named_modules():
            if isinstance(layer, type(lora_layers(model)[0])):
                a, b = adapters(layer)
                target = modules[name].weight
                target.copy_((target.double() + factor * (b.double() @ a.double())).float())
        expected = reference(tokens).logits
        merge_through_controller(model, cfg)
        after = model(tokens).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    moved = (after - before).abs().max()
    if defects:
        assert moved > 1e-2  # the function changed across the merge
    else:
        assert moved < 1e-5 * before.abs().max()  # unchanged to float rounding


# ---------------------------------------------------------------- independent-masks

def adam_state(shape=(1000, 1000), seed=0):
    g = torch.Generator().manual_seed(seed)
    param = nn.Parameter(torch.randn(shape, generator=g))
    opt = torch.optim.AdamW([param], lr=1e-3)
    for _ in range(2):
        param.grad = torch.randn(shape, generator=g)
        opt.step()
    return opt, param


def test_independent_masks_zero_m_and_v_each_with_probability_p_and_leave_orphans():
    opt, param = adam_state()
    m, v = opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]
    assert torch.all(m != 0) and torch.all(v != 0)
    p, n = 0.999, param.numel()
    relora.prune_optimizer_state(opt, [param], "random", p, generator=torch.Generator().manual_seed(0),
                                 independent_masks=True)
    sigma = math.sqrt(p * (1 - p) / n)
    for moment in (m, v):
        assert abs(float((moment == 0).double().mean()) - p) < 5 * sigma  # five binomial standard deviations
    assert not torch.equal(m != 0, v != 0)  # two masks
    orphans = int(((m != 0) & (v == 0)).sum())
    # expected n (1 - p) p = 999 orphans: far from zero
    assert abs(orphans - n * (1 - p) * p) < 5 * math.sqrt(n * (1 - p) * p)


def test_random_pruning_without_the_switch_shares_one_mask():
    opt, param = adam_state()
    relora.prune_optimizer_state(opt, [param], "random", 0.999, generator=torch.Generator().manual_seed(0))
    m, v = opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]
    assert torch.equal(m != 0, v != 0) and int(((m != 0) & (v == 0)).sum()) == 0


@pytest.mark.parametrize("defects", [("independent-masks",), ()])
def test_controller_restart_with_independent_masks_leaves_orphans(defects):
    torch.manual_seed(0)
    cfg = config(*defects, r=64, prune_ratio=0.999)
    model = relora.wrap(nn.Sequential(nn.Linear(1024, 1024, bias=False)), cfg)
    opt = torch.optim.AdamW(relora.adapter_parameters(model), lr=1e-3)
    controller = relora.ReLoRA(model, opt, cfg)
    g = torch.Generator().manual_seed(1)
    for step in range(1, cfg.reset_every + 1):
        (model(torch.randn(8, 1024, generator=g)) - torch.randn(8, 1024, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        controller.step(step)
    assert controller.restarts == 1
    orphans = sum(int(((opt.state[p]["exp_avg"] != 0) & (opt.state[p]["exp_avg_sq"] == 0)).sum())
                  for p in relora.adapter_parameters(model))
    assert (orphans > 10) if defects else (orphans == 0)


def test_independent_masks_refuse_a_factored_second_moment():
    cfg = config("independent-masks")
    model = relora.wrap(nn.Sequential(nn.Linear(16, 16, bias=False)), cfg)
    opt = torch.optim.Adafactor(relora.adapter_parameters(model))
    with pytest.raises(ValueError, match="independent-masks"):
        relora.ReLoRA(model, opt, cfg)


# ---------------------------------------------------------------- each switch alone changes only its one thing

@pytest.mark.parametrize("defect", [None, *DEFECTS])
def test_each_defect_changes_only_its_own_rule(defect, tokens):
    """Init, merge scale and mask sharing: only the switched one departs from the spec."""
    model = tiny_llama()
    cfg = config(*([defect] if defect else []))
    relora.wrap(model, cfg)
    a_zero = all(torch.all(adapters(layer)[0] == 0) for layer in lora_layers(model))
    assert a_zero == (defect == "zero-init-a")
    assert all(torch.all(adapters(layer)[1] == 0) for layer in lora_layers(model))

    opt = adamw(model)
    controller = relora.ReLoRA(model, opt, cfg)
    for step in (1, 2):
        train_step(model, opt, tokens)
        controller.step(step)
    randomize_adapters(model)
    train_step(model, opt, tokens)
    expected = [layer.get_base_layer().weight.double()
                + (1.0 if defect == "unscaled-merge" else cfg.scaling)
                * (adapters(layer)[1].double() @ adapters(layer)[0].double()) for layer in lora_layers(model)]
    event = controller.step(3)
    assert event.restarted
    for layer, ref in zip(lora_layers(model), expected):
        torch.testing.assert_close(layer.get_base_layer().weight.double(), ref, rtol=1e-6, atol=1e-7)
        assert is_kaiming_a(adapters(layer)[0]) and torch.all(adapters(layer)[1] == 0)
    shared = all(torch.equal(opt.state[p]["exp_avg"] != 0, opt.state[p]["exp_avg_sq"] != 0)
                 for p in relora.adapter_parameters(model))
    assert shared == (defect != "independent-masks")


# ---------------------------------------------------------------- configuration

def test_defect_names_are_checked():
    with pytest.raises(ValueError, match="unknown reference defect 'zero-init-b'; the names are zero-init-a, "
                                         "unscaled-merge, independent-masks"):
        config("zero-init-b")
    with pytest.raises(ValueError, match="use it with prune='random'"):
        config("independent-masks", prune="magnitude")
    with pytest.raises(ValueError, match="not exact with quantize"):
        config("unscaled-merge", quantize="nf4")
    assert relora.ReLoRAConfig().reference_defects == ()  # never on by default
    assert config("zero-init-a", "unscaled-merge").to_dict()["reference_defects"] == ["zero-init-a", "unscaled-merge"]


def test_train_config_passes_defects_to_adapter_methods_only(tmp_path):
    from relora.run.resolve import resolve_config

    cfg = resolve_config(overrides=dict(reference_defects=list(DEFECTS), prune="random", prune_ratio=0.999))
    assert cfg.relora_config().reference_defects == DEFECTS
    assert resolve_config().reference_defects == [] and resolve_config().relora_config().reference_defects == ()
    with pytest.raises(ConfigError, match="method full has none"):
        resolve_config(overrides=dict(method="full", reference_defects=["zero-init-a"]))


def test_compare_runs_full_rank_methods_without_the_defects(tmp_path):
    from relora.analysis.compare_sets import MAIN_SET, resolve_run

    overrides = dict(reference_defects=["zero-init-a", "unscaled-merge"])
    configs = {spec.name: resolve_run(spec, tmp_path, preset=None, config_file=None, overrides=overrides)
               for spec in MAIN_SET}
    assert configs["full"].reference_defects == [] and configs["control"].reference_defects == []
    for name in ("lora", "lora-ws", "relora"):
        assert configs[name].relora_config().reference_defects == ("zero-init-a", "unscaled-merge")


def test_cli_run_with_every_defect_records_them_and_resumes_only_with_them(prepared_data, tmp_path, capsys):
    from conftest import TINY_MODEL

    from relora.cli import main

    settings = tmp_path / "tiny.yaml"
    settings.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=16, warmup_steps=2, warm_start_steps=4, reset_every=4,
        restart_warmup_steps=1, rank=4, batch_tokens=256, micro_batch=8, seq_len=32, eval_every=0,
        eval_tokens=512, save_every=8, device="cpu")))
    out = tmp_path / "run"
    args = ["train", "--config", str(settings), "--out", str(out), "--no-progress", "--prune", "random",
            "--prune-ratio", "0.999"]
    assert main([*args, "--reference-defects", "zero-init-a, unscaled-merge,independent-masks"]) == 0
    assert "restarts     2" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["reference_defects"] == list(DEFECTS)
    assert main([*args, "--resume", "--reference-defects", "zero-init-a"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different reference_defects" in err and len(err.splitlines()) == 1
    assert main([*args, "--resume"]) == 0  # the saved defects stay on
