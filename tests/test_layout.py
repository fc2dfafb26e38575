"""How the package is divided, read from the sources with ``ast`` (nothing is imported): PPO's package stays its
algorithm, the rest of ``core`` does not lean on it, the speed paths import no algorithm, ``core`` stays shallow,
no pipeline reaches into another's nodes nor reads data from a path itself, and the top level holds only Kedro's
files and packages. That ``core`` imports neither Kedro nor MLflow is ``tests/test_core_is_plain.py``.
Every import counts, one inside a function too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "calibrated_rlhf"
CORE, PPO, PIPELINES = "calibrated_rlhf.core", "calibrated_rlhf.core.ppo", "calibrated_rlhf.pipelines"
SPEED = "calibrated_rlhf.core.speed"
# what the speed paths sit below: they are called by these, never the other way
ALGORITHMS = (PPO, "calibrated_rlhf.core.rl", "calibrated_rlhf.core.reward_model")
MAX_PPO_LINES = 1500
MAX_CORE_LAYERS = 6
# modules outside core/ppo that may import it: PPO's own entry points (none today)
PPO_ENTRY_POINTS: frozenset[str] = frozenset()
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "settings.py", "pipeline_registry.py"}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / "calibrated_rlhf").rglob("*.py"))}


def imports(path: Path, known: set[str], src: Path = SRC) -> set[str]:
    """The project modules ``path`` imports: ``from a.b import c`` is module ``a.b.c`` where that is a module,
    else ``a.b``. Relative imports are resolved against the file's package."""
    name = module_name(path, src)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return found & known


