"""Long runs survive faults: SIGKILL anywhere, corrupt checkpoints, non-finite numbers, a full disk."""

import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, one_thread, run_config
from safetensors.torch import load_file

import relora.train
from relora.errors import DivergedError
from relora.run import checkpoint as ckpt
from relora.train import train

PROBES = Path(__file__).parent / "dist_scripts" / "train_with_probes.py"
# 40 steps, restarts at 20 and 30, a checkpoint every 5 steps: kills land between, in and around all of them
SETTINGS = dict(model=TINY_MODEL, steps=40, warmup_steps=4, warm_start_steps=10, reset_every=10,
                restart_warmup_steps=3, rank=4, alpha=8, lr=3e-3, relora_lr=6e-3, batch_tokens=256, micro_batch=4,
                seq_len=32, eval_every=20, eval_tokens=1024, save_every=5, keep_checkpoints=2, log_every=1,
                device="cpu")
DiskUsage = collections.namedtuple("DiskUsage", "total used free")
LAYERS_PER_MERGE = 14  # 2 layers x q, k, v, o, gate, up, down


def launch(out, data, tmp_path, *args, probe="none", kill_at=0):
    config = tmp_path / "reliability.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    command = [sys.executable, str(PROBES), "--config", str(config), "--data", str(data), "--out", str(out),
               "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE": probe, "KILL_AT": str(kill_at)}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(out, data, tmp_path):
    """Resume (or, if the kill came before the run directory had a config, start) and run to the end."""
    args = ["--resume"] if (out / "config.yaml").is_file() else []
    proc = launch(out, data, tmp_path, *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def final_weights(run):
    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(prepared_data, tmp_path_factory):
    """The uninterrupted run, in a subprocess with the same thread count as the killed ones."""
    tmp = tmp_path_factory.mktemp("reference")
    finish(tmp / "run", prepared_data, tmp)
    return tmp / "run"


def assert_same_weights(run, reference):
    got, expected = final_weights(run), final_weights(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "resumed weights differ from the uninterrupted run"


def killed_and_resumed(kind, kill_at, prepared_data, tmp_path, stops=None):
    """Run with a probe that SIGKILLs it, then resume to the end; ``stops`` gets where the kill landed."""
    out = tmp_path / f"{kind}-{kill_at}"
    proc = launch(out, prepared_data, tmp_path, probe=kind, kill_at=kill_at)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    if stops is not None:
        stops.append(stopped_at(out))
    finish(out, prepared_data, tmp_path)
    return out


def stopped_at(out: Path) -> tuple[int, int]:
    """Where a killed run stopped: its last logged step and the step of its newest complete checkpoint."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    logged = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    saved = ckpt.latest_checkpoint(out / "checkpoints", verify=True)
    return (logged[-1] if logged else 0, ckpt.read_trainer_state(saved)["step"] if saved else 0)


def assert_same_records(run, reference):
    """metrics.jsonl of a resumed run == the uninterrupted run's, timing fields aside."""
    def read(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "peak_mem_bytes")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert read(run) == read(reference)


@pytest.mark.parametrize(("kind", "kill_at"), [
    ("kill_in_merge", LAYERS_PER_MERGE + 5),  # halfway through the second restart's merge (step 30)
    ("kill_in_save", 3),  # the step-15 checkpoint: weights written, nothing else yet
])
def test_sigkill_inside_a_merge_or_a_save_resumes_to_identical_weights(kind, kill_at, prepared_data, reference_run,
                                                                       tmp_path):
    out = killed_and_resumed(kind, kill_at, prepared_data, tmp_path)
    assert_same_weights(out, reference_run)
    assert not list((out / "checkpoints").glob(".step_*")), "a killed save's temporary directory was left behind"


@pytest.mark.slow
def test_sigkill_at_random_moments_over_many_trials(prepared_data, reference_run, tmp_path):
    """12 trials: inside merges, inside saves, and at random steps; every resumed run ends bit-identical,
    with the uninterrupted run's metrics. Each kill is checked to have landed where the trial says."""
    rng = random.Random(0)
    trials = [("kill_in_merge", LAYERS_PER_MERGE + rng.randint(1, LAYERS_PER_MERGE - 1)),
              ("kill_in_merge", rng.randint(1, LAYERS_PER_MERGE - 1)),
              ("kill_in_save", 1), ("kill_in_save", 4), ("kill_in_save", 8)]
    stops = []
    for kind, kill_at in trials:
        out = killed_and_resumed(kind, kill_at, prepared_data, tmp_path, stops)
        assert_same_weights(out, reference_run)
        assert_same_records(out, reference_run)
    # (last logged step, newest complete checkpoint): inside the restart merges at 30 and 20 (logged after
    # the merge, so the record before is the last), inside the saves at 5, 20 and 40 (logged before the save)
    assert stops == [(29, 25), (19, 15), (5, 0), (20, 15), (40, 35)]
    random_stops = []
    for i in range(7):  # at a random step of the training loop, a random moment into it
        out, target = tmp_path / f"random-{i}", rng.randint(1, SETTINGS["steps"] - 2)
        proc = launch(out, prepared_data, tmp_path)
        wait_for_step(out, target, proc)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"trial {i}: the run ended before the kill"
        random_stops.append(stopped_at(out))
        finish(out, prepared_data, tmp_path)
        assert_same_weights(out, reference_run)
        assert_same_records(out, reference_run)
    logged = [step for step, _ in random_stops]
    assert len(set(logged)) >= 5 and min(logged) < 20 < max(logged), random_stops  # spread over the run
    assert all(step < SETTINGS["steps"] for step in logged)  # killed before the end: each resume had work to do


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    """Block until the run's metrics record ``step`` (it logs every step)."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if line.endswith("}")) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run exited ({proc.returncode}) before step {step}")


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])


@pytest.mark.parametrize(("how", "name"), [("truncate", "model.safetensors"), ("flip", "states.pt"),
                                          ("flip", "trainer_state.json")])
def test_resume_skips_a_corrupt_newest_checkpoint(how, name, prepared_data, tmp_path, caplog):
    settings = {**{k: v for k, v in SETTINGS.items() if k != "model"}, "keep_checkpoints": 10}
    with one_thread():
        uninterrupted = train(run_config(prepared_data, tmp_path / "full", **settings), progress=False)
    # the same run as if it had died right after saving step 25, and that save then got damaged on disk
    partial = Path(shutil.copytree(tmp_path / "full", tmp_path / "partial"))
    for path in ckpt.list_checkpoints(partial / "checkpoints"):
        if int(path.name.split("_")[1]) > 25:
            shutil.rmtree(path)
    shutil.rmtree(partial / "final")
    (partial / "summary.json").unlink()
    corrupt(partial / "checkpoints" / "step_25" / name, how)
    assert ckpt.verify_checkpoint(partial / "checkpoints" / "step_25") is not None
    with caplog.at_level("INFO"), one_thread():
        summary = train(run_config(prepared_data, partial, **settings), resume=True, progress=False)
    assert "checkpoint step_25 is corrupt" in caplog.text
    assert re.search(r"resumed from \S*step_20 \(step 20\)", caplog.text), caplog.text
    assert summary.val_loss == uninterrupted.val_loss
    assert_same_weights(partial, tmp_path / "full")


def test_nan_steps_are_skipped_and_counted(prepared_data, tmp_path, monkeypatch):
    loss_fn, calls = relora.train.lm_loss, [0]

    def nan_at_some_calls(model, batch):
        calls[0] += 1
        loss = loss_fn(model, batch)
        return loss * float("nan") if calls[0] in (7, 8, 23) else loss  # micro-batches 7, 8: step 4; 23: step 12

    monkeypatch.setattr(relora.train, "lm_loss", nan_at_some_calls)
    summary = train(run_config(prepared_data, tmp_path, steps=20, save_every=0), progress=False)
    assert summary.skipped_steps == 2
    assert summary.steps == 20 and summary.val_loss is not None and summary.val_loss == summary.val_loss


@pytest.mark.parametrize("action", ["rollback", "stop"])
def test_repeated_nans_roll_back_with_a_lower_lr_or_stop(action, prepared_data, tmp_path, monkeypatch, caplog):
    loss_fn, calls = relora.train.lm_loss, [0]
    poisoned = set(range(2 * 22 + 1, 2 * 26 + 1))  # every micro-batch of steps 22-25: 4 bad steps in a row

    def poisoned_loss(model, batch):
        calls[0] += 1
        loss = loss_fn(model, batch)
        return loss * float("nan") if calls[0] in poisoned else loss

    monkeypatch.setattr(relora.train, "lm_loss", poisoned_loss)
    cfg = run_config(prepared_data, tmp_path, steps=30, save_every=10, max_bad_steps=3, on_bad_steps=action)
    if action == "stop":
        with pytest.raises(DivergedError, match="4 consecutive steps had a non-finite loss"):
            train(cfg, progress=False)
        return
    with caplog.at_level("WARNING"):
        summary = train(cfg, progress=False)
    assert "rollback 1: back to step_20 with the LR scaled by 0.5" in caplog.text
    assert summary.steps == 30
    clean = run_config(prepared_data, tmp_path / "clean", steps=30, save_every=10)
    monkeypatch.setattr(relora.train, "lm_loss", loss_fn)
    train(clean, progress=False)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    clean_lrs = {r["step"]: r["lr"] for r in map(json.loads,
                                                   (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines())}
    assert lrs[28] == pytest.approx(0.5 * clean_lrs[28])  # after the rollback the run continues at half the LR
    assert lrs[15] == pytest.approx(clean_lrs[15])  # before the rollback point: the original LR


def test_a_streak_of_non_finite_steps_goes_on_counting_across_a_resume(prepared_data, tmp_path, monkeypatch):
    """Bad steps 9-12 with --max-bad-steps 3 stop the run; so they must when it resumes at step 10 in between."""
    loss_fn = relora.train.lm_loss

    def poison(bad_calls):  # 2 micro-batches a step: step index i makes calls 2i+1 and 2i+2 of a process
        calls = [0]

        def loss(model, batch):
            calls[0] += 1
            value = loss_fn(model, batch)
            return value * float("nan") if calls[0] in bad_calls else value
        return loss

    settings = dict(steps=20, save_every=10, max_bad_steps=3, on_bad_steps="stop")
    monkeypatch.setattr(relora.train, "lm_loss", poison(set(range(17, 25))))  # step indices 8-11
    with pytest.raises(DivergedError, match="4 consecutive steps had a non-finite loss or gradient norm, up to step 11"):
        train(run_config(prepared_data, tmp_path / "uninterrupted", **settings), progress=False)
    # the same run up to its step-10 checkpoint (indices 8 and 9 bad), then resumed with indices 10 and 11 bad
    monkeypatch.setattr(relora.train, "lm_loss", poison(set(range(17, 21))))
    train(run_config(prepared_data, tmp_path / "resumed", **settings), progress=False)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_20")
    monkeypatch.setattr(relora.train, "lm_loss", poison({1, 2, 3, 4}))  # calls of steps 10, 11 after the resume
    with pytest.raises(DivergedError, match="4 consecutive steps had a non-finite loss or gradient norm, up to step 11"):
        train(run_config(prepared_data, tmp_path / "resumed", **settings), resume=True, progress=False)


def test_a_full_disk_fails_before_writing(prepared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9, 1000))
    with pytest.raises(ckpt.DiskSpaceError, match="not enough disk space for a checkpoint"):
        train(run_config(prepared_data, tmp_path, steps=4, warm_start_steps=2, reset_every=2,
                         restart_warmup_steps=1, save_every=2), progress=False)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sigterm_checkpoints_the_current_step_and_resumes_to_identical_weights(prepared_data, reference_run,
                                                                              tmp_path):
    out = tmp_path / "sigterm"
    proc = launch(out, prepared_data, tmp_path)
    wait_for_step(out, 12, proc)  # between the periodic saves (every 5 steps)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # interrupted, not failed
    assert "SIGTERM received: saving a checkpoint after this step" in err
    saved = ckpt.latest_checkpoint(out / "checkpoints", verify=True)
    assert saved is not None and ckpt.read_trainer_state(saved)["step"] >= 12
    finish(out, prepared_data, tmp_path)
    assert_same_weights(out, reference_run)


@pytest.mark.parametrize("resume_at", [None, 21, 23])
def test_a_loss_spike_after_a_restart_is_logged_with_the_restart_number(caplog, resume_at):
    from relora.core.controller import StepEvent
    from relora.run.watch import SpikeWatch

    class Controller:
        restarts = 0

    controller, watch = Controller(), SpikeWatch(restart_warmup_steps=3)
    losses = {step: 3.0 for step in range(1, 51)}
    losses[12] = 4.0  # one noisy step after the restart at 10: not a spike
    losses.update({22: 4.0, 23: 4.2, 24: 3.8})  # 3 steps in a row after the restart at 20: a spike
    losses.update({45: 4.0, 46: 4.0, 47: 4.0})  # 15 steps after the restart at 30: outside its window (3 + 10)
    with caplog.at_level("WARNING"):
        for step, loss in losses.items():
            event = None
            if step in (10, 20, 30):
                controller.restarts += 1
                event = StepEvent(step=step, merged=True, restarted=True)
            watch.observe(step, loss, event, controller)
            if step == resume_at:  # a checkpoint here, then a new process: the spike inside the window is still seen
                saved = json.loads(json.dumps(watch.state_dict()))  # as the trainer state is written
                watch = SpikeWatch(restart_warmup_steps=3)
                watch.load_state_dict(saved)
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    # the baseline is the mean of steps 11-20, noisy step 12 included: 3.1
    assert spikes == ["loss spike after restart 2: 4.000 on average over steps 22-24 against 3.100 before it; "
                      "a longer --restart-warmup-steps may help"]
