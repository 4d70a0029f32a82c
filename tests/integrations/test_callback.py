"""ReLoRACallback: ReLoRA inside a Hugging Face Trainer, with gradient accumulation and checkpoints."""

import json
import math

import pytest
import torch
from conftest import dense_moments, one_thread, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

import relora
from relora.core.adapters import adapter_parameters, lora_layers

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, RESET, REWARM, WARMUP, PEAK, RATIO, MIN_RATIO = 12, 4, 2, 2, 1e-2, 0.9, 0.1
DATA = [{"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0))]


class Probe(TrainerCallback):
    """Runs after ReLoRACallback: records the LR each step uses and the state right after each restart."""

    def __init__(self, relora_callback):
        self.relora = relora_callback
        self.lr, self.zero_moments, self.b_max = {}, {}, {}
        self.merges_at_begin = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.merges_at_begin = (self.relora.controller.merges, self.relora.controller.restarts)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lr[state.global_step] = optimizer.param_groups[0]["lr"]  # the LR of the update from this step

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.relora.events and self.relora.events[-1].step == state.global_step:
            moments = [optimizer.state[p]["exp_avg_sq"] for p in adapter_parameters(model)]
            self.zero_moments[state.global_step] = float(sum((v == 0).sum() for v in moments)) / sum(
                v.numel() for v in moments)
            self.b_max[state.global_step] = max(float(layer.lora_B["default"].weight.detach().abs().max())
                                                for layer in lora_layers(model))


def run_trainer(out, resume=None, frozen_dtype="float32"):
    model = tiny_llama(seed=0)
    config = relora.ReLoRAConfig(r=4, reset_every=RESET, restart_warmup_steps=REWARM, prune_ratio=RATIO,
                                 frozen_dtype=frozen_dtype)
    relora.wrap(model, config)
    callback = relora.ReLoRACallback(config)
    probe = Probe(callback)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=PEAK)
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             warmup_steps=WARMUP, save_strategy="steps", save_steps=6, report_to="none",
                             use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=DATA, callbacks=[callback, probe],
                      optimizers=(optimizer, callback.scheduler(optimizer, min_lr_ratio=MIN_RATIO)))
    trainer.train(resume_from_checkpoint=resume)
    return model, callback, probe


def expected_lr(t):
    """Spec section 5, written out independently of relora.core.schedule."""
    def envelope(s):
        return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))
    if t < WARMUP:
        return PEAK * t / WARMUP
    restarts = [s for s in (4, 8) if s <= t < s + REWARM]
    if restarts:
        return PEAK * envelope(restarts[0] + REWARM) * (t - restarts[0]) / REWARM
    return PEAK * envelope(t)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    with one_thread():  # module-scoped: set up before the function-scoped single_thread fixture
        return out, *run_trainer(out)


def test_merges_and_lr_restarts_at_the_optimizer_steps(uninterrupted):
    _, _, callback, probe = uninterrupted
    # 12 optimizer steps of 2 micro-batches each; restarts every 4 optimizer steps, none at the last step.
    assert [(e.step, e.merged, e.restarted) for e in callback.events] == [(4, True, True), (8, True, True)]
    assert (callback.controller.merges, callback.controller.restarts) == (2, 2)
    assert sorted(probe.lr) == list(range(STEPS))
    assert probe.lr[4] == 0.0 and probe.lr[8] == 0.0  # exactly zero right at the restarts
    for step, lr in probe.lr.items():
        assert lr == pytest.approx(expected_lr(step), abs=1e-12), step
    assert all(probe.lr[s] > 0 for s in (1, 2, 3, 5, 6, 7, 9, 10, 11))


def test_restarts_reinit_adapters_and_prune_the_trainer_optimizer(uninterrupted):
    _, _, callback, probe = uninterrupted
    assert probe.b_max == {4: 0.0, 8: 0.0}  # B re-initialised to zero by the merge
    for event in callback.events:
        assert event.pruned_fraction == pytest.approx(RATIO, abs=0.01)
        # Counted independently on the Trainer's own optimizer: the pruning did not act on a copy.
        assert probe.zero_moments[event.step] == pytest.approx(RATIO, abs=0.01)


def test_checkpoints_hold_the_controller_state(uninterrupted):
    out = uninterrupted[0]
    saved = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    controller = saved["stateful_callbacks"]["ReLoRACallback"]["attributes"]["controller_state"]
    assert (controller["merges"], controller["restarts"]) == (1, 1)


