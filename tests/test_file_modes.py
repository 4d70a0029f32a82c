"""What relora writes gets the modes the user's umask asks for, like any file the user makes.

(Temporary directories renamed into place are 0o700, and safetensors writes 0o600 files: published as
they are, a run's model would be readable by its owner only.)
"""

import os
import stat
from pathlib import Path

import pytest
from conftest import run_config

from relora.cli import main


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def assert_umask_modes(root: Path, mask: int) -> int:
    """Every directory is 0o777 & ~mask, every file 0o666 & ~mask; returns how many paths were checked."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == expected, f"{path.relative_to(root.parent)}: {oct(mode)} != {oct(expected)}"
    return len(paths)


def test_run_export_and_prepare_follow_the_umask(umask, prepared_data, tmp_path, capsys):
    from relora.train import train

    cfg = run_config(prepared_data, tmp_path / "run", steps=12, warm_start_steps=4, reset_every=4, eval_every=0,
                     save_every=6, keep_checkpoints=2)
    train(cfg, progress=False)
    run = tmp_path / "run"
    for name in ("final", "reference", "checkpoints/step_6", "checkpoints/step_12"):
        assert (run / name).is_dir(), name
    assert (run / "final" / "model.safetensors").is_file()
    assert assert_umask_modes(run, umask) > 10

    assert main(["export", str(run / "checkpoints" / "step_6"), str(tmp_path / "export")]) == 0
    assert assert_umask_modes(tmp_path / "export", umask) > 2

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"document {i} " + "some words to tokenize " * (i + 1))
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "prepared"), "--vocab-size", "300",
                 "--no-progress"]) == 0
    assert assert_umask_modes(tmp_path / "prepared", umask) > 3

