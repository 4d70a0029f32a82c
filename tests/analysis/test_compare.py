"""relora compare's procedure (issue 17): LR chosen on a grid by val loss, seeds at the chosen LR, test ppl with noise."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_MODEL, without_test_split
from test_stats import t_tail_by_integration

import relora.train
from relora.analysis.compare_procedure import choose_lr
from relora.cli import main


def test_choose_lr_is_argmin_of_val_loss_and_flags_edges():
    rng = np.random.default_rng(0)
    for _ in range(20):
        grid = sorted(set(np.round(10 ** rng.uniform(-4, -1, rng.integers(1, 6)), 6)))
        losses = {lr: float(rng.uniform(3, 6)) for lr in grid}
        chosen, at_edge = choose_lr(losses)
        assert chosen == min(grid, key=losses.get)
        assert at_edge == (len(grid) > 1 and chosen in (grid[0], grid[-1]))
    assert choose_lr({1e-3: 4.0, 3e-3: float("nan"), 1e-2: None}) == (1e-3, True)  # diverged runs lose
    assert choose_lr({1e-3: 4.2, 3e-3: 4.0, 1e-2: 4.1}) == (3e-3, False)


class Killed(Exception):
    """Stands for the process being killed mid-comparison."""


def welch_p(a, b):
    """Welch's test computed here from its definition, the tail by numeric integration."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_tail_by_integration(t, df)


def test_compare_tunes_each_method_repeats_seeds_and_resumes_without_retraining(
        prepared_data, tmp_path, monkeypatch, capsys):
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=12, warmup_steps=2, warm_start_steps=4, reset_every=4,
        restart_warmup_steps=1, rank=4, alpha=8, lr=3e-3, batch_tokens=256, micro_batch=8, seq_len=32,
        eval_every=0, eval_tokens=512, save_every=0, device="cpu", seed=5)))
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--out", str(out), "--set", "main", "--methods", "full,relora",
            "--lr-grid", "1e-3,3e-2,3e-3", "--seeds", "3", "--no-progress"]
    real_train, calls, killed = relora.train.train, [], []

    def counting_train(cfg, *, resume=False, progress=True):
        calls.append(Path(cfg.out).name)
        if len(calls) == 4 and not killed:  # the first invocation is killed as its 4th run starts
            killed.append(cfg.out)
            raise Killed
        return real_train(cfg, resume=resume, progress=progress)

    monkeypatch.setattr(relora.train, "train", counting_train)
    assert main(args) != 0  # the CLI reports the kill as an internal error
    assert "Killed" in capsys.readouterr().err
    first = calls[:3]
    calls.clear()
    assert main(args) == 0
    assert not set(first) & set(calls), "a finished run was trained again"
    assert len(first) + len(calls) == 2 * 3 + 2 * 2  # 3 grid LRs + 2 more seeds, per method
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["trained_s"]) == sorted(calls)

    for name, field in (("full", "lr"), ("relora", "relora_lr")):
        m = results["methods"][name]
        runs = {(r["lr"], r["seed"]): r for r in m["runs"]}
        for r in m["runs"]:  # each run's numbers are its own summary's, and its config has that LR and seed
            summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
            assert (r["val_loss"], r["test_loss"], r["test_ppl"]) == (
                summary["val_loss"], summary["test_loss"], summary["test_ppl"])
            saved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
            assert (saved[field], saved["seed"]) == (r["lr"], r["seed"])
        at_seed0 = {lr: runs[(lr, 5)]["val_loss"] for lr in (1e-3, 3e-2, 3e-3)}
        assert m["chosen_lr"] == min(at_seed0, key=at_seed0.get)
        assert m["chosen_lr_at_edge"] == (m["chosen_lr"] != 3e-3)
        ppls = [runs[(m["chosen_lr"], seed)]["test_ppl"] for seed in (5, 6, 7)]
        assert m["n_seeds"] == 3 and len(m["runs"]) == 5
        assert m["test_ppl_mean"] == pytest.approx(np.mean(ppls)) and m["test_ppl_std"] == pytest.approx(
            np.std(ppls, ddof=1))
    full, relora_ = results["methods"]["full"], results["methods"]["relora"]
    row = {r["name"]: r for r in results["sets"]["main"]["rows"]}["relora"]
    p = welch_p(relora_["test_ppls"], full["test_ppls"])
    assert row["p_values"]["full"] == pytest.approx(p, abs=1e-6)
    table = (out / "main.md").read_text()
    assert "Welch's t-test" in table and "same 16 windows of 32 tokens, spread evenly" in table
    assert "relora_lr after the warm start at lr 0.003 for the" in table  # the warm start's lr, not a full-rank grid LR
    verdict = "yes" if p < 0.05 else "no"
    by_seed = [{r["seed"]: r["test_ppl"] for r in m["runs"] if r["lr"] == m["chosen_lr"]} for m in (relora_, full)]
    diffs = np.array([by_seed[0][k] - by_seed[1][k] for k in (5, 6, 7)])
    paired_p = t_tail_by_integration(diffs.mean() / (diffs.std(ddof=1) / math.sqrt(3)), 2)
    assert row["paired_p_values"]["full"] == pytest.approx(paired_p, abs=1e-6)
    shown = ["<0.001" if x < 0.0005 else f"={x:.3f}" for x in (p, paired_p)]
    assert f"vs full: {verdict} (p{shown[0]}, paired p{shown[1]})" in table
    assert f"{relora_['test_ppl_mean']:.2f} ± {relora_['test_ppl_std']:.2f} (n=3)" in table
    assert "| full | - | 1 |" in table and "| relora | 4 | 1 |" in table


