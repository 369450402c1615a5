#!/usr/bin/env bash
# Build the kosmos-rt Python wheel: the kosmos_rt package (python/) with libkosmos_rt.so inside.
#
#   scripts/python_wheel.sh [--debug] [-o DIR]      # default: release build, DIR target/wheels
#   pip install target/wheels/kosmos_rt-*.whl       # pulls onnxruntime, whose library it loads
#
# The wheel is tagged py3-none-linux_<arch>: it runs on machines with this one's glibc or newer
# (it is not a manylinux build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile=release
out="$root/target/wheels"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --debug) profile=debug ;;
    -o) out="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "python_wheel.sh: unknown argument '$1' (--debug, -o DIR)" >&2; exit 2 ;;
  esac
  shift
done

# The set-up only when missing: the test suite runs this beside tests that use .deps/.
[[ -x .venv/bin/python ]] || scripts/setup.sh
flags=(--locked -p kosmos-rt --lib)
[[ $profile == release ]] && flags+=(--release)
cargo build "${flags[@]}"

bundled=python/kosmos_rt/libkosmos_rt.so
# The copy exists only while the wheel is built: in a checkout, target/ is the library's place.
trap 'rm -rf "$bundled" python/build python/kosmos_rt.egg-info' EXIT
cp "target/$profile/libkosmos_rt.so" "$bundled"
[[ $profile == release ]] && strip --strip-unneeded "$bundled"
mkdir -p "$out"
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" python/
ls -1 "$out"/kosmos_rt-*.whl
