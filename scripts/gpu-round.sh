#!/usr/bin/env bash
# One short round on the lent H200 with few calls (device time is scarce): run from the repo
# root there after gpu-pack.sh's folders are carried. Usage: scripts/gpu-round.sh DIR nomodel|model
#   nomodel: tensor-core A/B (PAGODA_CUDA_MMA=1 vs 2: matmul parity, bench), K-quant 7B bench
#   model:   model-level CUDA tests with MMA=2, the viewer's CUDA trace, wgpu on NVIDIA Vulkan
#            (tests, parity, bench)
#   single:  one call without the model (carry device-carry-d = bins.tgz + wgpu.tgz, and .gl):
#            wgpu devices / bench / parity on NVIDIA Vulkan beside CUDA, the viewer's CUDA trace
#            on dummy weights of the default model's shapes, the 7B Q5_K / Q5_1 bench, MMA=2.
# Logs and JSON under $OUT.
set -uo pipefail
DIR=${1:?dir}; PHASE=${2:?phase}
REPO=$PWD
mkdir -p /work && { [ -e /work/main ] || ln -s "$REPO" /work/main; }
export PAGODA_CACHE=$DIR/cache RUST_BACKTRACE=1 XDG_RUNTIME_DIR=/tmp
P=$DIR/pagoda
table() { python3 "$REPO/scripts/bench-table.py" "$1"; }
vulkan() {
  for f in "$REPO"/.gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$icd" ] && { export VK_DRIVER_FILES=$icd; break; }
  done
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
}
case $PHASE in
single)
  mkdir -p "$DIR/wgpu" "$DIR/cache"
  tar xzf device-carry-d/bins.tgz -C "$DIR" && tar xzf device-carry-d/wgpu.tgz -C "$DIR/wgpu"
  vulkan
  B="--kv-dtype f16 --dummy-weights smollm2-135m --batch 1,64 --prompt-len 128 --gen-len 32 --reps 1 --json"
  timeout 15 "$P" devices > "$OUT/devices.txt" 2>&1; grep -iA3 wgpu "$OUT/devices.txt" | head -6
  timeout 40 "$P" bench --backend wgpu $B > "$OUT/wgpu-bench.json" 2> "$OUT/wgpu-bench.log"
  table "$OUT/wgpu-bench.json"; tail -1 "$OUT/wgpu-bench.log"
  timeout 25 "$P" bench --backend cuda $B > "$OUT/cuda-bench.json" 2>/dev/null; table "$OUT/cuda-bench.json"
  timeout 30 "$P" generate --backend cuda --dummy-weights smollm2-135m --prompts viewer/tests/traces/prompts.txt \
    --parallel 4 --ctx 512 --max-tokens 72 --max-batched-tokens 40 --greedy --seed 7 --trace "$OUT/cuda.jsonl" \
    > /dev/null 2> "$OUT/trace.log"; tail -1 "$OUT/trace.log"
  timeout 75 "$DIR/wgpu/tests/wgpu_parity" --test-threads 1 --skip masked > "$OUT/wgpu_parity.log" 2>&1
  echo "wgpu_parity rc=$? $(grep -E '^test result' "$OUT/wgpu_parity.log")"
  for t in q5_k q5_1; do
    timeout 20 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype "$t" --batch 1,64 --prompt-len 128 --gen-len 16 --reps 1 --json
  done > "$OUT/kq.json" 2>/dev/null; table "$OUT/kq.json"
  PAGODA_CUDA_MMA=2 PAGODA_PARITY_OPS=matmul,rms_norm_matmul timeout 40 "$DIR/tests/cuda_parity" --ignored --test-threads 1 --nocapture > "$OUT/mma2.log" 2>&1
  echo "mma2 parity rc=$?"
  for mma in 1 2; do
    PAGODA_CUDA_MMA=$mma timeout 15 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --batch 32,64 --prompt-len 128 --gen-len 32 --reps 1 --json > "$OUT/m$mma.json" 2>/dev/null
    table "$OUT/m$mma.json"
  done ;;
