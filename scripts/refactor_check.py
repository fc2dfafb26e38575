"""Fingerprint of what a set of `kedro run` commands produce: every logged metric and every saved weight's sha256.

A refactor must leave both unchanged. Run this once with the code before it and once after, then compare:

    nice -n 10 python scripts/refactor_check.py --src /tmp/before/src --out before.json
    nice -n 10 python scripts/refactor_check.py --src src --out after.json
    python scripts/refactor_check.py --diff before.json after.json

``--keep DIR`` runs in ``DIR`` and keeps it; ``--rehash DIR --out F`` fingerprints a kept folder again (after a
change to this script's masks) without rerunning.

Each run list runs in order in one scratch copy of the project (conf/, pyproject.toml; no data), with the
package imported from ``--src`` (``PYTHONPATH``), its own sqlite MLflow store and ``PYTHONHASHSEED=1``.
The default list is the tiny run (every default stage, PPO included) and, from it, RLOO, GRPO, DPO and
best-of-n. Metrics are keyed ``<command index>:<metric>`` with their whole history; weights (and parameters) by
their path with version timestamps and run ids masked. Timings (``perf/``, ``*_s``, ``runtime``) differ
from run to run and are left out of the comparison, listed apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [
    ["--env", "tiny"],
    ["--env", "tiny", "--pipelines", "rl", "--params", "rl.algorithm=rloo"],
    ["--env", "tiny", "--pipelines", "rl", "--params", "rl.algorithm=grpo"],
    ["--env", "tiny", "--pipelines", "dpo"],
    ["--env", "tiny", "--pipelines", "best_of_n"],
]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npy")
TIMING = re.compile(r"(^|/)perf/|_s$|runtime|per_second|samples_per|steps_per|_seconds|duration|elapsed")
# a versioned dataset's folder (2026-12-06T18.40.12.123Z), run ids, and staging folders named by host and pid
VOLATILE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z|[0-9a-f]{32}|staging-[^/]+")


def run_all(src: Path, runs: list[list[str]], work: Path) -> dict:
    project = work / "project"
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local", "replay_*"))
    (project / "conf" / "local").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, project / name)
    (project / "src").mkdir()
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONHASHSEED": "1", "COLUMNS": "200",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "KEDRO_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for i, args in enumerate(runs):
        proc = subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=1800)
        (work / f"run_{i}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"kedro run {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"commands": [" ".join(a) for a in runs], "metrics": metrics(project), "params": params(project),
            "weights": weights(project)}


def _runs(project: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("calibrated_rlhf")
    return client, sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


def metrics(project: Path) -> dict[str, list[float]]:
    client, runs = _runs(project)
    out = {}
    for i, run in enumerate(runs):
        for key in sorted(run.data.metrics):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            out[f"{i}:{key}"] = [m.value for m in history]
    return out


def params(project: Path) -> dict[str, str]:
    _, runs = _runs(project)
    return {f"{i}:{k}": VOLATILE.sub("<v>", v) for i, run in enumerate(runs) for k, v in sorted(run.data.params.items())}


def weights(project: Path) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for path in sorted(project.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            key = VOLATILE.sub("<v>", str(path.relative_to(project)))
            found.setdefault(key, []).append(_sha256(path))
    return {k: ",".join(v) for k, v in found.items()}


def _comparable(part: str, value: object) -> object:
    """Weights under one masked path (several runs' folders, named by random run ids) compare as a multiset."""
    return sorted(value.split(",")) if part == "weights" and isinstance(value, str) else value


def _sha256(path: Path) -> str:
    """The file's sha256; for TRL's pickled ``training_args.bin``, that of its fields with run folders masked (its
    ``output_dir`` is a staging folder inside the run's, named by the MLflow run id)."""
    if path.name != "training_args.bin":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    import torch

    fields = {k: VOLATILE.sub("<v>", str(v)) for k, v in sorted(vars(torch.load(path, weights_only=False)).items())}
    return "fields:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def diff(a: dict, b: dict) -> int:
    bad = 0
    print(f"commands: {a['commands']}")
    for part in ("metrics", "params", "weights"):
        keys = sorted(set(a[part]) | set(b[part]))
        timing = [k for k in keys if part == "metrics" and TIMING.search(k.split(":", 1)[1])]
        compared = [k for k in keys if k not in timing]
        changed = [k for k in compared if _comparable(part, a[part].get(k)) != _comparable(part, b[part].get(k))]
        print(f"{part}: {len(compared)} compared, {len(changed)} differ"
              + (f", {len(timing)} timings left out" if timing else ""))
        for k in changed:
            print(f"  {k}: {a[part].get(k)!r} -> {b[part].get(k)!r}"[:400])
        bad += len(changed)
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the src/ folder whose package runs")
    ap.add_argument("--out", type=Path, help="where the JSON fingerprint goes")
    ap.add_argument("--run", action="append", help="one `kedro run` argument string (repeatable; default: the list)")
    ap.add_argument("--keep", type=Path, help="run in this folder (kept) instead of a temporary one")
    ap.add_argument("--rehash", type=Path, help="recompute a kept folder's fingerprint (--keep) into --out")
    ap.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two fingerprints")
    args = ap.parse_args()
    if args.diff:
        raise SystemExit(diff(*(json.loads(p.read_text()) for p in args.diff)))
    runs = [r.split() for r in args.run] if args.run else RUNS
    if args.rehash:
        project = args.rehash / "project"
        result = {"commands": [" ".join(a) for a in runs], "metrics": metrics(project), "params": params(project),
                  "weights": weights(project)}
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
        return
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run_all(args.src, runs, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="refactor_check_") as tmp:
            result = run_all(args.src, runs, Path(tmp))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result['metrics'])} metrics, {len(result['weights'])} weight files -> {args.out}")


if __name__ == "__main__":
    main()
