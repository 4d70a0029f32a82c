"""The training loop end to end on a tiny model (RELORA_SPEC.md sections 5-7)."""

import json
import math
import shutil

import pytest
import torch
from conftest import run_config, without_test_split
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import relora
from relora.analysis.compare_sets import ABLATION_SET, RunSpec, ablation_switches
from relora.cli import main
from relora.errors import ConfigError
from relora.core.adapters import find_targets
from relora.run import checkpoint as ckpt
from relora.run.build import make_model
from relora.run.phase import build_phase
from relora.run.state import RunState
from relora.train import train

METRIC_FIELDS = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "optimizer_state_bytes",
                 "restarts", "pruned_fraction"}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "control", "lora", "lora-ws", "relora", "online-relora"])
def test_every_method_trains_and_loss_falls(method, prepared_data, tmp_path):
    extra = {"merge_every": 5} if method == "online-relora" else {}
    summary = train(run_config(prepared_data, tmp_path / method, method=method, **extra), progress=False)
    logged = records(tmp_path / method)
    assert METRIC_FIELDS <= set(logged[0])
    first = sum(r["loss"] for r in logged[:5]) / 5
    last = sum(r["loss"] for r in logged[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary.val_ppl is not None and summary.val_ppl < 512  # better than uniform over the vocabulary
    assert {"val_loss", "val_ppl"} <= set(logged[-1])
    assert (tmp_path / method / "final" / "config.json").is_file()
    if method in ("relora", "online-relora"):
        assert summary.restarts == 2  # steps 20 and 30 (warm start 10, reset every 10, 40 steps)
    else:
        assert summary.restarts == 0
    if method == "online-relora":
        assert summary.merges == 5  # every 5 steps from step 10: 15, 20, 25, 30, 35


def test_restarts_happen_at_configured_steps_with_zero_lr(prepared_data, tmp_path):
    train(run_config(prepared_data, tmp_path), progress=False)
    logged = {r["step"]: r for r in records(tmp_path)}
    assert [s for s, r in logged.items() if r.get("restart")] == [20, 30]
    # the step right after a restart (index t_k, completing as t_k + 1) runs at LR exactly 0
    assert logged[21]["lr"] == 0.0 and logged[31]["lr"] == 0.0
    assert all(r["lr"] > 0 for s, r in logged.items() if s > 1 and s not in (21, 31))
    assert logged[20]["pruned_fraction"] > 0.9
    assert logged[30]["restarts"] == 2


def test_warm_start_is_full_rank_then_adapters(prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path)
    model = make_model(cfg, 512)
    phase = build_phase(cfg, model, wrapped=False)
    assert phase.controller is None
    n_full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in phase.optimizer.param_groups for p in g["params"]) == n_full
    summary = train(cfg, progress=False)
    assert summary.trainable_params < n_full  # embeddings and head dominate this tiny model
    logged = records(tmp_path)
    assert not logged[9]["wrapped"] and logged[10]["wrapped"]


def test_full_ws_lr_is_full_rank_with_the_warm_started_lr_schedule(prepared_data, tmp_path):
    """The control: every weight trains, the logged LR is lr * schedule before warm_start_steps and
    relora_lr * schedule from there (no re-warmup), and a resume across the change is bit-identical."""
    settings = dict(method="full-ws-lr", save_every=5, keep_checkpoints=20)
    cfg = run_config(prepared_data, tmp_path / "whole", **settings)
    summary = train(cfg, progress=False)
    assert summary.trainable_params == summary.total_params and summary.restarts == 0
    logged = records(tmp_path / "whole")
    for r in logged:  # record s holds the LR of step index s - 1
        t = r["step"] - 1
        peak = 6e-3 if t >= 10 else 3e-3
        assert r["lr"] == pytest.approx(peak * relora.jagged_cosine(t, total_steps=40, warmup_steps=4)), t
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    shutil.rmtree(split / "final")
    for path in ckpt.list_checkpoints(split / "checkpoints"):
        if int(path.name.split("_")[1]) > 5:  # resume before the change
            shutil.rmtree(path)
    train(run_config(prepared_data, split, **settings), resume=True, progress=False)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "whole", split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_ws_lr_needs_a_warm_start_inside_the_run(prepared_data, tmp_path):
    for bad in (dict(warm_start_steps=40), dict(warm_start_steps=0), dict(warm_start=False)):
        with pytest.raises(ConfigError, match="full-ws-lr changes its peak LR at --warm-start-steps"):
            run_config(prepared_data, tmp_path, method="full-ws-lr", **bad)


ABLATION_CASES = [s for s in ABLATION_SET if s.settings["method"] != "full"] + [
    RunSpec("relora-no-restarts", {"method": "relora", "restarts": False}),  # --no-restarts alone
    RunSpec("relora-no-optimizer-reset", {"method": "relora", "optimizer_reset": False}),
    RunSpec("relora-no-jagged", {"method": "relora", "jagged": False}),
]


@pytest.mark.parametrize("spec", ABLATION_CASES, ids=lambda s: s.name)
def test_ablation_switches_change_what_they_say(spec, prepared_data, tmp_path, monkeypatch):
    """Each component a run is labelled with (relora compare's Table 6 columns) is there, and only those:
    merges at the restart steps, 99% of the adapters' second moments zero after them, LR 0 right after
    them, adapters from step 0 or after the warm start."""
    import relora.core.controller

    cfg = run_config(prepared_data, tmp_path, steps=24, warm_start_steps=8, reset_every=8, restart_warmup_steps=2,
                     eval_every=0, **spec.settings)
    on = ablation_switches(cfg)
    zero_after_prune, prune = [], relora.core.controller.prune_optimizer_state

    def counting_prune(optimizer, params, *args, **kwargs):  # an independent count of zeroed second moments
        params = list(params)
        result = prune(optimizer, params, *args, **kwargs)
        v = torch.cat([optimizer.state[p]["exp_avg_sq"].flatten() for p in params])
        zero_after_prune.append(float((v == 0).float().mean()))
        return result

    monkeypatch.setattr(relora.core.controller, "prune_optimizer_state", counting_prune)
    summary = train(cfg, progress=False)
    logged = {r["step"]: r for r in records(tmp_path)}
    start = 8 if on["warm_start"] else 0
    merged_at = [s for s in sorted(logged) if logged[s]["merges"] > logged.get(s - 1, {"merges": 0})["merges"]]
    pruned = [z > 0.9 for z in zero_after_prune]
    zero_lr_at = [s for s in sorted(logged) if s > 1 and logged[s]["lr"] == 0.0]  # record s: LR of step index s - 1
    # what was seen is what the label says, component by component
    assert (bool(merged_at), any(pruned), bool(zero_lr_at), not logged[1]["wrapped"]) == (
        on["restarts"], on["optimizer_reset"], on["jagged"], on["warm_start"])
    # and where: merges at the restart steps, each one pruned or none, LR 0 right after each
    due = list(range(start + 8, 24, 8)) if on["restarts"] else []
    assert merged_at == due and summary.merges == len(due) and logged[24]["wrapped"]
    assert pruned == [on["optimizer_reset"]] * len(due), zero_after_prune
    assert zero_lr_at == ([t + 1 for t in due] if on["jagged"] else [])


def test_the_same_seed_repeats_a_run_with_dropout_and_ranks_draw_apart(prepared_data, tmp_path):
    """Adapter dropout draws from the global RNG: a run seeds it, so a second run in the same process (whose
    RNG was left elsewhere by the first) repeats the first exactly; before, the two differed from the switch."""
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    runs = []
    for name in ("a", "b"):
        torch.rand(7)  # move the process's stream, as anything between two runs may
        train(run_config(prepared_data, tmp_path / name, dropout=0.1, steps=16, warm_start_steps=4), progress=False)
        runs.append(strip(records(tmp_path / name)))
    assert runs[0] == runs[1]
    ckpt.seed_rng_states(0, rank=0)
    rank0 = torch.rand(4)
    ckpt.seed_rng_states(0, rank=1)
    assert not torch.equal(torch.rand(4), rank0)
    ckpt.seed_rng_states(0, rank=0)
    assert torch.equal(torch.rand(4), rank0)


@pytest.mark.parametrize("resume_step", [10, 25])
def test_resume_is_bit_identical(resume_step, prepared_data, tmp_path):
    """A run of 40 steps == the same run stopped at `resume_step` and resumed (CPU), metrics included.

    A record every 3 steps: the checkpoints at 10 and 25 fall inside a logging window, whose first
    steps (before the resume) the next record must still average.
    """
    full = tmp_path / "full"
    settings = dict(save_every=5, keep_checkpoints=20, log_every=3, weight_decay=0.1)  # two groups, W decayed
    train(run_config(prepared_data, full, **settings), progress=False)
    split = tmp_path / "split"
    shutil.copytree(full, split)
    shutil.rmtree(split / "final")
    for path in ckpt.list_checkpoints(split / "checkpoints"):
        if int(path.name.split("_")[1]) > resume_step:
            shutil.rmtree(path)
    cfg = run_config(prepared_data, split, **settings)
    train(cfg, resume=True, progress=False)
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(split))
    assert [r["step"] for r in records(full)][:5] == [3, 6, 9, 12, 15]
    # trainer_state.json keeps the keys (and their order) of every earlier version: val_loss once evaluated,
    # lr_scale once resumed
    assert list(ckpt.read_trainer_state(full / "checkpoints" / "step_10")) == TRAINER_STATE_KEYS
    assert list(ckpt.read_trainer_state(full / "checkpoints" / "step_20")) == [*TRAINER_STATE_KEYS, "val_loss"]
    resumed = ckpt.read_trainer_state(split / "checkpoints" / "step_40")
    assert list(resumed) == [*TRAINER_STATE_KEYS, "val_loss", "lr_scale"] and resumed["lr_scale"] == 1.0


