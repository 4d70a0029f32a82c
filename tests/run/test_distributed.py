"""Multi-process training under torchrun on CPU (gloo): DDP and FSDP2 against one process."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, run_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from relora.cli import main
from relora.errors import ConfigError
from relora.train import train

SCRIPTS = Path(__file__).parents[1] / "dist_scripts"
SETTINGS = dict(model=TINY_MODEL, steps=40, warmup_steps=4, warm_start_steps=10, reset_every=10,
                restart_warmup_steps=3, rank=4, alpha=8, lr=3e-3, relora_lr=6e-3, batch_tokens=512, micro_batch=4,
                seq_len=32, eval_every=20, eval_tokens=1024, save_every=20, log_every=1, device="cpu")


def torchrun(tmp_path, data, out, *args, nproc=2, script=None, env=None, timeout=240, settings=None):
    """``relora train`` in ``nproc`` processes; returns the completed process (output captured)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings or SETTINGS))
    target = [str(SCRIPTS / script)] if script else ["-m", "relora", "train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target,
               "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **(env or {})})


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    torch.set_num_threads(1)
    train(run_config(prepared_data, out, **{k: v for k, v in SETTINGS.items() if k != "model"}), progress=False)
    return out


def test_ddp_matches_one_process_and_weights_agree_after_every_merge(prepared_data, single_process_run, tmp_path):
    out, sums = tmp_path / "ddp", tmp_path / "checksums.jsonl"
    done = torchrun(tmp_path, prepared_data, out, script="train_with_probes.py",
                    env={"PROBE": "checksums", "PROBE_OUT": str(sums)})
    assert done.returncode == 0, done.stderr[-3000:]
    # same global batch, two ranks with two micro-batches each: the same curve up to float reduction order
    assert losses(out) == pytest.approx(losses(single_process_run), rel=1e-5)
    assert [r["step"] for r in records(out) if r.get("restart")] == [20, 30]
    merges = [json.loads(line) for line in sums.read_text().splitlines()]
    assert len(merges) == 2 and all(len(set(ranks)) == 1 and len(ranks) == 2 for ranks in merges)
    final = json.loads((out / "summary.json").read_text())
    assert final["val_loss"] == pytest.approx(json.loads((single_process_run / "summary.json").read_text())["val_loss"],
                                              rel=1e-5)
    assert "config:" in done.stdout and done.stdout.count("config:") == 1  # only rank 0 prints


def test_fsdp_trains_through_restarts_saves_sharded_resumes_and_exports(prepared_data, single_process_run, tmp_path):
    out = tmp_path / "fsdp"
    done = torchrun(tmp_path, prepared_data, out, "--distributed", "fsdp", "--steps", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    # merges, re-inits and pruning on sharded tensors compute what one process computes
    assert losses(out) == pytest.approx(losses(single_process_run), rel=1e-5)
    assert all(r["pruned_fraction"] > 0.9 for r in records(out) if r.get("restart"))
    step20 = out / "checkpoints" / "step_20"
    assert sorted(p.name for p in (step20 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step20 / "model.safetensors").exists()

    # resume the sharded step-20 checkpoint at another world size (1), as FSDP: the same curve
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (resumed / name).write_bytes((out / name).read_bytes())
    __import__("shutil").copytree(step20, resumed / "checkpoints" / "step_20")
    config = yaml.safe_load((resumed / "config.yaml").read_text())
    config["out"] = str(resumed)
    (resumed / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress"]) == 0
    assert losses(resumed) == pytest.approx(losses(out), rel=1e-5)

    # the dense export gathered on rank 0 equals a one-process load of the last sharded checkpoint
    exported = tmp_path / "exported"
    assert main(["export", str(out / "checkpoints" / "step_40"), str(exported)]) == 0
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out / "final")(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(exported)(tokens).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three torchrun launches (~16 s idle): the fast tier keeps issue 16's suite-time budget
def test_ddp_resume_with_dropout_repeats_every_ranks_random_draws(prepared_data, tmp_path):
    """Adapter dropout 0.1, each rank seeded differently: resumed at step 8 == uninterrupted, bit for bit.
    (With only rank 0's RNG state saved, rank 1 resumed with rank 0's dropout masks.)"""
    settings = {**SETTINGS, "dropout": 0.1, "steps": 16, "warm_start_steps": 4, "reset_every": 4,
                "restart_warmup_steps": 1, "save_every": 8, "keep_checkpoints": 2, "eval_every": 0}
    out, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    done = torchrun(tmp_path, prepared_data, out, script="train_with_probes.py", env={"PROBE": "rank_rng"},
                    settings=settings)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    (resumed / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes())
    __import__("shutil").copytree(out / "checkpoints" / "step_8", resumed / "checkpoints" / "step_8")
    config = yaml.safe_load((out / "config.yaml").read_text())
    (resumed / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(resumed)}))
    done = torchrun(tmp_path, prepared_data, resumed, "--resume", script="train_with_probes.py",
                    env={"PROBE": "rank_rng"}, settings=settings)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(resumed) == losses(out)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = torch.load(out / "checkpoints" / "step_8" / "states.pt", weights_only=False)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # one per rank


def test_rng_states_of_ranks_beyond_the_saved_ones_are_derived_and_warned(caplog):
    """Resumed at world size 3 from 2 saved states: ranks 0, 1 get theirs, rank 2 a deterministic new one."""
    import random

    import numpy as np

    from relora.run import checkpoint as ckpt

    def draws():
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()

    saved, expected = [], []
    for seed in (1, 2):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        saved.append(ckpt.rng_state())
        expected.append(draws())
    with caplog.at_level("WARNING", logger="relora.run.checkpoint"):
        for rank in (0, 1):
            ckpt.restore_rng_states(saved, rank=rank, world_size=3)
            assert draws() == expected[rank]
    assert len([r for r in caplog.records if "RNG states of 2" in r.message]) == 1  # rank 0 says it, once
    assert "ranks 2-2 start from states derived" in caplog.text
    derived = []
    for rank in (2, 2, 3):
        ckpt.restore_rng_states(saved, rank=rank, world_size=4)
        derived.append(draws())
    assert derived[0] == derived[1] and derived[0] != derived[2] and derived[0] not in expected


def test_a_crashing_rank_ends_the_job(prepared_data, tmp_path):
    start = time.monotonic()
    done = torchrun(tmp_path, prepared_data, tmp_path / "crash", "--dist-timeout-s", "30", script="train_with_probes.py",
                    env={"PROBE": "crash"}, timeout=120)
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr
    assert time.monotonic() - start < 90


def test_global_batch_must_split_over_the_processes(prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path, batch_tokens=256, micro_batch=4, seq_len=32)  # 8 sequences
    assert cfg.micro_steps(1) == 2 and cfg.micro_steps(2) == 1
    with pytest.raises(ConfigError, match="cannot be split into 3 process"):
        cfg.micro_steps(3)


def test_resume_refuses_another_parallelism(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(prepared_data, out, steps=4, warm_start_steps=2, reset_every=2, restart_warmup_steps=1,
                     save_every=2), progress=False)
    assert main(["train", "--out", str(out), "--resume", "--distributed", "fsdp", "--no-progress"]) == 2
    assert "different distributed" in capsys.readouterr().err


def test_fsdp_reproduces_the_reference_defects_of_one_process(prepared_data, tmp_path):
    """zero-init-a, unscaled-merge and independent-masks are exact under FSDP (docs/method.md): same curve."""
    defects = dict(reference_defects=["zero-init-a", "unscaled-merge", "independent-masks"], prune="random",
                   prune_ratio=0.999)
    single = tmp_path / "single"
    torch.set_num_threads(1)
    train(run_config(prepared_data, single, **{k: v for k, v in SETTINGS.items() if k != "model"}, **defects),
          progress=False)
    out = tmp_path / "fsdp"
    done = torchrun(tmp_path, prepared_data, out, "--distributed", "fsdp", "--prune", "random", "--prune-ratio",
                    "0.999", "--reference-defects", ",".join(defects["reference_defects"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(out) if r.get("restart")] == [20, 30]
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
