"""The README's examples run, and CI runs the README's test command."""

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def python_example(marker: str) -> str:
    (block,) = [b for b in code_blocks("python") if marker in b]
    return block


def test_readme_python_example_runs(single_thread):
    example = python_example("relora.ReLoRA(")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    controller, dense = namespace["controller"], namespace["dense"]
    assert controller.restarts == 2
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in dense.named_parameters())


def test_readme_trainer_example_runs(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoints to ./trainer-out
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(python_example("relora.ReLoRACallback("), "README.md", "exec"), namespace)
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # no warning meant for GPU users on CPU
    callback, dense = namespace["callback"], namespace["dense"]
    assert [(e.step, e.restarted) for e in callback.events] == [(10, True), (20, True)]
    assert (tmp_path / "trainer-out" / "checkpoint-30" / "trainer_state.json").is_file()
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in dense.named_parameters())


def test_readme_opens_with_the_main_job_and_the_test_command():
    first = code_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert "relora train" in first[0]
    test_command = first[1].split("&&")[-1].split("#")[0].strip()
    assert test_command == "python -m pytest"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == test_command


@pytest.mark.slow
def test_readme_main_job_finishes_within_ten_minutes(tmp_path):
    """The README's first command, as written, in a fresh home and working directory."""
    first = code_blocks("bash")[0].strip().splitlines()[0]
    command = first.split("&&")[1].split("#")[0].strip()
    assert command.startswith("relora train")
    # a fresh shell: no OMP_NUM_THREADS (tests/conftest.py sets 1 for the suite), so relora picks its threads itself
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "HOME": str(tmp_path)}
    relora_bin = str(Path(sys.executable).parent / "relora")
    start = time.perf_counter()
    result = subprocess.run([relora_bin, *command.split()[1:]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val ppl" in result.stdout and "restarts     3" in result.stdout
    print(f"README main job: {elapsed:.0f} s\n" + result.stdout[-800:])
    assert elapsed < 600


STUDY = ROOT / "docs" / "results" / "study"
# Stand-ins for the study page's shell names: each $(chosen_lr ...) an LR, each $(chosen_run ...) a run directory
STUDY_STAND_INS = {"DATA": "/nonexistent/site-packages-bpe8192", "LR": "0.002", "LR_NWS": "0.001",
                   "LR_FULL": "0.001", "LR_LORA": "0.003"}


def study_commands() -> list[str]:
    """Every `relora ...` command of docs/results/study/README.md, continuations joined, shell names substituted."""
    text = (STUDY / "README.md").read_text()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    names = dict(STUDY_STAND_INS)

    def substitute(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: names[m[1]], text)

    commands = []
    for line in lines:  # assignments (S=..., R=$S/..., T2="--preset ...") and commands, in page order
        line = line.split(" #")[0].strip()
        match = re.fullmatch(r'(\w+)=(?:"([^"]*)"|([^\s(]\S*))', line)
        if match and match[1] not in STUDY_STAND_INS and not line.startswith(f"{match[1]}=$("):
            names[match[1]] = substitute(match[2] if match[2] is not None else match[3])
        if not line.startswith("relora "):
            continue
        line = re.sub(r"\$\(chosen_run [^)]*\)", "runs/stand-in", line)
        commands.append(substitute(line))
    return commands


def test_study_commands_resolve(monkeypatch):
    """The study's commands parse, and every run each `relora compare` would train passes validation; runs that
    two commands would share a directory for have the same config. Nothing trains."""
    from relora.analysis.compare_sets import PAPER_SETS, SETS, resolve_run
    from relora.cli import build_parser
    from relora.cli import train_overrides as _train_overrides
    from relora.run.config import incompatible_changes

    monkeypatch.chdir(ROOT)
    commands = study_commands()
    compares = [c for c in commands if c.startswith("relora compare")]
    assert len(compares) >= 20 and any("relora plot" in c for c in commands)
    parser = build_parser()
    runs: dict[str, dict] = {}
    for command in commands:
        args = parser.parse_args(command.split()[1:])
        if args.command != "compare":
            continue
        overrides = _train_overrides(args)
        lr = overrides.pop("lr", None)
        grid = (lr,) if lr is not None else args.lr_grid or (None,)  # None: the config's LR
        sets = list(PAPER_SETS) if args.set == "all" else [args.set]
        specs = {s.name: s for name in sets for s in SETS[name] if s.name in args.methods}
        assert set(specs) == set(args.methods), command
        runs_dir = Path(args.runs) if args.runs else Path(args.out) / "runs"
        for spec in specs.values():
            for k, lr in [(0, lr) for lr in grid] + [(k, grid[0]) for k in range(1, args.seeds)]:
                config = resolve_run(spec, runs_dir, preset=None, config_file=args.config, overrides=overrides,
                                     lr=lr, seed_index=k, clip_rule=args.clip_rule).to_dict()
                before = runs.setdefault(str(Path(config["out"]).resolve()), config)
                assert not incompatible_changes(before, config), (command, config["out"])


def test_results_progress_summarises_finished_partial_and_diverged_runs(tmp_path):
    """docs/results/progress.py, the record committed while a long comparison runs."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("progress", ROOT / "docs" / "results" / "progress.py")
    progress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(progress)
    for name, files in {
        "full-lr0.001-seed0": {"summary.json": json.dumps({"val_ppl": 99.974, "test_ppl": 105.126, "wall_s": 633.4})},
        "relora-lr0.001-seed0": {"metrics.jsonl": '{"step": 10}\n{"step": 20}\n'},
        "lora-lr0.01-seed0": {"diverged.json": "{}"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("method: x\n")
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
    (tmp_path / "not-a-run").mkdir()
    text = progress.main(tmp_path)
    assert "1 of 3 started runs finished" in text
    assert "| full-lr0.001-seed0 | done | 99.97 | 105.13 | 633 |" in text
    assert "| relora-lr0.001-seed0 | at step 20 |" in text and "| lora-lr0.01-seed0 | diverged |" in text
    assert "not-a-run" not in text


def test_results_pages_commands_parse():
    """The `relora ...` commands of docs/results/README.md and baselines/README.md parse with today's CLI, shell
    names (G=...) substituted: a renamed or removed flag fails here, not in a reader's terminal."""
    from relora.cli import build_parser

    parser = build_parser()
    seen = 0
    for page in (ROOT / "docs" / "results" / "README.md", ROOT / "docs" / "results" / "baselines" / "README.md"):
        text = "\n".join(re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)).replace("\\\n", " ")
        names = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M))
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("relora "):
                parser.parse_args(re.sub(r"\$\{?(\w+)\}?", lambda m: names[m[1]], line).split()[1:])
                seen += 1
    assert seen >= 4