def test_compare_refuses_data_without_test_split_in_one_line(prepared_data, tmp_path, capsys):
    legacy = without_test_split(prepared_data, tmp_path / "legacy")
    assert main(["compare", "--preset", "tiny", "--data", str(legacy), "--out", str(tmp_path / "cmp"),
                 "--methods", "full", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no test split" in err and "relora prepare" in err
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e-3", "--lr-grid", "1e-3,3e-3"], "not both"),
    (["--lr-grid", "1e-3,-1"], "--lr-grid"),
    (["--seeds", "0"], "--seeds"),
    (["--widen-edges", "-1"], "--widen-edges"),
    (["--methods", "full,sgd"], "--methods sgd"),
])
def test_compare_bad_procedure_is_one_line(argv, message, prepared_data, tmp_path, capsys):
    assert main(["compare", "--preset", "tiny", "--data", str(prepared_data), "--out", str(tmp_path / "c"),
                 "--set", "main", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_full_rank_rows_ignore_adapter_settings_so_one_run_serves_every_study_table(tmp_path):
    """Full-rank training reads no adapter setting: a comparison that varies only those (the study's tables)
    resolves the same full-rank run, while the adapter rows get what was asked."""
    from relora.analysis.compare_sets import BASELINES_SET, MAIN_SET, resolve_run
    from relora.run.config import ADAPTER_ONLY

    specs = {s.name: s for s in MAIN_SET}
    varied = {"rank": 16, "alpha": 8.0, "restart_adam_step": "keep", "prune_ratio": 0.9, "dropout": 0.1,
              "restart_warmup_steps": 5, "eval_merges": True, "proj_rank": 64}  # proj_rank: the baselines set's
    config_file = tmp_path / "study.yaml"
    config_file.write_text("restart_adam_step: keep\nprune_ratio: 0.5\n")
    plain = resolve_run(specs["full"], tmp_path, preset="tiny", config_file=None, overrides={}, lr=1e-3)
    plain_ws = resolve_run(specs["full-ws-lr"], tmp_path, preset="tiny", config_file=None, overrides={}, lr=3e-3)
    for overrides, file in ((varied, None), ({}, str(config_file)), (varied, str(config_file))):
        full = resolve_run(specs["full"], tmp_path, preset="tiny", config_file=file, overrides=overrides, lr=1e-3)
        assert full.to_dict() == plain.to_dict()
        full_ws = resolve_run(specs["full-ws-lr"], tmp_path, preset="tiny", config_file=file, overrides=overrides,
                              lr=3e-3)  # its one adapter-only setting, relora_lr, is the grid LR here
        assert full_ws.to_dict() == plain_ws.to_dict() and full_ws.relora_lr == 3e-3
    relora = resolve_run(specs["relora"], tmp_path, preset="tiny", config_file=None, overrides=varied, lr=1e-3)
    assert {k: getattr(relora, k) for k in varied} == varied
    galore = resolve_run({s.name: s for s in BASELINES_SET}["galore"], tmp_path, preset="tiny", config_file=None,
                         overrides=varied, lr=1e-2)
    assert galore.proj_rank == 64
    assert {"rank", "relora_lr", "restart_adam_step", "reference_defects"} <= set(ADAPTER_ONLY)
    assert not {"lr", "steps", "warm_start_steps", "seed", "warm_start", "jagged"} & set(ADAPTER_ONLY)


def test_dropped_settings_names_the_rows_that_do_not_read_a_setting():
    from relora.analysis.compare_sets import BASELINES_SET, dropped_settings

    specs = list(BASELINES_SET)
    dropped = dropped_settings(specs, {"matrix_lr_scale": 0.25, "reference_defects": ["zero-init-a"], "rank": 4})
    # independent of READ_ONLY_BY: full-rank training has no adapters, the others set their matrices' LR themselves
    full_rank = {s.name for s in specs if s.settings["method"] in ("full", "full-ws-lr", "control")}
    adapters = {s.name for s in specs if s.settings["method"] in ("lora", "lora-ws", "relora", "online-relora")}
    assert set(dropped["matrix_lr_scale"]) == {s.name for s in specs} - full_rank
    assert set(dropped["reference_defects"]) == {s.name for s in specs} - adapters
    assert "rank" not in dropped and dropped_settings(specs, {}) == {}
    only_full = [s for s in specs if s.name == "full"]
    assert dropped_settings(only_full, {"matrix_lr_scale": 0.25}) == {}


def test_an_interrupted_compare_says_how_to_continue_in_one_line(prepared_data, tmp_path, monkeypatch, capsys):
    """SIGINT/SIGTERM reach compare as KeyboardInterrupt (the run saved a checkpoint): exit 130, no traceback."""
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(model=TINY_MODEL, data=str(prepared_data), steps=8, warm_start_steps=2,
                                          reset_every=2, batch_tokens=256, micro_batch=8, seq_len=32, device="cpu")))

    def interrupted(cfg, *, resume=False, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(relora.train, "train", interrupted)
    code = main(["compare", "--config", str(config), "--out", str(tmp_path / "cmp"), "--set", "main",
                 "--methods", "full", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1] == ("relora compare: interrupted; finished runs are kept and the run in progress saved a "
                       "checkpoint: run the same command again to continue")
    assert not any("Traceback" in line for line in err)


def test_a_signal_in_a_runs_last_step_stops_compare_before_the_next_run(prepared_data, tmp_path, monkeypatch, capsys):
    """The run finishes (its last step was already under way), and compare stops there instead of starting
    the next run with a fresh signal handler that forgot the request (seen: a SIGTERM'd compare kept going)."""
    import os
    import signal

    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(model=TINY_MODEL, data=str(prepared_data), steps=6, warm_start_steps=2,
                                          reset_every=2, batch_tokens=256, micro_batch=8, seq_len=32,
                                          eval_tokens=256, save_every=0, device="cpu")))
    real_step, sent = relora.train.train_step, []

    def step_then_signal(run, net, state, stop):
        if state.step == run.cfg.steps - 1 and not sent:
            sent.append(state.step)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler of the run in progress takes it
        return real_step(run, net, state, stop)

    monkeypatch.setattr(relora.train, "train_step", step_then_signal)
    args = ["compare", "--config", str(config), "--out", str(tmp_path / "cmp"), "--set", "main",
            "--methods", "full,relora", "--no-progress"]
    assert main(args) == 130
    runs = tmp_path / "cmp" / "runs"
    assert sent == [5] and sorted(p.name for p in runs.iterdir()) == ["full-lr0.001-seed0"]
    assert (runs / "full-lr0.001-seed0" / "summary.json").is_file()  # finished: reused by the next invocation
    assert "interrupted" in capsys.readouterr().err


