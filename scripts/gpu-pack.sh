#!/usr/bin/env bash
# Builds the GPU test binaries and the CLI here (no Rust on the GPU machine) and packs them
# into device-carry-c (binaries only; device-carry-a holds the model's first half);
# device-carry-b holds the model's second half and the wgpu test binaries (wgpu.tgz).
# Usage: scripts/gpu-pack.sh   (carry .gl beside device-carry-b for NVIDIA Vulkan: the
# Vulkan loader, see notes/gpu-runs.md)
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(cuda_parity cuda_engine cuda_arena cuda_reference cuda_memory)
WGPU_TESTS=(wgpu_parity wgpu_reference)
args=(); for t in "${TESTS[@]}" "${WGPU_TESTS[@]}"; do args+=(--test "$t"); done
flock /tmp/cargo.lock cargo build --release -p pagoda
json=$(flock /tmp/cargo.lock cargo test --release -p pagoda-tests "${args[@]}" --no-run --message-format json 2>/dev/null)
stage=$(mktemp -d); mkdir -p "$stage/tests" "$stage/wgpu/tests"
exe_of() { jq -r "select(.reason==\"compiler-artifact\" and .target.name==\"$1\" and .executable!=null) | .executable" <<<"$json" | tail -1; }
for t in "${TESTS[@]}"; do cp "$(exe_of "$t")" "$stage/tests/$t"; done
for t in "${WGPU_TESTS[@]}"; do cp "$(exe_of "$t")" "$stage/wgpu/tests/$t"; done
strip "$stage"/wgpu/tests/*
cp target/release/pagoda "$stage/pagoda"
strip "$stage/pagoda" "$stage"/tests/*
model=${PAGODA_CACHE:-$HOME/.cache/pagoda}/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p device-carry-a device-carry-b device-carry-c
if [ ! -f "$model" ]; then
  echo "no model at $model: device-carry-a/b left without it (gpu-round.sh single needs none)" >&2
elif [ ! -s device-carry-a/model.part00 ] || [ ! -s device-carry-b/model.part01 ]; then
  ( cd "$stage" && split -n 2 -d "$model" model.part && mv model.part00 "$OLDPWD/device-carry-a/" && mv model.part01 "$OLDPWD/device-carry-b/" )
fi
tar czf device-carry-c/bins.tgz -C "$stage" pagoda tests
tar czf device-carry-b/wgpu.tgz -C "$stage/wgpu" tests
# device-carry-d: binaries and wgpu tests without the model, for gpu-round.sh's single call.
mkdir -p device-carry-d && cp device-carry-c/bins.tgz device-carry-b/wgpu.tgz device-carry-d/

rm -rf "$stage"
ls -la device-carry-a device-carry-b device-carry-c
