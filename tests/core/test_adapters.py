"""Wrapping, merging and re-initialising adapters (RELORA_SPEC.md sections 2-3)."""

import copy

import pytest
import torch
from conftest import tiny_llama
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM

import relora
from relora.core.adapters import ADAPTER, find_targets, lora_layers

LLAMA_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def config(**kw) -> relora.ReLoRAConfig:
    kw.setdefault("r", 4)
    kw.setdefault("reset_every", 10)
    kw.setdefault("restart_warmup_steps", 2)
    return relora.ReLoRAConfig(**kw)


def train_steps(model, tokens, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in relora.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_default_targets_are_attention_and_mlp_linears(model):
    names = find_targets(model)
    assert len(names) == 7 * 2
    assert {n.rsplit(".", 1)[1] for n in names} == LLAMA_TYPES
    assert "lm_head" not in names


def test_target_patterns_select_by_suffix_and_regex(model):
    assert all(n.endswith("q_proj") for n in find_targets(model, ["q_proj"]))
    assert find_targets(model, [r"model\.layers\.1\.mlp\..*"]) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    ]


def test_wrap_preserves_logits(model, tokens):
    before = model(tokens).logits
    relora.wrap(model, config())
    assert len(lora_layers(model)) == 14
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)


def test_training_keeps_base_frozen_and_trains_everything_else(model, tokens):
    relora.wrap(model, config())
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
    others = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." not in n}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    train_steps(model, tokens, 3)
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), name
    for name, value in others.items():
        assert not torch.equal(params[name], value), f"{name} did not train"
    assert any("embed_tokens" in n for n in others) and any("norm" in n for n in others)
    assert "lm_head.weight" in others


def _adapter_grads(model, tokens):
    model.zero_grad()
    model(tokens, labels=tokens).loss.backward()
    layer = lora_layers(model)[0]
    return layer.lora_A[ADAPTER].weight.grad.abs().sum(), layer.lora_B[ADAPTER].weight.grad.abs().sum()


@pytest.mark.parametrize("after", ["wrap", "reinit"])
def test_b_gets_gradient_first_step_and_a_from_second(model, tokens, after):
    relora.wrap(model, config())
    if after == "reinit":
        train_steps(model, tokens, 2)
        relora.merge_and_reinit(model, seed=5)
    grad_a, grad_b = _adapter_grads(model, tokens)
    assert grad_b > 0
    assert grad_a == 0  # B = 0 makes A's first gradient exactly zero
    opt = torch.optim.SGD(relora.adapter_parameters(model), lr=0.1)
    opt.step()
    grad_a, grad_b = _adapter_grads(model, tokens)
    assert grad_a > 0 and grad_b > 0


def test_reference_defect_a_and_b_zero_never_learn(model, tokens):
    """The check above can fail: with A = B = 0 neither adapter matrix gets a gradient."""
    relora.wrap(model, config())
    with torch.no_grad():
        for p in relora.adapter_parameters(model):
            p.zero_()
    grad_a, grad_b = _adapter_grads(model, tokens)
    assert grad_a == 0 and grad_b == 0


def test_reinit_draws_kaiming_uniform_a_and_zero_b(model):
    relora.wrap(model, config(r=8))
    relora.merge_and_reinit(model, seed=3)
    for layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
        assert torch.all(b == 0)


def test_merge_preserves_logits(model, tokens):
    relora.wrap(model, config())
    randomize_adapters(model)
    before = model(tokens).logits
    assert relora.merge_and_reinit(model, seed=1) == 14
    after = model(tokens).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-5


def test_merge_changes_base_weights_by_exactly_s_b_a(model):
    relora.wrap(model, config(r=4, alpha=8))
    randomize_adapters(model)
    layer = lora_layers(model)[0]
    w = layer.get_base_layer().weight
    expected = w.double() + 2.0 * layer.lora_B[ADAPTER].weight.double() @ layer.lora_A[ADAPTER].weight.double()
    ptr = w.data_ptr()
    relora.merge_and_reinit(model, seed=0)
    assert w.data_ptr() == ptr  # in place: optimizer references stay valid
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-7)


def test_bf16_base_merge_is_computed_in_float32(model):
    """Merged bf16 weight = the float64 sum W + s B A rounded once to bf16."""
    relora.wrap(model, config(r=4))
    randomize_adapters(model)
    references = []
    for layer in lora_layers(model):
        w = layer.get_base_layer().weight
        w.data = w.data.bfloat16()
        delta = layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight.double() @ layer.lora_A[ADAPTER].weight.double()
        references.append(w.double() + delta)
    relora.merge_and_reinit(model, seed=0)
    for layer, ref in zip(lora_layers(model), references):
        w = layer.get_base_layer().weight
        assert w.dtype == torch.bfloat16
        one_ulp = ref.abs() * 2.0**-7  # bf16 keeps 8 significant bits
        assert torch.all((w.double() - ref).abs() <= one_ulp)
        # float32 sum then one rounding: equal to the correctly rounded value almost everywhere
        assert (w == ref.bfloat16()).double().mean() > 0.99