def test_widened_lr_steps_past_the_edge_the_choice_sits_at():
    from relora.analysis.compare_procedure import widened_lr

    rng = np.random.default_rng(1)
    for _ in range(50):
        grid = sorted(set(np.round(10 ** rng.uniform(-4, -1, rng.integers(1, 6)), 6)))
        losses = {float(lr): float(rng.uniform(3, 6)) for lr in grid}
        best = min(losses, key=losses.get)
        if len(grid) == 1 or grid[0] < best < grid[-1]:
            expected = None
        else:
            expected = best * 3 if best == grid[-1] else best / 3
        got = widened_lr(losses)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == float(f"{expected:.3g}")  # 3 significant digits: readable run names
    assert widened_lr({1e-3: 4.0, 1e-2: 3.9}) == 0.03 and widened_lr({3e-4: 4.0, 1e-3: 4.5}) == 0.0001


def test_widen_grids_adds_runs_past_the_edge_until_the_choice_is_inside(tmp_path, monkeypatch):
    """Stand-in runs whose val loss is a bowl in log LR, minimum at each method's own optimum."""
    from relora.analysis import compare_procedure
    from relora.run.config import TrainConfig

    optimum = {"full": 2.5e-2, "relora": 5e-4, "lora": 2e-3}
    trained = []

    def config(name, lr):
        method = "full" if name == "full" else "relora"
        out = tmp_path / f"{name}-lr{lr:g}"
        return TrainConfig(method=method, out=str(out), model=TINY_MODEL, steps=12, warm_start_steps=4,
                           reset_every=4, restart_warmup_steps=1, **({"lr": lr} if method == "full" else
                                                                     {"relora_lr": lr}))

    def fake_run_set(configs, *, progress=True):
        for c in configs:
            name = Path(c.out).name.split("-lr")[0]
            lr = c.lr if c.method == "full" else c.relora_lr
            Path(c.out).mkdir(parents=True)
            (Path(c.out) / "config.yaml").write_text(yaml.safe_dump(c.to_dict()))
            (Path(c.out) / "summary.json").write_text(json.dumps(
                {"val_loss": 4 + math.log10(lr / optimum[name]) ** 2, "steps": 12}))
            trained.append((name, lr))
        return {Path(c.out).name: 1.0 for c in configs}

    monkeypatch.setattr(compare_procedure, "run_set", fake_run_set)
    grids = {name: [config(name, lr) for lr in (1e-3, 2e-3, 3e-3)] for name in optimum}
    fake_run_set([c for g in grids.values() for c in g])
    trained.clear()
    compare_procedure.widen_grids(grids, 5, config)
    # full: 3e-3 is the edge -> 9e-3 (edge again) -> 0.027 (edge) -> 0.081, worse: 0.027 chosen, inside
    # relora: 1e-3 is the edge -> 3.33e-4 (edge) -> 1.11e-4, worse; lora: 2e-3 is inside, nothing to widen
    assert sorted(trained) == sorted([("full", 9e-3), ("full", 0.027), ("full", 0.081), ("relora", 3.33e-4),
                                      ("relora", 1.11e-4)])
    lrs = {name: [c.lr if c.method == "full" else c.relora_lr for c in g] for name, g in grids.items()}
    assert lrs == {"full": [1e-3, 2e-3, 3e-3, 9e-3, 0.027, 0.081], "relora": [1.11e-4, 3.33e-4, 1e-3, 2e-3, 3e-3],
                   "lora": [1e-3, 2e-3, 3e-3]}
    trained.clear()
    compare_procedure.widen_grids(grids, 5, config)  # nothing at an edge any more: nothing trains
    assert trained == []
    optimum["far"] = 1.0
    far = {"far": [config("far", lr) for lr in (1e-3, 3e-3)]}
    fake_run_set(far["far"])
    trained.clear()
    compare_procedure.widen_grids(far, 2, config)  # two rounds allowed: the choice is still at the edge after them
    assert trained == [("far", 9e-3), ("far", 0.027)]
    assert compare_procedure.choose_lr({c.relora_lr: 4 + math.log10(c.relora_lr) ** 2 for c in far["far"]}) == (
        0.027, True)


