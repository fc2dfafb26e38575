#!/usr/bin/env bash
# Mutation testing (mutmut) of the library's math and the run-integrity code: the modules and the tests that
# guard them are named in pyproject.toml's [tool.mutmut]. Not part of the suite. Results: docs/mutation.md.
# Usage: bash scripts/mutation.sh [BUDGET_SECONDS]   (default 5400; a run stopped by the budget resumes
# where it stopped on the next call, since mutmut keeps its state in mutants/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,mutation
bin=$(dirname "$(bash scripts/python.sh)")
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
timeout "${1:-5400}" "$bin/mutmut" run --max-children "$(nproc)" || status=$?
[ "$status" -eq 124 ] && echo "budget spent: run the same command again to go on"
"$bin/mutmut" results   # the surviving mutants; `mutmut show NAME` prints one
echo "per module: status, count"
"$bin/mutmut" results --all true | awk -F': ' '{m = $1; sub(/^ +/, "", m); sub(/\.x(_|ǁ).*/, "", m); n[m "\t" $2]++}
    END {for (k in n) print k "\t" n[k]}' | sort
exit "$status"
