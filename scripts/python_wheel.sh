#!/usr/bin/env bash
# Build the kosmos-rt Python wheel: the kosmos_rt package (python/) with libkosmos_rt.so inside.
#
#   scripts/python_wheel.sh [--debug] [-o DIR]      # default: release build, DIR target/wheels
#   pip install target/wheels/kosmos_rt-*.whl       # pulls onnxruntime, whose library it loads
#
# The wheel is tagged py3-none-manylinux_2_<N>_<arch>, N the newest glibc its library's symbols
# need (auditwheel decides, from the library built here; this machine's toolchain gives 2.34:
# Debian 12, Ubuntu 22.04, RHEL 9 and newer). An older N needs a build in a manylinux image.
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
built="$(mktemp -d)"
# The copy exists only while the wheel is built: in a checkout, target/ is the library's place.
trap 'rm -rf "$bundled" python/build python/kosmos_rt.egg-info "$built"' EXIT
cp "target/$profile/libkosmos_rt.so" "$bundled"
[[ $profile == release ]] && strip --strip-unneeded "$bundled"
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$built" python/
wheel="$(ls "$built"/kosmos_rt-*.whl)"
# The platform tag the library's versioned symbols and linked libraries allow (PEP 600).
tag="$(.venv/bin/python -m auditwheel show --json "$wheel" 2> >(grep -v "^INFO:" >&2) |
  .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["overall_tag"])')"
if [[ $tag == manylinux_* ]]; then
  .venv/bin/python -m wheel tags --remove --platform-tag "$tag" "$wheel" >/dev/null
else
  echo "python_wheel.sh: auditwheel gives '$tag', not a manylinux tag; keeping $(basename "$wheel")" >&2
fi
mkdir -p "$out"
w="$(ls "$built"/kosmos_rt-*.whl)"
# This version's wheel under another platform tag (an older build) would be pip's pick too.
rm -f "$out/$(basename "${w%%-py3-*}")"-py3-none-*.whl
mv "$w" "$out/"
echo "$out/$(basename "$w")"