def test_compare_widens_an_edge_choice_once_per_round_and_says_so_in_the_header(prepared_data, tmp_path):
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=8, warmup_steps=2, batch_tokens=256, micro_batch=8,
        seq_len=32, eval_every=0, eval_tokens=512, save_every=0, device="cpu", seed=0)))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--out", str(out), "--set", "main", "--methods", "full",
                 "--lr-grid", "1e-4,3e-4", "--widen-edges", "1", "--no-progress"]) == 0
    m = json.loads((out / "results.json").read_text())["methods"]["full"]
    first = {r["lr"]: r["val_loss"] for r in m["runs"] if r["lr"] in (1e-4, 3e-4)}
    added = 9e-4 if first[3e-4] < first[1e-4] else 3.33e-5  # a two-point grid's choice is always at an edge
    assert m["grid"] == sorted([1e-4, 3e-4, added]) and len(m["runs"]) == 3
    assert (Path(m["runs"][m["grid"].index(added)]["run_dir"]) / "summary.json").is_file()
    assert f"widened per method up to 1 times by x3 past the edge its choice sat at (full +{added:g})" in (
        out / "main.md").read_text()


def test_study_table_joins_invocations_with_welch_and_paired_p(tmp_path, capsys):
    """docs/results/study/table.py: one row per LABEL=OUT:METHOD, p-values against the first row computed
    here from their definitions (Welch's; the paired test on the per-seed differences), and the val ppl beside
    them as exp of each seed's val loss."""
    import runpy

    rng = np.random.default_rng(7)
    shared = rng.normal(100, 4, 3)  # seed effects both invocations share
    ppls = {"a": shared + rng.normal(0, 0.5, 3), "b": shared + 2 + rng.normal(0, 0.5, 3)}
    val_losses = {name: rng.normal(4.5, 0.05, 3) for name in ppls}
    for name, values in ppls.items():
        runs = [{"lr": 1e-3, "seed": k, "diverged": False, "test_ppl": float(v), "val_loss": float(loss)}
                for k, (v, loss) in enumerate(zip(values, val_losses[name]))]
        # a grid run at another LR: not one of the seeds, so in neither column
        runs.append({"lr": 3e-3, "seed": 0, "diverged": False, "test_ppl": 1e4, "val_loss": 9.0})
        method = {"runs": runs, "chosen_lr": 1e-3, "chosen_lr_at_edge": False, "n_seeds": 3,
                  "test_ppls": [float(v) for v in values]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"methods": {"relora": method}}))
    script = Path(__file__).parents[2] / "docs" / "results" / "study" / "table.py"
    namespace = runpy.run_path(str(script))
    namespace["main"]([f"ref={tmp_path / 'a'}:relora", f"variant={tmp_path / 'b'}:relora"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    d = ppls["b"] - ppls["a"]
    paired = t_tail_by_integration(d.mean() / (d.std(ddof=1) / math.sqrt(3)), 2)
    welch = welch_p(ppls["b"], ppls["a"])
    star = " *" if welch < 0.05 else ""
    ppl = f"{ppls['b'].mean():.2f} ± {ppls['b'].std(ddof=1):.2f}"
    val = np.exp(val_losses["b"])
    val_ppl = f"{val.mean():.2f} ± {val.std(ddof=1):.2f}"
    assert last == f"| variant | 0.001 | 3 | {val_ppl} | {ppl} | {welch:.3f}{star} | {paired:.3f} |"


def test_study_table_joins_the_seeds_of_several_outputs_into_one_row(tmp_path, capsys):
    """table.py's OUT1+OUT2: the row is both outputs' seed runs at their one chosen LR (a grid run at another LR
    left out), its p-values over all of them; outputs that chose different LRs, or share a seed, are refused.
    OUT@SEEDS keeps some seeds of an output; a seed it does not have is refused."""
    import runpy

    rng = np.random.default_rng(3)
    ref, variant = rng.normal(40, 1, 3), rng.normal(37, 1, 3)

    def write(name: str, method_ppls: dict[str, dict[int, float]], lr: float = 1e-2) -> Path:
        methods = {}
        for method, by_seed in method_ppls.items():
            runs = [{"lr": lr, "seed": k, "diverged": False, "test_ppl": v, "val_loss": 3.5} for k, v in by_seed.items()]
            runs.append({"lr": lr / 5, "seed": min(by_seed), "diverged": False, "test_ppl": 1e4, "val_loss": 9.0})
            methods[method] = {"runs": runs, "chosen_lr": lr, "chosen_lr_at_edge": False, "n_seeds": len(by_seed),
                               "test_ppls": list(by_seed.values())}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"methods": methods}))
        return tmp_path / name

    a = write("a", {"keep": {0: ref[0], 1: ref[1]}, "reset": {0: variant[0], 1: variant[1]}})
    b = write("b", {"keep": {2: ref[2]}, "reset": {2: variant[2]}})
    main = runpy.run_path(str(Path(__file__).parents[2] / "docs" / "results" / "study" / "table.py"))["main"]
    main([f"keep={a}+{b}:keep", f"reset={a}+{b}:reset"])
    lines = capsys.readouterr().out.strip().splitlines()
    d = variant - ref
    paired = t_tail_by_integration(d.mean() / (d.std(ddof=1) / math.sqrt(3)), 2)
    welch = welch_p(variant, ref)
    star = " *" if welch < 0.05 else ""
    assert lines[-1] == (f"| reset | 0.01 | 3 | 33.12 ± 0.00 | {variant.mean():.2f} ± {variant.std(ddof=1):.2f} | "
                         f"{welch:.3f}{star} | {paired:.3f} |")
    assert lines[-2].startswith(f"| keep | 0.01 | 3 | 33.12 ± 0.00 | {ref.mean():.2f} ± {ref.std(ddof=1):.2f} |")
    other_lr = write("c", {"keep": {3: 41.0}}, lr=2e-3)
    with pytest.raises(SystemExit, match="chose different LRs"):
        main([f"keep={a}+{other_lr}:keep"])
    with pytest.raises(SystemExit, match="share a seed"):
        main([f"keep={a}+{a}:keep"])
    # OUT@SEEDS keeps only those seeds of one output: seed 1 of `a` replaced by seed 1 of `again`
    again = write("again", {"keep": {1: 45.0}})
    main([f"keep={a}@0+{again}+{b}:keep", f"one={a}@1:keep"])
    lines = capsys.readouterr().out.strip().splitlines()
    kept = np.array([ref[0], 45.0, ref[2]])
    assert lines[-2].startswith(f"| keep | 0.01 | 3 | 33.12 ± 0.00 | {kept.mean():.2f} ± {kept.std(ddof=1):.2f} |")
    assert lines[-1].startswith(f"| one | 0.01 | 1 | 33.12 | {ref[1]:.2f} |")
    with pytest.raises(SystemExit, match=r"no finished run at the chosen LR for seed\(s\) \[5\]"):
        main([f"keep={a}@0,5:keep"])
    with pytest.raises(SystemExit, match="comma-separated list of seeds"):
        main([f"keep={a}@x:keep"])
    with pytest.raises(SystemExit, match="results.json not found"):
        main([f"keep={tmp_path / 'missing'}:keep"])


