#!/usr/bin/env bash
# Runs every `pagoda` command with --backend cuda and compares greedy output
# with --backend cpu. Usage: scripts/gpu-cli-check.sh PATH/TO/pagoda TEXT_FILE
# Exits non-zero if a command fails; prints where CPU and CUDA greedy tokens differ.
set -uo pipefail
P=${1:?pagoda binary}; TEXT=${2:?a text file for perplexity}
fail=0
run() { echo "+ $*"; "$@" || { echo "FAILED: $*"; fail=1; }; }
run "$P" devices --backend cuda
run "$P" plan --backend cuda --ctx 2048 --max-seqs 16
run "$P" tokenize --backend cuda --prompt "Hello, world"
for prompt in "The history of printing" "Once upon a time" "def fibonacci(n):" "The capital of France is"; do
  "$P" generate --backend cpu --prompt "$prompt" --greedy --max-tokens 48 --json > /tmp/cpu.json || fail=1
  "$P" generate --backend cuda --prompt "$prompt" --greedy --max-tokens 48 --json > /tmp/cuda.json || fail=1
  python3 - "$prompt" <<'PY'
import json, sys
a = json.load(open("/tmp/cpu.json"))["generated_tokens"]
b = json.load(open("/tmp/cuda.json"))["generated_tokens"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"greedy {sys.argv[1]!r}: cpu and cuda agree on {same} of {len(a)} tokens" + ("" if same == len(a) == len(b) else f" (first difference at step {same})"))
PY
done
run "$P" generate --backend cuda --prompt "Hi" --parallel 8 --max-tokens 32 --greedy
run "$P" chat --backend cuda --message "What is 2+2?" --json
run "$P" logits --backend cpu --prompt "The history of printing" --json
run "$P" logits --backend cuda --prompt "The history of printing" --json
run "$P" perplexity --backend cuda --file "$TEXT" --ctx 512 --json
run "$P" bench --backend cuda --batch 1,8,32 --prompt-len 128 --gen-len 64 --reps 3 --json
run "$P" bench --backend cuda --kv-dtype q8_0 --batch 1,8 --prompt-len 128 --gen-len 64 --reps 2 --json
exit $fail
