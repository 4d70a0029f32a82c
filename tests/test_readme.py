"""The README's examples run, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_example_runs():
    (example,) = code_blocks("python")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    controller, dense = namespace["controller"], namespace["dense"]
    assert controller.restarts == 2
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
