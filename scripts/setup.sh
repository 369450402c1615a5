#!/usr/bin/env bash
# One-step, idempotent set-up: a Python venv with the pinned wheels, and stable paths under .deps/
# that .cargo/config.toml points at, so plain `cargo build` / `cargo test` work afterwards.
# A second run with everything in place only checks a stamp and returns in seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf '[setup] %s\n' "$*" >&2; }

python="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.kosmos-setup-stamp"
want="$(cat scripts/requirements.txt scripts/constraints.txt | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi

if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "installing pinned Python packages (first run: a few minutes, ~5 GB)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  # fairscale 0.4.0 is an sdist; torchscale imports it. The constraints file pins everything.
  # No pip cache: the CUDA wheels alone would keep ~3 GB of CI's small disk.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    -c scripts/constraints.txt -r scripts/requirements.txt
  echo "$want" >"$stamp"
else
  log "Python packages already installed"
fi

torch_dir="$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
ort_lib="$("$venv/bin/python" -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))[-1])')"

# NVIDIA's compiler wheels put a CUDA toolkit under nvidia/cu13, short of two links that a
# toolkit root has: nvcc 13.0 links from lib64, and CMake's FindCUDAToolkit wants libcudart.so.
cuda_dir="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
[[ -e "$cuda_dir/lib64" ]] || ln -s lib "$cuda_dir/lib64"
[[ -e "$cuda_dir/lib/libcudart.so" ]] || ln -s libcudart.so.13 "$cuda_dir/lib/libcudart.so"

mkdir -p .deps
ln -sfn "$torch_dir" .deps/libtorch
ln -sfn "$ort_lib" .deps/libonnxruntime.so
ln -sfn "$cuda_dir" .deps/cuda
log "libtorch      -> $torch_dir"
log "onnxruntime   -> $ort_lib"
log "cuda (nvcc)   -> $cuda_dir"
log "ready"
