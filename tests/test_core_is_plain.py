"""``core`` is a plain library: no module under it imports Kedro or MLflow (the README's promise), and in
``reporting`` only ``runs`` talks to MLflow. An import scan, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "calibrated_rlhf"
FRAMEWORKS = ("kedro", "kedro_mlflow", "kedro_datasets", "mlflow")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


CORE = sorted((SRC / "core").rglob("*.py"))


def test_the_scan_sees_every_core_module_and_catches_a_nested_import(tmp_path):
    assert len(CORE) > 10 and any(p.parent.name == "ppo" for p in CORE)
    sneaky = tmp_path / "m.py"
    sneaky.write_text("def f():\n    from mlflow.tracking import MlflowClient\n    import kedro.io\n")
    assert {"mlflow", "kedro"} <= imported_modules(sneaky)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(SRC)))
def test_core_imports_no_framework(path):
    found = imported_modules(path) & set(FRAMEWORKS)
    assert not found, f"{path.relative_to(SRC)} imports {sorted(found)}: core must stay a plain library"


def test_in_reporting_only_runs_imports_mlflow():
    importers = {p.name for p in (SRC / "reporting").glob("*.py") if imported_modules(p) & set(FRAMEWORKS)}
    assert importers == {"runs.py"}