def test_resume_continues_the_counters_and_matches_the_uninterrupted_run(uninterrupted):
    out, model, _, probe = uninterrupted
    resumed_model, resumed, resumed_probe = run_trainer(out, resume=str(out / "checkpoint-6"))
    assert resumed_probe.merges_at_begin == (1, 1)  # the restart at step 4 was restored, not repeated
    assert [e.step for e in resumed.events] == [8]
    assert (resumed.controller.merges, resumed.controller.restarts) == (2, 2)
    assert resumed_probe.lr == {s: lr for s, lr in probe.lr.items() if s >= 6}
    # CPU, a fixed seed, the Trainer's saved RNG states and data position: bit-identical weights.
    expected = model.state_dict()
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bf16_merge_residuals_are_checkpointed_and_resumed(tmp_path):
    from relora.core.adapters import merge_residuals
    from relora.integrations.callback import MERGE_RESIDUALS_FILE

    with one_thread():
        model, _, _ = run_trainer(tmp_path, frozen_dtype="bfloat16")
    assert (tmp_path / "checkpoint-6" / MERGE_RESIDUALS_FILE).is_file()
    expected_residuals, expected = merge_residuals(model), model.state_dict()
    assert expected_residuals and all(bool(r.abs().max() > 0) for r in expected_residuals.values())
    resumed_model, _, _ = run_trainer(tmp_path, resume=str(tmp_path / "checkpoint-6"), frozen_dtype="bfloat16")
    resumed_residuals = merge_residuals(resumed_model)
    assert resumed_residuals.keys() == expected_residuals.keys()
    for name, value in resumed_residuals.items():  # without the saved residual the merge at 8 starts from zero
        assert torch.equal(value, expected_residuals[name]), name
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[name]), name

    (tmp_path / "checkpoint-6" / MERGE_RESIDUALS_FILE).unlink()
    with pytest.raises(ValueError, match="bf16 merge residuals but .*relora_merge_residuals.safetensors is missing"):
        run_trainer(tmp_path, resume=str(tmp_path / "checkpoint-6"), frozen_dtype="bfloat16")


def test_training_without_the_jagged_scheduler_is_refused(tmp_path):
    model = tiny_llama()
    config = relora.ReLoRAConfig(r=4, reset_every=4, restart_warmup_steps=2)
    relora.wrap(model, config)
    args = TrainingArguments(str(tmp_path), max_steps=2, report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=DATA, callbacks=[relora.ReLoRACallback(config)])
    with pytest.raises(ValueError, match="callback.scheduler"):
        trainer.train()


def test_warm_start_inside_the_trainer_is_refused():
    with pytest.raises(ValueError, match="warm_start_steps=0"):
        relora.ReLoRACallback(relora.ReLoRAConfig(r=4, reset_every=4, restart_warmup_steps=2, warm_start_steps=10))


class ZeroCount(TrainerCallback):
    """Runs after ReLoRACallback: counts, right after each restart, the adapters' entries whose moments are all zero."""

    def __init__(self, relora_callback):
        self.relora, self.zeroed, self.optimizer = relora_callback, {}, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        if self.relora.events and self.relora.events[-1].step == state.global_step:
            zero = total = 0
            for p in adapter_parameters(model):
                m, (v, *others) = dense_moments(self.optimizer.state[p])
                everything_zero = (v == 0) if m is None else (v == 0) & (m == 0)
                assert m is None or not bool(((m != 0) & (v == 0)).any())  # no orphan first moment
                zero, total = zero + int(everything_zero.sum()), total + v.numel()
            self.zeroed[state.global_step] = zero / total


def train_with_optimizer(out, optim="adamw_torch", make_optimizer=None):
    """Eight Trainer steps, a restart at step 4, with the Trainer's ``optim`` or an optimizer built by hand."""
    model = tiny_llama(seed=0)
    config = relora.ReLoRAConfig(r=4, reset_every=RESET, restart_warmup_steps=REWARM, prune_ratio=RATIO)
    relora.wrap(model, config)
    callback = relora.ReLoRACallback(config)
    count = ZeroCount(callback)
    args = TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=2, warmup_steps=WARMUP,
                             learning_rate=PEAK, optim=optim, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=100, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=DATA, callbacks=[callback, count])
    if make_optimizer is None:
        trainer.create_optimizer()  # the Trainer's own choice for args.optim
    else:
        trainer.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    trainer.lr_scheduler = callback.scheduler(trainer.optimizer)
    trainer.train()
    return callback, count


def _bnb_adamw8bit(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=PEAK, min_8bit_size=64)  # the adapters' 128-256 entries in 8 bits


@pytest.mark.parametrize("optim", ["adafactor", "adamw_torch_fused", "adamw_bnb_8bit"])
def test_trainer_optimizers_are_pruned_at_restarts(tmp_path, optim):
    make = _bnb_adamw8bit if optim == "adamw_bnb_8bit" else None
    callback, count = train_with_optimizer(tmp_path, optim, make)
    assert [e.step for e in callback.events] == [4]
    expected_state = {"adafactor": "exp_avg_sq_row", "adamw_torch_fused": "exp_avg_sq", "adamw_bnb_8bit": "absmax2"}
    assert all(expected_state[optim] in count.optimizer.state[p] for p in adapter_parameters(callback.controller.model))
    # The fraction the callback reports is the one counted independently on the Trainer's optimizer.
    assert callback.events[0].pruned_fraction == pytest.approx(count.zeroed[4], abs=1e-12)
    assert count.zeroed[4] == pytest.approx(RATIO, abs=0.05)  # Adafactor: blocks of rows x columns, near RATIO


def test_trainer_with_an_unprunable_optimizer_fails_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match=r"SGD \(state keys: .*momentum_buffer"):
        train_with_optimizer(tmp_path, "sgd", lambda params: torch.optim.SGD(params, lr=PEAK, momentum=0.9))