wgpu-last)
  # Model-free (carry device-carry-d and .gl): wgpu parity on NVIDIA Vulkan as the adapter is,
  # wgpu beside CUDA on dummy SmolLM2 weights, cuda_parity on the same binaries.
  mkdir -p "$DIR/wgpu" "$DIR/cache" "$OUT/w"; W=$OUT/w
  tar xzf device-carry-d/bins.tgz -C "$DIR" && tar xzf device-carry-d/wgpu.tgz -C "$DIR/wgpu"
  vulkan
  timeout 150 "$DIR/wgpu/tests/wgpu_parity" --test-threads 1 --nocapture --skip masked > "$W/wgpu_parity.log" 2>&1
  echo "wgpu_parity rc=$? $(grep -E '^test result' "$W/wgpu_parity.log")"; grep -E "panicked at|FAILED" "$W/wgpu_parity.log" | head -4
  B="--kv-dtype f16 --dummy-weights smollm2-135m --batch 1,64 --prompt-len 128 --gen-len 32 --reps 1 --json"
  timeout 60 "$P" bench --backend wgpu $B > "$W/wgpu-bench.json" 2> "$W/wgpu-bench.log"; table "$W/wgpu-bench.json"
  timeout 30 "$P" bench --backend cuda $B > "$W/cuda-bench.json" 2>/dev/null; table "$W/cuda-bench.json"
  timeout 150 "$DIR/tests/cuda_parity" --ignored --test-threads 1 > "$W/cuda_parity.log" 2>&1
  echo "cuda_parity rc=$? $(grep -E '^test result' "$W/cuda_parity.log")"
  tar czf "$OUT/w.tgz" -C "$OUT" w ;;
parity)
  # cuda_parity on the defaults and with the one-kernel GEMV (PAGODA_CUDA_MV=0), no model.
  mkdir -p "$DIR/cache"; tar xzf device-carry-d/bins.tgz -C "$DIR"
  timeout 150 "$DIR/tests/cuda_parity" --ignored --test-threads 1 > "$OUT/parity.log" 2>&1
  echo "cuda_parity rc=$? $(grep -E '^test result' "$OUT/parity.log")"
  PAGODA_CUDA_MV=0 PAGODA_PARITY_OPS=matmul,rms_norm_matmul timeout 100 "$DIR/tests/cuda_parity" --ignored --test-threads 1 > "$OUT/parity-mv0.log" 2>&1
  echo "cuda_parity MV=0 rc=$? $(grep -E '^test result' "$OUT/parity-mv0.log")"
  timeout 30 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --batch 1 --prompt-len 128 --gen-len 64 --reps 1 --json > "$OUT/b1.json" 2>/dev/null; table "$OUT/b1.json" ;;
stage-a|stage-b)
  # The model travels in two halves (the carry limit): stage-a with device-carry-a, stage-b
  # with device-carry-b (+ .gl), then `final` with device-carry-c, each right after the last.
  mkdir -p "$DIR"; cp device-carry-*/model.part* device-carry-*/wgpu.tgz "$DIR"/ 2>/dev/null; ls "$DIR" ;;
