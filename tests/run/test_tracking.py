"""Optional W&B logging: imported only when asked; a missing package is a one-line user error."""

import sys

import pytest

from relora.cli import main
from relora.errors import ConfigError
from relora.run.config import TrainConfig
from relora.run.tracking import log_wandb, start_wandb


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def test_config_with_wandb_but_no_package_is_refused(no_wandb):
    with pytest.raises(ConfigError, match="pip install wandb"):
        TrainConfig(wandb=True, wandb_project="p").validate()
    TrainConfig(wandb=False).validate()  # not asked: never looked for


def test_start_without_the_package_is_a_config_error(no_wandb, tmp_path):
    with pytest.raises(ConfigError, match="pip install wandb"):
        start_wandb(TrainConfig(wandb=True, out=str(tmp_path)))
    assert start_wandb(TrainConfig(out=str(tmp_path))) is None


def test_cli_wandb_without_the_package_exits_2_with_one_line(no_wandb, tmp_path, capsys):
    code = main(["train", "--wandb", "--wandb-project", "p", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "relora: error: --wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "run").exists()


def test_records_are_logged_as_numbers_at_their_step():
    class Run:
        def log(self, values, step):
            self.logged = (values, step)

    run = Run()
    log_wandb(run, {"step": 7, "loss": 2.5, "restarts": 1, "restart": True, "pruned_fraction": None})
    assert run.logged == ({"loss": 2.5, "restarts": 1}, 7)
    log_wandb(None, {"step": 1})  # disabled: nothing to do
