"""The repository stands alone: a user's clone has nothing beside it, so nothing here may reach outside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# written in two parts so that this file does not match itself
OUTSIDE = ("../" + "shared", "shared/" + "anchors")


def test_no_file_names_a_folder_outside_the_repository():
    named = []
    for top in ("tests", "bench", "conf", "scripts", "src", "docs", ".ci", "README.md", "pyproject.toml"):
        paths = [ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*")
        for path in paths:
            built = any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts)
            text_file = path.suffix in {"", ".py", ".sh", ".md", ".yml", ".yaml", ".toml", ".txt", ".ipynb"}
            if path.is_file() and not built and text_file:
                text = path.read_text(errors="replace")
                named += [f"{path.relative_to(ROOT)}: {o}" for o in OUTSIDE if o in text]
    assert not named, named


def test_the_reference_workload_exports_from_the_repository_alone(tmp_path):
    """What `conf/reference_workload` ingests and the benchmarks train on, made by the copy in bench/baselines."""
    out = tmp_path / "export"
    subprocess.run([sys.executable, str(ROOT / "bench" / "baselines" / "workload.py"), "--export", str(out)],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    heldout = (out / "heldout.jsonl").read_text().splitlines()
    assert (len(train), len(heldout)) == (4096, 1024)
    assert set(train[0]) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "true_prob_chosen"}
    assert all(0 < row["true_prob_chosen"] < 1 for row in train)


def _imported_modules(source: str) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared_distributions() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_of_the_code_tests_benchmarks_and_notebook_is_a_declared_dependency():
    """A user's environment has what pyproject.toml declares and nothing else (IPython once came only from the
    machines' preinstalled packages)."""
    import importlib.metadata as md

    sources = {p: p.read_text() for top in ("src", "tests", "bench") for p in (ROOT / top).rglob("*.py")}
    notebook = json.loads((ROOT / "notebooks" / "compare_runs.ipynb").read_text())
    sources[ROOT / "notebooks" / "compare_runs.ipynb"] = "\n".join(
        "".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    local = {"calibrated_rlhf", "tests"} | {p.stem for top in ("bench", "bench/baselines", "tests", "tests/core")
                                            for p in (ROOT / top).glob("*.py")}
    owners = md.packages_distributions()
    declared = _declared_distributions()
    undeclared = {}
    for path, source in sources.items():
        for module in _imported_modules(source) - set(sys.stdlib_module_names) - local:
            dists = {d.lower().replace("_", "-") for d in owners.get(module, [f"<not installed: {module}>"])}
            if not dists & declared:
                undeclared.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, undeclared