final)
  # Model-level CUDA suite, issue 11's table, wgpu on NVIDIA Vulkan (as the adapter is).
  mkdir -p "$DIR/cache/models" "$DIR/wgpu" "$OUT/final"; F=$OUT/final
  tar xzf device-carry-c/bins.tgz -C "$DIR" && tar xzf "$DIR/wgpu.tgz" -C "$DIR/wgpu"
  cat "$DIR"/model.part00 "$DIR"/model.part01 > "$DIR/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  sha256sum "$DIR/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -c1-16
  skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }  # SKIP="names" leaves those out
  for t in cuda_parity cuda_reference cuda_engine cuda_memory cuda_arena; do
    skip "$t" && continue
    timeout 200 "$DIR/tests/$t" --ignored --test-threads 1 > "$F/$t.log" 2>&1
    echo "$t rc=$? $(grep -E '^test result' "$F/$t.log" | tail -1)"
    grep -E "^test .*FAILED|panicked at" "$F/$t.log" | head -4
  done
  {
    timeout 100 "$P" bench --backend cuda --kv-dtype f16 --batch 1 --prompt-len 512 --gen-len 128 --reps 3 --json
    timeout 120 "$P" bench --backend cuda --kv-dtype f16 --batch 8,32,64,128 --prompt-len 128 --gen-len 128 --reps 1 --json
    skip 7b || timeout 100 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 1 --prompt-len 512 --gen-len 128 --reps 1 --json
    skip 7b || timeout 100 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 64 --prompt-len 128 --gen-len 64 --reps 1 --json
  } > "$F/bench.jsonl" 2> "$F/bench.log"
  table "$F/bench.jsonl"
  PAGODA_CUDA_VEC_MAX=4 timeout 30 "$P" bench --backend cuda --kv-dtype f16 --batch 8 --prompt-len 128 --gen-len 64 --reps 1 --json > "$F/vecmax4.json" 2>/dev/null
  PAGODA_CUDA_PREFILL_TILES=1 timeout 30 "$P" bench --backend cuda --kv-dtype f16 --batch 1 --prompt-len 512 --gen-len 8 --reps 1 --json > "$F/tiles1.json" 2>/dev/null
  echo "== A/B: VEC_MAX=4 (B=8), PREFILL_TILES=1 (pp512)"; table "$F/vecmax4.json"; table "$F/tiles1.json"
  vulkan
  timeout 15 "$P" devices > "$F/devices.txt" 2>&1; grep -iA4 wgpu "$F/devices.txt" | head -8
  for t in wgpu_parity wgpu_reference; do
    skip "$t" && continue
    timeout 110 "$DIR/wgpu/tests/$t" --test-threads 1 --skip masked > "$F/$t.log" 2>&1
    echo "$t rc=$? $(grep -E '^test result' "$F/$t.log")"
    grep -E "^test .*(ok|FAILED)|panicked at" "$F/$t.log" | head -12
  done
  timeout 60 "$P" bench --backend wgpu --kv-dtype f16 --batch 1,64 --prompt-len 128 --gen-len 32 --reps 1 --json > "$F/wgpu-bench.json" 2>"$F/wgpu-bench.log"
  table "$F/wgpu-bench.json"; grep -i "device\|adapter" "$F/wgpu-bench.log" | head -2
  tar czf "$OUT/final.tgz" -C "$OUT" final ;;
ab)
  # Model-free A/B of kernel variants (carry device-carry-d): parity of every op on the
  # defaults with PAGODA_CUDA_MMA=2, GEMV variants (PAGODA_CUDA_MV), per-kernel profiles, the
  # viewer's CUDA trace with KV growth. Few files come back: all logs go in one tarball.
  mkdir -p "$DIR/cache" "$OUT/ab"; A=$OUT/ab
  tar xzf device-carry-d/bins.tgz -C "$DIR"
  PAGODA_CUDA_MMA=2 timeout 240 "$DIR/tests/cuda_parity" --ignored --test-threads 1 --nocapture > "$A/parity-mma2.log" 2>&1
  echo "parity (MV default, MMA=2) rc=$? $(grep -E '^test result' "$A/parity-mma2.log")"
  grep -E "FAILED|panicked|above" "$A/parity-mma2.log" | head -5
  for mv in 0 auto r1 r2; do
    PAGODA_CUDA_MV=$mv timeout 40 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 1 --prompt-len 128 --gen-len 64 --reps 1 --json > "$A/mv-$mv.json" 2>/dev/null
    PAGODA_CUDA_MV=$mv timeout 40 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_k --batch 1,4 --prompt-len 128 --gen-len 32 --reps 1 --json >> "$A/mv-$mv.json" 2>/dev/null
    PAGODA_CUDA_MV=$mv timeout 30 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --batch 1,8 --prompt-len 128 --gen-len 128 --reps 1 --json >> "$A/mv-$mv.json" 2>/dev/null
    echo "== PAGODA_CUDA_MV=$mv"; table "$A/mv-$mv.json"
  done
  for mma in 1 2; do
    PAGODA_CUDA_MMA=$mma timeout 60 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 64 --prompt-len 128 --gen-len 32 --reps 1 --json > "$A/mma-$mma.json" 2>/dev/null
    PAGODA_CUDA_MMA=$mma timeout 30 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --batch 1,128 --prompt-len 512 --gen-len 16 --reps 1 --json >> "$A/mma-$mma.json" 2>/dev/null
    echo "== PAGODA_CUDA_MMA=$mma"; table "$A/mma-$mma.json"
  done
  M="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
  timeout 120 ncu --clock-control none --cache-control none --metrics "$M" --csv --print-units base --log-file "$A/ncu-smol-b1.csv" \
    "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --reps 1 --warmup 0 --batch 1 --prompt-len 128 --gen-len 8 > "$A/ncu-smol-b1.out" 2>&1
  echo "== ncu smol b1 rc=$?"; python3 "$REPO/scripts/ncu-summary.py" "$A/ncu-smol-b1.csv" 16
  timeout 120 ncu --clock-control none --cache-control none --metrics "$M,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active" --kernel-name regex:matmul_vec --launch-skip 200 --launch-count 8 --csv --print-units base --log-file "$A/ncu-7b-vec.csv" \
    "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --reps 1 --warmup 0 --batch 1 --prompt-len 16 --gen-len 4 > "$A/ncu-7b-vec.out" 2>&1
  echo "== ncu 7b vec rc=$?"; python3 "$REPO/scripts/ncu-summary.py" "$A/ncu-7b-vec.csv" 8
  timeout 30 "$P" generate --backend cuda --dummy-weights smollm2-135m --prompts viewer/tests/traces/prompts.txt \
    --parallel 6 --ctx 512 --max-tokens 300 --max-batched-tokens 40 --greedy --seed 7 --trace "$OUT/cuda.jsonl" \
    > /dev/null 2> "$A/trace.log"; tail -1 "$A/trace.log"
  tar czf "$OUT/ab.tgz" -C "$OUT" ab ;;
