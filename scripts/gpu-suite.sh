#!/usr/bin/env bash
# The GPU suite on the lent H200, from prebuilt binaries (no Rust there).
# Usage: scripts/gpu-suite.sh DIR PHASE
#   DIR holds pagoda, tests/<name> (test binaries) and the model at
#   cache/models/SmolLM2-135M-Instruct.Q4_1.gguf.
#   PHASE: tests | novmm | sanitize | sanitize-nomodel | racecheck | bench | kquant-bench |
#          wgpu | wgpu-bench | profile | cli
#   (wgpu phases: DIR/wgpu/tests/<name>, the Vulkan loader unpacked from .gl first)
# Logs go to $OUT/<phase>-<name>.log; a summary line per binary is printed last.
set -uo pipefail
DIR=${1:?dir}; PHASE=${2:?phase}
REPO=$PWD
# NVIDIA's Vulkan driver for wgpu (the loader comes from .gl; see wgpu phases).
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
  [ -f "$icd" ] && { export VK_DRIVER_FILES=$icd; break; }
done
# Test binaries find fixtures through their build-time paths.
mkdir -p /work && [ -e /work/main ] || ln -s "$REPO" /work/main
export PAGODA_CACHE=$DIR/cache RUST_BACKTRACE=1
summary=()
runbin() { # name, extra env..., then args after --
  local name=$1; shift
  local log=$OUT/$PHASE-$name.log
  ( "$@" ) >"$log" 2>&1; local rc=$?
  summary+=("$name rc=$rc $(grep -E '^test result' "$log" | tail -1) $(grep -E 'ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY' "$log" | tr '\n' ' ')")
  grep -E "^test .*FAILED|panicked at|^---- " "$log" | head -20
}
case $PHASE in
tests)
  # ONLY="a b" runs just those binaries.
  for t in "$DIR"/tests/*; do
    n=$(basename "$t")
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $n "* ]] && continue
    runbin "$n" timeout 420 "$t" --ignored --test-threads 1 --nocapture
  done ;;
novmm)
  for n in cuda_arena cuda_memory cuda_engine cuda_reference; do
    [ -x "$DIR/tests/$n" ] && runbin "$n" env PAGODA_CUDA_VMM=0 timeout 300 "$DIR/tests/$n" --ignored --test-threads 1
  done ;;
sanitize)
  runbin memcheck-engine env PAGODA_STRESS_SCALE=0.1 timeout 500 compute-sanitizer --tool memcheck --leak-check full "$DIR/tests/cuda_engine" --ignored --test-threads 1 eight_threads
  runbin memcheck-arena env PAGODA_STRESS_OPS=40 timeout 300 compute-sanitizer --tool memcheck --leak-check full "$DIR/tests/cuda_arena" --ignored --test-threads 1
  runbin racecheck-parity timeout 500 compute-sanitizer --tool racecheck "$DIR/tests/cuda_parity" --ignored --test-threads 1 cuda_matches_cpu
  runbin racecheck-bench timeout 200 compute-sanitizer --tool racecheck "$DIR/pagoda" bench --backend cuda --dummy-weights tiny --batch 1,4 --prompt-len 32 --gen-len 8 --reps 1 ;;
sanitize-nomodel)
  runbin memcheck-arena env PAGODA_STRESS_OPS=40 timeout 200 compute-sanitizer --tool memcheck --leak-check full "$DIR/tests/cuda_arena" --ignored --test-threads 1
  runbin memcheck-bench timeout 300 compute-sanitizer --tool memcheck --leak-check full "$DIR/pagoda" bench --backend cuda --dummy-weights smollm2-135m --batch 1,4 --prompt-len 32 --gen-len 64 --reps 1
  runbin racecheck-parity timeout 400 compute-sanitizer --tool racecheck "$DIR/tests/cuda_parity" --ignored --test-threads 1 cuda_matches_cpu
  runbin novmm-arena env PAGODA_CUDA_VMM=0 timeout 100 "$DIR/tests/cuda_arena" --ignored --test-threads 1
  runbin novmm-parity env PAGODA_CUDA_VMM=0 timeout 100 "$DIR/tests/cuda_parity" --ignored --test-threads 1 ;;
wgpu)
  # The wgpu parity and model fixture tests on NVIDIA's Vulkan driver (each runs as the
  # adapter is and with SHADER_F16 / SUBGROUP masked).
  "$DIR/pagoda" devices 2>&1 | tail -8
  for t in "$DIR"/wgpu/tests/*; do
    n=$(basename "$t")
    runbin "$n" env XDG_RUNTIME_DIR=/tmp timeout 400 "$t" --test-threads 1 --nocapture
  done ;;
wgpu-bench)
  # Issue 12 item 4: wgpu beside CUDA on the same shapes (f16 KV).
  P=$DIR/pagoda
  {
    timeout 120 "$P" bench --backend wgpu --kv-dtype f16 --batch 1 --prompt-len 512 --gen-len 128 --reps 2 --json
    timeout 200 "$P" bench --backend wgpu --kv-dtype f16 --batch 8,64 --prompt-len 128 --gen-len 128 --reps 1 --json
  } > "$OUT/wgpu-bench.jsonl" 2> "$OUT/wgpu-bench.log"
  python3 "$REPO/scripts/bench-table.py" "$OUT/wgpu-bench.jsonl" ;;
kquant-bench)
  # Issue 15 item 5: the 7B shape in every K-quant / Q5 type (f16 KV; batch 1 pp512 + tg128,
  # batch 64 prompt 128 + 128).
  P=$DIR/pagoda
  for t in ${KQ_TYPES:-q4_k q5_k q6_k q5_0 q5_1}; do
    timeout 150 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype "$t" --batch 1 --prompt-len 512 --gen-len 128 --reps 1 --json
    timeout 150 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype "$t" --batch 64 --prompt-len 128 --gen-len 64 --reps 1 --json
  done > "$OUT/kquant-bench.jsonl" 2> "$OUT/kquant-bench.log"
  python3 "$REPO/scripts/bench-table.py" "$OUT/kquant-bench.jsonl" ;;
racecheck)
  runbin racecheck-parity timeout 400 compute-sanitizer --tool racecheck "$DIR/tests/cuda_parity" --ignored --test-threads 1 cuda_matches_cpu ;;
bench)
  # issue 11's table: f16 KV; batch 1 = llama-bench's pp512 / tg128; batched = prompt 128, 128 each.
  P=$DIR/pagoda
  {
    timeout 200 "$P" bench --backend cuda --kv-dtype f16 --batch 1 --prompt-len 512 --gen-len 128 --reps 3 --json
    timeout 200 "$P" bench --backend cuda --kv-dtype f16 --batch 8,32,64,128 --prompt-len 128 --gen-len 128 --reps 2 --json
    if [ "${BENCH_7B:-1}" != 0 ]; then
    timeout 200 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 1 --prompt-len 512 --gen-len 128 --reps 2 --json
    timeout 200 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 64 --prompt-len 128 --gen-len 128 --reps 1 --json
    fi
  } > "$OUT/bench.jsonl" 2> "$OUT/bench.log"
  python3 "$REPO/scripts/bench-table.py" "$OUT/bench.jsonl" ;;
profile)
  # Per-kernel GPU time and DRAM traffic (ncu, clocks left alone) of short bench runs;
  # PROFILE_7B=0 skips the 7B shape. Summaries: scripts/ncu-summary.py.
  P=$DIR/pagoda
  M="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
  prof() { # name, bench args...
    local name=$1; shift
    timeout 240 ncu --clock-control none --cache-control none --metrics "$M" --csv --print-units base --log-file "$OUT/ncu-$name.csv" \
      "$P" bench --backend cuda --kv-dtype f16 --reps 1 --warmup 0 "$@" > "$OUT/ncu-$name.out" 2>&1
    echo "== $name rc=$? ($*)"; python3 "$REPO/scripts/ncu-summary.py" "$OUT/ncu-$name.csv" 25
  }
  prof smol-b1 --batch 1 --prompt-len 128 --gen-len 8
  prof smol-b64 --batch 64 --prompt-len 128 --gen-len 4
  if [ "${PROFILE_7B:-1}" != 0 ]; then
  prof 7b-b1 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 1 --prompt-len 16 --gen-len 4
  fi ;;
cli)
  runbin cli bash "$REPO/scripts/gpu-cli-check.sh" "$DIR/pagoda" "$REPO/tests/fixtures/reference/ppl_text.txt"
  tail -60 "$OUT/cli-cli.log" ;;
esac
printf '%s\n' "${summary[@]}"
