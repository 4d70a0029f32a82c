"""TrainConfig as a new user writes it: YAML spellings, presets shortened with --steps."""

import math
import random
from fractions import Fraction

import pytest
import yaml

from relora.errors import ConfigError
from relora.models import load_preset
from relora.run.config import RESUME_INCOMPATIBLE, TrainConfig
from relora.run.resolve import SCALED_WITH_STEPS, resolve_config, resume_config


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3': the user means a number
    rng = random.Random(0)
    lr, relora_lr, alpha = (rng.randint(1, 9) for _ in range(3))
    text = f"lr: {lr}e-3\nrelora_lr: {relora_lr}E-3\nalpha: {alpha}e1\nsteps: 1e3\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert all(isinstance(v, str) for v in yaml.safe_load(text).values())  # the premise
    config = resolve_config(config_file=path, overrides={"device": "cpu"})
    assert config.lr == pytest.approx(lr / 1000)
    assert config.relora_lr == pytest.approx(relora_lr / 1000)
    assert config.alpha == pytest.approx(alpha * 10)
    assert config.steps == 1000 and type(config.steps) is int


@pytest.mark.parametrize("line, field", [("lr: fast", "lr"), ("steps: 25e-1", "steps"), ("lr: nan", "lr"),
                                         ("rank: 1e-3", "rank")])
def test_non_numeric_string_is_still_refused(tmp_path, line, field):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"^{field} must be ") as info:
        resolve_config(config_file=path, overrides={"device": "cpu"})
    assert len(str(info.value).splitlines()) == 1


def test_string_fields_keep_numeric_looking_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("wandb_project: 1e3\n")
    assert resolve_config(config_file=path, overrides={"device": "cpu"}).wandb_project == "1e3"


@pytest.mark.parametrize("preset, steps", [("tiny", 60), ("tiny", 2000), ("60m", 100), ("20m", 31)])
def test_steps_scales_the_presets_schedule(preset, steps):
    train = load_preset(preset)["train"]
    config = resolve_config(overrides={"preset": preset, "steps": steps, "device": "cpu"})
    assert config.steps == steps
    for name in SCALED_WITH_STEPS:
        expected = train.get(name, getattr(TrainConfig, name))
        if expected > 0:
            expected = max(1, math.floor(Fraction(expected * steps, train["steps"])))
        assert getattr(config, name) == expected, name
    assert config.relora_phase_start < config.steps
    cycles = (config.steps - config.warm_start_steps) / config.reset_every
    assert cycles == pytest.approx((train["steps"] - train["warm_start_steps"]) / train["reset_every"], rel=0.25)


def test_steps_leaves_explicit_settings_alone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reset_every: 20\n")
    config = resolve_config(config_file=path, overrides={"preset": "tiny", "steps": 240, "eval_every": 7,
                                                         "device": "cpu"})
    assert (config.reset_every, config.eval_every, config.warm_start_steps) == (20, 7, 60)
    assert resolve_config(overrides={"preset": "tiny", "device": "cpu"}).warm_start_steps == 120  # no --steps


def test_explicit_warm_start_too_long_names_the_flag():
    with pytest.raises(ConfigError, match=r"warm_start_steps \(120\) must be < steps \(60\).*--warm-start-steps"):
        resolve_config(overrides={"preset": "tiny", "steps": 60, "warm_start_steps": 120, "device": "cpu"})


