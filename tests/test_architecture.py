"""The house rules of docs/architecture.md, checked: import contracts, module and function sizes, test layout."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "relora"
MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 60  # docstrings not counted
# Functions that are argument tables or declarative lists rather than logic, with why.
LONG_BY_DESIGN: dict[str, str] = {
    "cli/parser.py:build_parser": "the argument table of every command but the generated train flags",
}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter]: layers, a pure core, leaves that import nothing, no cycles."""
    lint = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert lint, "import-linter is a test dependency: pip install -e .[test]"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "kept" in done.stdout


def test_a_broken_contract_is_caught(tmp_path):
    """The check can fail: a copy of the package whose core imports the CLI breaks two contracts."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "relora", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "relora" / "core" / "schedule.py").write_text(
        (PACKAGE / "core" / "schedule.py").read_text() + "\nfrom relora import cli  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(copy)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "relora.core.schedule -> relora.cli" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines; split it by what its parts do"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                length -= first.end_lineno - first.lineno + 1  # a docstring is documentation, not steps
            name = f"{path.relative_to(PACKAGE)}:{node.name}"
            if name not in LONG_BY_DESIGN:
                assert length <= MAX_FUNCTION_LINES, f"{name} is {length} lines; give its steps names"


def test_the_test_tree_mirrors_the_package():
    """tests/X/ exists only for a package folder src/relora/X/ (tests of top-level modules sit in tests/)."""
    for folder in (ROOT / "tests").iterdir():
        if folder.is_dir() and any(folder.glob("test_*.py")):
            assert (PACKAGE / folder.name / "__init__.py").is_file(), f"tests/{folder.name}/ has no src/relora/{folder.name}/"
