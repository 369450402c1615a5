#!/usr/bin/env bash
# On a machine with a GPU and nvcc (not part of scripts/test.sh): build the ai.kosmos CUDA
# kernels, run their C++ check against the CPU reference, then compare and time them against
# the unfused PyTorch ops (scripts/bench/cuda_kernels.py). Writes results to ${OUT:-.}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/runs/cuda-kernels}"
mkdir -p "$out"
src="$root/plugins/tensorrt"
arch="${CUDA_ARCH:-native}"
nvcc -O3 -arch="$arch" -shared -Xcompiler -fPIC -o "$out/libkosmos_kernels.so" "$src/src/kosmos_kernels.cu"
nvcc -O3 -arch="$arch" -I"$src/src" -o "$out/kosmos_kernel_test" "$src/tests/kernel_test.cu" \
  -L"$out" -lkosmos_kernels -Xlinker -rpath="$out"
"$out/kosmos_kernel_test" | tee "$out/kernel_test.txt"
python="${PYTHON:-python3}"
"$python" "$root/scripts/bench/cuda_kernels.py" --lib "$out/libkosmos_kernels.so" | tee "$out/cuda_kernels.txt"
