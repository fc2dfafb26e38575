"""`scripts/overoptimization.sh`'s order of work, two runs at once and its failure, with an interpreter that records
its calls: each real `kedro run` takes a minute, so the suite checks the orchestration, and the committed results
(docs/overoptimization.md) the runs themselves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "overoptimization.sh"


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter that logs `start <OMP_NUM_THREADS> <args>` and `end`, takes 0.4 s, and fails when its
    arguments hold $FAIL_ON."""
    log = tmp_path / "calls.log"
    exe = tmp_path / "python"
    exe.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "start ${{OMP_NUM_THREADS:-unset}} $*" >> {log}\n'
        "sleep 0.4\n"
        f'echo "end $*" >> {log}\n'
        'if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit 1; fi\n')
    exe.chmod(0o755)
    return exe, log


def run_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    exe, log = fake_python(tmp_path)
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHON": str(exe), "SIZES": "9600 600", "TARGETS": "1", "SEEDS": "0",
                               "JOBS": "2", **env})
    return proc, log.read_text().splitlines() if log.exists() else []


def starts(lines: list[str], needle: str) -> list[int]:
    return [i for i, line in enumerate(lines) if line.startswith("start") and needle in line]


def test_each_sizes_dag_runs_alone_before_its_runs_then_they_go_two_at_once(tmp_path):
    proc, lines = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    dags = starts(lines, "--pipelines data_prep,reward_model")
    assert len(dags) == 3  # 9600, 600, then the large reward models at 2400
    assert "n_pairs=2400" in lines[dags[2]] and "reward_model.size.num_hidden_layers=4" in lines[dags[2]]
    assert all(lines[i].split()[1] == "unset" for i in dags)  # the DAG keeps torch's threads
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))  # as nproc counts the cores
    queued = [i for i in starts(lines, "kedro run") if i not in dags]
    assert queued and all(lines[i].split()[1] == threads for i in queued)
    for dag, next_dag in zip(dags, dags[1:] + [len(lines)]):  # after its DAG ended, before the next DAG
        end = lines.index(lines[dag].replace("start unset", "end", 1))
        mine = [q for q in queued if dag < q < next_dag]
        assert mine and min(mine) > end
    # best-of-n, the five scale runs at the first size only, PPO and RLOO: 8, 3 and 3 queued runs
    assert len(starts(lines, "_scale")) == 5 and all("rm9600_scale" in lines[i] for i in starts(lines, "_scale"))
    assert len(queued) == 14
    running = most = 0
    for line in lines:
        if "kedro run" in line and "data_prep,reward_model" not in line:
            running += 1 if line.startswith("start") else -1
            most = max(most, running)
    assert most == 2
    report = starts(lines, "calibrated_rlhf.reporting.overoptimization")
    assert len(report) == 1 and report[0] == max(i for i, ln in enumerate(lines) if ln.startswith("start"))
    assert "--sizes 9600,600,2400_large" in lines[report[0]]


def test_a_failed_run_fails_the_script_before_the_next_size_and_the_report(tmp_path):
    proc, lines = run_script(tmp_path, FAIL_ON="rl.kl_target=1,rl.seed=0,scenario=overoptimization_rm9600")
    assert proc.returncode != 0
    assert len(starts(lines, "--pipelines data_prep,reward_model")) == 1
    assert not starts(lines, "calibrated_rlhf.reporting.overoptimization")
    assert len(starts(lines, "kedro run")) == 9  # the first size's DAG and its eight queued runs all ran


def test_a_mistyped_setting_is_refused_before_any_run(tmp_path):
    for setting, value in (("SCALE", "1"), ("JOBS", "0"), ("JOBS", "two")):
        proc, lines = run_script(tmp_path, **{setting: value})
        assert proc.returncode == 2 and f"{setting} must be" in proc.stderr and f"'{value}'" in proc.stderr
        assert lines == []


def test_untouched_seeds_run_every_rl_run_again_under_their_own_tag_and_the_report_scores_them(tmp_path):
    proc, lines = run_script(tmp_path, UNTOUCHED_SEEDS="2", LARGE_SIZE="0", SCALE="0")
    assert proc.returncode == 0, proc.stderr
    checked = starts(lines, "_untouched")
    assert len(checked) == 4  # PPO and RLOO at the one target, for each of the two sizes
    assert all("seed=2,scenario=overoptimization_rm" in lines[i] and lines[i].endswith("_untouched") for i in checked)
    assert not [i for i in starts(lines, "seed=0") if "_untouched" in lines[i]]
    report = lines[starts(lines, "calibrated_rlhf.reporting.overoptimization")[0]]
    assert "--sizes 9600,600 --untouched 9600,600" in report
    (tmp_path / "plain").mkdir()
    _, plain = run_script(tmp_path / "plain", LARGE_SIZE="0")  # none asked for: none run, none read
    assert not [line for line in plain if "_untouched" in line or "--untouched" in line]