TRAINER_STATE_KEYS = ["step", "tokens", "wall_s", "train_s", "skipped_steps", "wrapped", "peak_optimizer_state_bytes",
                      "vocab_size", "world_size", "window_loss", "window_steps", "bad_streak", "spike_watch"]
# as the loop wrote it before RunState (step 10 of tests/golden's relora run)
SAVED_STATE = {"step": 10, "tokens": 2560, "wall_s": 0.449, "train_s": 0.308, "skipped_steps": 0, "wrapped": False,
               "peak_optimizer_state_bytes": 427348, "vocab_size": 512, "world_size": 1, "window_loss": 0.0,
               "window_steps": 0, "bad_streak": 0,
               "spike_watch": {"recent": [6.25, 6.24], "baseline": None, "until": -1, "restart": 0, "above": []},
               "val_loss": 5.991}


def test_trainer_state_reads_and_writes_back_exactly_as_saved():
    for saved in (SAVED_STATE, {**SAVED_STATE, "lr_scale": 0.25}):
        state = RunState.from_dict(saved)
        assert json.dumps(state.to_dict()) == json.dumps(saved)  # keys, values and order
    assert RunState.from_dict(SAVED_STATE).scale == 1.0  # never resumed: the LR as configured
    assert RunState.from_dict({**SAVED_STATE, "lr_scale": 0.25}).scale == 0.25


