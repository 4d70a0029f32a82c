"""The training loop end to end on a tiny model (RELORA_SPEC.md sections 5-7)."""

import json
import math
import shutil

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import relora
from relora import checkpoint as ckpt
from relora.train import build_phase, make_model, train

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


def test_ablation_switches_change_what_they_say(prepared_data, tmp_path):
    cfg = run_config(prepared_data, tmp_path / "a", restarts=False)
    assert cfg.relora_config().reset_every is None
    cfg = run_config(prepared_data, tmp_path / "b", optimizer_reset=False)
    assert cfg.relora_config().prune == "none"
    cfg = run_config(prepared_data, tmp_path / "c", warm_start=False)
    assert cfg.relora_phase_start == 0
    train(run_config(prepared_data, tmp_path / "d", jagged=False), progress=False)
    assert all(r["lr"] > 0 for r in records(tmp_path / "d")[1:])


@pytest.mark.parametrize("resume_step", [10, 25])
def test_resume_is_bit_identical(resume_step, prepared_data, tmp_path):
    """A run of 40 steps == the same run stopped at `resume_step` and resumed (CPU)."""
    full = tmp_path / "full"
    train(run_config(prepared_data, full, save_every=5, keep_checkpoints=20), progress=False)
    split = tmp_path / "split"
    shutil.copytree(full, split)
    shutil.rmtree(split / "final")
    for path in ckpt.list_checkpoints(split / "checkpoints"):
        if int(path.name.split("_")[1]) > resume_step:
            shutil.rmtree(path)
    cfg = run_config(prepared_data, split, save_every=5, keep_checkpoints=20)
    train(cfg, resume=True, progress=False)
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(split))


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
    from relora.models import ConfigError

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
    """summary.json's val/test losses are the exported model's mean loss on the first eval windows of each split."""
    import torch.nn.functional as F

    from relora.data import TokenWindows, load_prepared

    cfg = run_config(prepared_data, tmp_path / "run", method="full", steps=6, eval_every=0)
    summary = train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    data = load_prepared(prepared_data)
    n = cfg.eval_tokens // cfg.seq_len
    for split in ("val", "test"):
        batch = TokenWindows(getattr(data, split), cfg.seq_len, mode="sequential").get(range(n))
        with torch.no_grad():
            logits = model(batch[:, :-1]).logits
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
        assert saved[f"{split}_loss"] == pytest.approx(expected, rel=1e-5)
        assert saved[f"{split}_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert summary.test_loss == saved["test_loss"] != saved["val_loss"]


def test_data_without_test_split_trains_with_no_test_loss(prepared_data, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(prepared_data, legacy)
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["test_fraction"], meta["splits"]["test"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    (legacy / "test.bin").unlink()
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
