"""The CPU thread policy (issue 15, section 2): explicit choices win, else the CPUs idle at start."""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import one_thread, run_config

from relora.run import threads


def fake_proc_stat(monkeypatch, samples: list[dict[str, tuple[int, int]]]) -> None:
    it = iter(samples)
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)


def test_idle_cpus_sums_each_allowed_cpus_idle_fraction(monkeypatch):
    rng = random.Random(0)
    allowed = sorted(os.sched_getaffinity(0))
    before, after, expected = {}, {}, 0.0
    for cpu in allowed:
        idle0, total0 = rng.randint(0, 10**6), rng.randint(10**6, 2 * 10**6)
        d_total = rng.randint(1, 1000)
        d_idle = rng.randint(0, d_total)
        before[f"cpu{cpu}"] = (idle0, total0)
        after[f"cpu{cpu}"] = (idle0 + d_idle, total0 + d_total)
        expected += d_idle / d_total
    not_ours = max(allowed) + 1  # a CPU outside the affinity mask, fully idle: must not count
    before[f"cpu{not_ours}"], after[f"cpu{not_ours}"] = (0, 0), (100, 100)
    fake_proc_stat(monkeypatch, [before, after])
    assert threads.idle_cpus() == pytest.approx(expected, rel=1e-12)


def test_cpu_times_read_real_proc_stat():
    times = threads._cpu_times()
    assert times is not None and len(times) >= len(os.sched_getaffinity(0))
    assert all(0 <= idle <= total for idle, total in times.values())


@pytest.mark.parametrize("idle, expected", [(2.0, 2), (1.85, 2), (1.7, 1), (1.0, 1), (0.05, 1)])
def test_auto_uses_the_idle_cpus(monkeypatch, idle, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "idle_cpus", lambda: idle)
    assert threads.choose_threads(0)[0] == expected


def test_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(threads, "idle_cpus", lambda: pytest.fail("an explicit choice must not sample"))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(5) == (5, "--threads")
    assert threads.choose_threads(0) == (3, "OMP_NUM_THREADS")


def test_unknown_idle_time_falls_back_to_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cpus", lambda: None)
    assert threads.choose_threads(0)[0] == threads.usable_cpus()


def test_train_applies_the_threads_setting(prepared_data, tmp_path, monkeypatch):
    from relora.train import train

    seen = []
    with one_thread():
        monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
        train(run_config(prepared_data, tmp_path / "run", steps=2, warm_start_steps=1, reset_every=1,
                         restart_warmup_steps=0, warmup_steps=0, eval_every=0, eval_tokens=64, threads=2),
              progress=False)
    assert seen[0] == 2  # (then one_thread restores its count)
    monkeypatch.undo()


def test_threads_flag_is_validated(prepared_data, tmp_path):
    from relora.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        run_config(prepared_data, tmp_path / "run", threads=-1).validate()
