#!/bin/sh
# Every bench_map workload under every start method, full sizes: JSON lines into
# benchmarks/results/map-SM.jsonl and the tables into benchmarks/README.md.
#   PYTHON=/tmp/bench-venv/bin/python PYTHONPATH=$PWD/src benchmarks/run_all.sh [bench_map options]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
mkdir -p "$here/results"
for sm in fork forkserver spawn; do
    "$python" "$here/bench_map.py" --start-method "$sm" \
        --json "$here/results/map-$sm.jsonl" --update-readme "$@"
done
