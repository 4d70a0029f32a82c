"""TrainConfig as a new user writes it: YAML spellings, presets shortened with --steps."""

import random

import pytest
import yaml

from relora.models import ConfigError
from relora.run_config import resolve_config


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
