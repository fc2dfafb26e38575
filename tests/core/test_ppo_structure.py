"""The PPO package stays readable: short functions, a trainer that fits in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import calibrated_rlhf.core.ppo as ppo_pkg

PPO_DIR = Path(ppo_pkg.__file__).parent
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 400


def _functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, line count including decorators and docstring) of every function in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                found.append((f"{prefix}{child.name}", child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


@pytest.mark.parametrize("path", sorted(PPO_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_function_in_core_ppo_is_longer_than_60_lines(path: Path) -> None:
    too_long = {name: n for name, n in _functions(path) if n > MAX_FUNCTION_LINES}
    assert not too_long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_trainer_module_stays_short() -> None:
    n = len((PPO_DIR / "trainer.py").read_text().splitlines())
    assert n <= MAX_TRAINER_LINES, f"core/ppo/trainer.py has {n} lines (at most {MAX_TRAINER_LINES})"


def test_the_checker_sees_long_functions(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(70))
    src = tmp_path / "m.py"
    src.write_text(f"class A:\n    @staticmethod\n    def f():\n{body}\n")
    assert dict(_functions(src))["A.f"] > MAX_FUNCTION_LINES