def merge_updates_into_bf16(updates: list[torch.Tensor], start: torch.Tensor) -> nn.Module:
    """A 512x512 bf16 frozen W = ``start``, then one merge per update (A = I, B = update / s: delta = update)."""
    model = relora.wrap(nn.Sequential(nn.Linear(512, 512, bias=False)),
                        relora.ReLoRAConfig(r=512, alpha=512, reset_every=None, frozen_dtype="bfloat16"))
    layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.get_base_layer().weight.copy_(start)
        for update in updates:
            layer.lora_A[ADAPTER].weight.copy_(torch.eye(512))
            layer.lora_B[ADAPTER].weight.copy_(update)
            relora.core.adapters.merge_layer(layer)
        layer.lora_B[ADAPTER].weight.zero_()
    return model


def test_many_small_bf16_merges_add_up_to_their_sum_rounded_once():
    """100 merges of std-1e-4 updates into bf16 W ~ N(0, 0.02): each merge alone loses a third of its update
    to rounding (measured before the residual: error 0.33); carried over, the sum is rounded once."""
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(512, 512, generator=g) * 0.02).bfloat16()
    updates = [torch.randn(512, 512, generator=g) * 1e-4 for _ in range(100)]
    model = merge_updates_into_bf16(updates, start)
    layer = lora_layers(model)[0]
    total = torch.stack(updates).double().sum(0)
    applied = layer.get_base_layer().weight.double() - start.double()
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert (applied - total).norm() / total.norm() <= 0.05
    # what is left over is what W could not hold: W + residual is the sum up to float32 roundings
    residual = relora.core.adapters.merge_residual(layer).double()
    assert (residual.abs() <= 2.0**-8 * layer.get_base_layer().weight.double().abs() + 1e-38).all()  # half an ulp
    float32_roundings = len(updates) * torch.finfo(torch.float32).eps * start.double().abs().max()  # one per merge
    assert (applied + residual - total).abs().max() <= float32_roundings
    exported = relora.unwrap(model)[0].weight  # the float32 export adds the residual back
    assert exported.dtype == torch.float32
    assert ((exported.double() - start.double()) - total).norm() / total.norm() <= 1e-4


def test_float32_merges_keep_no_residual(model):
    relora.wrap(model, config(r=4))
    randomize_adapters(model)
    relora.merge_and_reinit(model, seed=0)
    assert all(relora.core.adapters.merge_residual(layer) is None for layer in lora_layers(model))
    assert relora.core.adapters.merge_residuals(model) == {}


def test_merge_residuals_reload_into_a_fresh_model():
    g = torch.Generator().manual_seed(3)
    start = (torch.randn(512, 512, generator=g) * 0.02).bfloat16()
    merged = merge_updates_into_bf16([torch.randn(512, 512, generator=g) * 1e-4 for _ in range(3)], start)
    saved = relora.core.adapters.merge_residuals(merged)
    fresh = merge_updates_into_bf16([], start)
    relora.core.adapters.load_merge_residuals(fresh, saved)
    assert torch.equal(relora.core.adapters.merge_residual(lora_layers(fresh)[0]), saved["0"])
    with pytest.raises(ValueError, match="without low-precision frozen weights"):
        relora.core.adapters.load_merge_residuals(relora.wrap(nn.Sequential(nn.Linear(512, 512)), config()), saved)


@pytest.mark.slow  # a torchrun launch (~8 s idle): the fast tier keeps issue 16's suite-time budget
def test_bf16_merges_on_row_shards_equal_one_process(tmp_path):
    """FSDP2 layout: W a DTensor sharded by rows over 2 gloo processes; merged W and residual match bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "dist_scripts" / "sharded_bf16_merge.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_rank_grows_with_restarts_but_not_with_lora():
    """rank(W_end - W_start) > r after 3 cycles of ReLoRA, <= r for plain LoRA (paper, Section 2)."""
    torch.manual_seed(0)
    d, r = 24, 2
    target = torch.randn(d, d)
    x = torch.randn(256, d)

    def update_rank(reset_every: int | None) -> int:
        cfg = relora.ReLoRAConfig(r=r, alpha=r, reset_every=reset_every, restart_warmup_steps=0, prune="full")
        model = relora.wrap(nn.Sequential(nn.Linear(d, d, bias=False)), cfg)
        w_start = model[0].get_base_layer().weight.detach().clone()
        opt = torch.optim.Adam(relora.adapter_parameters(model), lr=3e-2)
        controller = relora.ReLoRA(model, opt, cfg)
        for step in range(1, 121):
            (model(x) - x @ target.T).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            controller.step(step)
        relora.unwrap(model)  # merges the last cycle too
        s = torch.linalg.svdvals((model[0].weight.detach() - w_start).double())
        return int((s > 1e-6 * s[0]).sum())

    assert update_rank(reset_every=None) <= r
    assert update_rank(reset_every=40) > r


def test_same_seed_gives_bit_identical_weights(tokens):
    def run(seed):
        model = tiny_llama()
        relora.wrap(model, config(seed=seed))
        train_steps(model, tokens, 2)
        relora.merge_and_reinit(model, seed=11)
        return model.state_dict()

    a, b, other = run(7), run(7), run(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_unwrap_gives_plain_model_that_transformers_loads(model, tokens, tmp_path):
    relora.wrap(model, config())
    randomize_adapters(model)
    expected = model(tokens).logits
    plain = relora.unwrap(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(loaded(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_wrap_keeps_user_frozen_parameters_frozen(model):
    model.model.embed_tokens.weight.requires_grad_(False)
    relora.wrap(model, config())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.requires_grad


def test_wrapping_twice_is_an_error(model):
    relora.wrap(model, config())
    with pytest.raises(ValueError, match="already wrapped"):
        relora.wrap(copy.deepcopy(model), config())
