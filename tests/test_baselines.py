"""GaLore and APOLLO in the same harness as ReLoRA: training, measured optimizer state, resume, compare."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, one_thread, run_config
from safetensors.torch import load_file

from relora.baselines import projection_settings
from relora.cli import main
from relora.core.adapters import find_targets
from relora.core.optimizer_state import optimizer_state_bytes
from relora.data import TokenWindows, load_prepared
from relora.run import checkpoint as ckpt
from relora.run.build import make_model
from relora.run.evaluation import lm_loss
from relora.run.phase import build_phase
from relora.run.resolve import resolve_config
from relora.train import train

PROJECTION = ["galore", "apollo", "apollo-mini"]
RANK = 8  # the default for TINY_MODEL's width 32: a quarter of it


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_step(cfg, data):
    """A model of ``cfg`` after one optimizer step of its method; returns (model, optimizer)."""
    model = make_model(cfg, 512)
    phase = build_phase(cfg, model, wrapped=False)
    batch = TokenWindows(load_prepared(data).train, cfg.seq_len, mode="sequential").get(torch.arange(4))
    lm_loss(model, batch).backward()
    phase.optimizer.step()
    return model, phase.optimizer


@pytest.mark.parametrize("method", PROJECTION)
def test_projection_method_trains_and_loss_falls(method, prepared_data, tmp_path):
    with one_thread():
        summary = train(run_config(prepared_data, tmp_path, method=method), progress=False)
    logged = records(tmp_path)
    first = sum(r["loss"] for r in logged[:5]) / 5
    last = sum(r["loss"] for r in logged[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary.val_ppl < 512  # better than uniform over the vocabulary
    assert summary.trainable_params == summary.total_params  # every weight trains; only the state is low-rank
    assert all(r["optimizer_state_bytes"] > 0 for r in logged if "loss" in r)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["optimizer_state_bytes"] == summary.optimizer_state_bytes == logged[-1]["optimizer_state_bytes"]
    assert saved["tokens_per_s"] > 0 and saved["peak_mem_bytes"] > 0
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("method", PROJECTION)
def test_projection_covers_exactly_the_matrices_relora_wraps(method, prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path, method=method)
    model = make_model(cfg, 512)
    optimizer = build_phase(cfg, model, wrapped=False).optimizer
    *groups, projected = optimizer.param_groups
    regular = {"params": [p for g in groups for p in g["params"]]}
    modules = dict(model.named_modules())
    wrapped = {id(modules[name].weight) for name in find_targets(model)}
    assert {id(p) for p in projected["params"]} == wrapped and len(wrapped) == 7 * 2  # q k v o gate up down x 2
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".")[-2] for p in regular["params"] if "layers" not in names[id(p)]) == [
        "embed_tokens", "lm_head", "norm"]
    assert not any("rank" in g for g in groups) and projected["rank"] == (1 if method == "apollo-mini" else RANK)
    assert len(regular["params"]) + len(projected["params"]) == len(list(model.parameters()))


def test_adamw_state_bytes_are_two_float32_moments_and_a_step_per_tensor(prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path, method="full")
    with one_thread():
        model, optimizer = one_step(cfg, prepared_data)
    expected = sum(2 * 4 * p.numel() + 4 for p in model.parameters())  # exp_avg, exp_avg_sq, step: float32
    assert optimizer_state_bytes(optimizer) == expected


def test_galore_state_bytes_include_its_projection_matrices(prepared_data, tmp_path):
    """GaLore's state, computed from the shapes: rank-r moments, plus the SVD factor it projects with.

    galore-torch 1.0 keeps ``Vh[:r]`` (or ``U[:, :r]``), a view of the whole
    min(m, n) x min(m, n) factor, so that is what stays allocated.
    """
    cfg = run_config(prepared_data, tmp_path, method="galore")
    with one_thread():
        model, optimizer = one_step(cfg, prepared_data)
    projected = {id(p) for p in optimizer.param_groups[-1]["params"]}
    expected = 0
    for p in model.parameters():
        if id(p) in projected:
            m, n = p.shape
            expected += 4 * (2 * RANK * max(m, n) + min(m, n) ** 2)
        else:
            expected += 4 * 2 * p.numel()  # GaLoreAdamW counts steps in a Python int, not a tensor
    assert optimizer_state_bytes(optimizer) == expected
    assert all(optimizer.state[p]["projector"].ortho_matrix is not None for p in optimizer.param_groups[-1]["params"])


def test_projection_methods_hold_less_state_than_adamw_on_the_same_model(prepared_data, tmp_path):
    measured = {}
    with one_thread():
        for method in ["full", *PROJECTION]:
            measured[method] = optimizer_state_bytes(one_step(run_config(prepared_data, tmp_path, method=method),
                                                              prepared_data)[1])
    assert measured["apollo-mini"] < measured["apollo"] < measured["full"]
    assert measured["galore"] < measured["full"]


def test_relora_reports_its_warm_start_state_as_the_peak(prepared_data, tmp_path):
    with one_thread():
        summary = train(run_config(prepared_data, tmp_path, method="relora"), progress=False)
    logged = [r for r in records(tmp_path) if "loss" in r]
    dense = sum(2 * 4 * p.numel() + 4 for p in make_model(run_config(prepared_data, tmp_path), 512).parameters())
    assert logged[9]["optimizer_state_bytes"] == dense == summary.peak_optimizer_state_bytes  # step 10: warm start
    assert logged[-1]["optimizer_state_bytes"] == summary.optimizer_state_bytes < dense
    tensors = 1 + 1 + (2 * 2 + 1) + 2 * 14  # embeddings, head, 5 norms, A and B of 14 adapters
    assert summary.optimizer_state_bytes == 2 * 4 * summary.trainable_params + 4 * tensors


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_resume_is_bit_identical(method, prepared_data, tmp_path):
    """A run of 40 steps == the same run stopped at step 25 and resumed, projector state included.

    The projection is renewed every 10 steps, so the resumed run both uses a
    restored projector (steps 25-29) and computes new ones (30, once more for
    APOLLO's seeded random projection).
    """
    settings = dict(method=method, update_proj_gap=10, save_every=5, keep_checkpoints=20)
    whole = tmp_path / "whole"
    with one_thread():
        train(run_config(prepared_data, whole, **settings), progress=False)
        split = tmp_path / "split"
        shutil.copytree(whole, split)
        shutil.rmtree(split / "final")
        (split / "summary.json").unlink()
        for path in ckpt.list_checkpoints(split / "checkpoints"):
            if int(path.name.split("_")[1]) > 25:
                shutil.rmtree(path)
        train(run_config(prepared_data, split, **settings), resume=True, progress=False)
    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    assert strip(records(whole)) == strip(records(split))


def test_published_defaults_and_overrides(prepared_data, tmp_path):
    def settings(preset, method, **overrides):
        cfg = resolve_config(preset=preset, overrides=dict(method=method, data=str(prepared_data), **overrides))
        return cfg, projection_settings(cfg, cfg.model["hidden_size"])

    cfg, galore = settings("60m", "galore")
    assert (galore.rank, galore.scale, galore.update_proj_gap, cfg.peak_lr(False)) == (128, 0.25, 200, 0.01)
    assert settings("130m", "galore")[1].rank == settings("350m", "galore")[1].rank == 256  # GaLore's scripts
    assert settings("tiny", "galore")[1].rank == 64  # width 256 / 4
    apollo = settings("130m", "apollo")[1]
    assert (apollo.rank, apollo.scale, apollo.scale_type, apollo.proj, apollo.scale_front) == (
        256, 1.0, "channel", "random", False)
    mini = settings("60m", "apollo-mini")[1]
    assert (mini.rank, mini.scale, mini.scale_type, mini.proj, mini.scale_front) == (
        1, 128.0, "tensor", "random", True)
    cfg, custom = settings("60m", "apollo-mini", proj_rank=4, proj_scale=2.0, update_proj_gap=50, scale_front=False)
    assert (custom.rank, custom.scale, custom.update_proj_gap, custom.scale_front) == (4, 2.0, 50, False)
    cfg.set_peak_lr(3e-3)  # --lr of a projection method is its own LR; full-rank lr and relora_lr stay
    assert cfg.proj_lr == 3e-3 and cfg.lr == 1e-3 and cfg.peak_lr(False) == 3e-3


def test_missing_extra_is_a_one_line_error_naming_the_extra(prepared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # `import galore_torch` now fails as if not installed
    assert main(["train", "--method", "galore", "--data", str(prepared_data), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("relora: error: --method galore needs the galore-torch package")
    assert "pip install 'relora[baselines]'" in err
    assert not (tmp_path / "run").exists()


def test_compare_baselines_table_has_every_method(prepared_data, tmp_path, capsys):
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=24, warmup_steps=2, warm_start_steps=8, reset_every=8,
        restart_warmup_steps=2, rank=RANK, proj_rank=RANK, update_proj_gap=10, alpha=8, lr=3e-3, relora_lr=6e-3,
        batch_tokens=256, micro_batch=8, seq_len=32, eval_every=0, eval_tokens=512, save_every=0, device="cpu")))
    out = tmp_path / "cmp"
    with one_thread():
        assert main(["compare", "--config", str(config), "--out", str(out), "--set", "baselines",
                     "--no-progress"]) == 0
    names = ["full", "full-ws-lr", "full-split-lr", "lora-ws", "relora", "relora-no-warm-start", "galore", "apollo",
             "apollo-mini"]
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["sets"]["baselines"]["rows"]}
    assert list(rows) == names
    full_text = (out / "baselines.md").read_text()
    assert "GaLore/APOLLO unclipped" in full_text
    table = full_text.split("\n\n")[-1]
    assert "| optimizer state MB |" in table.splitlines()[0] and table.count("\n") == 2 + len(names)
    methods = json.loads((out / "results.json").read_text())["methods"]
    run = {name: Path(methods[name]["chosen_run"]) for name in names}
    for name, row in rows.items():
        summary = json.loads((run[name] / "summary.json").read_text())
        assert row["val_ppl"] == summary["val_ppl"] and row["ppl_over_full"] > 0
        clip = 0 if name in ("galore", "apollo", "apollo-mini") else 1  # as each method's authors published
        assert yaml.safe_load((run[name] / "config.yaml").read_text())["grad_clip"] == clip
        assert f"| {name} | " in table and f" | {clip} | " in table and f"{summary['test_ppl']:.2f} (n=1)" in table
        assert f" {summary['optimizer_state_bytes'] / 1e6:.2f}" in table
    assert rows["relora"]["restarts"] == 1 and rows["relora-no-warm-start"]["restarts"] == 2
    assert yaml.safe_load((run["relora-no-warm-start"] / "config.yaml").read_text())["warm_start"] is False
    split = yaml.safe_load((run["full-split-lr"] / "config.yaml").read_text())
    assert (split["method"], split["matrix_lr_scale"]) == ("full", 0.25)  # GaLore's split, at full rank
    assert "| galore | " in table and "vs full-split-lr: n/a (1 seed)" in table
    assert rows["galore"]["trainable_params"] == rows["full"]["trainable_params"] > rows["relora"]["trainable_params"]
    assert yaml.safe_load((run["apollo-mini"] / "config.yaml").read_text())["proj_rank"] == 1  # not RANK
    assert "| apollo-mini | 1 (projection) |" in table and f"| galore | {RANK} (projection) |" in table
    state = {name: row["optimizer_state_bytes"] for name, row in rows.items()}
    assert state["apollo-mini"] < state["apollo"] < state["full"] and state["galore"] < state["full"]
    # GaLore's update lies in one rank-8 subspace per projection period (steps 8-9, 10-19, 20-23 after the reference)
    assert RANK < rows["galore"]["mean_rank"] <= 3 * RANK
    assert (out / "baselines-loss.png").stat().st_size > 0 and (out / "baselines-spectra.png").is_file()
    assert "baselines set:" in capsys.readouterr().out