def test_trainer_state_of_an_older_version_takes_defaults_and_keeps_unknown_keys():
    """A checkpoint from before the spike watch, the logging window and the optimizer-state peak resumes;
    a key of another version is written back as it was read."""
    old = {"step": 15, "tokens": 3840, "wall_s": 1.5, "skipped_steps": 2, "wrapped": True, "vocab_size": 512,
           "world_size": 2, "from_the_future": [1, 2]}
    state = RunState.from_dict(old)
    assert (state.train_s, state.window_steps, state.bad_streak, state.peak_optimizer_state_bytes) == (0.0, 0, 0, 0)
    assert state.spike_watch is None and state.val_loss is None and state.scale == 1.0
    written = state.to_dict()
    assert {k: written[k] for k in old} == old
    assert set(written) == {*TRAINER_STATE_KEYS, "from_the_future"} - {"spike_watch"}


@pytest.mark.parametrize("key", ["step", "tokens", "wall_s", "skipped_steps", "wrapped", "vocab_size"])
def test_trainer_state_without_a_key_every_version_wrote_is_refused(key):
    with pytest.raises(KeyError, match=key):
        RunState.from_dict({k: v for k, v in SAVED_STATE.items() if k != key})


def test_weight_decay_skips_norms_embeddings_and_a(prepared_data, tmp_path):
    """Two AdamW groups: decay for the linear maps' matrices, the head and the adapters' B; none for norms,
    embeddings and A. Checked before and after the switch to adapters."""
    cfg = run_config(prepared_data, tmp_path, weight_decay=0.1)
    model = make_model(cfg, 512)
    for wrapped in (False, True):
        if wrapped:
            relora.wrap(model, cfg.relora_config())
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {0.1: set(), 0.0: set()}
        for group in build_phase(cfg, model, wrapped=wrapped).optimizer.param_groups:
            decay[group["weight_decay"]] |= {names[id(p)] for p in group["params"]}
        plain = {n for n in names.values() if n.endswith("norm.weight") or "embed_tokens" in n or ".lora_A." in n}
        assert decay[0.0] == plain and len(plain) == (2 * 2 + 2 + 14 * wrapped)  # 2 norms x 2 layers, final, embed
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert decay[0.1] == trainable - plain and "lm_head.weight" in decay[0.1]


