#!/usr/bin/env bash
# Records a viewer fixture trace: the default model answering six prompts,
# four at a time (the rest wait), four of them sharing a two-page prefix (so
# the KV grid shows owned, shared and cached-free pages, and the queue fills).
#
#   scripts/record-trace.sh                 # CPU:  viewer/tests/traces/cpu.jsonl
#   scripts/record-trace.sh --backend cuda  # H200: viewer/tests/traces/cuda.jsonl (VMM growth, graphs)
#
# Every *.jsonl in viewer/tests/traces/ gets its own snapshots
# (viewer/tests/snapshots.rs): after recording a new one, run
#   UPDATE_SNAPSHOTS=1 cargo test --release -p pagoda-viewer --test snapshots
# and look at the new PNGs before committing them.
# PAGODA=path/to/pagoda picks the binary (default: cargo run --release).
set -euo pipefail
cd "$(dirname "$0")/.."
backend=cpu
if [[ "${1:-}" == "--backend" ]]; then
  backend=$2
  shift 2
fi
out=${1:-viewer/tests/traces/$backend.jsonl}
if [[ -n "${PAGODA:-}" ]]; then
  pagoda=("$PAGODA")
else
  pagoda=(cargo run --release -q -p pagoda --bin pagoda --)
fi
"${pagoda[@]}" generate --backend "$backend" \
  --prompts viewer/tests/traces/prompts.txt --parallel 4 --ctx 192 \
  --max-tokens 72 --max-batched-tokens 40 --greedy --seed 7 --trace "$out" >/dev/null
echo "recorded $out ($(wc -c <"$out") bytes, $(wc -l <"$out") events)"