def test_study_merge_jumps_reads_each_seed_runs_merge_records(tmp_path, capsys):
    """docs/results/study/table.py --merge-jumps: the jumps of the chosen LR's seed runs, from their merge records,
    against numpy on the same random losses; a grid run at another LR and records without merge fields are left
    out."""
    import runpy

    rng = np.random.default_rng(11)
    before = rng.uniform(4, 6, (2, 3))
    after = before + rng.normal(0.3, 0.1, (2, 3))  # 2 seeds x 3 merges
    runs = []
    for seed in range(2):
        run = tmp_path / f"relora-lr0.001-seed{seed}"
        run.mkdir()
        lines = [{"step": 5, "loss": 7.0}]
        lines += [{"step": 10 * (k + 1), "merge_loss_before": float(before[seed, k]),
                   "merge_loss_after": float(after[seed, k])} for k in range(3)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        runs.append({"lr": 1e-3, "seed": seed, "diverged": False, "run_dir": str(run)})
    other = tmp_path / "relora-lr0.003-seed0"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 10, "merge_loss_before": 1.0, "merge_loss_after": 9.0}))
    runs.append({"lr": 3e-3, "seed": 0, "diverged": False, "run_dir": str(other)})
    (tmp_path / "out").mkdir()
    results = {"methods": {"relora": {"runs": runs, "chosen_lr": 1e-3}}}
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))
    script = Path(__file__).parents[2] / "docs" / "results" / "study" / "table.py"
    runpy.run_path(str(script))["main"](["--merge-jumps", f"defect={tmp_path / 'out'}:relora"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    jumps = (np.exp(after) - np.exp(before)).ravel()
    largest = jumps[np.argmax(np.abs(jumps))]
    relative = (np.exp(after) / np.exp(before) - 1).mean()
    assert last == f"| defect | 2 | 3 | {jumps.mean():+.3g} | {largest:+.3g} | {relative:+.2%} |"


def test_study_dw_norms_from_analyze_spectra_match_the_matrices_norms(tmp_path, capsys):
    """docs/results/study/dw_norms.py: ||dW||_F over all matrices and the largest singular value, from the
    singular values ``relora analyze`` stores, against numpy's norms of the random matrices themselves."""
    import runpy

    rng = np.random.default_rng(5)
    mats = {"a": {"q": [rng.normal(size=(6, 6)) for _ in range(2)], "down": [rng.normal(size=(6, 12)) * 3]},
            "b": {"q": [rng.normal(size=(6, 6)) * 0.1]}}
    spectra = {label: {"matrices": {kind: [{"name": f"{kind}{i}", "singular_values": np.linalg.svd(m, compute_uv=False)
                                            .tolist()} for i, m in enumerate(ms)] for kind, ms in kinds.items()}}
               for label, kinds in mats.items()}
    (tmp_path / "an").mkdir()
    (tmp_path / "an" / "spectra.json").write_text(json.dumps(spectra))
    runpy.run_path(str(Path(__file__).parents[2] / "docs" / "results" / "study" / "dw_norms.py"))["main"](
        [str(tmp_path / "an")])
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    for line, (label, kinds) in zip(lines, mats.items(), strict=True):
        every = [m for ms in kinds.values() for m in ms]
        frobenius = math.sqrt(sum(np.linalg.norm(m, "fro") ** 2 for m in every))
        top = max(np.linalg.norm(m, 2) for m in every)
        kind = next(k for k, ms in kinds.items() if any(np.isclose(np.linalg.norm(m, 2), top) for m in ms))
        assert line == f"| {label} | {frobenius:.1f} | {top:.1f} ({kind}) |"
