"""Spectra of dW, figures, and relora analyze / plot / compare on tiny runs."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, run_config, tiny_llama

from relora.analysis.plots import BELOW_SIZE, CURVES_SIZE, size_px, spectra_size
from relora.analysis.spectra import (
    count_below,
    matrix_type,
    model_update_spectra,
    numerical_rank,
    update_spectra,
)
from relora.cli import main

RANK = 4


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------ the math
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_rank_plus_noise_spectrum_is_recovered(seed):
    """A dW of known rank-k structure plus noise: values match numpy's SVD, counts match a direct count."""
    rng = np.random.default_rng(seed)
    m, n, k = 48, 40, 5
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    strengths = np.sort(rng.uniform(0.5, 3.0, k))[::-1]
    delta = u @ np.diag(strengths) @ v.T + 1e-3 * rng.standard_normal((m, n))
    reference = rng.standard_normal((m, n))
    weights = {"layers.0.q_proj.weight": torch.tensor(reference + delta, dtype=torch.float64)}
    ref = {"layers.0.q_proj.weight": torch.tensor(reference, dtype=torch.float64)}

    spectra = update_spectra(weights, ref, ["layers.0.q_proj"])
    got = spectra.values["q"][0]
    expected = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[:k], strengths, rtol=0.01)  # the planted structure, up to the noise
    for threshold in (1e-2, 0.1, 1.0, 2.0):
        assert count_below(got, threshold) == sum(1 for s in expected if s < threshold)
    assert count_below(got, 0.1) == min(m, n) - k  # the noise is ~1e-3 * (sqrt(m)+sqrt(n)) ~ 0.013
    assert numerical_rank(got, rtol=0.1) == k
    assert numerical_rank(got) == min(m, n)  # noise is full rank
    assert spectra.below(0.1) == {"q": float(min(m, n) - k)}


def test_exact_low_rank_update_has_that_numerical_rank():
    rng = np.random.default_rng(3)
    b, a = rng.standard_normal((32, 3)), rng.standard_normal((3, 24))
    values = np.linalg.svd(b @ a, compute_uv=False)
    assert numerical_rank(values) == 3
    assert numerical_rank(np.zeros(5)) == 0


def test_matrix_types_and_mismatches():
    assert [matrix_type(f"model.layers.0.self_attn.{p}_proj") for p in "qkvo"] == ["q", "k", "v", "o"]
    assert matrix_type("model.layers.1.mlp.down_proj") == "down"
    assert matrix_type("transformer.h.0.attn.c_attn") == "c_attn"
    with pytest.raises(ValueError, match="shape"):
        update_spectra({"a.weight": torch.zeros(3, 4)}, {"a.weight": torch.zeros(4, 3)}, ["a"])
    with pytest.raises(KeyError, match="reference"):
        update_spectra({"a.weight": torch.zeros(3, 4)}, {}, ["a"])


def test_model_spectra_group_every_wrapped_matrix_type():
    spectra = model_update_spectra(tiny_llama(seed=1), tiny_llama(seed=2))
    assert list(spectra.values) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert all(len(v) == 2 for v in spectra.values.values())  # two layers
    assert spectra.values["down"][0].shape == (32,)  # min(hidden 32, intermediate 64)


# ------------------------------------------------------------------ on real (tiny) runs
@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """lora, relora (restarts at 20 and 30) and full, 40 steps each, rank 4."""
    from relora.train import train

    root = tmp_path_factory.mktemp("runs")
    for method in ("lora", "relora", "full"):
        train(run_config(prepared_data, root / method, method=method, rank=RANK), progress=False)
    return root


def test_lora_update_has_rank_r_and_relora_more(runs):
    from relora.analysis.report import analyze_runs

    spectra = analyze_runs([runs / "lora", runs / "relora", runs / "full"])
    lora, relora, full = (spectra[k].ranks() for k in ("lora", "relora", "full"))
    for kind in lora:
        assert all(r <= RANK for r in lora[kind]), (kind, lora[kind])
        assert all(r > RANK for r in relora[kind]), (kind, relora[kind])  # 3 cycles of rank 4: up to 12
        assert all(r > RANK for r in full[kind])
    assert max(max(r) for r in relora.values()) <= 3 * RANK  # warm start excluded: 3 adapter cycles