@pytest.mark.parametrize("method", ["full", "full-ws-lr", "control"])
def test_matrix_lr_scale_steps_the_wrapped_matrices_at_that_multiple_of_the_lr(method, prepared_data, tmp_path):
    """The matrices ReLoRA would wrap step at matrix_lr_scale times the LR of the rest, at every step of the
    schedule; one AdamW step checked against its closed form (first step: lr * g / (|g| + eps))."""
    from relora.data import TokenWindows, load_prepared
    from relora.run.evaluation import lm_loss

    cfg = run_config(prepared_data, tmp_path, method=method, matrix_lr_scale=0.25, weight_decay=0.1)
    model = make_model(cfg, 512)
    modules = dict(model.named_modules())
    targets = {id(modules[n].weight) for n in find_targets(model)}
    phase = build_phase(cfg, model, wrapped=False)
    groups = phase.optimizer.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(targets) == 14
    for _ in range(3):  # into the warm-up: the LR changes at every step
        phase.scheduler.step()
        base = {g["lr"] for g in groups if not {id(p) for p in g["params"]} & targets}
        scaled = {g["lr"] for g in groups if {id(p) for p in g["params"]} & targets}
        assert all({id(p) in targets for p in g["params"]} in ({True}, {False}) for g in groups)
        assert len(base) == len(scaled) == 1 and scaled.pop() == pytest.approx(0.25 * base.pop(), rel=1e-12)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    batch = TokenWindows(load_prepared(prepared_data).train, cfg.seq_len, mode="sequential").get(torch.arange(4))
    lm_loss(model, batch).backward()
    phase.optimizer.step()
    for group in groups:
        for p in group["params"]:
            expected = before[id(p)] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * p.grad / (
                p.grad.abs() + group["eps"])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    q, lr = modules["model.layers.0.self_attn.q_proj"].weight, groups[0]["lr"]
    adam_step = before[id(q)] * (1 - 0.25 * lr * 0.1) - q.detach()  # the decay taken out
    assert float(adam_step.abs().max()) == pytest.approx(0.25 * lr, rel=1e-3)  # a sign-like first step: lr x 1


