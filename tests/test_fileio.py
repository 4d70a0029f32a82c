"""The one directory swap: a crash or a failed rename never leaves neither copy (issue 19)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import tiny_llama

from relora import fileio


def make_dir(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.txt").write_text(text)
    return path


def test_swap_replaces_and_leaves_nothing_behind(tmp_path):
    final = make_dir(tmp_path / "final", "old")
    fileio.swap_dir(make_dir(tmp_path / ".new", "new"), final)
    assert (final / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_swap_into_an_empty_or_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    fileio.swap_dir(make_dir(tmp_path / ".a", "a"), tmp_path / "empty")
    fileio.swap_dir(make_dir(tmp_path / ".b", "b"), tmp_path / "missing")
    assert (tmp_path / "empty" / "weights.txt").read_text() == "a"
    assert (tmp_path / "missing" / "weights.txt").read_text() == "b"


def failing_second_rename(monkeypatch):
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("injected: the disk went away")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_a_failed_swap_puts_the_old_copy_back(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "final", "old")
    new = make_dir(tmp_path / ".new", "new")
    failing_second_rename(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        fileio.swap_dir(new, final)
    assert (final / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new", "final"]


def test_save_dense_that_fails_at_the_swap_keeps_the_previous_model(tmp_path, monkeypatch):
    from relora.run.export import save_dense

    out = save_dense(tiny_llama(seed=0), None, tmp_path / "final")
    before = (out / "model.safetensors").read_bytes()
    failing_second_rename(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        save_dense(tiny_llama(seed=1), None, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