def test_analyze_and_plot_commands_write_figures(runs, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(runs / "lora"), str(runs / "relora"), "--out", str(out), "--labels", "LoRA,ReLoRA"]) == 0
    printed = capsys.readouterr().out
    assert "ReLoRA: rank of dW per layer q " in printed
    data = json.loads((out / "spectra.json").read_text())
    assert set(data) == {"LoRA", "ReLoRA"}
    assert set(data["LoRA"]["matrices"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert max(data["LoRA"]["numerical_rank"]["q"]) <= RANK
    assert png_size(out / "spectra.png") == size_px(spectra_size(7))
    assert png_size(out / "below_threshold.png") == size_px(BELOW_SIZE)

    figure = tmp_path / "curves.png"
    assert main(["plot", str(runs / "lora"), str(runs / "relora"), "--out", str(figure)]) == 0
    assert png_size(figure) == size_px(CURVES_SIZE)
    assert figure.stat().st_size > 10_000  # lines drawn, not a blank canvas

    assert main(["plot", str(runs / "relora")]) == 0  # one run: the figure goes beside it
    assert png_size(runs / "relora" / "loss.png") == size_px(CURVES_SIZE)


def test_analyze_against_an_explicit_reference(runs, tmp_path, capsys):
    """The reference can be any model of the same shape: here lora's start, so relora's dW includes its warm start."""
    out = tmp_path / "a"
    assert main(["analyze", str(runs / "relora"), "--reference", str(runs / "lora" / "reference"),
                 "--out", str(out)]) == 0
    ranks = json.loads((out / "spectra.json").read_text())["relora"]["numerical_rank"]
    assert min(min(r) for r in ranks.values()) > 3 * RANK  # full-rank warm start now counts


@pytest.mark.parametrize(("args", "message"), [
    (["analyze", "no/such/run"], "does not exist"),
    (["plot", "no/such/run"], "not a run directory"),
    (["analyze", "{runs}/lora", "{runs}/relora", "--labels", "x"], "--labels has 1 names for 2 runs"),
])
def test_bad_analysis_input_is_one_line_and_exit_2(args, message, runs, capsys):
    assert main([a.format(runs=runs) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_analyze_refuses_a_reference_of_another_shape(runs, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_llama(hidden_size=48).save_pretrained(other)
    assert main(["analyze", str(runs / "lora"), "--reference", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "do not match" in capsys.readouterr().err


# ------------------------------------------------------------------ compare
PAPER_TABLE_6 = {  # the paper's Table 6 (130M): restarts, optimizer reset, jagged schedule, warm start
    "LoRA": (False, False, False, False),
    "+ restarts": (True, False, False, False),
    "+ restarts + optimizer reset": (True, True, False, False),
    "+ restarts + jagged schedule": (True, False, True, False),
    "restarts + reset + jagged, no warm start": (True, True, True, False),
    "warm start only": (False, False, False, True),
    "all four (ReLoRA)": (True, True, True, True),
    "full-rank training": None,
}


def test_the_ablation_set_is_the_papers_table_6(prepared_data, tmp_path):
    """Every row, resolved as relora compare resolves it, has the components of its Table 6 row."""
    from relora.analysis.compare_sets import (
        ABLATION_SET,
        ABLATION_SWITCHES,
        ablation_switches,
        resolve_run,
    )

    assert [s.paper for s in ABLATION_SET] == list(PAPER_TABLE_6)
    for spec in ABLATION_SET:
        cfg = resolve_run(spec, tmp_path, preset="tiny", config_file=None, overrides={"data": str(prepared_data)})
        on = ablation_switches(cfg)
        assert (tuple(on[k] for k in ABLATION_SWITCHES) if on else None) == PAPER_TABLE_6[spec.paper], spec.name


def diverge_runs_named(monkeypatch, prefix: str) -> dict:
    """Make every run whose directory name starts with ``prefix`` diverge (NaN loss from its 3rd micro-batch on,
    after its first record) and stop at the first bad step; returns compare overrides for a 6-step tiny run."""
    import relora.train

    loss_fn, real_train = relora.train.lm_loss, relora.train.train
    state = {"on": False, "calls": 0}

    def nan_loss(model, batch):
        loss = loss_fn(model, batch)
        state["calls"] += 1
        return loss * float("nan") if model.training and state["on"] and state["calls"] > 2 else loss

    def train(config, **kwargs):
        state["on"], state["calls"] = Path(config.out).name.startswith(prefix), 0  # NAME-lrLR-seedS
        return real_train(config, **kwargs)

    monkeypatch.setattr(relora.train, "lm_loss", nan_loss)
    monkeypatch.setattr(relora.train, "train", train)
    return dict(model=TINY_MODEL, steps=6, warmup_steps=1, warm_start_steps=2, reset_every=2, restart_warmup_steps=1,
                rank=RANK, alpha=8, batch_tokens=256, micro_batch=8, seq_len=32, eval_every=0, eval_tokens=256,
                save_every=0, device="cpu", max_bad_steps=1, on_bad_steps="stop", log_every=1)


def test_a_diverged_run_is_a_row_of_the_ablation_table(prepared_data, tmp_path, monkeypatch):
    """The paper's "+ restarts + optimizer reset" diverged: such a run is reported, not a crash of compare."""
    import relora.analysis.compare

    overrides = {**diverge_runs_named(monkeypatch, "lora-restarts-reset-lr"), "data": str(prepared_data)}
    results = relora.analysis.compare.compare(sets=["ablation"], out=tmp_path / "cmp", overrides=overrides, progress=False)
    rows = {r["name"]: r for r in results["sets"]["ablation"]["rows"]}
    assert rows["lora-restarts-reset"]["diverged"] and rows["lora-restarts-reset"]["val_ppl"] is None
    line = next(x for x in (tmp_path / "cmp" / "ablation.md").read_text().splitlines()
                if x.startswith("| lora-restarts-reset |"))
    assert line.startswith("| lora-restarts-reset | + restarts + optimizer reset | yes | yes | no | no |"), line
    assert line.endswith("| diverged | - | diverged |"), line
    assert not rows["relora"]["diverged"] and rows["relora"]["val_ppl"] > 1
    again = relora.analysis.compare.compare(sets=["ablation"], out=tmp_path / "cmp", overrides=overrides, progress=False)
    assert again["trained_s"] == {}  # the diverged run counts as done


def test_compare_runs_both_sets_writes_tables_and_reuses_finished_runs(prepared_data, tmp_path, capsys):
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=24, warmup_steps=2, warm_start_steps=8,
        reset_every=8, restart_warmup_steps=2, rank=RANK, alpha=8, lr=3e-3, relora_lr=6e-3, batch_tokens=256,
        micro_batch=8, seq_len=32, eval_every=0, eval_tokens=512, save_every=0, device="cpu")))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["trained_s"]) == 10  # 6 methods + 4 Table 6 rows (relora, lora, lora-ws, full shared)

    main_rows = {r["name"]: r for r in results["sets"]["main"]["rows"]}
    assert list(main_rows) == ["full", "full-ws-lr", "control", "lora", "lora-ws", "relora"]
    lrs = {"full": 3e-3, "control": 3e-3}  # the configured peak LR of each method's main phase: one run, seed 0
    for name, row in main_rows.items():
        run = out / "runs" / f"{name}-lr{lrs.get(name, 6e-3):g}-seed0"
        assert results["methods"][name]["chosen_run"] == str(run)
        summary = json.loads((run / "summary.json").read_text())
        assert row["val_ppl"] == summary["val_ppl"] and row["test_ppl_mean"] == summary["test_ppl"]
        assert row["ppl_over_full"] == pytest.approx(summary["test_ppl"] / main_rows["full"]["test_ppl_mean"])
    assert main_rows["relora"]["restarts"] == 1  # at step 16 (warm start 8 + 8); none at the last step
    assert main_rows["lora"]["trainable_params"] < main_rows["full"]["trainable_params"]
    assert main_rows["control"]["total_params"] < main_rows["full"]["total_params"]
    assert main_rows["lora"]["mean_rank"] <= RANK < main_rows["relora"]["mean_rank"]
    table = (out / "main.md").read_text().split("\n\n")[-1]  # after the fairness header
    control_cells = next(line for line in table.splitlines() if line.startswith("| control |")).split(" | ")
    assert main_rows["control"]["mean_rank"] is None and control_cells[11] == "n/a"  # another shape: no dW
    assert table.count("\n") == 2 + 6 and f"| relora | {RANK} | 1 | 0.006 | {main_rows['relora']['test_ppl']:.2f} (n=1) |" in table

    ablation = (out / "ablation.md").read_text()
    assert "| lora-restarts | + restarts | yes | no | no | no | 0.006 |" in ablation
    assert "| lora | LoRA | no | no | no | no | 0.006 |" in ablation
    assert f"| {results['methods']['lora-restarts']['test_ppl_mean']:.2f} (n=1) | vs lora: n/a (1 seed) |" in ablation
    assert "| lora | LoRA | no | no | no | no | 0.006 | " in ablation and "(n=1) | - |" in ablation
    assert "| full | full-rank training | full-rank |" in ablation
    ablation_cfg = yaml.safe_load((out / "runs" / "lora-restarts-reset-lr0.006-seed0" / "config.yaml").read_text())
    assert (ablation_cfg["method"], ablation_cfg["optimizer_reset"], ablation_cfg["jagged"],
            ablation_cfg["warm_start"]) == ("relora", True, False, False)
    for name in ("main-loss.png", "ablation-loss.png", "main-spectra.png", "main-below_threshold.png"):
        assert png_size(out / name)[0] > 0

    capsys.readouterr()
    assert main(["compare", "--config", str(config), "--out", str(out), "--set", "main", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["trained_s"] == {}  # everything reused
    assert "trained 0 runs" in capsys.readouterr().out

    # a runs directory that holds runs of another config is refused, not overwritten
    before = (out / "runs" / "full-lr0.003-seed0" / "summary.json").read_bytes()
    assert main(["compare", "--config", str(config), "--out", str(out), "--set", "main", "--steps", "30",
                 "--no-progress"]) == 2
    assert "different steps" in capsys.readouterr().err
    assert (out / "runs" / "full-lr0.003-seed0" / "summary.json").read_bytes() == before


def test_compare_gives_matrix_lr_scale_to_the_full_rank_rows_alone(prepared_data, tmp_path, caplog):
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=8, warmup_steps=2, warm_start_steps=4, reset_every=4,
        restart_warmup_steps=1, rank=RANK, alpha=8, lr=3e-3, relora_lr=6e-3, batch_tokens=256, micro_batch=8,
        seq_len=32, eval_every=0, eval_tokens=512, save_every=0, device="cpu")))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--set", "main", "--methods", "full,lora-ws",
                 "--matrix-lr-scale", "0.5", "--out", str(out), "--no-progress"]) == 0
    saved = {d.name.split("-lr")[0]: yaml.safe_load((d / "config.yaml").read_text())["matrix_lr_scale"]
             for d in (out / "runs").iterdir()}
    assert saved == {"full": 0.5, "lora-ws": 1.0}
    # and says so, naming the rows that run without it
    assert "--matrix-lr-scale applies only to the rows that read it; lora-ws run without it" in caplog.text
    # without a full-rank row there is nothing to divide by: n/a in the table, null in results.json (not nan)
    subset = tmp_path / "subset"
    assert main(["compare", "--config", str(config), "--set", "main", "--methods", "lora-ws",
                 "--runs", str(out / "runs"), "--out", str(subset), "--no-progress"]) == 0
    results = json.loads((subset / "results.json").read_text())  # strict JSON: a NaN would not parse back as null
    assert results["trained_s"] == {} and results["sets"]["main"]["rows"][0]["ppl_over_full"] is None
    row = [line for line in (subset / "main.md").read_text().splitlines() if line.startswith("| lora-ws |")]
    assert row[0].split(" | ")[5] == "n/a" and "nan" not in (subset / "main.md").read_text()


def test_a_method_whose_every_run_diverged_is_a_row_of_the_main_table(prepared_data, tmp_path, monkeypatch):
    """Not a crash of compare: the row says diverged, and the others are compared as usual."""
    import relora.analysis.compare

    overrides = {**diverge_runs_named(monkeypatch, "lora-lr"), "data": str(prepared_data)}
    from relora.analysis.compare_procedure import Procedure
    results = relora.analysis.compare.compare(sets=["main"], out=tmp_path / "cmp", overrides=overrides,
                                              progress=False, procedure=Procedure(methods=("full", "lora")))
    rows = {r["name"]: r for r in results["sets"]["main"]["rows"]}
    assert rows["lora"]["diverged"] and rows["lora"]["test_ppl_mean"] is None
    assert not rows["full"].get("diverged") and rows["full"]["test_ppl_mean"] > 1
    line = next(x for x in (tmp_path / "cmp" / "main.md").read_text().splitlines() if x.startswith("| lora |"))
    assert "| diverged |" in line and line.count("|") == 16, line  # as many cells as the header