def import_graph(src: Path = SRC, prefix: str = CORE) -> dict[str, set[str]]:
    """Module -> the modules under ``prefix`` it imports, for every module under ``prefix``."""
    known = set(modules(src))
    return {m: {t for t in imports(p, known, src) if t == prefix or t.startswith(prefix + ".")} - {m}
            for m, p in modules(src).items() if m == prefix or m.startswith(prefix + ".")}


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports a -> b -> ... (a module that imports nothing is one layer); a cycle is an error."""
    best: dict[str, list[str]] = {}

    def visit(module: str, path: tuple[str, ...]) -> list[str]:
        if module in path:
            raise ValueError(f"import cycle: {' -> '.join((*path, module))}")
        if module not in best:
            below = [visit(t, (*path, module)) for t in sorted(graph.get(module, ()))]
            best[module] = [module, *max(below, key=len, default=[])]
        return best[module]

    return max((visit(m, ()) for m in sorted(graph)), key=len, default=[])


def test_core_ppo_is_at_most_1500_lines():
    files = sorted((PACKAGE / "core" / "ppo").glob("*.py"))
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert sum(lines.values()) <= MAX_PPO_LINES, f"core/ppo has {sum(lines.values())} lines (at most {MAX_PPO_LINES}): {lines}"


def test_no_module_under_core_outside_ppo_imports_it():
    leaning = {m: sorted(t for t in targets if t == PPO or t.startswith(PPO + "."))
               for m, targets in import_graph().items() if not (m == PPO or m.startswith(PPO + "."))}
    leaning = {m: t for m, t in leaning.items() if t and m not in PPO_ENTRY_POINTS}
    assert not leaning, f"core modules that import core/ppo (move what they share below it): {leaning}"


def test_the_speed_paths_import_no_algorithm():
    leaning = {m: sorted(t for t in targets if any(t == a or t.startswith(a + ".") for a in ALGORITHMS))
               for m, targets in import_graph().items() if m == SPEED or m.startswith(SPEED + ".")}
    leaning = {m: t for m, t in leaning.items() if t}
    assert not leaning, f"core/speed modules that import an algorithm (pass what they need in instead): {leaning}"


def test_core_is_at_most_6_import_layers_deep():
    chain = longest_chain(import_graph())
    assert len(chain) <= MAX_CORE_LAYERS, f"{len(chain)} layers: {' -> '.join(chain)}"


def test_no_pipeline_imports_another_pipelines_nodes():
    stages = {p.parent.name for p in (PACKAGE / "pipelines").glob("*/__init__.py")}
    known = set(modules())
    crossing = {}
    for stage in sorted(stages):
        for path in sorted((PACKAGE / "pipelines" / stage).glob("*.py")):
            others = sorted(t for t in imports(path, known) for other in stages - {stage}
                            if t.startswith(f"{PIPELINES}.{other}.nodes"))
            if others:
                crossing[module_name(path)] = others
    assert not crossing, f"pipelines importing another pipeline's nodes (share through a library function): {crossing}"


def test_the_top_level_holds_only_kedros_files_and_packages():
    loose = sorted(p.name for p in PACKAGE.iterdir() if p.is_file() and p.name not in TOP_LEVEL_FILES)
    not_packages = sorted(p.name for p in PACKAGE.iterdir()
                          if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists())
    assert not loose and not not_packages, f"loose modules {loose}, folders that are not packages {not_packages}"


# The checks read what they claim to: a nested import, a submodule imported by name, a relative import.


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "calibrated_rlhf" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_graph_sees_nested_submodule_and_relative_imports(tmp_path):
    src = _tree(tmp_path, {"__init__.py": "", "core/__init__.py": "", "core/a.py": "", "core/b.py": "",
                           "core/speed/__init__.py": "", "core/speed/fast.py": "from ..a import x\n",
                           "core/c.py": "def f():\n    from calibrated_rlhf.core.speed import fast\n    import calibrated_rlhf.core.b\n"})
    graph = import_graph(src)
    assert graph[f"{CORE}.c"] == {f"{CORE}.speed.fast", f"{CORE}.b"}
    assert graph[f"{CORE}.speed.fast"] == {f"{CORE}.a"}
    assert longest_chain(graph) == [f"{CORE}.c", f"{CORE}.speed.fast", f"{CORE}.a"]


def test_the_chain_refuses_a_cycle():
    with pytest.raises(ValueError, match="cycle"):
        longest_chain({"a": {"b"}, "b": {"a"}})


def test_in_pipelines_only_tracking_imports_mlflow():
    """Nodes log through kedro-mlflow's datasets; what must stay a direct MLflow call is in pipelines/tracking.py,
    with the reason. Logging the pyfunc bundle (``serving.log_reward_model``) is such a call."""
    importers = set()
    for path in sorted((PACKAGE / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            logged = {a.name for a in node.names} if isinstance(node, ast.ImportFrom) else set()
            if (any(n.split(".")[0] in ("mlflow", "kedro_mlflow") for n in names)
                    or (names[:1] == ["calibrated_rlhf.serving"] and "log_reward_model" in logged)):
                importers.add(str(path.relative_to(PACKAGE)))
    assert importers == {"pipelines/tracking.py"}, f"MLflow imported outside pipelines/tracking.py: {importers}"


# Reading data from a path the parameters name is the catalog's (calibrated_rlhf.datasets): a node that opens it
# itself reads what the catalog does not describe, and its errors bypass the datasets' naming of file, row and field.
HF_DATASETS = "datasets"
READERS = {"open", "read_text", "read_bytes", "load", "load_from_disk", "load_dataset", "read_parquet",
           "read_csv", "read_json", "read_table"}


def data_reads(path: Path) -> list[str]:
    """``line: what`` for each import of Hugging Face ``datasets`` and each call that reads a file, in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"{node.lineno}: import {n}" for n in names if n.split(".")[0] == HF_DATASETS]
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in READERS:
                found.append(f"{node.lineno}: {name}()")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_no_pipeline_reads_data_from_a_path_itself():
    reads = {str(p.relative_to(PACKAGE)): r for p in sorted((PACKAGE / "pipelines").rglob("*.py"))
             if (r := data_reads(p))}
    assert not reads, f"pipeline modules reading data themselves (read it through a catalog dataset): {reads}"


def test_the_data_read_check_sees_imports_and_reads(tmp_path):
    path = tmp_path / "nodes.py"
    path.write_text("import json\nfrom pathlib import Path\n\ndef f(p):\n    import datasets\n"
                    "    return datasets.load_from_disk(p), json.loads(Path(p).read_text())\n"
                    "from datasets.utils import x\nfrom .datasets import y\nfrom calibrated_rlhf.datasets import z\n")
    assert data_reads(path) == ["5: import datasets", "6: load_from_disk()", "6: read_text()",
                                "7: import datasets.utils"]