def test_cli_train_preset_with_fewer_steps_validates(tmp_path, capsys):
    # no data: the run fails on the data directory, i.e. after the schedule was accepted
    from relora.cli import main

    assert main(["train", "--preset", "tiny", "--steps", "60", "--data", str(tmp_path / "none"),
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "warm_start_steps" not in err.splitlines()[-1] and "none" in err.splitlines()[-1]
    assert main(["train", "--preset", "tiny", "--steps", "60", "--warm-start-steps", "120",
                 "--out", str(tmp_path / "run2"), "--device", "cpu", "--no-progress"]) == 2
    assert "--warm-start-steps" in capsys.readouterr().err


# What the code before issue 19 refused on resume (a hand-written tuple then): runs it wrote are resumed and
# reused by `relora compare` only if the set derived from the fields is this one.
RESUME_INCOMPATIBLE_BEFORE = {
    "preset", "method", "model", "vocab_size", "data", "steps", "warmup_steps", "warm_start_steps",
    "reset_every", "merge_every", "restart_warmup_steps", "rank", "alpha", "dropout", "target_modules",
    "prune", "prune_ratio", "restart_adam_step", "lr", "relora_lr", "min_lr_ratio", "weight_decay", "beta1", "beta2",
    "grad_clip", "batch_tokens", "micro_batch", "seq_len", "sampling", "init_from", "seed",
    "restarts", "optimizer_reset", "jagged", "warm_start", "distributed", "quantize", "master_weights",
    "frozen_dtype", "proj_lr", "proj_rank", "update_proj_gap", "proj_scale", "scale_front", "reference_defects",
    "matrix_lr_scale",  # added later with default 1.0: a run saved without it is the same run
}


def test_resume_incompatible_settings_are_those_runs_were_written_with():
    assert set(RESUME_INCOMPATIBLE) == RESUME_INCOMPATIBLE_BEFORE
    assert len(RESUME_INCOMPATIBLE) == len(set(RESUME_INCOMPATIBLE))


def test_resume_merges_flags_over_the_saved_config(tmp_path):
    saved = resolve_config(overrides={"device": "cpu", "out": str(tmp_path)}).to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    config, changed = resume_config(overrides={"out": str(tmp_path), "eval_every": 7, "threads": 1})
    assert (config.eval_every, config.threads, config.rank, config.steps) == (7, 1, saved["rank"], saved["steps"])
    assert changed == ["eval_every", "threads"]
    with pytest.raises(ConfigError, match="different rank, alpha;"):
        resume_config(overrides={"out": str(tmp_path), "rank": 2 * saved["rank"], "alpha": 2 * saved["alpha"]})
    with pytest.raises(ConfigError, match="different relora_lr;"):  # --lr of an adapter method is relora_lr
        resume_config(overrides={"out": str(tmp_path)}, peak_lr=5e-3)
    with pytest.raises(ConfigError, match="no run to resume"):
        resume_config(overrides={"out": str(tmp_path / "none")})


def test_a_full_rank_run_is_compatible_with_any_value_of_a_setting_it_never_reads():
    """incompatible_changes skips what the saved run's method never reads (unread_settings), so that a full-rank
    run saved under an older adapter default is still reused; an adapter run still refuses the same change."""
    from relora.run.config import ADAPTER_ONLY, PROJECTION_ONLY, incompatible_changes, unread_settings

    base = TrainConfig().to_dict()
    for method, reads in (("full", ()), ("full-ws-lr", ("relora_lr",))):
        saved = {**base, "method": method}
        assert set(unread_settings(method)) == set(ADAPTER_ONLY + PROJECTION_ONLY) - set(reads)
        flipped = {"restart_adam_step": "keep" if base["restart_adam_step"] == "reset" else "reset",
                   "rank": 2 * base["rank"], "proj_rank": 7}
        assert incompatible_changes(saved, {**saved, **flipped}) == []
        assert incompatible_changes(saved, {**saved, **flipped, "lr": 2 * base["lr"]}) == ["lr"]
        if reads:
            assert incompatible_changes(saved, {**saved, "relora_lr": 3 * base["lr"]}) == ["relora_lr"]
    saved = {**base, "method": "relora"}
    assert unread_settings("relora") == ()
    changed = incompatible_changes(saved, {**saved, "restart_adam_step": "keep", "rank": 2 * base["rank"]})
    assert set(changed) == {"rank", "restart_adam_step"}