nomodel)
  PAGODA_CUDA_MMA=2 PAGODA_PARITY_OPS=matmul,rms_norm_matmul timeout 60 "$DIR/tests/cuda_parity" --ignored --test-threads 1 --nocapture > "$OUT/parity-mma2.log" 2>&1
  echo "parity mma2 rc=$? $(grep -E '^test result' "$OUT/parity-mma2.log")"
  grep -E "FAILED|panicked|above" "$OUT/parity-mma2.log" | head -5
  for mma in 1 2; do
    PAGODA_CUDA_MMA=$mma timeout 25 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights smollm2-135m --batch 32 --prompt-len 128 --gen-len 64 --reps 1 --json > "$OUT/mma$mma.json" 2>/dev/null
    PAGODA_CUDA_MMA=$mma timeout 40 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype q4_0 --batch 64 --prompt-len 128 --gen-len 32 --reps 1 --json >> "$OUT/mma$mma.json" 2>/dev/null
    echo "== PAGODA_CUDA_MMA=$mma"; table "$OUT/mma$mma.json"
  done
  for t in q5_k q5_1; do
    timeout 30 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype "$t" --batch 1 --prompt-len 512 --gen-len 64 --reps 1 --json
    timeout 35 "$P" bench --backend cuda --kv-dtype f16 --dummy-weights llama2-7b --dummy-dtype "$t" --batch 64 --prompt-len 128 --gen-len 32 --reps 1 --json
  done > "$OUT/kquant.jsonl" 2>/dev/null
  table "$OUT/kquant.jsonl" ;;
model)
  vulkan
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  if [ "${MMA2_OK:-1}" = 1 ]; then
    for t in cuda_reference; do
      PAGODA_CUDA_MMA=2 timeout 40 "$DIR/tests/$t" --ignored --test-threads 1 > "$OUT/mma2-$t.log" 2>&1
      echo "$t (MMA=2) rc=$? $(grep -E '^test result' "$OUT/mma2-$t.log")"
      grep -E "^test .*FAILED|panicked" "$OUT/mma2-$t.log" | head -4
    done
  fi
  PAGODA="$P" timeout 40 bash "$REPO/scripts/record-trace.sh" --backend cuda "$OUT/cuda.jsonl" 2>&1 | tail -2
  timeout 20 "$P" devices 2>&1 | grep -iE -A3 "wgpu" | head -8
  for t in wgpu_parity wgpu_reference; do
    # As the adapter is (the masked twins are CI's, on lavapipe).
    timeout 90 "$DIR/wgpu/tests/$t" --test-threads 1 --nocapture --skip masked > "$OUT/$t.log" 2>&1
    echo "$t rc=$? $(grep -E '^test result' "$OUT/$t.log")"
    grep -E "^test .*FAILED|panicked at|vs " "$OUT/$t.log" | head -6
  done
  timeout 60 "$P" bench --backend wgpu --kv-dtype f16 --batch 1,64 --prompt-len 128 --gen-len 32 --reps 1 --json > "$OUT/wgpu-bench.json" 2>"$OUT/wgpu-bench.log"
  table "$OUT/wgpu-bench.json"; tail -2 "$OUT/wgpu-bench.log" ;;
esac