def test_matrix_lr_scale_is_refused_outside_full_rank_methods_and_dropped_by_compare(prepared_data, tmp_path):
    from relora.analysis.compare_sets import resolve_run

    for method in ("lora", "relora", "galore"):
        with pytest.raises(ConfigError, match="drop --matrix-lr-scale"):
            run_config(prepared_data, tmp_path, method=method, matrix_lr_scale=0.5)
    with pytest.raises(ConfigError, match="matrix_lr_scale must be > 0"):
        run_config(prepared_data, tmp_path, method="full", matrix_lr_scale=0.0)
    overrides = dict(run_config(prepared_data, tmp_path).__dict__, matrix_lr_scale=0.25)
    overrides.pop("method")
    got = {name: resolve_run(RunSpec(name, {"method": name}), tmp_path, preset=None, config_file=None,
                             overrides=dict(overrides)).matrix_lr_scale for name in ("full", "relora")}
    assert got == {"full": 0.25, "relora": 1.0}  # compare runs the diagnostic on the full-rank rows alone


def test_weight_decay_decays_the_frozen_weight_like_adamw(prepared_data, tmp_path):
    """LoRA from step 0 (no merges): each step scales the frozen W by (1 - lr_t wd), as AdamW would a
    trained W; so W at the end is W at step 0 times the product over the logged LRs."""
    cfg = run_config(prepared_data, tmp_path, method="lora", steps=12, weight_decay=0.5, save_every=0)
    train(cfg, progress=False)
    start = load_file(tmp_path / "reference" / "model.safetensors")  # the weights at step 0
    end = load_file(ckpt.latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors")
    factor = 1.0
    for record in records(tmp_path):
        if "loss" in record:
            factor *= 1.0 - record["lr"] * 0.5
    assert factor < 0.99
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w0, w1 = start[f"{name}.weight"].double(), end[f"{name}.base_layer.weight"].double()
        torch.testing.assert_close(w1, w0 * factor, rtol=1e-5, atol=0)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(start[norm], end[norm])  # trained, not decayed: the group test checks which


def test_bf16_frozen_weights_resume_bit_identical_with_their_merge_residual(prepared_data, tmp_path):
    """--frozen-dtype bfloat16: the merge residual is checkpointed, so a resume between merges is exact."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(write_config(tmp_path, prepared_data)), "--out", str(full),
                 "--frozen-dtype", "bfloat16", "--no-progress"]) == 0
    cfg = run_config(prepared_data, full, save_every=5, keep_checkpoints=20, frozen_dtype="bfloat16")
    assert ckpt.read_config(full / "checkpoints" / "step_25")["frozen_dtype"] == "bfloat16"
    residuals = load_file(full / "checkpoints" / "step_25" / ckpt.MERGE_RESIDUALS)
    assert residuals and all(r.dtype == torch.float32 and r.abs().max() > 0 for r in residuals.values())
    weights = load_file(full / "checkpoints" / "step_25" / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    shutil.copytree(full, split)
    shutil.rmtree(split / "final")
    for path in ckpt.list_checkpoints(split / "checkpoints"):
        if int(path.name.split("_")[1]) > 25:
            shutil.rmtree(path)
    train(cfg.__class__(**{**cfg.to_dict(), "out": str(split)}), resume=True, progress=False)
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # residual added back, not rounded


def write_config(tmp_path, data):
    """The settings of ``run_config`` (saving every 5 steps) as a --config file for ``relora train``."""
    import yaml

    values = run_config(data, tmp_path, save_every=5, keep_checkpoints=20).to_dict()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != "out"}))
    return path


def test_exported_model_matches_training_model(prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path)
    train(cfg, progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    wrapped = make_model(cfg, 512)
    relora.wrap(wrapped, cfg.relora_config())
    ckpt.load_weights(wrapped, last)
    tokens = torch.randint(0, 512, (2, 32))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(exported).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(exported(tokens).logits, wrapped(tokens).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_checkpoints_are_pruned_to_keep_and_complete(prepared_data, tmp_path):
    train(run_config(prepared_data, tmp_path, save_every=10, keep_checkpoints=2), progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_30", "step_40"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sequential_sampling_refuses_too_many_steps(prepared_data, tmp_path):
    from relora.errors import ConfigError

    with pytest.raises(ConfigError, match="sampling random"):
        train(run_config(prepared_data, tmp_path, steps=100_000, warmup_steps=10), progress=False)


def test_reference_weights_are_saved_where_low_rank_training_starts(prepared_data, tmp_path):
    """relora analyze's default reference: the warm start's end, shared by full-rank and ReLoRA with equal seeds."""
    train(run_config(prepared_data, tmp_path / "full", method="full", steps=15), progress=False)
    train(run_config(prepared_data, tmp_path / "relora", steps=15), progress=False)
    train(run_config(prepared_data, tmp_path / "lora", method="lora", steps=15), progress=False)
    full = load_file(tmp_path / "full" / "reference" / "model.safetensors")
    warm = load_file(tmp_path / "relora" / "reference" / "model.safetensors")
    initial = load_file(tmp_path / "lora" / "reference" / "model.safetensors")
    assert full.keys() == warm.keys() == initial.keys() and not any("lora" in k for k in warm)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(full[name], warm[name])  # both at step 10, same seed, same data
    assert not torch.equal(warm[name], initial[name])  # lora starts from step 0
    final = load_file(tmp_path / "relora" / "final" / "model.safetensors")
    assert not torch.equal(final[name], warm[name])


def test_final_eval_reports_val_and_test_on_fixed_windows(prepared_data, tmp_path):
    """summary.json's val/test losses are the exported model's mean loss on the eval windows of each split, spread
    evenly over the split (window i * len / n)."""
    import torch.nn.functional as F

    from relora.data import TokenWindows, load_prepared

    cfg = run_config(prepared_data, tmp_path / "run", method="full", steps=6, eval_every=0)
    summary = train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    data = load_prepared(prepared_data)
    n = cfg.eval_tokens // cfg.seq_len
    for split in ("val", "test"):
        windows = TokenWindows(getattr(data, split), cfg.seq_len, mode="sequential")
        count = min(n, len(windows))
        batch = windows.get([i * len(windows) // count for i in range(count)])
        with torch.no_grad():
            logits = model(batch[:, :-1]).logits
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
        assert saved[f"{split}_loss"] == pytest.approx(expected, rel=1e-5)
        assert saved[f"{split}_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert summary.test_loss == saved["test_loss"] != saved["val_loss"]


def test_data_without_test_split_trains_with_no_test_loss(prepared_data, tmp_path):
    legacy = without_test_split(prepared_data, tmp_path / "legacy")
    summary = train(run_config(legacy, tmp_path / "run", method="full", steps=4, eval_every=0), progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["test_loss"] is None and saved["test_ppl"] is None and summary.val_loss is not None


def test_grad_clip_zero_means_no_clipping(prepared_data, tmp_path):
    """0 turns clipping off (GaLore's and APOLLO's setting): the same steps as a threshold no norm reaches."""
    runs = {clip: records_of(train(run_config(prepared_data, tmp_path / str(clip), method="full", steps=3,
                                              eval_every=0, grad_clip=clip, log_every=1), progress=False))
            for clip in (0.0, 1e9)}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    assert strip(runs[0.0]) == strip(runs[1e9])
    assert max(r["grad_norm"] for r in runs[0.0]) > 0.1


def records_of(summary):
    return records(summary.run_dir)
